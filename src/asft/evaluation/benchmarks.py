"""Benchmark loaders: each published format -> `Example`s, and one normalised JSONL the evaluation reads.

Formats (one JSON object per line), as in DESIGN.md: math500, minerva_math, olympiadbench, aime24, amc23,
gsm8k (math, graded with math-verify) and medqa, medmcqa, mmlu_medical (multiple choice, graded by letter).
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from asft.data import iter_json_objects

MATH_FORMATS = ("math500", "minerva_math", "olympiadbench", "aime24", "amc23", "gsm8k")
CHOICE_FORMATS = ("medqa", "medmcqa", "mmlu_medical")
BENCHMARK_FORMATS = MATH_FORMATS + CHOICE_FORMATS


class BenchmarkFormatError(ValueError):
    """A malformed benchmark line, reported with file, 1-based line and field."""


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    gold: str
    choices: tuple[str, ...] | None = None
    kind: str = "math"


def last_boxed(text: str) -> str | None:
    r"""The content of the last \boxed{...} (or \fbox{...}, or `\boxed 5`), braces matched."""
    index = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if index < 0:
        return None
    rest = text[index:]
    rest = rest[len("\\boxed") :] if rest.startswith("\\boxed") else rest[len("\\fbox") :]
    if rest.startswith(" "):
        token = rest.strip().split("$")[0].split()
        return token[0] if token else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for position, char in enumerate(rest):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return rest[1:position]
    return None


class _Line:
    """Field access for one record that raises errors naming the file, line and field."""

    def __init__(self, record: dict[str, Any], path: Path, line_no: int) -> None:
        self.record, self.path, self.line_no = record, path, line_no

    def fail(self, message: str) -> BenchmarkFormatError:
        return BenchmarkFormatError(f"{self.path}:{self.line_no}: {message}")

    def get(self, field: str, kind: type | tuple[type, ...]) -> Any:
        if field not in self.record:
            raise self.fail(f"missing field {field!r}")
        value = self.record[field]
        if not isinstance(value, kind) or isinstance(value, bool):  # bool is an int subclass; never valid here
            raise self.fail(f"field {field!r} has type {type(value).__name__}")
        return value

    def id(self, field: str, index: int) -> str:
        value = self.record.get(field)
        return str(value) if value is not None else str(index)


def _answer_text(value: Any) -> str:
    return str(value).strip()


def _math500(line: _Line, index: int) -> Example:
    return Example(
        line.id("unique_id", index), line.get("problem", str), _answer_text(line.get("answer", (str, int, float)))
    )


def _minerva(line: _Line, index: int) -> Example:
    gold = last_boxed(line.get("solution", str))
    if gold is None:
        raise line.fail("field 'solution' has no \\boxed{} answer")
    return Example(line.id("idx", index), line.get("problem", str), gold.strip())


def _olympiad(line: _Line, index: int) -> Example:
    answers = line.get("final_answer", list)
    if not answers or not all(isinstance(a, str) for a in answers):
        raise line.fail("field 'final_answer' must be a non-empty list of strings")
    cleaned = [a.replace("$", "").strip() for a in answers]  # "$69$,$84$" -> "69,84"
    question = line.get("question", str)
    context = line.record.get("context")
    if isinstance(context, str) and context.strip():
        question = context.strip() + "\n\n" + question
    return Example(line.id("id", index), question, ", ".join(cleaned))


def _aime(line: _Line, index: int) -> Example:
    return Example(line.id("id", index), line.get("problem", str), _answer_text(line.get("answer", (str, int, float))))


def _gsm8k(line: _Line, index: int) -> Example:
    answer = line.get("answer", str)
    if "####" not in answer:
        raise line.fail("field 'answer' has no '#### <number>' line")
    gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return Example(line.id("id", index), line.get("question", str), gold)


def _choice(line: _Line, index: int, question: str, choices: list[str], gold_index: int) -> Example:
    if not 0 <= gold_index < len(choices):
        raise line.fail(f"answer index {gold_index} out of range for {len(choices)} options")
    return Example(line.id("id", index), question, string.ascii_uppercase[gold_index], tuple(choices), "choice")


def _medqa(line: _Line, index: int) -> Example:
    options = line.get("options", dict)
    letters = sorted(options)
    letter = line.get("answer_idx", str).strip()
    if letter not in options:
        raise line.fail(f"field 'answer_idx' {letter!r} is not one of the options {letters}")
    if letters != list(string.ascii_uppercase[: len(letters)]):
        raise line.fail(f"field 'options' keys must be A, B, C, ... (got {letters})")
    return _choice(line, index, line.get("question", str), [str(options[k]) for k in letters], letters.index(letter))


def _medmcqa(line: _Line, index: int) -> Example:
    choices = [str(line.get(key, (str, int, float))) for key in ("opa", "opb", "opc", "opd")]
    return _choice(line, index, line.get("question", str), choices, line.get("cop", int))


def _mmlu(line: _Line, index: int) -> Example:
    choices = [str(c) for c in line.get("choices", list)]
    return _choice(line, index, line.get("question", str), choices, line.get("answer", int))


LOADERS: dict[str, Callable[[_Line, int], Example]] = {
    "math500": _math500,
    "minerva_math": _minerva,
    "olympiadbench": _olympiad,
    "aime24": _aime,
    "amc23": _aime,
    "gsm8k": _gsm8k,
    "medqa": _medqa,
    "medmcqa": _medmcqa,
    "mmlu_medical": _mmlu,
}


def _records(path: Path) -> Iterator[_Line]:
    for line_no, record in iter_json_objects(path, BenchmarkFormatError):
        yield _Line(record, path, line_no)


def load_benchmark(name: str, path: str | Path) -> list[Example]:
    """Parse a benchmark file in its published format `name`."""
    if name not in LOADERS:
        raise ValueError(f"unknown benchmark format {name!r}; expected one of {BENCHMARK_FORMATS}")
    path = Path(path)
    examples = [LOADERS[name](line, index) for index, line in enumerate(_records(path))]
    if not examples:
        raise BenchmarkFormatError(f"{path}: no problems")
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise BenchmarkFormatError(f"{path}: duplicate problem ids")
    return examples


def normalize_benchmark(name: str, src_path: str | Path, dst_path: str | Path) -> int:
    """Write the normalised JSONL (id, question, gold, choices, kind); returns the problem count."""
    examples = load_benchmark(name, src_path)
    with Path(dst_path).open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(asdict(example), ensure_ascii=False) + "\n")
    return len(examples)


def load_normalized(path: str | Path) -> list[Example]:
    """Read a normalised benchmark file back."""
    path = Path(path)
    examples = []
    for line in _records(path):
        choices = line.record.get("choices")
        examples.append(
            Example(
                id=line.get("id", str),
                question=line.get("question", str),
                gold=line.get("gold", str),
                choices=tuple(choices) if choices is not None else None,
                kind=line.get("kind", str),
            )
        )
    return examples
