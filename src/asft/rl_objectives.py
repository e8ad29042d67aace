"""The GRPO and DAPO presets and a mode row's options over them: no torch, so the config checks read them too.

grpo: TRL loss_type "grpo" (each sequence's token mean, then the batch mean), symmetric clip ε 0.2, β = the row's
kl_weight with the GRPO paper's k3 estimator. dapo: the parts of the DAPO paper TRL 1.16 implements — token-level
loss, clip-higher (ε_high 0.28), truncated completions masked out, soft overlong punishment — and β = 0.
"""

from __future__ import annotations

from typing import Any

from asft.config_files import ConfigError

# The DAPO paper's soft overlong punishment: a 4096-token cache within a 20480-token maximum.
DAPO_OVERLONG_FRACTION = 4096 / 20480
# Defaults per objective; a mode row overrides any of these keys. overlong_buffer None: DAPO's fraction of
# max_completion_length; 0: off.
OBJECTIVES: dict[str, dict[str, Any]] = {
    "grpo": {
        "loss_type": "grpo",
        "epsilon": 0.2,
        "epsilon_high": 0.2,
        "mask_truncated_completions": False,
        "overlong_buffer": 0,
        "scale_rewards": "group",
        "kl_bias_correction": False,
    },
    "dapo": {
        "loss_type": "dapo",
        "epsilon": 0.2,
        "epsilon_high": 0.28,
        "mask_truncated_completions": True,
        "overlong_buffer": None,
        "scale_rewards": "group",
        "kl_bias_correction": False,
        "kl_weight": 0.0,
    },
}
SCALE_REWARDS = ("group", "batch", "none")


def objective_options(spec: dict) -> dict[str, Any]:
    """The run's objective settings: the preset of `spec["loss"]["objective"]` with the row's keys over it."""
    row = spec["loss"]
    objective = row.get("objective")
    if objective not in OBJECTIVES:
        raise ConfigError(f"loss.objective: {objective!r} is not an RL objective; expected one of {tuple(OBJECTIVES)}")
    options = {**OBJECTIVES[objective], "objective": objective}
    options.update({k: row[k] for k in (*OBJECTIVES[objective], "kl_weight") if row.get(k) is not None})
    options.setdefault("kl_weight", 0.0)
    max_completion = spec["training"]["rl"]["max_completion_length"]
    if options["overlong_buffer"] is None:
        options["overlong_buffer"] = max(1, round(max_completion * DAPO_OVERLONG_FRACTION))
    if not 0 <= options["overlong_buffer"] < max_completion:
        raise ConfigError(
            f"loss.overlong_buffer: {options['overlong_buffer']} must be in [0, max_completion_length {max_completion})"
        )
    if options["scale_rewards"] not in SCALE_REWARDS:
        raise ConfigError(f"loss.scale_rewards: {options['scale_rewards']!r}; expected one of {SCALE_REWARDS}")
    if options["kl_weight"] < 0 or options["epsilon"] <= 0 or options["epsilon_high"] <= 0:
        raise ConfigError("loss: kl_weight must be >= 0 and epsilon, epsilon_high > 0")
    return options
