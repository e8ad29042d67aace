"""Config validation, the run matrix, and every input and params function the rules use.

The rule files only declare; each function here takes `wildcards` (and, for folders taken from a declared output,
`output` or `input`). The logic lives in `asft.config`, every path in `asft.layout`.
"""

from pathlib import Path

from asft import layout
from asft.config import (
    ConfigError,
    Run,
    base_identity,
    canonical_json,
    check_config_files,
    eval_spec,
    iter_runs,
    merge_spec,
    run_by_id,
    run_identity,
    runs_by_id,
    source_list,
    train_spec,
    validate_config,
)

_config_source = ", ".join(str(f) for f in workflow.configfiles) or "config"
try:
    # Snakemake's YAML loader keeps the last of repeated keys; re-read each file with the strict one.
    check_config_files(workflow.configfiles)
    _validated = validate_config(config, source=_config_source)
except ConfigError as err:
    raise WorkflowError(str(err)) from None
# Replaced in place, defaults filled, so that `config` is the one name for the checked config everywhere.
config.clear()
config.update(_validated)

RUNS = {exp: list(iter_runs(config, exp)) for exp in config["experiments"]}
RUNS_BY_ID = runs_by_id(config)


wildcard_constraints:
    experiment=r"[^/]+",
    model=r"[^/]+",
    dataset=r"[^/]+",
    benchmark=r"[^/]+",
    mode_label=r"[^/]+",
    seed=r"\d+",


# --- the matrix ---------------------------------------------------------------------------------------------------


def run_id_of(wildcards) -> str:
    return layout.run_id(
        wildcards.model, wildcards.dataset, wildcards.mode_label, wildcards.seed
    )


def run_of(wildcards) -> Run:
    return run_by_id(RUNS_BY_ID, wildcards.experiment, run_id_of(wildcards))


def is_lora(experiment: str) -> bool:
    return config["experiments"][experiment]["training"]["finetune"] == "lora"


def lora_direct(experiment: str) -> bool:
    return config["experiments"][experiment]["evaluation"]["lora_direct"]


# --- fetch ----------------------------------------------------------------------------------------------------------


def demo_input(entry: dict) -> list[str]:
    """The demo build is an input only for entries that come from it."""
    uses_demo = any("demo" in source for source in source_list(entry))
    return [layout.DEMO_MANIFEST_PATH] if uses_demo else []


def model_demo_input(wildcards) -> list[str]:
    return demo_input(config["models"][wildcards.model])


def dataset_demo_input(wildcards) -> list[str]:
    return demo_input(config["datasets"][wildcards.dataset])


def benchmark_demo_input(wildcards) -> list[str]:
    return demo_input(config["benchmarks"][wildcards.benchmark])


def demo_params(wildcards) -> str:
    return canonical_json(config["demo"])


def model_source_params(wildcards) -> str:
    return canonical_json(config["models"][wildcards.model]["source"])


def dataset_params(wildcards) -> str:
    return canonical_json(config["datasets"][wildcards.dataset])


def benchmark_params(wildcards) -> str:
    return canonical_json(config["benchmarks"][wildcards.benchmark])


# --- train and merge ------------------------------------------------------------------------------------------------


def train_params(wildcards) -> str:
    return canonical_json(train_spec(config, run_of(wildcards)))


def train_checkpoints(wildcards) -> str:
    return layout.checkpoints_dir(wildcards.experiment, run_id_of(wildcards))


def merge_dtype(wildcards) -> str:
    return merge_spec(config, wildcards.experiment)["dtype"]


def merge_remote_code_flag(wildcards) -> str:
    trusted = merge_spec(config, wildcards.experiment)["trust_remote_code"]
    return "--trust-remote-code" if trusted else ""


# --- evaluate -------------------------------------------------------------------------------------------------------


def evaluated_model(wildcards) -> str:
    """Merged weights for LoRA runs (the base model when the adapter is applied directly); full fine-tunes are
    evaluated straight from the training output."""
    if lora_direct(wildcards.experiment):
        return layout.model_dir(wildcards.model)
    if is_lora(wildcards.experiment):
        return layout.merged_dir(wildcards.experiment, run_id_of(wildcards))
    return layout.train_dir(wildcards.experiment, run_id_of(wildcards))


def evaluated_adapter(wildcards) -> list[str]:
    """The run's adapter, for experiments that evaluate it without merging."""
    if lora_direct(wildcards.experiment):
        return [layout.train_dir(wildcards.experiment, run_id_of(wildcards))]
    return []


def eval_params(wildcards) -> str:
    return canonical_json(eval_spec(config, wildcards.experiment, wildcards.benchmark))


def run_identity_params(wildcards) -> str:
    return canonical_json(run_identity(run_of(wildcards)))


def base_identity_params(wildcards) -> str:
    return canonical_json(base_identity(wildcards.experiment, wildcards.model))


def adapter_option(wildcards, input) -> str:
    return f"--adapter {input.adapter}" if input.adapter else ""


# Folders a command writes into, taken from the rule's declared outputs. Taking `output` makes them derived
# params, which Snakemake leaves out of the params it compares to decide a rerun: a folder is no hyperparameter,
# and the outputs are tracked anyway.


def demo_out_dir(wildcards, output) -> str:
    return str(Path(output.manifest).parent)


def eval_out_dir(wildcards, output) -> str:
    return str(Path(output.metrics).parent)


def table_dir(wildcards, output) -> str:
    return str(Path(output.csv).parent)


def plot_dir(wildcards, output) -> str:
    return str(Path(output.plot).parent)


# --- aggregate and `rule all` ---------------------------------------------------------------------------------------


def evaluation_dirs(experiment: str) -> list[str]:
    """One output directory per (run or base model, benchmark) pair of the experiment."""
    exp = config["experiments"][experiment]
    dirs = [
        layout.eval_dir(experiment, run.run_id, bench)
        for run in RUNS[experiment]
        for bench in exp["benchmarks"]
    ]
    if exp["evaluate_base"]:
        dirs += [
            layout.base_eval_dir(experiment, model, bench)
            for model in exp["models"]
            for bench in exp["benchmarks"]
        ]
    return dirs


def train_dirs(experiment: str) -> list[str]:
    return [layout.train_dir(experiment, run.run_id) for run in RUNS[experiment]]


def merged_dirs(experiment: str) -> list[str]:
    if not is_lora(experiment) or lora_direct(experiment):
        return []
    return [layout.merged_dir(experiment, run.run_id) for run in RUNS[experiment]]


def experiment_metrics(wildcards) -> list[str]:
    return [f"{d}/{layout.METRICS}" for d in evaluation_dirs(wildcards.experiment)]


def experiment_train_dirs(wildcards) -> list[str]:
    return train_dirs(wildcards.experiment)


def experiment_benchmarks(wildcards) -> list[str]:
    return config["experiments"][wildcards.experiment]["benchmarks"]


def experiment_outputs(experiment: str) -> list[str]:
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
        train_dirs(experiment)
        + merged_dirs(experiment)
        + [
            f"{d}/{name}"
            for d in evaluation_dirs(experiment)
            for name in (layout.METRICS, layout.SAMPLES)
        ]
        + [
            f"{layout.tables_dir(experiment)}/{layout.RESULTS_CSV}",
            f"{layout.tables_dir(experiment)}/{layout.RESULTS_MD}",
            f"{layout.plots_dir(experiment)}/{layout.TRAINING_CURVES}",
        ]
    )


def all_targets() -> list[str]:
    return [
        path
        for experiment in config["experiments"]
        for path in experiment_outputs(experiment)
    ]
