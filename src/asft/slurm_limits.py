"""Refusing, before anything is submitted, a Slurm job that no node of its partition could ever run.

Slurm accepts some impossible requests (more CPUs or memory than any node has, a time over the partition's limit)
and leaves them pending forever, while Snakemake waits without a word. The workflow's start hook reads the
partitions' nodes with `sinfo` and checks every job it is about to submit (`check_requests`).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

# One line per (partition, node): partition (default marked *), node, CPUs, memory MB, GRES, time limit, max nodes.
SINFO_FORMAT = "%P|%N|%c|%m|%G|%l|%s"


@dataclass(frozen=True)
class Node:
    partition: str
    name: str
    cpus: int
    mem_mb: int
    gpus: int
    time_limit: int | None  # minutes; None = unlimited
    max_nodes: int | None


@dataclass(frozen=True)
class JobAsk:
    """A job about to be submitted: what it asks for and where, and a label naming it for the message."""

    label: str
    partition: str | None
    gpus: int
    nodes: int
    cpus_per_task: int
    mem_mb: int
    runtime: int | None


def parse_time(text: str) -> int | None:
    """Slurm's [days-]hours:minutes:seconds (or minutes) in minutes; None for infinite/UNLIMITED."""
    text = text.strip()
    if text.lower() in ("infinite", "unlimited", "n/a", ""):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:
        minutes = parts[0]
    else:
        while len(parts) < 3:
            parts.insert(0, 0)
        hours, mins, secs = parts
        minutes = hours * 60 + mins + (1 if secs else 0)
    return minutes + (int(days) * 24 * 60 if days else 0)


def parse_gpus(gres: str) -> int:
    """GPUs in a GRES string such as gpu:4, gpu:h100:8(S:0-1) or gpu:a100:4,gpu:v100:2; 0 for (null)."""
    total = 0
    for item in gres.split(","):
        match = re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())
        if match:
            total += int(match.group(1))
    return total


def _number(text: str) -> int:
    return int(re.match(r"\d+", text.strip()).group())  # sinfo may append + to a varying figure


def parse_sinfo(text: str) -> list[Node]:
    """The nodes of `sinfo --Node --noheader -o SINFO_FORMAT`."""
    nodes = []
    for line in text.splitlines():
        if not line.strip():
            continue
        partition, name, cpus, mem, gres, limit, max_nodes = line.split("|")
        nodes.append(
            Node(
                partition=partition.rstrip("*"),
                name=name,
                cpus=_number(cpus),
                mem_mb=_number(mem),
                gpus=parse_gpus(gres),
                time_limit=parse_time(limit),
                max_nodes=None if max_nodes.strip().lower() in ("infinite", "unlimited", "n/a") else _number(max_nodes),
            )
        )
    return nodes


def default_partition(text: str) -> str | None:
    """The partition sinfo marks with * (where a job without -p goes)."""
    for line in text.splitlines():
        partition = line.split("|", 1)[0]
        if partition.endswith("*"):
            return partition.rstrip("*")
    return None


def read_sinfo() -> str:
    return subprocess.run(
        ["sinfo", "--Node", "--noheader", "-o", SINFO_FORMAT], check=True, capture_output=True, text=True
    ).stdout


def problems(ask: JobAsk, nodes: Iterable[Node], default: str | None) -> list[str]:
    """Why no node of the job's partition can run it; empty when some set of nodes can."""
    partition = ask.partition or default
    members = [n for n in nodes if n.partition == partition]
    if not members:
        known = sorted({n.partition for n in nodes})
        return [f"partition {partition!r} does not exist (sinfo lists {', '.join(known)})"]
    found = []
    per_node_gpus = -(-ask.gpus // ask.nodes) if ask.gpus else 0
    limit = members[0].time_limit
    if ask.runtime is not None and limit is not None and ask.runtime > limit:
        found.append(f"runtime {ask.runtime} min > the partition's time limit {limit} min")
    max_nodes = members[0].max_nodes
    if max_nodes is not None and ask.nodes > max_nodes:
        found.append(f"{ask.nodes} nodes > the partition's maximum of {max_nodes}")
    for what, asked, have in (
        ("CPUs", ask.cpus_per_task, max(n.cpus for n in members)),
        ("MB of memory", ask.mem_mb, max(n.mem_mb for n in members)),
        ("GPUs", per_node_gpus, max(n.gpus for n in members)),
    ):
        if asked > have:
            found.append(f"{asked} {what} per node > the largest node's {have}")
    if not found:
        fitting = [
            n for n in members if n.cpus >= ask.cpus_per_task and n.mem_mb >= ask.mem_mb and n.gpus >= per_node_gpus
        ]
        if len(fitting) < ask.nodes:
            found.append(f"{ask.nodes} nodes with what it asks for, but the partition has {len(fitting)}")
    return found


def check_requests(asks: Iterable[JobAsk], sinfo_text: str) -> list[str]:
    """One message per job no node could run, naming the job and what to change."""
    nodes = parse_sinfo(sinfo_text)
    default = default_partition(sinfo_text)
    messages = []
    for ask in asks:
        found = problems(ask, nodes, default)
        if found:
            messages.append(
                f"{ask.label} asks for {ask.gpus} GPU(s) on {ask.nodes} node(s), {ask.cpus_per_task} CPUs, "
                f"{ask.mem_mb} MB, {ask.runtime} min on partition {ask.partition or default!r}, which can never "
                f"start: {'; '.join(found)}"
            )
    return messages
