"""The config's dtype names (`auto`, `float32`, `bfloat16`, `float16`) as torch dtypes, in one place."""

from __future__ import annotations

from typing import Literal

import torch

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def training_dtype(name: str) -> torch.dtype:
    """`auto` trains in bf16 on a GPU that supports it, else float32 (CPU half precision is slow and lossy)."""
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return _named(name)


def loading_dtype(name: str) -> torch.dtype | Literal["auto"]:
    """For merging and evaluation `auto` keeps the dtype the checkpoint was saved in (transformers' "auto")."""
    return "auto" if name == "auto" else _named(name)


def _named(name: str) -> torch.dtype:
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {DTYPE_NAMES}")
    return getattr(torch, name)
