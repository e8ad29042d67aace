"""Config validation, the run matrix, and every input and params function the rules use.

The rule files only declare; each function here takes `wildcards` (and, for folders taken from a declared output,
`output` or `input`). The logic lives in `asft.config`, every path in `asft.layout`.
"""

from functools import cache
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
from asft.job_resources import (
    evaluate_request,
    merge_request,
    reference_request,
    train_request,
)
from asft.matrix import (
    reference_jobs,
    reference_key,
    reference_spec,
    without_planning,
)
from asft.job_resources import trace_request
from asft.slurm_limits import JobAsk, check_requests, read_sinfo
from asft.tracing.spec import TraceTarget, trace_spec, trace_targets
from asft.records import metrics_path
from asft.source_lock import lock_for, read_lock
from asft.sharing import SharedWork, table_identity

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

RUNS_BY_ID = runs_by_id(config)
# Threads of the compute jobs: the smoke scale's jobs are mostly interpreter start-up, so two run side by side
# on two cores instead of one after the other.
JOB_THREADS = 1 if config["scale"] == "smoke" else 2
# Runs and evaluations that several experiments define identically are done once (asft.sharing).
SHARED = SharedWork(config)
# Reference caches (training.reference: cached) by (model, dataset, key): one job per distinct reference spec.
REFERENCES = reference_jobs(config)
# The paper's tables and figures (asft.paper), planned only for `catalogue: paper`.
if config["catalogue"] == "paper":
    from asft.paper.targets import (
        experiments_of,
        is_table,
        paper_target_names,
        report_caption,
        target_names,
    )

    PAPER_TABLES = [name for name in target_names() if is_table(name)]
    PAPER_FIGURES = [name for name in target_names() if not is_table(name)]
    PAPER_TARGETS = paper_target_names()  # `snakemake paper`: not our extra tables
else:
    PAPER_TABLES, PAPER_FIGURES, PAPER_TARGETS = [], [], []

# Hub commits and file hashes the fetches must reproduce (`asft lock` writes them); {} without a lock file.
LOCK_ENTRIES = read_lock(config.get("source_lock"))


wildcard_constraints:
    experiment=r"[^/]+",
    model=r"[^/]+",
    dataset=r"[^/]+",
    benchmark=r"[^/]+",
    mode_label=r"[^/]+",
    seed=r"\d+",
    step=r"\d+",
    reference_key=r"[0-9a-f]{12}",
    trace_path=r"[^/]+/traces/.+",


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
    return canonical_json(without_planning(config["datasets"][wildcards.dataset]))


def benchmark_params(wildcards) -> str:
    return canonical_json(without_planning(config["benchmarks"][wildcards.benchmark]))


# The lock entries are params, so changing the lock reruns exactly the fetches it affects.


def model_lock_params(wildcards) -> str:
    return canonical_json(lock_for(LOCK_ENTRIES, "models", wildcards.model))


def dataset_lock_params(wildcards) -> str:
    return canonical_json(lock_for(LOCK_ENTRIES, "datasets", wildcards.dataset))


def benchmark_lock_params(wildcards) -> str:
    sources = len(source_list(config["benchmarks"][wildcards.benchmark]))
    return canonical_json(
        lock_for(LOCK_ENTRIES, "benchmarks", wildcards.benchmark, sources)
    )


# --- train and merge ------------------------------------------------------------------------------------------------


def train_params(wildcards) -> str:
    return canonical_json(train_spec(config, run_of(wildcards)))


def start_weights(wildcards) -> str:
    """The base model, or a continual run's parent's final weights (asft.sharing)."""
    return SHARED.start_weights(run_of(wildcards))


def train_checkpoints(wildcards) -> str:
    return layout.checkpoints_dir(wildcards.experiment, run_id_of(wildcards))


def train_reference(wildcards) -> list[str]:
    """The run's reference cache, for training.reference: cached; nothing for a live reference."""
    spec = reference_spec(config, run_of(wildcards))
    if spec is None:
        return []
    return [layout.reference_dir(spec["model"], spec["dataset"], reference_key(spec))]


