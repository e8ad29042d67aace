"""Config validation: the JSON schema (defaults filled), then the checks of asft.config_checks.

The Snakefile and the CLI share this module so that a config is checked once, the same way, before any job is
planned. The run matrix and the job specs live in asft.matrix, the strict file reader in asft.config_files; their
names are re-exported here, where the Snakefile, the CLI and notebooks import them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from asft.config_checks import check_references, non_finite
from asft.config_files import ConfigError, check_config_files, key_path, read_config_file
from asft.matrix import (
    SAMPLING_PRESETS,
    Run,
    RunsById,
    base_identity,
    canonical_json,
    eval_spec,
    find_run,
    iter_runs,
    loss_config,
    merge_spec,
    mode_label,
    resolve_sampling,
    run_by_id,
    run_identity,
    runs_by_id,
    source_list,
    train_spec,
)

__all__ = [
    "SAMPLING_PRESETS",
    "SCHEMA_PATH",
    "ConfigError",
    "Run",
    "RunsById",
    "base_identity",
    "canonical_json",
    "check_config_files",
    "eval_spec",
    "find_run",
    "iter_runs",
    "load_config",
    "load_schema",
    "loss_config",
    "merge_spec",
    "mode_label",
    "read_config_file",
    "resolve_sampling",
    "run_by_id",
    "run_identity",
    "runs_by_id",
    "source_list",
    "train_spec",
    "validate_config",
]

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


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
                f"{key_path(error.absolute_path)}: a source needs exactly one of hub (+revision), url (+sha256), "
                f"path or demo; got {keys or 'none'}"
            )
    return f"{key_path(error.absolute_path)}: {error.message}"


def load_schema() -> dict:
    with SCHEMA_PATH.open() as handle:
        return yaml.safe_load(handle)


def validate_config(config: Mapping[str, Any], source: str = "config") -> dict:
    """Validate against the schema, fill defaults and check cross references; returns a new dict.

    Raises ConfigError naming `source` (the config file) and the offending key.
    """
    filled = copy.deepcopy(dict(config))
    schema = load_schema()
    problems = [(list(e.absolute_path), _describe(e)) for e in _Validator(schema).iter_errors(filled)]
    # NaN passes every minimum/maximum (all comparisons are false) and inf passes most: refuse both by name.
    problems += [(path, f"{key_path(path)}: {value!r} is not a finite number") for path, value in non_finite(config)]
    if not problems:
        problems += _sweep_problems(filled, schema)
    if problems:
        lines = "\n  ".join(line for _, line in sorted(problems, key=lambda p: _sort_key(p[0])))
        raise ConfigError(f"{source}: invalid configuration:\n  {lines}")
    check_references(filled, source)
    if filled["catalogue"] == "paper":
        from asft.paper.targets import check_catalogue  # pandas: only for configs that promise the tables

        check_catalogue(filled, source)
    if filled["scale"] != "full":
        from asft.scale import apply_scale

        filled = apply_scale(filled)
        check_references(filled, f"{source} at scale {filled['scale']}")
    return filled


def _sweep_problems(config: dict, schema: dict) -> list[tuple[list, str]]:
    """Each swept value must be one the training key itself accepts: checked here, before any run is planned,
    rather than when the run with that value starts."""
    training_keys = schema["$defs"]["training"]["properties"]
    problems = []
    for exp_name, exp in config["experiments"].items():
        for key, values in (exp.get("sweep") or {}).items():
            path = ["experiments", exp_name, "sweep", key]
            if key not in training_keys:
                problems.append((path, f"{key_path(path)}: not a training key; known: {sorted(training_keys)}"))
                continue
            validator = jsonschema.Draft202012Validator(training_keys[key])
            for index, value in enumerate(values):
                for error in validator.iter_errors(value):
                    problems.append((path + [index], f"{key_path(path + [index])}: {error.message}"))
    return problems


def _sort_key(path: Iterable[Any]) -> list[tuple[bool, Any]]:
    """Orders key paths that mix list indices and mapping keys without comparing an int to a str."""
    return [(isinstance(part, int), part if isinstance(part, int) else str(part)) for part in path]


def load_config(path: str | Path) -> dict:
    """Read a YAML (or JSON) config file, refusing repeated keys, and validate it."""
    raw = read_config_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return validate_config(raw, source=str(path))
