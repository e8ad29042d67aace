"""Running the train stage on several ranks: device checks, the torchrun relaunch, and DeepSpeed specifics.

Import-light (torch only): `asft train` checks devices and relaunches itself before loading the training stack.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch


def data_parallel_command(argv: list[str], num_processes: int) -> list[str] | None:
    """The torchrun command that runs this same `asft` command once per rank; None when no launch is needed.

    None for one process, and inside a launched rank (LOCAL_RANK set), so a rank never launches again.
    """
    if num_processes <= 1 or "LOCAL_RANK" in os.environ:
        return None
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}"]
    return [*launcher, "-m", "asft.cli", *argv]


def slurm_job_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job` of the running job as key=value pairs (NumNodes, NumTasks, CPUs/Task, NodeList, ...).

    Read from the controller: Snakemake's job step hands the command an environment without the allocation's
    SLURM_* variables, all but the job id.
    """
    out = subprocess.run(
        ["scontrol", "show", "job", "--oneliner", job_id], check=True, capture_output=True, text=True
    ).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def first_node(node_list: str) -> str:
    """The first host of a Slurm node list (n[01-04] included), where the rendezvous is hosted."""
    out = subprocess.run(["scontrol", "show", "hostnames", node_list], check=True, capture_output=True, text=True)
    return out.stdout.split()[0]


def multi_node_command(
    argv: list[str], num_processes: int, num_nodes: int, job: dict[str, str], head: str, gpus: bool
) -> list[str]:
    """srun starts one torchrun agent per task of the Slurm job (one task per node); they meet at the first node
    (c10d rendezvous keyed by the job id) and each starts num_processes ranks running this same `asft` command.
    """
    from asft.config import ConfigError

    tasks = int(job.get("NumTasks", "0"))
    if tasks != num_nodes:
        raise ConfigError(
            f"training.num_nodes is {num_nodes} but Slurm job {job.get('JobId')} has {tasks} task(s): it needs one "
            f"task per node (Snakemake's slurm profile asks for nodes={num_nodes}, tasks={num_nodes})"
        )
    port = 20000 + int(job["JobId"]) % 20000  # two jobs sharing a first node do not share a rendezvous port
    srun = ["srun", f"--ntasks={num_nodes}", "--kill-on-bad-exit=1"]
    cpus = job.get("CPUs/Task", "")
    if cpus.isdigit():
        srun.append(f"--cpus-per-task={cpus}")
    if gpus:
        srun.append(f"--gpus-per-task={num_processes}")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={num_nodes}",
        f"--nproc-per-node={num_processes}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={head}:{port}",
        f"--rdzv-id={job['JobId']}",
    ]
    return [*srun, *torchrun, "-m", "asft.cli", *argv]


def launch_command(argv: list[str], num_processes: int, num_nodes: int) -> list[str] | None:
    """The command that starts every rank of this run; None inside a launched rank or for one process."""
    from asft.config import ConfigError

    if "LOCAL_RANK" in os.environ:
        return None
    if num_nodes <= 1:
        return data_parallel_command(argv, num_processes)
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise ConfigError(
            f"training.num_nodes is {num_nodes}: the run needs a Slurm job with {num_nodes} nodes "
            "(snakemake --profile slurm), and this job is not in one"
        )
    job = slurm_job_fields(job_id)
    return multi_node_command(
        argv, num_processes, num_nodes, job, first_node(job["NodeList"]), torch.cuda.is_available()
    )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def check_devices(num_processes: int, deepspeed: str | None = None) -> None:
    """Fail before loading anything when the ranks cannot run as configured.

    A GPU job needs a GPU per rank. CPU ranks are for tests and debugging: plain DDP with ACCELERATE_USE_CPU=true,
    DeepSpeed with DS_ACCELERATOR=cpu. accelerate ignores a DeepSpeed config when ACCELERATE_USE_CPU is set and
    would silently train plain DDP instead, so that combination is refused.
    """
    from asft.config import ConfigError

    if deepspeed and _env_flag("ACCELERATE_USE_CPU"):
        raise ConfigError(
            "training.deepspeed is set but ACCELERATE_USE_CPU=true makes accelerate ignore it (the ranks would run "
            "plain DDP); for DeepSpeed on CPU ranks set DS_ACCELERATOR=cpu instead"
        )
    if num_processes <= 1 or _env_flag("ACCELERATE_USE_CPU"):
        return
    if deepspeed and os.environ.get("DS_ACCELERATOR") == "cpu":
        return
    visible = torch.cuda.device_count()
    if visible < num_processes:
        raise ConfigError(
            f"training.num_processes is {num_processes} but this job sees {visible} GPU(s): the train job asks its "
            "scheduler for num_processes GPUs when the experiment's resources.device is cuda (Slurm, Run:ai; "
            "locally every job sees all GPUs), or, for CPU ranks, set ACCELERATE_USE_CPU=true (DDP) or "
            "DS_ACCELERATOR=cpu (DeepSpeed)"
        )


