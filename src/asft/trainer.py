"""The method: TRL's SFTTrainer with the project's token-weighted and anchored losses (docs/ARCHITECTURE.md).

One policy forward stops at the final hidden states (no labels reach the model, so Hugging Face computes no second
loss and no full logits) and, when the mode needs it, one no-grad reference forward: the same weights with the
LoRA adapter disabled, or a frozen copy for full fine-tuning; with `training.reference: cached` no reference
forward at all: the batch's rows of the reference cache instead (`asft.reference_cache`). The loss itself comes
from `asft.losses`, chunked over tokens so no [T, V] tensor exists. Importing this module loads TRL: only the train
stage imports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers.trainer_utils import unwrap_peft_model
from trl import SFTTrainer

from asft.distributed import gathered_head, loss_in_head_module, prepare_reference_model
from asft.divergence import check_finite_step
from asft.losses import LossSpec, loss_from_hidden, shifted_targets
from asft.train_io import LOGGED_STATS, Snapshots
from asft.trl_compat import TrainerInternals


@contextlib.contextmanager
def capture_final_hidden(causal_lm: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the backbone's last (normed) hidden state during a forward, however the model is wrapped."""
    captured: dict[str, torch.Tensor] = {}

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    backbone = getattr(causal_lm, causal_lm.base_model_prefix)  # the decoder stack under the LM head
    handle = backbone.register_forward_hook(hook)
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


EXAMPLE_ID = "example_id"  # the column keying a row to its reference-cache entry (asft.training.training_dataset)


class CollatorWithExampleIds:
    """Wraps a collator: takes each example's `example_id` out before collating and adds them as a tensor [B]."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [example[EXAMPLE_ID] for example in examples]
        batch = self.collator([{k: v for k, v in example.items() if k != EXAMPLE_ID} for example in examples])
        batch[EXAMPLE_ID] = torch.tensor(ids, dtype=torch.long)
        return batch


class WeightedSFTTrainer(TrainerInternals, SFTTrainer):
    """SFTTrainer whose loss is one of the modes of docs/ARCHITECTURE.md, normalised per optimizer step."""

    def __init__(
        self,
        *args: Any,
        loss_spec: LossSpec,
        ref_model: torch.nn.Module | None = None,
        kl_log_every: int = 10,
        loss_scaling: str = "token",
        loss_chunk_size: int = 1024,
        snapshots: Snapshots | None = None,
        reference_cache: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        # With a cached reference (asft.reference_cache.ReferenceCache) each batch carries its rows' example ids
        # and the loss reads the reference's statistics from the cache: no reference forward, no reference model.
        self.reference_cache = reference_cache
        if reference_cache is not None:
            if ref_model is not None:
                raise ValueError("a cached reference replaces the reference model: pass one of them")
            self.data_collator = CollatorWithExampleIds(self.data_collator)
        self.snapshots = snapshots
        if snapshots is not None:
            self.add_callback(snapshots)
        self.loss_spec = loss_spec
        self.kl_log_every = kl_log_every
        self.loss_scaling = loss_scaling
        self.loss_chunk_size = loss_chunk_size
        # The current optimizer step's summed loss and whether every micro-batch's loss was finite, kept on the
        # device (no synchronisation per micro-batch) until `check_step`.
        self._step_loss: torch.Tensor | None = None
        self._step_loss_finite: torch.Tensor | None = None
        # token: the loss is already Σ/N over the whole optimizer step, N counted by Trainer; upstream: per-micro-
        # batch means, summed over accumulation steps (the paper's code). Either way Trainer must not divide again.
        self.normalise_loss_per_step(count_step_tokens=loss_scaling == "token")
        self.ref_model = prepare_reference_model(ref_model, self.accelerator, self.is_deepspeed_enabled)

    def training_step(self, model: torch.nn.Module, inputs: dict, num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss.detach())
        self._step_loss_finite = finite if self._step_loss_finite is None else self._step_loss_finite & finite
        self._step_loss = self._step_loss + loss.detach() if self._step_loss is not None else loss.detach()
        return loss

    def check_step(self, grad_norm: Any) -> None:
        """Stop on a non-finite step before it is logged or checkpointed, so the last checkpoint is good; then keep
        a snapshot if this step is one, before its checkpoint, so a checkpoint implies its earlier snapshots."""
        loss_finite, step_loss = self._step_loss_finite, self._step_loss
        self._step_loss_finite = self._step_loss = None
        # An fp16 loss scaler skips overflowing steps by design (the norm is inf, the weights untouched).
        skipped = self.accelerator.optimizer_step_was_skipped
        check_finite_step(self.state.global_step, step_loss, loss_finite, None if skipped else grad_norm)
        if self.snapshots is not None:
            self.snapshots.after_step(self, self.state.global_step)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.reference_cache is not None and EXAMPLE_ID not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, EXAMPLE_ID]  # kept through remove_unused_columns

    def _logs_drift_now(self) -> bool:
        """Modes without an anchor still run the reference every `kl_log_every` steps, to log the drift."""
        return self.model.training and self.kl_log_every > 0 and self.state.global_step % self.kl_log_every == 0

    def _reference_hidden(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen starting model's final hidden states (and its head, for full fine-tuning)."""
        with torch.no_grad():
            if self.ref_model is not None:
                ref_lm = unwrap_peft_model(self.accelerator.unwrap_model(self.ref_model))
                hidden = final_hidden_states(self.ref_model, ref_lm, inputs["input_ids"], inputs["attention_mask"])
                return hidden, ref_lm.get_output_embeddings().weight
            peft_model = self.accelerator.unwrap_model(self.model)
            with peft_model.disable_adapter():
                causal_lm = unwrap_peft_model(peft_model)
                hidden = final_hidden_states(peft_model, causal_lm, inputs["input_ids"], inputs["attention_mask"])
            return hidden, None

    def _gather_stats(self, stats: dict[str, float | int], with_kl: bool) -> dict[str, list[float]]:
        """Every rank's per-micro-batch statistics, so the log describes the whole step, not rank 0's share.

        Every rank calls this at the same point with the same keys (with_kl depends only on the step), as the
        collective requires.
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
        causal_lm = unwrap_peft_model(self.accelerator.unwrap_model(model))
        example_ids = inputs.pop(EXAMPLE_ID, None)
        hidden = final_hidden_states(model, causal_lm, inputs["input_ids"], inputs["attention_mask"])
        ref_hidden = ref_head = cached = None
        if self.reference_cache is not None:
            if example_ids is None:
                raise ValueError(f"a cached reference needs the batch's {EXAMPLE_ID!r} (CollatorWithExampleIds)")
            cached = self.reference_cache.batch(
                example_ids.tolist(), targets=shifted_targets(inputs["labels"])[1], device=hidden.device
            )
        elif self.loss_spec.needs_reference or self._logs_drift_now():
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
                    cached=cached,
                )

        loss, stats = loss_in_head_module(head, compute)
        if self.loss_scaling == "token" and num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # N counts every rank's tokens and DDP averages gradients across ranks.
            loss = loss * self.accelerator.num_processes
        mode = "train" if self.model.training else "eval"
        # As live: the KL is logged wherever the reference is read (cached: the sampled estimate's mean).
        reads_reference = self.loss_spec.needs_reference or self._logs_drift_now()
        with_kl = ref_hidden is not None or (cached is not None and reads_reference)
        for key, values in self._gather_stats(stats, with_kl=with_kl).items():
            self.extend_logged_metric(mode, key, values)
        if mode == "train":
            self.count_train_tokens(int(inputs["attention_mask"].sum()))
        return loss
