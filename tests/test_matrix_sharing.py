"""Sweep axes, the SFT anchor axis, work shared between experiments, and the smoke scale, without Snakemake."""

from __future__ import annotations

import copy

import pytest
import torch

from asft import layout
from asft.config import ConfigError, iter_runs, load_config, read_config_file, train_spec, validate_config
from asft.losses import LossSpec, loss_from_logits
from asft.scale import CHOICE_STAND_IN, MATH_STAND_IN
from asft.sharing import SharedWork, train_key
from tests.conftest import REPO


def _with_experiment(config: dict, name: str, **changes) -> dict:
    config = copy.deepcopy(config)
    exp = copy.deepcopy(config["experiments"]["demo"])
    exp.pop("trace")  # the demo's trace of its ASFT run: the copy's modes need not include it
    exp.update(changes)
    config["experiments"][name] = exp
    return config


def test_a_training_sweep_is_a_matrix_axis_whose_values_enter_the_run_id(config: dict) -> None:
    config["experiments"]["demo"].update(modes=["sft", "asft"], sweep={"learning_rate": [1e-4, 5e-4]})
    filled = validate_config(config)
    runs = list(iter_runs(filled))
    ids = sorted(r.run_id for r in runs)
    assert ids == [
        "tiny/arith/asft-kl0.05_learning_rate0.0001/seed0",
        "tiny/arith/asft-kl0.05_learning_rate0.0005/seed0",
        "tiny/arith/sft_learning_rate0.0001/seed0",
        "tiny/arith/sft_learning_rate0.0005/seed0",
    ]
    by_id = {r.run_id: r for r in runs}
    spec = train_spec(filled, by_id["tiny/arith/sft_learning_rate0.0005/seed0"])
    assert spec["training"]["learning_rate"] == 5e-4
    assert filled["experiments"]["demo"]["training"]["learning_rate"] == 1e-3  # the experiment itself unchanged


def test_two_swept_keys_give_their_cross_product(config: dict) -> None:
    config["experiments"]["demo"].update(modes=["sft"], sweep={"learning_rate": [1e-4, 5e-4], "max_steps": [2, 4]})
    config["experiments"]["demo"].pop("trace")  # it traces asft
    labels = sorted(r.mode_label for r in iter_runs(validate_config(config)))
    assert labels == [
        "sft_learning_rate0.0001_max_steps2",
        "sft_learning_rate0.0001_max_steps4",
        "sft_learning_rate0.0005_max_steps2",
        "sft_learning_rate0.0005_max_steps4",
    ]


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        ({"learnig_rate": [1e-4]}, "experiments.demo.sweep.learnig_rate: not a training key"),
        ({"learning_rate": [-1.0]}, "experiments.demo.sweep.learning_rate[0]: -1.0 is less than or equal"),
        ({"finetune": ["full"]}, "experiments.demo.sweep"),
        ({"dtype": ["float8"]}, "experiments.demo.sweep.dtype[0]: 'float8' is not one of"),
    ],
)
def test_a_bad_sweep_is_refused_naming_the_key(config: dict, sweep: dict, expected: str) -> None:
    config["experiments"]["demo"]["sweep"] = sweep
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        validate_config(config)


def test_sft_anchor_sweep_applies_to_sft_anchored_modes_only(config: dict) -> None:
    config["modes"]["asft-sft"] = {"weighting": "dft", "sft_weight": 1.0}
    config["experiments"]["demo"].update(modes=["dft", "asft", "asft-sft"], sft_weights=[0.1, 10.0])
    labels = sorted(r.mode_label for r in iter_runs(validate_config(config)))
    assert labels == ["asft-kl0.05", "asft-sft-sft0.1", "asft-sft-sft10", "dft"]


def test_sft_weights_without_an_sft_anchored_mode_is_refused(config: dict) -> None:
    config["experiments"]["demo"]["sft_weights"] = [0.1]
    with pytest.raises(ConfigError, match=r"experiments\.demo\.sft_weights: set, but none"):
        validate_config(config)


