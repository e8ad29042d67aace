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


def make_random_adapter(base_dir: Path, out: Path, rank: int, std: float) -> Path:
    """A LoRA adapter (all linear layers) with non-zero B, so it really changes the model's outputs; saved with
    the base tokenizer, as a training run saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=std)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo build: model/, data/train.jsonl, benchmarks/arith.jsonl."""
    from asft.demo import build_demo

    out = tmp_path_factory.mktemp("demo")
    build_demo(out, **SMALL_DEMO)
    return out
