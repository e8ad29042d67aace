"""Training stage: one run of `WeightedSFTTrainer` (asft.trainer) from a model directory, a data file and a spec.

The method is in `asft.trainer`, multi-rank and DeepSpeed plumbing in `asft.distributed`, the run's log and
checkpoint marks in `asft.train_io`, and which checkpoint a job may resume in `asft.checkpoints`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback

from asft import checkpoints
from asft.config_checks import gradient_accumulation_steps
from asft.config_files import ConfigError
from asft.data import DataFormatError, read_instruction_jsonl, to_prompt_completion
from asft.distributed import check_devices, configure_cpu_deepspeed, data_parallel_command, loss_in_head_module
from asft.dtypes import training_dtype
from asft.layout import RUN_SPEC, TRAIN_LOG
from asft.layout import TRAIN_SUMMARY as SUMMARY
from asft.losses import LossSpec
from asft.run_io import atomic_dir
from asft.stack_versions import stack_versions
from asft.train_io import (
    TEST_HOOK_ENV,
    CheckpointFingerprintCallback,
    JsonlLogCallback,
    Snapshots,
    finish_run_files,
    peak_host_rss_gb,
    rank_resources,
    resource_summary,
    start_run_files,
)
from asft.trainer import WeightedSFTTrainer, final_hidden_states

# Names importers use from here; they live in the modules above.
__all__ = [
    "RUN_SPEC",
    "SUMMARY",
    "TEST_HOOK_ENV",
    "TRAIN_LOG",
    "check_dataset_size",
    "check_devices",
    "data_parallel_command",
    "final_hidden_states",
    "loss_in_head_module",
    "train",
    "training_dataset",
]

log = logging.getLogger(__name__)


def _lora_config(settings: dict) -> Any:
    from peft import LoraConfig

    lora = settings["lora"]
    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        task_type="CAUSAL_LM",
    )


def tokenisation_args(settings: dict) -> dict[str, Any]:
    """The SFTConfig fields that decide how examples become input_ids and labels: shared by training and the
    reference stage (asft.reference_stage), so a reference cache aligns with the batches a run draws."""
    return {
        "max_length": settings["max_length"],
        "completion_only_loss": True,
        "packing": False,
        "dataset_num_proc": None,
    }


def _sft_config(
    settings: dict,
    seed: int,
    checkpoint_dir: Path,
    dtype: torch.dtype,
    accumulation: int,
    use_configured_state: bool = False,
) -> Any:
    from trl import SFTConfig

    report_to = [r for r in settings["report_to"] if r != "none"] or "none"
    return SFTConfig(
        output_dir=str(checkpoint_dir),
        seed=seed,
        data_seed=seed,
        learning_rate=settings["learning_rate"],
        lr_scheduler_type=settings["lr_scheduler_type"],
        warmup_steps=float(settings["warmup_ratio"]),  # a float in [0, 1) is a ratio of all steps
        weight_decay=settings["weight_decay"],
        **({"optim": settings["optim"]} if settings["optim"] else {}),
        num_train_epochs=settings["num_train_epochs"],
        max_steps=settings["max_steps"],
        per_device_train_batch_size=settings["per_device_train_batch_size"],
        gradient_accumulation_steps=accumulation,
        activation_checkpointing=settings["gradient_checkpointing"],
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        logging_steps=settings["logging_steps"],
        save_steps=settings["save_steps"],
        save_total_limit=2,
        report_to=report_to,
        deepspeed=settings["deepspeed"],
        # Reuse the distributed state `configure_cpu_deepspeed` set up instead of building a new one.
        **({"accelerator_config": {"use_configured_state": True}} if use_configured_state else {}),
        **tokenisation_args(settings),
        disable_tqdm=False,
    )


def _load(model_dir: Path, dtype: torch.dtype, trust: bool, with_reference: bool) -> tuple[Any, Any, Any]:
    """The tokenizer, the model to train and, if asked for, a frozen copy of it as the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust)
    ref_model = None
    if with_reference:
        ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust)
        ref_model.eval().requires_grad_(False)
    return tokenizer, model, ref_model


def training_dataset(data_path: Path, settings: dict, with_ids: bool = False) -> Any:
    """The run's examples as TRL prompt/completion rows (the first `max_samples` records of the data file).

    with_ids: each row also carries `example_id`, its record's index in the file (the key of a reference cache,
    `asft.reference_cache`), which TRL's tokenisation keeps beside input_ids and labels.
    """
    from datasets import Dataset

    records = read_instruction_jsonl(data_path)
    if settings["max_samples"] is not None:
        records = records[: settings["max_samples"]]
    rows = [to_prompt_completion(r, settings["template"]) for r in records]
    if with_ids:
        rows = [{**row, "example_id": index} for index, row in enumerate(rows)]
    return Dataset.from_list(rows)


