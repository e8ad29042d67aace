"""Work shared between experiments: a run or an evaluation that two experiments define identically is done once.

The paper's tables and figures overlap: Table 4, Table 5's LLaMA-2-7B rows and the reference lines of Figures 2
and 5 are Table 1's medical 10k runs, and a sweep's default point is the run it sweeps around. Each piece of work
is keyed by everything that determines its result (and nothing else: no experiment or mode name), and every
experiment that defines it reads the output of the first one, in config order, that does. Renaming an experiment
earlier in the config can therefore move where a shared result lives, never what it is.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from asft import layout
from asft.matrix import (
    Run,
    base_identity,
    canonical_json,
    eval_spec,
    find_run,
    iter_runs,
    merge_spec,
    run_identity,
    train_spec,
    without_planning,
)


def train_key(config: Mapping[str, Any], run: Run) -> str:
    """Everything a run's trained (and, for LoRA, merged) weights depend on."""
    spec = train_spec(config, run)
    del spec["run_id"], spec["mode"]
    exp = config["experiments"][run.experiment]
    return canonical_json(
        {
            "spec": spec,
            "model": config["models"][run.model]["source"],
            "data": without_planning(config["datasets"][run.dataset]),
            "demo": config.get("demo"),
            # how a LoRA run is merged (or applied directly) is part of what its evaluations read
            "merge": merge_spec(config, run.experiment) if exp["training"]["finetune"] == "lora" else None,
            "lora_direct": exp["evaluation"]["lora_direct"],
            # a continual run trains from its parent's final weights: everything they depend on, merge included
            **({"parent": train_key(config, find_run(config, *run.init_from.split("/", 1)))} if run.init_from else {}),
        }
    )


def table_identity(config: Mapping[str, Any], experiment: str, run: Run | None, model: str) -> dict[str, Any]:
    """What a results table needs to place one evaluated model: the run's identity and the settings that label
    it (anchor direction, sweep, fine-tuning kind, loss scale); the base model has mode `base`."""
    exp = config["experiments"][experiment]
    training = exp["training"]
    common = {"scale": config.get("scale", "full"), "finetune": training["finetune"]}
    if run is None:
        return {**base_identity(experiment, model), "mode": "base", **common}
    sweep = dict(run.sweep)
    key = next(iter(sweep), None)
    return {
        **run_identity(run),
        **common,
        "kl_direction": config["modes"][run.mode].get("kl_direction", "forward"),
        "sweep_key": key,
        "sweep_value": sweep.get(key),
        "lora_r": training["lora"].get("r") if training["finetune"] == "lora" else None,
        "loss_scaling": sweep.get("loss_scaling", training.get("loss_scaling")),
    }


def _eval_key(config: Mapping[str, Any], experiment: str, benchmark: str, model_key: str) -> str:
    spec = eval_spec(config, experiment, benchmark)
    del spec["benchmark"]
    entry = without_planning(config["benchmarks"][benchmark])
    return canonical_json({"model": model_key, "spec": spec, "benchmark": entry, "demo": config.get("demo")})


@dataclass(frozen=True)
class Evaluation:
    """One (run or base model, benchmark[, snapshot step]) of an experiment and where its result lives.

    identity: the experiment's own view of what was evaluated (for tables); metrics_dir: the shared output.
    """

    experiment: str
    benchmark: str
    identity: dict[str, Any]
    metrics_dir: str
    step: int | None = None

    @property
    def record(self) -> dict[str, Any]:
        return {**self.identity, "benchmark": self.benchmark, "step": self.step}


