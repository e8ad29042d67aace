"""Token-weighted SFT and anchored SFT (ASFT): the losses as the paper defines them.

    Loss = Σ_t (w_t + α)·CE_t / N + λ·Σ_t KL_t / N

CE_t = −log p_θ(y_t) at every target position t; w_t a detached weight (DFT: w_t = p_θ(y_t); iw-SFT: one weight
per sequence, given to each of its tokens); KL_t the anchor, a divergence from the frozen reference π_ref over the
full vocabulary (the paper's KL(π_ref ‖ π_θ)) with weight λ = kl_weight; α = sft_weight an SFT anchor (the paper's
Figure 4 ablation L = L_DFT + α·L_SFT, which needs no reference model); N the target-token count of the whole
optimizer step when the trainer passes it, so gradient accumulation and world size do not change the result. The
README's "Losses" table lists the modes.

`loss_from_logits` is that definition in plain autograd on full [B, T, V] logits. Training uses
`loss_from_hidden`, which computes the same value and gradients chunk by chunk without full logits
(`asft.chunked_loss`). A new weighting or anchor is one registered function plus its tests: the tests run every
registered one through both paths, and check the config schema's `weighting` enum against `WEIGHTINGS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch

IGNORE_INDEX = -100

# (ce, p, ref_p, spec) -> weights, all [n] over the batch's target tokens; p = exp(-ce); ref_p is the reference
# model's probability of the target (None when the reference was not run). Called under no_grad on detached values.
WeightFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", "LossSpec"], torch.Tensor]
# A per-sequence weighting's: (ce, p, ref_p, spec, sequence_ids) -> weights, sequence_ids [n] each target token's
# batch row (`target_sequence_ids`: ascending, one contiguous run per row that has target tokens).
SequenceWeightFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", "LossSpec", torch.Tensor], torch.Tensor]
# (logp, ref_logp) -> divergence [c], from log-probabilities [c, V] whose rows are target positions. Differentiable
# w.r.t. logp by autograd, and leaves its inputs untouched.
AnchorFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Weighting:
    """A registered token weighting and what computing it requires.

    needs_reference: it reads ref_p, so the reference model must run even without a KL anchor.
    per_token: w_t depends on token t alone (no batch statistic such as a threshold or a median), which lets the
    chunked path weight each chunk as it goes instead of first computing every token's CE.
    per_sequence: w_t depends on the target tokens of t's own sequence (batch row), so fn is a `SequenceWeightFn`
    and also receives each token's sequence index; never per_token (a sequence spans chunks).
    """

    fn: WeightFn | SequenceWeightFn
    needs_reference: bool = False
    per_token: bool = False
    per_sequence: bool = False

    def __post_init__(self) -> None:
        if self.per_token and self.per_sequence:
            raise ValueError("a weighting is per_token or per_sequence, not both: a sequence spans chunks")


# --- the mode row -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """A mode row of the config: a token weighting, an optional KL anchor, and their parameters.

    Validated on construction, so a spec that exists is a usable one. The config schema's mode defaults are
    tested to equal these.
    """

    weighting: str = "none"
    kl_weight: float = 0.0
    kl_direction: str = "forward"
    keep_ratio: float = 0.7
    clip_mult: float = 3.0
    alpha: float = 1.0
    sft_weight: float = 0.0
    iw_temp: float = 1.0
    iw_clip: float = 16.0

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
            "sft_weight": (lambda x: x >= 0, ">= 0"),
            "iw_temp": (lambda x: x >= 0, ">= 0"),
            "iw_clip": (lambda x: x > 0, "> 0"),
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
        return self.kl_weight > 0 or WEIGHTINGS[self.weighting].needs_reference


# --- weightings w_t -----------------------------------------------------------------------------------------------


def weights_none(ce: torch.Tensor, p: torch.Tensor, ref_p: torch.Tensor | None, spec: LossSpec) -> torch.Tensor:
    """SFT: every target token counts once."""
    return torch.ones_like(ce)


def weights_dft(ce: torch.Tensor, p: torch.Tensor, ref_p: torch.Tensor | None, spec: LossSpec) -> torch.Tensor:
    """DFT: w = p_θ(y_t), which turns CE's 1/p gradient scale into a bounded one."""
    return p


