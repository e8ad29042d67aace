"""Snakemake's cluster-generic executor on Run:ai: submit, status and cancel around the `runai` CLI (v2).

profiles/runai/config.yaml wires these into snakemake-executor-plugin-cluster-generic:

    python -m asft.runai submit --rule {rule} --jobid {jobid} --gpu {resources.gpu} ... <jobscript>
        submits the job script as a Run:ai training workload (`runai training submit`) and prints its id,
        `<project>/<workload name>`, the only line on stdout;
    python -m asft.runai status <id>
        prints `running`, `success` or `failed`, from the workload's phase (`runai training describe -o json`);
    python -m asft.runai cancel <id>...  (the profile runs it as asft-runai-cancel)
        deletes the workloads (`runai training delete`), as Snakemake does on Ctrl-C;
    python -m asft.runai sidecar  (the profile runs it as asft-runai-sidecar)
        runs beside Snakemake and, when Snakemake shuts it down, deletes the workloads that were submitted and not
        yet seen finished. cluster-generic hands the cancel command only the jobs it is not polling at that moment
        (and none after a status query dies of the Ctrl-C), so this is what makes Ctrl-C reliably stop the workloads.

What each job asks for comes from its Snakemake resources (`gpu`, `nodes`, `cpus_per_task`, `mem_mb`, `runtime`,
passed through the submit command's placeholders); what is a fact of the cluster (image, project, node pools, the
shared volume, the working directory) comes from ASFT_RUNAI_* environment variables (see `Site`), so nothing about
a site is written here. Values of forwarded environment variables never appear in what this module prints.

Every job runs on the shared file system the submitting Snakemake uses: the job script Snakemake writes starts with
`cd <the workflow's directory>`, so the containers must mount the shared volume (a PVC) at the same path. A job
with `nodes` > 1 is refused at submission; Run:ai's route for those is a distributed workload
(`runai training pytorch submit --workers N`), which is not wired up here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUNNING, SUCCESS, FAILED = "running", "success", "failed"

# Run:ai workload phases (the Workloads table and the REST API's `phase`), lower-cased. Stopped/Suspended wait for a
# person to resume them, and Deleting/Deleted workloads never finish, so Snakemake is told they failed (a retry then
# submits a fresh workload). Terminating is also what a preempted workload passes through on its way back to
# Pending, so it counts as running until a later phase says otherwise.
RUNNING_PHASES = frozenset(
    {"creating", "pending", "initializing", "running", "degraded", "resuming", "updating", "terminating", "stopping"}
)
SUCCESS_PHASES = frozenset({"completed", "succeeded"})
FAILED_PHASES = frozenset({"failed", "stopped", "suspended", "deleting", "deleted"})

# Where `runai ... describe -o json` may keep the phase: the REST API's workload object calls it `phase`; other
# versions of the CLI have nested it under a section or called it `status`. Looked up breadth-first through
# mappings only, so that a pod's status inside a list of pods is never taken for the workload's.
PHASE_KEYS = ("phase", "status", "state", "workloadphase", "workloadstatus")

# Variables whose values must not travel as plain `-e NAME=value`: Run:ai stores those in the workload's spec,
# where `runai workload describe` shows them to every member of the project. Use a secret instead
# (ASFT_RUNAI_EXTRA_ARGS="--env-secret NAME=<secret>,key=<key>" or a credentials asset).
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|PRIVATE|CREDENTIAL|AUTH", re.IGNORECASE)

MAX_NAME_LENGTH = 40  # Run:ai derives pod and service names from the workload's; keep well under the 63 of DNS
DESCRIBE_TIMEOUT_S = 60
DESCRIBE_ATTEMPTS = 3
CANCEL_WAIT_S = 1.5  # cluster-generic gives the cancel command 2 s in all
SIDECAR_DELETE_WAIT_S = 120
SIDECAR_VARS = "SNAKEMAKE_CLUSTER_SIDECAR_VARS"  # the sidecar's first line, passed by cluster-generic to each command


class RunaiError(Exception):
    """A job that cannot be submitted as asked, or a setting that is missing; the message says which and why."""


@dataclass(frozen=True)
class Site:
    """The cluster's facts, from the environment (each ASFT_RUNAI_* variable below) or the submit command's options.

    image        ASFT_RUNAI_IMAGE        container image every job runs in (required)
    project      ASFT_RUNAI_PROJECT      Run:ai project (required)
    node_pools   ASFT_RUNAI_NODE_POOLS   node pools in priority order, space- or comma-separated (optional)
    cpu_node_pools ASFT_RUNAI_CPU_NODE_POOLS  node pools for jobs without GPUs (default: node_pools)
    pvcs         ASFT_RUNAI_PVC          existing PVCs to mount, `claimname=NAME,path=/PATH`, space-separated
    workdir      ASFT_RUNAI_WORKDIR      the job's working directory (default: the directory Snakemake runs in)
    env_names    ASFT_RUNAI_ENV          names of environment variables to pass on (values read at submission)
    extra_args   ASFT_RUNAI_EXTRA_ARGS   further `runai training submit` flags, shell-quoted
    cli          ASFT_RUNAI_CLI          the `runai` executable (default: `runai` on PATH)
    name_prefix  ASFT_RUNAI_NAME_PREFIX  first part of each workload's name (default: asft)
    enforce_runtime ASFT_RUNAI_ENFORCE_RUNTIME  1 (default): stop a job after its `runtime` with `timeout`; 0: don't
    """

    image: str = ""
    project: str = ""
    node_pools: tuple[str, ...] = ()
    cpu_node_pools: tuple[str, ...] = ()
    pvcs: tuple[str, ...] = ()
    workdir: str = ""
    env_names: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    cli: str = "runai"
    name_prefix: str = "asft"
    enforce_runtime: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Site:
        env = os.environ if environ is None else environ

        def words(name: str) -> tuple[str, ...]:
            return tuple(w for w in re.split(r"[\s,]+", env.get(name, "")) if w)

        node_pools = words("ASFT_RUNAI_NODE_POOLS")
        return cls(
            image=env.get("ASFT_RUNAI_IMAGE", "").strip(),
            project=env.get("ASFT_RUNAI_PROJECT", "").strip(),
            node_pools=node_pools,
            cpu_node_pools=words("ASFT_RUNAI_CPU_NODE_POOLS") or node_pools,
            pvcs=tuple(env.get("ASFT_RUNAI_PVC", "").split()),
            workdir=env.get("ASFT_RUNAI_WORKDIR", "").strip(),
            env_names=words("ASFT_RUNAI_ENV"),
            extra_args=tuple(shlex.split(env.get("ASFT_RUNAI_EXTRA_ARGS", ""))),
            cli=env.get("ASFT_RUNAI_CLI", "").strip() or "runai",
            name_prefix=env.get("ASFT_RUNAI_NAME_PREFIX", "").strip() or "asft",
            enforce_runtime=env.get("ASFT_RUNAI_ENFORCE_RUNTIME", "1").strip() not in ("0", "false", "no"),
        )


@dataclass(frozen=True)
class JobRequest:
    """One Snakemake job's ask, from its resources."""

    rule: str
    jobid: str
    gpu: int
    nodes: int
    cpus_per_task: float
    mem_mb: int
    runtime: int  # minutes; 0: no limit

    @classmethod
    def parse(
        cls, rule: str, jobid: str, gpu: str, nodes: str, cpus_per_task: str, mem_mb: str, runtime: str
    ) -> JobRequest:
        """From the strings Snakemake substitutes into the submit command; a resource the job lacks is refused."""
        values = {"gpu": gpu, "nodes": nodes, "cpus_per_task": cpus_per_task, "mem_mb": mem_mb, "runtime": runtime}
        numbers: dict[str, float] = {}
        for name, text in values.items():
            try:
                numbers[name] = float(text)
            except (TypeError, ValueError):
                raise RunaiError(
                    f"rule {rule}: resource {name}={text!r} is not a number; profiles/runai sets default-resources "
                    f"for gpu, nodes, cpus_per_task, mem_mb and runtime, so a rule or --set-resources overrode it"
                ) from None
            if not math.isfinite(numbers[name]) or numbers[name] < 0:
                raise RunaiError(f"rule {rule}: resource {name}={text!r} must be a non-negative number")
        for name in ("gpu", "nodes", "mem_mb", "runtime"):
            if numbers[name] != int(numbers[name]):
                raise RunaiError(f"rule {rule}: resource {name}={values[name]!r} must be a whole number")
        if numbers["nodes"] < 1 or numbers["cpus_per_task"] <= 0 or numbers["mem_mb"] <= 0:
            raise RunaiError(f"rule {rule}: nodes, cpus_per_task and mem_mb must be positive, got {values}")
        return cls(
            rule=rule,
            jobid=str(jobid),
            gpu=int(numbers["gpu"]),
            nodes=int(numbers["nodes"]),
            cpus_per_task=numbers["cpus_per_task"],
            mem_mb=int(numbers["mem_mb"]),
            runtime=int(numbers["runtime"]),
        )


