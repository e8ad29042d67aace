"""`asft plan`: what a config will cost, before anyone submits its jobs to a cluster.

Jobs are counted the way the workflow runs them (asft.sharing): work two experiments define identically is done
once and attributed to the first experiment, in config order, that defines it. The GPU-hour estimate is
arithmetic on stated inputs, never a measurement: parameter counts, dataset sizes and token lengths come from
optional config keys (models.<m>.parameters_b, datasets.<d>.examples / mean_tokens, benchmarks.<b>.problems /
mean_prompt_tokens) and throughput from flags; a job whose inputs are missing is reported as unknown, never as 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from fnmatch import fnmatchcase
from typing import Any

import pandas as pd

from asft.config_checks import gradient_accumulation_steps
from asft.evaluation.benchmarks import CHOICE_FORMATS
from asft.matrix import (
    Run,
    eval_spec,
    is_rl,
    reads_reference_every_step,
    reference_key,
    reference_spec,
    run_training,
)
from asft.sharing import Evaluation, SharedWork
from asft.tracing.spec import TraceTarget, trace_targets

# H100 SXM bf16 dense peak is 989 TFLOP/s. Full fine-tuning under ZeRO-3 with short, padded sequences and
# recomputed activations reaches roughly 30% of it in model FLOPs; batched decoding is memory-bound and far lower.
H100_BF16_PEAK_TFLOPS = 989.0
TRAIN_MFU = 0.30
EVAL_MFU = 0.10
DEFAULT_TRAIN_TFLOPS = round(H100_BF16_PEAK_TFLOPS * TRAIN_MFU)  # 297
DEFAULT_EVAL_TFLOPS = round(H100_BF16_PEAK_TFLOPS * EVAL_MFU)  # 99

# A selection keeps an experiment's runs whose attributes match a filter (None: all of them); base-model
# evaluations of a matched experiment are always kept.
Selection = tuple[str, Mapping[str, str] | None]


def catalogue_targets() -> dict[str, tuple[Selection, ...]]:
    """Each table and figure of the catalogue with the experiments it reads (asft.paper.targets)."""
    from asft.paper.targets import experiments_of, target_names

    return {name: tuple((experiment, None) for experiment in experiments_of(name)) for name in target_names()}


SMOKE_NOTE = "smoke: runs on CPU in minutes"


@dataclass(frozen=True)
class Throughput:
    """Achieved (not peak) TFLOP/s per GPU, the divisor that turns FLOPs into GPU-hours."""

    train_tflops: float = DEFAULT_TRAIN_TFLOPS
    eval_tflops: float = DEFAULT_EVAL_TFLOPS

    def gpu_hours(self, kind: str, flops: float) -> float:
        tflops = self.train_tflops if kind == "train" else self.eval_tflops
        return flops / (tflops * 1e12) / 3600


@dataclass(frozen=True)
class Job:
    """One job of the workflow, once: `owner` is the experiment whose output every sharer reads."""

    kind: str  # train | reference | merge | evaluate | trace
    key: str
    owner: str
    flops: float | None  # None: an input is missing (merges are CPU work and carry 0)
    gpus: int = 0  # per train job: num_processes x num_nodes
    missing: tuple[str, ...] = ()  # the config keys whose absence left flops unknown


@dataclass(frozen=True)
class Need:
    """An experiment's use of a job, with the run attributes a target's filter selects on (none for a base model)."""

    key: str
    attrs: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """Every job of a config, once, and which of them each experiment needs."""

    jobs: dict[str, Job]
    needs: dict[str, list[Need]]
    throughput: Throughput
    smoke: bool
    notes: list[str]


@dataclass
class PlanRow:
    """One line of the plan: an experiment (the jobs it owns) or a target (every job it needs)."""

    name: str
    train_jobs: int = 0
    reference_jobs: int = 0  # reference caches (training.reference: cached); their hours are in train_gpu_hours
    trace_jobs: int = 0  # per-token gradient traces (experiments.<e>.trace); their hours are in train_gpu_hours
    merge_jobs: int = 0
    eval_jobs: int = 0
    reused_runs: int = 0
    reused_evaluations: int = 0
    gpus_per_train_job: str = "-"
    train_gpu_hours: float | None = 0.0
    eval_gpu_hours: float | None = 0.0
    total_gpu_hours: float | None = 0.0
    train_unknown: int = 0
    eval_unknown: int = 0

    @property
    def unestimated_jobs(self) -> int:
        return self.train_unknown + self.eval_unknown


# --- FLOPs ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainShape:
    """The numbers a run's training cost follows from, derived exactly as the train stage derives them."""

    gpus: int
    global_batch: int
    steps: int | None  # None: the dataset size is unknown and max_steps does not fix it
    tokens_per_example: float | None


