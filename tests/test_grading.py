"""Math grading: equivalent forms accepted, wrong answers rejected, timeouts and crashes contained."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from asft.evaluation import benchmarks, extraction, grading, grading_worker
from asft.evaluation.grading import (
    GradeResult,
    MathGrader,
    extract_answer,
    grade_choice,
    grade_math_batch,
)

ACCEPT = [
    ("The answer is \\boxed{\\dfrac{1}{2}}.", "0.5"),
    ("so \\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{30^\\circ}", "30"),
    ("\\boxed{30}", "30^\\circ"),
    ("\\boxed{30°}", "30"),
    ("\\boxed{5\\text{ cm}}", "5"),
    ("\\boxed{5}", "5 \\text{ cm}"),
    ("\\boxed{5 cm}", "5 cm"),
    ("\\boxed{(1,2)}", "(1,2)"),
    ("\\boxed{[0,1)}", "[0,1)"),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]"),
    ("\\boxed{3, 5}", "5, 3"),  # olympiad multi-answer gold, any order
    ("\\boxed{27}", "27.0"),  # AMC23 stores 27.0
    ("\\boxed{1,000}", "1000"),
    ("We get 3 + 4 = 7. So the result is 7.", "7"),  # no box: math-verify's last-number fallback
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}"),
    ("First \\boxed{12} is the area, so the answer is \\boxed{4}", "4"),  # last box wins
    ("\\boxed{3} and \\boxed{5}", "3, 5"),  # several boxes still grade as a set
    ("\\fbox{8}", "8"),
    ("She pays 3 * 2 = $6.\n#### 6", "6"),  # GSM8K's own answer line
    ("\\boxed{\\text{(C)}}", "\\text{(C)}"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2"),
]
REJECT = [
    ("\\boxed{4}", "5"),
    ("\\boxed{(2,1)}", "(1,2)"),
    ("\\boxed{[0,1]}", "[0,1)"),
    ("\\boxed{3}", "3, 5"),
    ("\\boxed{3, 5, 7}", "3, 5"),
    ("\\boxed{26}", "27.0"),
    ("\\boxed{6}", "5 \\text{ cm}"),
    ("\\boxed{31}", "30^\\circ"),
    ("no answer here", "12"),
    ("\\boxed{0.51}", "\\frac{1}{2}"),
    ("The answer is \\boxed{4}, not 12", "12"),
    ("First \\boxed{4} is the area, so the answer is \\boxed{12}", "4"),
]


def test_accepts_equivalent_forms_and_rejects_wrong_ones() -> None:
    results = grade_math_batch(ACCEPT + REJECT, workers=2, timeout_s=10)
    verdict = {pair: result.correct for pair, result in zip(ACCEPT + REJECT, results, strict=True)}
    assert [pair for pair in ACCEPT if not verdict[pair]] == []
    assert [pair for pair in REJECT if verdict[pair]] == []
    assert all(r.status == "ok" for r in results)
    assert results[0] == GradeResult(True, "\\frac{1}{2}", "ok")


def test_batch_equals_single_grading() -> None:
    pairs = ACCEPT[::3] + REJECT[::3]
    batch = grade_math_batch(pairs, workers=2, chunk=2)
    with MathGrader(workers=1) as grader:
        assert batch == [grader.grade([pair])[0] for pair in pairs]
    # The in-process core, run here on trusted test text, is what every worker runs.
    assert batch == [grading_worker.grade_item(c, g) for c, g in pairs]


def test_an_unparseable_gold_is_an_error_not_a_crash() -> None:
    assert grade_math_batch([("\\boxed{1}", ""), ("\\boxed{1}", "1")], workers=1) == [
        GradeResult(False, "1", "error"),  # what it answered, found without parsing
        GradeResult(True, "1", "ok"),
    ]


HOOKS = """
import os, signal, time

def hook(completion, gold):
    if completion == "<sleep>":  # interruptible: the worker's own per-item timer ends it
        time.sleep(60)
    if completion == "<stuck>":  # deaf to the timer, like a long computation in C: only the parent can end it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)
    if completion == "<crash>":
        os._exit(3)