class SharedWork:
    """The canonical owner of every run and evaluation of a config (built once per workflow start)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config
        self._runs: dict[tuple[str, str], Run] = {}
        self._owner_of_run: dict[tuple[str, str], Run] = {}
        first_by_key: dict[str, Run] = {}
        self._train_keys: dict[tuple[str, str], str] = {}
        for run in iter_runs(config):
            key = train_key(config, run)
            self._runs[(run.experiment, run.run_id)] = run
            self._train_keys[(run.experiment, run.run_id)] = key
            self._owner_of_run[(run.experiment, run.run_id)] = first_by_key.setdefault(key, run)
        self._eval_dirs: dict[str, str] = {}
        # in config order, so the first experiment to define an evaluation owns it
        self._evaluations = {name: list(self._iter_evaluations(name)) for name in config["experiments"]}

    # --- runs ---

    def owner(self, run: Run) -> Run:
        """The run whose training output `run` reads (itself unless an earlier identical run exists)."""
        return self._owner_of_run[(run.experiment, run.run_id)]

    def owned_runs(self) -> list[Run]:
        """The runs that are actually trained."""
        return [run for run in self._runs.values() if self.owner(run) == run]

    def train_dir(self, run: Run) -> str:
        owner = self.owner(run)
        return layout.train_dir(owner.experiment, owner.run_id)

    def final_weights(self, run: Run) -> str:
        """The run's trained model as full weights: merged for a LoRA run (whether or not its own evaluation
        merges), the training output for a full fine-tune."""
        owner = self.owner(run)
        if self.config["experiments"][owner.experiment]["training"]["finetune"] == "lora":
            return layout.merged_dir(owner.experiment, owner.run_id)
        return layout.train_dir(owner.experiment, owner.run_id)

    def start_weights(self, run: Run) -> str:
        """What the run trains from, and what its LoRA adapter applies to: the base model, or for a continual run
        (init_from) its parent's final weights, so that the parent is a dependency of the run's job."""
        if not run.init_from:
            return layout.model_dir(run.model)
        experiment, run_id = run.init_from.split("/", 1)
        return self.final_weights(self._runs[(experiment, run_id)])

    # --- evaluations ---

    def _shared_dir(self, key: str, own_dir: str) -> str:
        return self._eval_dirs.setdefault(key, own_dir)

    def evaluations(self, experiment: str) -> list[Evaluation]:
        """The experiment's evaluations: every run and snapshot on every benchmark, then the base models."""
        return self._evaluations[experiment]

    def _iter_evaluations(self, experiment: str) -> Iterator[Evaluation]:
        exp = self.config["experiments"][experiment]
        for run in self.runs(experiment):
            model_key = self._train_keys[(run.experiment, run.run_id)]
            for bench in exp["benchmarks"]:
                own = layout.eval_dir(experiment, run.run_id, bench)
                shared = self._shared_dir(_eval_key(self.config, experiment, bench, model_key), own)
                yield Evaluation(experiment, bench, table_identity(self.config, experiment, run, run.model), shared)
            for step in self.config["experiments"][experiment]["training"].get("snapshot_steps") or []:
                for bench in exp["benchmarks"]:
                    own = layout.snapshot_eval_dir(experiment, run.run_id, step, bench)
                    key = _eval_key(self.config, experiment, bench, f"{model_key}@{step}")
                    shared = self._shared_dir(key, own)
                    identity = table_identity(self.config, experiment, run, run.model)
                    yield Evaluation(experiment, bench, identity, shared, step)
        if exp["evaluate_base"]:
            for model in exp["models"]:
                model_key = canonical_json({"base": self.config["models"][model]["source"]})
                for bench in exp["benchmarks"]:
                    own = layout.base_eval_dir(experiment, model, bench)
                    shared = self._shared_dir(_eval_key(self.config, experiment, bench, model_key), own)
                    yield Evaluation(experiment, bench, table_identity(self.config, experiment, None, model), shared)

    def owned_evaluation_dirs(self) -> list[str]:
        """Every evaluation output folder that some job writes, once each."""
        return list(dict.fromkeys(self._eval_dirs.values()))

    def runs(self, experiment: str) -> list[Run]:
        return [run for (name, _), run in self._runs.items() if name == experiment]
