"""Aggregation: per-experiment results table (CSV + Markdown) and training-curve plots.

Reads only the evaluation stage's metrics.json files and the training logs, so it can be rerun cheaply
whenever one run or benchmark is added.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from asft.layout import RUN_SPEC, TRAIN_LOG, TRAIN_SUMMARY
from asft.stack_versions import stacks_note

BASE_LABEL = "base"


def load_metrics(paths: Sequence[Path], identities: Sequence[dict] | None = None) -> pd.DataFrame:
    """One row per (run, benchmark) with the run's identity and its scores in percent.

    `identities` (parallel to `paths`) say what each evaluation is for this experiment, when it may be shared
    with another (asft.sharing); without them the identity recorded in the metrics file is used. Evaluations of
    intermediate snapshots (a `step`) are left out: the table is about the trained models.
    """
    if identities is not None and len(identities) != len(paths):
        raise ValueError(f"{len(identities)} run identities for {len(paths)} metrics files")
    rows = []
    for index, path in enumerate(paths):
        metrics = json.loads(Path(path).read_text())
        run = metrics.get("run", {}) if identities is None else identities[index]
        if run.get("step") is not None:
            continue
        low, high = metrics.get("avg_ci", [None, None])
        rows.append(
            {
                "model": run.get("model"),
                "dataset": run.get("dataset", "-"),
                "mode": run.get("mode_label", BASE_LABEL),
                "seed": run.get("seed"),
                "benchmark": run.get("benchmark", metrics["benchmark"]),
                # null where nothing was scored (a judge whose every verdict was unparsable)
                "score": None if metrics["avg_at_n"] is None else 100 * metrics["avg_at_n"],
                "ci_low": None if low is None else 100 * low,
                "ci_high": None if high is None else 100 * high,
                "n_problems": metrics["n_problems"],
                "n_samples": metrics["n_samples"],
                "template": metrics.get("template"),
                "backend": metrics.get("backend"),
                "per_problem": metrics.get("per_problem"),
            }
        )
    if not rows:
        raise ValueError("no metrics files given")
    return pd.DataFrame(rows)


def comparisons_vs_base(long: pd.DataFrame, n_boot: int = 1000) -> pd.DataFrame:
    """Each run minus its base model on the same problems, with a paired bootstrap CI (percentage points)."""
    from asft.evaluation.metrics import paired_difference

    base = {
        (row.model, row.benchmark): row.per_problem
        for row in long.itertuples()
        if row.mode == BASE_LABEL and row.per_problem
    }
    rows = []
    for row in long.itertuples():
        reference = base.get((row.model, row.benchmark))
        if row.mode == BASE_LABEL or not row.per_problem or not reference:
            continue
        diff = paired_difference(row.per_problem, reference, n_boot=n_boot)
        rows.append(
            {
                "model": row.model,
                "dataset": row.dataset,
                "mode": row.mode,
                "seed": row.seed,
                "benchmark": row.benchmark,
                "diff_vs_base": 100 * diff["diff"],
                "ci_low": 100 * diff["ci_low"],
                "ci_high": 100 * diff["ci_high"],
                "n_problems": diff["n"],
            }
        )
    columns = ["model", "dataset", "mode", "seed", "benchmark", "diff_vs_base", "ci_low", "ci_high", "n_problems"]
    return pd.DataFrame(rows, columns=columns).astype({"seed": "Int64"})


def results_table(long: pd.DataFrame, benchmarks: Sequence[str] | None = None) -> pd.DataFrame:
    """A row per (model, dataset, mode[-kl]) averaged over seeds, a column per benchmark, and their average.

    Base models come first in each model's block; the average is over the benchmarks present.
    """
    grouped = (
        long.groupby(["model", "dataset", "mode", "benchmark"], dropna=False)
        .agg(score=("score", "mean"), seeds=("seed", "nunique"))
        .reset_index()
    )
    table = grouped.pivot_table(index=["model", "dataset", "mode"], columns="benchmark", values="score")
    columns = list(benchmarks) if benchmarks else sorted(table.columns)
    table = table.reindex(columns=columns)
    table["average"] = table[columns].mean(axis=1)
    seeds = grouped.groupby(["model", "dataset", "mode"])["seeds"].max()
    table["seeds"] = seeds.reindex(table.index).fillna(1).clip(lower=1).astype(int)  # base: one evaluation
    table = table.reset_index()
    table["_order"] = (table["mode"] != BASE_LABEL).astype(int)
    table = table.sort_values(["model", "_order", "dataset", "mode"]).drop(columns="_order")
    table.columns.name = None
    return table.reset_index(drop=True)


def to_markdown(table: pd.DataFrame, title: str, footer: str = "") -> str:
    """A GitHub-flavoured Markdown table (numbers as percent with one decimal), then `footer` under it."""
    headers = list(table.columns)
    lines = [f"# {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for _, row in table.iterrows():
        cells = []
        for column in headers:
            value = row[column]
            if isinstance(value, float):
                cells.append("—" if pd.isna(value) else f"{value:.1f}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    if footer:
        lines += ["", footer]
    return "\n".join(lines) + "\n"


def software_note(metrics_paths: Sequence[Path], train_dirs: Sequence[Path]) -> str:
    """The software versions the evaluations and training runs behind a table used (asft.stack_versions)."""
    evals = [json.loads(Path(path).read_text()).get("stack") for path in metrics_paths]
    summaries = [Path(d) / TRAIN_SUMMARY for d in train_dirs]
    trains = [json.loads(s.read_text()).get("stack") for s in summaries if s.exists()]
    return "\n".join(note for note in (stacks_note(evals, "evaluations"), stacks_note(trains, "training runs")) if note)


def load_train_logs(train_dirs: Sequence[Path], run_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Training log lines of each training output dir, labelled with its run id (`run_ids`, parallel to the dirs,
    else the one in its run spec)."""
    frames = []
    for index, train_dir in enumerate(train_dirs):
        path = Path(train_dir) / TRAIN_LOG
        spec_path = Path(train_dir) / RUN_SPEC
        if run_ids is not None:
            label = run_ids[index]
        else:
            label = json.loads(spec_path.read_text())["run_id"] if spec_path.exists() else str(train_dir)
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if records:
            frame = pd.DataFrame(records)
            frame["run"] = label
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run", "step"])


