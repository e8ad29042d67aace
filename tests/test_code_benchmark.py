"""Code benchmarks: evalplus's layout -> Examples, grading in the sandbox, and the evaluation stage end to end."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

import asft
from asft.evaluation import code_grading, runner
from asft.evaluation.benchmarks import (
    BENCHMARK_FORMATS,
    CODE_FORMATS,
    KINDS,
    BenchmarkFormatError,
    Example,
    load_benchmark,
    load_normalized,
    normalize_benchmark,
)
from asft.evaluation.code_grading import CodeTests, build_program, extract_code, finished, grade_code
from asft.evaluation.sandbox import SandboxLimits, run_program

# the embedded stand-ins the demo build copies for the paper's smoke run (asft.demo)
STAND_INS = Path(asft.__file__).parent / "stand_ins"
HUMANEVAL = STAND_INS / "humaneval_plus.jsonl"
MBPP = STAND_INS / "mbpp_plus.jsonl"
LIMITS = SandboxLimits(timeout_s=5.0, memory_bytes=1 << 30)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write(path: Path, *records: dict | str) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _grade(example: Example, completion: str) -> tuple[bool, str]:
    (grade,) = grade_code([(completion, example.question, CodeTests.from_json(example.tests or ""), example.gold)])
    return grade.correct, grade.result.detail


def test_formats_and_kind() -> None:
    assert set(CODE_FORMATS) == {"humaneval", "humaneval_plus", "mbpp", "mbpp_plus"}
    assert set(CODE_FORMATS) <= set(BENCHMARK_FORMATS) and "code" in KINDS


@pytest.mark.parametrize(("name", "path"), [("humaneval", HUMANEVAL), ("mbpp", MBPP)])
def test_evalplus_layout_base_and_plus(name: str, path: Path) -> None:
    rows = _rows(path)
    base, plus = load_benchmark(name, path), load_benchmark(f"{name}_plus", path)
    assert [e.id for e in base] == [e.id for e in plus] == [r["task_id"] for r in rows]
    for example, row in zip(plus, rows, strict=True):
        assert example.kind == "code" and example.question == row["prompt"] and example.choices is None
        # HumanEval's canonical solution is the body under its prompt; MBPP+'s a whole program
        assert example.gold == (
            row["prompt"] + row["canonical_solution"] if name == "humaneval" else row["canonical_solution"]
        )
        tests = CodeTests.from_json(example.tests or "")
        assert tests.entry_point == row["entry_point"] and tests.atol == row["atol"]
        assert tests.inputs == row["base_input"] + row["plus_input"] and tests.task_id == row["task_id"]
    assert [CodeTests.from_json(e.tests or "").inputs for e in base] == [r["base_input"] for r in rows]


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("humaneval", {"entry_point": None}, "field 'entry_point' has type NoneType"),
        ("humaneval", {"prompt": "  "}, "field 'prompt' is empty"),
        ("humaneval_plus", {"base_input": [1, 2]}, "field 'base_input' must be a list of argument lists"),
        ("mbpp_plus", {"plus_input": "[[1]]"}, "field 'plus_input' has type str"),
        ("mbpp", {"atol": -1}, "field 'atol' must be a non-negative number"),
        ("humaneval_plus", {"base_input": "drop"}, "missing field 'base_input'"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, name: str, change: dict, message: str) -> None:
    good = _rows(MBPP if name.startswith("mbpp") else HUMANEVAL)[0]
    bad = {**good, "task_id": "other", **change}
    if change.get("base_input") == "drop":
        del bad["base_input"]
    path = _write(tmp_path / "bad.jsonl", good, "", bad)  # the bad record is on line 3
    with pytest.raises(BenchmarkFormatError, match=f"bad.jsonl:3: {message}"):
        load_benchmark(name, path)


def test_gzipped_input_reads_like_the_plain_file(tmp_path: Path) -> None:
    packed = tmp_path / "HumanEvalPlus.jsonl.gz"
    packed.write_bytes(gzip.compress(HUMANEVAL.read_bytes()))
    assert load_benchmark("humaneval_plus", packed) == load_benchmark("humaneval_plus", HUMANEVAL)
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(HUMANEVAL.read_bytes().splitlines(keepends=True)[0] + b"{not json\n"))
    with pytest.raises(BenchmarkFormatError, match=r"broken\.jsonl\.gz:2: not valid JSON"):
        load_benchmark("humaneval_plus", broken)
    not_gzip = tmp_path / "plain.jsonl.gz"
    shutil.copy(HUMANEVAL, not_gzip)
    with pytest.raises(BenchmarkFormatError, match="not a readable gzip file"):
        load_benchmark("humaneval_plus", not_gzip)


@pytest.mark.parametrize("name", ["humaneval_plus", "mbpp"])
def test_normalize_round_trips_with_tests(tmp_path: Path, name: str) -> None:
    src = HUMANEVAL if name.startswith("humaneval") else MBPP
    dst = tmp_path / "norm.jsonl"
    assert normalize_benchmark(name, src, dst) == 3
    assert load_normalized(dst) == load_benchmark(name, src)
    first = json.loads(dst.read_text().splitlines()[0])
    assert set(first) == {"id", "question", "gold", "choices", "kind", "tests"} and first["kind"] == "code"


def test_normalized_code_lines_are_checked(tmp_path: Path) -> None:
    good = {"id": "a", "question": "q", "gold": "def f(): pass", "choices": None, "kind": "code"}
    for record, message in [
        (good, "missing field 'tests'"),
        ({**good, "tests": "{"}, "field 'tests': "),
        (
            {**good, "tests": json.dumps({"entry_point": "f"})},
            "field 'tests': code tests need either 'inputs' or 'check'",
        ),
        ({**good, "kind": "math", "tests": "{}"}, "field 'tests' is only for code problems"),
        (
            {**good, "tests": json.dumps({"entry_point": "f", "inputs": [[1]], "dataset": "mbpp"})},
            "field 'tests': MBPP tests need the evalplus 'task_id'",
        ),
    ]:
        with pytest.raises(BenchmarkFormatError, match=f"norm.jsonl:1: {message}"):
            load_normalized(_write(tmp_path / "norm.jsonl", record))


def test_canonical_solutions_pass_and_wrong_ones_fail() -> None:
    examples = load_benchmark("humaneval_plus", HUMANEVAL) + load_benchmark("mbpp_plus", MBPP)
    rows = {r["task_id"]: r for r in _rows(HUMANEVAL) + _rows(MBPP)}
    items = []
    for example in examples:
        tests = CodeTests.from_json(example.tests or "")
        items.append((rows[example.id]["canonical_solution"], example.question, tests, example.gold))
        items.append(("    return None\n", example.question, tests, example.gold))  # a continuation, wrong
    grades = grade_code(items, LIMITS, workers=2)
    assert [g.correct for g in grades] == [True, False] * len(examples), [g.result.detail for g in grades]
    assert "returned None, expected" in grades[1].result.detail


def test_plus_inputs_catch_a_solution_that_passes_only_the_base_tests() -> None:
    lower_only = '    return sum(1 for c in s if c in "aeiou")\n'  # misses "HELLO World"
    base = {e.id: e for e in load_benchmark("humaneval", HUMANEVAL)}["HumanEval/1"]
    plus = {e.id: e for e in load_benchmark("humaneval_plus", HUMANEVAL)}["HumanEval/1"]
    assert _grade(base, lower_only) == (True, "")
    correct, detail = _grade(plus, lower_only)
    assert not correct and "count_vowels(*['HELLO World']) returned 1, expected 3" in detail


def test_floats_compare_within_atol_and_find_zero_by_its_root() -> None:
    mean = {e.id: e for e in load_benchmark("humaneval_plus", HUMANEVAL)}["HumanEval/2"]
    assert _grade(mean, "    import math\n    return math.fsum(numbers) / len(numbers) + 1e-9\n")[0]
    assert not _grade(mean, "    return sum(numbers) / len(numbers) + 1e-3\n")[0]
    assert not _grade(mean, "    return str(sum(numbers) / len(numbers))\n")[0]
    roots = CodeTests("find_zero", [[[-6.0, 11.0, -6.0, 1.0]]], 1e-4, dataset="humaneval")  # roots 1, 2, 3
    assert _passes("def find_zero(xs):\n    return 3.00000001\n", roots, "def find_zero(xs):\n    return 1.0\n")
    assert not _passes("def find_zero(xs):\n    return 2.5\n", roots, "def find_zero(xs):\n    return 1.0\n")


def _passes(code: str, tests: CodeTests, reference: str) -> bool:
    (grade,) = grade_code([(code, "", tests, reference)], LIMITS)
    return grade.correct


def test_mbpp_special_oracles() -> None:
    """evalplus compares some MBPP+ outputs as sets; only for MBPP tasks, and only for those named."""
    reference = "def similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b)))\n"
    reordered = "def similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b), reverse=True))\n"
    inputs = [[[3, 4, 5, 6], [5, 7, 4, 10]]]
    assert _passes(reordered, CodeTests("similar_elements", inputs, dataset="mbpp"), reference)
    assert not _passes(reordered, CodeTests("similar_elements", inputs, dataset="humaneval"), reference)
    missing = "def similar_elements(a, b):\n    return (4,)\n"
    assert not _passes(missing, CodeTests("similar_elements", inputs, dataset="mbpp"), reference)


# MBPP+ records in evalplus's layout (MbppPlus.jsonl v0.2.0): tuples, sets and complex numbers stored as JSON.
SIMILAR = {
    "task_id": "Mbpp/2",
    "prompt": '"""\nWrite a function to find the shared elements from the given two lists.\n'
    'assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n"""\n',
    "entry_point": "similar_elements",
    # hashable arguments only: a list raises TypeError here, so the reference itself fails on unconverted inputs
    "canonical_solution": "from functools import lru_cache\n\n@lru_cache(maxsize=None)\n"
    "def similar_elements(test_tup1, test_tup2):\n    return tuple(set(test_tup1) & set(test_tup2))\n",
    "test": "",
    "contract": "",
    "base_input": [[[3, 4, 5, 6], [5, 7, 4, 10]], [[1, 2, 3, 4], [5, 4, 3, 7]]],
    "plus_input": [[[11, 12, 14, 13], [17, 15, 14, 13]], [[], [1, 2]]],
    "atol": 0,
}
EMPTY_DICTS = {  # Mbpp/115: sets (an empty one read back as {}, a dict, as evalplus does)
    "task_id": "Mbpp/115",
    "prompt": '"""\nWrite a function to check whether all dictionaries in a list are empty or not.\n'
    'assert empty_dit([{},{},{}])==True\n"""\n',
    "entry_point": "empty_dit",
    "canonical_solution": "def empty_dit(list1):\n  empty_dit=all(not d for d in list1)\n  return empty_dit\n",
    "test": "",
    "contract": "",
    "base_input": [[[[], [], []]], [[[1, 2], []]]],
    "plus_input": [[[[], [3]]]],
    "atol": 0,
}
ANGLE = {  # Mbpp/124: a float and a complex number, stored as their str()
    "task_id": "Mbpp/124",
    "prompt": '"""\nWrite a function to get the angle of a complex number.\n'
    'assert math.isclose(angle_complex(0,1j), 1.5707963267948966, rel_tol=0.001)\n"""\n',
    "entry_point": "angle_complex",
    "canonical_solution": "import cmath\ndef angle_complex(a,b):\n  angle=cmath.phase(a+b)\n  return angle\n",
    "test": "",
    "contract": "",
    "base_input": [["0.0", "1j"], ["2.0", "(1+2j)"]],
    "plus_input": [["-1.5", "(-0-3j)"]],
    "atol": 0,
}


