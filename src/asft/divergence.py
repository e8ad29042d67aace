"""A diverged run must fail, not finish: the check made after every optimizer step.

Kept free of torch imports so the CLI can name the error without loading the training stack.
"""

from __future__ import annotations

import math
from typing import Any


class TrainingDivergedError(RuntimeError):
    """A non-finite loss or gradient norm: the run stops before the bad step is logged or checkpointed."""


def check_finite_step(step: int, loss: Any, loss_finite: Any, grad_norm: Any) -> None:
    """Raise TrainingDivergedError naming the step when its loss or gradient norm is NaN or infinite.

    A diverged run otherwise looks finished: Trainer hides non-finite losses in its running average and the
    optimizer writes NaN into every weight.
    """
    loss_ok = loss_finite is None or bool(loss_finite)
    norm = None if grad_norm is None else float(grad_norm)
    if loss_ok and (norm is None or math.isfinite(norm)):
        return
    loss_text = "n/a" if loss is None else f"{float(loss):g}"
    raise TrainingDivergedError(
        f"training diverged at step {step}: loss {loss_text}, gradient norm {norm if norm is not None else 'n/a'}; "
        "the run is stopped before this step is logged or checkpointed (lower training.learning_rate, or check "
        "the data and training.dtype)"
    )
