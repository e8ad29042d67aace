"""What a train job measures and keeps besides its final weights: the resources of paper Table 4 in its summary,
snapshots at chosen steps (paper Figure 1), and the accumulation derived from a global batch size."""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path

import pytest
import torch

from asft.checkpoints import SNAPSHOTS_DIR, checkpoint_step, resumable_checkpoint, snapshot_path
from asft.config import ConfigError, validate_config
from asft.config_checks import gradient_accumulation_steps
from asft.layout import TRAIN_SUMMARY as SUMMARY
from asft.stack_versions import stack_versions
from asft.training import train
from tests.test_training import _interrupted, _spec


def _train(small_demo: Path, spec: dict, out: Path, checkpoints: Path) -> dict:
    summary = train(small_demo / "model", small_demo / "data/train.jsonl", spec, out, checkpoints)
    assert json.loads((out / SUMMARY).read_text()) == summary
    return summary


def test_the_summary_records_time_hardware_and_memory(small_demo: Path, tmp_path: Path, config: dict) -> None:
    """One CPU process: wall and trainer time, "cpu" x 1, GPU peaks null (nothing to measure, not zero), host RSS."""
    summary = _train(small_demo, _spec(config, "sft"), tmp_path / "out", tmp_path / "ckpt")
    assert summary["wall_seconds"] >= summary["train_seconds"] > 0
    assert summary["stack"] == stack_versions() and summary["stack"]["torch"] == metadata.version("torch")
    assert 0 < summary["train_runtime_seconds"] <= summary["wall_seconds"]
    assert summary["timing_scope"] == "whole_run" and summary["resumed_from_step"] is None
    assert summary["accelerator"] == "cpu" and summary["accelerator_count"] == 1
    assert summary["gpu_peak_allocated_gb"] is None and summary["gpu_peak_reserved_gb"] is None
    [rss] = summary["host_peak_rss_gb"]
    assert isinstance(rss, float) and 0.05 < rss < 128  # a Python process with torch loaded, in GB
    assert summary["gradient_accumulation_steps"] == 1 and summary["global_batch_size"] == 4
    assert summary["snapshot_steps"] == []


def test_a_resumed_run_says_its_times_cover_the_last_attempt(small_demo: Path, tmp_path: Path, config: dict) -> None:
    spec, checkpoints = _spec(config, "sft", max_steps=3), tmp_path / "ckpt"
    _interrupted(small_demo, spec, tmp_path / "out", checkpoints)
    summary = _train(small_demo, spec, tmp_path / "out", checkpoints)
    assert summary["timing_scope"] == "last_attempt" and summary["resumed_from_step"] == 2


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (path / "adapter_config.json").exists() else "model.safetensors"
    return load_file(path / name)


def _differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys()
    return any(not torch.equal(a[name], b[name]) for name in a)


def test_lora_snapshots_load_like_the_final_adapter(small_demo: Path, tmp_path: Path, config: dict) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = _spec(config, "sft", max_steps=4, snapshot_steps=[3, 1], learning_rate=1e-2)
    out, checkpoints = tmp_path / "out", tmp_path / "ckpt"
    summary = _train(small_demo, spec, out, checkpoints)
    assert summary["snapshot_steps"] == [1, 3]
    assert sorted(p.name for p in (out / SNAPSHOTS_DIR).iterdir()) == ["step-1", "step-3"]
    first, third, final = _weights(out / "snapshots/step-1"), _weights(out / "snapshots/step-3"), _weights(out)
    assert _differ(first, third) and _differ(third, final)
    for step in (1, 3):
        snapshot = out / SNAPSHOTS_DIR / f"step-{step}"
        assert not list(snapshot.glob("asft_*")), "no bookkeeping files in a published snapshot"
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(small_demo / "model"), snapshot)
    assert not (checkpoints / SNAPSHOTS_DIR).exists()  # moved into the output, nothing left to resume


