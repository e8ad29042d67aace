"""Benchmark loaders on the real shared files and on small fixtures of the other formats."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from asft import matrix
from asft.evaluation.benchmarks import (
    BENCHMARK_FORMATS,
    CHOICE_FORMATS,
    CODE_FORMATS,
    JUDGED_FORMATS,
    MATH_FORMATS,
    MAX_QUESTION_CHARS,
    BenchmarkFormatError,
    Example,
    last_boxed,
    load_benchmark,
    load_normalized,
    normalize_benchmark,
)

SHARED_BENCHMARKS = Path(__file__).parents[1].parent / "shared/data/benchmarks"
needs_shared = pytest.mark.skipif(not SHARED_BENCHMARKS.exists(), reason="shared benchmark files not present")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write(path: Path, *records: dict | str) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_format_names() -> None:
    families = (MATH_FORMATS, CHOICE_FORMATS, CODE_FORMATS, JUDGED_FORMATS)
    assert set().union(*families) == set(BENCHMARK_FORMATS) and len(BENCHMARK_FORMATS) == sum(map(len, families))
    assert not set(MATH_FORMATS) & set(CHOICE_FORMATS)
    # the planning side's copies (no torch there)
    assert (matrix.CODE_FORMATS, matrix.JUDGED_FORMATS) == (CODE_FORMATS, JUDGED_FORMATS)
    with pytest.raises(ValueError, match="unknown benchmark format"):
        load_benchmark("math", "unused.jsonl")


@needs_shared
@pytest.mark.parametrize(
    ("name", "folder", "count"),
    [("math500", "math_oai", 500), ("aime24", "aime24", 30), ("amc23", "amc23", 40), ("gsm8k", "gsm8k", 1319)]
    + [("medqa", "medqa", 1273)],
)
def test_real_files_load_and_round_trip(name: str, folder: str, count: int, tmp_path: Path) -> None:
    path = SHARED_BENCHMARKS / folder / "test.jsonl"
    examples = load_benchmark(name, path)
    assert len(examples) == len(_rows(path)) == count
    assert all(e.question.strip() and e.gold.strip() for e in examples)
    assert {e.kind for e in examples} == {"choice" if name in CHOICE_FORMATS else "math"}
    out = tmp_path / "normalized.jsonl"
    assert normalize_benchmark(name, path, out) == count
    assert load_normalized(out) == examples
    assert set(json.loads(out.read_text().splitlines()[0])) == {"id", "question", "gold", "choices", "kind"}


@needs_shared
def test_real_field_mapping() -> None:
    math = load_benchmark("math500", SHARED_BENCHMARKS / "math_oai/test.jsonl")
    raw = _rows(SHARED_BENCHMARKS / "math_oai/test.jsonl")
    assert (math[0].id, math[0].question, math[0].gold) == (raw[0]["unique_id"], raw[0]["problem"], raw[0]["answer"])
    assert math[0].choices is None and math[0].kind == "math"

    gsm = load_benchmark("gsm8k", SHARED_BENCHMARKS / "gsm8k/test.jsonl")
    assert gsm[0].gold == "18" and gsm[0].id == "0" and gsm[-1].id == "1318"  # "... #### 18"; no id field
    assert all("," not in e.gold and e.gold.lstrip("-").replace(".", "").isdigit() for e in gsm)

    amc = load_benchmark("amc23", SHARED_BENCHMARKS / "amc23/test.jsonl")
    assert amc[0].gold == "27.0" and amc[0].id == "0"  # the file stores the float 27.0
    aime = load_benchmark("aime24", SHARED_BENCHMARKS / "aime24/test.jsonl")
    assert (aime[0].id, aime[0].gold) == ("60", "204")

    medqa = load_benchmark("medqa", SHARED_BENCHMARKS / "medqa/test.jsonl")
    raw = _rows(SHARED_BENCHMARKS / "medqa/test.jsonl")[0]
    assert medqa[0].kind == "choice" and medqa[0].gold == raw["answer_idx"] == "B"
    assert medqa[0].choices == tuple(raw["options"][k] for k in "ABCD")
    assert medqa[0].choices[ord(medqa[0].gold) - ord("A")] == raw["answer"]


def test_minerva_takes_the_last_boxed_answer(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "minerva.jsonl",
        {"problem": "p", "solution": "x \\boxed{1} then \\boxed{\\frac{a}{b}}", "type": "Physics", "idx": 3},
        {"problem": "q", "solution": "so $\\boxed{6 \\times 10^{24}}$ kg.", "type": "Astronomy"},
    )
    first, second = load_benchmark("minerva_math", path)
    assert (first.id, first.gold, first.question) == ("3", "\\frac{a}{b}", "p")
    assert (second.id, second.gold) == ("1", "6 \\times 10^{24}")  # no idx: the 0-based line index


def test_olympiadbench_strips_dollars_and_joins_multiple_answers(tmp_path: Path) -> None:
    record = {
        "id": 7,
        "question": "q",
        "final_answer": ["$3$", "$-1$"],
        "is_multiple_answer": True,
        "unit": None,
        "answer_type": "Numerical",
        "subfield": "Algebra",
        "context": None,
    }
    path = tmp_path / "olympiad.jsonl"
    example = load_benchmark("olympiadbench", _write(path, record))[0]
    assert (example.id, example.gold, example.question) == ("7", "3, -1", "q")
    example = load_benchmark("olympiadbench", _write(path, {**record, "final_answer": ["$\\frac{1}{2}$"]}))[0]
    assert example.gold == "\\frac{1}{2}"
    assert load_benchmark("olympiadbench", _write(path, {**record, "final_answer": ["$\\$5$"]}))[0].gold == "\\$5"
    with_context = load_benchmark("olympiadbench", _write(path, {**record, "context": "Let f(x) = x."}))[0]
    assert with_context.question == "Let f(x) = x.\n\nq"


def test_medmcqa_and_mmlu_map_zero_based_indices_to_letters(tmp_path: Path) -> None:
    medmcqa = _write(
        tmp_path / "medmcqa.jsonl", {"question": "q", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": 2}
    )
    assert load_benchmark("medmcqa", medmcqa) == [Example("0", "q", "C", ("w", "x", "y", "z"), "choice")]
    mmlu = _write(
        tmp_path / "mmlu.jsonl",
        {"subject": "anatomy", "question": "q", "choices": ["a", "b", "c", "d"], "answer": 3},
        "",  # blank lines are skipped, and ids stay line indices
        {"subject": "anatomy", "question": "r", "choices": ["a", "b", "c", "d"], "answer": 0},
    )
    examples = load_benchmark("mmlu_medical", mmlu)
    assert [(e.id, e.gold) for e in examples] == [("0", "D"), ("2", "A")]
    assert examples[0].choices == ("a", "b", "c", "d") and examples[0].kind == "choice"


def _open_medical(id_: str, question: str, options: dict, correct: str) -> dict:
    """A record in the Open Medical-LLM Leaderboard layout (openlifescienceai/medqa, openlifescienceai/mmlu_*)."""
    data = {"Question": question, "Options": options, "Correct Answer": options.get(correct), "Correct Option": correct}
    return {"id": id_, "data": data, "subject_name": "anatomy"}


@pytest.mark.parametrize("name", ["medqa", "mmlu_medical"])
def test_open_medical_layout_is_read_for_medqa_and_mmlu(tmp_path: Path, name: str) -> None:
    path = _write(
        tmp_path / "open.jsonl",
        _open_medical("u-1", "q1", {"A": "w", "B": "x", "C": "y", "D": "z"}, "C"),
        _open_medical("u-2", "q2", {"B": "x", "A": "w", "C": "y", "D": "z"}, "A"),  # key order does not matter
    )
    assert load_benchmark(name, path) == [
        Example("u-1", "q1", "C", ("w", "x", "y", "z"), "choice"),
        Example("u-2", "q2", "A", ("w", "x", "y", "z"), "choice"),
    ]
    bad = _write(tmp_path / "bad.jsonl", {"id": "u", "data": {"Options": {"A": "a", "B": "b"}, "Correct Option": "A"}})
    with pytest.raises(BenchmarkFormatError, match="bad.jsonl:1: missing field 'data.Question'"):
        load_benchmark(name, bad)
    wrong = _write(tmp_path / "wrong.jsonl", _open_medical("u", "q", {"A": "a", "B": "b"}, "E"))
    with pytest.raises(BenchmarkFormatError, match="wrong.jsonl:1: field 'data.Correct Option' 'E' is not one"):
        load_benchmark(name, wrong)


GOOD = {
    "math500": {"problem": "p", "solution": "s", "answer": "1", "subject": "x", "level": 1, "unique_id": "u1"},
    "minerva_math": {"problem": "p", "solution": "\\boxed{1}", "type": "t", "idx": 0},
    "olympiadbench": {"id": 1, "question": "q", "final_answer": ["$1$"], "is_multiple_answer": False},
    "aime24": {"id": 1, "problem": "p", "answer": "1", "url": "u"},
    "gsm8k": {"question": "q", "answer": "x #### 1"},
    "medqa": {"question": "q", "options": {"A": "a", "B": "b"}, "answer_idx": "A"},
    "medmcqa": {"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 0},
    "mmlu_medical": {"subject": "s", "question": "q", "choices": ["a", "b", "c", "d"], "answer": 0},
}


@pytest.mark.parametrize(
    ("name", "line", "message"),
    [
        ("math500", "{oops", "not valid JSON"),
        ("math500", "[1, 2]", "expected a JSON object"),
        ("math500", {"problem": "p"}, "missing field 'answer'"),
        ("math500", {"problem": 3, "answer": "1"}, "field 'problem' has type int"),
        ("aime24", {"id": 9, "problem": "p", "answer": True}, "field 'answer' has type bool"),
        ("aime24", {"id": 9, "problem": "p", "answer": " "}, "field 'answer' is empty"),
        ("minerva_math", {"problem": "p", "solution": "no box"}, "field 'solution' has no"),
        ("olympiadbench", {"question": "q", "final_answer": "$1$"}, "field 'final_answer' has type str"),
        ("olympiadbench", {"question": "q", "final_answer": []}, "field 'final_answer' must be a non-empty list"),
        ("gsm8k", {"question": "q", "answer": "42"}, "field 'answer' has no '####"),
        ("medqa", {"question": "q", "options": {"A": "a", "B": "b"}, "answer_idx": "E"}, "field 'answer_idx'"),
        ("medqa", {"question": "q", "options": ["a", "b"], "answer_idx": "A"}, "field 'options' has type list"),
        ("medmcqa", {"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 7}, "field 'cop'"),
        ("medmcqa", {"question": "q", "opa": "a", "opb": "b", "opc": "c", "cop": 1}, "missing field 'opd'"),
        ("mmlu_medical", {"question": "q", "choices": "abcd", "answer": 1}, "field 'choices' has type str"),
        ("mmlu_medical", {"question": "q", "choices": ["a", "b"], "answer": "B"}, "field 'answer' has type str"),
        ("aime24", {"id": 1, "problem": "p", "answer": "2"}, "duplicate problem id '1' \\(first on line 1\\)"),
    ],
)
def test_malformed_lines_name_file_line_and_field(tmp_path: Path, name: str, line: dict | str, message: str) -> None:
    path = _write(tmp_path / "bad.jsonl", GOOD[name], "", line)  # the bad record is on line 3
    with pytest.raises(BenchmarkFormatError, match=f"bad.jsonl:3: .*{message}"):
        load_benchmark(name, path)


def test_good_fixtures_load_and_an_empty_file_is_an_error(tmp_path: Path) -> None:
    for name, record in GOOD.items():
        assert len(load_benchmark(name, _write(tmp_path / f"{name}.jsonl", record))) == 1
    with pytest.raises(BenchmarkFormatError, match="empty.jsonl: no problems"):
        load_benchmark("gsm8k", _write(tmp_path / "empty.jsonl", ""))


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"id": "1", "question": "q", "gold": "1", "choices": None, "kind": "essay"}, "field 'kind' must be one of"),
        ({"id": "1", "question": "q", "gold": "E", "choices": ["a", "b"], "kind": "choice"}, "field 'gold' 'E'"),
        ({"id": "1", "question": "q", "gold": "", "choices": ["a", "b"], "kind": "choice"}, "field 'gold' ''"),
        ({"id": "1", "question": "q", "gold": "A", "choices": "ab", "kind": "choice"}, "field 'choices' must be"),
        ({"id": 1, "question": "q", "gold": "1", "choices": None, "kind": "math"}, "field 'id' has type int"),
        ({"question": "q", "gold": "1", "choices": None, "kind": "math"}, "missing field 'id'"),
    ],
)
def test_malformed_normalized_lines(tmp_path: Path, record: dict, message: str) -> None:
    good = {"id": "0", "question": "q", "gold": "1", "choices": None, "kind": "math"}
    path = _write(tmp_path / "norm.jsonl", good, record)
    with pytest.raises(BenchmarkFormatError, match=f"norm.jsonl:2: {message}"):
        load_normalized(path)


def test_normalize_round_trips_choices(tmp_path: Path) -> None:
    src = _write(tmp_path / "medqa.jsonl", GOOD["medqa"])
    dst = tmp_path / "out" / "medqa.norm.jsonl"
    assert normalize_benchmark("medqa", src, dst) == 1
    assert json.loads(dst.read_text()) == {
        "id": "0",
        "question": "q",
        "gold": "A",
        "choices": ["a", "b"],
        "kind": "choice",
    }
    assert load_normalized(dst) == load_benchmark("medqa", src)


def test_last_boxed() -> None:
    assert last_boxed("a \\boxed{x^{2}} b \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\{1, 2\\}} and \\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}") == (
        "\\begin{pmatrix}1\\\\2\\end{pmatrix}"
    )
    assert last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert last_boxed("\\fbox{7}") == "7" and last_boxed("\\boxed{1} then \\fbox{7}") == "7"
    assert last_boxed("so \\boxed 5$") == "5" and last_boxed("so \\boxed 5.") == "5"
    assert last_boxed("\\boxed {3}") == "3"
    assert last_boxed("none") is None and last_boxed("\\boxed{unclosed") is None
    assert last_boxed("\\boxed{1} and \\boxed{2") is None  # the final answer was cut off: no answer
    assert last_boxed("\\boxedanswer{3}") is None


@pytest.mark.parametrize(
    ("name", "good"),
    [
        ("math500", {"problem": "q" * 20_000, "answer": "1"}),
        ("medqa", {"question": "q" * 20_000, "options": {"A": "a", "B": "b"}, "answer_idx": "A"}),
        ("normalized", {"id": "0", "question": "q" * 20_000, "gold": "1", "choices": None, "kind": "math"}),
    ],
)
def test_non_utf8_bytes_name_file_and_line(tmp_path: Path, name: str, good: dict) -> None:
    """Read line by line as bytes, so the error points at the bad line, past an 8 KiB read buffer too."""
    path = tmp_path / "bench.jsonl"
    path.write_bytes(json.dumps(good).encode() + b"\n\n" + b'{"problem": "caf\xe9"}\n')
    with pytest.raises(BenchmarkFormatError, match=r"bench\.jsonl:3: not UTF-8 \(byte 0xe9"):
        load_normalized(path) if name == "normalized" else load_benchmark(name, path)


def test_an_outsized_question_is_refused_at_load(tmp_path: Path) -> None:
    """A 1 MB problem is a broken file; it fails here, by name, rather than as a huge tensor at generation."""
    path = _write(tmp_path / "bench.jsonl", {"problem": "x" * 1_000_000, "answer": "1", "unique_id": "big"})
    with pytest.raises(BenchmarkFormatError, match=r"bench\.jsonl:1: problem 'big' is 1000000 characters long"):
        load_benchmark("math500", path)
    normalized = _write(tmp_path / "normalized.jsonl", {"id": "a", "question": "q", "gold": "1", "kind": "math"})
    with normalized.open("a") as handle:
        handle.write(json.dumps({"id": "b", "question": "x" * (MAX_QUESTION_CHARS + 1), "gold": "1", "kind": "math"}))
    with pytest.raises(BenchmarkFormatError, match=r"normalized\.jsonl:2: problem 'b' is 100001 characters"):
        load_normalized(normalized)


def test_last_boxed_is_linear() -> None:
    started = time.monotonic()
    assert last_boxed("\\boxed{" * 100_000) is None
    assert last_boxed("\\boxed{" * 100_000 + "1}") == "1"
    assert time.monotonic() - started < 2.0  # a brace scan from the last opener only: milliseconds


def test_mmlu_medical_is_upstreams_twelve_subjects() -> None:
    from asft.evaluation.benchmarks import MMLU_MEDICAL_SUBJECTS

    assert len(MMLU_MEDICAL_SUBJECTS) == 12 and sum(MMLU_MEDICAL_SUBJECTS.values()) == 2739
    assert {"high_school_biology", "high_school_psychology", "nutrition", "virology", "human_aging"} <= set(
        MMLU_MEDICAL_SUBJECTS
    )


def test_mmlu_medical_reads_cais_mmlu_rows(tmp_path: Path) -> None:
    """Upstream's test file (and cais/mmlu per subject) holds subject, question, choices and a 0-based answer."""
    rows = [
        {"subject": "virology", "question": "q1", "choices": ["a", "b", "c", "d"], "answer": 2},
        {"subject": "nutrition", "question": "q2", "choices": ["a", "b", "c", "d"], "answer": 0},
    ]
    path = tmp_path / "mmlu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_benchmark("mmlu_medical", path)
    assert [(e.id, e.question, e.gold, e.kind) for e in examples] == [
        ("0", "q1", "C", "choice"),
        ("1", "q2", "A", "choice"),
    ]
