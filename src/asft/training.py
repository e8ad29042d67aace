"""Training stage: TRL's SFTTrainer with the project's token-weighted / anchored losses.

The trainer runs one policy forward that stops at the final hidden states (no labels reach the model, so
Hugging Face computes no second loss and no full logits), and, when the mode needs it, one no-grad reference
forward: the same weights with the LoRA adapter disabled, or a frozen copy for full fine-tuning.
The loss itself comes from `asft.losses`, chunked over tokens so no [T, V] tensor exists.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from asft import checkpoints
from asft.data import DataFormatError, read_instruction_jsonl, to_prompt_completion
from asft.divergence import check_finite_step
from asft.losses import LossSpec, loss_from_hidden

log = logging.getLogger(__name__)

TRAIN_LOG = "train_log.jsonl"
RUN_SPEC = "run_spec.json"
SUMMARY = "train_summary.json"
LOGGED_STATS = ("ce", "kl", "weight_mean", "target_tokens")
# Tests only: "module:function" called with (step, checkpoint path) on every rank once a checkpoint is saved and
# marked, so a test can kill a job at a known point. Comes from the environment of the job, never from the config.
TEST_HOOK_ENV = "ASFT_TRAIN_TEST_HOOK"


def _unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM under any PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _backbone(causal_lm: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack whose output is the final (normed) hidden state."""
    return getattr(causal_lm, causal_lm.base_model_prefix)


