"""The smoke scale: the same DAG as a config, on embedded stand-ins, in minutes on a laptop.

`scale: smoke` keeps every experiment, mode, snapshot and benchmark of the config, so every table row and every
figure panel is still produced, but replaces what makes it expensive: each model becomes the demo's tiny model,
each dataset the demo's arithmetic or multiple-choice training set (by the domain of the benchmarks it is
evaluated on), each benchmark the matching demo benchmark, each run a few optimizer steps on one CPU process, and
each sweep axis (kl_weights, sft_weights, sweep values) its two ends, and a LoRA run is evaluated with its
adapter applied rather than merged first. Stand-ins that coincide
are shared (asft.sharing): the math benchmarks all become one file, so a run is evaluated once for all five
columns. The numbers mean nothing; that the pipeline runs end to end and renders every output does.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from asft.evaluation.benchmarks import CHOICE_FORMATS
from asft.matrix import CODE_FORMATS, JUDGED_FORMATS

SMOKE_STEPS = 2
SMOKE_SNAPSHOT_STEPS = [1]
SMOKE_DEMO = {"seed": 0, "n_train": 256, "n_test": 32, "n_pretrain": 2000, "pretrain_steps": 200}
MATH_STAND_IN = {"format": "math500", "source": {"demo": "benchmarks/arith.jsonl"}}
CHOICE_STAND_IN = {"format": "medmcqa", "source": {"demo": "benchmarks/choice.jsonl"}}
CODE_STAND_IN = {"source": {"demo": "benchmarks/code.jsonl"}}  # in the benchmark's own (base or plus) format
JUDGED_STAND_IN = {"format": "alpaca_eval", "source": {"demo": "benchmarks/alpaca_eval.json"}}

# training keys whose paper values need GPUs or a cluster
_SMOKE_TRAINING = {
    "num_processes": 1,
    "num_nodes": 1,
    "deepspeed": None,
    "dtype": "float32",
    "gradient_checkpointing": False,
    "max_length": 160,
    "max_steps": SMOKE_STEPS,
    "logging_steps": 1,
    "kl_log_every": 1,
    "save_steps": 2,
    "report_to": ["none"],
}
_SMOKE_EVALUATION = {
    "backend": "transformers",
    "batch_size": 64,
    "max_problems": 8,
    "grading_workers": 1,
    "bootstrap_samples": 100,
}


def is_choice_benchmark(entry: Mapping[str, Any]) -> bool:
    return entry["format"] in CHOICE_FORMATS


def _choice_datasets(config: Mapping[str, Any]) -> set[str]:
    """Datasets trained on by an experiment evaluated only on multiple choice (the paper's medical data)."""
    choice = set()
    for exp in config["experiments"].values():
        if all(is_choice_benchmark(config["benchmarks"][b]) for b in exp["benchmarks"]):
            choice.update(exp["datasets"])
    return choice


def _stand_in(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The demo benchmark standing in for one of the config's, graded the same way."""
    if entry["format"] in CODE_FORMATS:
        # humaneval(_plus) reads evalplus's layout, which the stand-in has; mbpp(_plus) differ only in the prompt
        return {**copy.deepcopy(CODE_STAND_IN), "format": entry["format"].replace("mbpp", "humaneval")}
    if entry["format"] in JUDGED_FORMATS:
        return copy.deepcopy(JUDGED_STAND_IN)
    return copy.deepcopy(CHOICE_STAND_IN if is_choice_benchmark(entry) else MATH_STAND_IN)


def thin_axis(values: list) -> list:
    """A sweep axis's two ends: the line is still drawn, from two runs."""
    return list(values) if len(values) <= 2 else [values[0], values[-1]]


# online RL at smoke scale: two completions of a few tokens per prompt, one prompt pair per step, no vLLM
_SMOKE_RL = {"num_generations": 2, "max_completion_length": 12, "use_vllm": False}


def _smoke_training(training: Mapping[str, Any], rl: bool) -> dict[str, Any]:
    smoke = {**training, **_SMOKE_TRAINING}
    smoke["per_device_train_batch_size"] = min(training["per_device_train_batch_size"], 4)
    smoke["rl"] = {**training["rl"], **_SMOKE_RL}
    if rl:  # a rollout per micro-batch of the global batch would be hundreds of CPU generations per step
        smoke["global_batch_size"] = None
        smoke["gradient_accumulation_steps"] = 1
    if training.get("snapshot_steps"):
        smoke["snapshot_steps"] = list(SMOKE_SNAPSHOT_STEPS)
    return smoke


def _smoke_evaluation(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    smoke = {**evaluation, **_SMOKE_EVALUATION}
    sampling = dict(evaluation.get("sampling") or {})
    sampling["max_new_tokens"] = 24
    if sampling.get("preset") == "paper" or sampling.get("n", 1) > 1:
        sampling["n"] = 2  # still several samples per problem, so avg@n and its CI are exercised
    smoke["sampling"] = sampling
    return smoke


def apply_scale(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config at its `scale` (a validated config, defaults filled); `full` returns a copy unchanged."""
    scaled = copy.deepcopy(dict(config))
    if scaled.get("scale", "full") != "smoke":
        return scaled
    choice = _choice_datasets(scaled)
    scaled["demo"] = dict(SMOKE_DEMO)
    scaled["source_lock"] = None
    scaled["models"] = {name: {**entry, "source": {"demo": "model"}} for name, entry in scaled["models"].items()}
    scaled["datasets"] = {
        name: {
            "source": {"demo": "data/choice_train.jsonl" if name in choice else "data/train.jsonl"},
            "fields": {},
            "max_samples": None,
            "shuffle_seed": 42,
            **({"format": "instruction_response"} if "format" in entry else {}),
        }
        for name, entry in scaled["datasets"].items()
    }
    scaled["benchmarks"] = {name: _stand_in(entry) for name, entry in scaled["benchmarks"].items()}
    for exp in scaled["experiments"].values():
        for axis in ("kl_weights", "sft_weights"):
            if axis in exp:
                exp[axis] = thin_axis(exp[axis])
        if exp.get("sweep"):
            exp["sweep"] = {key: thin_axis(values) for key, values in exp["sweep"].items()}
        exp["resources"] = {**exp.get("resources", {}), "device": "cpu"}  # stand-ins on CPU, also on a cluster
        rl = any(scaled["modes"][mode].get("objective", "sft") != "sft" for mode in exp["modes"])
        exp["training"] = _smoke_training(exp["training"], rl)
        exp["evaluation"] = _smoke_evaluation(exp["evaluation"])
        if "trace" in exp:  # the same trace, a few tokens of one batch
            exp["trace"] = {**exp["trace"], "batches": 1, "tokens_per_batch": 8, "dim": 64}
        # the merge stage is exercised by the demo's workflow tests; here it would only add jobs
        exp["evaluation"]["lora_direct"] = exp["training"]["finetune"] == "lora"
    return scaled
