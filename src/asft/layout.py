"""The results layout: every file and folder name the stages write and the rules declare, defined once.

The rules (workflow/rules/common.smk) and the package build their paths from here, so a path is never spelled
twice. Import-light on purpose: the Snakefile and the aggregation read it without loading torch.

Each folder is a function of its parts. Called with Snakemake wildcard placeholders (`"{experiment}"`) it gives
the rule's pattern, so the `*_WILDCARDS` templates below and the concrete paths of `rule all` cannot drift apart.
Existing results stay valid only while these strings do: a run id is its results path.
"""

from __future__ import annotations

# Files of a training output (`<run>/train/`).
TRAIN_LOG = "train_log.jsonl"
RUN_SPEC = "run_spec.json"
TRAIN_SUMMARY = "train_summary.json"

# Files of one evaluation (`<run>/eval/<benchmark>/`).
METRICS = "metrics.json"
SAMPLES = "samples.jsonl"

# Files of an experiment's aggregation (`tables_dir`, `plots_dir`).
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
# the tidy records asft.paper builds the paper's tables from (asft.records)
EVAL_RECORDS = "evals.jsonl"
TRAIN_RECORDS = "trains.jsonl"
CURVE_RECORDS = "curves.jsonl"
TRAINING_CURVES = "training_curves.png"

# Files of the demo build (`DEMO_DIR`): the manifest is written last, so it marks a finished build.
DEMO_MANIFEST = "manifest.json"

RESOURCES = "resources"
RESULTS = "results"
LOGS = "logs"
DEMO_DIR = f"{RESOURCES}/demo"
DEMO_MANIFEST_PATH = f"{DEMO_DIR}/{DEMO_MANIFEST}"


def run_id(model: str, dataset: str, mode_label: str, seed: int | str) -> str:
    """A run's id, which is also its path below `results/<experiment>/runs/`: readable and stable."""
    return f"{model}/{dataset}/{mode_label}/seed{seed}"


# --- fetched inputs (resources/) -------------------------------------------------------------------------------


def model_dir(model: str) -> str:
    return f"{RESOURCES}/models/{model}"


def dataset_file(dataset: str) -> str:
    return f"{RESOURCES}/datasets/{dataset}.jsonl"


def benchmark_file(benchmark: str) -> str:
    return f"{RESOURCES}/benchmarks/{benchmark}.jsonl"


def sidecar_file(jsonl: str) -> str:
    """What a dataset or benchmark fetch resolved (commits, sha256s), beside its JSONL (asft.source_lock)."""
    return jsonl.removesuffix(".jsonl") + ".source.json"


# --- results/ ---------------------------------------------------------------------------------------------------


def run_dir(experiment: str, run_id: str) -> str:
    return f"{RESULTS}/{experiment}/runs/{run_id}"


def train_dir(experiment: str, run_id: str) -> str:
    """The training output: the adapter (LoRA) or the full weights, with the files named above."""
    return f"{run_dir(experiment, run_id)}/train"


def checkpoints_dir(experiment: str, run_id: str) -> str:
    """Resumable checkpoints, beside the declared output so that Snakemake does not delete them on a failure."""
    return f"{run_dir(experiment, run_id)}/checkpoints"


def merged_dir(experiment: str, run_id: str) -> str:
    """LoRA runs: the adapter folded into the base weights."""
    return f"{run_dir(experiment, run_id)}/merged"


def reference_dir(model: str, dataset: str, key: str) -> str:
    """A reference cache (training.reference: cached), shared by every run with the same reference spec (key:
    `asft.matrix.reference_key`), whatever its experiment."""
    return f"{RESULTS}/references/{model}/{dataset}/{key}"


def eval_dir(experiment: str, run_id: str, benchmark: str) -> str:
    return f"{run_dir(experiment, run_id)}/eval/{benchmark}"


def snapshot_eval_dir(experiment: str, run_id: str, step: int | str, benchmark: str) -> str:
    """A run's intermediate snapshot (training.snapshot_steps) on a benchmark: the paper's Figure 1."""
    return f"{run_dir(experiment, run_id)}/eval-step{step}/{benchmark}"


def snapshot_dir(train_dir: str, step: int | str) -> str:
    """The weights (or adapter) a run had after `step` optimizer steps, kept inside its training output."""
    return f"{train_dir}/snapshots/step-{step}"


def base_eval_dir(experiment: str, model: str, benchmark: str) -> str:
    """The untuned model on a benchmark: the row every run is compared against."""
    return f"{RESULTS}/{experiment}/base/{model}/eval/{benchmark}"


TRACE = "trace"  # a trace's folder (asft.tracing.stage), inside its trace directory beside the analysis files
TRACE_ANALYSIS = "analysis.json"
TRACE_SUMMARY = "summary.md"
TRACE_PLOT = "analysis.png"
TRACE_VIEWER = "viewer.html"
TRACES_COMPARISON = f"{RESULTS}/traces"


def trace_dir(experiment: str, model: str, dataset: str, mode_label: str | None = None, seed: int | str = 0) -> str:
    """A run's per-token gradient trace and its analysis; mode_label None: the untuned model's."""
    stem = f"{RESULTS}/{experiment}/traces/{model}/{dataset}"
    return f"{stem}/base" if mode_label is None else f"{stem}/{mode_label}/seed{seed}"