def train_shape(config: Mapping[str, Any], run: Run) -> TrainShape:
    training = run_training(config, run)
    dataset = config["datasets"][run.dataset]
    gpus = training["num_processes"] * training["num_nodes"]
    global_batch = training["per_device_train_batch_size"] * gradient_accumulation_steps(training) * gpus
    # an RL step's batch is completions, num_generations per prompt (TRL), so it consumes fewer examples
    examples_per_step = global_batch / training["rl"]["num_generations"] if is_rl(config, run.mode) else global_batch
    steps = None
    if training["max_steps"] > 0:
        steps = training["max_steps"]
    elif dataset.get("examples") is not None:
        caps = [dataset["examples"], dataset.get("max_samples"), training.get("max_samples")]
        examples = min(c for c in caps if c is not None)
        steps = math.ceil(examples * training["num_train_epochs"] / examples_per_step)
    mean = dataset.get("mean_tokens")
    # truncation at max_length: min() overstates the truncated mean a little, never understates it
    tokens = None if mean is None else min(float(mean), float(training["max_length"]))
    return TrainShape(gpus, global_batch, steps, tokens)


def _cost_inputs(config: Mapping[str, Any], run: Run, shape: TrainShape) -> tuple[float | None, tuple[str, ...]]:
    """N (parameters) if every estimate a run's cost needs is in the config, else the config keys that are missing."""
    params_b = config["models"][run.model].get("parameters_b")
    missing = [f"models.{run.model}.parameters_b"] if params_b is None else []
    if shape.steps is None:
        missing.append(f"datasets.{run.dataset}.examples")
    if shape.tokens_per_example is None:
        missing.append(f"datasets.{run.dataset}.mean_tokens")
    return (None, tuple(missing)) if missing else (params_b * 1e9, ())


def rl_train_flops(config: Mapping[str, Any], run: Run, throughput: Throughput) -> tuple[float | None, tuple[str, ...]]:
    """An RL run per step: its global batch of completions generated (2·N per token of prompt and completion,
    decoding, counted at the evaluation throughput and converted to train-throughput FLOPs), then a policy update
    (6·N·T, LoRA 4·N·T) and, with β > 0, a reference forward (2·N·T) over the same tokens. A completion is assumed
    to average half of max_completion_length and a prompt half the dataset's mean_tokens."""
    shape = train_shape(config, run)
    training = run_training(config, run)
    n, missing = _cost_inputs(config, run, shape)
    if n is None:
        return None, missing
    assert shape.steps is not None and shape.tokens_per_example is not None
    tokens = (
        shape.global_batch * shape.steps * (shape.tokens_per_example / 2 + training["rl"]["max_completion_length"] / 2)
    )
    generation = 2.0 * n * tokens * throughput.train_tflops / throughput.eval_tflops
    update = (4.0 if training["finetune"] == "lora" else 6.0) * n * tokens
    reference = 2.0 * n * tokens if run.kl_weight > 0 else 0.0
    # several updates per rollout batch: TRL first recomputes the sampling policy's log-probs (one forward)
    old_policy = 2.0 * n * tokens if training["rl"]["updates_per_rollout"] > 1 else 0.0
    return generation + update + reference + old_policy, ()