def reference_option(wildcards, input) -> str:
    return f"--reference {input.reference}" if input.reference else ""


def reference_entry(wildcards) -> tuple:
    key = (wildcards.model, wildcards.dataset, wildcards.reference_key)
    if key not in REFERENCES:
        raise WorkflowError(
            f"no run of the config reads the reference cache {layout.reference_dir(*key)}"
        )
    return REFERENCES[key]


def reference_params(wildcards) -> str:
    return canonical_json(reference_entry(wildcards)[0])


def merge_dtype(wildcards) -> str:
    return merge_spec(config, wildcards.experiment)["dtype"]


def merge_remote_code_flag(wildcards) -> str:
    trusted = merge_spec(config, wildcards.experiment)["trust_remote_code"]
    return "--trust-remote-code" if trusted else ""


# --- what each job asks a scheduler for (asft.job_resources) ------------------------------------------------------


# Each resource of a job reads the same request: computed once per job, not once per resource.


@cache
def train_resources(experiment: str, run_id: str) -> dict:
    run = run_by_id(RUNS_BY_ID, experiment, run_id)
    return train_request(config, run, JOB_THREADS).resources()


@cache
def reference_resources(model: str, dataset: str, key: str) -> dict:
    _, run = REFERENCES[(model, dataset, key)]
    return reference_request(config, run, JOB_THREADS).resources()


@cache
def merge_resources(experiment: str, model: str) -> dict:
    return merge_request(config, experiment, model, JOB_THREADS).resources()


@cache
def evaluate_resources(experiment: str, model: str, benchmark: str) -> dict:
    return evaluate_request(
        config, experiment, model, benchmark, JOB_THREADS
    ).resources()


def train_resource(name: str):
    """The rule's resource `name` of a train job (GPUs from training.num_processes and num_nodes, ...)."""

    def resource(wildcards):
        return train_resources(wildcards.experiment, run_id_of(wildcards))[name]

    return resource


def reference_resource(name: str):
    def resource(wildcards):
        return reference_resources(
            wildcards.model, wildcards.dataset, wildcards.reference_key
        )[name]

    return resource


def merge_resource(name: str):
    def resource(wildcards):
        return merge_resources(wildcards.experiment, wildcards.model)[name]

    return resource


def evaluate_resource(name: str):
    def resource(wildcards):
        resources = evaluate_resources(
            wildcards.experiment, wildcards.model, wildcards.benchmark
        )
        return resources[name]

    return resource


def check_slurm_requests() -> None:
    """Refuse, before any submission, jobs that no node of their Slurm partition could ever start."""
    plugin = workflow.executor_plugin
    if plugin is None or plugin.name != "slurm":
        return
    asks = {}
    for job in workflow.dag.needrun_jobs():
        res = job.resources
        ask = JobAsk(
            label=f"rule {job.rule.name}",
            partition=res.get("slurm_partition"),
            gpus=int(res.get("gpu") or 0),
            nodes=int(res.get("nodes") or 1),
            cpus_per_task=int(res.get("cpus_per_task") or job.threads),
            mem_mb=int(res.get("mem_mb") or 0),
            runtime=res.get("runtime"),
        )
        asks.setdefault(ask, f"{ask.label} ({job.wildcards_dict})")
    messages = check_requests(
        [JobAsk(**{**vars(a), "label": label}) for a, label in asks.items()],
        read_sinfo(),
    )
    if messages:
        raise WorkflowError(
            "\n".join(messages)
            + "\nChange the experiment's training.num_processes/num_nodes or resources (train/reference/evaluate/merge: "
            "cpus_per_task, mem_mb, runtime), or the profile's default-resources."
        )


# --- evaluate -------------------------------------------------------------------------------------------------------


def evaluated_model(wildcards) -> str:
    """Merged weights for LoRA runs (the base model when the adapter is applied directly); full fine-tunes are
    evaluated straight from the training output. Always the output of the run that trained it (asft.sharing).
    """
    owner = SHARED.owner(run_of(wildcards))
    if lora_direct(owner.experiment):
        return SHARED.start_weights(owner)
    if is_lora(owner.experiment):
        return layout.merged_dir(owner.experiment, owner.run_id)
    return layout.train_dir(owner.experiment, owner.run_id)


