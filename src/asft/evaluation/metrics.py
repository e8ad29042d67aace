"""Scores with uncertainty: avg@n, unbiased pass@k, sample-0 accuracy, bootstrap CIs and paired differences."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def avg_at_n(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of the fraction of correct samples."""
    return float(np.mean([np.mean(samples) for samples in correct])) if correct else 0.0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k), as a stable product (Chen et al., 2021)."""
    if k > n:
        raise ValueError(f"k={k} > n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_mean(correct: Sequence[Sequence[bool]], k: int) -> float:
    return float(np.mean([pass_at_k(len(s), int(sum(s)), k) for s in correct])) if correct else 0.0


def sample0_accuracy(correct: Sequence[Sequence[bool]]) -> float:
    return float(np.mean([bool(s[0]) for s in correct])) if correct else 0.0


def bootstrap_ci(
    per_problem: Sequence[float], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean, resampling problems."""
    scores = np.asarray(per_problem, dtype=float)
    if scores.size == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    means = scores[rng.integers(0, scores.size, size=(n_boot, scores.size))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(low), float(high))


def paired_difference(
    scores_a: Mapping[str, float], scores_b: Mapping[str, float], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> dict[str, float]:
    """Mean of (a - b) over the problems both were scored on, with a bootstrap CI over those problems."""
    common = sorted(set(scores_a) & set(scores_b))
    if not common:
        raise ValueError("the two runs have no problems in common")
    diffs = [scores_a[i] - scores_b[i] for i in common]
    low, high = bootstrap_ci(diffs, n_boot, alpha, seed)
    return {"diff": float(np.mean(diffs)), "ci_low": low, "ci_high": high, "n": len(common)}


def summarize(correct_by_problem: Mapping[str, Sequence[bool]], n_boot: int = 1000) -> dict:
    """The metrics block of metrics.json (fractions in [0, 1])."""
    correct = list(correct_by_problem.values())
    n = min((len(s) for s in correct), default=0)
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= n]
    per_problem = [float(np.mean(s)) for s in correct]
    return {
        "n_problems": len(correct),
        "n": n,
        "n_samples": int(sum(len(s) for s in correct)),
        "avg_at_n": avg_at_n(correct),
        "avg_ci": list(bootstrap_ci(per_problem, n_boot)),
        "pass_at_k": {str(k): pass_at_k_mean(correct, k) for k in ks},
        "sample0_accuracy": sample0_accuracy(correct),
        "per_problem": dict(zip(correct_by_problem, per_problem, strict=True)),
    }
