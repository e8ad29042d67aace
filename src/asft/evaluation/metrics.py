"""Scores with uncertainty: avg@n, unbiased pass@k, sample-0 accuracy, bootstrap CIs and paired differences.

Problems, not samples, are the unit of resampling: the n samples of one problem are correlated, so a bootstrap over
samples would understate the uncertainty of a benchmark score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_BOOT_CELLS = 1 << 22  # resampled indices held at once: bounds memory for large benchmarks × many draws


def _per_problem(correct: Sequence[Sequence[bool]]) -> list[float]:
    for index, samples in enumerate(correct):
        if len(samples) == 0:
            raise ValueError(f"problem {index} has no samples")
    return [float(np.mean(np.asarray(samples, dtype=float))) for samples in correct]


def avg_at_n(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of the fraction of correct samples (each problem weighs the same); 0.0 if empty."""
    scores = _per_problem(correct)
    return float(np.mean(scores)) if scores else 0.0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) (Chen et al., 2021), as a product of ratios in (0, 1]:
    the binomials themselves overflow floats for n in the hundreds."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=float)))


def pass_at_k_mean(correct: Sequence[Sequence[bool]], k: int) -> float:
    """Mean over problems of the unbiased pass@k; 0.0 if empty."""
    if not correct:
        return 0.0
    return float(np.mean([pass_at_k(len(s), int(sum(bool(x) for x in s)), k) for s in correct]))


def sample0_accuracy(correct: Sequence[Sequence[bool]]) -> float:
    """Accuracy of each problem's first sample: comparable with a greedy or n=1 run; 0.0 if empty."""
    _per_problem(correct)
    return float(np.mean([bool(s[0]) for s in correct])) if correct else 0.0


def bootstrap_ci(
    per_problem_scores: Sequence[float], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean, resampling problems with replacement; (0.0, 0.0) if empty."""
    if not 0 < alpha < 1 or n_boot < 1:
        raise ValueError(f"need 0 < alpha < 1 and n_boot >= 1, got alpha={alpha}, n_boot={n_boot}")
    scores = np.asarray(per_problem_scores, dtype=float)
    if scores.size == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    rows = max(1, _BOOT_CELLS // scores.size)
    means = np.concatenate(
        [
            scores[rng.integers(0, scores.size, size=(min(rows, n_boot - start), scores.size))].mean(axis=1)
            for start in range(0, n_boot, rows)
        ]
    )
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(low), float(high))


def paired_difference(
    scores_a: Mapping[str, float],
    scores_b: Mapping[str, float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, float]:
    """Mean of (a - b) over the problems both were scored on, with a bootstrap CI over those problems.

    Pairing removes the problem-difficulty variance both runs share, so the CI is much tighter than comparing
    two independent CIs.
    """
    common = sorted(set(scores_a) & set(scores_b))
    if not common:
        raise ValueError("the two runs have no problems in common")
    diffs = [float(scores_a[i]) - float(scores_b[i]) for i in common]
    low, high = bootstrap_ci(diffs, n_boot, alpha, seed)
    return {"diff": float(np.mean(diffs)), "ci_low": low, "ci_high": high, "n": len(common)}


def summarize(
    correct_by_problem: Mapping[str, Sequence[bool]],
    ks: Sequence[int] = DEFAULT_KS,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """The metrics block of metrics.json (fractions in [0, 1]).

    pass@k is reported for the ks that every problem has enough samples for (k <= n, n the smallest sample
    count); keys are strings so the dict round-trips through JSON unchanged.
    """
    correct = [list(samples) for samples in correct_by_problem.values()]
    per_problem = _per_problem(correct)
    n = min((len(s) for s in correct), default=0)
    return {
        "n_problems": len(correct),
        "n": n,
        "n_samples": int(sum(len(s) for s in correct)),
        "avg_at_n": avg_at_n(correct),
        "avg_ci": list(bootstrap_ci(per_problem, n_boot, alpha, seed)),
        "pass_at_k": {str(k): pass_at_k_mean(correct, k) for k in sorted(set(ks)) if 1 <= k <= n},
        "sample0_accuracy": sample0_accuracy(correct),
        "per_problem": dict(zip(correct_by_problem, per_problem, strict=True)),
    }