def check_single_node(job: JobRequest) -> None:
    """Run:ai's standard training workload is one pod on one node; a multi-node job needs a distributed one."""
    if job.nodes > 1:
        raise RunaiError(
            f"rule {job.rule} (job {job.jobid}) asks for {job.nodes} nodes ({job.gpu} GPUs); profiles/runai submits "
            "single-node workloads only. Multi-node training on Run:ai is a distributed workload "
            "(`runai training pytorch submit --workers N`), which asft does not wire up yet: run it with "
            "training.num_nodes: 1 here, or on Slurm (profiles/slurm)."
        )


def check_site(site: Site) -> None:
    missing = [
        name for name, value in (("ASFT_RUNAI_IMAGE", site.image), ("ASFT_RUNAI_PROJECT", site.project)) if not value
    ]
    if missing:
        raise RunaiError(
            f"set {' and '.join(missing)} (or pass --image/--project in the profile's submit command): "
            "the container image every job runs in and the Run:ai project it is charged to"
        )


def workload_name(prefix: str, rule: str, jobid: str, token: str | None = None) -> str:
    """A unique, valid Run:ai workload name: `<prefix>-<rule>-<jobid>-<random>`, lower-case, at most 40 characters.

    Snakemake numbers jobs from 1 in every run, so the random part keeps a rerun from colliding with the workloads
    of an earlier one."""
    token = token or secrets.token_hex(3)

    def clean(text: str) -> str:
        return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")

    tail = f"-{clean(str(jobid))}-{clean(token)}"
    head = clean(f"{prefix}-{rule}")[: MAX_NAME_LENGTH - len(tail)].rstrip("-")
    name = f"{head}{tail}"
    if not name[0].isalpha():
        name = f"j{name}"[:MAX_NAME_LENGTH]
    return name