def evaluated_adapter(wildcards) -> list[str]:
    """The run's adapter, for experiments that evaluate it without merging."""
    owner = SHARED.owner(run_of(wildcards))
    if lora_direct(owner.experiment):
        return [layout.train_dir(owner.experiment, owner.run_id)]
    return []


def snapshot_train_dir(wildcards) -> str:
    """The training output holding the snapshot (it is kept inside it)."""
    return SHARED.train_dir(run_of(wildcards))


def snapshot_base_model(wildcards) -> list[str]:
    """A LoRA snapshot is an adapter, applied to the base model; a full fine-tune's snapshot is the model."""
    if not is_lora(wildcards.experiment):
        return []
    return [SHARED.start_weights(run_of(wildcards))]


def snapshot_model_option(wildcards, input) -> str:
    if input.base:
        return input.base[0]
    return layout.snapshot_dir(input.trained, wildcards.step)


def snapshot_adapter_option(wildcards, input) -> str:
    if input.base:
        return f"--adapter {layout.snapshot_dir(input.trained, wildcards.step)}"
    return ""


def snapshot_identity_params(wildcards) -> str:
    run = run_of(wildcards)
    return canonical_json({**run_identity(run), "step": int(wildcards.step)})


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


# --- per-token gradient traces (asft.tracing) ----------------------------------------------------------------------

TRACES = list(trace_targets(config))


def trace_target_of(wildcards) -> TraceTarget:
    run = run_of(wildcards)
    return TraceTarget(run.experiment, run.model, run.dataset, run)


def trace_model(wildcards) -> str:
    """A LoRA run's starting weights (its adapter goes on them), or a full fine-tune's own output."""
    run = run_of(wildcards)
    if is_lora(run.experiment):
        return SHARED.start_weights(run)
    return SHARED.train_dir(run)


def trace_trained(wildcards) -> str:
    return SHARED.train_dir(run_of(wildcards))


def trace_adapter_option(wildcards, input) -> str:
    return f"--adapter {input.trained}" if is_lora(wildcards.experiment) else ""


def trace_reference(wildcards) -> list[str]:
    """A full fine-tune's p_ref comes from its starting weights (a LoRA run disables its adapter instead)."""
    run = run_of(wildcards)
    return [] if is_lora(run.experiment) else [SHARED.start_weights(run)]


def trace_reference_option(wildcards, input) -> str:
    return f"--reference {input.reference}" if input.reference else ""


def trace_run_params(wildcards) -> str:
    return canonical_json(trace_spec(config, trace_target_of(wildcards)))


def trace_base_params(wildcards) -> str:
    target = TraceTarget(wildcards.experiment, wildcards.model, wildcards.dataset)
    return canonical_json(trace_spec(config, target))


@cache
def trace_resources(experiment: str, model: str, dataset: str) -> dict:
    return trace_request(config, experiment, model, dataset, JOB_THREADS).resources()


def trace_resource(name: str):
    def resource(wildcards):
        return trace_resources(
            wildcards.experiment, wildcards.model, wildcards.dataset
        )[name]

    return resource


def trace_directory(target: TraceTarget) -> str:
    if target.run is None:
        return layout.trace_dir(target.experiment, target.model, target.dataset)
    run = target.run
    return layout.trace_dir(
        run.experiment, run.model, run.dataset, run.mode_label, run.seed
    )


def trace_analyses() -> list[str]:
    return [f"{trace_directory(t)}/{layout.TRACE_ANALYSIS}" for t in TRACES]


def trace_outputs() -> list[str]:
    """Every trace's analysis files and, if there are traces, their comparison."""
    files = [
        f"{trace_directory(t)}/{name}"
        for t in TRACES
        for name in (
            layout.TRACE_ANALYSIS,
            layout.TRACE_SUMMARY,
            layout.TRACE_PLOT,
            layout.TRACE_VIEWER,
        )
    ]
    return files + ([f"{layout.TRACES_COMPARISON}/comparison.md"] if TRACES else [])


def trace_analysis_dir(wildcards, output) -> str:
    return str(Path(output.analysis).parent)


