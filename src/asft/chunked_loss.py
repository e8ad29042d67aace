"""The loss of `asft.losses` from final hidden states, chunk by chunk over target tokens: a fused kernel.

Contract: `chunked_loss_from_hidden(hidden, W, labels, spec, ref_hidden, W_ref, N, chunk_size)` equals
`loss_from_logits(hidden @ W.T, labels, spec, ref_hidden @ W_ref.T, N)` in value, in gradients w.r.t. hidden and
W, and in statistics, for every registered weighting and anchor and every chunk size (tests/test_losses.py holds
both to a token-by-token float64 reference). With `cached=` (a cached reference, `asft.reference_cache`) instead
of ref_hidden it equals `cached_loss_from_logits(hidden @ W.T, labels, spec, cached, N)`
(tests/test_reference_cache.py). It defines nothing: the weightings, anchors and bookkeeping all come from
`asft.losses` and `asft.reference_cache`.

Why a kernel: full [T, V] logits (and their gradient) dominate a fine-tuning step's memory at 150k-token
vocabularies. Here each chunk's logits, per-token quantities and d loss/d logits are computed in the forward pass
and pushed through the head at once, so no [T, V] tensor exists in either pass; the backward pass only scales the
stored gradients. d loss/d logits is written out by hand:

    (w_t/N)·(p − onehot(y_t)) + (λ/N)·d KL_t/d logits

with the anchors' gradients hand-derived for forward and reverse KL (`_ANALYTIC_ANCHORS`) and taken by autograd,
chunk by chunk, for any other registered anchor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from asft.losses import (
    ANCHORS,
    WEIGHTINGS,
    AnchorFn,
    LossSpec,
    batch_stats,
    check_reference,
    compute_dtype,
    empty_loss,
    kl_forward,
    kl_reverse,
    normaliser,
    sequence_ids_for,
    shifted_targets,
    token_weights,
)
from asft.reference_cache import cached_forward_kl, check_alignment, check_cached_direction

# (logp, ref_logp, need_grad) -> (divergence [c], d divergence / d logits [c, V] or None), from log-probabilities
# [c, V]. Overwrites ref_logp's storage: the kernel's own chunk buffer, reused to save a [c, V] allocation.
AnalyticAnchor = Callable[[torch.Tensor, torch.Tensor, bool], "tuple[torch.Tensor, torch.Tensor | None]"]


# --- anchors with their gradient w.r.t. the logits ------------------------------------------------------------------


def _kl_forward_analytic(
    logp: torch.Tensor, ref_logp: torch.Tensor, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`kl_forward` in place; d/dz = p − q."""
    diff = ref_logp - logp
    q = ref_logp.exp_()
    diff.masked_fill_(q == 0, 0.0)
    kl = diff.mul_(q).sum(-1)
    del diff
    return kl, (torch.exp(logp).sub_(q) if need_grad else None)


