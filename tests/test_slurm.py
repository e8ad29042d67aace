"""The workflow through the unmodified profiles/slurm, on a real one-node Slurm cluster (tests/slurm_cluster.py).

One real run of config/test.yaml (module fixture) submits every job with sbatch; then, on copies of it, a train job
cancelled with scancel mid-run is retried by the profile and resumes its checkpoint, and Ctrl-C (SIGINT) cancels
the submitted job and ends Snakemake.
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
from pathlib import Path

import pandas as pd
import pytest
import yaml

from asft.train_io import TEST_HOOK_ENV
from tests.conftest import REPO
from tests.slurm_cluster import SlurmCluster, slurm_cluster_fixture  # noqa: F401  (provides slurm_cluster)
from tests.test_workflow import copy_workflow, planned_jobs, snakemake_env, wait_for

pytestmark = pytest.mark.slow

# The plugin polls job states 40 s after a submission and then 10 s later each time no job has finished; 2 s
# instead of 40 keeps the run short. A command-line setting: the profile is used as it is.
FAST_POLLING = ("--slurm-init-seconds-before-status-checks", "2")
SFT_TRAIN = "results/demo/runs/tiny/arith/sft/seed0/train"
ASFT_TRAIN = "results/demo/runs/tiny/arith/asft-kl0.05/seed0/train"
HANG_MARKER_ENV = "ASFT_TEST_HANG_MARKER"
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+)")


def hang_once_after_checkpoint_2(step: int, checkpoint: Path) -> None:
    """TEST_HOOK_ENV target: the first job to save (and mark) checkpoint-2 creates the marker file named by
    HANG_MARKER_ENV and waits there to be cancelled; a job that finds the marker trains on."""
    marker = Path(os.environ[HANG_MARKER_ENV])
    if step == 2 and not marker.exists():
        marker.write_text(f"{os.getpid()}\n")
        time.sleep(3600)


def slurm_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--profile", "profiles/slurm", "--configfile", "config/test.yaml"] + [
        *FAST_POLLING,
        *args,
    ]


def slurm_env(cluster: SlurmCluster, **extra: str) -> dict[str, str]:
    return {**snakemake_env(), "SLURM_CONF": cluster.env["SLURM_CONF"], **extra}


def run_slurm(workdir: Path, cluster: SlurmCluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        slurm_command(*args),
        cwd=workdir,
        env=slurm_env(cluster),
        capture_output=True,
        text=True,
        timeout=1500,
    )


def failure_logs(workdir: Path, cluster: SlurmCluster) -> str:
    logs = sorted((workdir / "logs").rglob("*.log")) + sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2000:]}" for p in logs) + "\n" + cluster.logs()


@pytest.fixture(scope="module")
def slurm_workflow(
    slurm_cluster: SlurmCluster,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess]:
    """A copy of the workflow with the reduced demo run through profiles/slurm."""
    workdir = copy_workflow(tmp_path_factory.mktemp("slurm-workflow") / "workflow")
    result = run_slurm(workdir, slurm_cluster)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:] + failure_logs(workdir, slurm_cluster)
    return workdir, result


def start_hanging_train(workdir: Path, cluster: SlurmCluster, tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    """Snakemake retraining the sft run through Slurm, its train job stopping after checkpoint-2 (the marker file
    appears then); output to a log file."""
    shutil.rmtree(workdir / SFT_TRAIN)
    marker, log = tmp_path / "hung-after-checkpoint-2", tmp_path / "snakemake.log"
    env = slurm_env(
        cluster,
        **{
            TEST_HOOK_ENV: f"{__name__}:hang_once_after_checkpoint_2",
            HANG_MARKER_ENV: str(marker),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        },
    )
    with log.open("w") as handle:
        process = subprocess.Popen(
            slurm_command(SFT_TRAIN),
            cwd=workdir,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as in a terminal
        )
    return process, marker, log


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def running_train_job(cluster: SlurmCluster) -> str | None:
    """The Slurm id of the one train job, once it runs."""
    jobs = [j for j in cluster.active_jobs() if j["comment"].startswith("rule_train_")]
    assert len(jobs) <= 1, jobs
    return jobs[0]["id"] if jobs and jobs[0]["state"] == "RUNNING" else None


def test_the_cluster_schedules_gpu_jobs(slurm_cluster: SlurmCluster) -> None:
    """The node's GPUs are a count without devices: a job asking for two is accepted, scheduled and given two."""
    result = slurm_cluster.run("srun", "--gpus=2", "--mem=100", "bash", "-c", "echo $CUDA_VISIBLE_DEVICES")
    assert result.returncode == 0, result.stdout + result.stderr + slurm_cluster.logs()
    assert result.stdout.strip() == "0,1"


