"""Tidy records of one experiment's results, for the paper's tables and figures (asft.paper).

An evaluation or a training output may be shared with other experiments (asft.sharing), so what it *is* for
this experiment (its identity: mode, anchor weights, sweep value, snapshot step) comes from the workflow, parallel
to the files, never from the files themselves.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from asft.data import write_jsonl
from asft.layout import CURVE_RECORDS, EVAL_RECORDS, METRICS, TRAIN_LOG, TRAIN_RECORDS, TRAIN_SUMMARY

# identity fields every record carries (None where they do not apply, e.g. a base model's mode settings)
IDENTITY_FIELDS = (
    "experiment",
    "model",
    "dataset",
    "mode",
    "kl_weight",
    "sft_weight",
    "kl_direction",
    "sweep_key",
    "sweep_value",
    "seed",
    "finetune",
    "lora_r",
    "loss_scaling",
    "scale",
    "init_label",  # a continual run's parent's mode label (init_from), e.g. Table 2's SFT + DAPO
)


def _identity(identity: Mapping[str, Any]) -> dict[str, Any]:
    record = {name: identity.get(name) for name in IDENTITY_FIELDS}
    for weight in ("kl_weight", "sft_weight"):
        record[weight] = float(record[weight] or 0.0)
    return record


def _parallel(name: str, identities: Sequence[Any], paths: Sequence[Any]) -> None:
    if len(identities) != len(paths):
        raise ValueError(f"{name}: {len(identities)} identities for {len(paths)} paths; they must be parallel")


def eval_records(identities: Sequence[Mapping[str, Any]], metrics_paths: Sequence[Path]) -> list[dict[str, Any]]:
    """One record per evaluation: accuracy (a fraction), problems, 95% CI, and the benchmark and step it is for."""
    _parallel("evaluations", identities, metrics_paths)
    records = []
    for identity, path in zip(identities, metrics_paths, strict=True):
        metrics = json.loads(Path(path).read_text())
        low, high = metrics.get("avg_ci") or (None, None)
        records.append(
            {
                **_identity(identity),
                "benchmark": identity["benchmark"],
                "step": identity.get("step"),
                "accuracy": metrics["avg_at_n"],
                "n": metrics["n_problems"],
                "ci_low": low,
                "ci_high": high,
                "stack": metrics.get("stack"),  # the software it ran with (asft.stack_versions), None if unrecorded
            }
        )
    return records


def summary_measures(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Table 4's measurements from a train_summary.json: wall time, accelerator, peak memory (max over ranks;
    null where nothing was measured, e.g. GPU memory on a CPU run)."""
    gpu = [m for m in summary.get("gpu_peak_allocated_gb") or [] if m is not None]
    host = [m for m in summary.get("host_peak_rss_gb") or [] if m is not None]
    return {
        "wall_time_s": summary.get("wall_seconds"),
        "accelerator": summary.get("accelerator"),
        "accelerator_count": summary.get("accelerator_count"),
        "peak_gpu_memory_gb": max(gpu) if gpu else None,
        "peak_host_memory_gb": max(host) if host else None,
        "timing_scope": summary.get("timing_scope"),
    }


def train_records(identities: Sequence[Mapping[str, Any]], train_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """One record per training run with its measured cost."""
    _parallel("training runs", identities, train_dirs)
    records = []
    for identity, train_dir in zip(identities, train_dirs, strict=True):
        summary = json.loads((Path(train_dir) / TRAIN_SUMMARY).read_text())
        records.append({**_identity(identity), **summary_measures(summary), "stack": summary.get("stack")})
    return records


def curve_records(identities: Sequence[Mapping[str, Any]], train_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """The training log of each run (step, loss, KL to the reference where it was measured)."""
    _parallel("training runs", identities, train_dirs)
    records = []
    for identity, train_dir in zip(identities, train_dirs, strict=True):
        for line in (Path(train_dir) / TRAIN_LOG).read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                if "step" in entry and "loss" in entry:
                    records.append(
                        {**_identity(identity), "step": entry["step"], "loss": entry["loss"], "kl": entry.get("kl")}
                    )
    return records


def write_records(
    out_dir: Path,
    eval_identities: Sequence[Mapping[str, Any]],
    metrics_paths: Sequence[Path],
    train_identities: Sequence[Mapping[str, Any]],
    train_dirs: Sequence[Path],
) -> None:
    """evals.jsonl, trains.jsonl and curves.jsonl in `out_dir`, each written atomically."""
    write_jsonl(out_dir / EVAL_RECORDS, eval_records(eval_identities, metrics_paths))
    write_jsonl(out_dir / TRAIN_RECORDS, train_records(train_identities, train_dirs))
    write_jsonl(out_dir / CURVE_RECORDS, curve_records(train_identities, train_dirs))


def metrics_path(metrics_dir: str) -> str:
    return f"{metrics_dir}/{METRICS}"
