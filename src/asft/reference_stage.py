"""Reference stage: run the frozen starting model once over a run's training data and store its per-target-token
statistics (`asft.reference_cache`), so anchored runs with `training.reference: cached` need no reference forward.

The examples are tokenised by the very code that trains on them (TRL's SFTTrainer preparation with the run's
SFTConfig, `asft.training`), so the cache aligns token by token with the batches a run draws; each example is keyed
by its record's index in the data file (`asft.training.training_dataset`), independent of shuffling.
Importing this module loads TRL: only the reference stage imports it.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import torch

from asft import reference_cache
from asft.config_files import ConfigError
from asft.dtypes import training_dtype
from asft.losses import shifted_targets
from asft.trainer import final_hidden_states

# Target rows per logits chunk: at most this × vocabulary floats exist at once.
REFERENCE_CHUNK_ROWS = 1024

# Files of a model directory that decide its tokenisation (those present are hashed).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode() + b"\n")
    return digest.hexdigest()


def cache_identity(model_dir: Path, data_path: Path, settings: dict) -> dict[str, Any]:
    """What a cache is valid for: the model (dir and config hash), tokenizer files, data file, template,
    max_length, max_samples and dtype. A run opens its cache with the identity computed from its own spec."""
    model_dir = Path(model_dir)
    return {
        "model": str(model_dir),
        "model_config_sha256": _sha256_files([model_dir / "config.json"]),
        "tokenizer": _sha256_files([model_dir / name for name in TOKENIZER_FILES if (model_dir / name).is_file()]),
        "data_sha256": _sha256_files([Path(data_path)]),
        "template": settings["template"],
        "max_length": settings["max_length"],
        "max_samples": settings["max_samples"],
        "dtype": settings["dtype"],
    }


def prepared_examples(model: Any, tokenizer: Any, data_path: Path, settings: dict, dtype: torch.dtype) -> tuple:
    """(tokenised dataset with example_id, input_ids, labels; the collator): SFTTrainer's own preparation with the
    tokenisation fields of the run's SFTConfig (`asft.training.tokenisation_args`), as `asft.training.train`
    prepares its data (no adapter: the reference is the base model)."""
    from trl import SFTConfig, SFTTrainer

    from asft.training import tokenisation_args, training_dataset

    dataset = training_dataset(data_path, settings, with_ids=True)
    with tempfile.TemporaryDirectory(prefix="asft-reference-") as scratch:
        # A throwaway trainer used only for its data preparation: no mixed precision, DeepSpeed or trackers.
        args = SFTConfig(output_dir=scratch, report_to="none", bf16=False, fp16=False, **tokenisation_args(settings))
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    prepared = trainer.train_dataset
    if "example_id" not in prepared.column_names:
        raise RuntimeError("TRL's dataset preparation dropped the example_id column")
    return prepared, trainer.data_collator


@torch.no_grad()
def build_reference_cache(
    model_dir: Path,
    data_path: Path,
    spec: dict,
    out: Path,
    batch_size: int = 8,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """Write the reference cache of (model_dir, data_path, spec["training"]) to `out`; returns a summary.

    spec: a run's spec or its reference spec (`asft.matrix.reference_spec`: model, dataset and the training keys
    of `REFERENCE_SETTINGS`). Examples go in file order, `batch_size` at a time; the K
    samples per token (training.reference_samples) come from `reference_cache.sampling_generator(seed, device)`.
    """
    from asft.training import _load

    settings = spec["training"]
    if settings.get("reference", "live") != "cached":  # a live spec carries no reference_samples (asft.matrix)
        raise ConfigError("`asft reference` caches the reference of a run with training.reference: cached only")
    dtype = training_dtype(settings["dtype"])
    if device is None and torch.cuda.device_count() > 1:
        # A model too big for one GPU (a 70B reference job asks for several, asft.job_resources): its layers are
        # spread over the job's GPUs by accelerate; inputs go to the first, the head's rows stay on the last.
        from transformers import AutoModelForCausalLM, AutoTokenizer

        trust = settings["trust_remote_code"]
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust, device_map="auto")
        device = str(model.get_input_embeddings().weight.device)
    else:
        tokenizer, model, _ = _load(Path(model_dir), dtype, settings["trust_remote_code"], with_reference=False)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
    model.eval().requires_grad_(False)
    prepared, collator = prepared_examples(model, tokenizer, Path(data_path), settings, dtype)
    head = model.get_output_embeddings().weight
    k = settings["reference_samples"]
    chunk = REFERENCE_CHUNK_ROWS
    generator = reference_cache.sampling_generator(seed, head.device)
    identity = cache_identity(Path(model_dir), Path(data_path), settings)
    with reference_cache.write_cache(out, identity, k, seed) as writer:
        for start in range(0, len(prepared), batch_size):
            rows = prepared[start : start + batch_size]
            ids = rows["example_id"]
            pairs = zip(rows["input_ids"], rows["labels"], strict=True)
            batch = collator([{"input_ids": i, "labels": lab} for i, lab in pairs])
            input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            hidden = final_hidden_states(model, model, input_ids, batch["attention_mask"].to(device))
            mask, targets = shifted_targets(labels.to(head.device))
            target_hidden = hidden.to(head.device)[:, :-1][mask]
            parts = []
            for c in range(0, targets.numel(), chunk):
                logits = target_hidden[c : c + chunk].to(head.dtype) @ head.T  # as asft.chunked_loss builds them
                parts.append(reference_cache.reference_statistics(logits, targets[c : c + chunk], None, k, generator))
            stats = {name: torch.cat([p[name] for p in parts]) for name in parts[0]} if parts else {}
            for example_id, example in zip(ids, reference_cache.split_by_example(stats, mask), strict=True):
                writer.add(int(example_id), example)
        n_tokens = writer.n_tokens
    return {
        "examples": len(prepared),
        "target_tokens": n_tokens,
        "k": k,
        "seed": seed,
        "bytes": n_tokens * reference_cache.bytes_per_token(k),
        "identity": identity,
    }
