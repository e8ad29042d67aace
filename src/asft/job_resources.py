"""What each job asks a scheduler for, derived from the config: GPUs, nodes, CPUs, host memory and wall time.

The rules declare these as Snakemake resources (`gpu`, `nodes`, `cpus_per_task`, `mem_mb`, `runtime`; multi-node
training adds `tasks` and `mpi`), so one profile serves the CPU demo and the paper's 8-GPU runs without
`--set-resources`. A single-node job asks for `nodes: 1`, which pins a run's GPUs to one machine. Memory and time
are rules of thumb from the model's size and the plan's FLOP estimate; a site overrides them per experiment
(`experiments.X.resources.train.mem_mb`, ...) or in its profile.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asft.matrix import Run, eval_spec, is_rl, reads_reference_every_step, run_training

# Host memory of everything but the weights: the interpreter, torch, tokenised data, CUDA context.
BASE_HOST_GB = 32
BASE_CPU_JOB_MB = 4000  # a CPU job on the demo's tiny model: torch and transformers, a few MB of weights
CPU_JOB_RUNTIME = 60
UNKNOWN_TRAIN_RUNTIME = 24 * 60  # minutes, when models.*.parameters_b or the dataset size is missing
UNKNOWN_EVAL_RUNTIME = 8 * 60
UNKNOWN_GPU_HOST_MB = 64000
# The estimate is of achieved throughput; the limit allows for a slower GPU, I/O and start-up.
RUNTIME_SAFETY = 3.0
# Optimizer steps on the CPU and parameters streamed over PCIe: ZeRO-3 with offload runs several times slower.
OFFLOAD_SLOWDOWN = 4.0
MIN_GPU_RUNTIME = 240  # loading, saving and evaluation start-up of a 7B model take minutes each
MAX_RUNTIME = 7 * 24 * 60
BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}


@dataclass(frozen=True)
class Request:
    """One job's ask, per node (Slurm's --mem and --cpus-per-task are per node; --gpus counts the whole job)."""

    gpus_per_node: int
    nodes: int
    cpus_per_task: int
    mem_mb: int
    runtime: int  # minutes

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    def resources(self) -> dict[str, Any]:
        """Snakemake resources; None leaves one unset (Snakemake drops it)."""
        multi_node = self.nodes > 1
        return {
            "gpu": self.gpus,
            "nodes": self.nodes,
            "cpus_per_task": self.cpus_per_task,
            "mem_mb": self.mem_mb,
            "runtime": self.runtime,
            # One task per node, started by the job itself (`asft train` runs srun + torchrun): the slurm
            # plugin's MPI route, which runs the job's command once instead of wrapping it in `srun -n1`.
            "tasks": self.nodes if multi_node else None,
            "mpi": "srun" if multi_node else None,
            # The plugin would otherwise turn `tasks` into --ntasks-per-gpu for a GPU job.
            "tasks_per_gpu": 0 if multi_node else None,
        }


def _with_overrides(request: Request, overrides: Mapping[str, Any]) -> Request:
    values = {key: overrides[key] for key in ("cpus_per_task", "mem_mb", "runtime") if overrides.get(key)}
    return Request(**{**request.__dict__, **values})


def device_of(config: Mapping[str, Any], experiment: str, model: str) -> str:
    """cuda or cpu: the experiment's resources.device, `auto` meaning cpu exactly for the demo's own model."""
    device = config["experiments"][experiment]["resources"]["device"]
    if device != "auto":
        return device
    return "cpu" if "demo" in config["models"][model]["source"] else "cuda"


def parameters_b(config: Mapping[str, Any], model: str) -> float | None:
    """The model's size in billions; None for the demo's stand-ins (their parameters_b describes the real one)."""
    entry = config["models"][model]
    return None if "demo" in entry["source"] else entry.get("parameters_b")


def _runtime(gpu_hours: float | None, gpus: int, unknown: int) -> int:
    if gpu_hours is None:
        return unknown
    minutes = RUNTIME_SAFETY * gpu_hours / max(gpus, 1) * 60
    return int(min(max(math.ceil(minutes), MIN_GPU_RUNTIME), MAX_RUNTIME))


def _reference_copy(config: Mapping[str, Any], run: Run, training: Mapping[str, Any]) -> bool:
    """A full fine-tune with a loss or log that reads the reference loads the model twice."""
    if training["finetune"] == "lora" or training.get("reference") == "cached":
        return False
    if is_rl(config, run.mode):  # TRL loads a reference only for its KL term (β > 0); kl_log_every is SFT's
        return run.kl_weight > 0
    return reads_reference_every_step(config, run) or training["kl_log_every"] > 0


def _is_zero3(deepspeed: str | None) -> tuple[bool, bool]:
    """(ZeRO-3, CPU offload of parameters or optimizer states), read from the DeepSpeed config (validated to
    exist and parse before any job is planned)."""
    if not deepspeed:
        return False, False
    zero = json.loads(Path(deepspeed).read_text()).get("zero_optimization", {})
    offload = any(
        str(zero.get(key, {}).get("device", "none")).lower() in ("cpu", "nvme")
        for key in ("offload_param", "offload_optimizer")
    )
    return zero.get("stage") == 3, offload


def train_request(config: Mapping[str, Any], run: Run, threads: int) -> Request:
    """A train job: num_processes GPUs on each of num_nodes nodes (none on CPU), memory from the model's size."""
    from asft.plan import Throughput, train_flops

    training = run_training(config, run)
    exp = config["experiments"][run.experiment]
    ranks, nodes = training["num_processes"], training["num_nodes"]
    size = parameters_b(config, run.model)
    copies = 2 if _reference_copy(config, run, training) else 1
    if device_of(config, run.experiment, run.model) == "cpu":
        weights_mb = 0 if size is None else size * 1000 * BYTES_PER_PARAM.get(training["dtype"], 4)
        request = Request(
            0, nodes, threads * ranks, math.ceil(BASE_CPU_JOB_MB * ranks + weights_mb * copies * ranks), CPU_JOB_RUNTIME
        )
        return _with_overrides(request, exp["resources"]["train"])
    if size is None:
        mem_mb = UNKNOWN_GPU_HOST_MB
    else:
        weights_gb = size * BYTES_PER_PARAM.get(training["dtype"], 2)
        zero3, offload = _is_zero3(training["deepspeed"])
        if zero3:  # created partitioned; rank 0 gathers the full weights once, to save them
            host_gb = BASE_HOST_GB + 2 * weights_gb
            if offload:  # fp32 master weights and two Adam moments, spread over the nodes
                host_gb += 12 * size / nodes
        else:
            host_gb = BASE_HOST_GB + weights_gb * ranks * copies
        mem_mb = math.ceil(host_gb * 1000)
    flops, _ = train_flops(config, run)
    hours = None if flops is None else Throughput().gpu_hours("train", flops)
    if hours is not None and _is_zero3(training["deepspeed"])[1]:
        hours *= OFFLOAD_SLOWDOWN
    request = Request(
        ranks,
        nodes,
        exp["resources"]["cpus_per_gpu"] * ranks,
        mem_mb,
        _runtime(hours, ranks * nodes, UNKNOWN_TRAIN_RUNTIME),
    )
    return _with_overrides(request, exp["resources"]["train"])


