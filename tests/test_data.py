"""Prompt templates, data validation, and TRL's prompt masking on our prompt/completion examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asft.data import (
    DataFormatError,
    read_instruction_jsonl,
    render_prompt,
    template_prompt,
    to_prompt_completion,
)

UPSTREAM_ALPACA = (  # zhuchichi56/ASFT train_v2.py PROMPT_DICT["prompt_no_input"]
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:"
)


def test_alpaca_training_text_is_upstreams_prompt_response_eos() -> None:
    """Upstream trains on prompt + response + EOS, nothing between prompt and response (TRL adds the EOS)."""
    example = to_prompt_completion({"instruction": "Add 2 and 3.", "response": "5"}, "alpaca")
    assert example == {"prompt": UPSTREAM_ALPACA, "completion": "5"}
    assert example["prompt"] + example["completion"] == UPSTREAM_ALPACA + "5"


def test_alpaca_evaluation_prompt_ends_with_a_newline_as_upstreams() -> None:
    """Upstream's evaluation alpaca prompt (math_evaluation/utils.py) is the training one plus "\\n"."""
    assert render_prompt("Add 2 and 3.", "alpaca") == UPSTREAM_ALPACA + "\n"
    assert render_prompt("Add 2 and 3.", "alpaca", stage="train") == UPSTREAM_ALPACA
    assert template_prompt("Add 2 and 3.", "alpaca", "eval") == UPSTREAM_ALPACA + "\n"


def test_plain_and_question_answer_templates() -> None:
    text = "Question: q\n\nOptions:\nA. a\nB. b\n\nAnswer:"
    assert render_prompt(text, "plain") == text  # no wrapper at all
    assert render_prompt("What is 1+1?", "question_answer") == "Question: What is 1+1?\nAnswer:"
    assert to_prompt_completion({"instruction": "x", "response": "y"}, "plain") == {"prompt": "x", "completion": "y"}
    with pytest.raises(ValueError, match="unknown stage"):
        template_prompt("x", "alpaca", "test")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "bad.jsonl:2: not valid JSON"),
        (json.dumps({"instruction": "x"}), "bad.jsonl:2: field 'response' must be a non-empty string"),
        (json.dumps(["x"]), "bad.jsonl:2: expected a JSON object"),
    ],
)
def test_malformed_training_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n" + line + "\n")
    with pytest.raises(DataFormatError, match=message):
        read_instruction_jsonl(path)


def test_non_utf8_training_line_names_file_and_line(tmp_path: Path) -> None:
    """Not a UnicodeDecodeError traceback: the line is found even past the first 8 KiB read buffer."""
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"instruction": "a" * 20_000, "response": "b"}).encode() + b"\n"
    path.write_bytes(good + good + b'{"instruction": "caf\xe9", "response": "b"}\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:3: not UTF-8 \(byte 0xe9 at byte 21\)"):
        read_instruction_jsonl(path)


def test_chat_templates_use_the_tokenizer(small_demo: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(small_demo / "model")
    chat = render_prompt("Add 2 and 3.", "chat", tokenizer)
    cot = render_prompt("Add 2 and 3.", "qwen_math_cot", tokenizer)
    assert "Add 2 and 3." in chat and chat.rstrip().endswith("assistant")
    assert "Please reason step by step, and put your final answer within \\boxed{}." in cot
    with pytest.raises(ValueError, match="unknown template"):
        render_prompt("x", "vicuna", tokenizer)


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_trl_masks_the_prompt(small_demo: Path, template: str) -> None:
    """Only response tokens (and the closing EOS) carry labels; the prompt is -100."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(small_demo / "model")
    model = AutoModelForCausalLM.from_pretrained(small_demo / "model")
    record = {
        "instruction": "Tom has 3 apples and buys 4 more. How many?",
        "response": "3 + 4 = 7. \\boxed{7}",
    }
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(output_dir=str(small_demo / "unused"), report_to="none", max_length=256, bf16=False),
        train_dataset=Dataset.from_list([to_prompt_completion(record, template)]),
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    target = labels != -100
    prompt = render_prompt(record["instruction"], template, tokenizer, stage="train")
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert not target[:n_prompt].any()
    assert target[n_prompt:].all()
    completion_text = tokenizer.decode(ids[target], skip_special_tokens=True)
    assert record["response"] in completion_text
    if template == "alpaca":  # TRL closes text completions with EOS, which is a target too
        assert ids[-1].item() == tokenizer.eos_token_id and target[-1]
        # The whole sequence is upstream's: tokenizer(prompt + response) followed by EOS.
        upstream = tokenizer(prompt + record["response"])["input_ids"] + [tokenizer.eos_token_id]
        assert ids.tolist() == upstream
    else:  # the chat template closes the assistant turn, and the model learns to emit the end-of-turn token
        assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids[target].tolist()