def weights_topk(ce: torch.Tensor, p: torch.Tensor, ref_p: torch.Tensor | None, spec: LossSpec) -> torch.Tensor:
    """Keep the k = max(1, int(n·keep_ratio)) lowest-CE tokens, ties at the threshold kept (CE <= k-th smallest).

    Kept tokens weigh n/kept, so the CE term is the mean over the kept tokens when N is the batch's own count
    (and Σ_kept CE / (N·kept/n) in general).
    """
    n = ce.numel()
    k = max(1, int(n * spec.keep_ratio))
    kept = (ce <= torch.kthvalue(ce, k).values).to(ce.dtype)
    return kept * (n / kept.sum())


def weights_antiop(ce: torch.Tensor, p: torch.Tensor, ref_p: torch.Tensor | None, spec: LossSpec) -> torch.Tensor:
    """Clip outlier tokens: w = cap/CE above cap = clip_mult · median CE (torch.median: the lower median)."""
    cap = spec.clip_mult * torch.median(ce)
    return torch.where(ce <= cap, torch.ones_like(ce), cap / ce.clamp_min(torch.finfo(ce.dtype).tiny))


def weights_ref_ratio(ce: torch.Tensor, p: torch.Tensor, ref_p: torch.Tensor | None, spec: LossSpec) -> torch.Tensor:
    """w = max(0.1, 1 + α·clamp(p_ref − p_θ, −1, 1)): more weight where the policy fell below the reference."""
    if ref_p is None:
        raise ValueError("weighting 'ref_ratio' needs the reference model's outputs")
    return (1 + spec.alpha * (ref_p - p).clamp(-1, 1)).clamp_min(0.1)


def weights_iw_sft(
    ce: torch.Tensor, p: torch.Tensor, ref_p: torch.Tensor | None, spec: LossSpec, sequence_ids: torch.Tensor
) -> torch.Tensor:
    """iw-SFT (Qin & Springenberg 2025, arXiv 2507.12856): one weight per sequence s, given to each of its tokens,

        w_s = min(iw_clip, exp(iw_temp · (1/|s|) Σ_{t∈s} [log p_θ(y_t) − log p_ref(y_t)]))

    the importance weight q(τ)/π_ref(τ) of the paper's bound with q = the current policy (detached), taken per
    target token (a geometric mean over the sequence's |s| target tokens), scaled by iw_temp and clipped above, as
    the authors' released trainer computes it (emmyqin/iw_sft, bounding_trainers.py: temp 1, clip [0, 16]).
    """
    if ref_p is None:
        raise ValueError("weighting 'iw_sft' needs the reference model's outputs")
    log_ratio = -ce - torch.log(ref_p)  # log p_θ(y_t) − log p_ref(y_t); ref_p = 0 gives +inf, then w = iw_clip
    _, row, counts = torch.unique_consecutive(sequence_ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.numel(), dtype=ce.dtype, device=ce.device).index_add_(0, row, log_ratio)
    return torch.exp(spec.iw_temp * (sums / counts)).clamp_max(spec.iw_clip)[row]


# The config's `weighting` values. The schema's enum is tested to equal these names.
WEIGHTINGS: dict[str, Weighting] = {
    "none": Weighting(weights_none, per_token=True),
    "dft": Weighting(weights_dft, per_token=True),
    "topk": Weighting(weights_topk),
    "antiop": Weighting(weights_antiop),
    "ref_ratio": Weighting(weights_ref_ratio, needs_reference=True, per_token=True),
    "iw_sft": Weighting(weights_iw_sft, needs_reference=True, per_sequence=True),
}


