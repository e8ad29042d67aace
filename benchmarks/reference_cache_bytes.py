"""Disk bytes of a reference cache (asft.reference_cache) per million target tokens, for K sampled ids per token.

Writes a synthetic cache through the real writer (random statistics, `--tokens` target tokens split into examples of
`--tokens-per-example`), measures the folder's size on disk (apparent bytes of every file, header.json included),
and prints one JSON line per K with the measured and the array-only (formula) bytes per million tokens.

    python benchmarks/reference_cache_bytes.py                       # K = 4, 16, 64 on 200k tokens
    python benchmarks/reference_cache_bytes.py --k 8 32 --tokens 1000000 --tokens-per-example 512
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from asft.reference_cache import bytes_per_token, write_cache

IDENTITY = {"model": "synthetic", "tokenizer": "synthetic", "template": "synthetic", "max_length": 4096}


def measure(k: int, tokens: int, tokens_per_example: int, vocab: int, folder: Path) -> dict[str, float | int]:
    """Write one synthetic cache of `tokens` target tokens and return its measured size per million tokens."""
    generator = torch.Generator().manual_seed(k)
    path = folder / f"k{k}"
    examples = 0
    with write_cache(path, IDENTITY, k=k, seed=0) as writer:
        for start in range(0, tokens, tokens_per_example):
            n = min(tokens_per_example, tokens - start)
            writer.add(
                f"example-{examples}",
                {
                    "target_logp": -torch.rand(n, generator=generator) * 10,
                    "entropy": torch.rand(n, generator=generator) * 5,
                    "sample_ids": torch.randint(0, vocab, (n, k), generator=generator),
                    "target_ids": torch.randint(0, vocab, (n,), generator=generator),
                },
            )
            examples += 1
    files = {p.name: p.stat().st_size for p in path.iterdir()}
    total = sum(files.values())
    return {
        "k": k,
        "tokens": tokens,
        "examples": examples,
        "bytes": total,
        "header_bytes": files["header.json"],
        "bytes_per_million_tokens": round(total / tokens * 1e6),
        "array_bytes_per_million_tokens": bytes_per_token(k) * 1_000_000,
        "header_bytes_per_example": round(files["header.json"] / examples, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--tokens-per-example", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151_936)  # Qwen2.5's
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.k:
            print(json.dumps(measure(k, args.tokens, args.tokens_per_example, args.vocab, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
