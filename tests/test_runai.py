"""Run:ai support (asft.runai, profiles/runai): the `runai` command lines, the phase mapping, and the workflow end to
end against tests/stand_ins/runai, a STAND-IN for the Run:ai CLI that runs each workload as a local process.

Nothing here talks to Run:ai: the stand-in implements the few commands asft.runai calls, in the form of the CLI v2
reference; what a real cluster adds (scheduling, images, volumes, the CLI's exact JSON) is untested.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from asft import runai
from asft.runai import FAILED, RUNNING, SUCCESS, JobRequest, RunaiError, Site
from tests.conftest import REPO
from tests.test_workflow import copy_workflow, planned_jobs, snakemake_env

STAND_IN = Path(__file__).parent / "stand_ins" / "runai"
PROFILE = REPO / "profiles" / "runai"
PROJECT = "team-a"
IMAGE = "registry.example/asft:test"

SITE = Site(
    image=IMAGE,
    project=PROJECT,
    node_pools=("h100", "a100"),
    cpu_node_pools=("cpu",),
    pvcs=("claimname=shared,path=/shared",),
    workdir="/shared/asft",
)


def job(**overrides) -> JobRequest:
    values = dict(rule="train", jobid="7", gpu=8, nodes=1, cpus_per_task=32.0, mem_mb=256000, runtime=1440)
    return JobRequest(**{**values, **overrides})


# --- command lines -------------------------------------------------------------------------------------------------


def test_submit_command_of_a_gpu_job() -> None:
    argv = runai.submit_argv(SITE, job(), "asft-train-7-abc123", "/shared/asft/.snakemake/tmp.x/job.sh")
    assert argv == [
        "runai", "training", "submit", "asft-train-7-abc123", "--project", PROJECT, "--image", IMAGE,
        "--node-pools", "h100", "--node-pools", "a100", "--gpu-devices-request", "8",
        "--cpu-core-request", "32", "--cpu-memory-request", "256000M",
        "--existing-pvc", "claimname=shared,path=/shared", "--working-dir", "/shared/asft", "--backoff-limit", "0",
        "--command", "--", "timeout", "-k", "60", "-s", "TERM", "86400", "sh", "/shared/asft/.snakemake/tmp.x/job.sh",
    ]  # fmt: skip


def test_cpu_job_asks_for_no_gpu_and_goes_to_the_cpu_pools() -> None:
    argv = runai.submit_argv(SITE, job(gpu=0, cpus_per_task=1.5, runtime=0), "n", "/j.sh")
    assert "--gpu-devices-request" not in argv
    assert argv[argv.index("--node-pools") + 1] == "cpu" and argv.count("--node-pools") == 1
    assert argv[argv.index("--cpu-core-request") + 1] == "1.5"
    assert argv[argv.index("--") :] == ["--", "sh", "/j.sh"]  # runtime 0: no time limit


def test_site_from_the_environment() -> None:
    site = Site.from_env(
        {
            "ASFT_RUNAI_IMAGE": IMAGE,
            "ASFT_RUNAI_PROJECT": PROJECT,
            "ASFT_RUNAI_NODE_POOLS": "h100, a100",
            "ASFT_RUNAI_PVC": "claimname=a,path=/a claimname=b,path=/b",
            "ASFT_RUNAI_ENV": "HF_HOME,TRANSFORMERS_OFFLINE",
            "ASFT_RUNAI_EXTRA_ARGS": "--large-shm --label 'team=nlp x'",
            "ASFT_RUNAI_ENFORCE_RUNTIME": "0",
        }
    )
    assert site.node_pools == site.cpu_node_pools == ("h100", "a100")
    assert site.pvcs == ("claimname=a,path=/a", "claimname=b,path=/b")
    assert site.env_names == ("HF_HOME", "TRANSFORMERS_OFFLINE")
    assert site.extra_args == ("--large-shm", "--label", "team=nlp x")
    assert not site.enforce_runtime and site.cli == "runai" and site.name_prefix == "asft"
    argv = runai.submit_argv(site, job(), "n", "/j.sh", env=[("HF_HOME", "/shared/hf")])
    assert argv[argv.index("--environment") + 1] == "HF_HOME=/shared/hf"
    assert argv[-7:] == ["--large-shm", "--label", "team=nlp x", "--command", "--", "sh", "/j.sh"]


def test_missing_image_or_project_is_named() -> None:
    with pytest.raises(RunaiError, match="ASFT_RUNAI_IMAGE and ASFT_RUNAI_PROJECT"):
        runai.check_site(Site())


def test_multi_node_job_is_refused_with_the_distributed_route() -> None:
    with pytest.raises(RunaiError, match=r"2 nodes .*runai training pytorch submit --workers N"):
        runai.check_single_node(job(nodes=2, gpu=16))
    runai.check_single_node(job())


def test_resources_are_parsed_from_the_placeholders() -> None:
    parsed = JobRequest.parse("merge", "3", "0", "1", "8", "64000", "60")
    assert parsed == JobRequest("merge", "3", 0, 1, 8.0, 64000, 60)
    with pytest.raises(RunaiError, match="resource gpu='None' is not a number.*default-resources"):
        JobRequest.parse("merge", "3", "None", "1", "8", "64000", "60")
    with pytest.raises(RunaiError, match="whole number"):
        JobRequest.parse("merge", "3", "0.5", "1", "8", "64000", "60")
    with pytest.raises(RunaiError, match="positive"):
        JobRequest.parse("merge", "3", "0", "1", "8", "0", "60")


def test_secrets_are_not_forwarded_and_values_never_logged() -> None:
    with pytest.raises(RunaiError, match="HF_TOKEN, WANDB_API_KEY.*--env-secret"):
        runai.forwarded_env(["HF_HOME", "HF_TOKEN", "WANDB_API_KEY"], {"HF_TOKEN": "hf_x"})
    assert runai.forwarded_env(["HF_HOME", "UNSET"], {"HF_HOME": "/h"}) == [("HF_HOME", "/h")]
    argv = runai.submit_argv(SITE, job(), "n", "/j.sh", env=[("HF_HOME", "/private/path")])
    assert "/private/path" not in runai.redacted(argv) and "HF_HOME=***" in runai.redacted(argv)


def test_workload_names_are_valid_unique_and_short() -> None:
    names = {runai.workload_name("asft", "evaluate_snapshot_with_a_long_name", "1234") for _ in range(50)}
    assert len(names) == 50
    for name in names:
        assert re.fullmatch(r"[a-z][-a-z0-9]*[a-z0-9]", name) and len(name) <= runai.MAX_NAME_LENGTH
        assert re.search(r"-1234-[0-9a-f]{6}$", name)
    assert runai.workload_name("asft", "train", "7", "abc123") == "asft-train-7-abc123"
    assert runai.workload_name("9Lab", "Train", "7", "abc123") == "j9lab-train-7-abc123"


def test_job_ids_carry_the_project() -> None:
    assert runai.split_job_id(runai.job_id(PROJECT, "asft-train-7-abc123")) == (PROJECT, "asft-train-7-abc123")
    with pytest.raises(RunaiError):
        runai.split_job_id("asft-train-7-abc123")


# --- phases ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("description", "phase"),
    [
        ({"name": "w", "phase": "Running", "k8sPhase": "Succeeded"}, "Running"),  # the REST API's workload object
        ({"general": {"name": "w", "status": "Completed"}, "pods": [{"status": "Running"}]}, "Completed"),
        ({"pods": [{"phase": "Failed"}], "workload": {"Phase": "Pending"}}, "Pending"),  # pods never count
        ([{"name": "w", "status": "Failed"}], "Failed"),
        ({"name": "w", "pods": []}, None),
    ],
)
def test_phase_is_found_in_the_description(description, phase) -> None:
    assert runai.find_phase(description) == phase


@pytest.mark.parametrize(
    ("phase", "state"),
    [
        *[(p, RUNNING) for p in ("Creating", "Pending", "Initializing", "Running", "Degraded", "Resuming")],
        *[(p, RUNNING) for p in ("Updating", "Terminating", "Stopping")],
        ("Completed", SUCCESS),
        ("Succeeded", SUCCESS),
        *[(p, FAILED) for p in ("Failed", "Stopped", "Suspended", "Deleting", "Deleted")],
        ("CrashLoopBackOff", None),
        (None, None),
    ],
)
def test_phase_maps_to_a_snakemake_status(phase, state) -> None:
    assert runai.snakemake_status(phase) == state


def test_status_outlasts_a_flaky_cli_then_gives_up(tmp_path: Path) -> None:
    cli = tmp_path / "runai"
    cli.write_text("#!/bin/sh\necho 'dial tcp: connection refused' >&2\nexit 1\n")
    cli.chmod(0o755)
    answers = [
        runai.status(str(cli), f"{PROJECT}/w", max_unknown=3, state_dir=tmp_path, sleep=lambda s: None)
        for _ in range(4)
    ]
    assert answers == [RUNNING, RUNNING, FAILED, RUNNING]  # the count starts again after giving up


# --- the stand-in, command by command ------------------------------------------------------------------------------


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh stand-in state directory, with RUNAI_STAND_IN_STATE pointing at it."""
    state = tmp_path / "runai-state"
    state.mkdir()
    monkeypatch.setenv("RUNAI_STAND_IN_STATE", str(state))
    return state