@pytest.mark.parametrize("name", ["mbpp", "mbpp_plus"])
def test_mbpp_plus_inputs_reach_the_programs_as_evalplus_restores_them(tmp_path: Path, name: str) -> None:
    """The tests JSON keeps MBPP+'s lists; the harness calls reference and candidate with tuples, sets, complex."""
    src = _write(tmp_path / "MbppPlus.jsonl", SIMILAR, EMPTY_DICTS, ANGLE)
    dst = tmp_path / "norm.jsonl"
    normalize_benchmark(name, src, dst)
    examples = {e.id: e for e in load_normalized(dst)}
    similar = examples["Mbpp/2"]
    assert CodeTests.from_json(similar.tests or "").inputs[0] == [[3, 4, 5, 6], [5, 7, 4, 10]]  # JSON, as stored
    for record in (SIMILAR, EMPTY_DICTS, ANGLE):  # each canonical solution fails on the stored lists and strings
        assert _grade(examples[record["task_id"]], record["canonical_solution"]) == (True, "")
    tuples_only = (
        "def similar_elements(a, b):\n    assert type(a) is type(b) is tuple\n    return tuple(set(a) & set(b))\n"
    )
    assert _grade(similar, tuples_only) == (True, "")
    correct, detail = _grade(similar, "def similar_elements(a, b):\n    return None\n")
    assert not correct and "similar_elements(*[(3, 4, 5, 6), (5, 7, 4, 10)]) returned None, expected (4, 5)" in detail
    sets_only = "def empty_dit(items):\n    return all(isinstance(d, (set, dict)) and not d for d in items)\n"
    assert _grade(examples["Mbpp/115"], sets_only) == (True, "")
    complex_only = (
        "def angle_complex(a, b):\n    import cmath\n    return cmath.phase(complex(a) + b.conjugate().conjugate())\n"
    )
    assert _grade(examples["Mbpp/124"], complex_only) == (True, "")