def register_weighting(
    name: str, *, needs_reference: bool = False, per_token: bool = False, per_sequence: bool = False
) -> Callable[[WeightFn], WeightFn]:
    """Decorator adding a weighting to `WEIGHTINGS` under the config name `name` (see `Weighting` for the flags).

    per_token defaults to False, the safe choice: the chunked path then computes every token's CE before weighting.
    """

    def decorator(fn: WeightFn) -> WeightFn:
        WEIGHTINGS[name] = Weighting(
            fn, needs_reference=needs_reference, per_token=per_token, per_sequence=per_sequence
        )
        return fn

    return decorator


def token_weights(
    ce: torch.Tensor, ref_p: torch.Tensor | None, spec: LossSpec, sequence_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Detached weights for target tokens with cross-entropies `ce` (the whole batch, or a per-token chunk).

    sequence_ids (`target_sequence_ids`) is read by per-sequence weightings only, which need it.
    The SFT anchor adds α to every token's weight: Σ (w_t + α)·CE_t is the weighted loss plus α times SFT's.
    """
    weighting = WEIGHTINGS[spec.weighting]
    with torch.no_grad():
        ce = ce.detach()
        args = (ce, torch.exp(-ce), None if ref_p is None else ref_p.detach(), spec)
        if weighting.per_sequence:
            if sequence_ids is None:
                raise ValueError(f"weighting {spec.weighting!r} needs each target token's sequence index")
            weights = weighting.fn(*args, sequence_ids.detach())
        else:
            weights = weighting.fn(*args)
        return weights + spec.sft_weight if spec.sft_weight else weights


# --- anchors KL_t -------------------------------------------------------------------------------------------------


def kl_forward(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """KL(π_ref ‖ π_θ) = Σ_v q_v (log q_v − log p_v), the paper's anchor (mass-covering).

    Vocabulary entries the reference gives no mass (q = 0, also log q = −inf) contribute 0, never NaN.
    """
    q = ref_logp.exp()
    diff = (ref_logp - logp).masked_fill_(q == 0, 0.0)  # in place on our own temporaries: one [c, V] less
    return diff.mul_(q).sum(-1)


def kl_reverse(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """KL(π_θ ‖ π_ref) = Σ_v p_v (log p_v − log q_v), the mode-seeking ablation; 0·log 0 terms are 0."""
    diff = logp - ref_logp
    p = torch.exp(logp)
    diff.masked_fill_(p == 0, 0.0)  # a zero (not NaN) value and gradient where the policy has no mass
    return (p * diff).sum(-1)


# The config's `kl_direction` values. The schema's enum is tested to equal these names.
ANCHORS: dict[str, AnchorFn] = {"forward": kl_forward, "reverse": kl_reverse}


def register_anchor(name: str) -> Callable[[AnchorFn], AnchorFn]:
    """Decorator adding an anchor (a divergence from the reference) under the `kl_direction` value `name`.

    The chunked path differentiates it by autograd chunk by chunk; forward and reverse KL have hand-derived
    gradients there instead (`asft.chunked_loss`).
    """

    def decorator(fn: AnchorFn) -> AnchorFn:
        ANCHORS[name] = fn
        return fn

    return decorator


# --- the loss -----------------------------------------------------------------------------------------------------


def loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    ref_logits: torch.Tensor | None = None,
    num_target_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float | int]]:
    """The loss from full logits [B, T, V] with labels [B, T] aligned to the input ids (shifted here).

    The definition in plain autograd, float32 math (float64 stays float64). The KL to the reference is computed
    whenever ref_logits is given, for the `kl` statistic, but enters the loss only if kl_weight > 0.
    """
    check_reference(spec, ref_logits, "ref_logits")
    mask, targets = shifted_targets(labels)
    n = targets.numel()
    norm = normaliser(num_target_tokens, n)
    dtype = compute_dtype(logits.dtype)
    if n == 0:
        loss = empty_loss(logits, dtype=dtype)
        return loss, batch_stats(loss, logits.new_zeros(0), logits.new_zeros(0), None)
    logp = torch.log_softmax(logits[:, :-1][mask], dim=-1, dtype=dtype)
    ce = -logp.gather(-1, targets[:, None]).squeeze(-1)
    ref_p = kl = None
    if ref_logits is not None:
        with torch.no_grad():
            ref_logp = torch.log_softmax(ref_logits[:, :-1][mask], dim=-1, dtype=dtype)
            ref_p = ref_logp.gather(-1, targets[:, None]).squeeze(-1).exp()
        with torch.set_grad_enabled(torch.is_grad_enabled() and spec.kl_weight > 0):
            kl = ANCHORS[spec.kl_direction](logp, ref_logp)
    weights = token_weights(ce, ref_p, spec, sequence_ids_for(spec, mask))
    loss = (weights * ce).sum() / norm
    if spec.kl_weight > 0:
        loss = loss + spec.kl_weight * kl.sum() / norm
    return loss, batch_stats(loss, ce, weights, kl)


def loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    ref_hidden: torch.Tensor | None = None,
    ref_lm_head_weight: torch.Tensor | None = None,
    num_target_tokens: int | torch.Tensor | None = None,
    chunk_size: int = 1024,
    cached: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float | int]]:
    """`loss_from_logits(hidden @ W.T, ...)` without full logits: the chunked kernel of `asft.chunked_loss`.

    hidden: [B, T, d] final (post-norm) hidden states; lm_head_weight W: [V, d]; the reference passes only its
    hidden states, and its head defaults to the policy's (LoRA does not adapt the head). `cached` replaces the
    reference forward by a reference cache's rows for the batch (`asft.reference_cache`: exact p_ref(y_t), the
    forward KL as an unbiased sampled estimate).
    """
    from asft.chunked_loss import chunked_loss_from_hidden  # imported here: the kernel builds on this module

    return chunked_loss_from_hidden(
        hidden, lm_head_weight, labels, spec, ref_hidden, ref_lm_head_weight, num_target_tokens, chunk_size, cached
    )


# --- batch bookkeeping shared by both paths -----------------------------------------------------------------------


def count_target_tokens(labels: torch.Tensor) -> int:
    """Target tokens after the causal shift (labels aligned with input ids, -100 ignored)."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def shifted_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over positions 0..T-2 that predict a target, the targets in row-major order)."""
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    return mask, shifted[mask]