def train_flops(config: Mapping[str, Any], run: Run) -> tuple[float | None, tuple[str, ...]]:
    """6·N·T (LoRA 4·N·T) for the policy plus 2·N·T for each reference forward; (None, missing keys) if unknown."""
    shape = train_shape(config, run)
    training = run_training(config, run)
    n, missing = _cost_inputs(config, run, shape)
    if n is None:
        return None, missing
    assert shape.steps is not None and shape.tokens_per_example is not None
    per_step = shape.global_batch * shape.tokens_per_example
    # LoRA: no weight gradients for the frozen weights, only the gradients flowing through them
    policy = (4.0 if training["finetune"] == "lora" else 6.0) * n * per_step * shape.steps
    if training.get("reference") == "cached":  # read from the cache: its one forward is `reference_flops`
        ref_steps = 0
    elif reads_reference_every_step(config, run):
        ref_steps = shape.steps
    elif training["kl_log_every"] > 0:  # the trainer runs the reference on steps 0, k, 2k, ...
        ref_steps = math.ceil(shape.steps / training["kl_log_every"])
    else:
        ref_steps = 0
    return policy + 2.0 * n * per_step * ref_steps, ()


def reference_flops(config: Mapping[str, Any], run: Run) -> tuple[float | None, tuple[str, ...]]:
    """Building a run's reference cache: 2·N·T over each training example once (a forward, no gradient)."""
    shape = train_shape(config, run)
    params_b = config["models"][run.model].get("parameters_b")
    dataset, training = config["datasets"][run.dataset], run_training(config, run)
    caps = [dataset.get("examples"), dataset.get("max_samples"), training.get("max_samples")]
    known = [c for c in caps if c is not None]
    drawn = None if shape.steps is None else shape.steps * shape.global_batch / max(1.0, training["num_train_epochs"])
    examples = min(known + ([drawn] if drawn is not None else [])) if known or drawn is not None else None
    missing = [f"models.{run.model}.parameters_b"] if params_b is None else []
    if examples is None or shape.tokens_per_example is None:
        missing.append(f"datasets.{run.dataset}.examples/mean_tokens")
    if missing:
        return None, tuple(missing)
    assert params_b is not None and examples is not None and shape.tokens_per_example is not None
    return 2.0 * params_b * 1e9 * examples * shape.tokens_per_example, ()


def trace_flops(config: Mapping[str, Any], target: TraceTarget) -> tuple[float | None, tuple[str, ...]]:
    """A per-token gradient trace: one backward pass over its batch per traced token, 4·N per batch token (the
    vjp reaches the input of the first traced layer); every target traced when tokens_per_batch is null, counted
    as the batch's tokens (an upper bound)."""
    exp = config["experiments"][target.experiment]
    options = exp["trace"]
    training = run_training(config, target.run) if target.run else exp["training"]
    params_b = config["models"][target.model].get("parameters_b")
    mean_tokens = config["datasets"][target.dataset].get("mean_tokens")
    missing = [f"models.{target.model}.parameters_b"] if params_b is None else []
    missing += [f"datasets.{target.dataset}.mean_tokens"] if mean_tokens is None else []
    if missing:
        return None, tuple(missing)
    batch_tokens = (options["batch_size"] or training["per_device_train_batch_size"]) * min(
        mean_tokens, training["max_length"]
    )
    traced = min(options["tokens_per_batch"] or batch_tokens, batch_tokens)
    return options["batches"] * traced * 4.0 * params_b * 1e9 * batch_tokens, ()