def trace_compare_dir(wildcards, output) -> str:
    return str(Path(output.md).parent)


# --- aggregate and `rule all` ---------------------------------------------------------------------------------------


def experiment_metrics(wildcards) -> list[str]:
    """Every evaluation of the experiment, wherever its shared output lives (parallel to eval_identities)."""
    return [
        metrics_path(e.metrics_dir) for e in SHARED.evaluations(wildcards.experiment)
    ]


def eval_identities(wildcards) -> str:
    return canonical_json([e.record for e in SHARED.evaluations(wildcards.experiment)])


def experiment_train_dirs(wildcards) -> list[str]:
    return [SHARED.train_dir(run) for run in SHARED.runs(wildcards.experiment)]


def train_identities(wildcards) -> str:
    experiment = wildcards.experiment
    return canonical_json(
        [
            table_identity(config, experiment, run, run.model)
            for run in SHARED.runs(experiment)
        ]
    )


def experiment_benchmarks(wildcards) -> list[str]:
    return config["experiments"][wildcards.experiment]["benchmarks"]


def owned_outputs() -> list[str]:
    """Every declared output under results/ that some job writes: the trained runs, their merges, every
    evaluation once.

    All of them are requested by `rule all`, not only the tables. Snakemake replans a job whose output is missing
    only when a requested target needs that file or a job consuming it has to run anyway; an up-to-date consumer
    never looks at a missing input (Snakemake treats it like a deleted temp file). A forced evaluation
    (`-R evaluate_run`) or training that was killed has already had its old outputs removed, so without this a
    plain `snakemake` would report nothing to do and keep the old table.
    Fetched resources/ are not requested: they are local copies of pinned external sources, and re-fetching a
    deleted one would make every run built from it look outdated.
    """
    runs = SHARED.owned_runs()
    merged = [
        layout.merged_dir(run.experiment, run.run_id)
        for run in runs
        if is_lora(run.experiment) and not lora_direct(run.experiment)
    ]
    return (
        [layout.train_dir(run.experiment, run.run_id) for run in runs]
        + merged
        + [
            f"{d}/{name}"
            for d in SHARED.owned_evaluation_dirs()
            for name in (layout.METRICS, layout.SAMPLES)
        ]
    )


def experiment_outputs(experiment: str) -> list[str]:
    """The experiment's tables and plot (its records included)."""
    tables = layout.tables_dir(experiment)
    return [
        f"{tables}/{layout.RESULTS_CSV}",
        f"{tables}/{layout.RESULTS_MD}",
        f"{layout.plots_dir(experiment)}/{layout.TRAINING_CURVES}",
    ]


# --- the paper's tables and figures -------------------------------------------------------------------------------


def paper_records(wildcards) -> list[str]:
    """The records of every experiment the table or figure reads (written by their aggregations)."""
    return [
        f"{layout.tables_dir(experiment)}/{name}"
        for experiment in experiments_of(wildcards.name)
        for name in (layout.EVAL_RECORDS, layout.TRAIN_RECORDS, layout.CURVE_RECORDS)
    ]


def paper_report_caption(wildcards, output) -> str:
    """The report's caption text (taking `output` makes it a derived param: rewording it reruns nothing)."""
    return report_caption(wildcards.name)


def paper_records_dirs(wildcards) -> list[str]:
    return [
        layout.tables_dir(experiment) for experiment in experiments_of(wildcards.name)
    ]


def paper_out_dir(wildcards, output) -> str:
    return str(Path(output[0]).parent)


def paper_outputs(names: list[str]) -> list[str]:
    """The files of these tables and figures (each target rule requests its own)."""
    files = []
    for name in names:
        found = (
            layout.paper_table_files(name)
            if name in PAPER_TABLES
            else layout.paper_figure_files(name)
        )
        files += list(found.values())
    return files


def all_targets() -> list[str]:
    return (
        owned_outputs()
        + [
            path
            for experiment in config["experiments"]
            for path in experiment_outputs(experiment)
        ]
        + paper_outputs(PAPER_TABLES + PAPER_FIGURES)
        + trace_outputs()
    )
