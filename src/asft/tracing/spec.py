"""Which traces a config asks for, what each one's result depends on, and the config checks (torch-free: the
workflow plans with it)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from asft.matrix import Run, is_rl, iter_runs, run_identity, run_training

BASE = "base"
# The weightings whose per-token weights the analysis correlates with alignment (asft.losses.WEIGHTINGS names).
TRACED_WEIGHTINGS = ("dft", "topk", "antiop", "ref_ratio")
# The training keys that decide how examples become token sequences, and the adapter a base trace attaches.
TOKENISATION_KEYS = ("template", "max_length", "max_samples", "trust_remote_code")


@dataclass(frozen=True)
class TraceTarget:
    """One trace: a trained run, or (run None) the untuned model on a dataset."""

    experiment: str
    model: str
    dataset: str
    run: Run | None = None

    @property
    def label(self) -> str:
        return self.run.mode_label if self.run else BASE


def trace_targets(config: Mapping[str, Any], experiment: str | None = None) -> Iterator[TraceTarget]:
    """Every trace of the config (or of one experiment), in config order."""
    names = [experiment] if experiment else list(config["experiments"])
    for name in names:
        exp = config["experiments"][name]
        labels = exp.get("trace", {}).get("runs", [])
        if BASE in labels:
            for model in exp["models"]:
                for dataset in exp["datasets"]:
                    yield TraceTarget(name, model, dataset)
        for run in iter_runs(config, name):
            if run.mode_label in labels or run.mode in labels:
                yield TraceTarget(name, run.model, run.dataset, run)


def _weighting_rows(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each traced weighting's parameters: from the first SFT mode row using it, else the loss defaults."""
    rows: dict[str, dict[str, Any]] = {}
    for name, row in config["modes"].items():
        if is_rl(config, name):
            continue
        weighting = row["weighting"]
        if weighting in TRACED_WEIGHTINGS and weighting not in rows:
            rows[weighting] = {k: v for k, v in row.items() if k in ("weighting", "keep_ratio", "clip_mult", "alpha")}
    return {name: rows.get(name, {"weighting": name}) for name in TRACED_WEIGHTINGS}


def subject_identity(target: TraceTarget) -> dict[str, Any]:
    """What the trace is of, as the tables label it (`asft.matrix.run_identity`, or `base`)."""
    if target.run is not None:
        return run_identity(target.run)
    return {"experiment": target.experiment, "model": target.model, "dataset": target.dataset, "mode_label": BASE}


def trace_spec(config: Mapping[str, Any], target: TraceTarget) -> dict[str, Any]:
    """Everything a trace's result depends on besides its input files."""
    exp = config["experiments"][target.experiment]
    training = run_training(config, target.run) if target.run else exp["training"]
    trace = dict(exp["trace"])
    trace.pop("runs")
    if trace["batch_size"] is None:
        trace["batch_size"] = training["per_device_train_batch_size"]
    return {
        "subject": subject_identity(target),
        "training": {
            **{key: training[key] for key in TOKENISATION_KEYS},
            "finetune": training["finetune"],
            **({"lora": training["lora"]} if trace["parameters"] == "lora" else {}),
        },
        "trace": trace,
        "weightings": _weighting_rows(config),
    }


def trace_problems(config: Mapping[str, Any], exp_name: str) -> list[str]:
    """Config errors of an experiment's `trace` block, each naming its key."""
    exp = config["experiments"][exp_name]
    if "trace" not in exp:
        return []
    key = f"experiments.{exp_name}.trace"
    problems = []
    labels = {name for run in iter_runs(config, exp_name) for name in (run.mode, run.mode_label)}
    for index, label in enumerate(exp["trace"]["runs"]):
        if label != BASE and label not in labels:
            problems.append(
                f"{key}.runs[{index}]: {label!r} is no run of this experiment; its modes and mode labels: "
                f"{sorted(labels)} (or {BASE!r})"
            )
    selector = exp["trace"]["parameters"]
    if selector != "lora":
        try:
            re.compile(selector)
        except re.error as err:
            problems.append(f"{key}.parameters: {selector!r} is not a regular expression ({err})")
    return problems
