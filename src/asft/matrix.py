"""The run matrix: runs expanded from a validated config, their ids, and the spec each job receives.

A run id doubles as its results path (asft.layout), and a job's spec is exactly what determines its result, so
the params Snakemake compares rerun a job precisely when its outcome could change.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from asft import layout
from asft.config_files import ConfigError
from asft.rl_objectives import OBJECTIVES

SAMPLING_PRESETS: dict[str, dict[str, Any]] = {
    # Greedy decoding, one sample: cheap and deterministic (the fork's protocol).
    "greedy": {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 1024, "seed": 0},
    # The paper's protocol: avg@16 at temperature 1.0 with up to 4096 new tokens.
    "paper": {"n": 16, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 4096, "seed": 0},
}


# Estimates that only `asft plan` reads (sizes, parameter counts); no result depends on them, so they are left out
# of every job's params and sharing key: correcting an estimate reruns nothing.
PLANNING_KEYS = frozenset({"parameters_b", "examples", "mean_tokens", "problems", "mean_prompt_tokens"})


def without_planning(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A model, dataset or benchmark entry as the jobs see it: without the planning estimates."""
    return {key: value for key, value in entry.items() if key not in PLANNING_KEYS}


@dataclass(frozen=True, order=True)
class Run:
    """One training run of the matrix; its id doubles as its results path."""

    experiment: str
    model: str
    dataset: str
    mode: str
    kl_weight: float
    seed: int
    sft_weight: float = 0.0
    # Swept training keys and this run's values, in the experiment's `sweep` order.
    sweep: tuple[tuple[str, Any], ...] = ()
    # Continual training: the run this one starts from, `<experiment>/<run id>`, and that run's mode label.
    init_from: str = ""
    init_label: str = ""

    @property
    def mode_label(self) -> str:
        """The loss with its anchor weights, then any swept training values: the run id's third part; a continual
        run's is prefixed with its parent's (`sft+dapo`)."""
        own = mode_label(self.mode, self.kl_weight, self.sft_weight) + sweep_label(self.sweep)
        return f"{self.init_label}+{own}" if self.init_from else own

    @property
    def run_id(self) -> str:
        return layout.run_id(self.model, self.dataset, self.mode_label, self.seed)

    @property
    def run_dir(self) -> str:
        return layout.run_dir(self.experiment, self.run_id)


def mode_label(mode: str, kl_weight: float, sft_weight: float = 0.0) -> str:
    """`asft-kl0.05` for KL-anchored modes, `asft-sft-sft0.1` for SFT-anchored ones, the bare mode name
    otherwise: stable and readable."""
    label = f"{mode}-kl{kl_weight:g}" if kl_weight > 0 else mode
    return f"{label}-sft{sft_weight:g}" if sft_weight > 0 else label


def sweep_label(sweep: tuple[tuple[str, Any], ...]) -> str:
    """`_learning_rate1e-05_global_batch_size64`: each swept training key with its value ('' when none)."""
    return "".join(f"_{key}{value:g}" if _is_number(value) else f"_{key}-{value}" for key, value in sweep)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def sweep_points(exp: Mapping[str, Any]) -> list[tuple[tuple[str, Any], ...]]:
    """The experiment's `sweep` as the cross product of its keys' values; [()] when it sweeps nothing."""
    points: list[tuple[tuple[str, Any], ...]] = [()]
    for key, values in (exp.get("sweep") or {}).items():
        points = [point + ((key, value),) for point in points for value in values]
    return points


LIVE_REFERENCE = "live"
# The `weighting` values whose weights read p_ref (asft.losses: Weighting.needs_reference, which tests/test_losses.py
# holds this equal to), spelled out here so that planning needs no torch.
REFERENCE_WEIGHTINGS = frozenset({"ref_ratio", "iw_sft"})