def _convert(task_id: str, inputs: list) -> list:
    namespace: dict = {}
    exec(code_grading._HARNESS, namespace)
    return namespace["_mbpp_inputs"](task_id, inputs)


@pytest.mark.parametrize(
    ("task_id", "stored", "restored"),
    [
        ("Mbpp/2", [[1, 2], [3]], [(1, 2), (3,)]),
        ("Mbpp/2", [1, 5, 3], [1, 5, 3]),  # not lists (the stand-in's Mbpp/2): left as they are
        ("Mbpp/63", [[[1, 2], [3, 4]]], [[(1, 2), (3, 4)]]),
        ("Mbpp/75", [[[1, 2], [3]], 2], [[(1, 2), (3,)], 2]),
        ("Mbpp/106", [[1], [2, 3]], [[1], (2, 3)]),
        ("Mbpp/115", [[[1, 2], [], 3]], [[{1, 2}, {}, {}]]),
        ("Mbpp/124", ["1.5", "(1+2j)"], [1.5, 1 + 2j]),
        ("Mbpp/250", [[1, 2], 4], [(1, 2), 4]),
        ("Mbpp/252", ["(3-4j)"], [3 - 4j]),
        ("Mbpp/259", [[[1, 2], [3]], [[4]]], [((1, 2), (3,)), ((4,),)]),
        ("Mbpp/278", [[1, [2, 3], 4]], [(1, (2, 3), 4)]),
        ("Mbpp/307", [["a", 1], 0, 5], [("a", 1), 0, 5]),
        ("Mbpp/722", [{"x": [1, 2]}, 6, 70], [{"x": (1, 2)}, 6, 70]),
        ("Mbpp/580", [[1, [2, [3]]]], [(1, (2, (3,)))]),
        ("Mbpp/3", [[1, 2]], [[1, 2]]),  # no conversion for other tasks
    ],
)
def test_mbpp_input_conversions_follow_evalplus(task_id: str, stored: list, restored: list) -> None:
    (converted,) = _convert(task_id, [stored])
    assert converted == restored
    assert [type(a) for a in converted] == [type(a) for a in restored]
    if task_id == "Mbpp/115":
        assert [type(item) for item in converted[0]] == [set, dict, dict]


