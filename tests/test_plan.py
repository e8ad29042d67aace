"""`asft plan`: exact FLOP arithmetic on a hand-built config, shared work counted once, unknowns never zero."""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import pandas as pd
import pytest

from asft.cli import main
from asft.config import validate_config
from asft.paper.targets import target_names
from asft.plan import (
    Throughput,
    build_plan,
    eval_flops,
    format_text,
    rl_train_flops,
    rows_by_experiment,
    rows_by_target,
    train_flops,
    train_shape,
)
from asft.sharing import SharedWork
from tests.conftest import REPO

HUB = {"hub": "owner/name", "revision": "main"}
# 1 TFLOP/s makes GPU-hours = FLOPs / 3.6e15: easy to check by hand
UNIT = Throughput(train_tflops=1.0, eval_tflops=1.0)


def _raw() -> dict[str, Any]:
    return {
        "models": {"m": {"source": HUB, "parameters_b": 1.0}},
        "datasets": {"d": {"source": HUB, "examples": 1000, "mean_tokens": 100}},
        "benchmarks": {
            "gen": {"format": "math500", "source": HUB, "problems": 10, "mean_prompt_tokens": 50},
            "mc": {"format": "medqa", "source": HUB, "problems": 20, "mean_prompt_tokens": 30},
        },
        "modes": {
            "sft": {"weighting": "none"},
            "asft": {"weighting": "dft", "kl_weight": 0.05},
            "sft-lr": {"weighting": "ref_ratio"},
            "iw-sft": {"weighting": "iw_sft"},
        },
        "experiments": {
            "a": {
                "models": ["m"],
                "datasets": ["d"],
                "modes": ["sft", "asft"],
                "seeds": [1],
                "benchmarks": ["gen", "mc"],
                "training": {
                    "finetune": "full",
                    "per_device_train_batch_size": 4,
                    "global_batch_size": 32,
                    "num_processes": 2,
                    "num_train_epochs": 2,
                    "kl_log_every": 10,
                    "report_to": ["none"],
                },
                "evaluation": {"sampling": {"preset": "paper"}},
            }
        },
    }


def _flops(config: dict, experiment: str = "a") -> dict[str, float | None]:
    shared = SharedWork(config)
    return {run.mode: train_flops(config, run)[0] for run in shared.runs(experiment)}


def test_train_flops_are_exact() -> None:
    config = validate_config(_raw())
    run = SharedWork(config).runs("a")[0]
    shape = train_shape(config, run)
    # accumulation 32 / (4 x 2) = 4; steps ceil(1000 x 2 / 32) = ceil(62.5)
    assert (shape.gpus, shape.global_batch, shape.steps, shape.tokens_per_example) == (2, 32, 63, 100.0)
    flops = _flops(config)
    per_step = 32 * 100
    # sft: 6NT, plus the reference forward on steps 0, 10, ..., 60 (7 steps) to log the KL
    assert flops["sft"] == pytest.approx(6e9 * per_step * 63 + 2e9 * per_step * 7, rel=1e-12)
    # asft: the reference runs every step
    assert flops["asft"] == pytest.approx(8e9 * per_step * 63, rel=1e-12)


def test_train_flops_lora_ref_ratio_max_steps_and_truncation() -> None:
    raw = _raw()
    raw["experiments"]["a"]["modes"] = ["sft", "sft-lr", "iw-sft"]
    raw["experiments"]["a"]["training"].update(finetune="lora", max_steps=5, max_length=64, kl_log_every=0)
    flops = _flops(validate_config(raw))
    per_step = 32 * 64  # mean_tokens 100 truncated at max_length 64
    assert flops["sft"] == pytest.approx(4e9 * per_step * 5, rel=1e-12)  # no KL logging: no reference forward
    assert flops["sft-lr"] == pytest.approx(6e9 * per_step * 5, rel=1e-12)  # ref_ratio needs p_ref every step
    assert flops["iw-sft"] == flops["sft-lr"]  # so does iw_sft


def test_rl_train_flops_count_rollouts_at_the_decoding_throughput() -> None:
    """GRPO: 8 completions per prompt, so 32 completions are 4 prompts a step; β > 0 adds a reference forward."""
    raw = _raw()
    raw["modes"].update(grpo={"objective": "grpo", "kl_weight": 0.04}, dapo={"objective": "dapo"})
    raw["experiments"]["a"]["modes"] = ["grpo", "dapo"]
    raw["experiments"]["a"]["training"]["rl"] = {"reward": "math", "num_generations": 8, "max_completion_length": 60}
    config = validate_config(raw)
    runs = {run.mode: run for run in SharedWork(config).runs("a")}
    steps = math.ceil(1000 * 2 * 8 / 32)  # 1000 prompts x 2 epochs x 8 completions / 32 completions a step
    assert train_shape(config, runs["grpo"]).steps == steps
    tokens = 32 * steps * (100 / 2 + 60 / 2)
    throughput = Throughput(train_tflops=2.0, eval_tflops=1.0)  # decoding half as fast: generation counts double
    grpo, _ = rl_train_flops(config, runs["grpo"], throughput)
    dapo, _ = rl_train_flops(config, runs["dapo"], throughput)
    assert grpo == pytest.approx(1e9 * tokens * (2 * 2 + 6 + 2), rel=1e-12)
    assert dapo == pytest.approx(1e9 * tokens * (2 * 2 + 6), rel=1e-12)  # β = 0: no reference


