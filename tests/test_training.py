"""The training stage on the tiny demo model: logs, outputs, the reference model, resume, loss scaling."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from asft.config import iter_runs, train_spec, validate_config
from asft.training import RUN_SPEC, SUMMARY, TRAIN_LOG, final_hidden_states, train


def _spec(config: dict, mode: str, **training: object) -> dict:
    config = copy.deepcopy(config)
    config["experiments"]["demo"]["training"].update(
        max_steps=2,
        logging_steps=1,
        kl_log_every=1,
        save_steps=1,
        per_device_train_batch_size=4,
        report_to=["none"],
    )
    config["experiments"]["demo"]["training"].update(training)
    filled = validate_config(config)
    run = next(r for r in iter_runs(filled) if r.mode == mode)
    return train_spec(filled, run)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / TRAIN_LOG).read_text().splitlines()]


def test_lora_asft_run_writes_adapter_and_logs(small_demo: Path, tmp_path: Path, config: dict) -> None:
    out, checkpoints = tmp_path / "train", tmp_path / "checkpoints"
    summary = train(small_demo / "model", small_demo / "data/train.jsonl", _spec(config, "asft"), out, checkpoints)
    assert summary["global_step"] == 2
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert json.loads((out / RUN_SPEC).read_text())["loss"]["weighting"] == "dft"
    assert json.loads((out / SUMMARY).read_text())["finetune"] == "lora"
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2]
    for key in ("loss", "ce", "kl", "weight_mean", "learning_rate", "tokens_per_second"):
        assert key in log[0], key
    # LoRA starts as the identity (B = 0): the policy is the reference at step 0, so KL is zero there.
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < log[0]["weight_mean"] < 1  # DFT weights are probabilities
    assert list(checkpoints.glob("checkpoint-*")) and not (tmp_path / "train.tmp").exists()


def test_kl_is_logged_for_unanchored_modes_and_grows(small_demo: Path, tmp_path: Path, config: dict) -> None:
    spec = _spec(config, "sft", max_steps=4, learning_rate=1e-2)
    out = tmp_path / "train"
    train(small_demo / "model", small_demo / "data/train.jsonl", spec, out, tmp_path / "ckpt")
    kls = [r["kl"] for r in _log(out)]
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[-1] > 1e-4


def test_restart_resumes_from_the_newest_checkpoint(small_demo: Path, tmp_path: Path, config: dict) -> None:
    data, checkpoints = small_demo / "data/train.jsonl", tmp_path / "ckpt"
    train(small_demo / "model", data, _spec(config, "sft"), tmp_path / "first", checkpoints)
    summary = train(small_demo / "model", data, _spec(config, "sft", max_steps=3), tmp_path / "second", checkpoints)
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 3
    assert [r["step"] for r in _log(tmp_path / "second")] == [1, 2, 3]  # the log continues, not restarts


def test_full_finetune_uses_a_frozen_reference(small_demo: Path, tmp_path: Path, config: dict) -> None:
    spec = _spec(config, "sft-lr", finetune="full", learning_rate=1e-3)
    out = tmp_path / "full"
    train(small_demo / "model", small_demo / "data/train.jsonl", spec, out, tmp_path / "ckpt")
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    log = _log(out)
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-6) and log[1]["kl"] > 0


def test_upstream_scaling_sums_micro_batch_means(small_demo: Path, tmp_path: Path, config: dict) -> None:
    """With 2 accumulation steps the upstream loss is ~2x the token-normalised one (same data, same init)."""
    losses = {}
    for scaling in ("token", "upstream"):
        spec = _spec(config, "sft", max_steps=1, gradient_accumulation_steps=2, loss_scaling=scaling)
        out = tmp_path / scaling
        train(small_demo / "model", small_demo / "data/train.jsonl", spec, out, tmp_path / f"ckpt-{scaling}")
        losses[scaling] = _log(out)[0]["loss"]
    assert 1.8 < losses["upstream"] / losses["token"] < 2.2


def test_lora_reference_is_the_base_model(small_demo: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(small_demo / "model")
    base = AutoModelForCausalLM.from_pretrained(small_demo / "model").eval()
    batch = tokenizer(["Tom has 12 apples.", "5 + 7 = 12"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = base(**batch).logits
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(small_demo / "model"),
        LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
    ).eval()
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    causal_lm = peft_model.get_base_model()
    with torch.no_grad(), peft_model.disable_adapter():
        hidden = final_hidden_states(peft_model, causal_lm, batch["input_ids"], batch["attention_mask"])
    reference_logits = hidden @ causal_lm.get_output_embeddings().weight.T
    torch.testing.assert_close(reference_logits, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        adapted = final_hidden_states(peft_model, causal_lm, batch["input_ids"], batch["attention_mask"])
    assert (adapted - hidden).abs().max() > 1e-3


def test_bad_training_data_fails_before_loading_the_model(tmp_path: Path, config: dict) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a"}\n')
    with pytest.raises(ValueError, match="train.jsonl:1: field 'response'"):
        train(tmp_path / "no-model", data, _spec(config, "sft"), tmp_path / "out", tmp_path / "ckpt")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_ranks_give_the_same_update_as_gradient_accumulation(
    small_demo: Path, tmp_path: Path, config: dict
) -> None:
    """Data parallel (num_processes: 2 -> torchrun, 2 CPU ranks, gloo) vs one process accumulating the same 2
    micro-batches.

    SGD, not Adam, so that a wrong loss scale (a rank-local N, or a missing world-size factor) changes the
    update instead of being normalised away. asft exercises the LoRA reference under the DDP wrapper.
    """
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    common = dict(
        max_steps=2, per_device_train_batch_size=2, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant"
    )
    data = small_demo / "data/train.jsonl"
    single = tmp_path / "single"
    train(
        small_demo / "model",
        data,
        _spec(config, "asft", gradient_accumulation_steps=2, **common),
        single,
        tmp_path / "c1",
    )

    ddp = tmp_path / "ddp"
    spec = json.dumps(_spec(config, "asft", gradient_accumulation_steps=1, num_processes=2, **common))
    command = [sys.executable, "-m", "asft.cli", "train", "--model", str(small_demo / "model"), "--data", str(data)]
    command += ["--spec", spec, "--out", str(ddp), "--checkpoints", str(tmp_path / "c2")]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")  # gloo ranks on a GPU-less machine
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]

    assert json.loads((ddp / SUMMARY).read_text())["world_size"] == 2
    assert not ddp.with_name("ddp.tmp").exists()
    expected = load_file(single / "adapter_model.safetensors")
    actual = load_file(ddp / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    moved = max(float(t.abs().max()) for name, t in expected.items() if "lora_B" in name)
    assert moved > 1e-3  # B starts at zero: the two steps really updated the adapter
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    single_log, ddp_log = _log(single), _log(ddp)
    assert [r["step"] for r in ddp_log] == [1, 2]
    for a, b in zip(single_log, ddp_log, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["target_tokens"] == a["target_tokens"]


def test_data_parallel_launch_and_device_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from asft.config import ConfigError
    from asft.training import check_devices, data_parallel_command

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert data_parallel_command(["train", "--out", "o"], 1) is None
    command = data_parallel_command(["train", "--out", "o"], 4)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m", "asft.cli"]
    assert command[1:] == [*launcher, "train", "--out", "o"]
    monkeypatch.setenv("LOCAL_RANK", "0")  # inside a launched rank: never launch again
    assert data_parallel_command(["train"], 4) is None

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="training.num_processes is 4 but this job sees 1 GPU"):
        check_devices(4)
    check_devices(1)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    check_devices(4)


def test_a_zero3_partitioned_head_is_gathered_read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ZeRO-3 a parameter outside its module's forward is a placeholder with `ds_id`; the loss reads the
    head through DeepSpeed's GatheredParameters (stood in for here: no DeepSpeed without GPUs), never directly."""
    import contextlib
    import sys
    import types

    from asft.training import gathered_head

    calls = []

    @contextlib.contextmanager
    def fake_gathered(params, modifier_rank=0):
        calls.append((params, modifier_rank))
        yield

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=fake_gathered)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)

    plain = torch.nn.Parameter(torch.zeros(4, 2))
    with gathered_head(plain):
        pass
    assert calls == []
    partitioned = torch.nn.Parameter(torch.zeros(0))
    partitioned.ds_id = 7
    with gathered_head(partitioned):
        pass
    assert calls == [([partitioned], None)]  # modifier_rank=None: read-only, nothing is written back
