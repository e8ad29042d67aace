"""Token-weighted SFT and anchored SFT losses (DESIGN.md's table), exact and memory-efficient.

Loss = Σ_t w_t·CE_t / N + λ·Σ_t KL_t / N, with detached weights w_t, KL over the full vocabulary at every
target position, and N the target-token count of the whole optimizer step when the trainer passes it.

Two paths compute the same value and gradients:
- `loss_from_logits`: the readable reference, from full [B, T, V] logits.
- `loss_from_hidden`: from final hidden states and the LM head, chunk by chunk over target tokens, so no
  [T, V] tensor for the whole sequence exists in the forward or the backward pass (the chunk gradients are
  computed in the forward pass and scaled in the backward pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch

IGNORE_INDEX = -100
KL_DIRECTIONS = ("forward", "reverse")


@dataclass(frozen=True)
class LossSpec:
    """A mode row of the config: a token weighting, an optional KL anchor, and their parameters."""

    weighting: str = "none"
    kl_weight: float = 0.0
    kl_direction: str = "forward"
    keep_ratio: float = 0.7
    clip_mult: float = 3.0
    alpha: float = 1.0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LossSpec:
        """Validate a mode row (names exactly as in the config) and fill defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown loss key(s) {unknown}; expected a subset of {sorted(known)}")
        spec = cls(**config)
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting: {self.weighting!r} is not one of {sorted(WEIGHTINGS)}")
        if self.kl_direction not in KL_DIRECTIONS:
            raise ValueError(f"kl_direction: {self.kl_direction!r} is not one of {KL_DIRECTIONS}")
        if not (isinstance(self.kl_weight, (int, float)) and self.kl_weight >= 0 and math.isfinite(self.kl_weight)):
            raise ValueError(f"kl_weight: {self.kl_weight!r} must be a finite number >= 0")
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"keep_ratio: {self.keep_ratio!r} must be in (0, 1]")
        if not self.clip_mult > 0:
            raise ValueError(f"clip_mult: {self.clip_mult!r} must be > 0")
        if not self.alpha >= 0:
            raise ValueError(f"alpha: {self.alpha!r} must be >= 0")

    @property
    def needs_reference(self) -> bool:
        """Whether the loss itself needs the reference model (the KL anchor or reference-ratio weights)."""
        return self.kl_weight > 0 or self.weighting in REFERENCE_WEIGHTINGS


# --- weightings: per-token CE (and the reference's probability of the target) -> detached weights ----------

WeightFn = Callable[[torch.Tensor, "torch.Tensor | None", LossSpec], torch.Tensor]


def _weights_none(ce: torch.Tensor, ref_p: torch.Tensor | None, spec: LossSpec) -> torch.Tensor:
    return torch.ones_like(ce)


def _weights_dft(ce: torch.Tensor, ref_p: torch.Tensor | None, spec: LossSpec) -> torch.Tensor:
    return torch.exp(-ce)


def _weights_topk(ce: torch.Tensor, ref_p: torch.Tensor | None, spec: LossSpec) -> torch.Tensor:
    """Keep the k lowest-CE tokens (ties at the threshold kept); scaled so the CE term averages the kept ones."""
    n = ce.numel()
    k = max(1, int(n * spec.keep_ratio))
    threshold = torch.kthvalue(ce, k).values
    kept = (ce <= threshold).to(ce.dtype)
    return kept * (n / kept.sum())


def _weights_antiop(ce: torch.Tensor, ref_p: torch.Tensor | None, spec: LossSpec) -> torch.Tensor:
    """Clip outlier tokens: weight cap/CE above cap = clip_mult x (lower) median CE of the batch."""
    cap = spec.clip_mult * torch.median(ce)
    return torch.where(ce <= cap, torch.ones_like(ce), cap / ce.clamp_min(torch.finfo(ce.dtype).tiny))


def _weights_ref_ratio(ce: torch.Tensor, ref_p: torch.Tensor | None, spec: LossSpec) -> torch.Tensor:
    if ref_p is None:
        raise ValueError("weighting 'ref_ratio' needs the reference model's outputs")
    return (1 + spec.alpha * (ref_p - torch.exp(-ce)).clamp(-1, 1)).clamp_min(0.1)


WEIGHTINGS: dict[str, WeightFn] = {
    "none": _weights_none,
    "dft": _weights_dft,
    "topk": _weights_topk,
    "antiop": _weights_antiop,
    "ref_ratio": _weights_ref_ratio,
}
REFERENCE_WEIGHTINGS = frozenset({"ref_ratio"})
# Weightings whose per-token weight depends on the whole batch (a threshold or a median), not on the token alone.
BATCH_STATISTIC_WEIGHTINGS = frozenset({"topk", "antiop"})


