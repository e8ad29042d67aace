"""Exact per-token gradients of a causal LM on a chosen parameter set, and their seeded random projection.

For a batch with target tokens t = 1..n and CE_t = −log p_θ(y_t), the per-token gradient is g_t = ∇_θ CE_t over
the selected parameters θ (LoRA A/B by default). One forward gives the n losses and a vector–Jacobian product
closure (`torch.func.vjp`); `torch.func.vmap` applies it to rows of the identity, `chunk_size` rows at a time, so
memory is bounded by chunk_size backward passes and there is no Python loop over tokens. One more application with
a vector of ones gives the batch gradient G = Σ_t g_t exactly, against which each token's alignment
cos(g_t, G) and magnitude ‖g_t‖ are computed before anything is projected.

The stored representation is R·g_t with R a d × P Rademacher matrix (entries ±1/√d), drawn per parameter tensor
from a generator seeded by (seed, parameter name): the projection is linear (Σ_t R·g_t = R·G) and, by the
Johnson–Lindenstrauss lemma, preserves the cosines within `jl_cosine_bound` with the stated probability.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from asft.losses import shifted_targets

LORA_SELECTOR = "lora"
_LORA_NAME = re.compile(r"\.lora_[AB]\.")


def select_parameters(model: torch.nn.Module, selector: str) -> dict[str, torch.nn.Parameter]:
    """The traced parameters by name: `lora` = every LoRA A/B matrix, otherwise a regular expression searched in
    each parameter's name (e.g. `layers\\.27\\.mlp\\.`). Refuses a selection that matches nothing."""
    pattern = _LORA_NAME if selector == LORA_SELECTOR else re.compile(selector)
    chosen = {name: p for name, p in model.named_parameters() if pattern.search(name)}
    if not chosen:
        what = "no LoRA A/B matrices (is an adapter attached?)" if selector == LORA_SELECTOR else "nothing"
        raise ValueError(f"trace.parameters: {selector!r} selects {what} among the model's parameters")
    return chosen


