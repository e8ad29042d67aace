"""The `asft trace` job: per-token gradients of sampled training batches, written as one trace folder.

The batches are the run's own: examples tokenised by TRL's SFTTrainer preparation with the run's tokenisation
settings (`asft.reference_stage.prepared_examples`, as training and the reference cache do), `batch_size` examples
at a time, sampled without replacement with `trace.seed`. The folder holds `trace.npz` (arrays) and `trace.json`
(what was traced, with what, how fast); it appears complete or not at all (`asft.run_io.atomic_dir`).
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asft.losses import LossSpec, shifted_targets, target_sequence_ids, token_weights
from asft.run_io import atomic_dir
from asft.stack_versions import stack_versions
from asft.tracing.gradients import RademacherProjection, jl_cosine_bound, select_parameters, token_gradients

log = logging.getLogger(__name__)

TRACE_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}  # trace.dtype
TRACE_ARRAYS = "trace.npz"
TRACE_META = "trace.json"
FORMAT_VERSION = 1


def _load_subject(model_dir: Path, adapter_dir: Path | None, spec: dict, dtype: torch.dtype) -> tuple[Any, Any]:
    """(tokenizer, model): with the run's adapter, or a fresh one when the trace's parameters are `lora`."""
    from asft.training import _load, _lora_config

    settings = spec["training"]
    tokenizer, model, _ = _load(model_dir, dtype, settings["trust_remote_code"], with_reference=False)
    model.requires_grad_(False)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    elif spec["trace"]["parameters"] == "lora":
        from peft import get_peft_model

        torch.manual_seed(spec["trace"]["seed"])  # the fresh adapter's A
        model = get_peft_model(model, _lora_config(settings))
    # torch.func differentiates the substituted copies of the traced parameters (`token_gradients`): the module's
    # own parameters need no autograd graph, and one that required grad would tie every output to it.
    model.requires_grad_(False)
    model.eval()  # no dropout: a token's gradient is a function of the weights, not of a dropout draw
    return tokenizer, model


def sample_batches(n_examples: int, batches: int, batch_size: int, seed: int) -> list[list[int]]:
    """`batches` disjoint batches of example indices drawn without replacement (fewer if the data runs out)."""
    order = random.Random(seed).sample(range(n_examples), min(n_examples, batches * batch_size))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def sample_tokens(n: int, k: int | None, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of the traced targets: all n, or a seeded sample of k."""
    if k is None or k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:k].sort().values


