"""Which checkpoint a train job may resume: only one written for the same settings by a job that did not finish.

A run's checkpoints live outside its declared output so that a killed job resumes instead of starting over. That
is only correct while the checkpoint belongs to the same run: a rerun with a new learning rate, new data or a new
model under the same run id, or a forced retrain of a finished run, must start fresh. So every checkpoint carries
the fingerprint of what produced it (the train spec, the data file's hash, the model's identity), written once
every rank has saved its part; a job resumes the newest checkpoint whose fingerprint is its own, sets the others
aside, and deletes them once it has a checkpoint of its own. A finished run deletes its checkpoints (its output
holds the final weights), so it is never a resume point for a later job.

Snapshots (the model at `snapshot_steps`, for evaluating intermediate steps) are written beside the checkpoints,
in `snapshots/step-<N>/`, marked with the same fingerprint, and moved into the output when the run finishes. A
checkpoint is resumable only when every snapshot at or before its step is there: the resumed job never revisits
those steps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

from asft.fetch import sha256_of
from asft.run_io import write_text_atomic

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "asft_fingerprint.json"
STALE_DIR = "stale"  # not matched by transformers' `checkpoint-<N>` pattern, so the Trainer never sees it
SNAPSHOTS_DIR = "snapshots"  # in the checkpoint folder while training, in the output once finished
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Files above this size are identified by size and modification time rather than hashed: the weights of a 7B
# model would take minutes to hash, and a rewritten weights file always has a new mtime.
_HASH_LIMIT_BYTES = 16 << 20


def model_identity(model_dir: Path) -> list[list[Any]]:
    """Every file of a model directory: small ones (config, tokenizer) by content, weights by size and mtime."""
    model_dir = Path(model_dir).resolve()  # a `path:` model is a symlink to the user's directory
    identity = []
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        stat = path.stat()
        fact = sha256_of(path) if stat.st_size <= _HASH_LIMIT_BYTES else [stat.st_size, stat.st_mtime_ns]
        identity.append([str(path.relative_to(model_dir)), fact])
    return identity


def run_fingerprint(spec: dict, model_dir: Path, data_path: Path) -> str:
    """A hash of everything that decides a run's training trajectory."""
    payload = {"spec": spec, "model": model_identity(model_dir), "data": sha256_of(Path(data_path))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _checkpoints(checkpoint_dir: Path) -> list[Path]:
    """`checkpoint-<N>` folders, newest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if _CHECKPOINT.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)), reverse=True)


def checkpoint_step(checkpoint: Path | str) -> int:
    return int(_CHECKPOINT.match(Path(checkpoint).name).group(1))


def _fingerprint_of(checkpoint: Path) -> str | None:
    """The fingerprint a checkpoint was marked with; None if unmarked (a save cut short), unreadable or gone."""
    try:
        return json.loads((checkpoint / FINGERPRINT_FILE).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def snapshot_name(step: int) -> str:
    return f"step-{step}"


def snapshot_path(checkpoint_dir: Path, step: int) -> Path:
    """Where the snapshot of optimizer step `step` lives while the run trains."""
    return Path(checkpoint_dir) / SNAPSHOTS_DIR / snapshot_name(step)


def snapshot_tmp_path(checkpoint_dir: Path, step: int) -> Path:
    """Where a snapshot is written before it is marked: a kill mid-save leaves no folder that looks complete."""
    return snapshot_path(checkpoint_dir, step).with_name(f"{snapshot_name(step)}.tmp")


def _usable(checkpoint: Path, fingerprint: str, snapshot_steps: Collection[int]) -> bool:
    """Marked with `fingerprint`, and every snapshot up to its step is written (a resume never redoes them)."""
    if _fingerprint_of(checkpoint) != fingerprint:
        return False
    step = checkpoint_step(checkpoint)
    missing = [
        s for s in snapshot_steps if s <= step and _fingerprint_of(snapshot_path(checkpoint.parent, s)) != fingerprint
    ]
    return not missing


def resumable_checkpoint(checkpoint_dir: Path, fingerprint: str, snapshot_steps: Collection[int] = ()) -> Path | None:
    """The newest checkpoint marked with `fingerprint` whose earlier snapshots exist, or None: the job then starts
    fresh.

    Read-only, so every rank of a job can call it and reach the same answer while the main rank sets the
    others aside: a usable checkpoint is never moved.
    """
    for checkpoint in _checkpoints(Path(checkpoint_dir)):
        if _usable(checkpoint, fingerprint, snapshot_steps):
            return checkpoint
    return None


def set_aside_stale(checkpoint_dir: Path, fingerprint: str, snapshot_steps: Collection[int] = ()) -> list[str]:
    """Move checkpoints a job with `fingerprint` cannot resume, and snapshots of other settings, into `stale/`, out
    of the Trainer's sight; returns their names.

    They are kept until the new run has a checkpoint of its own (`remove_stale`), so a job killed at once loses
    nothing it could have used.
    """
    checkpoint_dir = Path(checkpoint_dir)
    moved = []
    snapshots = checkpoint_dir / SNAPSHOTS_DIR
    others = [p for p in snapshots.iterdir() if _fingerprint_of(p) != fingerprint] if snapshots.is_dir() else []
    for path in [c for c in _checkpoints(checkpoint_dir) if not _usable(c, fingerprint, snapshot_steps)] + others:
        stale = checkpoint_dir / STALE_DIR / path.relative_to(checkpoint_dir)
        shutil.rmtree(stale, ignore_errors=True)
        stale.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, stale)
        moved.append(str(path.relative_to(checkpoint_dir)))
    if moved:
        log.warning(
            "%s: %s were written for other settings, by a finished job, or lack an earlier snapshot; starting fresh",
            checkpoint_dir,
            ", ".join(moved),
        )
    return moved


def remove_stale(checkpoint_dir: Path) -> None:
    shutil.rmtree(Path(checkpoint_dir) / STALE_DIR, ignore_errors=True)


def mark_checkpoint(checkpoint: Path, fingerprint: str) -> None:
    """Declare a fully saved checkpoint resumable by jobs with this fingerprint (atomic: a kill leaves no half mark)."""
    write_text_atomic(checkpoint / FINGERPRINT_FILE, json.dumps({"fingerprint": fingerprint}))


def mark_snapshot(checkpoint_dir: Path, step: int, fingerprint: str) -> Path:
    """Main process, once the weights are saved in `snapshot_tmp_path`: mark them and give them their final name.

    A snapshot of this step left by an earlier attempt (one that got past this step without a checkpoint) is
    replaced: it holds the same weights, or ones of other settings.
    """
    tmp, final = snapshot_tmp_path(checkpoint_dir, step), snapshot_path(checkpoint_dir, step)
    mark_checkpoint(tmp, fingerprint)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def publish_snapshots(checkpoint_dir: Path, out_dir: Path, steps: Collection[int], fingerprint: str) -> list[int]:
    """Main process, when the run has finished: move its snapshots into `out_dir/snapshots/`, unmarked, so each
    loads exactly like the final output; returns the steps moved."""
    moved = []
    for step in sorted(steps):
        source = snapshot_path(checkpoint_dir, step)
        if _fingerprint_of(source) != fingerprint:
            raise RuntimeError(f"{source}: the snapshot of step {step} is missing or belongs to other settings")
        (source / FINGERPRINT_FILE).unlink()
        target = Path(out_dir) / SNAPSHOTS_DIR / snapshot_name(step)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, target)  # the output may be on another file system than the checkpoints
        moved.append(step)
    return moved


def remove_checkpoints(checkpoint_dir: Path) -> None:
    """After a run finished: its checkpoints and leftover snapshots are no resume point for any later job (the log
    and TensorBoard stay)."""
    for checkpoint in _checkpoints(Path(checkpoint_dir)):
        shutil.rmtree(checkpoint)
    shutil.rmtree(Path(checkpoint_dir) / SNAPSHOTS_DIR, ignore_errors=True)
    remove_stale(checkpoint_dir)


def read_log_through(path: Path, keep_through_step: int) -> list[str]:
    """The lines of a JSONL training log for steps up to `keep_through_step`.

    A job killed mid-write leaves a torn last line: it is dropped (its step is redone). A bad line anywhere else
    is corruption, reported with its line number.
    """
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError) as err:
            if number == len(lines):
                log.warning("%s:%d: dropping a torn last line (the job was killed while writing it)", path, number)
                break
            raise ValueError(f"{path}:{number}: not a training-log record ({err})") from err
        if step <= keep_through_step:
            kept.append(line)
    return kept


def truncate_log(path: Path, keep_through_step: int) -> None:
    """Keep the log lines of steps a resumed run will not redo; drop the rest (all of them on a fresh start)."""
    if path.exists():
        write_text_atomic(path, "".join(line + "\n" for line in read_log_through(path, keep_through_step)))