def reads_reference_every_step(config: Mapping[str, Any], run: Run) -> bool:
    """The run's loss reads the reference at every step: a KL anchor, or weights that read p_ref."""
    return run.kl_weight > 0 or config["modes"][run.mode].get("weighting", "none") in REFERENCE_WEIGHTINGS


# Training keys that only a cached reference reads (training.reference: cached); absent from live runs' specs.
REFERENCE_KEYS = ("reference", "reference_samples")


def run_training(config: Mapping[str, Any], run: Run) -> dict:
    """The experiment's training settings with the run's swept values in place, and the accumulation steps
    resolved (from global_batch_size where set), so that equal batches give equal specs."""
    from asft.config_checks import gradient_accumulation_steps

    training = {**config["experiments"][run.experiment]["training"], **dict(run.sweep)}
    training["gradient_accumulation_steps"] = gradient_accumulation_steps(training)
    if training.get("reference", LIVE_REFERENCE) == LIVE_REFERENCE:
        # A live reference reads neither key, and leaving both out keeps a live run's spec, hence its Snakemake
        # params and checkpoint fingerprint (asft.checkpoints.run_fingerprint), as they were before the keys
        # existed: finished runs do not rerun. Readers default them (training.get("reference", "live")).
        for key in REFERENCE_KEYS:
            training.pop(key, None)
    if not is_rl(config, run.mode):
        training.pop("rl", None)  # read by RL runs only: SFT specs stay as they were before it existed
    return training


# The training keys a reference cache depends on (asft.reference_stage): what decides the target tokens (template,
# max_length, the examples), what the reference computes in (dtype, trust_remote_code), and K. Nothing else: runs
# that differ in learning rate, mode, KL weight or seed share one cache.
REFERENCE_SETTINGS = (
    "template",
    "max_length",
    "max_samples",
    "dtype",
    "trust_remote_code",
    "reference",
    "reference_samples",
)


def reference_spec(config: Mapping[str, Any], run: Run) -> dict | None:
    """What the run's reference cache is built from, or None for a live reference: the model, the dataset and
    `REFERENCE_SETTINGS` of its training block (the run's sweep applied)."""
    training = run_training(config, run)
    if training.get("reference", LIVE_REFERENCE) == LIVE_REFERENCE:
        return None
    return {
        "model": run.model,
        "dataset": run.dataset,
        "training": {key: training[key] for key in REFERENCE_SETTINGS},
    }


def reference_key(spec: Mapping[str, Any]) -> str:
    """A short content key of a reference spec: the cache's folder name, so equal specs share one job."""
    import hashlib

    return hashlib.sha256(canonical_json(dict(spec)).encode()).hexdigest()[:12]


def reference_jobs(config: Mapping[str, Any]) -> dict[tuple[str, str, str], tuple[dict, Run]]:
    """Every reference cache the config needs, by (model, dataset, key), with its spec and the first run (config
    order) that reads it: one job per distinct reference spec, however many runs, modes, seeds or experiments
    read it."""
    jobs: dict[tuple[str, str, str], tuple[dict, Run]] = {}
    for run in iter_runs(config):
        spec = reference_spec(config, run)
        if spec is not None:
            jobs.setdefault((run.model, run.dataset, reference_key(spec)), (spec, run))
    return jobs


def iter_runs(config: Mapping[str, Any], experiment: str | None = None) -> Iterator[Run]:
    """Expand experiments into runs; `kl_weights` sweeps only modes that have a KL anchor."""
    for exp_name in config["experiments"]:
        if experiment is None or exp_name == experiment:
            for run, _ in runs_with_origins(config, exp_name):
                yield run