def test_eval_flops_are_exact() -> None:
    config = validate_config(_raw())
    by_bench = {e.benchmark: eval_flops(config, e)[0] for e in SharedWork(config).evaluations("a") if e.step is None}
    assert by_bench["gen"] == pytest.approx(2e9 * 10 * 16 * (50 + 4096 / 2), rel=1e-12)  # paper: n 16, 4096 tokens
    assert by_bench["mc"] == pytest.approx(2e9 * 20 * 30, rel=1e-12)  # one forward of the prompt, n = 1
    raw = _raw()
    raw["experiments"]["a"]["evaluation"]["max_problems"] = 4
    config = validate_config(raw)
    capped = {e.benchmark: eval_flops(config, e)[0] for e in SharedWork(config).evaluations("a")}
    assert capped["mc"] == pytest.approx(2e9 * 4 * 30, rel=1e-12)


def test_rows_sum_the_jobs_in_gpu_hours() -> None:
    config = validate_config(_raw())
    plan = build_plan(config, UNIT)
    row, total = rows_by_experiment(plan)
    assert (row.train_jobs, row.merge_jobs, row.eval_jobs) == (2, 0, 6)  # 2 runs + base model, x 2 benchmarks
    train = 6e9 * 3200 * 63 + 2e9 * 3200 * 7 + 8e9 * 3200 * 63
    evaluate = 3 * (2e9 * 10 * 16 * 2098 + 2e9 * 20 * 30)
    assert row.train_gpu_hours == pytest.approx(train / 3.6e15)
    assert row.eval_gpu_hours == pytest.approx(evaluate / 3.6e15)
    assert row.total_gpu_hours == pytest.approx((train + evaluate) / 3.6e15)
    assert row.gpus_per_train_job == "2"
    assert (total.name, total.train_jobs, total.unestimated_jobs) == ("total", 2, 0)


def test_global_batch_derivation() -> None:
    raw = _raw()
    training = raw["experiments"]["a"]["training"]
    del training["global_batch_size"]
    training["gradient_accumulation_steps"] = 3
    config = validate_config(raw)
    shape = train_shape(config, SharedWork(config).runs("a")[0])
    assert (shape.global_batch, shape.steps) == (4 * 3 * 2, math.ceil(2000 / 24))
    # global_batch_size is divided over every rank of every node: two nodes halve the accumulation
    raw = _raw()
    raw["experiments"]["a"]["training"]["num_nodes"] = 2
    config = validate_config(raw)
    plan = build_plan(config)
    assert train_shape(config, SharedWork(config).runs("a")[0]).global_batch == 32
    assert rows_by_experiment(plan)[0].gpus_per_train_job == "4"


def test_shared_work_is_counted_once() -> None:
    raw = _raw()
    raw["experiments"]["b"] = {**copy.deepcopy(raw["experiments"]["a"]), "benchmarks": ["mc"]}
    raw["experiments"]["b"]["modes"] = ["asft"]
    config = validate_config(raw)
    plan = build_plan(config, UNIT)
    a, b, total = rows_by_experiment(plan)
    assert (a.train_jobs, a.eval_jobs) == (2, 6)
    # b's run and its evaluations (and the base model's) are a's: b owns nothing and says what it reuses
    assert (b.train_jobs, b.eval_jobs, b.reused_runs, b.reused_evaluations) == (0, 0, 1, 2)
    assert (b.train_gpu_hours, b.eval_gpu_hours) == (0.0, 0.0)
    assert (total.train_jobs, total.eval_jobs) == (2, 6)
    assert total.total_gpu_hours == pytest.approx(a.total_gpu_hours)
    assert (total.reused_runs, total.reused_evaluations) == (1, 2)


def test_unknown_inputs_are_reported_never_zero() -> None:
    raw = _raw()
    raw["models"]["big"] = {"source": {"hub": "owner/big", "revision": "main"}}  # no parameters_b
    raw["experiments"]["a"]["models"] = ["m", "big"]
    del raw["benchmarks"]["mc"]["mean_prompt_tokens"]
    plan = build_plan(validate_config(raw), UNIT)
    row, total = rows_by_experiment(plan)
    assert (row.train_jobs, row.train_unknown) == (4, 2)
    # every evaluation of `big` (2 runs x 2 + base 2), and of mc for `m` too (2 runs + base): 9 of 12
    assert (row.eval_jobs, row.eval_unknown) == (12, 9)
    assert row.train_gpu_hours is not None and row.train_gpu_hours > 0  # a lower bound over the known jobs
    text = format_text(plan, [row, total])
    assert ">=" in text
    assert "11 of 16 GPU jobs could not be estimated" in text
    assert "models.big.parameters_b" in text and "benchmarks.mc.mean_prompt_tokens" in text
    # nothing known at all: unknown, not 0
    raw = _raw()
    del raw["datasets"]["d"]["examples"]
    plan = build_plan(validate_config(raw))
    rows = rows_by_experiment(plan)
    assert rows[0].train_gpu_hours is None and rows[0].train_unknown == 2
    assert "unknown" in format_text(plan, rows)