"""


def test_hung_and_crashed_items_are_contained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "grading_test_hooks.py").write_text(textwrap.dedent(HOOKS))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv(grading.TEST_HOOK_ENV, "grading_test_hooks:hook")
    pairs = [
        ("\\boxed{1}", "1"),
        ("<sleep>", "1"),
        ("\\boxed{2}", "2"),
        ("<stuck>", "1"),
        ("\\boxed{3}", "4"),
        ("<crash>", "1"),
        ("\\boxed{5}", "5"),
    ]
    started = time.monotonic()
    with MathGrader(workers=1, timeout_s=1.0, chunk=len(pairs)) as grader:
        results = grader.grade(pairs)
        assert grader.restarts == 2  # the stuck worker was killed and the crashed one replaced; the sleeper kept
        assert grader.grade([("\\boxed{6}", "6")])[0].correct  # the pool still works afterwards
    assert time.monotonic() - started < 30
    assert [(r.correct, r.status) for r in results] == [
        (True, "ok"),
        (False, "timeout"),
        (True, "ok"),
        (False, "timeout"),
        (False, "ok"),
        (False, "error"),
        (True, "ok"),
    ]


def test_workers_that_cannot_start_raise_instead_of_hanging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(grading.TEST_HOOK_ENV, "no_such_module_for_grading_tests:hook")
    with pytest.raises(RuntimeError, match="fail to start"):
        grade_math_batch([("\\boxed{1}", "1")], workers=1)


def test_parent_never_imports_the_parser_and_callers_are_not_re_executed(tmp_path: Path) -> None:
    """Workers are fresh interpreters: a script that grades at import time runs once, not once per worker,
    and the calling process never loads sympy or math-verify."""
    script = tmp_path / "script.py"
    marker = tmp_path / "runs.txt"
    script.write_text(
        "import sys\n"
        "from asft.evaluation.grading import grade_math_batch\n"
        f"open({str(marker)!r}, 'a').write('run\\n')\n"
        "pairs = [('\\\\boxed{2}', '2'), ('\\\\boxed{3}', '4')]\n"
        "print([r.correct for r in grade_math_batch(pairs, workers=2, chunk=1)],"
        " grade_math_batch(pairs[:1], workers=1)[0].correct)\n"
        "print('sympy' in sys.modules, 'math_verify' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[True, False] True", "False False"]
    assert marker.read_text() == "run\n"


def test_empty_batch_and_bad_timeout() -> None:
    assert grade_math_batch([]) == []
    with pytest.raises(ValueError, match="timeout_s"):
        MathGrader(timeout_s=0)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("so \\boxed{1} then \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\fbox{7}", "7"),
        ("She pays $6.\n#### 1,200", "1200"),
        ("The final answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
        ("Answer: 42", "42"),
        ("We have $x = 3$ and then $y = 5$ here", "y = 5"),
        ("3 + 4 = 7, so 7 apples", "7"),
        ("no answer", None),
    ],
)
def test_extract_answer(completion: str, expected: str | None) -> None:
    assert extract_answer(completion) == expected


def test_grade_choice() -> None:
    assert grade_choice("b", "B") and grade_choice(" C ", "C")
    assert not grade_choice(None, "A") and not grade_choice("C", "A")


# Text that made the old regexes quadratic (minutes for one completion), and other worst cases for a parser.
ADVERSARIAL = {
    "gsm8k-spaces": "#### a" + " " * 100_000 + "b",  # a lazy group followed by [ \t]*: ~50 s in the old regex
    "latex-brackets": "\\[" * 100_000,  # a lazy .+? scanning to the end from every opener: ~180 s in the old one
    "latex-parens": "\\(" * 100_000,
    "dollars": "$ " * 100_000,
    "boxed-opens": "\\boxed{" * 100_000,  # last_boxed: the brace scan starts only at the last one
    "long-answer": "The answer is " + "x" * 1_000_000,
    "expand": "\\boxed{(x+1)^{1000000}}",  # sympy expands this for minutes: the worker's timer ends it
}


def test_adversarial_completions_cost_at_most_the_timeout_each() -> None:
    """Nothing parses model text outside a timed worker, so a batch costs at most ~(timeout + grace) per item;
    the old code re-ran the quadratic regexes in the parent, untimed, after each worker timeout (minutes)."""
    timeout_s = 1.0
    with MathGrader(workers=1, timeout_s=timeout_s) as grader:
        assert grader.grade([("\\boxed{1}", "1")])[0].correct  # the worker has started: only grading is timed
        started = time.monotonic()
        results = grader.grade([(text, "1") for text in ADVERSARIAL.values()])
        elapsed = time.monotonic() - started
    assert elapsed < len(ADVERSARIAL) * (timeout_s + grading.KILL_GRACE_S) + 5
    assert not any(r.correct for r in results)
    assert [r.truncated for r in results] == [len(text) > grading.MAX_COMPLETION_CHARS for text in ADVERSARIAL.values()]


@pytest.mark.parametrize("name", [name for name in ADVERSARIAL if name != "expand"])
def test_extract_answer_is_linear_on_adversarial_text(name: str) -> None:
    text = ADVERSARIAL[name]
    started = time.monotonic()
    extract_answer(text)
    assert time.monotonic() - started < 2.0  # milliseconds now; 50 s and more with the old regexes


def test_the_parent_never_parses_model_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a timeout or an error the answer shown is still found, by the worker, under the item's timer."""
    (tmp_path / "grading_test_hooks.py").write_text(textwrap.dedent(HOOKS))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv(grading.TEST_HOOK_ENV, "grading_test_hooks:hook")

    def forbidden(*args: object) -> None:
        raise AssertionError("model text parsed in the parent process")

    parsers = {
        extraction: ("extract_answer", "last_boxed", "gsm8k_answer", "last_math_span", "completion_candidates"),
        benchmarks: ("last_boxed",),
        grading: ("extract_answer",),
    }
    for module, names in parsers.items():
        for name in names:  # this process only: the workers are fresh interpreters
            monkeypatch.setattr(module, name, forbidden)
    results = grade_math_batch([("<sleep>", "1"), ("\\boxed{2}", ""), ("\\boxed{3}", "3")], workers=1, timeout_s=1)
    assert results == [
        GradeResult(False, None, "timeout"),
        GradeResult(False, "2", "error"),  # an unparseable gold: what it answered, found in the worker
        GradeResult(True, "3", "ok"),
    ]


