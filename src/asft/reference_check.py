"""Cached vs live reference, side by side: does reading the reference from a cache change what training finds?

For a config whose runs differ only in `training.reference` (live, or cached with K samples per token; e.g.
config/reference_cache.yaml), per (mode, variant) over seeds: accuracy (mean, seed-to-seed SD, bootstrap CI over
problems of the seed-averaged scores), the KL to the reference late in training (the logged `kl`: exact for live,
the sampled estimate's batch mean for cached, unbiased), and each cached variant's difference from live with a
paired bootstrap CI over problems. "within seed spread" is |Δ accuracy| <= the live runs' seed-to-seed SD.
Writes reference_check.csv, reference_check.md and reference_check.png (KL curves and accuracy).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from asft.evaluation.metrics import bootstrap_ci, paired_difference
from asft.layout import TRAIN_LOG
from asft.matrix import Run, iter_runs, run_training
from asft.records import metrics_path
from asft.sharing import SharedWork

LIVE = "live"
LATE_FRACTION = 0.25  # "late in training": the last quarter of the logged steps


def variant(config: Mapping[str, Any], run: Run) -> str:
    """live, or cached K=<reference_samples>."""
    training = run_training(config, run)
    if training.get("reference", LIVE) == LIVE:
        return LIVE
    return f"cached K={training['reference_samples']}"


def variant_order(name: str) -> tuple[int, int]:
    """live first, then the cached variants by K."""
    return (0, 0) if name == LIVE else (1, int(name.rsplit("=", 1)[1]))


def kl_curve(train_dir: Path) -> list[tuple[int, float]]:
    """(step, kl) from a run's training log, for the steps that logged a KL."""
    rows = [json.loads(line) for line in (train_dir / TRAIN_LOG).read_text().splitlines() if line.strip()]
    return [(int(r["step"]), float(r["kl"])) for r in rows if "kl" in r and "loss" in r]


def late_kl(curve: list[tuple[int, float]]) -> float:
    """The mean logged KL over the last LATE_FRACTION of the logged steps."""
    if not curve:
        raise ValueError("no KL was logged")
    tail = curve[-max(1, round(len(curve) * LATE_FRACTION)) :]
    return statistics.fmean(kl for _, kl in tail)


