"""Benchmark loaders on the real shared files and on small fixtures of the other formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asft.evaluation.benchmarks import (
    BenchmarkFormatError,
    last_boxed,
    load_benchmark,
    load_normalized,
    normalize_benchmark,
)
from tests.conftest import SHARED_BENCHMARKS

needs_shared = pytest.mark.skipif(not SHARED_BENCHMARKS.exists(), reason="shared benchmark files not present")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@needs_shared
@pytest.mark.parametrize(
    ("name", "folder"),
    [("math500", "math_oai"), ("aime24", "aime24"), ("amc23", "amc23"), ("gsm8k", "gsm8k"), ("medqa", "medqa")],
)
def test_real_files_load_completely(name: str, folder: str, tmp_path: Path) -> None:
    path = SHARED_BENCHMARKS / folder / "test.jsonl"
    examples = load_benchmark(name, path)
    assert len(examples) == len(_lines(path))
    assert all(e.question and e.gold for e in examples)
    out = tmp_path / "normalized.jsonl"
    assert normalize_benchmark(name, path, out) == len(examples)
    assert load_normalized(out) == examples


@needs_shared
def test_gold_answers_of_real_files() -> None:
    gsm = load_benchmark("gsm8k", SHARED_BENCHMARKS / "gsm8k/test.jsonl")
    raw = _lines(SHARED_BENCHMARKS / "gsm8k/test.jsonl")[0]
    assert gsm[0].gold == raw["answer"].split("####")[-1].strip().replace(",", "")
    medqa = load_benchmark("medqa", SHARED_BENCHMARKS / "medqa/test.jsonl")[0]
    raw = _lines(SHARED_BENCHMARKS / "medqa/test.jsonl")[0]
    assert medqa.kind == "choice" and medqa.gold == raw["answer_idx"]
    assert medqa.choices[ord(medqa.gold) - ord("A")] == raw["options"][raw["answer_idx"]]


def test_other_formats(tmp_path: Path) -> None:
    minerva = tmp_path / "minerva.jsonl"
    minerva.write_text(
        json.dumps({"problem": "p", "solution": "x \\boxed{1} then \\boxed{\\frac{a}{b}}", "idx": 3}) + "\n"
    )
    assert load_benchmark("minerva_math", minerva)[0].gold == "\\frac{a}{b}"
    olympiad = tmp_path / "olympiad.jsonl"
    record = {"id": 7, "question": "q", "final_answer": ["$3$", "$-1$"], "is_multiple_answer": True, "context": None}
    olympiad.write_text(json.dumps(record) + "\n")
    example = load_benchmark("olympiadbench", olympiad)[0]
    assert (example.id, example.gold) == ("7", "3, -1")
    olympiad.write_text(json.dumps({**record, "final_answer": ["$69$,$84$"]}) + "\n")
    assert load_benchmark("olympiadbench", olympiad)[0].gold == "69,84"  # the harness's own multi-answer form
    medmcqa = tmp_path / "medmcqa.jsonl"
    medmcqa.write_text(json.dumps({"question": "q", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": 2}) + "\n")
    assert load_benchmark("medmcqa", medmcqa)[0].gold == "C"
    mmlu = tmp_path / "mmlu.jsonl"
    mmlu.write_text(
        json.dumps({"subject": "anatomy", "question": "q", "choices": ["a", "b", "c", "d"], "answer": 3}) + "\n"
    )
    assert load_benchmark("mmlu_medical", mmlu)[0].gold == "D"


@pytest.mark.parametrize(
    ("name", "line", "message"),
    [
        ("math500", "{oops", "bad.jsonl:2: not valid JSON"),
        ("math500", json.dumps({"problem": "p"}), "bad.jsonl:2: missing field 'answer'"),
        ("gsm8k", json.dumps({"question": "q", "answer": "42"}), "bad.jsonl:2: field 'answer' has no '####"),
        (
            "medmcqa",
            json.dumps({"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 7}),
            "out of range",
        ),
        ("mmlu_medical", json.dumps({"question": "q", "choices": "abcd", "answer": 1}), "field 'choices' has type str"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, name: str, line: str, message: str) -> None:
    good = {
        "math500": {"problem": "p", "answer": "1"},
        "gsm8k": {"question": "q", "answer": "x #### 1"},
        "medmcqa": {"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 0},
        "mmlu_medical": {"question": "q", "choices": ["a", "b"], "answer": 0},
    }[name]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(BenchmarkFormatError, match=message):
        load_benchmark(name, path)


def test_last_boxed() -> None:
    assert last_boxed("a \\boxed{x^{2}} b \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("so \\boxed 5$") == "5"
    assert last_boxed("none") is None and last_boxed("\\boxed{unclosed") is None