def reference_request(config: Mapping[str, Any], run: Run, threads: int) -> Request:
    """Caching a run's reference (`asft reference`): one no-grad forward of the base model over the training data,
    on the GPUs an evaluation of the model gets."""
    from asft.plan import Throughput, reference_flops

    exp = config["experiments"][run.experiment]
    size = parameters_b(config, run.model)
    if device_of(config, run.experiment, run.model) == "cpu":
        return _with_overrides(Request(0, 1, threads, BASE_CPU_JOB_MB, CPU_JOB_RUNTIME), exp["resources"]["reference"])
    gpus = evaluation_gpus(config, run.experiment, run.model)
    mem_mb = UNKNOWN_GPU_HOST_MB if size is None else math.ceil((BASE_HOST_GB + 1.5 * size * 2) * 1000)
    flops, _ = reference_flops(config, run)
    hours = None if flops is None else Throughput().gpu_hours("train", flops)
    request = Request(
        gpus, 1, exp["resources"]["cpus_per_gpu"] * gpus, mem_mb, _runtime(hours, gpus, UNKNOWN_EVAL_RUNTIME)
    )
    return _with_overrides(request, exp["resources"]["reference"])


def merge_request(config: Mapping[str, Any], experiment: str, model: str, threads: int) -> Request:
    """Merging a LoRA adapter: CPU work holding the base weights and the merged copy."""
    size = parameters_b(config, model)
    dtype = config["experiments"][experiment]["training"]["dtype"]
    mem_mb = BASE_CPU_JOB_MB if size is None else math.ceil(8000 + 2 * size * 1000 * BYTES_PER_PARAM.get(dtype, 2))
    request = Request(0, 1, threads, mem_mb, CPU_JOB_RUNTIME)
    return _with_overrides(request, config["experiments"][experiment]["resources"]["merge"])