def target_sequence_ids(mask: torch.Tensor) -> torch.Tensor:
    """Each target token's batch row [n], in `shifted_targets` order (row-major, so ascending)."""
    return mask.nonzero(as_tuple=True)[0]


def sequence_ids_for(spec: LossSpec, mask: torch.Tensor) -> torch.Tensor | None:
    """`target_sequence_ids(mask)` if the spec's weighting is per-sequence, else None (nothing computed)."""
    return target_sequence_ids(mask) if WEIGHTINGS[spec.weighting].per_sequence else None


def normaliser(num_target_tokens: int | torch.Tensor | None, n: int) -> float:
    """N: the step's target-token count if given (it covers this batch), else this batch's own; at least 1."""
    if num_target_tokens is None:
        return float(max(n, 1))
    if isinstance(num_target_tokens, bool):
        raise ValueError(f"num_target_tokens: {num_target_tokens!r} is not a count")
    value = float(num_target_tokens.item() if torch.is_tensor(num_target_tokens) else num_target_tokens)
    if value < n or value < 0:
        raise ValueError(f"num_target_tokens={value:g} is less than this batch's own {n} target tokens")
    return max(value, 1.0)


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32 math whatever the input precision; float64 stays float64 (the tests' exact references)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def check_reference(spec: LossSpec, ref: torch.Tensor | None, name: str) -> None:
    """Refuse a spec that needs the reference model when its outputs were not passed as `name`."""
    if spec.needs_reference and ref is None:
        raise ValueError(f"{spec} needs the reference model: pass {name}")


def empty_loss(*tensors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 with zero gradients for every input that requires grad (an empty sum: no inf·0 = NaN possible)."""
    return sum((t[..., :0].sum() for t in tensors), torch.zeros((), dtype=dtype, device=tensors[0].device))


def batch_stats(
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
