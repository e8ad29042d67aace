"""A training run's files besides the weights: the step log, the checkpoint marks and the finished output.

Checkpoints and the log live in the run's checkpoint folder, outside the declared output, so a restarted job
resumes (`asft.checkpoints` decides which checkpoint belongs to it); the output folder is assembled by
`asft.run_io.atomic_dir` and appears only when the run has finished.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from asft import checkpoints
from asft.config_files import ConfigError
from asft.layout import RUN_SPEC, TRAIN_LOG, TRAIN_SUMMARY
from asft.test_hooks import load_hook

# Per-micro-batch loss statistics the trainer gathers from every rank and the log records for each step.
LOGGED_STATS = ("ce", "kl", "weight_mean", "target_tokens")
# Tests only: "module:function" called with (step, checkpoint path) on every rank once a checkpoint is saved and
# marked, so a test can kill a job at a known point. Comes from the environment of the job, never from the config.
TEST_HOOK_ENV = "ASFT_TRAIN_TEST_HOOK"


def start_run_files(tmp_dir: Path, checkpoint_dir: Path, spec: dict, fingerprint: str, resume: Path | None) -> None:
    """Main process only: record the spec, set other settings' checkpoints aside, cut the log to the resume point."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    checkpoints.set_aside_stale(checkpoint_dir, fingerprint, spec["training"]["snapshot_steps"])
    (tmp_dir / RUN_SPEC).write_text(json.dumps(spec, indent=2, sort_keys=True))
    checkpoints.truncate_log(checkpoint_dir / TRAIN_LOG, checkpoints.checkpoint_step(resume) if resume else 0)


def finish_run_files(
    tmp_dir: Path, checkpoint_dir: Path, summary: dict, snapshot_steps: Collection[int] = (), fingerprint: str = ""
) -> None:
    """Main process only: move the snapshots, copy the log and write the summary into the output; drop the finished
    run's checkpoints, which are no resume point for a later job."""
    checkpoints.publish_snapshots(checkpoint_dir, tmp_dir, snapshot_steps, fingerprint)
    log_path = checkpoint_dir / TRAIN_LOG
    if not log_path.exists():
        log_path.touch()
    shutil.copyfile(log_path, tmp_dir / TRAIN_LOG)
    (tmp_dir / TRAIN_SUMMARY).write_text(json.dumps(summary, indent=2))
    checkpoints.remove_checkpoints(checkpoint_dir)


class JsonlLogCallback(TrainerCallback):
    """Writes each logging step (loss, CE, KL, mean weight, lr, tokens/s, and `extra_keys`, e.g. RL rewards) as one
    JSON line for the plots; a metric the trainer logged as None (no value in the window) is written as null."""

    def __init__(self, path: Path, extra_keys: Sequence[str] = ()) -> None:
        self.path = path
        self.extra_keys = tuple(extra_keys)
        self._last_time: float | None = None
        self._last_tokens = 0.0
        self._last_step = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last_time = time.perf_counter()
        self._last_step = state.global_step

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now = time.perf_counter()
        tokens = float(logs.get("num_tokens") or self._last_tokens)
        elapsed = now - (self._last_time or now)
        record: dict[str, Any] = {"step": state.global_step, "epoch": logs.get("epoch")}
        for key in ("loss", *LOGGED_STATS, "learning_rate", "grad_norm", *self.extra_keys):
            if key in logs:
                record[key] = None if logs[key] is None else float(logs[key])
        steps = state.global_step - self._last_step
        record["tokens_per_second"] = (tokens - self._last_tokens) / elapsed if elapsed > 0 else None
        record["step_seconds"] = elapsed / steps if steps > 0 else None
        self._last_time, self._last_tokens, self._last_step = now, tokens, state.global_step
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