def test_the_sft_anchor_is_dft_plus_alpha_times_sft() -> None:
    """L_DFT + α·L_SFT, computed independently from the two losses."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :2] = -100
    alpha = 0.7
    anchored, _ = loss_from_logits(logits, labels, LossSpec(weighting="dft", sft_weight=alpha))
    dft, _ = loss_from_logits(logits, labels, LossSpec(weighting="dft"))
    sft, _ = loss_from_logits(logits, labels, LossSpec(weighting="none"))
    torch.testing.assert_close(anchored, dft + alpha * sft, rtol=1e-12, atol=1e-12)
    assert not LossSpec(weighting="dft", sft_weight=alpha).needs_reference


def test_identical_runs_of_two_experiments_are_trained_once(config: dict) -> None:
    config = _with_experiment(config, "again", modes=["sft", "asft"])
    config["experiments"]["again"]["benchmarks"] = ["arith"]
    filled = validate_config(config)
    shared = SharedWork(filled)
    again = {r.mode: r for r in shared.runs("again")}
    assert shared.owner(again["sft"]).experiment == "demo"
    assert shared.train_dir(again["sft"]) == layout.train_dir("demo", again["sft"].run_id)
    assert len(shared.owned_runs()) == 7
    # the same evaluation is shared too, while each experiment keeps its own identity for its tables
    ev = [e for e in shared.evaluations("again") if e.identity["mode"] == "sft"][0]
    assert ev.metrics_dir == layout.eval_dir("demo", again["sft"].run_id, "arith")
    assert ev.identity["experiment"] == "again"


@pytest.mark.parametrize(
    "change",
    [
        lambda c: c["experiments"]["again"]["training"].update(learning_rate=2e-3),
        lambda c: c["experiments"]["again"].update(seeds=[1]),
        lambda c: c["datasets"]["arith"].update(max_samples=100),
        lambda c: c["experiments"]["again"]["evaluation"].update(dtype="bfloat16"),  # merged in another dtype
        lambda c: c["modes"].update(sft={"weighting": "none", "sft_weight": 0.5}),
    ],
)
def test_anything_that_changes_the_result_keeps_runs_apart(config: dict, change) -> None:
    same = validate_config(_with_experiment(config, "again", modes=["sft"]))
    key = train_key(same, SharedWork(same).runs("again")[0])
    changed = _with_experiment(config, "again", modes=["sft"])
    change(changed)
    filled = validate_config(changed)
    run = SharedWork(filled).runs("again")[0]
    assert train_key(filled, run) != key


def test_an_evaluation_with_other_settings_is_not_shared(config: dict) -> None:
    config = _with_experiment(config, "again", modes=["sft"])
    config["experiments"]["again"]["evaluation"]["sampling"] = {"preset": "greedy", "max_new_tokens": 10}
    shared = SharedWork(validate_config(config))
    ev = [e for e in shared.evaluations("again") if e.identity["mode"] == "sft"][0]
    assert ev.metrics_dir.startswith("results/again/")  # its own evaluation, of the shared training
    assert shared.owner(shared.runs("again")[0]).experiment == "demo"


def test_the_paper_config_plans_every_experiment() -> None:
    config = load_config(REPO / "config" / "paper.yaml")
    shared = SharedWork(config)
    expected = {
        "table1_math": 4,
        "table1_math_large": 8,
        "table1_medical": 4,
        "table4_lora": 1,
        "fig2": 12,
        "fig4_math": 14,
        "fig5_lr": 18,
        "fork": 6,
    }
    for experiment, runs in expected.items():
        assert len(shared.runs(experiment)) == runs, experiment
    # Figure 2's forward lambda 0.05 and Figure 5's lr 2e-5 points are Table 1's medical 10k runs
    fig2 = {r.mode_label: r for r in shared.runs("fig2")}
    assert shared.owner(fig2["asft-kl0.05"]).experiment == "table1_medical"
    fig5 = {r.mode_label: r for r in shared.runs("fig5_lr")}
    assert shared.owner(fig5["sft_learning_rate2e-05"]).experiment == "table1_medical"
    assert shared.owner(fig5["sft_learning_rate5e-05"]).experiment == "fig5_lr"


def test_smoke_scale_keeps_the_matrix_and_replaces_what_is_expensive() -> None:
    raw = read_config_file(REPO / "config" / "paper.yaml")
    full = validate_config(raw)
    smoke = validate_config({**raw, "scale": "smoke"})
    smoke_ids = {r.run_id for r in iter_runs(smoke)}
    assert smoke_ids <= {r.run_id for r in iter_runs(full)}
    # every experiment, mode and dataset is kept; a sweep axis keeps its two ends
    for name in full["experiments"]:
        assert {(r.model, r.dataset, r.mode) for r in iter_runs(smoke, name)} == {
            (r.model, r.dataset, r.mode) for r in iter_runs(full, name)
        }
    assert smoke["experiments"]["fig2"]["kl_weights"] == [0.001, 0.5]
    assert smoke["experiments"]["fig5_lr"]["sweep"] == {"learning_rate": [5e-6, 2e-4]}
    assert smoke["experiments"]["fork"]["evaluation"]["lora_direct"]
    assert all(m["source"] == {"demo": "model"} for m in smoke["models"].values())
    assert smoke["benchmarks"]["aime24"] == MATH_STAND_IN and smoke["benchmarks"]["medqa"] == CHOICE_STAND_IN
    assert smoke["datasets"]["medmcqa-30k"]["source"] == {"demo": "data/choice_train.jsonl"}
    assert smoke["datasets"]["numina-cot-10k"]["source"] == {"demo": "data/train.jsonl"}
    for exp in smoke["experiments"].values():
        assert exp["training"]["num_processes"] == 1 and exp["training"]["deepspeed"] is None
        assert exp["training"]["max_steps"] <= 2 and exp["evaluation"]["backend"] == "transformers"
    assert smoke["experiments"]["fig1"]["training"]["snapshot_steps"] == [1]
    # stand-ins that coincide are shared: the five math benchmarks of a run are one evaluation
    shared = SharedWork(smoke)
    dirs = {e.metrics_dir for e in shared.evaluations("table1_math") if e.identity["mode"] == "sft"}
    assert len(dirs) == 1


def test_a_catalogue_config_without_an_experiment_a_target_reads_is_refused() -> None:
    raw = read_config_file(REPO / "config" / "paper.yaml")
    del raw["experiments"]["fig2"]
    with pytest.raises(ConfigError, match=r"experiments\.fig2: missing \(read by fig2\)"):
        validate_config(raw)


def test_planning_estimates_change_no_job(config: dict) -> None:
    """parameters_b, examples, ... are read by `asft plan` only: correcting one reruns nothing."""
    before = validate_config(config)
    config["datasets"]["arith"].update(examples=512, mean_tokens=80)
    config["models"]["tiny"]["parameters_b"] = 0.0005
    after = validate_config(config)
    run = next(iter_runs(after))
    assert train_spec(after, run) == train_spec(before, run)
    assert train_key(after, run) == train_key(before, run)