# The RL runs' accuracy reward as asft.rl logs it (TRL's per-reward-function mean).
REWARD_COLUMN = "rewards/accuracy/mean"


def plot_training_curves(logs: pd.DataFrame, out_path: Path, title: str) -> Path:
    """Loss and KL to the reference over steps, one line per run (mode); with RL runs (GRPO/DAPO) also their mean
    verifiable reward. Their KL is TRL's k3 estimate of KL(policy ‖ ref) (absent for DAPO, whose β is 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("loss", "training loss"),
        ("ce", "cross-entropy on targets"),
        ("kl", "KL to the reference per token"),
    ]
    if REWARD_COLUMN in logs and logs[REWARD_COLUMN].notna().any():
        panels.append((REWARD_COLUMN, "mean reward (RL runs)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    for axis, (column, label) in zip(axes, panels, strict=True):
        for run, frame in logs.groupby("run", sort=True):
            if column in frame and frame[column].notna().any():
                points = frame[["step", column]].dropna()
                axis.plot(points["step"], points[column], label=run, linewidth=1.4)
        axis.set_xlabel("optimizer step")
        axis.set_title(label)
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.12 + 0.03 * (len(labels) // 4), 1, 1))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def aggregate(
    experiment: str,
    metrics_paths: Sequence[Path],
    train_dirs: Sequence[Path],
    table_dir: Path,
    plot_dir: Path,
    benchmarks: Sequence[str] | None = None,
    eval_identities: Sequence[dict] | None = None,
    train_identities: Sequence[dict] | None = None,
) -> pd.DataFrame:
    """Write results.csv/.md, scores_long.csv, comparisons_vs_base.csv and training_curves.png; returns the table.

    With identities (from the workflow) also the tidy records the paper's tables are built from (asft.records).
    """
    long = load_metrics(metrics_paths, eval_identities)
    table = results_table(long, benchmarks)
    table_dir.mkdir(parents=True, exist_ok=True)
    long.drop(columns="per_problem").to_csv(table_dir / "scores_long.csv", index=False)
    comparisons_vs_base(long).to_csv(table_dir / "comparisons_vs_base.csv", index=False, float_format="%.2f")
    table.to_csv(table_dir / "results.csv", index=False, float_format="%.2f")
    footer = software_note(metrics_paths, train_dirs)
    (table_dir / "results.md").write_text(to_markdown(table, f"{experiment}: accuracy (%)", footer))
    run_ids = None if train_identities is None else [identity["run_id"] for identity in train_identities]
    plot_training_curves(load_train_logs(train_dirs, run_ids), plot_dir / "training_curves.png", experiment)
    if eval_identities is not None and train_identities is not None:
        from asft.records import write_records

        write_records(table_dir, eval_identities, metrics_paths, train_identities, train_dirs)
    return table
