"""Running the train stage on several ranks: device checks, the torchrun relaunch, and DeepSpeed specifics.

Import-light (torch only): `asft train` checks devices and relaunches itself before loading the training stack.
"""

from __future__ import annotations

import contextlib
import os
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
            f"training.num_processes is {num_processes} but this job sees {visible} GPU(s): give the train rule "
            f"{num_processes} GPUs (profile set-resources: train: gpu: {num_processes}), or, for CPU ranks, set "
            "ACCELERATE_USE_CPU=true (DDP) or DS_ACCELERATOR=cpu (DeepSpeed)"
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
