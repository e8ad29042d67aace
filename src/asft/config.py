"""Config validation and the run matrix.

The Snakefile and the CLI share this module so that a config is checked once, the same way, before any job is
planned, and so that run ids, paths and per-job specs are plain functions testable without Snakemake.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from asft import layout

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")

SAMPLING_PRESETS: dict[str, dict[str, Any]] = {
    # Greedy decoding, one sample: cheap and deterministic (the fork's protocol).
    "greedy": {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 1024, "seed": 0},
    # The paper's protocol: avg@16 at temperature 1.0 with up to 4096 new tokens.
    "paper": {"n": 16, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 4096, "seed": 0},
}


class ConfigError(ValueError):
    """A config problem, reported with the file and the dotted key that is wrong."""


def _extend_with_defaults(validator_class: type) -> type:
    """A validator that fills `default` values while it validates (the jsonschema FAQ recipe)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # noqa: ANN001, ANN202
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _extend_with_defaults(jsonschema.Draft202012Validator)


def _key_path(path: Any) -> str:
    parts = []
    for part in path:
        parts.append(f"[{part}]" if isinstance(part, int) else f".{part}")
    return "".join(parts).lstrip(".") or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    """One readable line for a schema error, descending into oneOf so the real cause is named."""
    if error.validator == "oneOf" and "source" in str(error.absolute_path):
        if isinstance(error.instance, list):  # a benchmark's list of sources: name the first bad item
            item_errors = [e for e in error.context if e.relative_schema_path[0] == 1 and len(e.absolute_path) > 2]
            if item_errors:
                return _describe(min(item_errors, key=lambda e: list(e.absolute_path)))
        elif isinstance(error.instance, dict):
            keys = sorted(k for k in ("hub", "url", "path", "demo") if k in error.instance)
            return (
                f"{_key_path(error.absolute_path)}: a source needs exactly one of hub (+revision), url (+sha256), "
                f"path or demo; got {keys or 'none'}"
            )
    return f"{_key_path(error.absolute_path)}: {error.message}"


def load_schema() -> dict:
    with SCHEMA_PATH.open() as handle:
        return yaml.safe_load(handle)


def validate_config(config: Mapping[str, Any], source: str = "config") -> dict:
    """Validate against the schema, fill defaults and check cross references; returns a new dict.

    Raises ConfigError naming `source` (the config file) and the offending key.
    """
    filled = copy.deepcopy(dict(config))
    problems = [(list(e.absolute_path), _describe(e)) for e in _Validator(load_schema()).iter_errors(filled)]
    # NaN passes every minimum/maximum (all comparisons are false) and inf passes most: refuse both by name.
    problems += [(path, f"{_key_path(path)}: {value!r} is not a finite number") for path, value in _non_finite(config)]
    if problems:
        lines = "\n  ".join(line for _, line in sorted(problems, key=lambda p: _sort_key(p[0])))
        raise ConfigError(f"{source}: invalid configuration:\n  {lines}")
    _check_references(filled, source)
    return filled


def _sort_key(path: Iterable[Any]) -> list[tuple[bool, Any]]:
    """Orders key paths that mix list indices and mapping keys without comparing an int to a str."""
    return [(isinstance(part, int), part if isinstance(part, int) else str(part)) for part in path]