def runs_with_origins(config: Mapping[str, Any], exp_name: str) -> Iterator[tuple[Run, str]]:
    """One experiment's runs, each with the config entries that produced its mode label (for error messages)."""
    exp = config["experiments"][exp_name]
    parents = [parent_run(config, exp_name, index) for index in range(len(exp.get("init_from") or ()))] or [None]
    for index, parent in enumerate(parents):
        start = {"init_from": parent_ref(parent), "init_label": parent.mode_label} if parent else {}
        # two parents of one mode label (other seeds, datasets or experiments) would give one child id: the
        # origin names the parent, so the id-clash check refuses that rather than keeping one child
        from_parent = f"init_from[{index}] {parent_ref(parent)!r} with " if parent else ""
        for model in exp["models"] if parent is None else [parent.model]:
            for dataset in exp["datasets"]:
                for mode_index, mode in enumerate(exp["modes"]):
                    for kl, sft, origin in _anchor_weights(config, exp, mode_index, mode):
                        for point in sweep_points(exp):
                            for seed in exp["seeds"]:
                                run = Run(exp_name, model, dataset, mode, kl, int(seed), sft, point, **start)
                                yield run, from_parent + origin


def parent_ref(run: Run) -> str:
    """How `init_from` names a run: `<experiment>/<run id>`."""
    return f"{run.experiment}/{run.run_id}"


def parent_run(config: Mapping[str, Any], exp_name: str, index: int) -> Run:
    """The run `experiments.<exp_name>.init_from[index]` names, or a ConfigError naming that key: an unknown
    experiment or run id, a parent of another model than the experiment trains, or a cycle of parents."""
    key = f"experiments.{exp_name}.init_from[{index}]"
    ref = config["experiments"][exp_name]["init_from"][index]
    parent_exp, _, run_id = ref.partition("/")
    if parent_exp not in config["experiments"]:
        raise ConfigError(f"{key}: {ref!r} names no experiment {parent_exp!r}; known: {sorted(config['experiments'])}")
    cycle = _parent_cycle(config, exp_name)
    if cycle:
        raise ConfigError(f"{key}: {ref!r}: runs cannot start from their own results ({' -> '.join(cycle)})")
    for candidate, _ in runs_with_origins(config, parent_exp):
        if candidate.run_id == run_id:
            if candidate.model not in config["experiments"][exp_name]["models"]:
                raise ConfigError(
                    f"{key}: {ref!r} is a run of model {candidate.model!r}, which experiments.{exp_name}.models "
                    "does not list: a continual run keeps its parent's model"
                )
            return candidate
    known = sorted(run.run_id for run, _ in runs_with_origins(config, parent_exp))
    raise ConfigError(f"{key}: experiment {parent_exp!r} has no run {run_id!r}; its runs: {known}")


def _parent_cycle(config: Mapping[str, Any], start: str) -> list[str]:
    """The experiments of an init_from cycle through `start` (empty if none), checked before any parent is
    expanded, so that a cycle is an error rather than endless recursion."""
    return _parent_cycle_from(config, start, [start])


def _parent_cycle_from(config: Mapping[str, Any], start: str, path: list[str]) -> list[str]:
    """Depth-first along init_from edges from the end of `path`, back to `start`."""
    parents = {ref.partition("/")[0] for ref in config["experiments"][path[-1]].get("init_from") or ()}
    if start in parents:
        return [*path, start]
    for parent in sorted(parents & set(config["experiments"]) - set(path)):
        found = _parent_cycle_from(config, start, [*path, parent])
        if found:
            return found
    return []


def _anchor_weights(
    config: Mapping[str, Any], exp: Mapping[str, Any], mode_index: int, mode: str
) -> list[tuple[float, float, str]]:
    """(kl_weight, sft_weight, origin) per run of one mode: `kl_weights` sweeps modes with a KL anchor,
    `sft_weights` modes with an SFT anchor, and a mode without either keeps its own row."""
    row = config["modes"][mode]
    own_kl, own_sft = float(row.get("kl_weight", 0.0)), float(row.get("sft_weight", 0.0))
    where = f"modes[{mode_index}] {mode!r}"
    kls = [(own_kl, where + (f" (kl_weight {own_kl!r})" if own_kl else ""))]
    if own_kl > 0 and "kl_weights" in exp:
        kls = [(float(kl), f"{where} with kl_weights[{i}] = {kl!r}") for i, kl in enumerate(exp["kl_weights"])]
    sfts = [(own_sft, "")]
    if own_sft > 0 and "sft_weights" in exp:
        sfts = [(float(a), f" with sft_weights[{i}] = {a!r}") for i, a in enumerate(exp["sft_weights"])]
    return [(kl, sft, kl_origin + sft_origin) for kl, kl_origin in kls for sft, sft_origin in sfts]