def evaluation_gpus(config: Mapping[str, Any], experiment: str, model: str) -> int:
    """vLLM shards a model too big for one GPU over a power of two of them (its tensor parallelism is the GPUs the
    job sees); the transformers backend uses one."""
    exp = config["experiments"][experiment]
    size = parameters_b(config, model)
    if exp["evaluation"]["backend"] != "vllm" or size is None:
        return 1
    # bf16 weights plus a fifth for activations and the KV cache
    needed = size * 2 * 1.2 / exp["resources"]["gpu_memory_gb"]
    return 1 << max(0, math.ceil(math.log2(max(needed, 1))))


def evaluate_request(config: Mapping[str, Any], experiment: str, model: str, benchmark: str, threads: int) -> Request:
    """One evaluation (a run, a snapshot or the base model) of `model` on `benchmark`."""
    from asft.plan import Throughput, eval_flops
    from asft.sharing import Evaluation

    exp = config["experiments"][experiment]
    spec = eval_spec(config, experiment, benchmark)
    workers = spec["grading_workers"]
    size = parameters_b(config, model)
    if device_of(config, experiment, model) == "cpu":
        request = Request(0, 1, max(threads, workers), BASE_CPU_JOB_MB, CPU_JOB_RUNTIME)
        return _with_overrides(request, exp["resources"]["evaluate"])
    gpus = evaluation_gpus(config, experiment, model)
    mem_mb = UNKNOWN_GPU_HOST_MB if size is None else math.ceil((BASE_HOST_GB + 1.5 * size * 2) * 1000)
    flops, _ = eval_flops(config, Evaluation(experiment, benchmark, {"model": model}, ""))
    hours = None if flops is None else Throughput().gpu_hours("evaluate", flops)
    request = Request(
        gpus,
        1,
        max(exp["resources"]["cpus_per_gpu"] * gpus, workers + 2),
        mem_mb,
        _runtime(hours, gpus, UNKNOWN_EVAL_RUNTIME),
    )
    return _with_overrides(request, exp["resources"]["evaluate"])


def trace_request(config: Mapping[str, Any], experiment: str, model: str, dataset: str, threads: int) -> Request:
    """A per-token gradient trace (`asft trace`, asft.tracing): one GPU holding the model in the trace's dtype,
    running one backward pass over its batch per traced token (`asft.plan.trace_flops`)."""
    from asft.plan import Throughput, trace_flops
    from asft.tracing.spec import TraceTarget

    exp = config["experiments"][experiment]
    if device_of(config, experiment, model) == "cpu":
        return Request(0, 1, threads, BASE_CPU_JOB_MB, CPU_JOB_RUNTIME)
    size = parameters_b(config, model)
    dtype = exp["trace"]["dtype"]
    bytes_per_param = 8 if dtype == "float64" else BYTES_PER_PARAM[dtype]
    mem_mb = UNKNOWN_GPU_HOST_MB if size is None else math.ceil((BASE_HOST_GB + 1.5 * size * bytes_per_param) * 1000)
    flops, _ = trace_flops(config, TraceTarget(experiment, model, dataset))
    hours = None if flops is None else Throughput().gpu_hours("train", flops)
    return Request(1, 1, exp["resources"]["cpus_per_gpu"], mem_mb, _runtime(hours, 1, UNKNOWN_EVAL_RUNTIME))
