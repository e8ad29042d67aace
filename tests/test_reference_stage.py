"""The reference stage on the tiny demo model: `asft reference` writes a cache aligned with training's tokens."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from asft.cli import main
from asft.config import iter_runs, train_spec, validate_config
from asft.data import read_instruction_jsonl
from asft.matrix import reference_spec
from asft.reference_cache import open_cache


def _specs(config: dict, mode: str = "sft-lr", **training: object) -> tuple[dict, dict | None]:
    """(the mode's run's train spec, its reference spec as the workflow's reference job gets it)."""
    config = copy.deepcopy(config)
    defaults = {"max_samples": 6, "per_device_train_batch_size": 4, "reference_samples": 4, "loss_chunk_size": 7}
    defaults["reference"] = "cached"  # the stage caches for cached runs; a live run's spec has no reference keys
    config["experiments"]["demo"]["training"].update({**defaults, **training})
    filled = validate_config(config)
    run = next(r for r in iter_runs(filled) if r.mode == mode)
    return train_spec(filled, run), reference_spec(filled, run)


def _spec(config: dict, **training: object) -> dict:
    return _specs(config, **training)[0]


def test_reference_cache_equals_a_live_forward(small_demo: Path, tmp_path: Path, config: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asft.reference_stage import cache_identity, prepared_examples

    model_dir, data = small_demo / "model", small_demo / "data/train.jsonl"
    spec = _spec(config)
    settings = spec["training"]
    out = tmp_path / "ref"
    assert (
        main(
            ["reference", "--model", str(model_dir), "--data", str(data), "--spec", json.dumps(spec)]
            + ["--out", str(out), "--batch-size", "4"]
        )
        == 0
    )
    cache = open_cache(out, cache_identity(model_dir, data, settings))
    assert cache.k == 4 and len(cache.index) == 6

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prepared, _ = prepared_examples(model, tokenizer, data, settings, torch.float32)
    records = read_instruction_jsonl(data)
    for row in prepared:
        stored = cache.example(row["example_id"])
        labels = torch.tensor(row["labels"])
        targets = labels[1:][labels[1:] != -100]
        # The targets are the record's response and EOS, as training's completion-only loss sees them.
        text = tokenizer.decode(targets)
        assert text == records[row["example_id"]]["response"] + tokenizer.eos_token
        assert torch.equal(torch.from_numpy(stored["target_ids"].astype("int64")), targets)
        with torch.no_grad():  # a live, unchunked forward of the reference on this example alone
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1][labels[1:] != -100]
        logp = torch.log_softmax(logits.double(), dim=-1)
        live = logp.gather(-1, targets[:, None]).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        torch.testing.assert_close(torch.from_numpy(stored["target_logp"].copy()).double(), live, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.from_numpy(stored["entropy"].copy()).double(), entropy, atol=1e-4, rtol=0)
        samples = torch.from_numpy(stored["sample_ids"].astype("int64"))
        assert samples.shape == (targets.numel(), 4) and samples.min() >= 0 and samples.max() < logits.shape[-1]


def test_reference_cache_is_refused_for_another_max_length(small_demo: Path, tmp_path: Path, config: dict) -> None:
    import pytest

    from asft.reference_stage import build_reference_cache, cache_identity

    model_dir, data = small_demo / "model", small_demo / "data/train.jsonl"
    spec = _spec(config, max_samples=2)
    summary = build_reference_cache(model_dir, data, spec, tmp_path / "ref")
    assert summary["examples"] == 2 and summary["target_tokens"] > 0
    other = {**spec["training"], "max_length": spec["training"]["max_length"] + 1}
    with pytest.raises(ValueError, match="different max_length"):
        open_cache(tmp_path / "ref", cache_identity(model_dir, data, other))


def test_sft_lr_with_the_cache_trains_as_with_the_live_reference(
    small_demo: Path, tmp_path: Path, config: dict
) -> None:
    from safetensors.torch import load_file

    from asft.layout import TRAIN_LOG
    from asft.reference_stage import build_reference_cache
    from asft.training import train

    model_dir, data = small_demo / "model", small_demo / "data/train.jsonl"
    common = {"max_samples": 8, "max_steps": 2, "logging_steps": 1, "save_steps": 10, "report_to": ["none"]}
    live_spec = _spec(config, reference="live", **common)
    cached_spec, ref_spec = _specs(config, **common)
    assert cached_spec["loss"]["weighting"] == "ref_ratio" and cached_spec["loss"]["kl_weight"] == 0
    # The cache is built from the reference job's spec (model, dataset, REFERENCE_SETTINGS), not the run's.
    assert ref_spec is not None and "learning_rate" not in ref_spec["training"]
    build_reference_cache(model_dir, data, ref_spec, tmp_path / "ref")
    train(model_dir, data, live_spec, tmp_path / "live", tmp_path / "ckpt-live")
    summary = train(
        model_dir, data, cached_spec, tmp_path / "cached", tmp_path / "ckpt-cached", reference_cache=tmp_path / "ref"
    )
    assert summary["global_step"] == 2

    def steps(out: Path) -> list[dict]:
        return [r for r in map(json.loads, (out / TRAIN_LOG).read_text().splitlines()) if "loss" in r]

    live, cached = steps(tmp_path / "live"), steps(tmp_path / "cached")
    assert len(live) == len(cached) == 2
    assert cached[-1]["weight_mean"] != 1.0  # the policy has moved off the reference: the ratio weights bite
    for a, b in zip(live, cached, strict=True):
        for key in (
            "loss",
            "ce",
            "weight_mean",
            "grad_norm",
            "target_tokens",
        ):  # float32: the chunked kernel vs full logits, same math
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
    live_w = load_file(tmp_path / "live/adapter_model.safetensors")
    cached_w = load_file(tmp_path / "cached/adapter_model.safetensors")
    assert live_w.keys() == cached_w.keys()
    for name in live_w:
        torch.testing.assert_close(cached_w[name], live_w[name], atol=1e-5, rtol=1e-4)


def test_a_cached_run_needs_its_own_cache(small_demo: Path, tmp_path: Path, config: dict) -> None:
    import pytest

    from asft.config import ConfigError
    from asft.reference_stage import build_reference_cache
    from asft.training import train

    model_dir, data = small_demo / "model", small_demo / "data/train.jsonl"
    spec = _spec(config, max_samples=2, max_steps=1, report_to=["none"])
    with pytest.raises(ConfigError, match="no reference cache was given"):
        train(model_dir, data, spec, tmp_path / "out", tmp_path / "ckpt")
    build_reference_cache(model_dir, data, _spec(config, max_samples=3), tmp_path / "ref")
    with pytest.raises(ConfigError, match="different max_samples"):
        train(model_dir, data, spec, tmp_path / "out", tmp_path / "ckpt", reference_cache=tmp_path / "ref")


def test_a_live_spec_has_no_reference_keys_and_a_cached_one_has_both(config: dict) -> None:
    """Live runs' specs (Snakemake params, checkpoint fingerprints) stay as before the keys existed."""
    live, cached = _spec(config, reference="live"), _spec(config)
    assert "reference" not in live["training"] and "reference_samples" not in live["training"]
    assert cached["training"]["reference"] == "cached" and cached["training"]["reference_samples"] == 4
    assert _spec(config, reference="live", reference_samples=9) == live  # nothing a live run does not read
    assert {k: v for k, v in cached["training"].items() if not k.startswith("reference")} == live["training"]


def test_the_reference_stage_refuses_a_live_spec(small_demo: Path, tmp_path: Path, config: dict) -> None:
    import pytest

    from asft.config import ConfigError
    from asft.reference_stage import build_reference_cache

    model_dir, data = small_demo / "model", small_demo / "data/train.jsonl"
    with pytest.raises(ConfigError, match="training.reference: cached"):
        build_reference_cache(model_dir, data, _spec(config, reference="live"), tmp_path / "ref")
    assert not (tmp_path / "ref").exists()


@pytest.mark.slow
def test_cached_asft_on_two_zero3_ranks_equals_one_process(
    small_demo: Path, tmp_path: Path, config: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Full fine-tuning of asft with a cached reference under ZeRO-3 on 2 CPU ranks (each accumulating 2 micro-
    batches) gives the update of one process accumulating the same 4: every rank reads its own examples' rows
    by id, and the cache's samples are fixed, so both agree to float32 rounding. No reference copy is loaded."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    import asft.training
    from asft.reference_stage import build_reference_cache
    from asft.training import train

    model_dir, data = small_demo / "model", small_demo / "data/train.jsonl"
    common = dict(max_samples=16, max_steps=2, per_device_train_batch_size=2, optim="sgd", learning_rate=0.05)
    common |= dict(lr_scheduler_type="constant", finetune="full", logging_steps=1, kl_log_every=1, save_steps=10)
    common |= dict(report_to=["none"], gradient_checkpointing=True)
    single_spec, ref_spec = _specs(config, "asft", gradient_accumulation_steps=4, **common)
    zero3 = str(Path(__file__).resolve().parents[1] / "config" / "deepspeed" / "zero3.json")
    ranks_spec, _ = _specs(config, "asft", gradient_accumulation_steps=2, num_processes=2, deepspeed=zero3, **common)
    build_reference_cache(model_dir, data, ref_spec, tmp_path / "ref")

    loads = []
    real_load = asft.training._load

    def recording_load(*args: object, **kwargs: object) -> object:
        loads.append(kwargs.get("with_reference", args[3] if len(args) > 3 else None))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(asft.training, "_load", recording_load)
    train(model_dir, data, single_spec, tmp_path / "single", tmp_path / "c1", reference_cache=tmp_path / "ref")
    assert loads == [False]  # asft needs the reference, and it is read from the cache: no frozen copy

    command = [sys.executable, "-m", "asft.cli", "train", "--model", str(model_dir), "--data", str(data)]
    command += ["--spec", json.dumps(ranks_spec), "--out", str(tmp_path / "ranks"), "--checkpoints"]
    command += [str(tmp_path / "c2"), "--reference", str(tmp_path / "ref")]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"} | {"DS_ACCELERATOR": "cpu"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "ranks" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 3
    expected, actual = load_file(tmp_path / "single/model.safetensors"), load_file(tmp_path / "ranks/model.safetensors")
    start = load_file(model_dir / "model.safetensors")
    assert any(not torch.equal(expected[name], start[name]) for name in expected if name in start)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    logs = [
        [json.loads(line) for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
        for run in ("single", "ranks")
    ]
    for a, b in zip(*logs, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["kl"] == pytest.approx(a["kl"], rel=1e-3, abs=1e-6)