RunsById = dict[tuple[str, str], Run]


def runs_by_id(config: Mapping[str, Any], experiment: str | None = None) -> RunsById:
    """Every run keyed by (experiment, run id), built once so that a job finds its run without expanding the matrix.

    Ids are unique within an experiment (validate_config refuses a clash), so no run is lost.
    """
    return {(run.experiment, run.run_id): run for run in iter_runs(config, experiment)}


def run_by_id(runs: RunsById, experiment: str, run_id: str) -> Run:
    """The run whose id is `run_id` (as it appears in paths/wildcards), or a ConfigError naming the experiment."""
    try:
        return runs[(experiment, run_id)]
    except KeyError:
        raise ConfigError(f"experiments.{experiment}: no run with id {run_id!r}") from None


def find_run(config: Mapping[str, Any], experiment: str, run_id: str) -> Run:
    """`run_by_id` for a single lookup; callers with many lookups build `runs_by_id` once instead."""
    return run_by_id(runs_by_id(config, experiment), experiment, run_id)


def run_identity(run: Run) -> dict[str, Any]:
    """What an evaluation records about the run it scored, so that tables can group and label it."""
    return {
        "experiment": run.experiment,
        "run_id": run.run_id,
        "model": run.model,
        "dataset": run.dataset,
        "mode": run.mode,
        "mode_label": run.mode_label,
        "kl_weight": run.kl_weight,
        "sft_weight": run.sft_weight,
        "sweep": dict(run.sweep),
        "seed": run.seed,
        # only where set: the identity of every other run, hence its evaluations' params, stays as it was
        **({"init_from": run.init_from, "init_label": run.init_label} if run.init_from else {}),
    }


def base_identity(experiment: str, model: str) -> dict[str, Any]:
    """`run_identity` for the untuned model, labelled `base` in the tables."""
    return {"experiment": experiment, "model": model, "mode_label": "base"}


# Mode keys read by one weighting only, added after runs of the other weightings existed: left out of those runs'
# specs, so their Snakemake params and checkpoint fingerprints stay as they were and finished runs do not rerun.
WEIGHTING_ONLY_KEYS = {"iw_sft": ("iw_temp", "iw_clip")}


RL_OBJECTIVES = tuple(OBJECTIVES)  # asft.rl_objectives: the presets
# Mode keys of online RL rows (asft.rl), absent unless set: the presets for each objective live in asft.rl.
RL_MODE_KEYS = (
    "epsilon",
    "epsilon_high",
    "mask_truncated_completions",
    "overlong_buffer",
    "scale_rewards",
    "kl_bias_correction",
)


def is_rl(config: Mapping[str, Any], mode: str) -> bool:
    """The mode trains by online RL (GRPO/DAPO) rather than a supervised loss."""
    return config["modes"][mode].get("objective", "sft") in RL_OBJECTIVES


def loss_config(config: Mapping[str, Any], run: Run) -> dict:
    """The mode row with the run's (possibly swept) anchor weights.

    An RL row keeps only what asft.rl reads (objective, β as kl_weight, its clip and overlong keys); an SFT row
    leaves `objective` out, so SFT runs' specs, params and fingerprints are as they were before RL rows existed.
    """
    row = dict(config["modes"][run.mode])
    if is_rl(config, run.mode):
        return {
            "objective": row["objective"],
            "kl_weight": run.kl_weight,
            **{k: row[k] for k in RL_MODE_KEYS if k in row},
        }
    row.pop("objective", None)
    row["kl_weight"] = run.kl_weight
    row["sft_weight"] = run.sft_weight
    for weighting, keys in WEIGHTING_ONLY_KEYS.items():
        if row["weighting"] != weighting:
            for key in keys:
                row.pop(key, None)
    return row