def test_slurm_run_results_table(slurm_workflow: tuple[Path, subprocess.CompletedProcess]) -> None:
    workdir, result = slurm_workflow
    table = pd.read_csv(workdir / "results/demo/tables/results.csv")
    assert list(table["mode"]) == ["base", "asft-kl0.05", "sft"]
    assert table[["arith", "average"]].notna().all().all()
    # every job but the local `all` went through sbatch
    planned = planned_jobs(result)
    assert len(SUBMITTED.findall(result.stdout + result.stderr)) == sum(planned.values()) - planned["all"]


def test_slurm_nothing_to_do_after_a_run(
    slurm_workflow: tuple[Path, subprocess.CompletedProcess],
    slurm_cluster: SlurmCluster,
) -> None:
    workdir, _ = slurm_workflow
    assert planned_jobs(run_slurm(workdir, slurm_cluster, "-n")) == {}


def test_a_cancelled_train_job_is_retried_from_its_checkpoint(
    slurm_workflow: tuple[Path, subprocess.CompletedProcess],
    slurm_cluster: SlurmCluster,
    tmp_path: Path,
) -> None:
    """`scancel` of a running train job (a preemption, an admin): Snakemake reports the failure and the profile's
    retry resubmits exactly that job, which resumes from the checkpoint the cancelled one wrote."""
    source, _ = slurm_workflow
    workdir = tmp_path / "workflow"
    shutil.copytree(source, workdir, symlinks=True)
    untouched = workdir / ASFT_TRAIN / "train_summary.json"
    untouched_mtime = untouched.stat().st_mtime_ns
    process, marker, log = start_hanging_train(workdir, slurm_cluster, tmp_path)
    try:
        wait_for(marker.exists, process, timeout=600)
        cancelled = running_train_job(slurm_cluster)
        assert cancelled is not None
        result = slurm_cluster.run("scancel", cancelled)
        assert result.returncode == 0, result.stderr
        process.wait(timeout=900)
    finally:
        stop(process)
    text = log.read_text()
    assert process.returncode == 0, text[-6000:] + failure_logs(workdir, slurm_cluster)
    assert re.search(rf"SLURM-job '{cancelled}' failed.*'CANCELLED'", text), text[-6000:]
    assert "Trying to restart job" in text
    assert planned_jobs(subprocess.CompletedProcess([], 0, text, "")) == {"train": 1}
    submitted = SUBMITTED.findall(text)
    assert len(submitted) == 2 and submitted[0] == cancelled
    summary = json.loads((workdir / SFT_TRAIN / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 3
    assert untouched.stat().st_mtime_ns == untouched_mtime
    assert planned_jobs(run_slurm(workdir, slurm_cluster, "-n", SFT_TRAIN)) == {}


def test_ctrl_c_cancels_the_submitted_jobs(
    slurm_workflow: tuple[Path, subprocess.CompletedProcess],
    slurm_cluster: SlurmCluster,
    tmp_path: Path,
) -> None:
    """SIGINT to Snakemake's process group (Ctrl-C) scancels its running job at once and ends Snakemake within
    one status-check interval of the plugin (it joins its status thread, which sleeps up to 180 s between polls;
    early in a run, as here, the interval is still short), leaving no lock: a plain rerun plans the job again."""
    source, _ = slurm_workflow
    workdir = tmp_path / "workflow"
    shutil.copytree(source, workdir, symlinks=True)
    process, _, log = start_hanging_train(workdir, slurm_cluster, tmp_path)
    try:
        wait_for(lambda: running_train_job(slurm_cluster) is not None, process, timeout=300)
        job = running_train_job(slurm_cluster)
        os.killpg(process.pid, signal.SIGINT)
        interrupted = time.monotonic()
        while slurm_cluster.active_jobs():
            assert time.monotonic() - interrupted < 30, "the job is still queued or running 30 s after SIGINT"
            time.sleep(0.2)
        process.wait(timeout=180 + 60)  # the plugin's longest poll interval, and scancel's timeout
        print(f"snakemake exited {time.monotonic() - interrupted:.1f} s after SIGINT")
    finally:
        stop(process)
    text = log.read_text()
    assert process.returncode != 0
    assert "Terminating processes on user request" in text
    assert {j["id"]: j["state"] for j in slurm_cluster.jobs()}[job] == "CANCELLED"
    result = run_slurm(workdir, slurm_cluster, "-n")
    assert "cannot be locked" not in result.stdout + result.stderr
    assert planned_jobs(result)["train"] == 1


def test_a_job_no_node_can_run_is_refused_before_any_submission(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """Slurm would queue it forever; the workflow's start hook compares it with sinfo's nodes and stops first."""
    workdir = copy_workflow(tmp_path / "workflow")
    config_path = workdir / "config" / "test.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["experiments"]["demo"]["resources"] = {"train": {"cpus_per_task": 4096}}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = run_slurm(workdir, slurm_cluster)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    assert "rule train" in output and "can never start" in output, output[-4000:]
    assert "4096 CPUs per node > the largest node's" in output
    assert not SUBMITTED.search(output) and slurm_cluster.active_jobs() == []
