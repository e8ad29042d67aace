"""Outputs that are complete or absent: every stage writes to a sibling temp path and renames it at the end.

A job killed halfway then leaves only `<name>.tmp`, which no rule declares, so Snakemake (and a reader of the
results folder) never takes a half-written file or folder for a finished one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def temp_sibling(path: Path) -> Path:
    """Where `path` is assembled before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


@contextlib.contextmanager
def atomic_dir(out_dir: Path, publish: bool = True) -> Iterator[Path]:
    """Yield an empty temp folder; on success it replaces `out_dir`, on failure it is removed.

    `publish=False` (the non-main ranks of a multi-process job) yields the same path but neither creates,
    renames nor removes it: one process owns the output.
    """
    out_dir = Path(out_dir)
    tmp = temp_sibling(out_dir)
    if not publish:
        yield tmp
        return
    _remove(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove(out_dir)
    os.replace(tmp, out_dir)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