def test_targets_select_filtered_experiments() -> None:
    raw = _raw()
    raw["datasets"]["d2"] = {**copy.deepcopy(raw["datasets"]["d"]), "source": {"hub": "owner/d2", "revision": "main"}}
    raw["experiments"]["a"]["datasets"] = ["d", "d2"]
    plan = build_plan(validate_config(raw), UNIT)
    rows = rows_by_target(plan, {"only_d": (("a", {"dataset": "d"}),), "none": (("missing", None),)})
    only_d, total = rows
    assert only_d.name == "only_d" and (only_d.train_jobs, only_d.eval_jobs) == (2, 6)  # base model kept
    assert (total.train_jobs, total.eval_jobs) == (4, 10)
    rows = rows_by_target(plan, {})
    assert rows[0].name == "other: a" and rows[0].train_jobs == 4


def _cli(*args: str) -> str:
    import contextlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", *args]) == 0
    return out.getvalue()


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the paper config's DeepSpeed paths are relative to the repository


def test_cli_plans_the_paper_config(in_repo: None) -> None:
    import yaml

    text = _cli("--config", "config/paper.yaml")
    experiments = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())["experiments"]
    lines = text.splitlines()
    for name in experiments:
        assert any(line.split()[0] == name for line in lines if line.strip()), name
    total = next(line for line in lines if line.startswith("total")).split()
    assert total[1] == "137"  # the paper's trained runs (Tables 1-5, figures, fork, AlpacaEval), shared ones once
    assert "all 672 GPU jobs estimated" in text and "[1] training FLOPs" in text
    by_table = _cli("--config", "config/paper.yaml", "--by", "table", "--train-tflops", "100")
    for target in target_names():
        assert any(line.split()[0] == target for line in by_table.splitlines() if line.strip()), target
    assert "training 100 TFLOP/s per GPU" in by_table


def test_cli_csv_and_smoke_scale(in_repo: None) -> None:
    frame = pd.read_csv(io.StringIO(_cli("--config", "config/paper.yaml", "--format", "csv")))
    assert frame["experiment"].iloc[-1] == "total" and frame["train_jobs"].iloc[-1] == 137
    assert frame["unestimated_jobs"].iloc[-1] == 0 and frame["total_gpu_hours"].iloc[-1] > 0
    smoke = _cli("--config", "config/paper.yaml", "--set", "scale=smoke")
    assert "smoke: runs on CPU in minutes" in smoke and "GPU-h" in smoke
    table = smoke.split("\n\n")[0].splitlines()[2:]  # below the header: no row says unknown, each says smoke
    assert table and all("unknown" not in line for line in table)
    assert all(line.split()[-4:] == ["smoke", "smoke", "smoke", "-"] for line in table if not line.startswith("-"))


def test_cli_refuses_a_bad_override(in_repo: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--config", "config/paper.yaml", "--set", "scale"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_trace_jobs_are_counted_in_train_hours_and_left_out_of_targets() -> None:
    """One backward pass over the batch per traced token: batches × tokens × 4·N × batch tokens."""
    raw = _raw()
    raw["experiments"]["a"]["trace"] = {"runs": ["asft", "base"], "batches": 3, "tokens_per_batch": 10}
    config = validate_config(raw)
    plan = build_plan(config)
    traces = {key: job for key, job in plan.jobs.items() if job.kind == "trace"}
    assert sorted(traces) == ["trace:a/m/d/asft-kl0.05/seed1", "trace:a/m/d/base"]
    batch_tokens = 4 * 100  # per_device_train_batch_size × min(mean_tokens, max_length)
    assert all(job.flops == 3 * 10 * 4.0 * 1e9 * batch_tokens for job in traces.values())
    without = build_plan(validate_config(_raw()))
    row, row_without = rows_by_experiment(plan)[0], rows_by_experiment(without)[0]
    assert row.trace_jobs == 2 and row.train_jobs == row_without.train_jobs
    extra = sum(plan.throughput.gpu_hours("train", job.flops) for job in traces.values())
    assert row.train_gpu_hours == pytest.approx(row_without.train_gpu_hours + extra)
    assert "traces: 2 per-token gradient trace jobs" in format_text(plan, rows_by_experiment(plan))
    target = rows_by_target(plan, {"t": (("a", {}),)})[0]
    assert target.trace_jobs == 0  # `snakemake <target>` builds tables and figures, never traces
