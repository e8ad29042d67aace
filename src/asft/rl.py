"""RL training stage: GRPO and DAPO with verifiable rewards (paper Table 2 baselines) through TRL's GRPOTrainer.

`train_rl` is `asft.training.train` for mode rows whose `objective` is "grpo" or "dapo": the same atomic output
folder, run files, checkpoint fingerprint and resume, JSONL step log and summary (time and memory, paper Table 4),
and the same output contents (adapter or full weights + tokenizer), so merge and evaluation work unchanged. TRL
does the method (rollouts, group-normalised advantages, clipped surrogate, KL to the starting model, vLLM
colocation, ZeRO-3 gathering); this module maps the run spec onto its GRPOConfig (`grpo_config_kwargs`) and
supplies the rewards (`asft.rewards`).

Objectives (`asft.rl_objectives.OBJECTIVES`, each key overridable in the mode row):
- grpo: TRL loss_type "grpo" (each sequence's token mean, then the batch mean), symmetric clipping epsilon 0.2,
  β = the row's kl_weight: the k3 KL estimator to the starting model as in the GRPO paper (DeepSeekMath), so
  TRL 1.16's default importance-weighting of that term (use_bias_correction_kl, from DeepSeek-V3.2) is off unless
  the row sets kl_bias_correction: true.
- dapo: the DAPO paper's parts that TRL 1.16 implements:
  in:  token-level policy-gradient loss (loss_type "dapo": normalised by the active tokens of the whole
       accumulated batch); clip-higher (epsilon 0.2, epsilon_high 0.28); overlong filtering
       (mask_truncated_completions: completions cut at max_completion_length leave the loss); soft overlong
       punishment (TRL's `get_soft_overlong_punishment` as a second reward, cache = overlong_buffer tokens,
       default 1/5 of max_completion_length as the paper's 4096 of 20480); no KL term (β = 0, no reference).
  out: dynamic sampling (over-sampling and dropping groups whose rewards are all equal): TRL 1.16 has no such
       option; it only logs their share as "frac_reward_zero_std", and their advantages are zero, so such groups
       add no policy gradient, though under "dapo" their tokens still count in the normaliser.
  The paper's ±1 accuracy reward is the 0/1 reward here; with group normalisation the advantages are the same.

Batch sizes follow TRL: per_device_train_batch_size counts completions, and per_device_train_batch_size x ranks
x gradient_accumulation_steps (one generation batch) must be a multiple of num_generations; each optimizer step
then samples that many completions for (that / num_generations) prompts. training.max_length is not applied:
TRL 1.16's GRPO does not truncate prompts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from asft import checkpoints
from asft.config_checks import gradient_accumulation_steps
from asft.config_files import ConfigError
from asft.data import DataFormatError, iter_json_objects, read_instruction_jsonl, template_prompt
from asft.layout import TRAIN_LOG
from asft.rewards import GOLD_COLUMN, REWARD_KINDS, REWARD_NAME, accuracy_reward, gold_answers
from asft.rl_objectives import objective_options
from asft.run_io import atomic_dir
from asft.stack_versions import stack_versions
from asft.train_io import (
    CheckpointFingerprintCallback,
    JsonlLogCallback,
    Snapshots,
    finish_run_files,
    peak_host_rss_gb,
    rank_resources,
    resource_summary,
    start_run_files,
)

log = logging.getLogger(__name__)

# TRL's metrics for the plots: the accuracy reward of the run's own function, the total (with DAPO's length
# penalty), KL to the reference (only logged when β > 0), completion lengths and clipping.
RL_LOG_KEYS = (
    "reward",
    "reward_std",
    f"rewards/{REWARD_NAME}/mean",
    f"rewards/{REWARD_NAME}/std",
    "rewards/soft_overlong_punishment_reward/mean",
    "frac_reward_zero_std",
    "reward_timeouts",
    "entropy",
    "completions/mean_length",
    "completions/clipped_ratio",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
)


def grpo_config_kwargs(spec: dict, accumulation: int | None = None) -> dict[str, Any]:
    """GRPOConfig's arguments from a run spec (no output folder, precision or distributed state: the run adds them).

    `accumulation` defaults to what the config resolves (`config_checks.gradient_accumulation_steps`).
    """
    settings, rl = spec["training"], spec["training"]["rl"]
    options = objective_options(spec)
    accumulation_steps = accumulation if accumulation is not None else gradient_accumulation_steps(settings)
    if rl["reward"] not in REWARD_KINDS:
        raise ConfigError(f"training.rl.reward: {rl['reward']!r}; expected one of {REWARD_KINDS}")
    report_to = [r for r in settings["report_to"] if r != "none"] or "none"
    vllm: dict[str, Any] = {"use_vllm": bool(rl["use_vllm"])}
    if rl["use_vllm"]:
        # vLLM inside the training processes, sharing their GPUs: no separate server to start.
        vllm.update(vllm_mode="colocate", vllm_gpu_memory_utilization=rl["vllm_gpu_memory_utilization"])
    return {
        "seed": spec["seed"],
        "data_seed": spec["seed"],
        "learning_rate": settings["learning_rate"],
        "lr_scheduler_type": settings["lr_scheduler_type"],
        "warmup_steps": float(settings["warmup_ratio"]),  # a float in [0, 1) is a ratio of all steps
        "weight_decay": settings["weight_decay"],
        **({"optim": settings["optim"]} if settings.get("optim") else {}),
        "num_train_epochs": settings["num_train_epochs"],
        "max_steps": settings["max_steps"],
        "per_device_train_batch_size": settings["per_device_train_batch_size"],
        "gradient_accumulation_steps": accumulation_steps,
        "activation_checkpointing": settings["gradient_checkpointing"],
        "logging_steps": settings["logging_steps"],
        "save_steps": settings["save_steps"],
        "save_total_limit": 2,
        "report_to": report_to,
        "deepspeed": settings["deepspeed"],
        "trust_remote_code": settings["trust_remote_code"],  # TRL loads a full fine-tune's reference itself
        "disable_tqdm": False,
        "log_completions": False,
        # The method
        "num_generations": rl["num_generations"],
        "max_completion_length": rl["max_completion_length"],
        "temperature": rl["temperature"],
        "loss_type": options["loss_type"],
        "beta": float(options["kl_weight"]),
        "epsilon": options["epsilon"],
        "epsilon_high": options["epsilon_high"],
        "mask_truncated_completions": options["mask_truncated_completions"],
        # micro-batches per rollout batch: `updates_per_rollout` optimizer steps each take `accumulation` of them.
        # With one, the policy that sampled is the one updated, so the PPO ratio is 1 and the clip never binds.
        "steps_per_generation": accumulation_steps * rl["updates_per_rollout"],
        "scale_rewards": options["scale_rewards"],
        "use_bias_correction_kl": bool(options["kl_bias_correction"]),
        **vllm,
    }


def rl_dataset(data_path: Path, settings: dict) -> Any:
    """The run's prompts with their ground truth (`gold`), the first `max_samples` records of the data file.

    Fails (DataFormatError naming file and line) on a record whose response states no answer, before any model
    loads. Prompts are the training template's, as SFT trains them.
    """
    from datasets import Dataset

    records = read_instruction_jsonl(data_path)
    lines = [line_no for line_no, _ in iter_json_objects(data_path, DataFormatError)]
    if settings["max_samples"] is not None:
        records, lines = records[: settings["max_samples"]], lines[: settings["max_samples"]]
    golds = gold_answers([r["response"] for r in records], lines, data_path, settings["rl"]["reward"])
    rows = [
        {"prompt": template_prompt(r["instruction"], settings["template"], "train"), GOLD_COLUMN: gold}
        for r, gold in zip(records, golds, strict=True)
    ]
    return Dataset.from_list(rows)


class StepSnapshots(Snapshots):
    """`Snapshots` driven by the step-end callback (GRPOTrainer has no per-step hook of its own).

    Step end comes before the Trainer's save, so a checkpoint still implies its earlier snapshots.
    """

    trainer: Any = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.after_step(self.trainer, state.global_step)


def _last_logged(history: Sequence[dict], key: str) -> float | None:
    for entry in reversed(history):
        if entry.get(key) is not None:
            return float(entry[key])
    return None


def _grpo_config(spec: dict, checkpoint_dir: Path, dtype: Any, accumulation: int, use_configured_state: bool) -> Any:
    import torch
    from trl import GRPOConfig

    kwargs = grpo_config_kwargs(spec, accumulation)
    try:
        return GRPOConfig(
            output_dir=str(checkpoint_dir),
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            # Reuse the distributed state `configure_cpu_deepspeed` set up instead of building a new one.
            **({"accelerator_config": {"use_configured_state": True}} if use_configured_state else {}),
            **kwargs,
        )
    except ValueError as err:  # batch sizes that hold no whole prompt group, num_generations < 2, ...
        raise ConfigError(f"training.rl: {err}") from err


def train_rl(
    model_dir: Path,
    data_path: Path,
    spec: dict,
    out_dir: Path,
    checkpoint_dir: Path,
    callbacks: Sequence[TrainerCallback] = (),
    reference_cache: Path | None = None,
) -> dict:
    """Train one GRPO/DAPO run and write the adapter (LoRA) or full weights plus logs to `out_dir`.

    The guarantees of `asft.training.train`: the output is assembled in a temp folder and renamed when finished;
    checkpoints (marked with the run's fingerprint) live in `checkpoint_dir` and a restarted job resumes the
    newest of its own; the step log and summary go into the output. The summary adds the RL facts (objective, its
    settings, the final mean accuracy reward, grading timeouts). The math grader's worker pool lives for the run.
    """
    from accelerate.utils import gather_object
    from trl import GRPOTrainer
    from trl.rewards import get_soft_overlong_punishment

    from asft.distributed import configure_cpu_deepspeed
    from asft.dtypes import training_dtype
    from asft.evaluation.grading import DEFAULT_TIMEOUT_S, MathGrader
    from asft.training import _load, _lora_config, resolve_accumulation

    wall_started = time.perf_counter()  # the whole job's wall time, Table 4 of the paper
    settings, rl = spec["training"], spec["training"]["rl"]
    if settings.get("reference", "live") == "cached" or reference_cache is not None:
        raise ConfigError("training.reference: cached applies to the SFT losses; RL computes its own reference")
    accumulation = resolve_accumulation(settings)
    options = objective_options(spec)
    dataset = rl_dataset(data_path, settings)  # fail on bad data before loading any model
    dtype = training_dtype(settings["dtype"])
    use_configured_state = configure_cpu_deepspeed(settings["deepspeed"])
    # The arguments before the model (under ZeRO-3 they make `from_pretrained` load it partitioned), and before
    # any file is touched: GRPOConfig refuses batch sizes that hold no whole prompt group.
    args = _grpo_config(spec, checkpoint_dir, dtype, accumulation, use_configured_state)

    is_main = int(os.environ.get("RANK", "0")) == 0
    fingerprint = checkpoints.run_fingerprint(spec, model_dir, data_path)
    snapshot_steps = sorted(settings["snapshot_steps"])
    resume = checkpoints.resumable_checkpoint(checkpoint_dir, fingerprint, snapshot_steps)
    with contextlib.ExitStack() as stack:
        # On failure the output folder is removed; the checkpoints and the log stay for a resume.
        tmp_dir = stack.enter_context(atomic_dir(out_dir, publish=is_main))
        if is_main:
            start_run_files(tmp_dir, checkpoint_dir, spec, fingerprint, resume)
        lora = settings["finetune"] == "lora"
        grader = stack.enter_context(MathGrader(timeout_s=DEFAULT_TIMEOUT_S)) if rl["reward"] == "math" else None
        accuracy = accuracy_reward(rl["reward"], grader)
        reward_funcs: list[Any] = [accuracy]
        if options["overlong_buffer"] > 0:
            reward_funcs.append(get_soft_overlong_punishment(rl["max_completion_length"], options["overlong_buffer"]))
        rss_before_load = peak_host_rss_gb()
        tokenizer, model, _ = _load(model_dir, dtype, settings["trust_remote_code"], with_reference=False)
        snapshots = StepSnapshots(checkpoint_dir, fingerprint, snapshot_steps) if snapshot_steps else None
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=_lora_config(settings) if lora else None,
            callbacks=[
                JsonlLogCallback(checkpoint_dir / TRAIN_LOG, extra_keys=RL_LOG_KEYS),
                CheckpointFingerprintCallback(checkpoint_dir, fingerprint),
                *([snapshots] if snapshots else []),
                *callbacks,
            ],
        )
        if snapshots is not None:
            snapshots.trainer = trainer
        # This rank's host peak before loading and after the trainer built its reference (a full fine-tune, β > 0).
        load_rss = (rss_before_load, peak_host_rss_gb())
        if resume:
            log.info("resuming from %s", resume)
        started = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        trainer.save_model(str(tmp_dir))  # every rank: ZeRO-3 gathers the shards; only the main process writes
        accelerator = trainer.accelerator
        per_rank = gather_object([rank_resources(accelerator.device, load_rss)])  # a collective: every rank, in order
        grading = gather_object([[accuracy.graded, accuracy.timeouts, accuracy.errors]])
        history = trainer.state.log_history
        summary = {
            "finetune": settings["finetune"],
            "global_step": trainer.state.global_step,
            "train_loss": result.training_loss if math.isfinite(result.training_loss) else None,
            "train_seconds": time.perf_counter() - started,
            "resumed_from": str(resume) if resume else None,
            "fingerprint": fingerprint,
            "examples": len(dataset),
            "examples_dropped_too_long": 0,  # RL keeps every prompt (no truncation in TRL's GRPO)
            "world_size": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type.value),
            "zero_stage": accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
            "gradient_accumulation_steps": accumulation,
            "global_batch_size": settings["per_device_train_batch_size"] * accumulation * accelerator.num_processes,
            "snapshot_steps": snapshot_steps,
            "train_runtime_seconds": result.metrics.get("train_runtime"),
            "resumed_from_step": checkpoints.checkpoint_step(resume) if resume else None,
            "timing_scope": "last_attempt" if resume else "whole_run",  # the grading counts too
            "rl": {
                **options,
                "reward": rl["reward"],
                "num_generations": rl["num_generations"],
                "max_completion_length": rl["max_completion_length"],
                "temperature": rl["temperature"],
                "use_vllm": bool(rl["use_vllm"]),
                # one optimizer step's completions are per-device batch x accumulation x ranks
                "prompts_per_step": args.per_device_train_batch_size
                * accumulation
                * accelerator.num_processes
                // rl["num_generations"],
                "updates_per_rollout": rl["updates_per_rollout"],
                "prompts_per_rollout": args.generation_batch_size // rl["num_generations"],
                "final_mean_reward": _last_logged(history, f"rewards/{REWARD_NAME}/mean"),
                "final_total_reward": _last_logged(history, "reward"),
                "final_kl": _last_logged(history, "kl"),
                "completions_graded": sum(g[0] for g in grading),
                "reward_timeouts": sum(g[1] for g in grading),
                "reward_errors": sum(g[2] for g in grading),
            },
            **resource_summary(per_rank),
            "stack": stack_versions(),  # the torch/transformers/TRL/PEFT/DeepSpeed/vLLM this run trained with
        }
        summary["wall_seconds"] = time.perf_counter() - wall_started
        if accelerator.is_main_process:
            tokenizer.save_pretrained(str(tmp_dir))
            finish_run_files(tmp_dir, checkpoint_dir, summary, snapshot_steps, fingerprint)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # tear the process group down before the interpreter does (see training.train)
    return summary