@pytest.mark.parametrize(
    "stop",
    [
        "import sys\n    sys.exit(0)",
        "exit()",
        "quit()",
        "import os\n    os._exit(0)",
        "import posix\n    posix._exit(0)",  # past the sandbox's guard on os._exit
        "import os, posix, sys\n    os.write(int(sys.argv[1]), b'done\\n')\n    posix._exit(0)",  # a forged end
        "raise KeyboardInterrupt",
        "raise GeneratorExit",
    ],
)
def test_a_candidate_that_ends_the_program_during_a_test_fails(stop: str) -> None:
    """Every exit the candidate attempts while called is a failure, and "passed" needs the harness's own token."""
    reference = "def add(x, y):\n    return x + y\n"
    tests = CodeTests("add", [[1, 2], [3, 4]], dataset="humaneval")
    assert _passes(reference, tests, reference)
    assert not _passes(f"def add(x, y):\n    {stop}\n", tests, reference)
    later = f"def add(x, y):\n    if x == 3:\n        {stop.replace(chr(10), chr(10) + '    ')}\n    return x + y\n"
    assert not _passes(later, tests, reference)  # after a first test passed
    check = "def check(candidate):\n    try:\n        candidate(1, 2)\n    except BaseException:\n        pass\n"
    if "os._exit" not in stop:  # the sandbox's os._exit raises PermissionError, an ordinary exception, there
        assert not _passes(f"def add(x, y):\n    {stop}\n", CodeTests("add", check=check), "")  # caught by the tests