def _open_reference_cache(model_dir: Path, data_path: Path, settings: dict, path: Path | None) -> Any:
    """The run's reference cache, refused (ConfigError) if missing or built for other settings."""
    from asft.reference_cache import open_cache
    from asft.reference_stage import cache_identity

    if path is None:
        raise ConfigError("training.reference: cached, but no reference cache was given (`asft train --reference`)")
    try:
        cache = open_cache(path, cache_identity(model_dir, data_path, settings))
    except ValueError as err:
        raise ConfigError(f"training.reference: cached: {err}") from err
    if cache.k != settings["reference_samples"]:
        raise ConfigError(
            f"training.reference_samples: {settings['reference_samples']}, but the cache {path} holds "
            f"{cache.k} samples per token"
        )
    return cache


def check_dataset_size(data_path: Path, before: int, after: int, max_length: int) -> int:
    """How many examples tokenisation dropped (no completion token left within max_length); an error if all."""
    dropped = before - after
    if after == 0:
        raise DataFormatError(
            f"{data_path}: all {before} examples have no response token within training.max_length={max_length} "
            "(their prompts alone fill it); raise training.max_length or shorten the prompts"
        )
    if dropped:
        log.warning(
            "%s: %d of %d examples dropped: their prompts fill training.max_length=%d",
            data_path,
            dropped,
            before,
            max_length,
        )
    return dropped


def resolve_accumulation(settings: dict) -> int:
    """The run's gradient accumulation steps (derived from global_batch_size when set), as validation resolved them.

    With global_batch_size set the launched world must be the configured one, or the global batch would silently
    differ from the configured one.
    """
    try:
        accumulation = gradient_accumulation_steps(settings)
    except ValueError as err:
        raise ConfigError(f"training.global_batch_size: {err}") from err
    world = int(os.environ.get("WORLD_SIZE", "1"))
    nodes = settings.get("num_nodes", 1)
    if nodes > 1 and world != settings["num_processes"] * nodes:
        raise ConfigError(
            f"training.num_nodes: {nodes} x num_processes {settings['num_processes']} ranks, but this job runs "
            f"{world}: a multi-node run is launched by `asft train` inside its Slurm job (srun + torchrun)"
        )
    if settings["global_batch_size"] is not None and world != settings["num_processes"] * nodes:
        raise ConfigError(
            f"training.global_batch_size: {settings['global_batch_size']} was divided over num_processes "
            f"{settings['num_processes']} x num_nodes {nodes} ranks, but this job runs {world}"
        )
    return accumulation