def token_weights(ce: torch.Tensor, ref_p: torch.Tensor | None, spec: LossSpec) -> torch.Tensor:
    """Detached per-token weights for the batch's target tokens."""
    with torch.no_grad():
        return WEIGHTINGS[spec.weighting](ce.detach(), None if ref_p is None else ref_p.detach(), spec)


# --- helpers ---------------------------------------------------------------------------------------------------


def count_target_tokens(labels: torch.Tensor) -> int:
    """Target tokens after the causal shift (labels aligned with input ids, -100 ignored)."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def _targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shifted = labels[..., 1:]
    mask = shifted != IGNORE_INDEX
    return mask, shifted[mask]


def _normaliser(num_target_tokens: int | torch.Tensor | None, n: int) -> float:
    if num_target_tokens is None:
        return float(max(n, 1))
    value = float(num_target_tokens.item() if torch.is_tensor(num_target_tokens) else num_target_tokens)
    return max(value, 1.0)


def _kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, direction: str) -> torch.Tensor:
    if direction == "forward":  # KL(π_ref ‖ π_θ)
        return (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)  # KL(π_θ ‖ π_ref)


def _stats(ce: torch.Tensor, weights: torch.Tensor, kl: torch.Tensor | None, loss: torch.Tensor) -> dict[str, float]:
    n = ce.numel()
    return {
        "loss": float(loss.detach()),
        "ce": float(ce.detach().mean()) if n else 0.0,
        "kl": float(kl.detach().mean()) if kl is not None and n else 0.0,
        "weight_mean": float(weights.mean()) if n else 0.0,
        "target_tokens": n,
    }


# --- reference path ----------------------------------------------------------------------------------------------


def loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    ref_logits: torch.Tensor | None = None,
    num_target_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss from full logits [B, T, V] (shifted here); float32 (or float64) math whatever the input dtype."""
    if spec.needs_reference and ref_logits is None:
        raise ValueError(f"mode {spec} needs ref_logits")
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    mask, targets = _targets(labels)
    n = targets.numel()
    norm = _normaliser(num_target_tokens, n)
    if n == 0:
        loss = logits.sum() * 0.0
        return loss, _stats(logits.new_zeros(0), logits.new_zeros(0), None, loss)
    logp = torch.log_softmax(logits[:, :-1][mask].to(compute_dtype), dim=-1)
    ce = -logp.gather(-1, targets[:, None]).squeeze(-1)
    ref_logp = ref_p = kl = None
    if ref_logits is not None:
        with torch.no_grad():
            ref_logp = torch.log_softmax(ref_logits[:, :-1][mask].to(compute_dtype), dim=-1)
            ref_p = ref_logp.gather(-1, targets[:, None]).squeeze(-1).exp()
        kl = _kl_per_token(logp, ref_logp, spec.kl_direction)
    weights = token_weights(ce, ref_p, spec)
    loss = (weights * ce).sum() / norm
    if spec.kl_weight > 0:
        loss = loss + spec.kl_weight * kl.sum() / norm
    return loss, _stats(ce, weights, kl, loss)


# --- chunked path --------------------------------------------------------------------------------------------------


