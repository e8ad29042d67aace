"""Continual training (`init_from`) and RL mode rows in the run matrix: a run starting from another run's result
is labelled after its parent, depends on it in the DAG and in its spec, and a bad reference is refused by key."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from asft import layout
from asft.config import iter_runs, train_spec, validate_config
from asft.config_files import ConfigError
from asft.sharing import SharedWork
from tests.conftest import REPO
from tests.test_workflow import copy_workflow, snakemake_env

PARENT = "demo/tiny/arith/sft/seed0"


def _config() -> dict:
    """config/test.yaml with a DAPO mode and an experiment continuing each of its two runs with it."""
    config = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    config["modes"]["grpo"] = {"objective": "grpo", "kl_weight": 0.04}
    config["modes"]["dapo"] = {"objective": "dapo"}
    rl = copy.deepcopy(config["experiments"]["demo"])
    rl["modes"] = ["dapo"]
    rl.pop("trace")  # the demo's trace of its ASFT run
    rl["init_from"] = [PARENT, "demo/tiny/arith/asft-kl0.05/seed0"]
    rl["evaluate_base"] = False
    rl["training"]["rl"] = {"reward": "math", "num_generations": 4, "max_completion_length": 8}
    config["experiments"]["continual"] = rl
    return config


def test_a_continual_run_is_labelled_after_its_parent_and_its_spec_holds_the_parents() -> None:
    config = validate_config(_config())
    runs = {run.run_id: run for run in iter_runs(config, "continual")}
    assert sorted(runs) == ["tiny/arith/asft-kl0.05+dapo/seed0", "tiny/arith/sft+dapo/seed0"]
    child = runs["tiny/arith/sft+dapo/seed0"]
    parent = next(r for r in iter_runs(config, "demo") if r.run_id == "tiny/arith/sft/seed0")
    spec = train_spec(config, child)
    assert spec["init_from"] == train_spec(config, parent)
    assert spec["loss"] == {"objective": "dapo", "kl_weight": 0.0}
    assert spec["training"]["rl"]["num_generations"] == 4
    # the parent's own spec is untouched by the RL keys and rows: no objective, no rl block
    assert "objective" not in train_spec(config, parent)["loss"]
    assert "rl" not in train_spec(config, parent)["training"]


def test_a_parent_change_changes_the_childs_spec_but_not_its_siblings() -> None:
    """Snakemake reruns a job whose params changed: a parent's new learning rate must reach its child's spec."""
    base = validate_config(_config())
    changed_raw = _config()
    changed_raw["modes"]["sft"] = {"weighting": "none", "alpha": 1.0}  # alpha: read by ref_ratio only -> same run
    changed_raw["experiments"]["demo"]["training"]["learning_rate"] = 5e-4
    changed = validate_config(changed_raw)
    for run in iter_runs(base, "continual"):
        other = next(r for r in iter_runs(changed, "continual") if r.run_id == run.run_id)
        assert train_spec(base, run)["init_from"] != train_spec(changed, other)["init_from"]


def test_the_child_trains_from_the_parents_merged_weights() -> None:
    """A LoRA parent is merged for its child (even when its own evaluation applies the adapter directly); the
    child's own LoRA adapter is merged into, and evaluated on, those weights."""
    config = validate_config(_config())
    shared = SharedWork(config)
    child = next(r for r in iter_runs(config, "continual") if r.init_label == "sft")
    assert shared.start_weights(child) == layout.merged_dir("demo", "tiny/arith/sft/seed0")
    parent = next(r for r in iter_runs(config, "demo") if r.mode == "sft")
    assert shared.start_weights(parent) == layout.model_dir("tiny")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c["experiments"]["continual"].update(init_from=["nope/tiny/arith/sft/seed0"]),
            "names no experiment",
        ),
        (lambda c: c["experiments"]["continual"].update(init_from=["demo/tiny/arith/dft/seed0"]), "has no run"),
        (lambda c: c["experiments"]["continual"].update(models=["other"]), "does not list"),
        (
            lambda c: c["experiments"]["demo"].update(init_from=["continual/tiny/arith/sft+dapo/seed0"]),
            "cannot start from their own results",
        ),
        (lambda c: c["experiments"]["continual"]["training"].update(reference="cached"), "init_from"),
        (lambda c: c["experiments"]["continual"]["training"]["rl"].update(reward=None), "rl.reward: required"),
        (lambda c: c["experiments"]["continual"]["training"]["rl"].update(num_generations=3), "must divide"),
        (lambda c: c["modes"]["sft"].update(epsilon_high=0.28), "modes.sft.epsilon_high"),
        (lambda c: c["modes"].update(bad={"objective": "sft"}), "'weighting' is a required property"),
        (  # two parents with one mode label (here: two seeds) would give their children one run id
            lambda c: (
                c["experiments"]["demo"].update(seeds=[0, 1])
                or c["experiments"]["continual"].update(init_from=[PARENT, "demo/tiny/arith/sft/seed1"])
            ),
            "the same run id 'tiny/arith/sft+dapo/seed0'",
        ),
        (lambda c: c["modes"]["dapo"].update(overlong_buffer=8), "modes.dapo in experiments.continual"),
    ],
)
def test_bad_continual_and_rl_settings_are_refused_by_key(edit, message: str) -> None:
    config = _config()
    config["models"]["other"] = {"source": {"demo": "model"}}
    edit(config)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(config)


def test_dry_run_puts_the_parent_before_its_child(tmp_path: Path) -> None:
    """`snakemake -n -p` for the child's evaluation plans the parent's training and merge, and the child's train
    job reads the parent's merged weights."""
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "config" / "continual.yaml").write_text(yaml.safe_dump(_config()))
    target = f"{layout.eval_dir('continual', 'tiny/arith/sft+dapo/seed0', 'arith')}/{layout.METRICS}"
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", target, "--configfile", "config/continual.yaml"],
        cwd=workdir,
        env=snakemake_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    merged = layout.merged_dir("demo", "tiny/arith/sft/seed0")
    child_train = layout.train_dir("continual", "tiny/arith/sft+dapo/seed0")
    commands = [
        line.partition("Shell command: ")[2] for line in result.stdout.splitlines() if "Shell command: " in line
    ]
    parent_merge = next(i for i, c in enumerate(commands) if c.startswith("asft merge") and merged in c)
    child = next(i for i, c in enumerate(commands) if c.startswith("asft train") and child_train in c)
    assert parent_merge < child and f"--model {merged} " in commands[child]
    assert "asft-kl0.05+dapo" not in result.stdout  # only what the target needs