def _parameter_seed(seed: int, name: str) -> int:
    """A per-tensor seed that depends on the tensor's name, not on the order tensors are visited in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:7], "little")


class RademacherProjection:
    """R: the concatenated parameter space (P) → d, as one ±1/√d block per parameter tensor.

    Each tensor's block is drawn in row slices of at most `slice_elements` entries, each from its own generator
    seeded by (seed, name, slice), so neither the d × P matrix nor one big tensor's block (a 7B MLP matrix has
    68M rows) ever exists whole; blocks are kept only when all of them fit in `cache_elements`. Draws come from a
    generator on the tensors' device: the matrix (not the cosines it preserves) differs between CPU and CUDA.
    Projections are computed in float32 at least, so bf16 gradients lose no further precision to ±1/√d.
    """

    def __init__(
        self,
        sizes: Mapping[str, int],
        dim: int,
        seed: int,
        device: torch.device,
        cache_elements: int = 1 << 26,
        slice_elements: int = 1 << 24,
    ) -> None:
        if dim < 1:
            raise ValueError(f"trace.dim must be >= 1, got {dim}")
        self.sizes = dict(sizes)
        self.dim = dim
        self.seed = seed
        self.device = torch.device(device)
        self.rows_per_slice = max(1, slice_elements // dim)
        self._cache: dict[str, torch.Tensor] | None = {} if sum(sizes.values()) * dim <= cache_elements else None

    def _slice(self, name: str, index: int, dtype: torch.dtype) -> torch.Tensor:
        rows = min(self.rows_per_slice, self.sizes[name] - index * self.rows_per_slice)
        generator = torch.Generator(device=self.device).manual_seed(_parameter_seed(self.seed, f"{name}#{index}"))
        signs = torch.randint(0, 2, (rows, self.dim), generator=generator, device=self.device)
        return (signs.to(dtype) * 2 - 1) / math.sqrt(self.dim)

    def _slices(self, name: str) -> int:
        return math.ceil(self.sizes[name] / self.rows_per_slice)

    def block(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """R's columns for parameter `name`, as a [size, d] matrix of ±1/√d (whole: for small tensors and tests)."""
        if self._cache is not None and name in self._cache:
            return self._cache[name].to(dtype)
        block = torch.cat([self._slice(name, i, dtype) for i in range(self._slices(name))])
        if self._cache is not None:
            self._cache[name] = block
        return block

    def __call__(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[c, d] projections of c gradients given per parameter as [c, *shape] tensors."""
        out = None
        for name, grad in grads.items():
            flat = grad.reshape(grad.shape[0], -1)
            flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
            if self._cache is not None:
                part = flat @ self.block(name, flat.dtype)
            else:
                step = self.rows_per_slice
                part = sum(
                    flat[:, i * step : (i + 1) * step] @ self._slice(name, i, flat.dtype)
                    for i in range(self._slices(name))
                )
            out = part if out is None else out + part
        if out is None:
            raise ValueError("no gradients to project")
        return out


def jl_failure_probability(dim: int, eps: float, pairs: int) -> float:
    """Upper bound on P(some cosine error > 2ε/(1−ε)) over `pairs` (u, v) pairs for a d-dim Rademacher projection.

    Achlioptas (2003, Thm 1.1): P(|‖Rx‖² − ‖x‖²| > ε‖x‖²) ≤ 2·exp(−(d/2)(ε²/2 − ε³/3)). If the squared norms of u,
    v, u+v and u−v (u, v unit) are all within 1 ± ε, polarisation gives |⟨Ru,Rv⟩ − ⟨u,v⟩| ≤ ε and then
    |cos(Ru,Rv) − cos(u,v)| ≤ (|cos| + ε)/(1 − ε) − |cos| ≤ 2ε/(1 − ε). Four norms per pair, union bound.
    """
    return min(1.0, pairs * 8 * math.exp(-(dim / 2) * (eps**2 / 2 - eps**3 / 3)))


def jl_cosine_bound(dim: int, pairs: int, failure_probability: float = 1e-3) -> float:
    """The cosine error 2ε/(1−ε) that all `pairs` cosines stay within, except with `failure_probability`.

    ε solved by bisection on `jl_failure_probability` (monotone in ε on (0, 1)); 2.0 (no information: cosines lie
    in [−1, 1]) when d is too small for any ε < 1.
    """
    if jl_failure_probability(dim, 1 - 1e-9, pairs) > failure_probability:
        return 2.0
    low, high = 0.0, 1 - 1e-9
    for _ in range(100):
        mid = (low + high) / 2
        if jl_failure_probability(dim, mid, pairs) > failure_probability:
            low = mid
        else:
            high = mid
    return min(2.0, 2 * high / (1 - high))


@dataclass
class TokenGradients:
    """One batch's traced target tokens, in `shifted_targets` order (row-major over the batch).

    ce [n]; projected [m, d]; norm and alignment [m] exact (fp64 accumulation): ‖g_t‖ and cos(g_t, G); `traced`
    [m] the indices (into the n targets) whose gradients were taken; batch_norm ‖G‖, with G over all n targets.
    """

    ce: torch.Tensor
    traced: torch.Tensor
    projected: torch.Tensor
    norm: torch.Tensor
    alignment: torch.Tensor
    batch_norm: float
    projected_batch: torch.Tensor


def _flat(grads: Mapping[str, torch.Tensor], rows: int) -> torch.Tensor:
    """[rows, P]: each row's gradients of every parameter, concatenated in the mapping's order."""
    return torch.cat([g.reshape(rows, -1) for g in grads.values()], dim=1)


def token_losses_fn(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[Callable[[dict[str, torch.Tensor]], torch.Tensor], torch.Tensor]:
    """(f, mask): f(params) = every target token's CE [n] with `params` substituted into `model`."""
    mask, targets = shifted_targets(labels)

    def token_losses(params: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.func.functional_call(
            model,
            params,
            args=(),
            kwargs={"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False},
        )
        logits = out.logits[:, :-1][mask]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits: CE in float32
        return -torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    return token_losses, mask


def token_gradients(
    model: torch.nn.Module,
    params: Mapping[str, torch.nn.Parameter],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    projection: RademacherProjection,
    chunk_size: int,
    traced: torch.Tensor | None = None,
) -> TokenGradients:
    """Per-token gradients of the selected parameters for one batch, projected, with exact norms and alignments.

    traced: indices of the target tokens to take gradients of (default all); G is always over every target.
    """
    if chunk_size < 1:
        raise ValueError(f"trace.chunk_size must be >= 1, got {chunk_size}")
    token_losses, _ = token_losses_fn(model, input_ids, attention_mask, labels)
    primals = {name: p.detach() for name, p in params.items()}
    ce, vjp_fn = torch.func.vjp(token_losses, primals)
    n = ce.numel()
    batch_grad = {name: g.detach() for name, g in vjp_fn(torch.ones_like(ce))[0].items()}
    batch_flat = _flat({k: v.unsqueeze(0) for k, v in batch_grad.items()}, 1)[0].double()
    batch_norm = float(batch_flat.norm())
    projected_batch = projection({k: v.unsqueeze(0) for k, v in batch_grad.items()})[0]
    traced = torch.arange(n, device=ce.device) if traced is None else traced.to(ce.device)
    projected, norms, dots = [], [], []
    for rows in _chunks(traced, chunk_size):
        cotangents = torch.zeros(rows.numel(), n, dtype=ce.dtype, device=ce.device)
        cotangents[torch.arange(rows.numel(), device=ce.device), rows] = 1
        (grads,) = torch.func.vmap(vjp_fn)(cotangents)
        grads = {name: g.detach() for name, g in grads.items()}
        flat = _flat(grads, rows.numel()).double()
        norms.append(flat.norm(dim=1))
        dots.append(flat @ batch_flat)
        projected.append(projection(grads))
        del grads, flat
    norm = torch.cat(norms) if norms else torch.zeros(0, dtype=torch.float64)
    dot = torch.cat(dots) if dots else torch.zeros(0, dtype=torch.float64)
    denominator = norm * batch_norm
    alignment = torch.where(denominator > 0, dot / denominator.clamp_min(1e-300), torch.full_like(dot, math.nan))
    return TokenGradients(
        ce=ce.detach(),
        traced=traced,
        projected=torch.cat(projected) if projected else torch.zeros(0, projection.dim),
        norm=norm,
        alignment=alignment,
        batch_norm=batch_norm,
        projected_batch=projected_batch.detach(),
    )


def _chunks(indices: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, indices.numel(), size):
        yield indices[start : start + size]