def test_long_completions_are_graded_on_their_tail() -> None:
    filler = "x" * grading.MAX_COMPLETION_CHARS
    results = grade_math_batch([(filler + " so \\boxed{7}", "7"), ("\\boxed{7} " + filler, "7"), ("\\boxed{7}", "7")])
    assert [(r.correct, r.truncated) for r in results] == [(True, True), (False, True), (True, False)]


OLD_LATEX_MATH = re.compile(r"\$\$(.+?)\$\$|\$([^$]+?)\$|\\\[(.+?)\\\]|\\\((.+?)\\\)", re.S)
OLD_GSM8K_ANSWER = re.compile(r"^[ \t]*####[ \t]*(\S[^\n]*?)[ \t]*$", re.MULTILINE)


def test_linear_parsers_find_what_the_quadratic_regexes_found() -> None:
    """On short random text (where the old regexes are fast) the replacements agree with them exactly."""
    rng = random.Random(0)
    alphabet = ["$", "\\", "[", "]", "(", ")", "a", " ", "\n", "#", "\t", "\r", ",", "1"]
    for _ in range(20_000):
        text = ("####" if rng.random() < 0.3 else "") + "".join(rng.choices(alphabet, k=rng.randint(0, 16)))
        spans = OLD_LATEX_MATH.findall(text)
        assert extraction.last_math_span(text) == (next(p for p in spans[-1] if p) if spans else None), text
        answers = OLD_GSM8K_ANSWER.findall(text)
        assert extraction.gsm8k_answer(text) == (answers[-1].replace(",", "").strip() if answers else None), text


def test_pick_choice_reads_letters_among_the_top_tokens_as_upstream() -> None:
    from asft.evaluation.grading import pick_choice

    letters = ["A", "B", "C", "D"]
    pick = pick_choice([(" B", -0.2), ("\n", -1.0), ("a", -2.0)], " B", letters)
    assert (pick.letter, pick.method, pick.scores) == ("B", "top10", {"B": -0.2, "A": -2.0})
    # "(A" and "A." are not letters once stripped; a later variant of a letter overwrites an earlier one (upstream
    # keeps a dict keyed by letter), so " A" at -0.1 is replaced by "A" at -3.0 and B wins.
    pick = pick_choice([(" A", -0.1), ("(A", -0.5), (" B", -1.0), ("A", -3.0), ("A.", -4.0)], " A", letters)
    assert (pick.letter, pick.scores) == ("B", {"A": -3.0, "B": -1.0})


def test_pick_choice_fallbacks_are_upstreams() -> None:
    from asft.evaluation.grading import pick_choice

    letters = ["A", "B", "C", "D"]
    # No letter among the top tokens: the greedy text is searched for A, B, C, D in that order.
    pick = pick_choice([(" The", -0.1), (" Based", -0.5)], " The", letters)
    assert (pick.letter, pick.method, pick.scores) == ("A", "default", {})
    pick = pick_choice([(" Cd", -0.1), (" x", -0.2)], " Cd", letters)
    assert (pick.letter, pick.method) == ("C", "fallback_text")
    pick = pick_choice([(" bad", -0.1)], " bad", letters)
    assert (pick.letter, pick.method) == ("A", "fallback_text")  # "BAD" holds an A, checked first
    assert pick_choice([(" E", -0.1)], " E", letters).letter == "A"  # only the benchmark's letters count