def _non_finite(value: Any, path: tuple = ()) -> Iterator[tuple[list, float]]:
    """Every NaN or infinite float in a parsed config, with its key path."""
    if isinstance(value, float) and not math.isfinite(value):
        yield list(path), value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _non_finite(item, (*path, key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _non_finite(item, (*path, index))


def _check_references(config: dict, source: str) -> None:
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
    for run, origin in _runs_with_origins(config, exp_name):
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


def load_config(path: str | Path) -> dict:
    """Read a YAML (or JSON) config file, refusing repeated keys, and validate it."""
    raw = read_config_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return validate_config(raw, source=str(path))


def check_config_files(paths: Iterable[str | Path]) -> None:
    """Re-read config files with the strict loader: Snakemake's own loader keeps the last of repeated keys."""
    for path in paths:
        read_config_file(path)


def read_config_file(path: str | Path) -> Any:
    """Parse a config file as Snakemake does (JSON first, then YAML), but refuse a key repeated in one mapping.

    Raises ConfigError naming the file, the key path and (for YAML) the lines of both occurrences.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err}") from err
    try:
        return _read_json(text, path)
    except json.JSONDecodeError:
        pass
    loader = _StrictLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except _DuplicateKeys as err:
        raise ConfigError(f"{path}: invalid configuration:\n  " + "\n  ".join(err.problems)) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    finally:
        loader.dispose()


def _read_json(text: str, path: Path) -> Any:
    repeated: list[tuple[dict, str]] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict:
        obj: dict = {}
        for key, value in pairs:
            if key in obj:
                repeated.append((obj, key))
            obj[key] = value
        return obj

    data = json.loads(text, object_pairs_hook=pairs_hook)
    if repeated:
        paths = {id(obj): keys for keys, obj in _mappings(data)}
        problems = [f"{_key_path([*paths[id(obj)], key])}: duplicate key" for obj, key in repeated]
        raise ConfigError(f"{path}: invalid configuration:\n  " + "\n  ".join(problems))
    return data


def _mappings(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, dict]]:
    """Every mapping in a parsed document, with its key path."""
    if isinstance(value, dict):
        yield path, value
        for key, item in value.items():
            yield from _mappings(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _mappings(item, (*path, index))


class _DuplicateKeys(yaml.YAMLError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping: PyYAML silently keeps the last value, so a mode row
    written twice would lose the first without a word.

    Checked on the node tree before anything is constructed, where each mapping still has only its own keys
    (merge keys `<<:` are expanded later, and may legitimately be overridden).
    """

    def construct_document(self, node: yaml.Node) -> Any:
        problems: list[str] = []
        self._find_duplicates(node, (), set(), problems)
        if problems:
            raise _DuplicateKeys(problems)
        return super().construct_document(node)

    def _find_duplicates(self, node: yaml.Node, path: tuple, seen: set[int], problems: list[str]) -> None:
        if id(node) in seen:  # an alias of a node already checked (or a recursive one)
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._find_duplicates(item, (*path, index), seen, problems)
        elif isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    self._find_duplicates(value_node, path, seen, problems)
                    continue
                if not isinstance(key_node, yaml.ScalarNode):  # a collection as a key: the constructor refuses it
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    problems.append(
                        f"{_key_path([*path, key])}: duplicate key on line {line} (first on line "
                        f"{first_line[key]}; YAML would keep only the last)"
                    )
                else:
                    first_line[key] = line
                self._find_duplicates(value_node, (*path, key), seen, problems)


@dataclass(frozen=True, order=True)
class Run:
    """One training run of the matrix; its id doubles as its results path."""

    experiment: str
    model: str
    dataset: str
    mode: str
    kl_weight: float
    seed: int

    @property
    def mode_label(self) -> str:
        return mode_label(self.mode, self.kl_weight)

    @property
    def run_id(self) -> str:
        return layout.run_id(self.model, self.dataset, self.mode_label, self.seed)

    @property
    def run_dir(self) -> str:
        return layout.run_dir(self.experiment, self.run_id)


def mode_label(mode: str, kl_weight: float) -> str:
    """`asft-kl0.05` for anchored modes, the bare mode name otherwise: stable and readable."""
    return f"{mode}-kl{kl_weight:g}" if kl_weight > 0 else mode


def iter_runs(config: Mapping[str, Any], experiment: str | None = None) -> Iterator[Run]:
    """Expand experiments into runs; `kl_weights` sweeps only modes that have a KL anchor."""
    for exp_name in config["experiments"]:
        if experiment is None or exp_name == experiment:
            for run, _ in _runs_with_origins(config, exp_name):
                yield run


def _runs_with_origins(config: Mapping[str, Any], exp_name: str) -> Iterator[tuple[Run, str]]:
    """One experiment's runs, each with the config entries that produced its mode label (for error messages)."""
    exp = config["experiments"][exp_name]
    for model in exp["models"]:
        for dataset in exp["datasets"]:
            for mode_index, mode in enumerate(exp["modes"]):
                own_kl = float(config["modes"][mode].get("kl_weight", 0.0))
                if own_kl > 0 and "kl_weights" in exp:
                    kls = [
                        (float(kl), f"modes[{mode_index}] {mode!r} with kl_weights[{i}] = {kl!r}")
                        for i, kl in enumerate(exp["kl_weights"])
                    ]
                else:
                    kls = [(own_kl, f"modes[{mode_index}] {mode!r}" + (f" (kl_weight {own_kl!r})" if own_kl else ""))]
                for kl, origin in kls:
                    for seed in exp["seeds"]:
                        yield Run(exp_name, model, dataset, mode, kl, int(seed)), origin


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
        "seed": run.seed,
    }


def base_identity(experiment: str, model: str) -> dict[str, Any]:
    """`run_identity` for the untuned model, labelled `base` in the tables."""
    return {"experiment": experiment, "model": model, "mode_label": "base"}


def loss_config(config: Mapping[str, Any], run: Run) -> dict:
    """The mode row with the run's (possibly swept) KL weight."""
    row = dict(config["modes"][run.mode])
    row["kl_weight"] = run.kl_weight
    return row


def train_spec(config: Mapping[str, Any], run: Run) -> dict:
    """Everything that determines a training run's result, and nothing else (no benchmarks, no eval settings)."""
    exp = config["experiments"][run.experiment]
    return {
        "run_id": run.run_id,
        "mode": run.mode,
        "loss": loss_config(config, run),
        "seed": run.seed,
        "training": exp["training"],
        "dataset": {k: v for k, v in config["datasets"][run.dataset].items() if k != "source"},
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
    }


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
