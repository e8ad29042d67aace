"""The training stage on the tiny demo model: logs, outputs, the reference model, resume, loss scaling."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from asft.checkpoints import FINGERPRINT_FILE, STALE_DIR, read_log_through
from asft.config import iter_runs, train_spec, validate_config
from asft.data import DataFormatError
from asft.divergence import TrainingDivergedError, check_finite_step
from asft.layout import RUN_SPEC, TRAIN_LOG
from asft.layout import TRAIN_SUMMARY as SUMMARY
from asft.train_io import TEST_HOOK_ENV
from asft.trainer import final_hidden_states
from asft.training import train
from tests.conftest import REPO


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
    # A finished run keeps its log but no checkpoint (it is no resume point), and leaves no temp output.
    assert not list(checkpoints.glob("checkpoint-*")) and (checkpoints / TRAIN_LOG).exists()
    assert not (tmp_path / "train.tmp").exists()


def test_kl_is_logged_for_unanchored_modes_and_grows(small_demo: Path, tmp_path: Path, config: dict) -> None:
    spec = _spec(config, "sft", max_steps=4, learning_rate=1e-2)
    out = tmp_path / "train"
    train(small_demo / "model", small_demo / "data/train.jsonl", spec, out, tmp_path / "ckpt")
    kls = [r["kl"] for r in _log(out)]
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[-1] > 1e-4


class _Killed(Exception):
    """Stands in for a job killed right after a checkpoint was saved."""


class _KillAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args: object, state: object, control: object, **kwargs: object) -> None:
        if state.global_step == self.step:
            raise _Killed


def _interrupted(small_demo: Path, spec: dict, out: Path, checkpoints: Path, step: int = 2) -> None:
    """A job that dies after saving checkpoint-`step`: no output, its checkpoints and log stay."""
    with pytest.raises(_Killed):
        train(small_demo / "model", small_demo / "data/train.jsonl", spec, out, checkpoints, [_KillAfterSave(step)])
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()
    assert (checkpoints / f"checkpoint-{step}" / FINGERPRINT_FILE).exists()


def test_a_killed_job_resumes_from_its_newest_checkpoint(small_demo: Path, tmp_path: Path, config: dict) -> None:
    """The restarted job (same settings) continues from checkpoint-2, its log continues, and it ends with the
    weights of an uninterrupted run; a finished run leaves no checkpoint behind."""
    from safetensors.torch import load_file

    data, checkpoints = small_demo / "data/train.jsonl", tmp_path / "ckpt"
    spec = _spec(config, "sft", max_steps=3)
    _interrupted(small_demo, spec, tmp_path / "out", checkpoints)
    summary = train(small_demo / "model", data, spec, tmp_path / "out", checkpoints)
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 3
    assert [r["step"] for r in _log(tmp_path / "out")] == [1, 2, 3]  # the log continues, not restarts
    assert not list(checkpoints.glob("checkpoint-*")) and (checkpoints / TRAIN_LOG).exists()

    train(small_demo / "model", data, spec, tmp_path / "straight", tmp_path / "ckpt-straight")
    resumed, straight = (
        load_file(tmp_path / "out/adapter_model.safetensors"),
        load_file(tmp_path / "straight/adapter_model.safetensors"),
    )
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("change", ["learning_rate", "data", "model"])
def test_a_job_with_other_settings_starts_fresh(small_demo: Path, tmp_path: Path, config: dict, change: str) -> None:
    """A rerun under the same run id with a new learning rate, new data or a new model never continues the old
    run's checkpoint: it trains every step itself, with its own settings, and drops the old checkpoints."""
    import shutil

    model, data, checkpoints = tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "ckpt"
    shutil.copytree(small_demo / "model", model)
    shutil.copy(small_demo / "data/train.jsonl", data)
    spec = _spec(config, "sft", max_steps=3, learning_rate=1e-3, lr_scheduler_type="constant")
    out = tmp_path / "out"
    with pytest.raises(_Killed):
        train(model, data, spec, out, checkpoints, [_KillAfterSave(2)])
    if change == "learning_rate":
        spec = _spec(config, "sft", max_steps=3, learning_rate=2e-3, lr_scheduler_type="constant")
    elif change == "data":
        data.write_text("".join(data.read_text().splitlines(keepends=True)[::-1]))
    else:
        (model / "generation_config.json").write_text('{"do_sample": false, "max_new_tokens": 7}')
    stale_seen = []

    class WatchStale(TrainerCallback):
        def on_step_end(self, args: object, state: object, control: object, **kwargs: object) -> None:
            stale_seen.append((state.global_step, (checkpoints / STALE_DIR / "checkpoint-2").exists()))

    summary = train(model, data, spec, out, checkpoints, [WatchStale()])
    assert summary["resumed_from"] is None and summary["global_step"] == 3
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert {r["learning_rate"] for r in log} == {spec["training"]["learning_rate"]}
    # The old checkpoints were kept aside until this run saved its first own one (save_steps: 1), then removed.
    assert stale_seen[0] == (1, True) and not (checkpoints / STALE_DIR).exists()


