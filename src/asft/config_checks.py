"""Checks a schema cannot express, made before any job is planned: cross references, run-id clashes,
non-finite numbers, settings that would only fail once a job has loaded its model.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from asft.config_files import ConfigError
from asft.matrix import (
    JUDGED_FORMATS,
    RL_MODE_KEYS,
    is_rl,
    loss_config,
    parent_run,
    resolve_sampling,
    run_training,
    runs_with_origins,
    sweep_points,
)
from asft.rl_objectives import objective_options
from asft.tracing.spec import trace_problems


def non_finite(value: Any, path: tuple = ()) -> Iterator[tuple[list, float]]:
    """Every NaN or infinite float in a parsed config, with its key path."""
    if isinstance(value, float) and not math.isfinite(value):
        yield list(path), value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from non_finite(item, (*path, key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from non_finite(item, (*path, index))


def check_references(config: dict, source: str) -> None:
    problems = []
    for exp_name, exp in config["experiments"].items():
        all_known = True
        for axis, table in (
            ("models", "models"),
            ("datasets", "datasets"),
            ("modes", "modes"),
            ("benchmarks", "benchmarks"),
        ):
            for index, name in enumerate(exp[axis]):
                if name not in config[table]:
                    all_known = False
                    known = ", ".join(sorted(config[table]))
                    problems.append(
                        f"experiments.{exp_name}.{axis}[{index}]: unknown {axis[:-1]} {name!r} (defined: {known})"
                    )
        for axis, key, anchor in (("kl_weights", "kl_weight", "a KL"), ("sft_weights", "sft_weight", "an SFT")):
            if axis in exp and not any(config["modes"].get(m, {}).get(key, 0) > 0 for m in exp["modes"]):
                problems.append(
                    f"experiments.{exp_name}.{axis}: set, but none of the experiment's modes has {anchor} anchor "
                    f"({key} > 0)"
                )
        problems += _deepspeed_problems(exp_name, exp["training"])
        problems += _optimizer_problems(exp_name, exp["training"])
        problems += _scheduler_problems(exp_name, exp["training"])
        problems += _report_to_problems(exp_name, exp["training"])
        # a swept key (global_batch_size, max_steps, ...) is checked at each of its values
        for point in sweep_points(exp):
            training = {**exp["training"], **dict(point)}
            problems += _batch_problems(exp_name, training, point)
            problems += _snapshot_problems(exp_name, training, point)
            problems += _cached_reference_problems(config, exp_name, training, point)
        problems += _template_mismatch_problems(exp_name, exp["training"], exp["evaluation"])
        if exp["evaluation"]["lora_direct"] and exp["training"]["finetune"] != "lora":
            problems.append(
                f"experiments.{exp_name}.evaluation.lora_direct: needs training.finetune: lora "
                f"(got {exp['training']['finetune']!r}; a full fine-tune has no adapter)"
            )
        if all_known:  # these expand the matrix, which needs every name defined
            problems += _judge_problems(config, exp_name)
            problems += _init_from_problems(config, exp_name)
            problems += _rl_problems(config, exp_name)
            problems += _run_id_problems(config, exp_name)
            problems += _sampling_problems(config, exp_name)
            problems += trace_problems(config, exp_name)
    problems += _local_path_problems(config)
    problems += _mode_key_problems(config)
    problems = list(dict.fromkeys(problems))  # a benchmark's own setting is reported once, not per experiment
    if problems:
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(problems))


def _judge_problems(config: dict, exp_name: str) -> list[str]:
    """A judged benchmark (alpaca_eval) needs a judge endpoint before any answer is generated."""
    exp = config["experiments"][exp_name]
    judged = [b for b in exp["benchmarks"] if config["benchmarks"][b]["format"] in JUDGED_FORMATS]
    if judged and exp["evaluation"]["judge"] is None:
        return [
            f"experiments.{exp_name}.evaluation.judge: required by the judged benchmark(s) {judged} (an "
            "OpenAI-compatible endpoint: base_url, model, and api_key_env naming the variable that holds its key)"
        ]
    return []


def _init_from_problems(config: dict, exp_name: str) -> list[str]:
    """Each `init_from` entry names an existing run of a model the experiment trains, with no cycle of parents."""
    exp = config["experiments"][exp_name]
    problems = []
    for index in range(len(exp.get("init_from") or ())):
        try:
            parent_run(config, exp_name, index)
        except ConfigError as err:
            problems.append(str(err))
    if exp.get("init_from") and exp["training"].get("reference", "live") != "live":
        # a cache is built from the base model (the reference stage's input), not from a parent's weights
        problems.append(
            f"experiments.{exp_name}.training.reference: continual runs (init_from) are anchored to their parent's "
            "weights, which no reference cache is built from; set live"
        )
    return problems


def _rl_problems(config: dict, exp_name: str) -> list[str]:
    """What an experiment with GRPO/DAPO modes must say before its first rollout: the reward, a live reference
    (the KL is TRL's, against the starting model), and batches that hold whole groups of completions."""
    exp = config["experiments"][exp_name]
    rl_modes = [mode for mode in exp["modes"] if is_rl(config, mode)]
    if not rl_modes:
        return []
    key = f"experiments.{exp_name}.training"
    training, problems = exp["training"], []
    if training["rl"]["reward"] is None:
        problems.append(
            f"{key}.rl.reward: required for the RL modes {rl_modes} (math: the response's \\boxed{{}} answer "
            "graded by math-verify; choice: the response's final answer letter)"
        )
    if training.get("reference", "live") != "live":
        problems.append(f"{key}.reference: the RL modes {rl_modes} read a live reference (TRL's KL); set live")
    for point in sweep_points(exp):
        settings = {**training, **dict(point)}
        try:
            accumulation = gradient_accumulation_steps(settings)
        except ValueError:
            continue  # reported by _batch_problems
        generations = settings["rl"]["num_generations"]
        world = settings["num_processes"] * settings["num_nodes"]
        batch = settings["per_device_train_batch_size"] * accumulation * world
        if batch % generations:
            problems.append(
                f"{key}.rl.num_generations{_at_point(point)}: {generations} completions per prompt must divide the "
                f"{batch} completions of a step (per_device_train_batch_size x accumulation x ranks)"
            )
    # each RL mode's options over its preset (overlong buffer within the completion length, known reward scaling)
    for run, _ in runs_with_origins(config, exp_name):
        if is_rl(config, run.mode):
            try:
                objective_options({"loss": loss_config(config, run), "training": run_training(config, run)})
            except ConfigError as err:
                problems.append(f"modes.{run.mode} in experiments.{exp_name}: {err}")
    return problems


def _mode_key_problems(config: dict) -> list[str]:
    """The RL keys of a mode row do nothing in an SFT row: refused there rather than silently ignored."""
    return [
        f"modes.{name}.{key}: only read by objective grpo or dapo (this row's objective is sft)"
        for name, row in config["modes"].items()
        if row.get("objective", "sft") == "sft"
        for key in RL_MODE_KEYS
        if key in row
    ]


def _template_mismatch_problems(exp_name: str, training: dict, evaluation: dict) -> list[str]:
    """A model evaluated under another prompt format than it was trained on scores low for a reason that is not its
    method, so that takes an explicit `allow_template_mismatch` (upstream's medical and fork evaluations do it)."""
    wanted, trained = evaluation.get("template"), training.get("template")
    if wanted is None or wanted == trained or evaluation.get("allow_template_mismatch", False):
        return []
    return [
        f"experiments.{exp_name}.evaluation.template: {wanted!r} differs from training.template {trained!r}; set "
        f"experiments.{exp_name}.evaluation.allow_template_mismatch: true if that is intended"
    ]


def _run_id_problems(config: dict, exp_name: str) -> list[str]:
    """Two runs with one id would share one results folder: Snakemake would plan one of them and drop the other.

    Ids are compared case-insensitively too, since they are folder names (macOS and Windows ignore case).
    """
    groups: dict[str, dict[str, str]] = defaultdict(dict)  # folded id -> {source: id}
    for run, origin in runs_with_origins(config, exp_name):
        groups[run.run_id.casefold()].setdefault(origin, run.run_id)
    problems: dict[str, None] = {}  # ordered set: one line per clash, not one per model x dataset x seed
    for produced in groups.values():
        if len(produced) < 2:
            continue
        origins = list(produced)
        ids = sorted(set(produced.values()))
        swept = all("kl_weights[" in origin for origin in origins)
        key = f"experiments.{exp_name}.{'kl_weights' if swept else 'modes'}"
        clash = (
            f"the same run id {ids[0]!r}"
            if len(ids) == 1
            else f"run ids {' and '.join(map(repr, ids))}, which differ only in case (one folder where case is ignored)"
        )
        problems[
            f"{key}: {' and '.join(origins)} give {clash}; runs need distinct ids (mode labels are "
            "<mode>-kl<kl_weight:g>): rename a mode or change a KL weight"
        ] = None
    return list(problems)


# transformers' SchedulerType values that need only the learning rate, warmup and step count this config sets.
_PLAIN_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
# SchedulerType values whose extra settings (evaluation during training, lr_scheduler_kwargs) the schema has no
# key for: TrainingArguments or the scheduler itself would raise once the train job has started.
_SCHEDULERS_NEEDING_SETTINGS = {
    "reduce_lr_on_plateau": "an evaluation strategy during training",
    "greedy": "an evaluation strategy during training",
    "cosine_with_min_lr": "lr_scheduler_kwargs (min_lr or min_lr_rate)",
    "cosine_warmup_with_min_lr": "lr_scheduler_kwargs (min_lr or min_lr_rate)",
    "warmup_stable_decay": "lr_scheduler_kwargs (num_decay_steps)",
}

# report_to backend -> the package transformers needs for it; a missing one fails when the trainer is built.
_REPORT_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _scheduler_problems(exp_name: str, training: dict) -> list[str]:
    """An unknown scheduler name would otherwise surface only after the model has loaded on a GPU node."""
    name = training["lr_scheduler_type"]
    key = f"experiments.{exp_name}.training.lr_scheduler_type"
    if name in _PLAIN_SCHEDULERS:  # the common case needs no slow transformers import
        return []
    if name in _SCHEDULERS_NEEDING_SETTINGS:
        return [
            f"{key}: {name!r} needs {_SCHEDULERS_NEEDING_SETTINGS[name]}, which this config cannot set; "
            f"use one of {list(_PLAIN_SCHEDULERS)}"
        ]
    from transformers.trainer_utils import SchedulerType

    known = [scheduler.value for scheduler in SchedulerType]
    if name in known:
        return []
    return [
        f"{key}: {name!r} is not a transformers SchedulerType (known: {known}); use one of {list(_PLAIN_SCHEDULERS)}"
    ]


def _report_to_problems(exp_name: str, training: dict) -> list[str]:
    """A logging backend whose package is missing would fail the train job after the model has loaded."""
    return [
        f"experiments.{exp_name}.training.report_to: {backend!r} needs the {package!r} package, which is not "
        f"installed (install it, or use report_to: [none])"
        for backend in training["report_to"]
        if (package := _REPORT_PACKAGES.get(backend)) and importlib.util.find_spec(package) is None
    ]


def _sampling_problems(config: dict, exp_name: str) -> list[str]:
    """n samples of greedy decoding are n identical copies: an avg@n that costs n times as much and means avg@1."""
    from asft.evaluation.benchmarks import CHOICE_FORMATS  # multiple choice is scored by letter, not sampled

    exp = config["experiments"][exp_name]
    problems = []
    for bench in exp["benchmarks"]:
        entry = config["benchmarks"][bench]
        if entry["format"] in CHOICE_FORMATS:
            continue
        layers = [  # (key prefix, settings), in the order resolve_sampling applies them
            (f"experiments.{exp_name}.evaluation.sampling", exp["evaluation"].get("sampling") or {}),
            (f"benchmarks.{bench}.sampling", entry.get("sampling") or {}),
        ]
        sampling = resolve_sampling(*(layer for _, layer in layers))
        if sampling["n"] > 1 and sampling["temperature"] == 0:
            problems.append(
                f"{_sampling_origin(layers, 'n')}: n = {sampling['n']} with temperature 0 "
                f"(from {_sampling_origin(layers, 'temperature')}) on benchmark {bench!r}: greedy decoding gives "
                f"{sampling['n']} identical copies; set temperature > 0 or n: 1"
            )
    return problems


def _sampling_origin(layers: list[tuple[str, dict]], name: str) -> str:
    """The key a resolved sampling value came from: an explicit setting, else the preset that supplied it."""
    for prefix, layer in reversed(layers):
        if name in layer:
            return f"{prefix}.{name}"
    for prefix, layer in reversed(layers):
        if "preset" in layer:
            return f"{prefix}.preset"
    return "the default greedy preset"


def _local_path_problems(config: dict) -> list[str]:
    """A `path:` source is read by the fetch job; a typo there would fail it only once the workflow runs.

    Checked for the entries some experiment uses; relative paths are read from the working directory, as the
    jobs read them.
    """
    used = {table: set() for table in ("models", "datasets", "benchmarks")}
    for exp in config["experiments"].values():
        for table in used:
            used[table].update(exp[table])
    problems = []
    for table, names in used.items():
        for name in sorted(names & set(config[table])):
            source = config[table][name]["source"]
            sources = [("", source)] if isinstance(source, dict) else [(f"[{i}]", s) for i, s in enumerate(source)]
            for suffix, item in sources:
                if "path" in item:
                    problem = _path_problem(item["path"], model=table == "models")
                    if problem:
                        problems.append(f"{table}.{name}.source{suffix}.path: {item['path']} {problem}")
    return problems


def _path_problem(value: str, model: bool) -> str | None:
    path = Path(value).expanduser()
    where = "" if path.is_absolute() else f" (relative to {os.getcwd()})"
    if not path.exists():
        return f"does not exist{where}"
    if model and not (path / "config.json").is_file():
        return f"is not a model directory (no config.json){where}"
    if not model and not path.is_file():
        return f"is not a file{where}"
    return None


def _optimizer_problems(exp_name: str, training: dict) -> list[str]:
    """An unknown optimizer name would otherwise surface only after the model has loaded on a GPU node."""
    if not training.get("optim"):
        return []
    from transformers.training_args import OptimizerNames  # only when set: importing transformers is slow

    known = [name.value for name in OptimizerNames]
    if training["optim"] in known:
        return []
    return [f"experiments.{exp_name}.training.optim: {training['optim']!r} is not one of {known}"]


def _deepspeed_problems(exp_name: str, training: dict) -> list[str]:
    """The DeepSpeed file must exist and parse before any job starts."""
    path = training.get("deepspeed")
    if not path:
        return []
    key = f"experiments.{exp_name}.training.deepspeed"
    try:
        json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        return [f"{key}: cannot read {path}: {err}"]
    return []


def gradient_accumulation_steps(training: Mapping[str, Any]) -> int:
    """The accumulation steps a run trains with: derived from global_batch_size when that is set.

    Pure, so validation and the train stage resolve the same number. Raises ValueError (naming the numbers, not
    the key: callers prefix it) when global_batch_size does not divide into whole micro-batches per rank or
    disagrees with an explicit gradient_accumulation_steps.
    """
    explicit = training.get("gradient_accumulation_steps")
    global_batch = training.get("global_batch_size")
    if global_batch is None:
        return explicit or 1
    per_device, processes = training["per_device_train_batch_size"], training["num_processes"]
    nodes = training.get("num_nodes", 1)
    ranks = f"num_processes {processes}" + (f" x num_nodes {nodes}" if nodes > 1 else "")
    per_step = per_device * processes * nodes
    if global_batch % per_step:
        raise ValueError(
            f"{global_batch} is not a multiple of per_device_train_batch_size {per_device} x {ranks} = {per_step}"
        )
    derived = global_batch // per_step
    if explicit is not None and explicit != derived:
        raise ValueError(
            f"{global_batch} = per_device_train_batch_size {per_device} x {ranks} x {derived} "
            f"accumulation steps, but gradient_accumulation_steps is {explicit}; set only one of them"
        )
    return derived


def _at_point(point: tuple) -> str:
    return "".join(f" (at sweep {key} = {value!r})" for key, value in point)


def _batch_problems(exp_name: str, training: dict, point: tuple = ()) -> list[str]:
    try:
        gradient_accumulation_steps(training)
    except ValueError as err:
        return [f"experiments.{exp_name}.training.global_batch_size{_at_point(point)}: {err}"]
    return []


def _snapshot_problems(exp_name: str, training: dict, point: tuple = ()) -> list[str]:
    """A snapshot after the last step would never be written; caught here when max_steps fixes the step count
    (otherwise the train stage checks it against the steps the data gives, before the first step)."""
    total = training["max_steps"]
    late = [step for step in training["snapshot_steps"] if 0 < total < step]
    if not late:
        return []
    return [
        f"experiments.{exp_name}.training.snapshot_steps{_at_point(point)}: steps {late} are beyond max_steps {total}"
    ]


def _cached_reference_problems(config: dict, exp_name: str, training: dict, point: tuple = ()) -> list[str]:
    """A cached reference stores samples from p_ref, which estimate the forward KL only: an anchored mode with
    kl_direction reverse needs log p_ref at the policy's own tokens (asft.reference_cache)."""
    if training.get("reference", "live") != "cached":
        return []
    reverse = [
        name
        for name in config["experiments"][exp_name]["modes"]
        if config["modes"].get(name, {}).get("kl_weight", 0) > 0
        and config["modes"].get(name, {}).get("kl_direction", "forward") == "reverse"
    ]
    if not reverse:
        return []
    return [
        f"experiments.{exp_name}.training.reference{_at_point(point)}: cached supports only kl_direction forward, "
        f"but modes {reverse} anchor with kl_direction reverse (modes.<name>.kl_direction); use reference: live"
    ]


def with_reference(raw: dict, reference: str) -> dict:
    """A copy of a raw config with training.reference set in every experiment, except `cached` where a mode
    anchors with reverse KL (which a cache cannot estimate): what-if planning (`asft plan --reference`)."""
    import copy

    raw = copy.deepcopy(raw)
    modes = raw.get("modes") or {}
    for exp in (raw.get("experiments") or {}).values():
        reverse = any((modes.get(name) or {}).get("kl_direction") == "reverse" for name in exp.get("modes") or [])
        if reference == "cached" and reverse:
            continue
        # a new dict: YAML anchors may share one training block between experiments
        exp["training"] = {**(exp.get("training") or {}), "reference": reference}
    return raw
