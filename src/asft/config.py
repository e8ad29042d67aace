"""Config validation and the run matrix.

The Snakefile and the CLI share this module so that a config is checked once, the same way, before any job is
planned, and so that run ids, paths and per-job specs are plain functions testable without Snakemake.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

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
    errors = sorted(_Validator(load_schema()).iter_errors(filled), key=lambda e: list(e.absolute_path))
    if errors:
        lines = "\n  ".join(_describe(e) for e in errors)
        raise ConfigError(f"{source}: invalid configuration:\n  {lines}")
    _check_references(filled, source)
    return filled


def _check_references(config: dict, source: str) -> None:
    problems = []
    for exp_name, exp in config["experiments"].items():
        for axis, table in (
            ("models", "models"),
            ("datasets", "datasets"),
            ("modes", "modes"),
            ("benchmarks", "benchmarks"),
        ):
            for index, name in enumerate(exp[axis]):
                if name not in config[table]:
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
        if exp["evaluation"]["lora_direct"] and exp["training"]["finetune"] != "lora":
            problems.append(
                f"experiments.{exp_name}.evaluation.lora_direct: needs training.finetune: lora "
                f"(got {exp['training']['finetune']!r}; a full fine-tune has no adapter)"
            )
    if problems:
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(problems))


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
    """Read a YAML config file and validate it."""
    path = Path(path)
    try:
        with path.open() as handle:
            raw = yaml.safe_load(handle)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return validate_config(raw, source=str(path))


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
        return f"{self.model}/{self.dataset}/{self.mode_label}/seed{self.seed}"

    @property
    def run_dir(self) -> str:
        return f"results/{self.experiment}/runs/{self.run_id}"


def mode_label(mode: str, kl_weight: float) -> str:
    """`asft-kl0.05` for anchored modes, the bare mode name otherwise: stable and readable."""
    return f"{mode}-kl{kl_weight:g}" if kl_weight > 0 else mode


def iter_runs(config: Mapping[str, Any], experiment: str | None = None) -> Iterator[Run]:
    """Expand experiments into runs; `kl_weights` sweeps only modes that have a KL anchor."""
    for exp_name, exp in config["experiments"].items():
        if experiment is not None and exp_name != experiment:
            continue
        for model in exp["models"]:
            for dataset in exp["datasets"]:
                for mode in exp["modes"]:
                    own_kl = float(config["modes"][mode].get("kl_weight", 0.0))
                    kls = [float(k) for k in exp["kl_weights"]] if own_kl > 0 and "kl_weights" in exp else [own_kl]
                    for kl in kls:
                        for seed in exp["seeds"]:
                            yield Run(exp_name, model, dataset, mode, kl, int(seed))


def find_run(config: Mapping[str, Any], experiment: str, run_id: str) -> Run:
    """The run whose id is `run_id` (as it appears in paths/wildcards)."""
    for run in iter_runs(config, experiment):
        if run.run_id == run_id:
            return run
    raise ConfigError(f"experiments.{experiment}: no run with id {run_id!r}")


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


def source_list(entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    """An entry's sources as a list: benchmarks may concatenate several (one per MMLU subject, say)."""
    source = entry["source"]
    return list(source) if isinstance(source, list) else [source]


def canonical_json(value: Any) -> str:
    """Sorted, compact JSON: the params value Snakemake compares to decide whether a job is stale."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