def test_the_token_decides_a_pass() -> None:
    reference = "def add(x, y):\n    return x + y\n"
    tests = CodeTests("add", [[1, 2]], dataset="humaneval")
    result = run_program(build_program(reference, tests, reference, "t0ken"), LIMITS)
    assert result.status == "passed" and finished(result, "t0ken") == result
    other = finished(result, "another")
    assert other.status == "failed" and other.detail == "the program ended before its checks did"
    exits = run_program(build_program("def add(x, y):\n    exit(0)\n", tests, reference, "t0ken"), LIMITS)
    assert exits.status == "failed" and "add() called exit(0)" in exits.detail and "t0ken" not in exits.stdout


def test_a_candidate_printing_much_still_passes() -> None:
    """Its output is swallowed (evalplus's swallow_io), so it cannot push the token out of the captured head."""
    reference = "def add(x, y):\n    return x + y\n"
    chatty = "def add(x, y):\n    print('x' * 100000)\n    import sys\n    sys.stderr.write('y' * 100000)\n"
    chatty += "    return x + y\n"
    assert _passes(chatty, CodeTests("add", [[1, 2], [3, 4]], dataset="humaneval"), reference)


def test_original_humaneval_records_run_their_check(tmp_path: Path) -> None:
    """OpenAI's HumanEval.jsonl has no inputs: its `test` code's check(candidate) grades the base score."""
    row = {k: v for k, v in _rows(HUMANEVAL)[0].items() if k not in ("base_input", "plus_input", "atol")}
    path = _write(tmp_path / "HumanEval.jsonl", row)
    (example,) = load_benchmark("humaneval", path)
    assert CodeTests.from_json(example.tests or "").check == row["test"]
    assert _grade(example, "    return x + y\n") == (True, "")
    assert not _grade(example, "    return x * y\n")[0]
    with pytest.raises(BenchmarkFormatError, match="needs evalplus's inputs"):
        load_benchmark("humaneval_plus", path)


def test_a_candidate_cannot_change_the_reference_outputs() -> None:
    """Expected outputs are computed before the candidate's code loads: patching builtins at import is too late."""
    add = load_benchmark("humaneval_plus", HUMANEVAL)[0]
    sneaky = "    return 0\nimport builtins\nbuiltins.print = None\n"
    assert not _grade(add, sneaky)[0]
    exits = "    return x + y\nimport sys\nsys.exit(0)\n"
    correct, detail = _grade(add, exits)
    assert not correct and "called exit" in detail