class CheckpointFingerprintCallback(TrainerCallback):
    """Marks each checkpoint with the run's fingerprint once every rank has saved its part, and drops the
    previous settings' checkpoints once this run has one of its own."""

    def __init__(self, checkpoint_dir: Path, fingerprint: str) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.fingerprint = fingerprint
        self.test_hook = load_hook(TEST_HOOK_ENV)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # a checkpoint is resumable only once every rank's shard is on disk
        checkpoint = self.checkpoint_dir / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero:
            checkpoints.mark_checkpoint(checkpoint, self.fingerprint)
            checkpoints.remove_stale(self.checkpoint_dir)
        if self.test_hook is not None:
            self.test_hook(state.global_step, checkpoint)


class Snapshots(TrainerCallback):
    """Keeps the model as it was at chosen optimizer steps (`training.snapshot_steps`), for evaluating them later.

    Each is written by the Trainer's own `save_model` (every rank takes part, so ZeRO-3 gathers the shards) into
    the checkpoint folder, where a killed job's snapshots survive (`asft.checkpoints`), and moved into the output
    when the run finishes. The trainer calls `after_step` once a step has passed the divergence check, so no
    snapshot holds a diverged model.
    """

    def __init__(self, checkpoint_dir: Path, fingerprint: str, steps: Collection[int]) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.fingerprint = fingerprint
        self.steps = frozenset(steps)
        self._saved: set[int] = set()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The run's step count is known only now when it comes from epochs: refuse snapshots it never reaches."""
        late = sorted(step for step in self.steps if step > state.max_steps)
        if late:
            raise ConfigError(
                f"training.snapshot_steps: steps {late} are beyond this run's {state.max_steps} optimizer steps"
            )

    def after_step(self, trainer: Any, step: int) -> None:
        # Trainer runs its per-step hook again at an epoch's end, for the same step.
        if step not in self.steps or step in self._saved:
            return
        self._saved.add(step)
        tmp = checkpoints.snapshot_tmp_path(self.checkpoint_dir, step)
        if trainer.args.should_save:
            shutil.rmtree(tmp, ignore_errors=True)  # a kill mid-save left it
        trainer.save_model(str(tmp))  # every rank: ZeRO-3 gathers the shards; only the main process writes
        if trainer.args.should_save:
            checkpoints.mark_snapshot(self.checkpoint_dir, step, self.fingerprint)


def peak_host_rss_gb() -> float:
    """This process's peak resident host memory so far, in GB."""
    # ru_maxrss is KiB on Linux and bytes on macOS.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9


def rank_resources(device: torch.device, load_rss_gb: tuple[float, float] | None = None) -> dict[str, Any]:
    """This rank's peaks so far: GPU memory (null off a GPU, where there is none to measure) and host RSS, in GB.

    `load_rss_gb` is the host peak (`peak_host_rss_gb`) measured right before and right after loading the models:
    what loading cost this rank.
    """
    on_gpu = device.type == "cuda"
    before, after = load_rss_gb if load_rss_gb is not None else (None, None)
    return {
        "device": torch.cuda.get_device_name(device) if on_gpu else device.type,
        "gpu_peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9 if on_gpu else None,
        "gpu_peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9 if on_gpu else None,
        "host_peak_rss_gb": peak_host_rss_gb(),
        "host_rss_before_load_gb": before,
        "host_rss_after_load_gb": after,
    }


def resource_summary(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary's hardware fields (paper Table 4) from every rank's `rank_resources`, in rank order."""
    on_gpu = per_rank[0]["gpu_peak_allocated_gb"] is not None
    return {
        "accelerator": per_rank[0]["device"] if on_gpu else "cpu",
        "accelerator_count": len(per_rank),
        "gpu_peak_allocated_gb": [r["gpu_peak_allocated_gb"] for r in per_rank] if on_gpu else None,
        "gpu_peak_reserved_gb": [r["gpu_peak_reserved_gb"] for r in per_rank] if on_gpu else None,
        "host_peak_rss_gb": [r["host_peak_rss_gb"] for r in per_rank],
        # Peak host RSS per rank right before and right after loading the policy and reference (not yet training).
        "host_rss_before_load_gb": [r["host_rss_before_load_gb"] for r in per_rank],
        "host_rss_after_load_gb": [r["host_rss_after_load_gb"] for r in per_rank],
    }
