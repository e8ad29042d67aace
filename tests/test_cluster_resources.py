"""What jobs ask a scheduler for (asft.job_resources), the Slurm pre-submission check (asft.slurm_limits) and the
multi-node launch (asft.distributed), without a cluster."""

from __future__ import annotations

import copy
import re
import sys
from typing import Any

import pytest

from asft.config import ConfigError, iter_runs, load_config, validate_config
from asft.distributed import launch_command, multi_node_command
from asft.job_resources import Request, evaluate_request, merge_request, train_request
from asft.slurm_limits import JobAsk, check_requests, parse_gpus, parse_time
from tests.conftest import REPO
from tests.test_plan import _raw


def _config(**training: Any) -> dict:
    raw = _raw()
    raw["experiments"]["a"]["training"].update(training)
    return validate_config(raw)


def _run(config: dict, mode: str = "asft"):
    return next(r for r in iter_runs(config) if r.mode == mode)


def test_gpus_nodes_and_host_memory_follow_the_config() -> None:
    config = _config(num_processes=8, deepspeed="config/deepspeed/zero3.json")
    request = train_request(config, _run(config), threads=2)
    # one node, 8 GPUs, 8 CPUs each; ZeRO-3 host memory 32 GB + twice the 1B model's bf16 weights (2 GB)
    assert (request.gpus_per_node, request.nodes, request.cpus_per_task) == (8, 1, 64)
    assert request.mem_mb == (32 + 2 * 2) * 1000
    assert request.resources()["gpu"] == 8 and request.resources()["nodes"] == 1
    assert request.resources()["mpi"] is None  # a single-node job runs under the plugin's `srun -n1`

    plain = _config(num_processes=8, global_batch_size=64)
    # without ZeRO-3 each of 8 ranks loads the policy and the reference (asft's KL anchor): 8 x 2 copies x 2 GB
    assert train_request(plain, _run(plain), 2).mem_mb == (32 + 8 * 2 * 2) * 1000
    assert train_request(plain, _run(plain, "sft"), 2).mem_mb == (32 + 8 * 2 * 2) * 1000  # kl_log_every reads it


def test_weightings_that_read_the_reference_load_a_copy() -> None:
    """Without an anchor or KL logging, only modes whose weights read p_ref (sft-lr, iw-sft) load the reference."""
    raw = _raw()
    raw["experiments"]["a"]["modes"] = ["sft", "sft-lr", "iw-sft"]
    raw["experiments"]["a"]["training"].update(num_processes=8, global_batch_size=64, kl_log_every=0)
    config = validate_config(raw)
    assert train_request(config, _run(config, "sft"), 2).mem_mb == (32 + 8 * 1 * 2) * 1000
    for mode in ("sft-lr", "iw-sft"):
        assert train_request(config, _run(config, mode), 2).mem_mb == (32 + 8 * 2 * 2) * 1000, mode


def test_multi_node_request_is_one_task_per_node() -> None:
    offload = "config/deepspeed/zero3_offload.json"
    config = _config(num_processes=8, num_nodes=2, global_batch_size=64, deepspeed=offload)
    resources = train_request(config, _run(config), 2).resources()
    assert resources["gpu"] == 16 and resources["nodes"] == 2
    assert (resources["tasks"], resources["mpi"], resources["tasks_per_gpu"]) == (2, "srun", 0)


def test_device_auto_cpu_for_the_demo_and_overrides() -> None:
    demo = validate_config(load_config(REPO / "config" / "test.yaml"))
    run = next(iter(iter_runs(demo)))
    request = train_request(demo, run, threads=2)
    assert request == Request(0, 1, 2, 4000, 60)
    assert evaluate_request(demo, "demo", "tiny", "arith", 2).gpus == 0
    assert merge_request(demo, "demo", "tiny", 2).gpus == 0

    raw = _raw()
    raw["experiments"]["a"]["resources"] = {"device": "cpu", "train": {"runtime": 999, "mem_mb": 1234}}
    config = validate_config(raw)
    request = train_request(config, _run(config), 3)
    assert request.gpus == 0 and request.runtime == 999 and request.mem_mb == 1234 and request.cpus_per_task == 6


def test_runtime_from_the_plan_estimate_with_a_floor() -> None:
    config = _config(num_processes=2)
    big = copy.deepcopy(_raw())
    big["models"]["m"]["parameters_b"] = 70.0
    big["datasets"]["d"]["examples"] = 1_000_000
    big_config = validate_config(big)
    small, large = train_request(config, _run(config), 2), train_request(big_config, _run(big_config), 2)
    assert small.runtime == 240  # the floor: a short run still loads and saves its model
    assert large.runtime > small.runtime
    unknown = copy.deepcopy(_raw())
    del unknown["models"]["m"]["parameters_b"]
    assert train_request(validate_config(unknown), _run(validate_config(unknown)), 2).runtime == 24 * 60


def test_vllm_evaluation_shards_big_models_over_gpus() -> None:
    raw = _raw()
    raw["experiments"]["a"]["evaluation"]["backend"] = "vllm"
    raw["models"]["m"]["parameters_b"] = 70.0  # 140 GB of bf16 weights, x1.2, over 80 GB GPUs: 3 -> 4
    assert evaluate_request(validate_config(raw), "a", "m", "gen", 2).gpus == 4
    raw["models"]["m"]["parameters_b"] = 7.0
    assert evaluate_request(validate_config(raw), "a", "m", "gen", 2).gpus == 1
    raw["experiments"]["a"]["evaluation"]["backend"] = "transformers"
    raw["models"]["m"]["parameters_b"] = 70.0
    assert evaluate_request(validate_config(raw), "a", "m", "gen", 2).gpus == 1


