"""The config schema against the code it configures: one source of truth for the loss modes, every key described."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import asft
from asft.losses import ANCHORS, WEIGHTINGS, LossSpec
from asft.matrix import RL_MODE_KEYS

SCHEMA_PATH = Path(asft.__file__).with_name("config.schema.yaml")
MODE_FIELDS = [field.name for field in dataclasses.fields(LossSpec)]


@pytest.fixture(scope="module")
def schema() -> dict:
    with SCHEMA_PATH.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


@pytest.fixture(scope="module")
def mode_schema(schema: dict) -> dict:
    return schema["$defs"]["mode"]


def test_mode_enums_are_the_registries(mode_schema: dict) -> None:
    """A weighting or anchor added to asft.losses must be offered by the schema, and nothing else may be."""
    properties = mode_schema["properties"]
    assert sorted(properties["weighting"]["enum"]) == sorted(WEIGHTINGS)
    assert sorted(properties["kl_direction"]["enum"]) == sorted(ANCHORS)


def test_mode_keys_and_defaults_are_lossspecs(mode_schema: dict) -> None:
    """The schema fills defaults before LossSpec sees a row, so they must be LossSpec's own."""
    properties = mode_schema["properties"]
    # the RL keys are asft.rl's (objective grpo/dapo), not LossSpec's
    assert sorted(set(properties) - {"objective", *RL_MODE_KEYS}) == sorted(MODE_FIELDS)
    assert mode_schema["else"]["required"] == ["weighting"] and mode_schema["additionalProperties"] is False
    for field in dataclasses.fields(LossSpec):
        if field.name == "weighting":  # required: a default would hide a forgotten weighting
            assert "default" not in properties[field.name]
            continue
        default = properties[field.name]["default"]
        assert default == field.default and type(default) is type(field.default), field.name


# Values around every bound LossSpec checks; the schema must accept exactly the same ones.
PROBES: dict[str, list[Any]] = {
    "kl_weight": [-1.0, -1e-9, 0, 0.0, 0.05, 1, 7.5],
    "keep_ratio": [-0.1, 0.0, 1e-9, 0.5, 1, 1.0, 1.0000001, 2],
    "clip_mult": [-1.0, 0, 0.0, 1e-9, 3, 100.0],
    "alpha": [-0.5, -1e-9, 0, 0.0, 1, 5.0],
    "iw_temp": [-1.0, -1e-9, 0, 0.0, 1, 2.5],
    "iw_clip": [-1.0, 0, 0.0, 1e-9, 16, 16.0],
    "kl_direction": ["forward", "reverse", "sideways", ""],
    "weighting": ["none", "dft", "topk", "antiop", "ref_ratio", "iw_sft", "focal", "DFT"],
}


def _accepted_by_lossspec(row: dict) -> bool:
    try:
        LossSpec.from_config(row)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(("key", "value"), [(key, value) for key, values in PROBES.items() for value in values])
def test_mode_constraints_agree_with_lossspec(schema: dict, key: str, value: Any) -> None:
    row = {"weighting": "none", key: value}
    validator = jsonschema.Draft202012Validator({"$defs": schema["$defs"], "$ref": "#/$defs/mode"})
    assert validator.is_valid(row) == _accepted_by_lossspec(row), row


def _described(node: Any, path: str = "") -> Iterator[tuple[str, bool]]:
    """(path, has a description) for every property, $defs entry and per-entry (additionalProperties) schema."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            yield from _described(item, f"{path}[{index}]")
        return
    if not isinstance(node, dict):
        return
    for group, prefix in (("properties", ""), ("$defs", "$defs.")):
        for name, sub in node.get(group, {}).items():
            yield f"{path}.{prefix}{name}", isinstance(sub, dict) and bool(sub.get("description"))
    if isinstance(node.get("additionalProperties"), dict):
        sub = node["additionalProperties"]
        yield f"{path}.*", "$ref" in sub or bool(sub.get("description"))  # a bare $ref uses the target's
    for key, value in node.items():
        if key in ("properties", "$defs"):
            for name, sub in value.items():
                yield from _described(sub, f"{path}.{'$defs.' if key == '$defs' else ''}{name}")
        else:
            yield from _described(value, f"{path}.*" if key == "additionalProperties" else f"{path}.{key}")


def test_every_key_is_described(schema: dict) -> None:
    """A key's meaning, unit and why it matters are in the schema itself, next to its type and default."""
    assert schema.get("description")
    entries = list(_described(schema))
    assert len(entries) > 100  # the walk reaches the nested keys
    assert [path for path, described in entries if not described] == []
