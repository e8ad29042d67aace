"""The frozen reference model, run once per model × dataset: per-target-token statistics cached on disk.

Why: the anchored losses need p_ref(·|t) at every target token t, and running the reference next to the policy at
every step doubles the forward cost. What the losses read from it can be stored once, per target token:

- log p_ref(y_t), the target's log-probability: `ref_ratio` (sft-lr) and `iw_sft` weights from it are exact;
- H_ref(t), the reference entropy: exact;
- K ids v_1..v_K drawn with replacement from p_ref(·|t) (repeats are the counts). Forward KL(ref‖θ) =
  −H_ref − E_{v∼p_ref}[log p_θ(v)], so −H_ref − (1/K)·Σ_k log p_θ(v_k) is an unbiased estimate of it, and its
  gradient w.r.t. θ, −(1/K)·Σ_k ∇ log p_θ(v_k), is an unbiased estimate of ∇KL (the random sampling of Anshumann
  et al., "Sparse Logit Sampling", ACL 2025, who prove that caching the top-k probabilities is biased: the top-k +
  tail functions here exist only to show that bias next to the sampled estimator);
- the target id y_t itself, so a batch is checked token by token against the cache it reads.

Reverse KL(θ‖ref) = E_{v∼p_θ}[log p_θ(v) − log p_ref(v)] needs log p_ref at the policy's own tokens, which samples
from p_ref give only with importance weights: a cache supports the forward direction only
(`supported_kl_directions`).

Conventions are those of `asft.losses`: target tokens are the positions `shifted_targets(labels)` selects, in its
row-major order; math in float32, float64 staying float64 (the tests' exact references).

On disk one cache is one folder (written to `<name>.tmp` and renamed on success, `asft.run_io.atomic_dir`):

    header.json        format, version, identity (model, tokenizer, template, max_length, ... from the caller),
                       k, seed, n_tokens, per-array file/dtype/shape/sha256, examples [[id, offset, length], ...]
    target_logp.npy    float32 [N]
    entropy.npy        float32 [N]
    sample_ids.npy     int32   [N, K]
    target_ids.npy     int32   [N]

N is the dataset's target-token count; example `id`'s tokens are rows offset..offset+length, so lookup by id is
independent of the order the trainer draws examples in. Arrays open with np.load(mmap_mode="r").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asft.losses import (
    LossSpec,
    batch_stats,
    compute_dtype,
    empty_loss,
    normaliser,
    sequence_ids_for,
    shifted_targets,
    token_weights,
)
from asft.run_io import atomic_dir

FORMAT = "asft-reference-cache"
VERSION = 1
HEADER_FILE = "header.json"
# The fields a cache must record and a reader must match: anything that changes which tokens are targets or what the
# reference predicts for them. The caller may add more (a dataset hash, a revision); all recorded fields are compared.
REQUIRED_IDENTITY = ("model", "tokenizer", "template", "max_length")
# name -> on-disk dtype (little-endian). Token ids fit int32 (vocabularies are < 2^31).
ARRAYS: dict[str, np.dtype] = {
    "target_logp": np.dtype("<f4"),
    "entropy": np.dtype("<f4"),
    "sample_ids": np.dtype("<i4"),
    "target_ids": np.dtype("<i4"),
}
_NPY_HEADER_BYTES = 128  # a fixed-size .npy header, rewritten in place once the row count is known

ExampleId = int | str
Stats = Mapping[str, torch.Tensor]


def supported_kl_directions() -> frozenset[str]:
    """The `kl_direction` values a cache can anchor: forward only (reverse needs p_ref at the policy's samples)."""
    return frozenset({"forward"})


def sampling_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The generator `reference_statistics` draws from: a cache is reproducible from (seed, device, batch order)."""
    return torch.Generator(device=device).manual_seed(seed)


# --- statistics of the reference ------------------------------------------------------------------------------------


def reference_statistics(
    ref_logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None,
    k: int,
    generator: torch.Generator,
    chunk_rows: int = 1024,
) -> dict[str, torch.Tensor]:
    """Per target token: target_logp, entropy [n] (compute dtype), sample_ids [n, K] and target_ids [n] (int64).

    ref_logits [B, T, V] or [T, V] with `mask, targets = shifted_targets(labels)` (mask over positions 0..T-2;
    [T-1] for one sequence), or mask None and ref_logits the target rows [n, V] themselves (a chunk of
    hidden @ W.T). Rows are taken `chunk_rows` at a time, so at most a few [chunk_rows, V] tensors exist beyond the
    input. Samples are K draws with replacement from p_ref(·|t), from `generator` (on ref_logits' device).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: {k!r} must be an integer >= 1")
    if mask is None:
        if ref_logits.dim() != 2:
            raise ValueError(f"without a mask ref_logits must be the target rows [n, V], got {tuple(ref_logits.shape)}")
        rows_of = ref_logits
        index: tuple[torch.Tensor, ...] = (torch.arange(ref_logits.shape[0], device=ref_logits.device),)
    else:
        logits3 = ref_logits if ref_logits.dim() == 3 else ref_logits.unsqueeze(0)
        mask2 = mask if mask.dim() == 2 else mask.unsqueeze(0)
        if logits3.dim() != 3 or mask2.shape != (logits3.shape[0], logits3.shape[1] - 1):
            raise ValueError(
                f"mask {tuple(mask.shape)} must cover positions 0..T-2 of ref_logits {tuple(ref_logits.shape)}"
            )
        rows_of = logits3
        index = mask2.nonzero(as_tuple=True)
    n = targets.numel()
    if index[0].numel() != n:
        raise ValueError(f"{n} targets for {index[0].numel()} target positions")
    dtype = compute_dtype(ref_logits.dtype)
    targets = targets.reshape(-1).long()
    out = {
        "target_logp": torch.empty(n, dtype=dtype, device=ref_logits.device),
        "entropy": torch.empty(n, dtype=dtype, device=ref_logits.device),
        "sample_ids": torch.empty(n, k, dtype=torch.long, device=ref_logits.device),
        "target_ids": targets.clone(),
    }
    with torch.no_grad():
        for start in range(0, n, chunk_rows):
            end = min(start + chunk_rows, n)
            logp = torch.log_softmax(rows_of[tuple(i[start:end] for i in index)], dim=-1, dtype=dtype)
            out["target_logp"][start:end] = logp.gather(-1, targets[start:end, None]).squeeze(-1)
            p = logp.exp()
            out["entropy"][start:end] = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)  # 0·log 0 = 0, not NaN
            out["sample_ids"][start:end] = torch.multinomial(p, k, replacement=True, generator=generator)
    return out


def split_by_example(stats: Stats, mask: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """A batch's statistics (row-major over `mask` [B, T-1]) as one dict per sequence, for the writer."""
    counts = (mask if mask.dim() == 2 else mask.unsqueeze(0)).sum(-1).tolist()
    parts = {name: torch.split(value, counts) for name, value in stats.items()}
    return [{name: parts[name][b] for name in stats} for b in range(len(counts))]


# --- the sampled forward-KL estimator -------------------------------------------------------------------------------


def cached_forward_kl(logp_theta_at_samples: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """Unbiased KL(ref‖θ) per token: −H_ref − (1/K)·Σ_k log p_θ(v_k), v_k ∼ p_ref; [..., K], [...] -> [...].

    Linear in log p_θ(v_k), so its autograd gradient is the unbiased −(1/K)·Σ_k ∇ log p_θ(v_k). A single estimate
    can be negative: only its mean is the (non-negative) KL.
    """
    return -entropy.to(logp_theta_at_samples.dtype) - logp_theta_at_samples.mean(-1)


def policy_logp_at_samples(scores: torch.Tensor, sample_ids: torch.Tensor, log_probs: bool = False) -> torch.Tensor:
    """log p_θ(v_k) [..., K] from the policy's logits (or, with log_probs, its log-softmax) [..., V].

    From logits: z_v − logsumexp(z), so no [..., V] log-softmax is built (its gradient is p − onehot, by autograd).
    """
    picked = scores.gather(-1, sample_ids.long())
    return picked if log_probs else picked - torch.logsumexp(scores, dim=-1, keepdim=True)


def cached_forward_kl_from_logits(
    scores: torch.Tensor, sample_ids: torch.Tensor, entropy: torch.Tensor, log_probs: bool = False
) -> torch.Tensor:
    """The estimate per target row from the policy's logits (or log-softmax, with log_probs) [n, V]: the drop-in
    for `kl_forward(logp, ref_logp)` when the reference is cached."""
    dtype = compute_dtype(scores.dtype)
    return cached_forward_kl(policy_logp_at_samples(scores.to(dtype), sample_ids, log_probs), entropy)


def cached_forward_kl_analytic(
    logp: torch.Tensor, sample_ids: torch.Tensor, entropy: torch.Tensor, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(estimate [c], d estimate / d logits [c, V] or None) from log-probabilities [c, V]: the gradient that
    `asft.chunked_loss` folds into its own gradient buffer, written out on its own (tested against autograd).

    d/dz = p − counts/K, the exact kernel's p − q with q replaced by the samples' empirical distribution
    (`asft.chunked_loss._kl_forward_analytic`).
    """
    kl = cached_forward_kl(logp.gather(-1, sample_ids.long()), entropy)
    if not need_grad:
        return kl, None
    k = sample_ids.shape[-1]
    grad = torch.exp(logp)
    grad.scatter_add_(
        -1, sample_ids.long(), torch.full(sample_ids.shape, -1.0 / k, dtype=grad.dtype, device=grad.device)
    )
    return kl, grad


def cached_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    cached: Stats,
    num_target_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float | int]]:
    """`asft.losses.loss_from_logits` with the reference read from a cache (`ReferenceCache.batch`): the reference
    of the integration, in plain autograd on full logits.

    ref_p = exp(cached target_logp) (exact); the anchor is the sampled forward-KL estimate (unbiased, value and
    gradient). The `kl` statistic is that estimate's mean.
    """
    check_cached_direction(spec)
    mask, targets = shifted_targets(labels)
    n = targets.numel()
    check_alignment(cached, targets)
    norm = normaliser(num_target_tokens, n)
    dtype = compute_dtype(logits.dtype)
    if n == 0:
        loss = empty_loss(logits, dtype=dtype)
        return loss, batch_stats(loss, logits.new_zeros(0), logits.new_zeros(0), None)
    logp = torch.log_softmax(logits[:, :-1][mask], dim=-1, dtype=dtype)
    ce = -logp.gather(-1, targets[:, None]).squeeze(-1)
    ref_p = cached["target_logp"].to(device=logp.device, dtype=dtype).exp()
    with torch.set_grad_enabled(torch.is_grad_enabled() and spec.kl_weight > 0):
        kl = cached_forward_kl_from_logits(
            logp, cached["sample_ids"].to(logp.device), cached["entropy"].to(logp.device), log_probs=True
        )
    weights = token_weights(ce, ref_p, spec, sequence_ids_for(spec, mask))
    loss = (weights * ce).sum() / norm
    if spec.kl_weight > 0:
        loss = loss + spec.kl_weight * kl.sum() / norm
    return loss, batch_stats(loss, ce, weights, kl)


def check_cached_direction(spec: LossSpec) -> None:
    """Refuse an anchor a cache cannot estimate (`supported_kl_directions`) before any work."""
    if spec.kl_weight > 0 and spec.kl_direction not in supported_kl_directions():
        raise ValueError(
            f"kl_direction {spec.kl_direction!r} cannot use a cached reference; supported: "
            f"{sorted(supported_kl_directions())}"
        )


def check_alignment(cached: Stats, targets: torch.Tensor) -> None:
    """Refuse cached statistics that are not this batch's target tokens, in order (wrong example, template, length)."""
    cached_ids, targets = cached["target_ids"].to(targets.device).long(), targets.long()
    if cached_ids.shape != targets.shape:
        where = "the lengths differ"
    elif not torch.equal(cached_ids, targets):
        where = f"first difference at target token {int((cached_ids != targets).nonzero()[0, 0])}"
    else:
        return
    raise ValueError(
        f"the cached reference does not match this batch's targets ({cached_ids.numel()} cached, "
        f"{targets.numel()} in the batch; {where})"
    )


# --- top-k + tail: the biased alternative, for comparison only --------------------------------------------------------


def topk_tail_statistics(ref_logp: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """COMPARISON ONLY (biased): the reference's top-k ids and log-probs [n, k] per target row of ref_logp [n, V]."""
    top_logp, top_ids = ref_logp.topk(k, dim=-1)
    return {"top_ids": top_ids, "top_logp": top_logp}


def topk_tail_forward_kl(logp: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor) -> torch.Tensor:
    """COMPARISON ONLY (biased): KL between the top-k + one tail bucket coarsenings of ref and θ, per row.

    Σ_{i∈top} q_i log(q_i/p_i) + q_tail log(q_tail/p_tail). By the data-processing inequality it is <= the full
    KL, with equality only if both distributions agree in shape on the tail: biased low, gradient biased too.
    """
    p_top = logp.gather(-1, top_ids)
    q = top_logp.exp()
    head = (q * (top_logp - p_top)).sum(-1)
    q_tail = (1 - q.sum(-1)).clamp_min(0)
    log_p_tail = torch.log1p(-p_top.exp().sum(-1).clamp_max(1 - torch.finfo(logp.dtype).eps))
    tail = torch.where(q_tail > 0, q_tail * (torch.log(q_tail.clamp_min(torch.finfo(q.dtype).tiny)) - log_p_tail), 0.0)
    return head + tail


# --- on disk --------------------------------------------------------------------------------------------------------


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A .npy (format 1.0) header padded to exactly _NPY_HEADER_BYTES, so it can be rewritten in place."""
    body = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}).encode()
    pad = _NPY_HEADER_BYTES - 10 - len(body) - 1
    if pad < 0:
        raise ValueError(f"shape {shape} does not fit a {_NPY_HEADER_BYTES}-byte .npy header")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", _NPY_HEADER_BYTES - 10) + body + b" " * pad + b"\n"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_identity(identity: Mapping[str, Any]) -> dict[str, Any]:
    """The identity as JSON will store it; refuses missing required fields and values JSON cannot hold."""
    missing = [name for name in REQUIRED_IDENTITY if name not in identity]
    if missing:
        raise ValueError(f"reference cache identity: missing {missing}; required: {list(REQUIRED_IDENTITY)}")
    try:
        return json.loads(json.dumps(dict(identity), sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"reference cache identity {dict(identity)!r} is not plain JSON: {error}") from error


def _check_example_id(example_id: Any) -> ExampleId:
    if isinstance(example_id, bool) or not isinstance(example_id, (int, str)):
        raise ValueError(f"example id {example_id!r}: must be an int or a str")
    return example_id


class ReferenceCacheWriter:
    """Appends examples' statistics to the open arrays of a cache folder being assembled (see `write_cache`)."""

    def __init__(self, folder: Path, k: int) -> None:
        self.folder, self.k, self.n_tokens = folder, k, 0
        self.examples: list[list[Any]] = []
        self._seen: set[tuple[type, ExampleId]] = set()
        self._files = {name: (folder / f"{name}.npy").open("wb") for name in ARRAYS}
        for name, dtype in ARRAYS.items():
            self._files[name].write(_npy_header(dtype, self._shape(name, 0)))

    def _shape(self, name: str, n: int) -> tuple[int, ...]:
        return (n, self.k) if name == "sample_ids" else (n,)

    def add(self, example_id: ExampleId, stats: Stats) -> None:
        """One example's statistics, its target tokens in order (`split_by_example`); each id once."""
        key = (type(_check_example_id(example_id)), example_id)
        if key in self._seen:
            raise ValueError(f"example id {example_id!r} added twice")
        n = int(stats["target_ids"].numel())
        arrays = {}
        for name, dtype in ARRAYS.items():
            value = stats[name].detach().cpu()
            if tuple(value.shape) != self._shape(name, n):
                raise ValueError(
                    f"example {example_id!r}: {name} has shape {tuple(value.shape)}, not {self._shape(name, n)}"
                )
            if name in ("sample_ids", "target_ids") and n and (int(value.min()) < 0 or int(value.max()) >= 2**31):
                raise ValueError(f"example {example_id!r}: {name} out of int32 token-id range")
            arrays[name] = value.numpy().astype(dtype, copy=False)
        for name, array in arrays.items():
            self._files[name].write(np.ascontiguousarray(array).tobytes())
        self._seen.add(key)
        self.examples.append([example_id, self.n_tokens, n])
        self.n_tokens += n

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()

    def finish(self, identity: dict[str, Any], seed: int) -> None:
        """Final .npy shapes, checksums, then header.json (the last file written)."""
        arrays = {}
        for name, dtype in ARRAYS.items():
            handle = self._files[name]
            shape = self._shape(name, self.n_tokens)
            handle.seek(0)
            handle.write(_npy_header(dtype, shape))
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            file = f"{name}.npy"
            arrays[name] = {
                "file": file,
                "dtype": dtype.str,
                "shape": list(shape),
                "sha256": _sha256(self.folder / file),
            }
        header = {
            "format": FORMAT,
            "version": VERSION,
            "identity": identity,
            "k": self.k,
            "seed": seed,
            "n_tokens": self.n_tokens,
            "arrays": arrays,
            "examples": self.examples,
        }
        (self.folder / HEADER_FILE).write_text(json.dumps(header, sort_keys=True) + "\n", encoding="utf-8")


@contextlib.contextmanager
def write_cache(path: str | Path, identity: Mapping[str, Any], k: int, seed: int) -> Iterator[ReferenceCacheWriter]:
    """Yield a writer; on success the folder appears at `path` complete (temp folder renamed), on error never.

    identity: the fields a reader must match (REQUIRED_IDENTITY and any more), plain JSON values; seed: the one
    `sampling_generator` was built from, recorded for provenance.
    """
    identity = _check_identity(identity)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: {k!r} must be an integer >= 1")
    with atomic_dir(Path(path)) as tmp:
        writer = ReferenceCacheWriter(tmp, k)
        try:
            yield writer
            writer.finish(identity, int(seed))
        finally:
            writer.close()


@dataclass(frozen=True)
class ReferenceCache:
    """An opened, validated cache: memory-mapped arrays and each example id's token rows."""

    path: Path
    header: dict[str, Any]
    arrays: dict[str, np.ndarray]
    index: dict[tuple[type, ExampleId], tuple[int, int]]

    @property
    def k(self) -> int:
        return int(self.header["k"])

    @property
    def n_tokens(self) -> int:
        return int(self.header["n_tokens"])

    def example(self, example_id: ExampleId) -> dict[str, np.ndarray]:
        """The example's rows of every array (views of the memory map)."""
        key = (type(_check_example_id(example_id)), example_id)
        if key not in self.index:
            raise KeyError(f"example id {example_id!r} is not in the reference cache {self.path}")
        offset, length = self.index[key]
        return {name: array[offset : offset + length] for name, array in self.arrays.items()}

    def batch(
        self,
        example_ids: Sequence[ExampleId],
        targets: torch.Tensor | None = None,
        device: str | torch.device | None = None,
    ) -> dict[str, torch.Tensor]:
        """The batch's statistics in `shifted_targets` order (its sequences in `example_ids` order), as tensors:
        target_logp, entropy float32; sample_ids, target_ids int64. With `targets`, checked token by token."""
        parts = [self.example(example_id) for example_id in example_ids]
        out = {}
        for name, dtype in ARRAYS.items():
            empty = np.empty(self._shape(name), dtype=dtype)
            joined = np.concatenate([part[name] for part in parts]) if parts else empty
            tensor = torch.from_numpy(np.ascontiguousarray(joined, dtype=dtype.newbyteorder("=")))
            out[name] = (tensor.long() if dtype.kind == "i" else tensor).to(device)
        if targets is not None:
            check_alignment(out, targets)
        return out

    def _shape(self, name: str) -> tuple[int, ...]:
        return (0, self.k) if name == "sample_ids" else (0,)


def open_cache(path: str | Path, identity: Mapping[str, Any], verify: bool = True) -> ReferenceCache:
    """Open a cache for a run with this identity: header, identity, checksums (unless verify=False), shapes, index.

    Every refusal is a ValueError naming what differs; identity is compared field by field over the union of the
    recorded and the expected fields.
    """
    path = Path(path)
    header_path = path / HEADER_FILE
    if not header_path.is_file():
        raise ValueError(f"{path}: not a reference cache (no {HEADER_FILE})")
    header = json.loads(header_path.read_text(encoding="utf-8"))
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ValueError(
            f"{header_path}: format {header.get('format')!r} version {header.get('version')!r}, "
            f"this reader reads {FORMAT!r} version {VERSION}"
        )
    expected, recorded = _check_identity(identity), header["identity"]
    for field in sorted(set(expected) | set(recorded)):
        if expected.get(field, "<absent>") != recorded.get(field, "<absent>"):
            raise ValueError(
                f"reference cache {path} was built for a different {field}: cache has "
                f"{recorded.get(field, '<absent>')!r}, this run has {expected.get(field, '<absent>')!r}"
            )
    n, k = int(header["n_tokens"]), int(header["k"])
    arrays = {}
    for name, dtype in ARRAYS.items():
        entry = header["arrays"][name]
        file = path / entry["file"]
        if verify and _sha256(file) != entry["sha256"]:
            raise ValueError(f"reference cache {path}: {entry['file']} fails its sha256 checksum (corrupted or edited)")
        array = np.load(file, mmap_mode="r" if n else None, allow_pickle=False)
        shape = (n, k) if name == "sample_ids" else (n,)
        if array.dtype != dtype or array.shape != shape or list(shape) != entry["shape"]:
            raise ValueError(
                f"reference cache {path}: {entry['file']} is {array.dtype}{list(array.shape)}, "
                f"expected {dtype}{list(shape)}"
            )
        arrays[name] = array
    index: dict[tuple[type, ExampleId], tuple[int, int]] = {}
    position = 0
    for example_id, offset, length in header["examples"]:
        key = (type(_check_example_id(example_id)), example_id)
        if key in index or offset != position or length < 0:
            raise ValueError(f"reference cache {path}: bad example index at id {example_id!r}")
        index[key] = (offset, length)
        position += length
    if position != n:
        raise ValueError(f"reference cache {path}: examples cover {position} tokens of {n}")
    return ReferenceCache(path, header, arrays, index)


def bytes_per_token(k: int) -> int:
    """Array bytes per target token (headers excluded): target_logp, entropy, target_ids 4 each, sample_ids 4·K."""
    return sum(dtype.itemsize * (k if name == "sample_ids" else 1) for name, dtype in ARRAYS.items())