def collect(config: Mapping[str, Any], workdir: Path, benchmark: str) -> list[dict[str, Any]]:
    """One record per trained run: mode, variant, seed, accuracy, per-problem scores, KL curve."""
    shared = SharedWork(config)
    records = []
    for run in iter_runs(config):
        evaluation = next(
            e
            for e in shared.evaluations(run.experiment)
            if e.benchmark == benchmark and e.step is None and e.identity.get("run_id") == run.run_id
        )
        metrics_file = workdir / metrics_path(evaluation.metrics_dir)
        if not metrics_file.is_file():
            raise FileNotFoundError(f"{metrics_file}: run the workflow for this config first")
        metrics = json.loads(metrics_file.read_text())
        records.append(
            {
                "mode": run.mode,
                "variant": variant(config, run),
                "seed": run.seed,
                "accuracy": float(metrics["avg_at_n"]),
                "per_problem": metrics["per_problem"],
                "kl_curve": kl_curve(workdir / shared.train_dir(run)),
            }
        )
    return records


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _seed_mean(per_problem: list[Mapping[str, float]]) -> dict[str, float]:
    return {key: statistics.fmean(p[key] for p in per_problem) for key in per_problem[0]}


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A row per (mode, variant): accuracy and late KL over seeds; cached rows also their difference from live."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        groups[(record["mode"], record["variant"])].append(record)
    rows = []
    for (mode, name), group in sorted(groups.items(), key=lambda item: (item[0][0], variant_order(item[0][1]))):
        accuracy = [r["accuracy"] for r in group]
        kls = [late_kl(r["kl_curve"]) for r in group]
        scores = _seed_mean([r["per_problem"] for r in group])
        low, high = bootstrap_ci(list(scores.values()))
        row = {
            "mode": mode,
            "variant": name,
            "seeds": len(group),
            "accuracy": statistics.fmean(accuracy),
            "accuracy_seed_sd": _sd(accuracy),
            "accuracy_ci_low": low,
            "accuracy_ci_high": high,
            "late_kl": statistics.fmean(kls),
            "late_kl_seed_sd": _sd(kls),
        }
        live = groups.get((mode, LIVE))
        if name != LIVE and live:
            diff = paired_difference(scores, _seed_mean([r["per_problem"] for r in live]))
            live_accuracy = [r["accuracy"] for r in live]
            row.update(
                delta_accuracy=diff["diff"],
                delta_ci_low=diff["ci_low"],
                delta_ci_high=diff["ci_high"],
                delta_late_kl=row["late_kl"] - statistics.fmean(late_kl(r["kl_curve"]) for r in live),
                within_seed_spread=abs(diff["diff"]) <= _sd(live_accuracy),
            )
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table in the README's layout (accuracy in %)."""
    lines = [
        "| mode | reference | seeds | accuracy % (seed SD) [95% CI] | Δ vs live % [95% CI] | within seed spread "
        "| late KL (seed SD) | Δ KL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        accuracy = (
            f"{100 * r['accuracy']:.1f} ({100 * r['accuracy_seed_sd']:.1f}) "
            f"[{100 * r['accuracy_ci_low']:.1f}, {100 * r['accuracy_ci_high']:.1f}]"
        )
        delta = within = delta_kl = "—"
        if "delta_accuracy" in r:
            delta = (
                f"{100 * r['delta_accuracy']:+.1f} [{100 * r['delta_ci_low']:+.1f}, {100 * r['delta_ci_high']:+.1f}]"
            )
            within = "yes" if r["within_seed_spread"] else "no"
            delta_kl = f"{r['delta_late_kl']:+.4f}"
        kl = f"{r['late_kl']:.4f} ({r['late_kl_seed_sd']:.4f})"
        lines.append(
            f"| {r['mode']} | {r['variant']} | {r['seeds']} | {accuracy} | {delta} | {within} | {kl} | {delta_kl} |"
        )
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], rows: list[dict[str, Any]], out: Path) -> None:
    """KL curves (seed mean, min–max band) per mode and variant, and accuracy with its CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in records})
    fig, axes = plt.subplots(1, len(modes) + 1, figsize=(5 * (len(modes) + 1), 4))
    for ax, mode in zip(axes, modes, strict=False):
        by_variant: dict[str, list] = defaultdict(list)
        for r in records:
            if r["mode"] == mode:
                by_variant[r["variant"]].append(dict(r["kl_curve"]))
        for name, curves in sorted(by_variant.items(), key=lambda item: variant_order(item[0])):
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            values = [[c[s] for c in curves] for s in steps]
            ax.plot(steps, [statistics.fmean(v) for v in values], label=name)
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
        ax.set(title=f"{mode}: KL(ref‖θ) during training", xlabel="step", ylabel="logged KL")
        ax.legend()
    ax = axes[-1]
    labels = [f"{r['mode']}\n{r['variant']}" for r in rows]
    means = [100 * r["accuracy"] for r in rows]
    errors = [
        [100 * (r["accuracy"] - r["accuracy_ci_low"]) for r in rows],
        [100 * (r["accuracy_ci_high"] - r["accuracy"]) for r in rows],
    ]
    ax.bar(range(len(rows)), means, yerr=errors, capsize=3)
    ax.set_xticks(range(len(rows)), labels, rotation=60, fontsize=7)
    ax.set(title="accuracy (seed mean, 95% CI over problems)", ylabel="%")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def write_report(config: Mapping[str, Any], workdir: Path, benchmark: str, out_dir: Path) -> list[dict]:
    """Collect, summarise and write the CSV, Markdown table and plot into out_dir; returns the rows."""
    import pandas as pd

    records = collect(config, workdir, benchmark)
    rows = summarise(records)
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out_dir / "reference_check.csv", index=False)
    (out_dir / "reference_check.md").write_text(markdown(rows))
    plot(records, rows, out_dir / "reference_check.png")
    return rows