def test_a_finished_run_is_not_resumed_by_a_forced_retrain(small_demo: Path, tmp_path: Path, config: dict) -> None:
    data, checkpoints = small_demo / "data/train.jsonl", tmp_path / "ckpt"
    spec = _spec(config, "sft")
    train(small_demo / "model", data, spec, tmp_path / "first", checkpoints)
    summary = train(small_demo / "model", data, spec, tmp_path / "again", checkpoints)
    assert summary["resumed_from"] is None and summary["global_step"] == 2
    assert [r["step"] for r in _log(tmp_path / "again")] == [1, 2]


def test_a_torn_last_log_line_does_not_stop_a_resume(small_demo: Path, tmp_path: Path, config: dict) -> None:
    """A kill while the log line of step 3 was being written: the restart drops the torn line and resumes."""
    checkpoints = tmp_path / "ckpt"
    spec = _spec(config, "sft", max_steps=3)
    _interrupted(small_demo, spec, tmp_path / "out", checkpoints)
    with (checkpoints / TRAIN_LOG).open("a") as handle:
        handle.write('{"step": 3, "loss": 1.2')
    summary = train(small_demo / "model", small_demo / "data/train.jsonl", spec, tmp_path / "out", checkpoints)
    assert summary["resumed_from"].endswith("checkpoint-2")
    assert [r["step"] for r in _log(tmp_path / "out")] == [1, 2, 3]


def test_a_corrupt_log_line_before_the_last_is_reported(tmp_path: Path) -> None:
    path = tmp_path / TRAIN_LOG
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"train_log.jsonl:2: not a training-log record"):
        read_log_through(path, 5)
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert read_log_through(path, 5) == ['{"step": 1}', '{"step": 2}']
    assert read_log_through(path, 1) == ['{"step": 1}']


