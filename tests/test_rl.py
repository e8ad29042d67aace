"""GRPO/DAPO training (asft.rl) on the tiny demo model: the config mapping, the loss TRL computes, whole runs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from asft.config import iter_runs, train_spec, validate_config
from asft.config_files import ConfigError
from asft.layout import RUN_SPEC, TRAIN_LOG
from asft.layout import TRAIN_SUMMARY as SUMMARY
from asft.rewards import REWARD_NAME
from asft.rl import grpo_config_kwargs, rl_dataset
from asft.rl_objectives import OBJECTIVES, objective_options
from asft.training import train

RL = {
    "reward": "math",
    "num_generations": 4,
    "max_completion_length": 12,
    "temperature": 1.0,
    "updates_per_rollout": 1,
    "use_vllm": False,
    "vllm_gpu_memory_utilization": 0.3,
}


def _spec(config: dict, loss: dict, rl: dict | None = None, **training: object) -> dict:
    """A validated SFT demo spec made an RL one (the loss row and training.rl as the lead's schema fills them)."""
    config = copy.deepcopy(config)
    config["experiments"]["demo"]["training"].update(
        max_steps=2, logging_steps=1, save_steps=1, per_device_train_batch_size=8, report_to=["none"]
    )
    config["experiments"]["demo"]["training"].update(training)
    filled = validate_config(config)
    spec = train_spec(filled, next(r for r in iter_runs(filled) if r.mode == "sft"))
    spec["loss"] = dict(loss)
    spec["training"]["rl"] = {**RL, **(rl or {})}
    return spec


def test_grpo_config_mapping(config: dict) -> None:
    grpo = grpo_config_kwargs(_spec(config, {"objective": "grpo", "kl_weight": 0.04}), accumulation=2)
    assert grpo["loss_type"] == "grpo" and grpo["beta"] == 0.04
    assert (grpo["epsilon"], grpo["epsilon_high"], grpo["mask_truncated_completions"]) == (0.2, 0.2, False)
    assert (grpo["num_generations"], grpo["max_completion_length"], grpo["temperature"]) == (4, 12, 1.0)
    assert grpo["gradient_accumulation_steps"] == 2 and grpo["per_device_train_batch_size"] == 8
    assert grpo["steps_per_generation"] == 2  # one optimizer step per rollout batch: the PPO ratio stays 1
    several = grpo_config_kwargs(_spec(config, {"objective": "grpo"}, {"updates_per_rollout": 4}), accumulation=2)
    assert several["steps_per_generation"] == 8  # 4 optimizer steps of 2 micro-batches each per rollout batch
    assert grpo["use_vllm"] is False and "vllm_mode" not in grpo
    assert grpo["use_bias_correction_kl"] is False  # the GRPO paper's plain k3 KL, not TRL 1.16's default
    assert grpo["scale_rewards"] == "group" and grpo["learning_rate"] == 1.0e-3 and grpo["report_to"] == "none"

    dapo_spec = _spec(config, {"objective": "dapo"}, {"max_completion_length": 20480})
    dapo = grpo_config_kwargs(dapo_spec, accumulation=1)
    assert dapo["loss_type"] == "dapo" and dapo["beta"] == 0.0
    assert (dapo["epsilon"], dapo["epsilon_high"], dapo["mask_truncated_completions"]) == (0.2, 0.28, True)
    assert objective_options(dapo_spec)["overlong_buffer"] == 4096  # the DAPO paper's cache at L_max 20480
    # A row overrides the preset; kl_weight is GRPO's beta.
    row = {"objective": "dapo", "kl_weight": 0.01, "epsilon_high": 0.3, "overlong_buffer": 0, "scale_rewards": "none"}
    custom = objective_options(_spec(config, row))
    assert (custom["kl_weight"], custom["epsilon_high"], custom["overlong_buffer"]) == (0.01, 0.3, 0)
    assert grpo_config_kwargs(_spec(config, row), 1)["scale_rewards"] == "none"

    vllm = grpo_config_kwargs(
        _spec(config, {"objective": "grpo"}, {"use_vllm": True, "vllm_gpu_memory_utilization": 0.45}), 1
    )
    assert vllm["use_vllm"] is True and vllm["vllm_mode"] == "colocate"
    assert vllm["vllm_gpu_memory_utilization"] == 0.45

    with pytest.raises(ConfigError, match="overlong_buffer"):
        objective_options(_spec(config, {"objective": "dapo", "overlong_buffer": 12}))
    with pytest.raises(ConfigError, match="objective"):
        objective_options(_spec(config, {"objective": "ppo"}))
    assert set(OBJECTIVES) == {"grpo", "dapo"}


def _fixed_reward(prompts: list, completions: list, **kwargs: object) -> list[float]:
    """Known rewards, so the test can form the group-normalised advantages itself."""
    return REWARDS[: len(completions)]


_fixed_reward.__name__ = "fixed"
REWARDS = [1.0, 0.0, 0.0, 3.0, 2.0, 2.0, 1.0, 0.0]  # two groups of four


def _trainer(small_demo: Path, tmp_path: Path, config: dict, row: dict) -> object:
    """A GRPOTrainer built from the run spec's mapping, with a LoRA adapter moved off the identity so the policy
    differs from its reference (the adapter disabled)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from asft.rl import _grpo_config
    from asft.training import _lora_config

    spec = _spec(config, row, {"max_completion_length": 8})
    args = _grpo_config(spec, tmp_path / "ckpt", torch.float32, accumulation=1, use_configured_state=False)
    model = AutoModelForCausalLM.from_pretrained(small_demo / "model", dtype=torch.float32)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[_fixed_reward],
        args=args,
        train_dataset=rl_dataset(small_demo / "data/train.jsonl", spec["training"]),
        processing_class=AutoTokenizer.from_pretrained(small_demo / "model"),
        peft_config=_lora_config(spec["training"]),
    )
    torch.manual_seed(1)
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return trainer


def _completion_logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """log p(completion token | prefix) from a plain forward pass (temperature 1)."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    length = batch["completion_ids"].size(1)
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, -length - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_loss_matches_a_hand_computation(small_demo: Path, tmp_path: Path, config: dict, loss_type: str) -> None:
    """TRL's loss on a real rollout equals the clipped surrogate with group-normalised advantages plus β times the
    k3 KL to the reference, aggregated per sequence (grpo) or over all tokens (dapo)."""
    beta, eps_low, eps_high = 0.1, 0.2, (0.2 if loss_type == "grpo" else 0.28)
    row = {"objective": loss_type, "kl_weight": beta, "mask_truncated_completions": False}
    trainer = _trainer(small_demo, tmp_path, config, row)
    trainer.model.train()
    rows = [trainer.train_dataset[i] for i in (0, 1)]
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions([rows[0]] * 4 + [rows[1]] * 4)

    rewards = torch.tensor(REWARDS).view(2, 4)
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()
    torch.testing.assert_close(batch["advantages"], advantages)

    mask = batch["completion_mask"].float()
    assert mask.sum() > 0
    with torch.no_grad():
        logps = _completion_logps(trainer.model, batch)
        with trainer.model.disable_adapter():
            ref = _completion_logps(trainer.model, batch)
    # Compared on completion tokens: TRL leaves padding after the end of a completion at 0.
    torch.testing.assert_close(batch["ref_per_token_logps"] * mask, ref * mask, rtol=1e-4, atol=1e-4)
    # Old log-probs off the current policy, so ratios leave [1 - eps_low, 1 + eps_high] on both sides.
    generator = torch.Generator().manual_seed(0)
    old = logps + (torch.rand(logps.shape, generator=generator) - 0.5)
    batch["old_per_token_logps"] = old
    batch["num_items_in_batch"] = mask.sum()
    trainer.current_gradient_accumulation_steps = 1

    loss = trainer._compute_loss(trainer.model, batch)

    ratio = torch.exp(logps - old)
    adv = advantages.unsqueeze(1)
    surrogate = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    kl = torch.exp(ref - logps) - (ref - logps) - 1
    per_token = surrogate + beta * kl
    per_sequence = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    per_token_mean = (per_token * mask).sum() / mask.sum()
    expected = per_sequence if loss_type == "grpo" else per_token_mean
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)

    # The check can tell the variants apart: clipping bites, KL counts, and the two aggregations differ.
    unclipped = -(ratio * adv)
    assert ((unclipped - surrogate).abs() * mask).sum() > 1e-3
    assert (beta * kl * mask).sum() > 1e-4
    assert (per_sequence - per_token_mean).abs() > 1e-4
    high_clipped = ((ratio > 1 + eps_high) & (adv > 0)).float() * mask
    assert trainer._metrics["train"]["clip_ratio/high_mean"][-1] == pytest.approx(
        float(high_clipped.sum() / mask.sum())
    )


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / TRAIN_LOG).read_text().splitlines()]