def eval_flops(config: Mapping[str, Any], evaluation: Evaluation) -> tuple[float | None, tuple[str, ...]]:
    """2·N·problems·n·(prompt + max_new_tokens/2); multiple choice one prompt forward; (None, missing) if unknown."""
    model = evaluation.identity["model"]
    bench = config["benchmarks"][evaluation.benchmark]
    params_b = config["models"][model].get("parameters_b")
    wanted = {
        f"models.{model}.parameters_b": params_b,
        f"benchmarks.{evaluation.benchmark}.problems": bench.get("problems"),
        f"benchmarks.{evaluation.benchmark}.mean_prompt_tokens": bench.get("mean_prompt_tokens"),
    }
    missing = tuple(key for key, value in wanted.items() if value is None)
    if missing:
        return None, missing
    spec = eval_spec(config, evaluation.experiment, evaluation.benchmark)
    problems = bench["problems"] if spec["max_problems"] is None else min(bench["problems"], spec["max_problems"])
    n = params_b * 1e9
    if spec["format"] in CHOICE_FORMATS:  # scored by the letter's likelihood: one forward of the prompt
        return 2.0 * n * problems * bench["mean_prompt_tokens"], ()
    sampling = spec["sampling"]
    per_sample = bench["mean_prompt_tokens"] + sampling["max_new_tokens"] / 2
    return 2.0 * n * problems * sampling["n"] * per_sample, ()


# --- the plan ------------------------------------------------------------------------------------------------------


def build_plan(config: Mapping[str, Any], throughput: Throughput | None = None) -> Plan:
    """Every job of a validated config once, its FLOPs (None at smoke scale: the stand-ins run on CPU)."""
    smoke = config.get("scale", "full") == "smoke"
    shared = SharedWork(config)
    jobs: dict[str, Job] = {}
    needs: dict[str, list[Need]] = {}
    notes: list[str] = []
    for exp_name, exp in config["experiments"].items():
        needs[exp_name] = []
        merged = exp["training"]["finetune"] == "lora" and not exp["evaluation"]["lora_direct"]
        for run in shared.runs(exp_name):
            owner = shared.owner(run)
            key = f"train:{owner.run_dir}"
            attrs = {"dataset": run.dataset, "model": run.model, "mode": run.mode}
            if key not in jobs:
                if smoke:
                    flops, missing = None, ()
                elif is_rl(config, owner.mode):
                    flops, missing = rl_train_flops(config, owner, throughput or Throughput())
                else:
                    flops, missing = train_flops(config, owner)
                jobs[key] = Job("train", key, owner.experiment, flops, train_shape(config, owner).gpus, missing)
            needs[exp_name].append(Need(key, attrs))
            ref_spec = reference_spec(config, owner)
            if ref_spec is not None:  # one cache job per distinct reference spec (asft.matrix.reference_jobs)
                ref_key = f"reference:{owner.model}/{owner.dataset}/{reference_key(ref_spec)}"
                if ref_key not in jobs:
                    flops, missing = (None, ()) if smoke else reference_flops(config, owner)
                    jobs[ref_key] = Job("reference", ref_key, owner.experiment, flops, 1, missing)
                needs[exp_name].append(Need(ref_key, attrs))
            if merged:  # the train key covers merge settings, so one merge per trained run
                merge_key = f"merge:{owner.run_dir}"
                jobs.setdefault(merge_key, Job("merge", merge_key, owner.experiment, 0.0))
                needs[exp_name].append(Need(merge_key, attrs))
        for evaluation in shared.evaluations(exp_name):
            key = f"evaluate:{evaluation.metrics_dir}"
            if key not in jobs:
                flops, missing = (None, ()) if smoke else eval_flops(config, evaluation)
                jobs[key] = Job("evaluate", key, exp_name, flops, missing=missing)
            ident = evaluation.identity
            attrs = {} if ident.get("mode") == "base" else {k: ident[k] for k in ("dataset", "model", "mode")}
            needs[exp_name].append(Need(key, attrs))
        for target in trace_targets(config, exp_name):
            key = f"trace:{target.experiment}/{target.model}/{target.dataset}/{target.label}"
            key += f"/seed{target.run.seed}" if target.run else ""
            flops, missing = (None, ()) if smoke else trace_flops(config, target)
            jobs[key] = Job("trace", key, exp_name, flops, 1, missing)
            attrs = {
                "dataset": target.dataset,
                "model": target.model,
                "mode": target.run.mode if target.run else "base",
            }
            needs[exp_name].append(Need(key, attrs))
    return Plan(jobs, needs, throughput or Throughput(), smoke, notes)


