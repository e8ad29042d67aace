"""Every use of TRL's and transformers' private Trainer state, in one place.

Checked against TRL 1.16.0 and transformers 5.23.0 (accelerate 1.15.0, DeepSpeed 0.19.8). These are the only
lines to re-read when either library is upgraded: `WeightedSFTTrainer` itself uses public Trainer API only.
"""

from __future__ import annotations

from typing import Any


class TrainerInternals:
    """Mixin for an SFTTrainer subclass (listed before `SFTTrainer` in its bases).

    The subclass implements `check_step(grad_norm)`, called after every optimizer step before the step is logged,
    evaluated or checkpointed.
    """

    def normalise_loss_per_step(self, count_step_tokens: bool) -> None:
        """Tell Trainer that `compute_loss` already normalises over the optimizer step.

        `loss_is_scaled_for_ga` (a documented class attribute in transformers 5.23): Trainer must not divide the
        loss by the accumulation steps again. `model_accepts_loss_kwargs` (set by Trainer from the model's forward
        signature): when True Trainer counts the step's target tokens across micro-batches and ranks and passes
        them to `compute_loss` as `num_items_in_batch`.
        """
        self.loss_is_scaled_for_ga = True
        self.model_accepts_loss_kwargs = count_step_tokens

    def _maybe_log_save_evaluate(self, tr_loss: Any, grad_norm: Any, model: Any, *args: Any, **kwargs: Any) -> None:
        """Trainer's per-step hook, the one point after the optimizer step and before logging and saving.

        Trainer passes the norm it computed before the optimizer step; DeepSpeed's engine computes the norm inside
        its step and hands out the previous step's until then, so it is asked again (`_get_grad_norm`).
        """
        if self.is_deepspeed_enabled:
            grad_norm = self._get_grad_norm(model)
        self.check_step(grad_norm)
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, *args, **kwargs)

    def extend_logged_metric(self, mode: str, key: str, values: list[float]) -> None:
        """Add values to SFTTrainer's per-mode metric lists (`_metrics`), which `log` averages and clears."""
        self._metrics[mode][key].extend(values)

    def count_train_tokens(self, count: int) -> None:
        """SFTTrainer's running token count (`_total_train_tokens`), logged as `num_tokens` (the tokens/s source).

        SFTTrainer updates it in its own `compute_loss`, which the subclass replaces.
        """
        self._total_train_tokens += count
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