def _nines(small_demo: Path, tmp_path: Path) -> Path:
    """The demo prompts with every answer 9: a digit the barely trained model often ends on, so some rollouts earn
    a reward and the groups carry a learning signal."""
    rows = [json.loads(line) for line in (small_demo / "data/train.jsonl").read_text().splitlines()][:16]
    path = tmp_path / "nines.jsonl"
    path.write_text("".join(json.dumps({**r, "response": "So \\boxed{9}."}) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("objective", ["grpo", "dapo"])
def test_rl_run_writes_a_loadable_output(small_demo: Path, tmp_path: Path, config: dict, objective: str) -> None:
    from peft import AutoPeftModelForCausalLM

    row = {"objective": objective, "kl_weight": 0.05} if objective == "grpo" else {"objective": "dapo"}
    # DAPO takes 2 optimizer steps per rollout batch, so its second step's ratio differs from 1 and the clip can bind
    updates = 1 if objective == "grpo" else 2
    spec = _spec(config, row, {"updates_per_rollout": updates}, max_steps=3, learning_rate=5e-3)
    out, checkpoints = tmp_path / "out", tmp_path / "ckpt"
    summary = train(small_demo / "model", _nines(small_demo, tmp_path), spec, out, checkpoints)

    assert summary["global_step"] == 3 and summary["finetune"] == "lora"
    assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer_config.json").exists()
    AutoPeftModelForCausalLM.from_pretrained(out)  # merge and evaluation load it the same way
    assert json.loads((out / RUN_SPEC).read_text())["loss"]["objective"] == objective
    written = json.loads((out / SUMMARY).read_text())
    rl = written["rl"]
    assert rl["objective"] == objective and rl["num_generations"] == 4 and rl["prompts_per_step"] == 2
    assert rl["prompts_per_rollout"] == 2 * updates
    # a rollout batch of 8 completions per optimizer step: DAPO's 2 batches (steps 1 and 3) hold 16 each
    assert rl["completions_graded"] == (3 * 8 if objective == "grpo" else 2 * 16) and rl["reward_timeouts"] == 0
    assert rl["final_mean_reward"] is not None and 0.0 <= rl["final_mean_reward"] <= 1.0
    assert written["wall_seconds"] > 0 and written["host_peak_rss_gb"][0] > 0

    log = _log(out)
    assert [r["step"] for r in log] == [1, 2, 3]
    # rollout metrics come with the steps that drew rollouts (every step, or steps 1 and 3 at 2 updates each)
    rollout_steps = log[::updates]
    for key in ("reward", "reward_std", f"rewards/{REWARD_NAME}/mean", "completions/mean_length"):
        assert all(r.get(key) is not None for r in rollout_steps), key
    assert all("loss" in r and "entropy" in r for r in log)
    assert any(r["reward_std"] > 0 for r in rollout_steps)  # some group carried a signal
    if objective == "grpo":
        assert all("kl" in r for r in log) and log[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts at ref
        assert log[-1]["kl"] > 0  # the policy moved off its reference
        assert rl["kl_weight"] == 0.05 and rl["loss_type"] == "grpo"
    else:
        assert "kl" not in log[0]  # β = 0: no reference, no KL
        assert "rewards/soft_overlong_punishment_reward/mean" in log[0]
        assert (rl["epsilon_high"], rl["mask_truncated_completions"], rl["overlong_buffer"]) == (0.28, True, 2)
    assert not list(checkpoints.glob("checkpoint-*")) and not (tmp_path / "out.tmp").exists()


def test_rl_run_resumes_from_its_checkpoint(small_demo: Path, tmp_path: Path, config: dict) -> None:
    """A killed GRPO job resumes its own checkpoint and its log continues, as an SFT run does."""
    from tests.test_training import _interrupted

    spec = _spec(config, {"objective": "grpo", "kl_weight": 0.05}, max_steps=3)
    data = small_demo / "data/train.jsonl"
    _interrupted(small_demo, spec, tmp_path / "out", tmp_path / "ckpt")
    summary = train(small_demo / "model", data, spec, tmp_path / "out", tmp_path / "ckpt")
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 3
    assert [r["step"] for r in _log(tmp_path / "out")] == [1, 2, 3]


def test_rl_rejects_bad_settings_before_loading(small_demo: Path, tmp_path: Path, config: dict) -> None:
    data = small_demo / "data/train.jsonl"
    spec = _spec(config, {"objective": "grpo"}, {"num_generations": 3})  # 8 completions hold no whole group of 3
    with pytest.raises(ConfigError, match="num_generations"):
        train(small_demo / "model", data, spec, tmp_path / "out", tmp_path / "ckpt")
    choice = _spec(config, {"objective": "grpo"}, {"reward": "choice"})  # arithmetic answers are no letters
    from asft.data import DataFormatError

    with pytest.raises(DataFormatError, match=rf"{data}:1: "):
        train(small_demo / "model", data, choice, tmp_path / "out", tmp_path / "ckpt")
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt").exists()


def test_the_schema_offers_exactly_the_objectives_keys() -> None:
    """A mode row may set each preset key but loss_type (the objective decides it), and nothing else."""
    from asft.matrix import RL_MODE_KEYS
    from asft.rl_objectives import OBJECTIVES

    for preset in OBJECTIVES.values():
        assert set(preset) - {"loss_type", "kl_weight"} == set(RL_MODE_KEYS)
