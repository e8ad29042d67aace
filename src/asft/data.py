"""Training data: instruction/response JSONL files and the prompt templates shared by training and evaluation.

Training and evaluation render prompts from the same templates. Upstream ASFT differs between the two in one
place, which is kept: its evaluation alpaca prompt ends "### Response:\n", its training prompt "### Response:".
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from asft.run_io import atomic_file

# Upstream ASFT training template, verbatim (zhuchichi56/ASFT train_v2.py PROMPT_DICT["prompt_no_input"]).
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:"
)
# Upstream evaluation's alpaca prompt (eval/math_evaluation/utils.py PROMPT_TEMPLATES["alpaca"]) adds a newline.
ALPACA_EVAL_TEMPLATE = ALPACA_TEMPLATE + "\n"
# Qwen2.5-Math evaluation's zero-shot "cot" prompt_type, "Question: {input}\nAnswer: " with the trailing space
# removed by construct_prompt's `.strip(" ")`: the token-weighted SFT fork (doub7e/token-SFT) evaluates MATH-500
# with it.
QUESTION_ANSWER_TEMPLATE = "Question: {instruction}\nAnswer:"
QWEN_MATH_COT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
# plain: the text as is (upstream's medical evaluation feeds its "Question: ... Answer:" text unwrapped).
TEMPLATES = ("alpaca", "chat", "qwen_math_cot", "plain", "question_answer")
TEXT_TEMPLATES = ("alpaca", "plain", "question_answer")  # rendered as text, not by a chat template
Stage = Literal["train", "eval"]


class DataFormatError(ValueError):
    """A malformed data line, reported with file and 1-based line number."""


def iter_json_objects(path: str | Path, error: type[ValueError] = ValueError) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line; a bad line raises `error` naming file and line.

    Lines are read as bytes and decoded one by one, so a non-UTF-8 byte is reported with its own line number
    (a text-mode reader fails on a whole buffer, with no line to point at).
    """
    path = Path(path)
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                offending = raw[err.start]
                raise error(f"{path}:{line_no}: not UTF-8 (byte {offending:#04x} at byte {err.start + 1})") from err
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise error(f"{path}:{line_no}: expected a JSON object")
            yield line_no, record


def read_instruction_jsonl(path: str | Path) -> list[dict[str, str]]:
    """Read `instruction`/`response` records, failing on the first malformed line with its location."""
    records = []
    for line_no, record in iter_json_objects(path, DataFormatError):
        for field in ("instruction", "response"):
            if not isinstance(record.get(field), str) or not record[field].strip():
                raise DataFormatError(f"{path}:{line_no}: field {field!r} must be a non-empty string")
        records.append({"instruction": record["instruction"], "response": record["response"]})
    if not records:
        raise DataFormatError(f"{path}: no records")
    return records


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records atomically (temp file + rename) so a failed job leaves no complete-looking file."""
    count = 0
    with atomic_file(Path(path)) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def template_prompt(instruction: str, template: str, stage: Stage = "train") -> str | list[dict[str, str]]:
    """The prompt for `instruction` under `template` at `stage`: the one place templates are told apart.

    Text templates are upstream's verbatim (alpaca's evaluation form ends with a newline, its training form does
    not, as upstream). Chat templates are conversation turns (a system turn too for Qwen-math CoT) that the
    tokenizer's own chat template renders.
    """
    if stage not in ("train", "eval"):
        raise ValueError(f"unknown stage {stage!r}; expected 'train' or 'eval'")
    if template == "alpaca":
        return (ALPACA_EVAL_TEMPLATE if stage == "eval" else ALPACA_TEMPLATE).format(instruction=instruction)
    if template == "plain":
        return instruction
    if template == "question_answer":
        return QUESTION_ANSWER_TEMPLATE.format(instruction=instruction)
    if template == "chat":
        return [{"role": "user", "content": instruction}]
    if template == "qwen_math_cot":
        return [{"role": "system", "content": QWEN_MATH_COT_SYSTEM}, {"role": "user", "content": instruction}]
    raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")


def render_prompt(instruction: str, template: str, tokenizer: Any = None, stage: Stage = "eval") -> str:
    """The exact prompt text a model sees for `instruction` under `template` (by default at evaluation)."""
    prompt = template_prompt(instruction, template, stage)
    if isinstance(prompt, str):
        return prompt
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"template {template!r} needs a tokenizer with a chat template")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def to_prompt_completion(record: dict[str, str], template: str) -> dict[str, Any]:
    """A TRL prompt/completion example: TRL masks the prompt and appends EOS to text completions.

    A text prompt is followed directly by the response, so the trained text is upstream's prompt + response + EOS
    (train_v2.py: `targets = f"{response}{eos_token}"`, `examples = s + t`); a conversational one gets an assistant
    turn, which TRL renders (and closes) with the tokenizer's own chat template.
    """
    prompt = template_prompt(record["instruction"], template, "train")
    if isinstance(prompt, str):
        return {"prompt": prompt, "completion": record["response"]}
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": record["response"]}]}


def prepare_dataset_records(
    rows: Iterable[dict[str, Any]],
    fields: dict[str, str],
    max_samples: int | None,
    shuffle_seed: int,
    origin: str,
) -> list[dict[str, str]]:
    """Map source columns to instruction/response, shuffle deterministically and cap the size."""
    import random

    instruction_key = fields.get("instruction", "instruction")
    response_key = fields.get("response", "response")
    records = []
    for index, row in enumerate(rows):
        missing = [k for k in (instruction_key, response_key) if not isinstance(row.get(k), str)]
        if missing:
            raise DataFormatError(f"{origin}: row {index}: missing or non-string column(s) {missing}")
        records.append({"instruction": row[instruction_key], "response": row[response_key]})
    if max_samples is not None and max_samples < len(records):
        random.Random(shuffle_seed).shuffle(records)
        records = records[:max_samples]
    return records