@contextlib.contextmanager
def capture_final_hidden(causal_lm: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the backbone's last hidden state during a forward, however the model is wrapped."""
    captured: dict[str, torch.Tensor] = {}

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = _backbone(causal_lm).register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def final_hidden_states(
    model: torch.nn.Module, causal_lm: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Forward `model` (possibly DDP/DeepSpeed/PEFT-wrapped) and return the final hidden states.

    `logits_to_keep=1` makes the head project a single position, so no full logits are built.
    """
    with capture_final_hidden(causal_lm) as captured:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    return captured["hidden"]


def gathered_head(weight: torch.Tensor | None) -> contextlib.AbstractContextManager:
    """The whole weight of a frozen LM head (the full fine-tune's reference) also when ZeRO-3 has partitioned it.

    Outside its module's forward a ZeRO-3 parameter is an empty placeholder (it has `ds_id`); the loss needs no
    gradient of the reference, so a read-only gather for the duration of the loss is enough.
    """
    if weight is None or not hasattr(weight, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([weight], modifier_rank=None)


def loss_in_head_module(head: torch.nn.Module, compute: Callable[[], Any]) -> Any:
    """Run `compute` (the loss, which reads `head.weight`) as the LM-head module's forward.

    Under DeepSpeed ZeRO-3 the head is partitioned and only a module's own forward and backward see it whole:
    DeepSpeed's hooks gather it for the forward, gather it again when the backward reaches the module's output,
    and reduce-scatter the gradient that the chunked loss returns for it. A read-only gather would work for the
    forward but leave the trained head's gradient nowhere to go. Without ZeRO-3 the loss is simply computed.
    """
    if not hasattr(head.weight, "ds_id"):
        return compute()
    head.forward = compute  # instance attribute: Module.__call__ runs the hooks around it
    try:
        return head()
    finally:
        del head.forward


def _make_trainer_class() -> type:
    from trl import SFTTrainer

    class WeightedSFTTrainer(SFTTrainer):
        """SFTTrainer whose loss is one of the DESIGN.md modes, normalised per optimizer step."""

        def __init__(
            self,
            *args: Any,
            loss_spec: LossSpec,
            ref_model: torch.nn.Module | None = None,
            kl_log_every: int = 10,
            loss_scaling: str = "token",
            loss_chunk_size: int = 1024,
            **kwargs: Any,
        ) -> None:
            super().__init__(*args, **kwargs)
            self.loss_spec = loss_spec
            self.ref_model = ref_model
            self.kl_log_every = kl_log_every
            self.loss_scaling = loss_scaling
            self.loss_chunk_size = loss_chunk_size
            self._step_loss_finite: torch.Tensor | None = None
            self._step_loss: torch.Tensor | None = None
            # token: the loss is already Σ/N over the whole optimizer step; upstream: per-micro-batch means,
            # summed over accumulation steps (the paper's code). Either way Trainer must not divide again.
            self.loss_is_scaled_for_ga = True
            # Makes Trainer count the step's target tokens (num_items_in_batch) across micro-batches and ranks.
            self.model_accepts_loss_kwargs = loss_scaling == "token"
            if ref_model is not None and self.is_deepspeed_enabled:
                from trl.models.utils import prepare_deepspeed

                self.ref_model = prepare_deepspeed(ref_model, self.accelerator)
            elif ref_model is not None:
                self.ref_model = ref_model.to(self.accelerator.device)

        def training_step(self, model: torch.nn.Module, inputs: dict, num_items_in_batch: Any = None) -> torch.Tensor:
            loss = super().training_step(model, inputs, num_items_in_batch)
            # Kept on the device (no synchronisation per micro-batch); checked once per optimizer step.
            finite = torch.isfinite(loss.detach())
            self._step_loss_finite = finite if self._step_loss_finite is None else self._step_loss_finite & finite
            self._step_loss = self._step_loss + loss.detach() if self._step_loss is not None else loss.detach()
            return loss

        def _maybe_log_save_evaluate(self, tr_loss: torch.Tensor, grad_norm: Any, model: Any, *args: Any, **kw: Any):
            """Stop on a non-finite step before it is logged or checkpointed, so the last checkpoint is good.

            Trainer passes the norm it computed before the optimizer step; DeepSpeed's engine computes the norm
            inside its step and hands out the previous step's until then, so it is asked again here.
            """
            if self.is_deepspeed_enabled:
                grad_norm = self._get_grad_norm(model)
            loss_finite, step_loss = self._step_loss_finite, self._step_loss
            self._step_loss_finite = self._step_loss = None
            # An fp16 loss scaler skips overflowing steps by design (the norm is inf, the weights untouched).
            skipped = self.accelerator.optimizer_step_was_skipped
            check_finite_step(self.state.global_step, step_loss, loss_finite, None if skipped else grad_norm)
            return super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, *args, **kw)

        def _logs_drift_now(self) -> bool:
            """Modes without an anchor still run the reference every `kl_log_every` steps, to log the drift."""
            return self.model.training and self.kl_log_every > 0 and self.state.global_step % self.kl_log_every == 0

        def _reference_hidden(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
            """The frozen starting model's final hidden states (and its head, for full fine-tuning)."""
            with torch.no_grad():
                if self.ref_model is not None:
                    ref_lm = _unwrap_peft(self.accelerator.unwrap_model(self.ref_model))
                    hidden = final_hidden_states(self.ref_model, ref_lm, inputs["input_ids"], inputs["attention_mask"])
                    return hidden, ref_lm.get_output_embeddings().weight
                peft_model = self.accelerator.unwrap_model(self.model)
                with peft_model.disable_adapter():
                    causal_lm = _unwrap_peft(peft_model)
                    hidden = final_hidden_states(peft_model, causal_lm, inputs["input_ids"], inputs["attention_mask"])
                return hidden, None

        def _gather_stats(self, stats: dict[str, float | int], with_kl: bool) -> dict[str, list[float]]:
            """Every rank's per-micro-batch statistics, so the log describes the whole step, not rank 0's share.

            Every rank calls this at the same point with the same keys (with_kl depends only on the step), as
            the collective requires.
            """
            keys = [k for k in LOGGED_STATS if stats.get(k) is not None and (with_kl or k != "kl")]
            local = torch.tensor([[float(stats[k]) for k in keys]], dtype=torch.float64, device=self.accelerator.device)
            if self.accelerator.num_processes > 1:
                local = self.accelerator.gather(local)  # [world, keys]
            return {key: local[:, i].tolist() for i, key in enumerate(keys)}

        def compute_loss(
            self,
            model: torch.nn.Module,
            inputs: dict[str, torch.Tensor],
            return_outputs: bool = False,
            num_items_in_batch: torch.Tensor | int | None = None,
        ) -> torch.Tensor:
            if return_outputs:
                raise NotImplementedError("WeightedSFTTrainer does not build logits for compute_metrics")
            causal_lm = _unwrap_peft(self.accelerator.unwrap_model(model))
            hidden = final_hidden_states(model, causal_lm, inputs["input_ids"], inputs["attention_mask"])
            ref_hidden = ref_head = None
            if self.loss_spec.needs_reference or self._logs_drift_now():
                ref_hidden, ref_head = self._reference_hidden(inputs)
            num_target_tokens = num_items_in_batch if self.loss_scaling == "token" else None
            head = causal_lm.get_output_embeddings()

            def compute() -> tuple[torch.Tensor, dict]:
                with gathered_head(ref_head):
                    return loss_from_hidden(
                        hidden,
                        head.weight,
                        inputs["labels"],
                        self.loss_spec,
                        ref_hidden=ref_hidden,
                        ref_lm_head_weight=ref_head,
                        num_target_tokens=num_target_tokens,
                        chunk_size=self.loss_chunk_size,
                    )

            loss, stats = loss_in_head_module(head, compute)
            if (
                self.loss_scaling == "token"
                and num_items_in_batch is not None
                and self.args.average_tokens_across_devices
            ):
                # N counts every rank's tokens and DDP averages gradients across ranks.
                loss = loss * self.accelerator.num_processes
            mode = "train" if self.model.training else "eval"
            for key, values in self._gather_stats(stats, with_kl=ref_hidden is not None).items():
                self._metrics[mode][key].extend(values)
            if mode == "train":
                self._total_train_tokens += int(inputs["attention_mask"].sum())
                self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return loss

    return WeightedSFTTrainer


class JsonlLogCallback(TrainerCallback):
    """Writes each logging step (loss, CE, KL, mean weight, lr, tokens/s) as one JSON line for the plots."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last_time: float | None = None
        self._last_tokens = 0.0
        self._last_step = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last_time = time.perf_counter()
        self._last_step = state.global_step

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now = time.perf_counter()
        tokens = float(logs.get("num_tokens", self._last_tokens))
        elapsed = now - (self._last_time or now)
        record = {"step": state.global_step, "epoch": logs.get("epoch")}
        for key in ("loss", *LOGGED_STATS, "learning_rate", "grad_norm"):
            if key in logs:
                record[key] = float(logs[key])
        steps = state.global_step - self._last_step
        record["tokens_per_second"] = (tokens - self._last_tokens) / elapsed if elapsed > 0 else None
        record["step_seconds"] = elapsed / steps if steps > 0 else None
        self._last_time, self._last_tokens, self._last_step = now, tokens, state.global_step
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def resolve_dtype(name: str) -> torch.dtype | str:
    """`auto`: bf16 on a GPU that supports it, else float32 (CPU training in half precision is slow and lossy)."""
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


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


def _configure_cpu_deepspeed(settings: dict) -> bool:
    """Set up DeepSpeed over gloo on CPU ranks (DS_ACCELERATOR=cpu, under torchrun); False when not asked for.

    accelerate starts DeepSpeed only on devices with their own collective backend: on CPU it would initialise the
    process group but count one process (wrong batch size, no gradient reduction). Configuring its state with
    the gloo backend first, for the Trainer to reuse, gives the real DeepSpeed engine on CPU ranks: what tests
    and GPU-less debugging of the ZeRO paths use.
    """
    if not settings["deepspeed"] or os.environ.get("DS_ACCELERATOR") != "cpu" or "LOCAL_RANK" not in os.environ:
        return False
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    return True


def _sft_config(
    settings: dict, seed: int, checkpoint_dir: Path, dtype: torch.dtype, use_configured_state: bool = False
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
        gradient_accumulation_steps=settings["gradient_accumulation_steps"],
        activation_checkpointing=settings["gradient_checkpointing"],
        max_length=settings["max_length"],
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        logging_steps=settings["logging_steps"],
        save_steps=settings["save_steps"],
        save_total_limit=2,
        report_to=report_to,
        deepspeed=settings["deepspeed"],
        **({"accelerator_config": {"use_configured_state": True}} if use_configured_state else {}),
        completion_only_loss=True,
        packing=False,
        dataset_num_proc=None,
        disable_tqdm=False,
    )


def data_parallel_command(argv: list[str], num_processes: int) -> list[str] | None:
    """The torchrun command that runs this same `asft` command once per rank; None when no launch is needed.

    None for one process, and inside a launched rank (LOCAL_RANK set), so a rank never launches again.
    """
    if num_processes <= 1 or "LOCAL_RANK" in os.environ:
        return None
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}"]
    return [*launcher, "-m", "asft.cli", *argv]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def check_devices(num_processes: int, deepspeed: str | None = None) -> None:
    """Fail before loading anything when the ranks cannot run as configured.

    A GPU job needs a GPU per rank. CPU ranks are for tests and debugging: plain DDP with ACCELERATE_USE_CPU=true,
    DeepSpeed with DS_ACCELERATOR=cpu. accelerate ignores a DeepSpeed config when ACCELERATE_USE_CPU is set and
    would silently train plain DDP instead, so that combination is refused.
    """
    from asft.config import ConfigError

    if deepspeed and _env_flag("ACCELERATE_USE_CPU"):
        raise ConfigError(
            "training.deepspeed is set but ACCELERATE_USE_CPU=true makes accelerate ignore it (the ranks would run "
            "plain DDP); for DeepSpeed on CPU ranks set DS_ACCELERATOR=cpu instead"
        )
    if num_processes <= 1 or _env_flag("ACCELERATE_USE_CPU"):
        return
    if deepspeed and os.environ.get("DS_ACCELERATOR") == "cpu":
        return
    visible = torch.cuda.device_count()
    if visible < num_processes:
        raise ConfigError(
            f"training.num_processes is {num_processes} but this job sees {visible} GPU(s): give the train rule "
            f"{num_processes} GPUs (profile set-resources: train: gpu: {num_processes}), or, for CPU ranks, set "
            "ACCELERATE_USE_CPU=true (DDP) or DS_ACCELERATOR=cpu (DeepSpeed)"
        )


class CheckpointFingerprintCallback(TrainerCallback):
    """Marks each checkpoint with the run's fingerprint once every rank has saved its part, and drops the
    previous settings' checkpoints once this run has one of its own."""

    def __init__(self, checkpoint_dir: Path, fingerprint: str) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.fingerprint = fingerprint
        self.test_hook = _load_test_hook()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # a checkpoint is resumable only once every rank's shard is on disk
        checkpoint = self.checkpoint_dir / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero:
            checkpoints.mark_checkpoint(checkpoint, self.fingerprint)
            checkpoints.remove_stale(self.checkpoint_dir)
        if self.test_hook is not None:
            self.test_hook(state.global_step, checkpoint)


def _load_test_hook() -> Callable[[int, Path], None] | None:
    spec = os.environ.get(TEST_HOOK_ENV)
    if not spec:
        return None
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


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


def train(
    model_dir: Path,
    data_path: Path,
    spec: dict,
    out_dir: Path,
    checkpoint_dir: Path,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict:
    """Train one run and write the adapter (LoRA) or full weights plus logs to `out_dir`.

    Checkpoints go to `checkpoint_dir`, outside the declared output; a restarted job resumes from the newest one
    written for the same settings (`asft.checkpoints`). The output is assembled in a sibling temp dir and renamed
    at the end, so a failed job leaves nothing that looks complete. `callbacks` are extra Trainer callbacks.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = spec["training"]
    loss_spec = LossSpec.from_config(spec["loss"])
    records = read_instruction_jsonl(data_path)  # fail on bad data before loading any model
    if settings["max_samples"] is not None:
        records = records[: settings["max_samples"]]
    dataset = Dataset.from_list([to_prompt_completion(r, settings["template"]) for r in records])

    # Under torchrun/accelerate every rank runs this function. Every rank decides the same resume point from the
    # files (a matching checkpoint is never moved); only the main process changes the run's files, so no rank
    # deletes or truncates what another is reading or writing. The rank comes from the launcher's environment:
    # the distributed state itself is set up later, by the Trainer.
    is_main = int(os.environ.get("RANK", "0")) == 0
    fingerprint = checkpoints.run_fingerprint(spec, model_dir, data_path)
    resume = checkpoints.resumable_checkpoint(checkpoint_dir, fingerprint)
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    log_path = checkpoint_dir / TRAIN_LOG
    if is_main:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        checkpoints.set_aside_stale(checkpoint_dir, fingerprint)
        (tmp_dir / RUN_SPEC).write_text(json.dumps(spec, indent=2, sort_keys=True))
        checkpoints.truncate_log(log_path, checkpoints.checkpoint_step(resume) if resume else 0)

    dtype = resolve_dtype(settings["dtype"])
    trust = settings["trust_remote_code"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust)
    lora = settings["finetune"] == "lora"
    ref_model = None
    if not lora and (loss_spec.needs_reference or settings["kl_log_every"] > 0):
        ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust)
        ref_model.eval().requires_grad_(False)

    trainer_class = _make_trainer_class()
    try:
        trainer = trainer_class(
            model=model,
            args=_sft_config(settings, spec["seed"], checkpoint_dir, dtype, _configure_cpu_deepspeed(settings)),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=_lora_config(settings) if lora else None,
            callbacks=[JsonlLogCallback(log_path), CheckpointFingerprintCallback(checkpoint_dir, fingerprint)]
            + list(callbacks),
            loss_spec=loss_spec,
            ref_model=ref_model,
            kl_log_every=settings["kl_log_every"],
            loss_scaling=settings["loss_scaling"],
            loss_chunk_size=settings["loss_chunk_size"],
        )
        dropped = check_dataset_size(data_path, len(dataset), len(trainer.train_dataset), settings["max_length"])
        if resume:
            log.info("resuming from %s", resume)
        started = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        trainer.save_model(str(tmp_dir))  # every rank: ZeRO-3 gathers the shards; only the main process writes
    except BaseException:
        if is_main:  # nothing of a failed job may look like output; the checkpoints and the log stay for a resume
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    summary = {
        "finetune": settings["finetune"],
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss if math.isfinite(result.training_loss) else None,
        "train_seconds": time.perf_counter() - started,
        "resumed_from": str(resume) if resume else None,
        "fingerprint": fingerprint,
        "examples": len(dataset),
        "examples_dropped_too_long": dropped,
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type.value),  # NO, MULTI_GPU, DEEPSPEED, ...
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
    }
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(str(tmp_dir))
        if not log_path.exists():
            log_path.touch()
        shutil.copyfile(log_path, tmp_dir / TRAIN_LOG)
        (tmp_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
        checkpoints.remove_checkpoints(checkpoint_dir)  # a finished run is no resume point for a later job
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp_dir, out_dir)
    trainer.accelerator.wait_for_everyone()
    return summary
