"""Score statistics on hand-computed examples."""

from __future__ import annotations

import math

import pytest

from asft.evaluation.metrics import (
    avg_at_n,
    bootstrap_ci,
    paired_difference,
    pass_at_k,
    pass_at_k_mean,
    sample0_accuracy,
    summarize,
)


def test_pass_at_k_matches_the_combinatorial_formula() -> None:
    for n, c, k in [(16, 3, 1), (16, 3, 4), (10, 0, 5), (5, 5, 2), (8, 2, 8)]:
        expected = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_avg_sample0_and_summary() -> None:
    correct = {"a": [True, False, False, False], "b": [False, True, True, True]}
    assert avg_at_n(list(correct.values())) == pytest.approx(0.5)
    assert sample0_accuracy(list(correct.values())) == pytest.approx(0.5)
    assert pass_at_k_mean(list(correct.values()), 4) == pytest.approx(1.0)
    summary = summarize(correct, n_boot=200)
    assert summary["n"] == 4 and summary["n_samples"] == 8 and set(summary["pass_at_k"]) == {"1", "2", "4"}
    assert summary["pass_at_k"]["1"] == pytest.approx(0.5)
    assert summary["per_problem"] == {"a": 0.25, "b": 0.75}


def test_bootstrap_ci_contains_the_mean_and_narrows_with_more_problems() -> None:
    small = [1.0, 0.0] * 10
    large = [1.0, 0.0] * 500
    low_s, high_s = bootstrap_ci(small, n_boot=2000)
    low_l, high_l = bootstrap_ci(large, n_boot=2000)
    assert low_s < 0.5 < high_s and low_l < 0.5 < high_l
    assert (high_l - low_l) < (high_s - low_s) / 3


def test_paired_difference_on_common_problems() -> None:
    a = {"1": 1.0, "2": 1.0, "3": 0.0, "4": 1.0}
    b = {"1": 0.0, "2": 1.0, "3": 0.0, "5": 1.0}
    result = paired_difference(a, b, n_boot=500)
    assert result["n"] == 3 and result["diff"] == pytest.approx(1 / 3)
    assert result["ci_low"] <= result["diff"] <= result["ci_high"]
    with pytest.raises(ValueError, match="no problems in common"):
        paired_difference({"x": 1.0}, {"y": 1.0})