def test_full_finetune_snapshots_are_whole_models(small_demo: Path, tmp_path: Path, config: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = _spec(config, "sft", finetune="full", max_steps=2, snapshot_steps=[1], learning_rate=1e-3)
    out = tmp_path / "out"
    _train(small_demo, spec, out, tmp_path / "ckpt")
    snapshot = out / SNAPSHOTS_DIR / "step-1"
    assert _differ(_weights(snapshot), _weights(out))
    AutoModelForCausalLM.from_pretrained(snapshot)
    AutoTokenizer.from_pretrained(snapshot)


def test_a_resumed_run_keeps_its_earlier_snapshots(small_demo: Path, tmp_path: Path, config: dict) -> None:
    """Killed after checkpoint-2: the snapshot of step 1 (never redone) survives in the checkpoint folder, the one
    of step 3 is made by the resumed job, and both equal those of an uninterrupted run."""
    spec = _spec(config, "sft", max_steps=4, snapshot_steps=[1, 3], learning_rate=1e-2)
    out, checkpoints = tmp_path / "out", tmp_path / "ckpt"
    _interrupted(small_demo, spec, out, checkpoints)
    assert snapshot_path(checkpoints, 1).is_dir() and not snapshot_path(checkpoints, 3).exists()
    summary = _train(small_demo, spec, out, checkpoints)
    assert summary["resumed_from_step"] == 2 and summary["snapshot_steps"] == [1, 3]
    _train(small_demo, spec, tmp_path / "straight", tmp_path / "ckpt-straight")
    for step in (1, 3):
        resumed, straight = (_weights(d / SNAPSHOTS_DIR / f"step-{step}") for d in (out, tmp_path / "straight"))
        for name in straight:
            torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_checkpoint_without_its_earlier_snapshot_is_not_resumed(
    small_demo: Path, tmp_path: Path, config: dict
) -> None:
    """A snapshot lost after its step was checkpointed cannot be made again by resuming: the job starts fresh."""
    spec = _spec(config, "sft", max_steps=3, snapshot_steps=[1])
    out, checkpoints = tmp_path / "out", tmp_path / "ckpt"
    _interrupted(small_demo, spec, out, checkpoints)
    fingerprint = json.loads((checkpoints / "checkpoint-2" / "asft_fingerprint.json").read_text())["fingerprint"]
    assert checkpoint_step(resumable_checkpoint(checkpoints, fingerprint, [1])) == 2
    shutil.rmtree(snapshot_path(checkpoints, 1))
    assert resumable_checkpoint(checkpoints, fingerprint, [1]) is None
    summary = _train(small_demo, spec, out, checkpoints)
    assert summary["resumed_from_step"] is None and summary["snapshot_steps"] == [1]


def test_a_snapshot_beyond_the_last_step_is_refused(small_demo: Path, tmp_path: Path, config: dict) -> None:
    with pytest.raises(ConfigError, match=r"experiments\.demo\.training\.snapshot_steps: steps \[5\] are beyond"):
        _spec(config, "sft", max_steps=4, snapshot_steps=[2, 5])
    # With the step count from epochs, the train job refuses it before the first step: 64 examples / 16 = 4.
    spec = _spec(config, "sft", max_steps=-1, num_train_epochs=1, per_device_train_batch_size=16)
    spec["training"]["snapshot_steps"] = [4, 9]
    with pytest.raises(ConfigError, match=r"training\.snapshot_steps: steps \[9\] are beyond this run's 4 optimizer"):
        train(small_demo / "model", small_demo / "data/train.jsonl", spec, tmp_path / "out", tmp_path / "ckpt")
    assert not (tmp_path / "out").exists() and not list((tmp_path / "ckpt").glob("checkpoint-*"))


def test_global_batch_size_derives_the_accumulation() -> None:
    def settings(**kw: object) -> dict:
        base = {"per_device_train_batch_size": 4, "num_processes": 2}
        return {"gradient_accumulation_steps": None, "global_batch_size": None, **base, **kw}

    assert gradient_accumulation_steps(settings()) == 1
    assert gradient_accumulation_steps(settings(gradient_accumulation_steps=3)) == 3
    assert gradient_accumulation_steps(settings(global_batch_size=64)) == 8
    assert gradient_accumulation_steps(settings(global_batch_size=64, gradient_accumulation_steps=8)) == 8
    with pytest.raises(ValueError, match=r"^60 is not a multiple of per_device_train_batch_size 4 x num_processes 2"):
        gradient_accumulation_steps(settings(global_batch_size=60))
    with pytest.raises(ValueError, match="x 8 accumulation steps, but gradient_accumulation_steps is 4"):
        gradient_accumulation_steps(settings(global_batch_size=64, gradient_accumulation_steps=4))


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ({"global_batch_size": 30}, r"30 is not a multiple of per_device_train_batch_size 4 x num_processes 1 = 4"),
        ({"global_batch_size": 16, "gradient_accumulation_steps": 2}, r"16 = .* but gradient_accumulation_steps is 2"),
    ],
)
def test_a_bad_global_batch_size_is_refused_at_validation(config: dict, training: dict, message: str) -> None:
    config["experiments"]["demo"]["training"].update(per_device_train_batch_size=4, **training)
    with pytest.raises(ConfigError, match=r"experiments\.demo\.training\.global_batch_size: " + message):
        validate_config(config)


def test_the_summary_shows_the_derived_accumulation(small_demo: Path, tmp_path: Path, config: dict) -> None:
    spec = _spec(config, "sft", max_steps=1, per_device_train_batch_size=2, global_batch_size=8)
    assert spec["training"]["gradient_accumulation_steps"] == 4  # the train spec carries the derived value
    summary = _train(small_demo, spec, tmp_path / "out", tmp_path / "ckpt")
    assert summary["gradient_accumulation_steps"] == 4 and summary["global_batch_size"] == 8