def forwarded_env(names: Sequence[str], environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """(name, value) of each variable to pass on that is set; a secret-looking name is refused."""
    secret = [name for name in names if SECRET_NAME.search(name)]
    if secret:
        raise RunaiError(
            f"ASFT_RUNAI_ENV names {', '.join(secret)}: Run:ai keeps plain environment values in the workload's "
            "spec, readable by the whole project. Pass secrets as Kubernetes secrets instead, e.g. "
            'ASFT_RUNAI_EXTRA_ARGS="--env-secret HF_TOKEN=<secret name>,key=<key>"'
        )
    return [(name, environ[name]) for name in names if name in environ]


def job_command(job: JobRequest, jobscript: str, enforce_runtime: bool) -> list[str]:
    """What the container runs: Snakemake's job script, stopped after the job's runtime (Run:ai itself has no
    wall-time limit for training workloads). `timeout -k 60 -s TERM <s>` works with GNU coreutils and busybox."""
    command = ["sh", jobscript]
    if enforce_runtime and job.runtime > 0:
        command = ["timeout", "-k", "60", "-s", "TERM", str(job.runtime * 60), *command]
    return command


def submit_argv(
    site: Site, job: JobRequest, name: str, jobscript: str, env: Sequence[tuple[str, str]] = ()
) -> list[str]:
    """The `runai training submit` command line for one job."""
    argv = [site.cli, "training", "submit", name, "--project", site.project, "--image", site.image]
    for pool in site.node_pools if job.gpu else site.cpu_node_pools:
        argv += ["--node-pools", pool]
    if job.gpu:
        argv += ["--gpu-devices-request", str(job.gpu)]
    cpus = int(job.cpus_per_task) if job.cpus_per_task == int(job.cpus_per_task) else job.cpus_per_task
    argv += ["--cpu-core-request", str(cpus), "--cpu-memory-request", f"{job.mem_mb}M"]
    for pvc in site.pvcs:
        argv += ["--existing-pvc", pvc]
    argv += ["--working-dir", site.workdir or os.getcwd()]
    # Snakemake retries a failed job itself (the profile's `retries`); Run:ai's default would rerun it 6 times first.
    argv += ["--backoff-limit", "0"]
    for key, value in env:
        argv += ["--environment", f"{key}={value}"]
    argv += list(site.extra_args)
    return [*argv, "--command", "--", *job_command(job, jobscript, site.enforce_runtime)]


def redacted(argv: Sequence[str]) -> str:
    """The command line for a log: the values of environment variables replaced by ***."""
    shown = list(argv)
    for i, arg in enumerate(shown[:-1]):
        if arg in ("-e", "--environment") and "=" in shown[i + 1]:
            shown[i + 1] = shown[i + 1].split("=", 1)[0] + "=***"
    return shlex.join(shown)


def job_id(project: str, name: str) -> str:
    return f"{project}/{name}"


def split_job_id(external_id: str) -> tuple[str, str]:
    project, sep, name = external_id.strip().partition("/")
    if not sep or not project or not name or "/" in name:
        raise RunaiError(f"{external_id!r} is not a job id of asft.runai (<project>/<workload name>)")
    return project, name


def describe_argv(cli: str, project: str, name: str) -> list[str]:
    return [cli, "training", "describe", name, "--project", project, "--output", "json"]


def delete_argv(cli: str, project: str, name: str) -> list[str]:
    return [cli, "training", "delete", name, "--project", project]


def find_phase(description: Any) -> str | None:
    """The workload's phase in the JSON of `runai training describe -o json`, looked up breadth-first."""
    level = [description[0]] if isinstance(description, list) and description else [description]
    while level:
        for item in level:
            if isinstance(item, Mapping):
                keys = {str(k).lower(): v for k, v in item.items()}
                for key in PHASE_KEYS:
                    if isinstance(keys.get(key), str) and keys[key].strip():
                        return keys[key].strip()
        level = [v for item in level if isinstance(item, Mapping) for v in item.values() if isinstance(v, Mapping)]
    return None


def snakemake_status(phase: str | None) -> str | None:
    """running, success or failed for a Run:ai phase; None for a phase this module does not know."""
    if phase is None:
        return None
    key = re.sub(r"[\s_-]", "", phase.lower())
    if key in RUNNING_PHASES:
        return RUNNING
    if key in SUCCESS_PHASES:
        return SUCCESS
    if key in FAILED_PHASES:
        return FAILED
    return None


def is_not_found(output: str) -> bool:
    return bool(re.search(r"not\s*found|does\s*not\s*exist|no\s+such\s+workload", output, re.IGNORECASE))


def _log(message: str) -> None:
    print(f"asft.runai: {message}", file=sys.stderr, flush=True)


def _run(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    # In its own session: a Ctrl-C in Snakemake's terminal must not cut a submission or a status query in half (a
    # status command killed by a signal makes cluster-generic lose track of every job it is polling).
    return subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


class Registry:
    """The workloads of one Snakemake run that may still be running: one file per workload, named after it and
    holding its job id, in the directory the sidecar announced. Submission adds, a status query that finds the
    workload finished removes, and the sidecar deletes whatever is left when Snakemake shuts it down."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Registry:
        value = (os.environ if environ is None else environ).get(SIDECAR_VARS, "")
        try:
            directory = json.loads(value).get("asft_runai_registry") if value else None
        except (json.JSONDecodeError, AttributeError):
            directory = None
        return cls(Path(directory) if directory else None)

    def _path(self, external_id: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / split_job_id(external_id)[1]

    def add(self, external_id: str) -> None:
        path = self._path(external_id)
        if path is not None and self.directory.is_dir():
            path.write_text(external_id)

    def remove(self, external_id: str) -> None:
        path = self._path(external_id)
        if path is not None:
            path.unlink(missing_ok=True)

    def entries(self) -> list[str]:
        if self.directory is None or not self.directory.is_dir():
            return []
        return sorted(p.read_text().strip() for p in self.directory.iterdir() if p.is_file())


def submit(site: Site, job: JobRequest, jobscript: str, environ: Mapping[str, str] | None = None) -> str:
    """Submit the job script; returns the job id for Snakemake. Raises RunaiError with runai's message on refusal."""
    check_single_node(job)
    check_site(site)
    if not Path(jobscript).is_file():
        raise RunaiError(f"job script {jobscript} does not exist")
    env = forwarded_env(site.env_names, os.environ if environ is None else environ)
    name = workload_name(site.name_prefix, job.rule, job.jobid)
    argv = submit_argv(site, job, name, str(Path(jobscript).resolve()), env)
    _log(f"{redacted(argv)}")
    try:
        result = _run(argv, timeout=600)
    except FileNotFoundError:
        raise RunaiError(f"{site.cli!r} not found: install the Run:ai CLI (v2) or set ASFT_RUNAI_CLI") from None
    except subprocess.TimeoutExpired:
        raise RunaiError(f"`runai training submit {name}` did not return within 10 minutes") from None
    if result.returncode != 0:
        raise RunaiError(
            f"`runai training submit {name}` failed (exit {result.returncode}): "
            f"{(result.stderr or result.stdout).strip()[-2000:]}"
        )
    if result.stdout.strip():
        _log(result.stdout.strip()[-2000:])  # runai's own report; stdout carries only the job id
    external_id = job_id(site.project, name)
    Registry.from_env(environ).add(external_id)
    return external_id


class _UnknownCount:
    """Consecutive status queries that said nothing usable about one workload, kept in a file between the calls
    (each status query is its own process), so a broken CLI ends the job instead of keeping it `running` forever."""

    def __init__(self, name: str, directory: Path) -> None:
        self.path = directory / f"{name}.unknown"

    def bump(self) -> int:
        count = self.get() + 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(str(count))
        return count

    def get(self) -> int:
        try:
            return int(self.path.read_text())
        except (OSError, ValueError):
            return 0

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def status(
    cli: str,
    external_id: str,
    max_unknown: int = 30,
    state_dir: Path = Path(".snakemake/runai"),
    sleep=time.sleep,
    registry: Registry | None = None,
) -> str:
    """running, success or failed for one workload.

    A workload that no longer exists (deleted by someone, or by a cleanup policy) has failed. A query that fails
    otherwise (the control plane briefly unreachable, an unknown phase) is retried, then reported as running, up
    to `max_unknown` times in a row: then the job is reported failed, with the reason on stderr."""
    project, name = split_job_id(external_id)
    unknown = _UnknownCount(name, state_dir)
    registry = registry or Registry(None)
    problem = ""
    for attempt in range(DESCRIBE_ATTEMPTS):
        if attempt:
            sleep(2 * attempt)
        try:
            result = _run(describe_argv(cli, project, name), timeout=DESCRIBE_TIMEOUT_S)
        except FileNotFoundError:
            problem = f"{cli!r} not found"
            continue
        except subprocess.TimeoutExpired:
            problem = "`runai training describe` timed out"
            continue
        output = (result.stderr + "\n" + result.stdout).strip()
        if result.returncode != 0:
            if is_not_found(output):
                unknown.clear()
                registry.remove(external_id)
                _log(f"workload {name} in project {project} no longer exists (deleted?): reporting it failed")
                return FAILED
            problem = f"`runai training describe {name}` failed (exit {result.returncode}): {output[-500:]}"
            continue
        try:
            phase = find_phase(json.loads(result.stdout))
        except json.JSONDecodeError:
            problem = f"`runai training describe {name} -o json` printed no JSON: {result.stdout[-500:]!r}"
            continue
        state = snakemake_status(phase)
        if state is not None:
            unknown.clear()
            if state == FAILED:
                _log(f"workload {name} in project {project} is {phase}")
            if state == RUNNING:
                registry.add(external_id)  # also a workload resumed from an earlier run
            else:
                registry.remove(external_id)
            return state
        problem = f"workload {name}: phase {phase!r} is not one asft.runai knows"
        break
    count = unknown.bump()
    if count >= max_unknown:
        _log(f"{problem}; {count} status queries in a row without an answer: reporting the job failed")
        unknown.clear()
        registry.remove(external_id)
        return FAILED
    _log(f"{problem} ({count}/{max_unknown}); reporting it running for now")
    return RUNNING


def start_deletes(cli: str, external_ids: Sequence[str]) -> list[tuple[str, subprocess.Popen | None]]:
    """Start `runai training delete` for each workload, all at once, each in its own session so that it outlives
    its caller and a second Ctrl-C."""
    started = []
    for external_id in external_ids:
        project, name = split_job_id(external_id)
        _log(f"deleting workload {name} in project {project}")
        try:
            process = subprocess.Popen(
                delete_argv(cli, project, name),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        except FileNotFoundError:
            _log(f"{cli!r} not found: cannot delete {name}")
            process = None
        started.append((external_id, process))
    return started


def finish_deletes(started: Sequence[tuple[str, subprocess.Popen | None]], wait_s: float) -> int:
    """How many deletions failed within `wait_s`; one still running is left to finish on its own, and a workload
    that is already gone counts as deleted."""
    failures = 0
    deadline = time.monotonic() + wait_s
    for external_id, process in started:
        if process is None:
            failures += 1
            continue
        try:
            _, err = process.communicate(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            continue
        if process.returncode != 0 and not is_not_found(err):
            failures += 1
            _log(f"deleting {external_id} failed (exit {process.returncode}): {err.strip()[-500:]}")
    return failures


def cancel(
    cli: str, external_ids: Sequence[str], wait_s: float = CANCEL_WAIT_S, registry: Registry | None = None
) -> int:
    """Delete the workloads. cluster-generic kills the cancel command after 2 s, so this waits `wait_s` at most."""
    valid = []
    for external_id in external_ids:
        try:
            split_job_id(external_id)
        except RunaiError as err:
            _log(str(err))
            continue
        valid.append(external_id)
        (registry or Registry(None)).remove(external_id)  # the sidecar need not delete it again
    failures = finish_deletes(start_deletes(cli, valid), wait_s)
    return 1 if failures or len(valid) < len(external_ids) else 0


def sidecar(cli: str, directory: Path, poll_s: float = 0.5) -> int:
    """Announce the registry, then wait. On SIGTERM (Snakemake shutting down, after a Ctrl-C or an executor
    error as after a normal end) delete every workload still registered. If Snakemake vanishes without a shutdown
    (killed), leave the workloads running, as Slurm jobs are: a rerun resumes polling them."""
    stop = []
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is Snakemake's to handle; it then stops this sidecar
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    directory.mkdir(parents=True, exist_ok=True)
    parent = os.getppid()
    print(json.dumps({"asft_runai_registry": str(directory.resolve())}), flush=True)
    while not stop:
        if os.getppid() != parent:
            _log("Snakemake is gone without shutting down; its workloads keep running")
            return 0
        time.sleep(poll_s)
    registry = Registry(directory)
    left = registry.entries()
    if left:
        _log(f"Snakemake stopped with {len(left)} workload(s) still running")
        finish_deletes(start_deletes(cli, left), SIDECAR_DELETE_WAIT_S)
    for external_id in left:
        registry.remove(external_id)
    try:
        directory.rmdir()
    except OSError:
        pass
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m asft.runai", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("submit", help="submit a Snakemake job script; prints the job id")
    sub.add_argument("--rule", required=True)
    sub.add_argument("--jobid", required=True)
    for name in ("gpu", "nodes", "cpus-per-task", "mem-mb", "runtime"):
        sub.add_argument(f"--{name}", required=True, help=f"the job's resource {name.replace('-', '_')}")
    sub.add_argument("--image", help="overrides ASFT_RUNAI_IMAGE")
    sub.add_argument("--project", help="overrides ASFT_RUNAI_PROJECT")
    sub.add_argument("--node-pools", help="overrides ASFT_RUNAI_NODE_POOLS")
    sub.add_argument("jobscript")
    stat = commands.add_parser("status", help="print running, success or failed")
    stat.add_argument("job_id")
    can = commands.add_parser("cancel", help="delete workloads")
    can.add_argument("job_ids", nargs="+")
    side = commands.add_parser("sidecar", help="delete the run's unfinished workloads when Snakemake stops it")
    side.add_argument("--dir", type=Path, help="registry directory (default: a new one in .snakemake/runai/)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("submit", "status"):
        # Snakemake handles Ctrl-C (and then cancels); a submission or a status query in flight must finish, not
        # die of the signal: cluster-generic loses the jobs it was polling when a status command is killed.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    site = Site.from_env()
    registry = Registry.from_env()
    try:
        if args.command == "submit":
            if args.image:
                site = Site(**{**site.__dict__, "image": args.image})
            if args.project:
                site = Site(**{**site.__dict__, "project": args.project})
            if args.node_pools:
                pools = tuple(w for w in re.split(r"[\s,]+", args.node_pools) if w)
                site = Site(**{**site.__dict__, "node_pools": pools, "cpu_node_pools": pools})
            job = JobRequest.parse(
                args.rule, args.jobid, args.gpu, args.nodes, args.cpus_per_task, args.mem_mb, args.runtime
            )
            print(submit(site, job, args.jobscript), flush=True)
        elif args.command == "status":
            max_unknown = int(os.environ.get("ASFT_RUNAI_MAX_UNKNOWN", "30"))
            print(status(site.cli, args.job_id, max_unknown=max_unknown, registry=registry), flush=True)
        elif args.command == "cancel":
            return cancel(site.cli, args.job_ids, registry=registry)
        else:
            directory = args.dir or Path(".snakemake/runai") / f"run-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
            return sidecar(site.cli, directory)
    except RunaiError as err:
        _log(f"error: {err}")
        return 1
    return 0


def cancel_main() -> int:
    """`asft-runai-cancel ID...`, the profile's cancel command: Snakemake runs it without a shell, so the command
    cannot name a subcommand itself."""
    return main(["cancel", *sys.argv[1:]])


def sidecar_main() -> int:
    """`asft-runai-sidecar`, the profile's sidecar command (started without a shell, like the cancel command)."""
    return main(["sidecar", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