def train(
    model_dir: Path,
    data_path: Path,
    spec: dict,
    out_dir: Path,
    checkpoint_dir: Path,
    callbacks: Sequence[TrainerCallback] = (),
    reference_cache: Path | None = None,
) -> dict:
    """Train one run and write the adapter (LoRA) or full weights plus logs to `out_dir`.

    Checkpoints go to `checkpoint_dir`, outside the declared output; a restarted job resumes from the newest one
    written for the same settings (`asft.checkpoints`). The output is assembled in a sibling temp dir and renamed
    at the end, so a failed job leaves nothing that looks complete. `callbacks` are extra Trainer callbacks.
    Snapshots at `training.snapshot_steps` are kept beside the checkpoints and moved into `out_dir/snapshots/`.
    With `training.reference: cached`, `reference_cache` is the folder `asft reference` wrote for this model, data
    and training settings (its identity is checked): no reference model is loaded and no reference forward runs.
    The summary records what paper Table 4 reports: wall time, accelerator, peak GPU and host memory per rank.
    """
    if spec["loss"].get("objective", "sft") != "sft":  # GRPO/DAPO: TRL's GRPOTrainer, same run guarantees
        from asft import rl

        return rl.train_rl(model_dir, data_path, spec, out_dir, checkpoint_dir, callbacks, reference_cache)
    wall_started = time.perf_counter()  # the whole job's wall time, Table 4 of the paper
    settings = spec["training"]
    accumulation = resolve_accumulation(settings)
    loss_spec = LossSpec.from_config(spec["loss"])
    cached = settings.get("reference", "live") == "cached"
    dataset = training_dataset(data_path, settings, with_ids=cached)  # fail on bad data before loading any model
    cache = _open_reference_cache(model_dir, data_path, settings, reference_cache) if cached else None

    # Under torchrun/accelerate every rank runs this function. Every rank decides the same resume point from the
    # files (a matching checkpoint is never moved); only the main process changes the run's files, so no rank
    # deletes or truncates what another is reading or writing. The rank comes from the launcher's environment:
    # the distributed state itself is set up later, by the Trainer.
    is_main = int(os.environ.get("RANK", "0")) == 0
    fingerprint = checkpoints.run_fingerprint(spec, model_dir, data_path)
    snapshot_steps = sorted(settings["snapshot_steps"])
    resume = checkpoints.resumable_checkpoint(checkpoint_dir, fingerprint, snapshot_steps)
    # On failure the output folder is removed; the checkpoints and the log stay for a resume.
    with atomic_dir(out_dir, publish=is_main) as tmp_dir:
        if is_main:
            start_run_files(tmp_dir, checkpoint_dir, spec, fingerprint, resume)

        dtype = training_dtype(settings["dtype"])
        lora = settings["finetune"] == "lora"
        # LoRA's reference is the policy with its adapter disabled; a full fine-tune needs a frozen copy.
        needs_copy = not lora and cache is None and (loss_spec.needs_reference or settings["kl_log_every"] > 0)
        use_configured_state = configure_cpu_deepspeed(settings["deepspeed"])
        # The arguments before the models: with a ZeRO-3 config they hold the HfDeepSpeedConfig that makes
        # `from_pretrained` build the policy and the reference partitioned (deepspeed.zero.Init; rank 0 alone reads
        # the checkpoint's values), so a rank keeps 1/world of each instead of two whole models. transformers holds
        # that config by weak reference only: `args` keeps it alive. Without ZeRO-3 (DDP, ZeRO-2) loading is as before.
        args = _sft_config(settings, spec["seed"], checkpoint_dir, dtype, accumulation, use_configured_state)
        rss_before_load = peak_host_rss_gb()
        tokenizer, model, ref_model = _load(model_dir, dtype, settings["trust_remote_code"], needs_copy)
        load_rss = (rss_before_load, peak_host_rss_gb())  # this rank's host peak before and after loading
        trainer = WeightedSFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=_lora_config(settings) if lora else None,
            callbacks=[
                JsonlLogCallback(checkpoint_dir / TRAIN_LOG),
                CheckpointFingerprintCallback(checkpoint_dir, fingerprint),
                *callbacks,
            ],
            loss_spec=loss_spec,
            ref_model=ref_model,
            kl_log_every=settings["kl_log_every"],
            loss_scaling=settings["loss_scaling"],
            loss_chunk_size=settings["loss_chunk_size"],
            snapshots=Snapshots(checkpoint_dir, fingerprint, snapshot_steps) if snapshot_steps else None,
            reference_cache=cache,
        )
        dropped = check_dataset_size(data_path, len(dataset), len(trainer.train_dataset), settings["max_length"])
        if resume:
            log.info("resuming from %s", resume)
        started = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        trainer.save_model(str(tmp_dir))  # every rank: ZeRO-3 gathers the shards; only the main process writes
        accelerator = trainer.accelerator
        per_rank = gather_object([rank_resources(accelerator.device, load_rss)])  # a collective: every rank, in order
        summary = {
            "finetune": settings["finetune"],
            "global_step": trainer.state.global_step,
            "train_loss": result.training_loss if math.isfinite(result.training_loss) else None,
            "train_seconds": time.perf_counter() - started,
            "resumed_from": str(resume) if resume else None,
            "fingerprint": fingerprint,
            "examples": len(dataset),
            "examples_dropped_too_long": dropped,
            "world_size": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type.value),  # NO, MULTI_GPU, DEEPSPEED, ...
            "zero_stage": accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
            "gradient_accumulation_steps": accumulation,
            "global_batch_size": settings["per_device_train_batch_size"] * accumulation * accelerator.num_processes,
            "snapshot_steps": snapshot_steps,
            "train_runtime_seconds": result.metrics.get("train_runtime"),
            "resumed_from_step": checkpoints.checkpoint_step(resume) if resume else None,
            # A resumed job cannot know how long its killed attempts ran: its times cover this attempt only.
            "timing_scope": "last_attempt" if resume else "whole_run",
            **resource_summary(per_rank),
            "stack": stack_versions(),  # the torch/transformers/TRL/PEFT/DeepSpeed/vLLM this run trained with
        }
        summary["wall_seconds"] = time.perf_counter() - wall_started
        if accelerator.is_main_process:
            tokenizer.save_pretrained(str(tmp_dir))
            finish_run_files(tmp_dir, checkpoint_dir, summary, snapshot_steps, fingerprint)
    accelerator.wait_for_everyone()
    # Tear the process group down before the interpreter does: left to exit, a gloo rank can abort in C++
    # ("terminate called without an active exception") after the run has finished.
    accelerator.end_training()
    return summary
