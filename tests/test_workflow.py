"""The Snakemake workflow end to end on a reduced demo config, and what it reruns after config edits.

One real run (module fixture) of the checked-in config/test.yaml produces every output; dry runs on edited copies
of its config then show exactly which jobs Snakemake would plan.
"""

from __future__ import annotations

import copy
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

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO, SMALL_DEMO

pytestmark = pytest.mark.slow

WORKFLOW_FILES = ("Snakefile", "workflow", "profiles", "config")


def reduced_config(demo_config: dict) -> dict:
    """What config/test.yaml must be: the demo config with two modes (one anchored), a few training steps, eight
    test problems and short generations."""
    config = copy.deepcopy(demo_config)
    config["demo"] = dict(SMALL_DEMO)
    exp = config["experiments"]["demo"]
    exp["modes"] = ["sft", "asft"]
    exp["training"].update(max_steps=3, logging_steps=1, kl_log_every=1, save_steps=2, per_device_train_batch_size=8)
    exp["training"]["report_to"] = ["none"]
    exp["evaluation"]["sampling"] = {"preset": "greedy", "max_new_tokens": 8}
    exp["evaluation"]["bootstrap_samples"] = 50
    return config


def snakemake_env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "config/test.yaml", *args],
        cwd=workdir,
        env=snakemake_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )


