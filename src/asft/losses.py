"""Token-weighted SFT and anchored SFT losses (DESIGN.md's table), exact and memory-efficient.

Loss = Σ_t w_t·CE_t / N + λ·Σ_t KL_t / N, with detached weights w_t, the anchor (a KL divergence to the frozen
reference) over the full vocabulary at every target position, and N the target-token count of the whole
optimizer step when the trainer passes it (so gradient accumulation and world size do not change the result).

Two paths compute the same value and gradients:
- `loss_from_logits`: the readable reference, plain autograd on full [B, T, V] logits.
- `loss_from_hidden`: from final hidden states and the LM head, chunk by chunk over target tokens, so no
  [T, V] tensor for the whole sequence exists in the forward or the backward pass: each chunk's logits,
  per-token quantities and gradient are computed in the forward pass, and the backward pass only scales them.

A new weighting or anchor is one registered function (`register_weighting`, `register_anchor`); the tests
run every registered one through both paths against an independent reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch

IGNORE_INDEX = -100

# --- registries ---------------------------------------------------------------------------------------------------

# (ce, p, ref_p, spec) -> weights, all [n] over the batch's target tokens; p = exp(-ce); ref_p is the reference
# model's probability of the target (None when the reference was not run). Called under no_grad on detached values.
WeightFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", "LossSpec"], torch.Tensor]
# (logp, ref_logp, need_grad) -> (per-token divergence [c], d divergence / d logits [c, V] or None).
# Rows are target positions. The value must be differentiable by autograd w.r.t. logp (the reference path);
# the analytic gradient is asked for only under no_grad (the chunked path). May overwrite ref_logp's storage.
AnchorFn = Callable[[torch.Tensor, torch.Tensor, bool], "tuple[torch.Tensor, torch.Tensor | None]"]

WEIGHTINGS: dict[str, WeightFn] = {}
ANCHORS: dict[str, AnchorFn] = {}
REFERENCE_WEIGHTINGS: set[str] = set()  # weightings that read ref_p
PER_TOKEN_WEIGHTINGS: set[str] = set()  # weightings whose w_t depends on token t alone (no batch statistic)


def register_weighting(
    name: str, *, needs_reference: bool = False, per_token: bool = False
) -> Callable[[WeightFn], WeightFn]:
    """Register a weighting under the config name `name`.

    per_token=True promises w_t depends on token t alone, which lets the chunked path compute weights chunk by
    chunk in one pass; the safe default assumes a batch statistic (a threshold, a median) and first computes
    every target token's CE in a cheap extra pass.
    """

    def decorator(fn: WeightFn) -> WeightFn:
        WEIGHTINGS[name] = fn
        (REFERENCE_WEIGHTINGS.add if needs_reference else REFERENCE_WEIGHTINGS.discard)(name)
        (PER_TOKEN_WEIGHTINGS.add if per_token else PER_TOKEN_WEIGHTINGS.discard)(name)
        return fn

    return decorator


def register_anchor(name: str) -> Callable[[AnchorFn], AnchorFn]:
    """Register an anchor (a divergence from the reference) under the `kl_direction` value `name`."""

    def decorator(fn: AnchorFn) -> AnchorFn:
        ANCHORS[name] = fn
        return fn

    return decorator


# --- the mode row -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """A mode row of the config: a token weighting, an optional KL anchor, and their parameters.

    Validated on construction, so a spec that exists is a usable one.
    """

    weighting: str = "none"
    kl_weight: float = 0.0
    kl_direction: str = "forward"
    keep_ratio: float = 0.7
    clip_mult: float = 3.0
    alpha: float = 1.0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LossSpec:
        """Validate a mode row (keys named exactly as the fields; `weighting` required) and fill defaults."""
        if not isinstance(config, dict):
            raise ValueError(f"a loss row must be a mapping, got {type(config).__name__}: {config!r}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(config) - set(known), key=str)
        if unknown:
            raise ValueError(f"unknown loss key(s) {unknown} (values {[config[k] for k in unknown]}); known: {known}")
        if "weighting" not in config:
            raise ValueError(f"weighting: missing; one of {sorted(WEIGHTINGS)}")
        return cls(**config)

    def __post_init__(self) -> None:
        for name, choices in (("weighting", WEIGHTINGS), ("kl_direction", ANCHORS)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in choices:
                raise ValueError(f"{name}: {value!r} is not one of {sorted(choices)}")
        checks = {
            "kl_weight": (lambda x: x >= 0, ">= 0"),
            "keep_ratio": (lambda x: 0 < x <= 1, "in (0, 1]"),
            "clip_mult": (lambda x: x > 0, "> 0"),
            "alpha": (lambda x: x >= 0, ">= 0"),
        }
        for name, (ok, rule) in checks.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}: {value!r} must be a finite number {rule}")
            if not ok(value):
                raise ValueError(f"{name}: {value!r} must be {rule}")
            object.__setattr__(self, name, float(value))  # 0 and 0.0 log, hash and compare the same

    @property
    def needs_reference(self) -> bool:
        """Whether the loss itself needs the reference model (the KL anchor, or weights that read p_ref)."""
        return self.kl_weight > 0 or self.weighting in REFERENCE_WEIGHTINGS


# --- weightings ---------------------------------------------------------------------------------------------------


@register_weighting("none", per_token=True)
def _weights_none(ce: torch.Tensor, p: torch.Tensor, ref_p: torch.Tensor | None, spec: LossSpec) -> torch.Tensor:
    return torch.ones_like(ce)


@register_weighting("dft", per_token=True)
def _weights_dft(ce: torch.Tensor, p: torch.Tensor, ref_p: torch.Tensor | None, spec: LossSpec) -> torch.Tensor:
    """DFT: w = p_θ(y_t), which turns CE's 1/p gradient scale into a bounded one."""
    return p