def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(
    small_demo: Path, tmp_path: Path, config: dict
) -> None:
    """A learning rate of 1e6 makes the step-2 loss and gradients non-finite: the job fails naming the step,
    writes no output, keeps the log of step 1 and checkpoint-1, whose weights are finite."""
    from safetensors.torch import load_file

    out, checkpoints = tmp_path / "out", tmp_path / "ckpt"
    spec = _spec(config, "asft", max_steps=4, learning_rate=1e6, lr_scheduler_type="constant")
    with pytest.raises(TrainingDivergedError, match=r"training diverged at step 2: loss \S+, gradient norm"):
        train(small_demo / "model", small_demo / "data/train.jsonl", spec, out, checkpoints)
    assert not out.exists() and not out.with_name("out.tmp").exists()
    assert [json.loads(line)["step"] for line in (checkpoints / TRAIN_LOG).read_text().splitlines()] == [1]
    assert [p.name for p in checkpoints.glob("checkpoint-*")] == ["checkpoint-1"]
    weights = load_file(checkpoints / "checkpoint-1" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_check_finite_step() -> None:
    check_finite_step(3, torch.tensor(1.0), torch.tensor(True), torch.tensor(0.5))
    check_finite_step(3, None, None, None)
    with pytest.raises(TrainingDivergedError, match="step 3: loss nan, gradient norm 0.5"):
        check_finite_step(3, torch.tensor(float("nan")), torch.tensor(False), torch.tensor(0.5))
    with pytest.raises(TrainingDivergedError, match="step 4: loss 1, gradient norm inf"):
        check_finite_step(4, torch.tensor(1.0), torch.tensor(True), float("inf"))


def test_every_example_too_long_is_a_clear_error(small_demo: Path, tmp_path: Path, config: dict) -> None:
    """max_length shorter than every prompt: an error with the counts, before any step, and no output."""
    spec = _spec(config, "sft", max_length=16)
    with pytest.raises(DataFormatError, match=r"train.jsonl: all 64 examples have no response token within "):
        train(small_demo / "model", small_demo / "data/train.jsonl", spec, tmp_path / "out", tmp_path / "ckpt")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_dropped_examples_are_counted_in_the_summary(small_demo: Path, tmp_path: Path, config: dict) -> None:
    """Examples whose prompt alone fills max_length are dropped by TRL; the summary says how many."""
    records = [json.loads(line) for line in (small_demo / "data/train.jsonl").read_text().splitlines()][:12]
    for record in records[:5]:
        record["instruction"] = "A long preamble that fills the context. " * 12 + record["instruction"]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = _spec(config, "sft", max_length=96, max_steps=1)
    summary = train(small_demo / "model", data, spec, tmp_path / "out", tmp_path / "ckpt")
    assert summary["examples"] == 12 and summary["examples_dropped_too_long"] == 5


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


# A KL summed over the vocabulary in float32 carries rounding error of about eps (1.2e-7) times the few nats of
# log-probability it sums over; agreement below this says nothing.
KL_FLOAT32_NOISE = 1e-6

DATA_PARALLEL_CASES = {
    # name: (finetune, DeepSpeed config or None for plain DDP, gradient checkpointing, tied embeddings)
    "ddp-lora": ("lora", None, False, False),
    "zero2-lora": ("lora", "zero2.json", False, False),
    "zero3-lora": ("lora", "zero3.json", True, False),
    "zero2-full": ("full", "zero2.json", False, False),
    "zero3-full": ("full", "zero3.json", True, False),  # the paper's setting (Qwen2.5-7B: untied head)
    # Qwen2.5 up to 3B (and Qwen2.5-Math-1.5B) tie the head to the input embedding: one partitioned parameter
    # used by two modules, whose gradient has two sources.
    "zero3-full-tied": ("full", "zero3.json", True, True),
}


def _tied_copy(model_dir: Path, out: Path) -> Path:
    """The model with its LM head tied to the input embedding (the embedding's weights kept)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.tie_word_embeddings = True
    model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    return out


def _train_ranks(
    model_dir: Path, data: Path, spec: dict, out: Path, checkpoints: Path, hook: str | None = None
) -> subprocess.CompletedProcess:
    """`asft train` as the workflow runs it, on 2 CPU ranks: accelerate's CPU mode for plain DDP, DeepSpeed's
    CPU accelerator (gloo) for a DeepSpeed config. `hook` is a TEST_HOOK_ENV value run after each checkpoint."""
    import os
    import sys

    command = [sys.executable, "-m", "asft.cli", "train", "--model", str(model_dir), "--data", str(data)]
    command += ["--spec", json.dumps(spec), "--out", str(out), "--checkpoints", str(checkpoints)]
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "DS_ACCELERATOR")}
    env["OMP_NUM_THREADS"] = "1"
    env.update({"DS_ACCELERATOR": "cpu"} if spec["training"]["deepspeed"] else {"ACCELERATE_USE_CPU": "true"})
    if hook:
        env.update({TEST_HOOK_ENV: hook, "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])})
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def _summary_of_ranks(*args: object) -> dict:
    result = _train_ranks(*args)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((args[3] / SUMMARY).read_text())


def kill_rank0_after_checkpoint_2(step: int, checkpoint: Path) -> None:
    """TEST_HOOK_ENV target: rank 0 dies (SIGKILL, no cleanup) once checkpoint-2 is saved and marked."""
    import os
    import signal

    if step == 2 and os.environ.get("RANK") == "0":
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("case", DATA_PARALLEL_CASES)
def test_two_ranks_give_the_same_update_as_gradient_accumulation(
    small_demo: Path, tmp_path: Path, config: dict, case: str
) -> None:
    """Data parallel (num_processes: 2 -> torchrun, 2 CPU ranks over gloo; plain DDP or the real DeepSpeed
    engine, ZeRO-2 and ZeRO-3), each accumulating 2 micro-batches, vs one process accumulating the same 4.

    SGD, not Adam, so that a wrong loss scale (a rank-local N, a missing world-size factor, DeepSpeed dividing by
    the accumulation steps again) changes the update instead of being normalised away. asft exercises both
    references: LoRA's disabled adapter under the DDP/DeepSpeed wrapper, and full fine-tuning's frozen copy (a
    ZeRO-3 inference engine, its head gathered read-only). ZeRO-3 partitions the trained head, whose gradient
    the chunked loss must hand back to DeepSpeed.
    """
    from safetensors.torch import load_file

    finetune, deepspeed, checkpointing, tied = DATA_PARALLEL_CASES[case]
    model_dir = _tied_copy(small_demo / "model", tmp_path / "tied") if tied else small_demo / "model"
    common = dict(
        gradient_checkpointing=checkpointing,
        max_steps=2,
        per_device_train_batch_size=2,
        optim="sgd",
        # Large enough that the step-2 KL is far above float32 noise: the tied model is confident (loss ~0.01),
        # so its gradients are small and lr 0.05 moves it by a KL of ~2e-8, which is rounding error.
        learning_rate=0.5 if finetune == "lora" else (10.0 if tied else 0.05),
        lr_scheduler_type="constant",
        finetune=finetune,
    )
    data = small_demo / "data/train.jsonl"
    single = tmp_path / "single"
    train(
        model_dir,
        data,
        _spec(config, "asft", gradient_accumulation_steps=4, **common),
        single,
        tmp_path / "c1",
    )

    ranks = tmp_path / "ranks"
    ds_config = str(REPO / "config" / "deepspeed" / deepspeed) if deepspeed else None
    spec = _spec(config, "asft", gradient_accumulation_steps=2, num_processes=2, deepspeed=ds_config, **common)
    summary = _summary_of_ranks(model_dir, data, spec, ranks, tmp_path / "c2")
    assert summary["world_size"] == 2 and summary["accelerator_count"] == 2
    assert summary["global_batch_size"] == 8 and len(summary["host_peak_rss_gb"]) == 2
    if deepspeed:  # the real engine ran, not a silent fallback to DDP
        assert summary["distributed_type"] == "DEEPSPEED" and summary["zero_stage"] == int(deepspeed[4])
    else:
        assert summary["distributed_type"] == "MULTI_CPU" and summary["zero_stage"] is None
    assert not ranks.with_name("ranks.tmp").exists()
    weights = "adapter_model.safetensors" if finetune == "lora" else "model.safetensors"
    expected, actual = load_file(single / weights), load_file(ranks / weights)
    assert expected.keys() == actual.keys()
    start = load_file(model_dir / "model.safetensors")
    changed = [name for name in expected if name not in start or not torch.equal(expected[name], start[name])]
    assert changed  # the two steps really updated the weights (LoRA's B starts at zero)
    if finetune == "full":  # the head is trained, under ZeRO-3 too
        assert ("model.embed_tokens.weight" if tied else "lm_head.weight") in changed
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    single_log, ranks_log = _log(single), _log(ranks)
    assert [r["step"] for r in ranks_log] == [1, 2]
    # The reference is the starting model, not the moving policy; and the KL after one step is meaningful.
    assert ranks_log[1]["kl"] > 10 * KL_FLOAT32_NOISE
    for a, b in zip(single_log, ranks_log, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-3, abs=KL_FLOAT32_NOISE)
        assert b["target_tokens"] == a["target_tokens"]


@pytest.mark.slow
def test_a_killed_zero3_job_resumes_from_its_deepspeed_checkpoint(
    small_demo: Path, tmp_path: Path, config: dict
) -> None:
    """Rank 0 of a ZeRO-3 job is SIGKILLed after checkpoint-2: the job fails with no output; the restarted job
    resumes from the sharded checkpoint (marked only once both ranks saved it) and its log continues. Its
    snapshots (steps 1 and 3, one from each attempt) are whole models gathered from the shards, and the summary
    has both ranks' resources."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    deepspeed = str(REPO / "config" / "deepspeed" / "zero3.json")
    data, checkpoints = small_demo / "data/train.jsonl", tmp_path / "ckpt"
    spec = _spec(
        config,
        "asft",
        num_processes=2,
        deepspeed=deepspeed,
        per_device_train_batch_size=2,
        max_steps=4,
        snapshot_steps=[1, 3],
        learning_rate=1e-3,
    )
    spec["training"]["finetune"] = "full"
    hook = "tests.test_training:kill_rank0_after_checkpoint_2"
    killed = _train_ranks(small_demo / "model", data, spec, tmp_path / "out", checkpoints, hook)
    assert killed.returncode != 0 and not (tmp_path / "out").exists()
    assert (checkpoints / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's own sharded state
    assert (checkpoints / "checkpoint-2" / FINGERPRINT_FILE).exists()
    summary = _summary_of_ranks(small_demo / "model", data, spec, tmp_path / "out", checkpoints)
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 4
    assert [r["step"] for r in _log(tmp_path / "out")] == [1, 2, 3, 4]
    assert summary["resumed_from_step"] == 2 and summary["timing_scope"] == "last_attempt"
    assert summary["accelerator_count"] == 2 and len(summary["host_peak_rss_gb"]) == 2
    assert summary["snapshot_steps"] == [1, 3]
    out = tmp_path / "out"
    weights = [load_file(out / "snapshots" / f"step-{s}" / "model.safetensors") for s in (1, 3)]
    weights.append(load_file(out / "model.safetensors"))
    for a, b in ((weights[0], weights[1]), (weights[1], weights[2])):
        assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert all(w.numel() > 0 for w in weights[0].values())  # gathered, not ZeRO-3's empty placeholders
    AutoModelForCausalLM.from_pretrained(out / "snapshots" / "step-1")


def test_data_parallel_launch_and_device_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from asft.config import ConfigError
    from asft.distributed import check_devices, data_parallel_command

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
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    with pytest.raises(ConfigError, match="sees 1 GPU"):
        check_devices(4, deepspeed="zero2.json")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator: CPU ranks over gloo
    check_devices(4, deepspeed="zero2.json")
    with pytest.raises(ConfigError, match="sees 1 GPU"):  # DS_ACCELERATOR does not make plain DDP use CPUs
        check_devices(4)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    check_devices(4)
    # accelerate would silently drop DeepSpeed and run DDP: refused, also for a single process
    for processes in (1, 4):
        with pytest.raises(ConfigError, match="ACCELERATE_USE_CPU=true makes accelerate ignore it"):
            check_devices(processes, deepspeed="zero2.json")


def test_the_loss_runs_inside_a_partitioned_heads_module_call() -> None:
    """Without ZeRO-3 the loss is computed directly; with it (a head parameter carrying `ds_id`), as the head
    module's forward, so DeepSpeed's module hooks gather the head around it (the real engine: the ZeRO-3 cases
    of the two-rank test above). The module's own forward is restored afterwards."""
    from asft.distributed import loss_in_head_module

    head = torch.nn.Linear(2, 4, bias=False)
    seen = []
    head.register_forward_pre_hook(lambda module, args: seen.append("hook"))
    assert loss_in_head_module(head, lambda: "loss") == "loss" and seen == []
    head.weight.ds_id = 7
    assert loss_in_head_module(head, lambda: "loss") == "loss" and seen == ["hook"]
    assert "forward" not in vars(head)
    assert head(torch.ones(1, 2)).shape == (1, 4)