def _chunk_logp(hidden: torch.Tensor, weight: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """Log-probabilities of one chunk: the matmul in the weights' dtype, the softmax in float32/64."""
    return torch.log_softmax((hidden.to(weight.dtype) @ weight.T).to(compute_dtype), dim=-1)


def _grad_logits(
    logp: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    ref_logp: torch.Tensor | None,
    kl: torch.Tensor | None,
    spec: LossSpec,
    norm: float,
) -> torch.Tensor:
    """d loss / d logits for one chunk: (w/N)(p - onehot(y)) + (λ/N) d KL / d z."""
    probs = logp.exp()
    scale = weights[:, None] / norm
    grad = probs * scale
    grad.scatter_add_(-1, targets[:, None], -scale.to(grad.dtype))
    if spec.kl_weight > 0:
        if spec.kl_direction == "forward":  # d KL(q ‖ p) / d z = p - q
            grad.add_(probs - ref_logp.exp(), alpha=spec.kl_weight / norm)
        else:  # d KL(p ‖ q) / d z_j = p_j (log p_j - log q_j - KL)
            grad.add_(probs * (logp - ref_logp - kl[:, None]), alpha=spec.kl_weight / norm)
    return grad


class _ChunkedLoss(torch.autograd.Function):
    """Σ w·CE/N + λ·ΣKL/N over target tokens, chunked; gradients are built chunk by chunk in forward.

    Per-token weightings take one pass (each chunk's logits are computed once); weightings that need batch
    statistics (top-k threshold, median) take a first pass for the per-token CE and a second for gradients.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,  # [n, d] target positions only
        weight: torch.Tensor,  # [V, d]
        targets: torch.Tensor,  # [n]
        ref_hidden: torch.Tensor | None,
        ref_weight: torch.Tensor | None,
        spec: LossSpec,
        norm: float,
        chunk_size: int,
        stats_out: dict,
    ) -> torch.Tensor:
        compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        n = targets.numel()
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # In the head's own dtype: each chunk's addmm accumulates in float32 internally and rounds once, and a
        # float32 copy of a [V, d] bf16 head would cost twice the gradient itself.
        grad_weight = torch.zeros_like(weight) if need_weight else None
        ce = torch.empty(n, dtype=compute_dtype, device=hidden.device)
        ref_p = torch.empty_like(ce) if ref_hidden is not None else None
        kl = torch.empty_like(ce) if ref_hidden is not None else None
        weights = torch.empty_like(ce)
        one_pass = spec.weighting not in BATCH_STATISTIC_WEIGHTINGS
        chunks = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]

        def backprop(start: int, end: int, h: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor | None) -> None:
            grad = _grad_logits(
                logp,
                targets[start:end],
                weights[start:end],
                ref_logp,
                None if kl is None else kl[start:end],
                spec,
                norm,
            ).to(weight.dtype)
            if need_hidden:
                grad_hidden[start:end] = (grad @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight.addmm_(grad.T, h)

        for start, end in chunks:
            h = hidden[start:end].to(weight.dtype)
            logp = _chunk_logp(h, weight, compute_dtype)
            ce[start:end] = -logp.gather(-1, targets[start:end, None]).squeeze(-1)
            ref_logp = None
            if ref_hidden is not None:
                ref_logp = _chunk_logp(ref_hidden[start:end], ref_weight, compute_dtype)
                ref_p[start:end] = ref_logp.gather(-1, targets[start:end, None]).squeeze(-1).exp()
                kl[start:end] = _kl_per_token(logp, ref_logp, spec.kl_direction)
            if one_pass:
                weights[start:end] = token_weights(ce[start:end], None if ref_p is None else ref_p[start:end], spec)
                if need_hidden or need_weight:
                    backprop(start, end, h, logp, ref_logp)
            del logp, ref_logp
        if not one_pass and n:
            weights = token_weights(ce, ref_p, spec)
            if need_hidden or need_weight:
                for start, end in chunks:
                    h = hidden[start:end].to(weight.dtype)
                    ref_logp = None
                    if spec.kl_weight > 0:
                        ref_logp = _chunk_logp(ref_hidden[start:end], ref_weight, compute_dtype)
                    backprop(start, end, h, _chunk_logp(h, weight, compute_dtype), ref_logp)
        total = (weights * ce).sum()
        if spec.kl_weight > 0:
            total = total + spec.kl_weight * kl.sum()
        loss = total / norm
        ctx.save_for_backward(grad_hidden, grad_weight)
        stats_out.update(_stats(ce, weights, kl, loss))
        return loss.to(hidden.dtype if hidden.dtype == torch.float64 else torch.float32)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        grad_hidden, grad_weight = ctx.saved_tensors
        # In place: these buffers exist only for this backward, and a copy of a [V, d] gradient is not free.
        out_hidden = grad_hidden.mul_(grad_output.to(grad_hidden.dtype)) if grad_hidden is not None else None
        out_weight = None
        if grad_weight is not None:
            out_weight = grad_weight.mul_(grad_output.to(grad_weight.dtype))
        return out_hidden, out_weight, None, None, None, None, None, None, None


def loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    ref_hidden: torch.Tensor | None = None,
    ref_lm_head_weight: torch.Tensor | None = None,
    num_target_tokens: int | torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The same loss and gradients as `loss_from_logits(hidden @ W.T, ...)`, without full logits.

    hidden: [B, T, d] final (normed) hidden states; lm_head_weight: [V, d]; labels: [B, T] aligned with the
    input ids (shifted here). The reference passes only its hidden states; its head defaults to the policy's
    (LoRA does not adapt the head). Reference quantities carry no gradient.
    """
    if spec.needs_reference and ref_hidden is None:
        raise ValueError(f"mode {spec} needs ref_hidden")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    mask, targets = _targets(labels)
    norm = _normaliser(num_target_tokens, targets.numel())
    hidden_t = hidden[:, :-1][mask]
    ref_t = ref_weight = None
    if ref_hidden is not None:
        ref_t = ref_hidden[:, :-1][mask].detach()
        ref_weight = (ref_lm_head_weight if ref_lm_head_weight is not None else lm_head_weight).detach()
    stats: dict[str, float] = {}
    loss = _ChunkedLoss.apply(hidden_t, lm_head_weight, targets, ref_t, ref_weight, spec, norm, chunk_size, stats)
    return loss, stats
