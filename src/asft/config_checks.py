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
from asft.matrix import resolve_sampling, runs_with_origins


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
        if "kl_weights" in exp and not any(config["modes"].get(m, {}).get("kl_weight", 0) > 0 for m in exp["modes"]):
            problems.append(
                f"experiments.{exp_name}.kl_weights: set, but none of the experiment's modes has a KL anchor "
                "(kl_weight > 0)"
            )
        problems += _deepspeed_problems(exp_name, exp["training"])
        problems += _optimizer_problems(exp_name, exp["training"])
        problems += _scheduler_problems(exp_name, exp["training"])
        problems += _report_to_problems(exp_name, exp["training"])
        if exp["evaluation"]["lora_direct"] and exp["training"]["finetune"] != "lora":
            problems.append(
                f"experiments.{exp_name}.evaluation.lora_direct: needs training.finetune: lora "
                f"(got {exp['training']['finetune']!r}; a full fine-tune has no adapter)"
            )
        if all_known:  # these expand the matrix, which needs every name defined
            problems += _run_id_problems(config, exp_name)
            problems += _sampling_problems(config, exp_name)
    problems += _local_path_problems(config)
    problems = list(dict.fromkeys(problems))  # a benchmark's own setting is reported once, not per experiment
    if problems:
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(problems))


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
