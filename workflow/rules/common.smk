"""Config validation, matrix expansion and input functions; all logic is in `asft.config`."""

import json
from pathlib import Path

from asft.config import (
    ConfigError,
    canonical_json,
    check_config_files,
    eval_spec,
    find_run,
    iter_runs,
    source_list,
    train_spec,
    validate_config,
)

_config_source = ", ".join(str(f) for f in workflow.configfiles) or "config"
try:
    # Snakemake's YAML loader keeps the last of repeated keys; re-read each file with the strict one.
    check_config_files(workflow.configfiles)
    CONFIG = validate_config(config, source=_config_source)
except ConfigError as err:
    raise WorkflowError(str(err)) from None

DEMO_DIR = "resources/demo"
RUNS = {exp: list(iter_runs(CONFIG, exp)) for exp in CONFIG["experiments"]}


wildcard_constraints:
    experiment=r"[^/]+",
    model=r"[^/]+",
    dataset=r"[^/]+",
    benchmark=r"[^/]+",
    mode=r"[^/]+",
    seed=r"\d+",


def run_of(wildcards):
    run_id = (
        f"{wildcards.model}/{wildcards.dataset}/{wildcards.mode}/seed{wildcards.seed}"
    )
    return find_run(CONFIG, wildcards.experiment, run_id)


def uses_demo(entry):
    return any("demo" in source for source in source_list(entry))


def demo_input(entry):
    """The demo build is an input only for entries that come from it."""
    return [f"{DEMO_DIR}/manifest.json"] if uses_demo(entry) else []


def is_lora(experiment):
    return CONFIG["experiments"][experiment]["training"]["finetune"] == "lora"


def run_dir(w):
    return f"results/{w.experiment}/runs/{w.model}/{w.dataset}/{w.mode}/seed{w.seed}"


def lora_direct(experiment):
    return CONFIG["experiments"][experiment]["evaluation"]["lora_direct"]


def evaluated_model(wildcards):
    """Merged weights for LoRA runs (the base model when the adapter is applied directly); full fine-tunes are
    evaluated straight from the training output."""
    if lora_direct(wildcards.experiment):
        return f"resources/models/{wildcards.model}"
    sub = "merged" if is_lora(wildcards.experiment) else "train"
    return f"{run_dir(wildcards)}/{sub}"


def evaluated_adapter(wildcards):
    """The run's adapter, for experiments that evaluate it without merging."""
    return [f"{run_dir(wildcards)}/train"] if lora_direct(wildcards.experiment) else []


def run_identity(run):
    return {
        "experiment": run.experiment,
        "run_id": run.run_id,
        "model": run.model,
        "dataset": run.dataset,
        "mode": run.mode,
        "mode_label": run.mode_label,
        "kl_weight": run.kl_weight,
        "seed": run.seed,
    }


def experiment_evaluations(experiment):
    """One output directory per (run or base model, benchmark) pair of the experiment."""
    exp = CONFIG["experiments"][experiment]
    dirs = [
        f"results/{experiment}/runs/{run.run_id}/eval/{bench}"
        for run in RUNS[experiment]
        for bench in exp["benchmarks"]
    ]
    if exp["evaluate_base"]:
        dirs += [
            f"results/{experiment}/base/{model}/eval/{bench}"
            for model in exp["models"]
            for bench in exp["benchmarks"]
        ]
    return dirs


def experiment_metrics(experiment):
    return [f"{d}/metrics.json" for d in experiment_evaluations(experiment)]


def experiment_train_dirs(experiment):
    return [f"results/{experiment}/runs/{run.run_id}/train" for run in RUNS[experiment]]


def experiment_merged_dirs(experiment):
    if not is_lora(experiment) or lora_direct(experiment):
        return []
    return [
        f"results/{experiment}/runs/{run.run_id}/merged" for run in RUNS[experiment]
    ]


def experiment_outputs(experiment):
    """Every declared output under results/: training, merge and evaluation outputs, then the tables and plot.

    All of them are requested by `rule all`, not only the tables. Snakemake replans a job whose output is missing
    only when a requested target needs that file or a job consuming it has to run anyway; an up-to-date consumer
    never looks at a missing input (Snakemake treats it like a deleted temp file). A forced evaluation
    (`-R evaluate_run`) or training that was killed has already had its old outputs removed, so without this a
    plain `snakemake` would report nothing to do and keep the old table.
    Fetched resources/ are not requested: they are local copies of pinned external sources, and re-fetching a
    deleted one would make every run built from it look outdated.
    """
    return (
        experiment_train_dirs(experiment)
        + experiment_merged_dirs(experiment)
        + [
            f"{d}/{name}"
            for d in experiment_evaluations(experiment)
            for name in ("metrics.json", "samples.jsonl")
        ]
        + [
            f"results/{experiment}/tables/results.csv",
            f"results/{experiment}/tables/results.md",
            f"results/{experiment}/plots/training_curves.png",
        ]
    )


def all_targets():
    return [
        path
        for experiment in CONFIG["experiments"]
        for path in experiment_outputs(experiment)
    ]