def _row(name: str, plan: Plan, keys: Iterable[str], reused: Iterable[str] = ()) -> PlanRow:
    """Counts and GPU-hours over distinct job keys; `reused` are the keys done by another experiment or target."""
    row = PlanRow(name)
    hours = {"train": 0.0, "evaluate": 0.0}
    gpus: list[int] = []
    for key in dict.fromkeys(keys):
        job = plan.jobs[key]
        if job.kind in ("reference", "trace"):  # forward/backward passes: counted with training's hours
            row.reference_jobs += job.kind == "reference"
            row.trace_jobs += job.kind == "trace"
            if job.flops is not None:
                hours["train"] += plan.throughput.gpu_hours("train", job.flops)
            continue
        if job.kind == "train":
            row.train_jobs += 1
            gpus.append(job.gpus)
        elif job.kind == "merge":
            row.merge_jobs += 1
        else:
            row.eval_jobs += 1
        if job.kind in hours and job.flops is not None:
            hours[job.kind] += plan.throughput.gpu_hours(job.kind, job.flops)
        elif job.kind in hours and not plan.smoke:
            row.train_unknown += job.kind == "train"
            row.eval_unknown += job.kind == "evaluate"
    for key in dict.fromkeys(reused):
        kind = plan.jobs[key].kind
        row.reused_runs += kind == "train"
        row.reused_evaluations += kind == "evaluate"
    row.gpus_per_train_job = "/".join(str(g) for g in sorted(set(gpus))) or "-"
    if plan.smoke:
        row.train_gpu_hours = row.eval_gpu_hours = row.total_gpu_hours = None
        return row
    # a category with jobs but no estimable one is unknown; a partial sum stays a lower bound (the formatter marks it)
    row.train_gpu_hours = None if row.train_unknown and row.train_unknown == row.train_jobs else hours["train"]
    row.eval_gpu_hours = None if row.eval_unknown and row.eval_unknown == row.eval_jobs else hours["evaluate"]
    known = [h for h in (row.train_gpu_hours, row.eval_gpu_hours) if h is not None]
    row.total_gpu_hours = sum(known) if known else None
    return row


def _total(plan: Plan) -> PlanRow:
    """The whole config, each job once; reuse is what sharing saved across experiments."""
    total = _row("total", plan, plan.jobs)
    by_experiment = rows_by_experiment(plan, with_total=False)
    total.reused_runs = sum(r.reused_runs for r in by_experiment)
    total.reused_evaluations = sum(r.reused_evaluations for r in by_experiment)
    return total


def rows_by_experiment(plan: Plan, with_total: bool = True) -> list[PlanRow]:
    """One row per experiment (the jobs it owns, and how many it reads from earlier experiments), then the total."""
    rows = []
    for exp_name, needs in plan.needs.items():
        owned = [n.key for n in needs if plan.jobs[n.key].owner == exp_name]
        reused = [n.key for n in needs if plan.jobs[n.key].owner != exp_name]
        rows.append(_row(exp_name, plan, owned, reused))
    return rows + [_total(plan)] if with_total else rows


def _selected(plan: Plan, selections: Sequence[Selection]) -> tuple[list[str], list[str]]:
    """(job keys a target needs, the experiments they came from)."""
    keys, experiments = [], []
    for pattern, where in selections:
        for exp_name, needs in plan.needs.items():
            if not fnmatchcase(exp_name, pattern):
                continue
            experiments.append(exp_name)
            for need in needs:
                if plan.jobs[need.key].kind == "trace":  # `rule all` requests traces; no table or figure reads them
                    continue
                if not where or not need.attrs or all(need.attrs.get(k) == v for k, v in where.items()):
                    keys.append(need.key)
    return keys, list(dict.fromkeys(experiments))