def configure_cpu_deepspeed(deepspeed: str | None) -> bool:
    """Set up DeepSpeed over gloo on CPU ranks (DS_ACCELERATOR=cpu, under torchrun); False when not asked for.

    accelerate starts DeepSpeed only on devices with their own collective backend: on CPU it would initialise the
    process group but count one process (wrong batch size, no gradient reduction). Configuring its state with
    the gloo backend first, for the Trainer to reuse (`accelerator_config.use_configured_state`), gives the real
    DeepSpeed engine on CPU ranks: what tests and GPU-less debugging of the ZeRO paths use.
    """
    if not deepspeed or os.environ.get("DS_ACCELERATOR") != "cpu" or "LOCAL_RANK" not in os.environ:
        return False
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what `accelerate launch` sets; PartialState reads it
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    return True


def prepare_reference_model(ref_model: torch.nn.Module | None, accelerator: Any, deepspeed: bool) -> Any:
    """The frozen reference of a full fine-tune, placed like the policy: a DeepSpeed inference engine (TRL's
    `prepare_deepspeed`, partitioned under ZeRO-3) or a copy on the rank's device."""
    if ref_model is None:
        return None
    if deepspeed:
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(ref_model, accelerator)
    return ref_model.to(accelerator.device)


def _partitioned(weight: torch.Tensor) -> bool:
    """A ZeRO-3 parameter: outside its module's forward only an empty placeholder.

    DeepSpeed's own test (`deepspeed.runtime.zero.utils.is_zero_param`), without importing DeepSpeed into runs
    that do not use it.
    """
    return hasattr(weight, "ds_id")


def gathered_head(weight: torch.Tensor | None) -> contextlib.AbstractContextManager:
    """The whole weight of a frozen LM head (the full fine-tune's reference) also when ZeRO-3 has partitioned it.

    The loss needs no gradient of the reference, so a read-only gather for the duration of the loss is enough.
    """
    if weight is None or not _partitioned(weight):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([weight], modifier_rank=None)


def loss_in_head_module(head: torch.nn.Module, compute: Callable[[], Any]) -> Any:
    """Run `compute` (the loss, which reads `head.weight`) as the LM-head module's forward.

    Under DeepSpeed ZeRO-3 the head is partitioned and only a module's own forward and backward see it whole:
    DeepSpeed's hooks gather it for the forward, gather it again when the backward reaches the module's output,
    and reduce-scatter the gradient that the chunked loss returns for it. A read-only gather would work for the
    forward but leave the trained head's gradient nowhere to go. Without ZeRO-3 the loss is simply computed.
    """
    if not _partitioned(head.weight):
        return compute()
    head.forward = compute  # instance attribute: Module.__call__ runs the hooks around it
    try:
        return head()
    finally:
        del head.forward