def test_paper_config_train_jobs_ask_for_8_gpus_on_one_node() -> None:
    config = validate_config(load_config(REPO / "config" / "paper.yaml"))
    requests = {
        (r.model, train_request(config, r, 2).nodes, train_request(config, r, 2).gpus) for r in iter_runs(config)
    }
    assert ("llama-2-7b", 1, 8) in requests and ("llama-2-70b", 2, 16) in requests
    assert all(gpus > 0 for _, _, gpus in requests)


SINFO = """gpu*|node1|64|512000|gpu:h100:8(S:0-1)|2-00:00:00|4
gpu*|node2|64|512000|gpu:h100:8(S:0-1)|2-00:00:00|4
cpu|node3|2|24000|(null)|infinite|1
"""


def _ask(**kw: Any) -> JobAsk:
    values = {"label": "rule train", "partition": None, "gpus": 8, "nodes": 1, "cpus_per_task": 64}
    return JobAsk(**{**values, "mem_mb": 100000, "runtime": 240, **kw})


def test_sinfo_parsing() -> None:
    assert parse_time("2-00:00:00") == 2880 and parse_time("30:00") == 30 and parse_time("infinite") is None
    assert parse_time("1:00:30") == 61 and parse_time("90") == 90
    assert parse_gpus("gpu:h100:8(S:0-1)") == 8 and parse_gpus("gpu:4") == 4 and parse_gpus("(null)") == 0
    assert parse_gpus("gpu:a100:4,gpu:v100:2") == 6


def test_requests_no_node_can_run_are_refused() -> None:
    assert (
        check_requests(
            [_ask(), _ask(nodes=2, gpus=16), _ask(partition="cpu", gpus=0, cpus_per_task=2, mem_mb=4000, runtime=60)],
            SINFO,
        )
        == []
    )
    (message,) = check_requests([_ask(cpus_per_task=128)], SINFO)
    assert "rule train" in message and "128 CPUs per node > the largest node's 64" in message and "'gpu'" in message
    assert "16 GPUs per node > the largest node's 8" in check_requests([_ask(gpus=16)], SINFO)[0]
    assert "runtime 4000 min > the partition's time limit 2880 min" in check_requests([_ask(runtime=4000)], SINFO)[0]
    assert "5 nodes > the partition's maximum of 4" in check_requests([_ask(nodes=5, gpus=40)], SINFO)[0]
    assert (
        "3 nodes with what it asks for, but the partition has 2" in check_requests([_ask(nodes=3, gpus=24)], SINFO)[0]
    )
    assert "does not exist" in check_requests([_ask(partition="a100")], SINFO)[0]
    assert "MB of memory" in check_requests([_ask(partition="cpu", gpus=0, cpus_per_task=1)], SINFO)[0]


def test_multi_node_launch_is_srun_plus_torchrun_rendezvous(monkeypatch: pytest.MonkeyPatch) -> None:
    job = {"JobId": "1234", "NumTasks": "2", "CPUs/Task": "64", "NodeList": "node[1-2]"}
    command = multi_node_command(["train", "--out", "o"], 8, 2, job, "node1", gpus=True)
    assert command[:5] == ["srun", "--ntasks=2", "--kill-on-bad-exit=1", "--cpus-per-task=64", "--gpus-per-task=8"]
    assert command[5:8] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nnodes=2" in command and "--nproc-per-node=8" in command and "--rdzv-backend=c10d" in command
    assert "--rdzv-endpoint=node1:21234" in command and "--rdzv-id=1234" in command
    assert command[-4:] == ["asft.cli", "train", "--out", "o"]
    with pytest.raises(ConfigError, match="has 1 task"):
        multi_node_command(["train"], 8, 2, {**job, "NumTasks": "1"}, "node1", gpus=True)

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(ConfigError, match="needs a Slurm job with 2 nodes"):
        launch_command(["train"], 8, 2)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launch_command(["train"], 8, 2) is None


def test_slurm_dry_run_of_the_paper_asks_for_gpus_from_the_config(tmp_path) -> None:
    """The acceptance check of the unmodified profile: no --set-resources, GPUs and nodes from config/paper.yaml."""
    from tests.test_paper_smoke import _copy_workflow, _snakemake

    workdir = _copy_workflow(tmp_path)
    result = _snakemake(workdir, "table5", "-n", "--profile", "profiles/slurm", "--configfile", "config/paper.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout + result.stderr
    blocks = re.findall(r"^rule (\w+):\n(.*?)\n\n", text, re.S | re.M)
    resources = {}
    for rule, block in blocks:
        model = re.search(r"model=([^,\s]+)", block)
        line = re.search(r"resources: ([^\n]+)", block).group(1)
        resources.setdefault((rule, model.group(1) if model else None), set()).add(line)
    train_7b = resources[("train", "qwen2.5-7b")]
    assert all("gpu=8" in r and "nodes=1" in r and "cpus_per_task=64" in r for r in train_7b), train_7b
    assert all(
        "gpu=16" in r and "nodes=2" in r and "tasks=2" in r and "mpi=srun" in r
        for r in resources[("train", "llama-2-70b")]
    )
    assert all("gpu=1," in r and "nodes=1" in r for r in resources[("evaluate_run", "qwen2.5-7b")])
    # vLLM shards 70B over 4 of the cluster's 80 GB GPUs
    assert all("gpu=4," in r for r in resources[("evaluate_base", "llama-2-70b")])