def rows_by_target(plan: Plan, targets: Mapping[str, Sequence[Selection]] | None = None) -> list[PlanRow]:
    """One row per catalogue target: everything it needs built from scratch (targets overlap, so the rows do not
    add up to the total); "reused" counts the jobs owned by experiments outside the target."""
    rows, covered = [], set()
    for target, selections in (targets if targets is not None else catalogue_targets()).items():
        keys, experiments = _selected(plan, selections)
        if not experiments:
            continue
        covered.update(experiments)
        reused = [k for k in keys if plan.jobs[k].owner not in experiments]
        rows.append(_row(target, plan, keys, reused))
    others = [name for name in plan.needs if name not in covered]
    if others:
        keys = [n.key for name in others for n in plan.needs[name]]
        reused = [k for k in keys if plan.jobs[k].owner not in others]
        rows.append(_row("other: " + ", ".join(others), plan, keys, reused))
    return rows + [_total(plan)]


# --- output --------------------------------------------------------------------------------------------------------


def to_frame(rows: Sequence[PlanRow], by: str = "experiment", smoke: bool = False) -> pd.DataFrame:
    """The rows as a table, one column per PlanRow field; GPU-hours are empty where unknown, and at smoke scale
    the `estimate` column says why there are none."""
    frame = pd.DataFrame([{f.name: getattr(r, f.name) for f in fields(PlanRow)} for r in rows])
    frame["unestimated_jobs"] = [r.unestimated_jobs for r in rows]
    frame["estimate"] = SMOKE_NOTE if smoke else "GPU-hours (see `asft plan` text output for the assumptions)"
    return frame.rename(columns={"name": by})


def assumptions(plan: Plan) -> list[str]:
    """The footnote: every input and simplification the numbers rest on."""
    if plan.smoke:
        return [
            f"{SMOKE_NOTE}: every model, dataset and benchmark is a stand-in (asft.scale), so no GPU-hours are "
            "estimated; the job counts are the stand-in DAG's (coinciding stand-ins are shared)."
        ]
    t = plan.throughput
    lines = [
        "training FLOPs = 6*N*T for full fine-tuning, 4*N*T for LoRA (forward + activation gradients, no weight "
        "gradients for the frozen weights), + 2*N*T_ref for the frozen reference: every step when the mode has "
        "kl_weight > 0 or a weighting that reads p_ref (ref_ratio, iw_sft), else ceil(steps / kl_log_every) "
        "steps (0 = none); with training.reference: cached none, and instead one 2*N*T_epoch reference-cache job "
        "per distinct reference spec (counted in train GPU-h; the 'references' line)",
        "T = steps x global batch x min(datasets.<d>.mean_tokens, max_length); steps = max_steps if > 0 else "
        "ceil(examples x num_train_epochs / global batch), examples = datasets.<d>.examples capped by max_samples; "
        "global batch = per_device_train_batch_size x gradient_accumulation_steps (derived from global_batch_size "
        "where set) x num_processes x num_nodes",
        "RL runs (grpo, dapo): per step the global batch of completions (num_generations per prompt, so steps = "
        "ceil(examples x epochs x num_generations / global batch)) is generated, 2*N per token at the evaluation "
        "throughput, then trained on, 6*N*T (LoRA 4*N*T) + 2*N*T for the reference when kl_weight > 0 and 2*N*T "
        "for the sampling policy's log-probs when updates_per_rollout > 1, with T = "
        "completions x (mean_tokens/2 for the prompt + max_completion_length/2)",
        "evaluation FLOPs = 2*N*problems*n*(benchmarks.<b>.mean_prompt_tokens + max_new_tokens/2), assuming "
        "completions average half their length limit; multiple choice (medqa, medmcqa, mmlu_medical): "
        "2*N*problems*mean_prompt_tokens, one forward; problems capped by evaluation.max_problems",
        f"throughput: training {t.train_tflops:g} TFLOP/s per GPU, evaluation {t.eval_tflops:g} TFLOP/s per GPU "
        f"(defaults: H100 SXM bf16 dense peak {H100_BF16_PEAK_TFLOPS:g} x {TRAIN_MFU:.0%} MFU, and x {EVAL_MFU:.0%} "
        "for batched decoding, which is memory-bound; --train-tflops / --eval-tflops)",
        "N = models.<m>.parameters_b; a job whose inputs are missing is 'unknown' and a sum that leaves some out "
        "is marked '>='; not counted: attention's quadratic FLOPs, gradient checkpointing's recompute and padding "
        "(all absorbed in the MFU), merges (CPU, minutes each), fetches, aggregation",
        "GPU-hours assume perfect scaling: a train job's wall-clock is about its GPU-hours / GPUs per train job",
    ]
    return lines + plan.notes