def poll(condition: Callable[[], object], timeout: float = 30, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def submit_script(tmp_path: Path, body: str, rule: str = "demo", **resources) -> str:
    script = tmp_path / f"{rule}.sh"
    script.write_text(f"#!/bin/sh\n{body}\n")
    site = Site(image=IMAGE, project=PROJECT, cli=str(STAND_IN), workdir=str(tmp_path))
    return runai.submit(site, job(rule=rule, gpu=0, **resources), str(script), environ=dict(os.environ))


def status_of(external_id: str, tmp_path: Path) -> str:
    return runai.status(str(STAND_IN), external_id, state_dir=tmp_path / "status")


def test_stand_in_phases(stand_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ok = submit_script(tmp_path, "echo done > finished.txt", rule="ok")
    bad = submit_script(tmp_path, "exit 3", rule="bad")
    poll(lambda: status_of(ok, tmp_path) == SUCCESS, what="success")
    poll(lambda: status_of(bad, tmp_path) == FAILED, what="failure")
    assert (tmp_path / "finished.txt").read_text() == "done\n"  # ran in its --working-dir
    monkeypatch.setenv("RUNAI_STAND_IN_FAIL", "injected")
    injected = submit_script(tmp_path, "echo never > never.txt", rule="injected")
    monkeypatch.setenv("RUNAI_STAND_IN_PENDING_S", "60")
    pending = submit_script(tmp_path, "true", rule="slow")
    poll(lambda: status_of(injected, tmp_path) == FAILED, what="injected failure")
    assert not (tmp_path / "never.txt").exists()
    assert status_of(pending, tmp_path) == RUNNING
    described = subprocess.run(
        [STAND_IN, "training", "describe", pending.split("/")[1], "--project", PROJECT, "--output", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(described.stdout)["phase"] == "Pending"
    assert runai.cancel(str(STAND_IN), [pending], wait_s=10) == 0


def test_stand_in_refuses_what_runai_refuses(stand_in: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([STAND_IN, "training", *args], capture_output=True, text=True)

    assert "unknown flag: --gpus" in run("submit", "w", "-p", PROJECT, "-i", IMAGE, "--gpus", "1", "--", "true").stderr
    assert "invalid workload name" in run("submit", "W_1", "-p", PROJECT, "-i", IMAGE, "--", "true").stderr
    assert "not found" in run("describe", "nope", "-p", PROJECT).stderr
    assert run("submit", "w", "-p", PROJECT, "-i", IMAGE, "--", "true").returncode == 0
    assert "already exists" in run("submit", "w", "-p", PROJECT, "-i", IMAGE, "--", "true").stderr


def test_cancel_kills_the_running_workload(stand_in: Path, tmp_path: Path) -> None:
    external_id = submit_script(tmp_path, "sleep 300 & echo $! > child.pid; wait", rule="long")
    name = external_id.split("/")[1]
    child = int(poll(lambda: (tmp_path / "child.pid").exists() and (tmp_path / "child.pid").read_text().strip()))
    assert status_of(external_id, tmp_path) == RUNNING
    cancel = subprocess.run(
        [Path(sys.executable).parent / "asft-runai-cancel", external_id], env=cli_env(stand_in), timeout=10
    )
    assert cancel.returncode == 0
    poll(lambda: not pid_alive(child), what="the workload's process to die")
    assert (stand_in / "deleted" / PROJECT / name).is_dir()
    assert status_of(external_id, tmp_path) == FAILED


def test_sidecar_deletes_what_is_still_running_when_snakemake_stops_it(
    stand_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cluster-generic starts the sidecar, passes its first line to every command, and SIGTERMs it at shutdown."""
    sidecar = subprocess.Popen(
        [Path(sys.executable).parent / "asft-runai-sidecar", "--dir", str(tmp_path / "registry")],
        env=cli_env(stand_in),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        sidecar_vars = sidecar.stdout.readline().strip()
        registry = runai.Registry.from_env({runai.SIDECAR_VARS: sidecar_vars})
        assert registry.directory == tmp_path / "registry"
        monkeypatch.setenv(runai.SIDECAR_VARS, sidecar_vars)  # as cluster-generic does for submit, status, cancel
        done = submit_script(tmp_path, "true", rule="done")
        long = submit_script(tmp_path, "sleep 300", rule="long")
        assert registry.entries() == sorted([done, long])
        poll(lambda: runai.status(str(STAND_IN), done, state_dir=tmp_path, registry=registry) == SUCCESS)
        assert registry.entries() == [long]  # seen finished: not the sidecar's to delete
        sidecar.send_signal(signal.SIGINT)  # a Ctrl-C in the terminal reaches it too: Snakemake's to handle
        time.sleep(0.5)
        assert sidecar.poll() is None and registry.entries() == [long]
        sidecar.terminate()
        assert sidecar.wait(timeout=30) == 0
    finally:
        if sidecar.poll() is None:
            sidecar.kill()
    assert (stand_in / "deleted" / PROJECT / long.split("/")[1]).is_dir()
    assert (stand_in / "workloads" / PROJECT / done.split("/")[1]).is_dir()
    assert not (tmp_path / "registry").exists()


def test_submit_command_line_prints_only_the_job_id(stand_in: Path, tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\ntrue\n")
    env = {**cli_env(stand_in), "ASFT_RUNAI_ENV": "HF_HOME", "HF_HOME": "/private/hf-home"}
    common = ["--rule", "fetch_model", "--jobid", "2", "--gpu", "0", "--cpus-per-task", "1", "--mem-mb", "4000"]
    result = subprocess.run(
        [sys.executable, "-m", "asft.runai", "submit", *common, "--nodes", "1", "--runtime", "60", str(script)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"{PROJECT}/asft-fetch-model-2-[0-9a-f]{{6}}\n", result.stdout)
    assert "HF_HOME=***" in result.stderr and "/private/hf-home" not in result.stderr
    refused = subprocess.run(
        [sys.executable, "-m", "asft.runai", "submit", *common, "--nodes", "2", "--runtime", "60", str(script)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 1 and refused.stdout == ""
    assert "runai training pytorch submit --workers" in refused.stderr


# --- the profile ---------------------------------------------------------------------------------------------------


def test_profile_passes_every_resource_and_defaults_them() -> None:
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert profile["executor"] == "cluster-generic"
    for resource in ("gpu", "nodes", "cpus_per_task", "mem_mb", "runtime"):
        assert f"{{resources.{resource}}}" in profile["cluster-generic-submit-cmd"]
        assert resource in profile["default-resources"]
    assert profile["default-resources"]["gpu"] == 0 and profile["default-resources"]["nodes"] == 1
    assert profile["cluster-generic-status-cmd"] == "python -m asft.runai status"
    for key in ("cluster-generic-cancel-cmd", "cluster-generic-sidecar-cmd"):  # run without a shell: one command
        command = Path(sys.executable).parent / profile[key]  # a console script of the project
        assert command.is_file() and os.access(command, os.X_OK)


# --- the workflow end to end, against the stand-in -----------------------------------------------------------------


def cli_env(state: Path, **extra: str) -> dict[str, str]:
    """The environment of a `snakemake --profile profiles/runai`: the stand-in first on PATH, the site's settings."""
    env = {k: v for k, v in snakemake_env().items() if not k.startswith(("ASFT_RUNAI_", "RUNAI_STAND_IN_"))}
    env["PATH"] = f"{STAND_IN.parent}{os.pathsep}{env['PATH']}"
    env.update(RUNAI_STAND_IN_STATE=str(state), ASFT_RUNAI_IMAGE=IMAGE, ASFT_RUNAI_PROJECT=PROJECT, **extra)
    return env


def runai_snakemake_command(*args: str) -> list[str]:
    # Status checks every 2 s instead of the profile's 30 s: the stand-in answers at once.
    return [
        sys.executable, "-m", "snakemake", "--profile", "profiles/runai", "--configfile", "config/test.yaml",
        "--jobs", "2", "--seconds-between-status-checks", "2", "--max-status-checks-per-second", "20", *args,
    ]  # fmt: skip


def run_with_runai(workdir: Path, state: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    state.mkdir(exist_ok=True)
    return subprocess.run(
        runai_snakemake_command(*args),
        cwd=workdir,
        env=cli_env(state, **env),
        capture_output=True,
        text=True,
        timeout=900,
    )


def calls(state: Path, command: str) -> list[list[str]]:
    lines = (state / "calls.jsonl").read_text().splitlines()
    return [argv for argv in map(json.loads, lines) if argv[:2] == ["training", command]]


def workload_phases(state: Path) -> dict[str, str]:
    phases = {}
    for directory in sorted((state / "workloads" / PROJECT).iterdir()):
        code = directory / "exit_code"
        phases[directory.name] = ("Completed" if code.read_text() == "0" else "Failed") if code.exists() else "?"
    return phases


def submitted_resources(output: str) -> dict[str, dict[str, str]]:
    """Workload name -> the resources Snakemake printed for the job it submitted as that workload."""
    resources, found = {}, {}
    for block in re.split(r"\n(?=\[\w{3} \w{3} )", output):
        jobid = re.search(r"^\s+jobid: (\d+)$", block, re.M)
        printed = re.search(r"^\s+resources: (.*)$", block, re.M)
        if jobid and printed:
            resources[jobid.group(1)] = dict(re.findall(r"(\w+)=([^,]+)", printed.group(1)))
        for number, name in re.findall(r"Submitted job (\d+) with external jobid '[^/]+/([^']+)'", block):
            found[name] = resources[number]
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def runai_workflow(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """A copy of the workflow after `snakemake --profile profiles/runai --configfile config/test.yaml`."""
    workdir = copy_workflow(tmp_path_factory.mktemp("runai-workflow"))
    state = workdir.parent / f"{workdir.name}-runai-state"
    result = run_with_runai(workdir, state)
    assert result.returncode == 0, result.stderr[-6000:]
    return workdir, result


@pytest.mark.slow
def test_workflow_runs_through_runai(runai_workflow: tuple[Path, subprocess.CompletedProcess]) -> None:
    workdir, result = runai_workflow
    state = workdir.parent / f"{workdir.name}-runai-state"
    table = (workdir / "results/demo/tables/results.csv").read_text()
    assert table.splitlines()[0].startswith("mode") and len(table.splitlines()) == 4  # base, asft, sft
    phases = workload_phases(state)
    rules = sorted(re.sub(r"^asft-|-\d+-[0-9a-f]{6}$", "", name) for name in phases)
    assert rules == [
        "aggregate", "build-demo", "evaluate-base", "evaluate-run", "evaluate-run", "fetch-benchmark",
        "fetch-dataset", "fetch-model", "merge", "merge", "trace-analysis", "trace-compare", "trace-run", "train",
        "train",
    ]  # fmt: skip
    assert set(phases.values()) == {"Completed"}
    # Each workload asked Run:ai for what Snakemake says the job needs.
    resources = submitted_resources(result.stdout + result.stderr)
    submits = {argv[2]: argv for argv in calls(state, "submit")}
    assert set(resources) == set(submits) == set(phases)
    for name, argv in submits.items():
        asked = resources[name]
        flags = dict(zip(argv[3::2], argv[4::2], strict=False))
        assert flags["--project"] == PROJECT and flags["--image"] == IMAGE
        assert flags["--cpu-core-request"] == asked["cpus_per_task"]
        assert flags["--cpu-memory-request"] == f"{asked['mem_mb']}M"
        assert flags.get("--gpu-devices-request", "0") == asked["gpu"] == "0"  # the CPU demo
        assert flags["--working-dir"] == str(workdir)
        command = argv[argv.index("--") + 1 :]
        assert command[:6] == ["timeout", "-k", "60", "-s", "TERM", str(int(asked["runtime"]) * 60)]
        assert command[6] == "sh" and "/.snakemake/tmp." in command[7]
    assert planned_jobs(run_with_runai(workdir, state, "-n")) == {}


@pytest.fixture
def runai_copy(runai_workflow: tuple[Path, subprocess.CompletedProcess], tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the finished workflow (the failures below must not leak into other tests) and a fresh
    stand-in state directory."""
    source, _ = runai_workflow
    workdir = tmp_path / "workflow"
    shutil.copytree(source, workdir, symlinks=True)
    shutil.rmtree(workdir / ".snakemake" / "runai", ignore_errors=True)
    return workdir, tmp_path / "runai-state"


@pytest.mark.slow
def test_a_failing_job_fails_the_workflow(runai_copy: tuple[Path, Path]) -> None:
    """A broken input makes the aggregation's command fail inside its workload: Run:ai reports the workload Failed,
    Snakemake retries it once (the profile's retries), then exits non-zero without a results table."""
    workdir, state = runai_copy
    (workdir / "results/demo/base/tiny/eval/arith/metrics.json").write_text("not JSON")
    result = run_with_runai(workdir, state)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert re.search(r"workload asft-aggregate-\d+-[0-9a-f]{6} in project team-a is Failed", output)
    assert "Error in rule aggregate" in output and "JSONDecodeError" in output
    assert list(workload_phases(state).values()) == ["Failed", "Failed"]  # the first try and the retry
    assert not (workdir / "results/demo/tables/results.csv").exists()
    assert not (workdir / "results/demo/tables/results.md").exists()


@pytest.mark.slow
def test_a_workload_deleted_on_the_cluster_fails_its_job(runai_copy: tuple[Path, Path]) -> None:
    """Someone deletes a workload (in the Run:ai UI, or `runai training delete`): its job fails, not hangs."""
    workdir, state = runai_copy
    state.mkdir()
    log = workdir.parent / "snakemake.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            runai_snakemake_command("--forcerun", "aggregate", "--retries", "0"),
            cwd=workdir,
            env=cli_env(state, RUNAI_STAND_IN_PENDING_S="120"),  # it stays Pending, i.e. running for Snakemake
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        workloads = state / "workloads" / PROJECT
        name = poll(lambda: next((p.name for p in workloads.glob("*")), None), 120, "the submission")
        time.sleep(2)  # a few status checks that say running
        subprocess.run([STAND_IN, "training", "delete", name, "--project", PROJECT], env=cli_env(state), check=True)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text()
    assert process.returncode != 0
    assert f"workload {name} in project {PROJECT} no longer exists" in output and "Error in rule aggregate" in output
    assert not (workdir / "results/demo/tables/results.csv").exists()


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found += [child]
            todo.append(child)
    return found


def training_processes(state: Path) -> list[int]:
    """PIDs of `asft train` commands running inside the stand-in's train workloads."""
    found = []
    for directory in (state / "workloads" / PROJECT).glob("asft-train-*"):
        if not (directory / "supervisor.pid").exists():
            continue
        for pid in descendants(int((directory / "supervisor.pid").read_text())):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(part.endswith(b"asft") for part in cmdline) and b"train" in cmdline:
                found.append(pid)
    return found


@pytest.mark.slow
def test_ctrl_c_deletes_the_running_workloads(runai_copy: tuple[Path, Path]) -> None:
    """Ctrl-C (SIGINT to Snakemake's process group) while two train jobs run: Snakemake calls the cancel command,
    which deletes both workloads, whose processes die; the next run plans the training again."""
    workdir, state = runai_copy
    state.mkdir()
    log = workdir.parent / "snakemake.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            runai_snakemake_command("--forcerun", "train"),
            cwd=workdir,
            env=cli_env(state),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as in a terminal; the workloads have theirs
        )
    try:
        running = poll(lambda: p if len(p := training_processes(state)) >= 2 else None, 300, "both trainings")
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = log.read_text()
    assert process.returncode != 0
    submitted = {argv[2] for argv in calls(state, "submit")}
    # Deleted by the cancel command, or by the sidecar when cluster-generic did not hand the job to cancel.
    deleted = set(re.findall(r"deleting workload (asft-train-\d+-[0-9a-f]{6}) in project team-a", output))
    assert deleted == submitted and len(deleted) == 2, output[-3000:]
    poll(lambda: all((state / "deleted" / PROJECT / name).is_dir() for name in deleted), 30, "the deletions")
    poll(lambda: not any(pid_alive(pid) for pid in running), 30, "the training processes to die")
    assert not list((state / "workloads" / PROJECT).glob("asft-train-*"))
    assert planned_jobs(run_with_runai(workdir, state, "-n"))["train"] == 2