@register_weighting("topk")
def _weights_topk(ce: torch.Tensor, p: torch.Tensor, ref_p: torch.Tensor | None, spec: LossSpec) -> torch.Tensor:
    """Keep the k = max(1, int(n·keep_ratio)) lowest-CE tokens, ties at the threshold kept (CE <= k-th smallest).

    Kept tokens weigh n/kept, so the CE term is the mean over the kept tokens when N is the batch's own count
    (and Σ_kept CE / (N·kept/n) in general).
    """
    n = ce.numel()
    k = max(1, int(n * spec.keep_ratio))
    kept = (ce <= torch.kthvalue(ce, k).values).to(ce.dtype)
    return kept * (n / kept.sum())


@register_weighting("antiop")
def _weights_antiop(ce: torch.Tensor, p: torch.Tensor, ref_p: torch.Tensor | None, spec: LossSpec) -> torch.Tensor:
    """Clip outlier tokens: w = cap/CE above cap = clip_mult · median CE (torch.median: the lower median)."""
    cap = spec.clip_mult * torch.median(ce)
    return torch.where(ce <= cap, torch.ones_like(ce), cap / ce.clamp_min(torch.finfo(ce.dtype).tiny))


@register_weighting("ref_ratio", needs_reference=True, per_token=True)
def _weights_ref_ratio(ce: torch.Tensor, p: torch.Tensor, ref_p: torch.Tensor | None, spec: LossSpec) -> torch.Tensor:
    """w = max(0.1, 1 + α·clamp(p_ref − p_θ, −1, 1)): more weight where the policy fell below the reference."""
    if ref_p is None:
        raise ValueError("weighting 'ref_ratio' needs the reference model's outputs")
    return (1 + spec.alpha * (ref_p - p).clamp(-1, 1)).clamp_min(0.1)


def token_weights(ce: torch.Tensor, ref_p: torch.Tensor | None, spec: LossSpec) -> torch.Tensor:
    """Detached weights for target tokens with cross-entropies `ce` (the whole batch, or a per-token chunk)."""
    with torch.no_grad():
        ce = ce.detach()
        return WEIGHTINGS[spec.weighting](ce, torch.exp(-ce), None if ref_p is None else ref_p.detach(), spec)


# --- anchors ------------------------------------------------------------------------------------------------------