def _kl_reverse_analytic(
    logp: torch.Tensor, ref_logp: torch.Tensor, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`kl_reverse` in place; d/dz_j = p_j (log p_j/q_j − KL)."""
    diff = ref_logp.neg_().add_(logp)  # log p − log q
    p = torch.exp(logp)
    diff.masked_fill_(p == 0, 0.0)
    kl = (p * diff).sum(-1)
    if not need_grad:
        return kl, None
    return kl, diff.sub_(kl[:, None]).mul_(p)


# Keyed by the definition they implement, so re-registering a direction name with another function falls back to
# autograd rather than silently keeping a stale gradient.
_ANALYTIC_ANCHORS: dict[AnchorFn, AnalyticAnchor] = {kl_forward: _kl_forward_analytic, kl_reverse: _kl_reverse_analytic}


def _anchor_with_grad(
    anchor: AnchorFn, logp: torch.Tensor, ref_logp: torch.Tensor, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(divergence, d divergence / d logits or None) for one chunk, analytic where derived, else by autograd."""
    analytic = _ANALYTIC_ANCHORS.get(anchor)
    if analytic is not None:
        return analytic(logp, ref_logp, need_grad)
    if not need_grad:
        return anchor(logp, ref_logp), None
    with torch.enable_grad():
        leaf = logp.detach().requires_grad_()
        value = anchor(leaf, ref_logp)
        (grad_logp,) = torch.autograd.grad(value.sum(), leaf)
    # through log_softmax: d/dz = g − softmax(z)·Σ_v g_v
    return value.detach(), grad_logp - torch.exp(logp) * grad_logp.sum(-1, keepdim=True)


# --- the kernel ---------------------------------------------------------------------------------------------------


@dataclass
class _Chunked:
    """Everything the chunked loss needs besides the two differentiable inputs (hidden, head weight)."""

    targets: torch.Tensor  # [n]
    ref_hidden: torch.Tensor | None  # [n, d], detached
    ref_weight: torch.Tensor | None  # [V, d], detached
    spec: LossSpec
    norm: float
    chunk_size: int
    # A cached reference instead of ref_hidden (asft.reference_cache): log p_ref(y_t) [n], H_ref [n], samples [n, K].
    cached_target_logp: torch.Tensor | None = None
    cached_entropy: torch.Tensor | None = None
    cached_sample_ids: torch.Tensor | None = None
    # Each target token's batch row [n], for a per-sequence weighting (`asft.losses.target_sequence_ids`).
    sequence_ids: torch.Tensor | None = None


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
    weighting, anchor = WEIGHTINGS[spec.weighting], ANCHORS[spec.kl_direction]
    n, device = targets.numel(), hidden.device
    dtype = compute_dtype(hidden.dtype, weight.dtype)
    from_cache = plan.cached_sample_ids is not None
    with_ref = plan.ref_hidden is not None or from_cache
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
    shared_head = (
        plan.ref_hidden is not None
        and plan.ref_weight.data_ptr() == weight.data_ptr()
        and plan.ref_weight.shape == weight.shape
    )
    if not weighting.per_token:  # the batch statistic needs every token's CE (and p_ref, if the weighting reads it)
        for start, end in chunks:
            ce[start:end] = -target_log_probs(_chunk_log_probs(hidden[start:end], weight, dtype), start, end)
            if weighting.needs_reference and from_cache:
                ref_p[start:end] = plan.cached_target_logp[start:end].exp()
            elif weighting.needs_reference:
                ref_logp = _chunk_log_probs(plan.ref_hidden[start:end], plan.ref_weight, dtype)
                ref_p[start:end] = target_log_probs(ref_logp, start, end).exp()
                del ref_logp
        weights = token_weights(ce, ref_p, spec, plan.sequence_ids)

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
        if from_cache:  # exact ref_p; the forward KL as the unbiased sampled estimate (its gradient below)
            ref_p[start:end] = plan.cached_target_logp[start:end].exp()
            sample_ids = plan.cached_sample_ids[start:end]
            kl[start:end] = cached_forward_kl(logp.gather(-1, sample_ids), plan.cached_entropy[start:end])
        elif with_ref:
            if not shared_head:
                ref_logp = _chunk_log_probs(plan.ref_hidden[start:end], plan.ref_weight, dtype)
            ref_p[start:end] = target_log_probs(ref_logp, start, end).exp()
            kl[start:end], grad_anchor = _anchor_with_grad(anchor, logp, ref_logp, need_grad and spec.kl_weight > 0)
            del ref_logp  # consumed by the anchor
        if weighting.per_token:
            weights[start:end] = token_weights(ce[start:end], None if ref_p is None else ref_p[start:end], spec)
        if not need_grad:
            continue
        scale = (weights[start:end] / norm)[:, None]
        cached_anchor = from_cache and spec.kl_weight > 0
        # (w/N)·p in the log-probs' storage; with a cached anchor also its (λ/N)·(p − counts/K) (the estimate's
        # gradient, `asft.reference_cache.cached_forward_kl_analytic`) folded in: no second [c, V] tensor.
        grad = logp.exp_().mul_(scale + spec.kl_weight / norm if cached_anchor else scale)
        del logp
        grad.scatter_add_(-1, targets[start:end, None], -scale)
        if cached_anchor:
            k = sample_ids.shape[-1]
            grad.scatter_add_(-1, sample_ids, grad.new_full(sample_ids.shape, -spec.kl_weight / (norm * k)))
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
    return loss, grad_hidden, grad_weight, batch_stats(loss, ce, weights, kl)


class _ChunkedHeadLoss(torch.autograd.Function):
    """The chunked loss as one autograd node: gradients are built in forward, backward only scales them.

    Peak memory is O(chunk × V) in both passes; the price is holding d loss/d hidden ([n, d], small) and, for a
    trained head, d loss/d weight ([V, d], which the optimizer needs anyway) from forward to backward.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, plan: _Chunked, stats: dict) -> torch.Tensor:
        loss, grad_hidden, grad_weight, batch = _chunked_loss(
            hidden, weight, plan, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        stats.update(batch)
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


def chunked_loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    ref_hidden: torch.Tensor | None = None,
    ref_lm_head_weight: torch.Tensor | None = None,
    num_target_tokens: int | torch.Tensor | None = None,
    chunk_size: int = 1024,
    cached: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float | int]]:
    """The same loss and gradients as `loss_from_logits(hidden @ W.T, ...)`, without full logits.

    hidden: [B, T, d] final (post-norm) hidden states; lm_head_weight: [V, d] (no bias); labels: [B, T] aligned
    with the input ids (shifted here). Only target positions are gathered, then processed `chunk_size` at a
    time. The reference passes only its hidden states; its head defaults to the policy's (LoRA does not adapt
    the head). Or, instead, `cached`: the batch's rows of a reference cache (`ReferenceCache.batch`, checked
    token by token against the targets), read in place of any reference forward. Reference quantities carry no
    gradient. Without grad mode (evaluation) no gradient work is done.
    """
    if cached is not None and ref_hidden is not None:
        raise ValueError("pass the reference as ref_hidden or as cached, not both")
    check_reference(spec, ref_hidden if cached is None else cached["target_logp"], "ref_hidden or cached")
    if cached is not None:
        check_cached_direction(spec)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: {chunk_size!r} must be an integer >= 1")
    mask, targets = shifted_targets(labels)
    if cached is not None:
        check_alignment(cached, targets)
    n = targets.numel()
    norm = normaliser(num_target_tokens, n)
    if n == 0:
        loss = empty_loss(hidden, lm_head_weight, dtype=compute_dtype(hidden.dtype, lm_head_weight.dtype))
        return loss, batch_stats(loss, hidden.new_zeros(0), hidden.new_zeros(0), None)
    ref_t = ref_weight = None
    if ref_hidden is not None:
        ref_t = ref_hidden[:, :-1][mask].detach()
        ref_weight = (lm_head_weight if ref_lm_head_weight is None else ref_lm_head_weight).detach()
    plan = _Chunked(targets, ref_t, ref_weight, spec, norm, chunk_size, sequence_ids=sequence_ids_for(spec, mask))
    if cached is not None:
        plan.cached_target_logp = cached["target_logp"].detach().to(hidden.device)
        plan.cached_entropy = cached["entropy"].detach().to(hidden.device)
        plan.cached_sample_ids = cached["sample_ids"].detach().to(hidden.device).long()
    hidden_t = hidden[:, :-1][mask]
    if not (torch.is_grad_enabled() and (hidden_t.requires_grad or lm_head_weight.requires_grad)):
        loss, _, _, stats = _chunked_loss(hidden_t.detach(), lm_head_weight.detach(), plan, False, False)
        return loss, stats
    stats: dict[str, float | int] = {}
    loss = _ChunkedHeadLoss.apply(hidden_t, lm_head_weight, plan, stats)
    return loss, stats
