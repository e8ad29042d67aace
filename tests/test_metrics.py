"""Score statistics on hand-computed examples."""

from __future__ import annotations

import json
import math

import numpy as np
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


def test_pass_at_k_known_values() -> None:
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(16, 0, 8) == 0.0 and pass_at_k(16, 16, 1) == 1.0 and pass_at_k(16, 9, 8) == 1.0
    for n, c, k in [(16, 3, 1), (16, 3, 4), (10, 0, 5), (5, 5, 2), (8, 2, 8), (64, 7, 16)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    # Stable where the binomials overflow a float: 1 - C(1000,500)/C(1001,500) = 500/1001.
    assert pass_at_k(1001, 1, 500) == pytest.approx(500 / 1001)
    for bad in [(2, 1, 3), (2, 3, 1), (4, -1, 1), (4, 1, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_avg_sample0_pass_and_summary() -> None:
    correct = {"a": [True, False, False, False], "b": [False, True, True, True]}
    rows = list(correct.values())
    assert avg_at_n(rows) == pytest.approx(0.5)
    assert sample0_accuracy(rows) == pytest.approx(0.5)
    assert pass_at_k_mean(rows, 1) == pytest.approx(0.5)
    assert pass_at_k_mean(rows, 2) == pytest.approx((0.5 + 1.0) / 2)  # a: 1 - C(3,2)/C(4,2); b: 1 - 0
    assert pass_at_k_mean(rows, 4) == pytest.approx(1.0)
    summary = summarize(correct, n_boot=200)
    assert (summary["n_problems"], summary["n"], summary["n_samples"]) == (2, 4, 8)
    assert summary["pass_at_k"] == pytest.approx({"1": 0.5, "2": 0.75, "4": 1.0})
    assert summary["avg_at_n"] == pytest.approx(0.5) and summary["sample0_accuracy"] == pytest.approx(0.5)
    assert summary["per_problem"] == {"a": 0.25, "b": 0.75}
    low, high = summary["avg_ci"]
    assert 0.0 <= low <= 0.5 <= high <= 1.0
    assert json.loads(json.dumps(summary)) == summary  # metrics.json round trip
    assert set(summarize(correct, ks=(1, 3, 8))["pass_at_k"]) == {"1", "3"}


def test_unequal_sample_counts_and_empty_problems() -> None:
    correct = [[True], [True, False, False, False]]
    assert avg_at_n(correct) == pytest.approx((1.0 + 0.25) / 2)  # problems weigh the same, not samples
    assert set(summarize({"a": [True], "b": [False, True]})["pass_at_k"]) == {"1"}
    assert avg_at_n([]) == 0.0
    with pytest.raises(ValueError, match="problem 1 has no samples"):
        avg_at_n([[True], []])


def test_bootstrap_ci_contains_the_mean_and_narrows_with_more_problems() -> None:
    small = [1.0, 0.0] * 10
    large = [1.0, 0.0] * 500
    low_s, high_s = bootstrap_ci(small, n_boot=2000)
    low_l, high_l = bootstrap_ci(large, n_boot=2000)
    assert 0.0 <= low_s < 0.5 < high_s <= 1.0 and low_l < 0.5 < high_l
    assert (high_l - low_l) < (high_s - low_s) / 3  # ~ 1/sqrt(50) of the width
    # The normal approximation's 95% half-width for p = 0.5, n = 1000 is 1.96 * sqrt(0.25 / 1000) = 0.031.
    assert (high_l - low_l) / 2 == pytest.approx(0.031, abs=0.004)
    assert bootstrap_ci(small, seed=1) == bootstrap_ci(small, seed=1)  # reproducible
    assert bootstrap_ci([0.7] * 5) == pytest.approx((0.7, 0.7)) and bootstrap_ci([]) == (0.0, 0.0)
    wide = bootstrap_ci(small, alpha=0.01, n_boot=2000)
    assert wide[0] <= low_s and wide[1] >= high_s


def test_bootstrap_ci_on_many_problems_in_chunks() -> None:
    scores = np.random.default_rng(0).random(50_000)  # 1000 draws x 50k problems exceeds one chunk
    low, high = bootstrap_ci(scores, n_boot=200)
    assert low < scores.mean() < high and high - low < 0.01


def test_paired_difference_on_common_problems() -> None:
    a = {"1": 1.0, "2": 1.0, "3": 0.0, "4": 1.0}
    b = {"1": 0.0, "2": 1.0, "3": 0.0, "5": 1.0}
    result = paired_difference(a, b, n_boot=500)
    assert result["n"] == 3 and result["diff"] == pytest.approx(1 / 3)
    assert result["ci_low"] <= result["diff"] <= result["ci_high"]
    same = paired_difference(a, a)
    assert (same["diff"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="no problems in common"):
        paired_difference({"x": 1.0}, {"y": 1.0})


def test_pairing_is_tighter_than_independent_intervals() -> None:
    rng = np.random.default_rng(0)
    difficulty = rng.random(400)
    a = {str(i): float(d > 0.4) for i, d in enumerate(difficulty)}
    b = {str(i): float(d > 0.45) for i, d in enumerate(difficulty)}  # b fails a few more of the same problems
    paired = paired_difference(a, b, n_boot=1000)
    assert 0 < paired["ci_low"] <= paired["diff"] <= paired["ci_high"]
    low_a, high_a = bootstrap_ci(list(a.values()))
    assert paired["ci_high"] - paired["ci_low"] < (high_a - low_a) / 2