def test_extract_code() -> None:
    prompt = 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum."""\n'
    assert extract_code("    return sum(xs)", prompt, "total") == prompt + "    return sum(xs)"
    fenced = "Here it is:\n```python\ndef helper():\n    pass\n```\n```python\ndef total(xs):\n    return sum(xs)\n```"
    assert extract_code(fenced, prompt, "total") == "from typing import List\ndef total(xs):\n    return sum(xs)\n"
    unclosed = "```py\ndef total(xs):\n    return sum(xs)\n"  # cut by a stop word before its closing fence
    assert extract_code(unclosed, prompt, "total").endswith("def total(xs):\n    return sum(xs)\n")
    body_only = "```python\n    return sum(xs)\n```"
    assert extract_code(body_only, prompt, "total") == prompt + "    return sum(xs)\n"


class _FakeBackend:
    """Fixed completions, keyed by the text that ends each prompt; counts the prompts it was asked for."""

    name = "fake"

    def __init__(self, answers: dict[str, str], die_after: int | None = None) -> None:
        self.tokenizer = object()  # no context limit to check
        self.answers, self.die_after, self.asked = answers, die_after, []

    def generate(self, prompts, params, add_special_tokens=False):
        if self.die_after is not None and len(self.asked) >= self.die_after:
            raise KeyboardInterrupt  # the job is killed
        self.asked.extend(prompts)
        assert params.stop[-3:] == ("\nif __name__", "\nprint(", "\nassert ") and params.greedy
        return [[next(a for key, a in self.answers.items() if key in p)] * params.n for p in prompts]


def _spec(**overrides: object) -> dict:
    spec = {
        "benchmark": "humaneval_plus",
        "format": "humaneval_plus",
        "backend": "fake",
        "template": "plain",
        "sampling": {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 64, "seed": 0, "preset": "greedy"},
        "batch_size": 2,
        "max_problems": None,
        "grading_workers": 2,
        "grading_timeout_s": 5.0,
        "sandbox_timeout_s": 2.0,
        "bootstrap_samples": 50,
        "dtype": "auto",
        "trust_remote_code": False,
    }
    spec.update(overrides)
    return spec


def test_runner_end_to_end_with_a_fake_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = tmp_path / "he.norm.jsonl"
    normalize_benchmark("humaneval_plus", HUMANEVAL, bench)
    answers = {
        "add(2, 3)": "    return x + y\n",  # correct
        "count_vowels": '    return sum(1 for c in s if c in "aeiou")\n',  # base tests only
        "mean(": "    while True:\n        pass\n",  # never returns
    }
    dying = _FakeBackend(answers, die_after=2)  # killed after its first batch of two
    monkeypatch.setattr(runner, "make_backend", lambda *args, **kwargs: dying)
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate(tmp_path / "model", bench, _spec(), tmp_path / "out")
    assert len((tmp_path / "out" / runner.PARTIAL).read_text().splitlines()) == 2
    fresh = _FakeBackend(answers)
    monkeypatch.setattr(runner, "make_backend", lambda *args, **kwargs: fresh)
    metrics = runner.evaluate(tmp_path / "model", bench, _spec(), tmp_path / "out")
    assert len(fresh.asked) == 1 and "def mean(" in fresh.asked[0]  # only the problem not yet done
    samples = {s["id"]: s for s in map(json.loads, (tmp_path / "out" / runner.SAMPLES).read_text().splitlines())}
    assert [samples[k]["correct"] for k in ("HumanEval/0", "HumanEval/1", "HumanEval/2")] == [True, False, False]
    assert samples["HumanEval/2"]["status"] == "timeout" and samples["HumanEval/1"]["outcome"] == "failed"
    assert samples["HumanEval/0"]["extracted"].startswith("def add(x: int, y: int) -> int:")
    assert metrics["kind"] == "code" and metrics["avg_at_n"] == pytest.approx(1 / 3)
    assert metrics["pass_at_k"]["1"] == pytest.approx(1 / 3) and metrics["timeouts"] == 1
    assert metrics["stop"][-1] == "\nassert " and "rlimits" in metrics["sandbox_layers"]
    assert not (tmp_path / "out" / runner.PARTIAL).exists()


def test_instruct_prompt_and_fenced_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a text template the problem is wrapped in evalplus's instruction and the code block is graded."""
    bench = tmp_path / "mbpp.norm.jsonl"
    normalize_benchmark("mbpp_plus", MBPP, bench)
    answers = {
        "reverse": "Sure.\n```python\ndef reverse_string(s):\n    return s[::-1]\n```",
        "largest": "```python\ndef max_of_three(a, b, c):\n    return a\n```",
        "squares": "```python\ndef square_nums(nums):\n    return [n ** 2 for n in nums]\n```",
    }
    backend = _FakeBackend(answers)
    monkeypatch.setattr(runner, "make_backend", lambda *args, **kwargs: backend)
    metrics = runner.evaluate(tmp_path / "model", bench, _spec(template="alpaca", format="mbpp_plus"), tmp_path / "o")
    assert all("Please provide a self-contained Python script" in p for p in backend.asked)
    assert all(p.startswith("Below is an instruction") for p in backend.asked)
    assert metrics["per_problem"] == {"Mbpp/1": 1.0, "Mbpp/2": 0.0, "Mbpp/3": 1.0}


def test_fetch_reads_a_gzipped_release_by_url(tmp_path: Path) -> None:
    """evalplus publishes HumanEval+ and MBPP+ as .jsonl.gz at a URL: fetched, checksummed and normalised, with
    the same problems as the plain file."""
    from asft.fetch import fetch_benchmark, sha256_of

    packed = tmp_path / "HumanEvalPlus.jsonl.gz"
    packed.write_bytes(gzip.compress((STAND_INS / "humaneval_plus.jsonl").read_bytes()))
    source = {"url": packed.as_uri(), "sha256": sha256_of(packed)}
    out = tmp_path / "out" / "humaneval_plus.jsonl"
    assert fetch_benchmark({"format": "humaneval_plus", "source": source}, out) == 3
    plain = tmp_path / "plain.jsonl"
    normalize_benchmark("humaneval_plus", STAND_INS / "humaneval_plus.jsonl", plain)
    assert load_normalized(out) == load_normalized(plain)