def _hours(value: float | None, unknown: int, smoke: bool) -> str:
    if smoke:
        return "smoke"
    if value is None:
        return "unknown"
    text = f"{value:,.1f}" if value < 100 else f"{value:,.0f}"
    return f">={text}" if unknown else text


def format_text(plan: Plan, rows: Sequence[PlanRow], by: str = "experiment") -> str:
    """An aligned table, a line on what could not be estimated, and the assumptions as numbered footnotes."""
    header = [by, "train", "merge", "eval", "reused runs", "reused evals", "GPUs/train", "train GPU-h"]
    header += ["eval GPU-h", "total GPU-h", "unknown jobs"]
    table = [header]
    for r in rows:
        unknown_total = r.unestimated_jobs
        table.append(
            [
                r.name,
                str(r.train_jobs),
                str(r.merge_jobs),
                str(r.eval_jobs),
                str(r.reused_runs),
                str(r.reused_evaluations),
                r.gpus_per_train_job,
                _hours(r.train_gpu_hours, r.train_unknown, plan.smoke),
                _hours(r.eval_gpu_hours, r.eval_unknown, plan.smoke),
                _hours(r.total_gpu_hours, unknown_total, plan.smoke),
                "-" if plan.smoke else str(unknown_total),
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = []
    for index, line in enumerate(table):
        cells = [line[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0 or index == len(table) - 2:
            lines.append("  ".join("-" * w for w in widths))
    total = rows[-1]
    if plan.smoke:
        lines.append(f"\n{SMOKE_NOTE} (the estimate is for the stand-ins, not the config's models).")
    elif total.unestimated_jobs:
        missing = sorted({m for job in plan.jobs.values() for m in job.missing})
        lines.append(
            f"\n{total.unestimated_jobs} of {total.train_jobs + total.eval_jobs} GPU jobs could not be estimated; "
            f"missing: {', '.join(missing)}"
        )
    else:
        lines.append(f"\nall {total.train_jobs + total.eval_jobs} GPU jobs estimated.")
    if total.reference_jobs:
        lines.append(f"references: {total.reference_jobs} reference-cache jobs (training.reference: cached)")
    if total.trace_jobs:
        lines.append(
            f"traces: {total.trace_jobs} per-token gradient trace jobs (experiments.<e>.trace), in train GPU-h: "
            "one backward pass over its batch per traced token, 4*N per batch token"
        )
    if by == "table":
        lines.append(
            "targets overlap (shared runs appear under each target that needs them); the total counts each job once."
        )
    lines.append("")
    lines += [f"[{i}] {line}" for i, line in enumerate(assumptions(plan), 1)]
    return "\n".join(lines)


def plan_rows(plan: Plan, by: str) -> list[PlanRow]:
    if by == "experiment":
        return rows_by_experiment(plan)
    if by == "table":
        return rows_by_target(plan)
    raise ValueError(f"by must be 'experiment' or 'table', not {by!r}")


def render(
    config: Mapping[str, Any], by: str = "experiment", fmt: str = "text", throughput: Throughput | None = None
) -> str:
    """The CLI's output for a validated config."""
    plan = build_plan(config, throughput)
    rows = plan_rows(plan, by)
    if fmt == "csv":
        return to_frame(rows, by, plan.smoke).to_csv(index=False)
    if fmt == "text":
        return format_text(plan, rows, by)
    raise ValueError(f"format must be 'text' or 'csv', not {fmt!r}")