@register_anchor("forward")
def _kl_forward(
    logp: torch.Tensor, ref_logp: torch.Tensor, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KL(π_ref ‖ π_θ) = Σ_v q_v (log q_v − log p_v), the paper's anchor; d/dz = p − q.

    Vocabulary entries the reference gives no mass (q = 0, also log q = −inf) contribute 0, never NaN.
    """
    diff = ref_logp - logp
    q = ref_logp.exp_()  # the reference's storage is ours to reuse
    diff.masked_fill_(q == 0, 0.0)
    kl = diff.mul_(q).sum(-1)
    del diff
    return kl, (torch.exp(logp).sub_(q) if need_grad else None)


@register_anchor("reverse")
def _kl_reverse(
    logp: torch.Tensor, ref_logp: torch.Tensor, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KL(π_θ ‖ π_ref) = Σ_v p_v (log p_v − log q_v), the mode-seeking ablation; d/dz_j = p_j (log p_j/q_j − KL)."""
    diff = ref_logp.neg_().add_(logp)  # log p − log q, in the reference's storage
    p = torch.exp(logp)
    diff.masked_fill_(p == 0, 0.0)  # 0·log 0 = 0, with a zero (not NaN) gradient
    kl = (p * diff).sum(-1)
    if not need_grad:
        return kl, None
    return kl, diff.sub_(kl[:, None]).mul_(p)


# --- helpers ------------------------------------------------------------------------------------------------------


def count_target_tokens(labels: torch.Tensor) -> int:
    """Target tokens after the causal shift (labels aligned with input ids, -100 ignored)."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def _shifted_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over positions 0..T-2 that predict a target, the targets in row-major order)."""
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    return mask, shifted[mask]


def _normaliser(num_target_tokens: int | torch.Tensor | None, n: int) -> float:
    if num_target_tokens is None:
        return float(max(n, 1))
    if isinstance(num_target_tokens, bool):
        raise ValueError(f"num_target_tokens: {num_target_tokens!r} is not a count")
    value = float(num_target_tokens.item() if torch.is_tensor(num_target_tokens) else num_target_tokens)
    if value < n or value < 0:
        raise ValueError(f"num_target_tokens={value:g} is less than this batch's own {n} target tokens")
    return max(value, 1.0)


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32 math whatever the input precision; float64 stays float64 (the tests' exact references)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _check_reference(spec: LossSpec, ref: torch.Tensor | None, name: str) -> None:
    if spec.needs_reference and ref is None:
        raise ValueError(f"{spec} needs the reference model: pass {name}")


def _empty_loss(*tensors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 with zero gradients for every input that requires grad (an empty sum: no inf·0 = NaN possible)."""
    return sum((t[..., :0].sum() for t in tensors), torch.zeros((), dtype=dtype, device=tensors[0].device))


def _stats(
    loss: torch.Tensor, ce: torch.Tensor, weights: torch.Tensor, kl: torch.Tensor | None
) -> dict[str, float | int]:
    """Detached per-batch means for logging (0.0 where there is nothing to average)."""
    n = ce.numel()
    return {
        "loss": float(loss.detach()),
        "ce": float(ce.detach().mean()) if n else 0.0,
        "kl": float(kl.detach().mean()) if kl is not None and n else 0.0,
        "weight_mean": float(weights.mean()) if n else 0.0,
        "target_tokens": n,
    }


# --- reference path -----------------------------------------------------------------------------------------------


def loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    ref_logits: torch.Tensor | None = None,
    num_target_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float | int]]:
    """The loss from full logits [B, T, V] with labels [B, T] aligned to the input ids (shifted here).

    The readable reference path: plain autograd, float32 math (float64 stays float64). The KL to the reference
    is computed whenever ref_logits is given, for the `kl` statistic, but enters the loss only if kl_weight > 0.
    """
    _check_reference(spec, ref_logits, "ref_logits")
    mask, targets = _shifted_targets(labels)
    n = targets.numel()
    norm = _normaliser(num_target_tokens, n)
    dtype = _compute_dtype(logits.dtype)
    if n == 0:
        loss = _empty_loss(logits, dtype=dtype)
        return loss, _stats(loss, logits.new_zeros(0), logits.new_zeros(0), None)
    logp = torch.log_softmax(logits[:, :-1][mask], dim=-1, dtype=dtype)
    ce = -logp.gather(-1, targets[:, None]).squeeze(-1)
    ref_p = kl = None
    if ref_logits is not None:
        with torch.no_grad():
            ref_logp = torch.log_softmax(ref_logits[:, :-1][mask], dim=-1, dtype=dtype)
            ref_p = ref_logp.gather(-1, targets[:, None]).squeeze(-1).exp()
        with torch.set_grad_enabled(torch.is_grad_enabled() and spec.kl_weight > 0):
            kl, _ = ANCHORS[spec.kl_direction](logp, ref_logp, False)
    weights = token_weights(ce, ref_p, spec)
    loss = (weights * ce).sum() / norm
    if spec.kl_weight > 0:
        loss = loss + spec.kl_weight * kl.sum() / norm
    return loss, _stats(loss, ce, weights, kl)


# --- chunked path -------------------------------------------------------------------------------------------------


@dataclass
class _Chunked:
    """Everything the chunked loss needs besides the two differentiable inputs (hidden, head weight)."""

    targets: torch.Tensor  # [n]
    ref_hidden: torch.Tensor | None  # [n, d], detached
    ref_weight: torch.Tensor | None  # [V, d], detached
    spec: LossSpec
    norm: float
    chunk_size: int


def _chunk_log_probs(hidden: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Log-probabilities of one chunk: the matmul in the head's dtype (as the model's own head), softmax in dtype."""
    return torch.log_softmax(hidden.to(weight.dtype) @ weight.T, dim=-1, dtype=dtype)


def _chunked_loss(
    hidden: torch.Tensor, weight: torch.Tensor, plan: _Chunked, need_hidden: bool, need_weight: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, dict[str, float | int]]:
    """(loss, d loss/d hidden, d loss/d weight, stats) with at most a few [chunk, V] tensors alive at a time.

    Per chunk: logits → log-probs → CE (and the reference's log-probs → p_ref and the anchor) → weights →
    d loss/d logits = (w/N)(p − onehot(y)) + (λ/N) d anchor/d logits, pushed through the head at once.
    Batch-statistic weightings first take a pass that stores only the n per-token CEs.
    """
    spec, targets, norm = plan.spec, plan.targets, plan.norm
    n, device = targets.numel(), hidden.device
    dtype = _compute_dtype(hidden.dtype, weight.dtype)
    with_ref = plan.ref_hidden is not None
    need_grad = need_hidden or need_weight
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None
    # The head's gradient is accumulated in its own dtype: a float32 copy of a bf16 [V, d] head would cost twice
    # the gradient itself, and each chunk's addmm accumulates in float32 internally before rounding once.
    grad_weight = torch.zeros_like(weight) if need_weight else None
    ce = torch.empty(n, dtype=dtype, device=device)
    ref_p = torch.empty_like(ce) if with_ref else None
    kl = torch.empty_like(ce) if with_ref else None
    weights = torch.empty_like(ce)
    chunks = [(s, min(s + plan.chunk_size, n)) for s in range(0, n, plan.chunk_size)]

    def target_log_probs(log_probs: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return log_probs.gather(-1, targets[start:end, None]).squeeze(-1)

    # LoRA's reference uses the policy's own (frozen) head: one matmul then gives both models' logits of a chunk,
    # streaming the [V, d] head from memory once instead of twice (the head is 2 GiB in float32 at 7B shapes).
    shared_head = with_ref and plan.ref_weight.data_ptr() == weight.data_ptr() and plan.ref_weight.shape == weight.shape
    per_token = spec.weighting in PER_TOKEN_WEIGHTINGS
    if not per_token:  # the batch statistic needs every token's CE (and p_ref, if the weighting reads it)
        weights_read_ref = spec.weighting in REFERENCE_WEIGHTINGS
        for start, end in chunks:
            ce[start:end] = -target_log_probs(_chunk_log_probs(hidden[start:end], weight, dtype), start, end)
            if weights_read_ref:
                ref_logp = _chunk_log_probs(plan.ref_hidden[start:end], plan.ref_weight, dtype)
                ref_p[start:end] = target_log_probs(ref_logp, start, end).exp()
                del ref_logp
        weights = token_weights(ce, ref_p, spec)

    for start, end in chunks:
        h = hidden[start:end].to(weight.dtype)
        if shared_head:  # [2c, V]: the policy's rows, then the reference's
            both = _chunk_log_probs(torch.cat([h, plan.ref_hidden[start:end].to(weight.dtype)]), weight, dtype)
            logp, ref_logp = both[: end - start], both[end - start :]
            del both  # the views keep the storage
        else:
            logp = _chunk_log_probs(h, weight, dtype)
        ce[start:end] = -target_log_probs(logp, start, end)
        grad_anchor = None
        if with_ref:
            if not shared_head:
                ref_logp = _chunk_log_probs(plan.ref_hidden[start:end], plan.ref_weight, dtype)
            ref_p[start:end] = target_log_probs(ref_logp, start, end).exp()
            kl[start:end], grad_anchor = ANCHORS[spec.kl_direction](logp, ref_logp, need_grad and spec.kl_weight > 0)
            del ref_logp  # consumed by the anchor
        if per_token:
            weights[start:end] = token_weights(ce[start:end], None if ref_p is None else ref_p[start:end], spec)
        if not need_grad:
            continue
        scale = (weights[start:end] / norm)[:, None]
        grad = logp.exp_().mul_(scale)  # (w/N)·p, in the log-probs' storage
        del logp
        grad.scatter_add_(-1, targets[start:end, None], -scale)
        if grad_anchor is not None:
            grad.add_(grad_anchor, alpha=spec.kl_weight / norm)
            del grad_anchor
        grad = grad.to(weight.dtype)
        if need_hidden:
            grad_hidden[start:end] = grad @ weight
        if need_weight:
            grad_weight.addmm_(grad.T, h)
        del grad

    total = (weights * ce).sum()
    if spec.kl_weight > 0:
        total = total + spec.kl_weight * kl.sum()
    loss = total / norm
    return loss, grad_hidden, grad_weight, _stats(loss, ce, weights, kl)


class _ChunkedHeadLoss(torch.autograd.Function):
    """The chunked loss as one autograd node: gradients are built in forward, backward only scales them.

    Peak memory is O(chunk × V) in both passes; the price is holding d loss/d hidden ([n, d], small) and, for a
    trained head, d loss/d weight ([V, d], which the optimizer needs anyway) from forward to backward.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, plan: _Chunked, stats: dict) -> torch.Tensor:
        loss, grad_hidden, grad_weight, batch_stats = _chunked_loss(
            hidden, weight, plan, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        stats.update(batch_stats)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        # In place: the buffers exist only for this backward (a second one, with retain_graph, fails autograd's
        # version check rather than returning scaled-twice gradients), and copying a [V, d] gradient is not free.
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None


def loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    ref_hidden: torch.Tensor | None = None,
    ref_lm_head_weight: torch.Tensor | None = None,
    num_target_tokens: int | torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, dict[str, float | int]]:
    """The same loss and gradients as `loss_from_logits(hidden @ W.T, ...)`, without full logits.

    hidden: [B, T, d] final (post-norm) hidden states; lm_head_weight: [V, d] (no bias); labels: [B, T] aligned
    with the input ids (shifted here). Only target positions are gathered, then processed `chunk_size` at a
    time. The reference passes only its hidden states; its head defaults to the policy's (LoRA does not adapt
    the head). Reference quantities carry no gradient. Without grad mode (evaluation) no gradient work is done.
    """
    _check_reference(spec, ref_hidden, "ref_hidden")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: {chunk_size!r} must be an integer >= 1")
    mask, targets = _shifted_targets(labels)
    n = targets.numel()
    norm = _normaliser(num_target_tokens, n)
    if n == 0:
        loss = _empty_loss(hidden, lm_head_weight, dtype=_compute_dtype(hidden.dtype, lm_head_weight.dtype))
        return loss, _stats(loss, hidden.new_zeros(0), hidden.new_zeros(0), None)
    ref_t = ref_weight = None
    if ref_hidden is not None:
        ref_t = ref_hidden[:, :-1][mask].detach()
        ref_weight = (lm_head_weight if ref_lm_head_weight is None else ref_lm_head_weight).detach()
    plan = _Chunked(targets, ref_t, ref_weight, spec, norm, chunk_size)
    hidden_t = hidden[:, :-1][mask]
    if not (torch.is_grad_enabled() and (hidden_t.requires_grad or lm_head_weight.requires_grad)):
        loss, _, _, stats = _chunked_loss(hidden_t.detach(), lm_head_weight.detach(), plan, False, False)
        return loss, stats
    stats: dict[str, float | int] = {}
    loss = _ChunkedHeadLoss.apply(hidden_t, lm_head_weight, plan, stats)
    return loss, stats