def train_spec(config: Mapping[str, Any], run: Run) -> dict:
    """Everything that determines a training run's result, and nothing else (no benchmarks, no eval settings)."""
    return {
        "run_id": run.run_id,
        "mode": run.mode,
        "loss": loss_config(config, run),
        "seed": run.seed,
        "training": run_training(config, run),
        "dataset": {k: v for k, v in without_planning(config["datasets"][run.dataset]).items() if k != "source"},
        # a continual run's result depends on everything its parent's did (and its parent's parent's)
        **({"init_from": train_spec(config, find_run(config, *run.init_from.split("/", 1)))} if run.init_from else {}),
    }


def resolve_sampling(*layers: Mapping[str, Any] | None) -> dict:
    """Preset values, then explicit overrides, later layers winning (experiment, then benchmark)."""
    preset = "greedy"
    for layer in layers:
        if layer and layer.get("preset"):
            preset = layer["preset"]
    sampling = dict(SAMPLING_PRESETS[preset], preset=preset)
    for layer in layers:
        for key, value in (layer or {}).items():
            if key != "preset":
                sampling[key] = value
    return sampling


def eval_spec(config: Mapping[str, Any], experiment: str, benchmark: str) -> dict:
    """Everything that determines one evaluation (the model path and template are added by the caller)."""
    exp_eval = config["experiments"][experiment]["evaluation"]
    bench = config["benchmarks"][benchmark]
    return {
        "benchmark": benchmark,
        "format": bench["format"],
        "backend": exp_eval["backend"],
        "template": exp_eval["template"] or config["experiments"][experiment]["training"]["template"],
        "sampling": resolve_sampling(exp_eval.get("sampling"), bench.get("sampling")),
        "batch_size": exp_eval["batch_size"],
        "max_problems": exp_eval["max_problems"],
        "grading_workers": exp_eval["grading_workers"],
        "grading_timeout_s": exp_eval["grading_timeout_s"],
        "bootstrap_samples": exp_eval["bootstrap_samples"],
        "dtype": exp_eval["dtype"],
        "trust_remote_code": config["experiments"][experiment]["training"]["trust_remote_code"],
        # read by code and judged benchmarks only: other evaluations' params stay as they were before these existed
        **(
            {"sandbox_timeout_s": exp_eval["sandbox_timeout_s"], "sandbox_memory_mb": exp_eval["sandbox_memory_mb"]}
            if bench["format"] in CODE_FORMATS
            else {}
        ),
        **({"judge": exp_eval["judge"]} if bench["format"] in JUDGED_FORMATS else {}),
    }


# Benchmark formats by how they are graded (asft.evaluation.benchmarks; spelled out so planning needs no torch).
CODE_FORMATS = ("humaneval", "humaneval_plus", "mbpp", "mbpp_plus")
JUDGED_FORMATS = ("alpaca_eval",)


def merge_spec(config: Mapping[str, Any], experiment: str) -> dict:
    """How a LoRA run is merged: in the evaluation's dtype, since the merged weights exist only to be evaluated
    (`auto` keeps the base checkpoint's dtype, as evaluating with the adapter applied directly does), and with
    remote code allowed exactly when training allowed it, so a model that trained can also be merged."""
    exp = config["experiments"][experiment]
    return {"dtype": exp["evaluation"]["dtype"], "trust_remote_code": exp["training"]["trust_remote_code"]}


def source_list(entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    """An entry's sources as a list: benchmarks may concatenate several (one per MMLU subject, say)."""
    source = entry["source"]
    return list(source) if isinstance(source, list) else [source]


def canonical_json(value: Any) -> str:
    """Sorted, compact JSON: the params value Snakemake compares to decide whether a job is stale."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