def write_config(workdir: Path, config: dict) -> None:
    (workdir / "config" / "test.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def planned_jobs(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Job counts from a dry run's "Job stats" table ({} when there is nothing to do)."""
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return {}
    stats = text.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", stats, re.M)}


def planned_outputs(result: subprocess.CompletedProcess, rule: str) -> list[str]:
    text = result.stdout + result.stderr
    blocks = re.findall(rf"rule {rule}:\n(.*?)\n\n", text, re.S)
    return [re.search(r"output: ([^\n]+)", block).group(1) for block in blocks]


def copy_workflow(workdir: Path) -> Path:
    """The workflow's files copied into `workdir` (created if needed), the package linked, as a user's checkout."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, workdir / name, symlinks=True)
        else:
            shutil.copy(source, workdir / name)
    (workdir / "src").symlink_to(REPO / "src")  # the schema symlink in workflow/schemas points here
    return workdir


@pytest.fixture(scope="module")
def finished_workflow(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A copy of the workflow with a completed reduced demo run."""
    workdir = copy_workflow(tmp_path_factory.mktemp("workflow"))
    config = yaml.safe_load((workdir / "config" / "test.yaml").read_text())
    result = snakemake(workdir)
    logs = "\n".join(p.read_text()[-2000:] for p in (workdir / "logs").rglob("*.log")) if result.returncode else ""
    assert result.returncode == 0, result.stderr[-5000:] + logs
    return workdir, config


def test_checked_in_test_config_is_the_reduced_demo(demo_config: dict) -> None:
    """config/test.yaml is written by hand for reading; it must stay config/config.yaml with the reductions."""
    with (REPO / "config" / "test.yaml").open() as handle:
        assert yaml.safe_load(handle) == reduced_config(demo_config)


def test_end_to_end_results_table(finished_workflow: tuple[Path, dict]) -> None:
    workdir, _ = finished_workflow
    table = pd.read_csv(workdir / "results/demo/tables/results.csv")
    assert list(table["mode"]) == ["base", "asft-kl0.05", "sft"]
    assert table[["arith", "average"]].notna().all().all()
    assert ((table["arith"] >= 0) & (table["arith"] <= 100)).all()
    assert "| base |" in (workdir / "results/demo/tables/results.md").read_text()
    assert (workdir / "results/demo/plots/training_curves.png").stat().st_size > 10_000
    run = workdir / "results/demo/runs/tiny/arith/asft-kl0.05/seed0"
    log_lines = (run / "train" / "train_log.jsonl").read_text().splitlines()
    assert len(log_lines) == 3 and '"kl"' in log_lines[0]
    assert (run / "merged" / "config.json").exists()
    assert (run / "eval" / "arith" / "samples.jsonl").read_text().count("\n") == SMALL_DEMO["n_test"]
    assert list((workdir / "logs").rglob("train/*/*/*/seed0.log"))


def test_the_trace_of_the_anchored_run(finished_workflow: tuple[Path, dict]) -> None:
    """The demo traces its ASFT run: the trace, its analysis, viewer and the comparison across traces."""
    workdir, _ = finished_workflow
    trace = workdir / "results/demo/traces/tiny/arith/asft-kl0.05/seed0"
    meta = json.loads((trace / "trace" / "trace.json").read_text())
    assert meta["traced_tokens"] == 64 and meta["adapter"].endswith("asft-kl0.05/seed0/train")
    analysis = json.loads((trace / "analysis.json").read_text())
    assert 0 < analysis["gini"] < 1 and analysis["tokens"]["traced"] == 64
    assert "trace-data" in (trace / "viewer.html").read_text()
    assert "asft-kl0.05" in (workdir / "results/traces/comparison.md").read_text()


def test_nothing_to_do_after_a_run(finished_workflow: tuple[Path, dict]) -> None:
    workdir, _ = finished_workflow
    assert planned_jobs(snakemake(workdir, "-n")) == {}


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"snakemake exited ({process.returncode}) before the condition held"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_a_killed_forced_evaluation_is_replanned(
    finished_workflow: tuple[Path, dict], tmp_path: Path, sig: signal.Signals
) -> None:
    """`-R evaluate_run` removes a job's old outputs before running it. Killed mid-evaluation (the whole process
    group, as Ctrl-C in a terminal does), a plain `snakemake` must plan that evaluation and the aggregation again,
    not report nothing to do while metrics.json is missing and the old table stays."""
    source, _ = finished_workflow
    workdir = tmp_path / "workflow"
    shutil.copytree(source, workdir, symlinks=True)  # the kill leaves a state the other tests must not see
    evaluations = {
        run: (
            workdir / f"results/demo/runs/tiny/arith/{run}/seed0/eval/arith/metrics.json",
            workdir / f"logs/demo/evaluate/tiny/arith/{run}/seed0/arith.log",
        )
        for run in ("sft", "asft-kl0.05")
    }

    def evaluation_running() -> bool:
        # Snakemake has removed the old outputs and log, and the job's shell has recreated the log; loading the
        # model and generating take seconds more, so the signal lands mid-evaluation.
        return any(not metrics.exists() and log.exists() for metrics, log in evaluations.values())

    command = [sys.executable, "-m", "snakemake", "--cores", "1", "--configfile", "config/test.yaml"]
    process = subprocess.Popen(
        [*command, "--forcerun", "evaluate_run"],
        cwd=workdir,
        env=snakemake_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, so the signal reaches the job as it would from a terminal
    )
    try:
        wait_for(evaluation_running, process, timeout=300)
        os.killpg(process.pid, sig)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    killed = [run for run, (metrics, _) in evaluations.items() if not metrics.exists()]
    assert len(killed) == 1, "the evaluation finished before the signal reached it"

    result = snakemake(workdir, "-n")
    assert planned_jobs(result) == {"evaluate_run": 1, "aggregate": 1, "all": 1}
    eval_dir = f"results/demo/runs/tiny/arith/{killed[0]}/seed0/eval/arith"
    assert planned_outputs(result, "evaluate_run") == [f"{eval_dir}/metrics.json, {eval_dir}/samples.jsonl"]


def test_a_forced_retrain_with_a_new_learning_rate_starts_fresh(
    finished_workflow: tuple[Path, dict], tmp_path: Path
) -> None:
    """`snakemake -R train` after a finished run (here with a new learning rate under the same run ids) trains
    every step anew with the new settings: no finished run's checkpoint is a resume point."""
    source, config = finished_workflow
    workdir = tmp_path / "workflow"
    shutil.copytree(source, workdir, symlinks=True)
    edited = copy.deepcopy(config)
    edited["experiments"]["demo"]["training"]["learning_rate"] = 2e-3
    write_config(workdir, edited)
    result = snakemake(workdir, "--forcerun", "train")
    assert result.returncode == 0, result.stderr[-4000:]
    max_steps = edited["experiments"]["demo"]["training"]["max_steps"]
    for run in ("sft", "asft-kl0.05"):
        train_dir = workdir / f"results/demo/runs/tiny/arith/{run}/seed0/train"
        summary = json.loads((train_dir / "train_summary.json").read_text())
        assert summary["resumed_from"] is None and summary["global_step"] == max_steps
        log = [json.loads(line) for line in (train_dir / "train_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == list(range(1, max_steps + 1))
        assert {r["learning_rate"] for r in log} == {2e-3}
    assert planned_jobs(snakemake(workdir, "-n")) == {}


def _set_kl_weight(config: dict) -> None:
    config["modes"]["asft"]["kl_weight"] = 0.1  # a new run id


def _set_kl_direction(config: dict) -> None:
    config["modes"]["asft"]["kl_direction"] = "reverse"  # same run id, new hyperparameter


def _add_mode_row(config: dict) -> None:
    config["modes"]["sft-focal"] = {"weighting": "dft", "kl_weight": 0.2}
    config["experiments"]["demo"]["modes"].append("sft-focal")


@pytest.mark.parametrize(
    ("edit", "retrained", "traced"),
    [
        (_set_kl_weight, "results/demo/runs/tiny/arith/asft-kl0.1/seed0/train", True),
        (_set_kl_direction, "results/demo/runs/tiny/arith/asft-kl0.05/seed0/train", True),
        (_add_mode_row, "results/demo/runs/tiny/arith/sft-focal-kl0.2/seed0/train", False),
    ],
)
def test_a_mode_edit_reruns_exactly_that_run(
    finished_workflow: tuple[Path, dict], edit, retrained: str, traced: bool
) -> None:
    """Editing or adding one mode row plans that run's train, merge and evaluation plus the aggregation, and its
    trace (the demo traces asft) with the comparison of traces."""
    workdir, config = finished_workflow
    edited = copy.deepcopy(config)
    edit(edited)
    write_config(workdir, edited)
    try:
        result = snakemake(workdir, "-n")
        expected = {"train": 1, "merge": 1, "evaluate_run": 1, "aggregate": 1, "all": 1}
        if traced:
            expected.update(trace_run=1, trace_analysis=1, trace_compare=1)
        assert planned_jobs(result) == expected
        assert planned_outputs(result, "train") == [retrained]
    finally:
        write_config(workdir, config)


def test_adding_a_benchmark_retrains_nothing(finished_workflow: tuple[Path, dict]) -> None:
    workdir, config = finished_workflow
    edited = copy.deepcopy(config)
    # the same problems decoded differently: an identical benchmark would share the existing evaluations
    edited["benchmarks"]["arith_copy"] = {
        **copy.deepcopy(config["benchmarks"]["arith"]),
        "sampling": {"max_new_tokens": 6},
    }
    edited["experiments"]["demo"]["benchmarks"].append("arith_copy")
    write_config(workdir, edited)
    try:
        jobs = planned_jobs(snakemake(workdir, "-n"))
        # Two runs plus the base model on the new benchmark; no train, merge or old evaluation.
        assert jobs == {"fetch_benchmark": 1, "evaluate_run": 2, "evaluate_base": 1, "aggregate": 1, "all": 1}
    finally:
        write_config(workdir, config)


def test_lora_direct_skips_the_merge(finished_workflow: tuple[Path, dict]) -> None:
    """evaluation.lora_direct re-evaluates the runs from base model + adapter; nothing is retrained or merged."""
    workdir, config = finished_workflow
    edited = copy.deepcopy(config)
    edited["experiments"]["demo"]["evaluation"]["lora_direct"] = True
    write_config(workdir, edited)
    try:
        result = snakemake(workdir, "-n", "-p")
        assert planned_jobs(result) == {"evaluate_run": 2, "aggregate": 1, "all": 1}
        text = result.stdout + result.stderr
        commands = re.findall(r"^\s*Shell command: (asft evaluate .*)$", text, re.M)
        assert len(commands) == 2, text
        assert all("--model resources/models/tiny --adapter results/demo/runs/tiny/" in c for c in commands)
    finally:
        write_config(workdir, config)


def test_merge_passes_the_dtype_and_remote_code_setting(finished_workflow: tuple[Path, dict]) -> None:
    """A model that needs remote code trains with training.trust_remote_code, so its merge must load it the same
    way; the merge is done in the evaluation's dtype, the only use of the merged weights."""
    workdir, config = finished_workflow
    edited = copy.deepcopy(config)
    edited["experiments"]["demo"]["training"]["trust_remote_code"] = True
    edited["experiments"]["demo"]["evaluation"]["dtype"] = "bfloat16"
    write_config(workdir, edited)
    try:
        result = snakemake(workdir, "-n", "-p")
        assert planned_jobs(result)["merge"] == 2
        text = result.stdout + result.stderr
        commands = re.findall(r"^\s*Shell command: (asft merge .*)$", text, re.M)
        assert len(commands) == 2, text
        assert all(" --dtype bfloat16 --trust-remote-code " in c for c in commands), commands
    finally:
        write_config(workdir, config)


def test_a_new_evaluation_dtype_remerges_without_retraining(finished_workflow: tuple[Path, dict]) -> None:
    """The merge dtype is a param of the merge job: changing it replans the merges, not the training."""
    workdir, config = finished_workflow
    edited = copy.deepcopy(config)
    edited["experiments"]["demo"]["evaluation"]["dtype"] = "float32"
    write_config(workdir, edited)
    try:
        jobs = planned_jobs(snakemake(workdir, "-n"))
        assert jobs == {"merge": 2, "evaluate_run": 2, "evaluate_base": 1, "aggregate": 1, "all": 1}
    finally:
        write_config(workdir, config)


def test_invalid_config_fails_before_planning(finished_workflow: tuple[Path, dict]) -> None:
    workdir, config = finished_workflow
    edited = copy.deepcopy(config)
    edited["modes"]["asft"]["kl_weight"] = -1
    write_config(workdir, edited)
    try:
        result = snakemake(workdir, "-n")
        assert result.returncode != 0
        assert "modes.asft.kl_weight" in result.stdout + result.stderr
        assert "config/test.yaml" in result.stdout + result.stderr
    finally:
        write_config(workdir, config)


def test_lint_is_clean() -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