def _has_adapter(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and bool(getattr(model, "peft_config", None))


@torch.no_grad()
def _target_probabilities(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    mask, targets = shifted_targets(labels)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][mask]
    return torch.softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def reference_probabilities(model: Any, reference: Any, batch: dict) -> torch.Tensor | None:
    """p_ref of each target: the same weights with the adapter disabled, a separate reference model, or None."""
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    if reference is not None:
        return _target_probabilities(reference, *args)
    if _has_adapter(model):
        with model.disable_adapter():
            return _target_probabilities(model, *args)
    return None


def mode_weights(ce: torch.Tensor, ref_p: torch.Tensor | None, mask: torch.Tensor, rows: dict) -> dict[str, Any]:
    """Each traced weighting's w_t on the batch (NaN where it needs p_ref and there is none)."""
    out = {}
    for name, row in rows.items():
        spec = LossSpec.from_config(row)
        if spec.needs_reference and ref_p is None:
            out[name] = torch.full_like(ce, float("nan"))
        else:
            out[name] = token_weights(ce, ref_p, spec, target_sequence_ids(mask))
    return out


def _peak_memory_gb(device: torch.device) -> float:
    from asft.train_io import peak_host_rss_gb

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_host_rss_gb()


def trace(
    model_dir: Path,
    data_path: Path,
    spec: dict,
    out: Path,
    adapter_dir: Path | None = None,
    reference_dir: Path | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Trace `spec["trace"]["batches"]` batches of the data and write the trace folder `out`; returns its meta."""
    from asft.reference_stage import prepared_examples
    from asft.training import _load

    settings, options = spec["training"], spec["trace"]
    if adapter_dir is not None and reference_dir is not None:
        raise ValueError("give --adapter (p_ref: the adapter disabled) or --reference, not both")
    dtype = TRACE_DTYPES[options["dtype"]]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokenizer, model = _load_subject(Path(model_dir), adapter_dir, spec, dtype)
    reference = None
    if reference_dir is not None:
        _, reference, _ = _load(Path(reference_dir), dtype, settings["trust_remote_code"], with_reference=False)
        reference.eval().requires_grad_(False).to(device)
    prepared, collator = prepared_examples(model, tokenizer, Path(data_path), settings, dtype)
    _drop_input_grad_hook(model)
    model.to(device)
    params = select_parameters(model, options["parameters"])
    projection = RademacherProjection(
        {k: v.numel() for k, v in params.items()}, options["dim"], options["seed"], device
    )
    token_sampler = torch.Generator().manual_seed(options["seed"])
    batches = sample_batches(len(prepared), options["batches"], options["batch_size"], options["seed"])
    columns: dict[str, list] = {}
    sequences: list[dict[str, Any]] = []
    started = time.perf_counter()
    offset = 0
    for batch_index, indices in enumerate(batches):
        rows = prepared.select(indices)
        batch = collator([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
        batch = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
        mask, targets = shifted_targets(batch["labels"])
        traced = sample_tokens(int(mask.sum()), options["tokens_per_batch"], token_sampler)
        grads = token_gradients(
            model, params, batch["input_ids"], batch["attention_mask"], batch["labels"], projection,
            options["chunk_size"], traced,
        )  # fmt: skip
        ref_p = reference_probabilities(model, reference, batch)
        weights = mode_weights(grads.ce, ref_p, mask, spec["weightings"])
        row_of, position = mask.nonzero(as_tuple=True)
        n = targets.numel()
        _append(
            columns,
            batch=np.full(n, batch_index, np.int32),
            row=row_of.cpu().numpy().astype(np.int32),
            position=(position + 1).cpu().numpy().astype(np.int32),  # the target's own position in the sequence
            token_id=targets.cpu().numpy().astype(np.int32),
            ce=grads.ce.cpu().numpy().astype(np.float32),
            ref_p=(ref_p if ref_p is not None else torch.full_like(grads.ce, float("nan"))).cpu().numpy(),
            **{f"weight_{name}": w.cpu().numpy().astype(np.float32) for name, w in weights.items()},
        )
        _append(
            columns,
            target_index=(grads.traced + offset).cpu().numpy().astype(np.int64),
            norm=grads.norm.cpu().numpy(),
            alignment=grads.alignment.cpu().numpy(),
            projected=grads.projected.float().cpu().numpy(),
        )
        _append(columns, batch_norm=np.array([grads.batch_norm]), projected_batch=grads.projected_batch[None].cpu())
        for row_index, example in enumerate(rows):
            length = int(batch["attention_mask"][row_index].sum())
            sequences.append(
                {
                    "batch": batch_index,
                    "row": row_index,
                    "example_id": int(example["example_id"]),  # the record's index among the data file's records
                    "input_ids": example["input_ids"][:length],
                }
            )
        offset += n
    seconds = time.perf_counter() - started
    arrays = {name: np.concatenate([np.asarray(part) for part in parts]) for name, parts in columns.items()}
    traced_tokens = int(arrays["target_index"].size)
    meta = {
        "format_version": FORMAT_VERSION,
        "subject": spec["subject"],
        "spec": spec,
        "model": str(model_dir),
        "adapter": str(adapter_dir) if adapter_dir else None,
        "reference": str(reference_dir) if reference_dir else ("adapter disabled" if _has_adapter(model) else None),
        "parameters": {"selector": options["parameters"], "tensors": len(params), "count": projection_size(params)},
        "device": str(device),
        "stack": stack_versions(),  # the torch/transformers/PEFT/... the trace ran with
        "target_tokens": int(arrays["ce"].size),
        "traced_tokens": traced_tokens,
        "seconds": seconds,
        "tokens_per_second": traced_tokens / seconds if seconds > 0 else None,
        "peak_memory_gb": _peak_memory_gb(device),
        "jl_cosine_bound": jl_cosine_bound(options["dim"], max(traced_tokens, 1)),
        "sequences": sequences,
        "special_ids": sorted(int(i) for i in tokenizer.all_special_ids),
        "token_text": {str(i): tokenizer.decode([i]) for i in sorted(_used_ids(arrays, sequences))},
    }
    with atomic_dir(Path(out)) as tmp:
        np.savez_compressed(tmp / TRACE_ARRAYS, **arrays)
        (tmp / TRACE_META).write_text(json.dumps(meta, indent=1, allow_nan=False), encoding="utf-8")
    log.info("traced %d of %d target tokens in %.1f s", traced_tokens, meta["target_tokens"], seconds)
    return meta


def _drop_input_grad_hook(model: Any) -> None:
    """SFTTrainer's set-up makes a PEFT model's input embeddings require grad (for activation checkpointing) with a
    forward hook; torch.func refuses requires_grad_ inside a transform, and the trace needs no input gradients."""
    for module in (model, getattr(model, "base_model", None), getattr(model, "model", None)):
        if module is not None and hasattr(module, "_require_grads_hook"):
            module.disable_input_require_grads()


def projection_size(params: dict[str, torch.nn.Parameter]) -> int:
    """P: the traced parameters' element count (the projection's input dimension)."""
    return sum(p.numel() for p in params.values())


def _used_ids(arrays: dict[str, np.ndarray], sequences: list[dict[str, Any]]) -> set[int]:
    used = {int(i) for i in arrays["token_id"]}
    for sequence in sequences:
        used.update(int(i) for i in sequence["input_ids"])
    return used


def _append(columns: dict[str, list], **parts: Any) -> None:
    for name, part in parts.items():
        columns.setdefault(name, []).append(np.asarray(part))


def load_trace(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, meta) of a trace folder, refusing another format version."""
    path = Path(path)
    meta = json.loads((path / TRACE_META).read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path / TRACE_META}: trace format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    with np.load(path / TRACE_ARRAYS) as data:
        arrays = {name: data[name] for name in data.files}
    return arrays, meta