def tables_dir(experiment: str) -> str:
    return f"{RESULTS}/{experiment}/tables"


def plots_dir(experiment: str) -> str:
    return f"{RESULTS}/{experiment}/plots"


def paper_table_files(name: str) -> dict[str, str]:
    """A paper table in the paper's layout (asft.paper): long-form CSV, Markdown, LaTeX, and its caption."""
    stem = f"{RESULTS}/paper/tables/{name}"
    return {"csv": f"{stem}.csv", "md": f"{stem}.md", "tex": f"{stem}.tex", "caption": f"{stem}.caption.rst"}


def paper_figure_files(name: str) -> dict[str, str]:
    stem = f"{RESULTS}/paper/figures/{name}"
    return {"png": f"{stem}.png", "caption": f"{stem}.caption.rst"}


# --- logs/ (one per job, named like the job's output) -----------------------------------------------------------

DEMO_JOB_LOG = f"{LOGS}/build_demo.log"


def fetch_job_log(kind: str, name: str) -> str:
    """`kind` is the rule's noun: model, dataset or benchmark."""
    return f"{LOGS}/fetch_{kind}/{name}.log"


def train_job_log(experiment: str, run_id: str) -> str:
    return f"{LOGS}/{experiment}/train/{run_id}.log"


def reference_job_log(model: str, dataset: str, key: str) -> str:
    return f"{LOGS}/references/{model}/{dataset}/{key}.log"


def merge_job_log(experiment: str, run_id: str) -> str:
    return f"{LOGS}/{experiment}/merge/{run_id}.log"


def eval_job_log(experiment: str, run_id: str, benchmark: str) -> str:
    return f"{LOGS}/{experiment}/evaluate/{run_id}/{benchmark}.log"


def snapshot_eval_job_log(experiment: str, run_id: str, step: int | str, benchmark: str) -> str:
    return f"{LOGS}/{experiment}/evaluate/{run_id}/step{step}/{benchmark}.log"


def base_eval_job_log(experiment: str, model: str, benchmark: str) -> str:
    return f"{LOGS}/{experiment}/evaluate/{model}/base/{benchmark}.log"


def aggregate_job_log(experiment: str) -> str:
    return f"{LOGS}/{experiment}/aggregate.log"


def paper_job_log(name: str) -> str:
    return f"{LOGS}/paper/{name}.log"


# --- the rules' patterns: the functions above filled with wildcard placeholders ----------------------------------

RUN_ID_WILDCARDS = run_id("{model}", "{dataset}", "{mode_label}", "{seed}")
RUN_WILDCARDS = run_dir("{experiment}", RUN_ID_WILDCARDS)
TRAIN_WILDCARDS = train_dir("{experiment}", RUN_ID_WILDCARDS)
MERGED_WILDCARDS = merged_dir("{experiment}", RUN_ID_WILDCARDS)
REFERENCE_WILDCARDS = reference_dir("{model}", "{dataset}", "{reference_key}")
EVAL_WILDCARDS = eval_dir("{experiment}", RUN_ID_WILDCARDS, "{benchmark}")
SNAPSHOT_EVAL_WILDCARDS = snapshot_eval_dir("{experiment}", RUN_ID_WILDCARDS, "{step}", "{benchmark}")
BASE_EVAL_WILDCARDS = base_eval_dir("{experiment}", "{model}", "{benchmark}")
TRACE_RUN_WILDCARDS = trace_dir("{experiment}", "{model}", "{dataset}", "{mode_label}", "{seed}")
TRACE_BASE_WILDCARDS = trace_dir("{experiment}", "{model}", "{dataset}")
TABLES_WILDCARDS = tables_dir("{experiment}")
PLOTS_WILDCARDS = plots_dir("{experiment}")

MODEL_WILDCARDS = model_dir("{model}")
DATASET_WILDCARDS = dataset_file("{dataset}")
BENCHMARK_WILDCARDS = benchmark_file("{benchmark}")
DATASET_SIDECAR_WILDCARDS = sidecar_file(DATASET_WILDCARDS)
BENCHMARK_SIDECAR_WILDCARDS = sidecar_file(BENCHMARK_WILDCARDS)

FETCH_MODEL_LOG_WILDCARDS = fetch_job_log("model", "{model}")
FETCH_DATASET_LOG_WILDCARDS = fetch_job_log("dataset", "{dataset}")
FETCH_BENCHMARK_LOG_WILDCARDS = fetch_job_log("benchmark", "{benchmark}")
TRAIN_LOG_WILDCARDS = train_job_log("{experiment}", RUN_ID_WILDCARDS)
MERGE_LOG_WILDCARDS = merge_job_log("{experiment}", RUN_ID_WILDCARDS)
REFERENCE_LOG_WILDCARDS = reference_job_log("{model}", "{dataset}", "{reference_key}")
EVAL_LOG_WILDCARDS = eval_job_log("{experiment}", RUN_ID_WILDCARDS, "{benchmark}")
SNAPSHOT_EVAL_LOG_WILDCARDS = snapshot_eval_job_log("{experiment}", RUN_ID_WILDCARDS, "{step}", "{benchmark}")
BASE_EVAL_LOG_WILDCARDS = base_eval_job_log("{experiment}", "{model}", "{benchmark}")
AGGREGATE_LOG_WILDCARDS = aggregate_job_log("{experiment}")
