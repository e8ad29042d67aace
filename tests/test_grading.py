"""Math grading: equivalent forms accepted, wrong answers rejected, timeouts contained."""

from __future__ import annotations

import time

import pytest

from asft.evaluation.grading import grade_choice, grade_math, grade_math_batch

ACCEPT = [
    ("The answer is \\boxed{\\dfrac{1}{2}}.", "0.5"),
    ("so \\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{30^\\circ}", "30"),
    ("\\boxed{5\\text{ cm}}", "5"),
    ("\\boxed{(1,2)}", "(1,2)"),
    ("\\boxed{[0,1)}", "[0,1)"),
    ("\\boxed{3, 5}", "5, 3"),
    ("\\boxed{27}", "27.0"),
    ("We get 3 + 4 = 7. So the result is 7.", "7"),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}"),
]
REJECT = [
    ("\\boxed{4}", "5"),
    ("\\boxed{(2,1)}", "(1,2)"),
    ("\\boxed{[0,1]}", "[0,1)"),
    ("\\boxed{3}", "3, 5"),
    ("no answer here", "12"),
    ("\\boxed{0.51}", "\\frac{1}{2}"),
]


def test_accepts_equivalent_forms_and_rejects_wrong_ones() -> None:
    results = grade_math_batch(ACCEPT + REJECT, workers=2, timeout_s=10)
    assert [r.correct for r in results] == [True] * len(ACCEPT) + [False] * len(REJECT)
    assert results[0].extracted == "\\frac{1}{2}" and results[0].status == "ok"


def test_batch_equals_single_grading() -> None:
    pairs = ACCEPT[:4] + REJECT[:3]
    batch = grade_math_batch(pairs, workers=2, chunk=2)
    assert batch == [grade_math(c, g) for c, g in pairs]


def test_a_hanging_item_times_out_without_stopping_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASFT_GRADING_TEST_HANG", "<hang>")
    pairs = [("\\boxed{1}", "1"), ("<hang>", "1"), ("\\boxed{2}", "2"), ("\\boxed{3}", "4")]
    started = time.monotonic()
    results = grade_math_batch(pairs, workers=1, timeout_s=1.0, chunk=4)
    assert time.monotonic() - started < 20
    assert [(r.correct, r.status) for r in results] == [(True, "ok"), (False, "timeout"), (True, "ok"), (False, "ok")]


def test_empty_batch_and_choice() -> None:
    assert grade_math_batch([]) == []
    assert grade_choice("b", "B") and not grade_choice(None, "A") and not grade_choice("C", "A")


def test_callers_without_a_main_guard_are_not_re_executed(tmp_path) -> None:
    """Workers are fresh interpreters: a script that grades at import time runs once, not once per worker."""
    import subprocess
    import sys

    script = tmp_path / "script.py"
    marker = tmp_path / "runs.txt"
    script.write_text(
        "from asft.evaluation.grading import grade_math_batch\n"
        f"open({str(marker)!r}, 'a').write('run\\n')\n"
        "pairs = [('\\\\boxed{2}', '2'), ('\\\\boxed{3}', '4')]\n"
        "print([r.correct for r in grade_math_batch(pairs, workers=2, chunk=1)])\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[True, False]"
    assert marker.read_text() == "run\n"
