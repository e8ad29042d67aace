"""Shared fixtures: the repository paths and one small demo build reused by every model-level test."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCHMARKS = REPO.parent / "shared" / "data" / "benchmarks"

# Small but real: enough for the model to load, generate and fine-tune within seconds.
SMALL_DEMO = {"seed": 0, "n_train": 64, "n_test": 8, "n_pretrain": 256, "pretrain_steps": 20}

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def demo_config() -> dict:
    with (REPO / "config" / "config.yaml").open() as handle:
        return yaml.safe_load(handle)


@pytest.fixture
def config(demo_config: dict) -> dict:
    """A fresh, mutable copy of the default (demo) config."""
    return copy.deepcopy(demo_config)


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo build: model/, data/train.jsonl, benchmarks/arith.jsonl."""
    from asft.demo import build_demo

    out = tmp_path_factory.mktemp("demo")
    build_demo(out, **SMALL_DEMO)
    return out
