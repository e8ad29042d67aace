"""Config schema errors and the run matrix, without Snakemake."""

from __future__ import annotations

import pytest

from asft.config import (
    ConfigError,
    eval_spec,
    iter_runs,
    mode_label,
    resolve_sampling,
    train_spec,
    validate_config,
)


def test_demo_config_is_valid_and_filled(config: dict) -> None:
    filled = validate_config(config)
    training = filled["experiments"]["demo"]["training"]
    assert training["loss_scaling"] == "token"  # a default the file does not set
    assert filled["modes"]["sft"]["kl_weight"] == 0.0
    assert filled["modes"]["sft-topk"]["keep_ratio"] == 0.7
    assert "loss_scaling" not in config["experiments"]["demo"]["training"]  # the input is not mutated


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda c: c["experiments"]["demo"]["modes"].append("asfft"),
            "experiments.demo.modes[7]: unknown mode 'asfft'",
        ),
        (lambda c: c["modes"]["asft"].update(kl_wieght=0.1), "modes.asft: Additional properties"),
        (
            lambda c: c["modes"]["asft"].update(kl_weight=-0.1),
            "modes.asft.kl_weight: -0.1 is less than the minimum",
        ),
        (
            lambda c: c["experiments"]["demo"]["models"].append("llama"),
            "experiments.demo.models[1]: unknown model",
        ),
        (lambda c: c["modes"]["sft"].update(weighting="focal"), "modes.sft.weighting: 'focal' is not one of"),
        (
            lambda c: c["experiments"]["demo"]["training"].update(learning_rat=1e-4),
            "experiments.demo.training",
        ),
        (
            lambda c: c["models"]["tiny"].update(source={"hub": "Qwen/Qwen2.5-7B"}),
            "models.tiny.source: a source",
        ),
        (
            lambda c: c["models"].update(other=c["models"].pop("tiny")),
            "experiments.demo.models[0]: unknown model 'tiny'",
        ),
        (lambda c: c["benchmarks"]["arith"].update(format="math501"), "benchmarks.arith.format"),
        (
            lambda c: c["benchmarks"]["arith"].update(source=[{"path": "a.jsonl"}, {"hub": "x/y"}]),
            "benchmarks.arith.source[1]: a source needs exactly one of",
        ),
        (
            lambda c: c["benchmarks"]["arith"].update(source=[{"path": "a.jsonl", "revison": "abc"}]),
            "benchmarks.arith.source[0]: Additional properties",
        ),
        (
            lambda c: c["experiments"]["demo"].update(modes=["sft"], kl_weights=[0.1]),
            "none of the experiment's",
        ),
    ],
)
def test_schema_errors_name_the_key(config: dict, mutate, expected: str) -> None:
    mutate(config)
    with pytest.raises(ConfigError) as info:
        validate_config(config, source="config/config.yaml")
    assert "config/config.yaml" in str(info.value)
    assert expected in str(info.value)


def test_run_ids_are_readable_and_stable(config: dict) -> None:
    runs = list(iter_runs(validate_config(config)))
    assert [r.mode_label for r in runs] == [
        "sft",
        "dft",
        "sft+kl-kl0.05",
        "asft-kl0.05",
        "sft-topk",
        "sft-antiop",
        "sft-lr",
    ]
    assert runs[3].run_dir == "results/demo/runs/tiny/arith/asft-kl0.05/seed0"
    assert mode_label("asft", 0.1) == "asft-kl0.1"


def test_kl_sweep_applies_only_to_anchored_modes(config: dict) -> None:
    config["experiments"]["demo"].update(kl_weights=[0.01, 0.1], seeds=[1, 2])
    runs = list(iter_runs(validate_config(config)))
    labels = sorted({r.mode_label for r in runs})
    assert "asft-kl0.01" in labels and "asft-kl0.1" in labels and "asft-kl0.05" not in labels
    assert "sft" in labels and not any(label.startswith("sft-kl") for label in labels)
    assert len(runs) == (5 + 2 * 2) * 2


def test_train_spec_has_no_evaluation_settings(config: dict) -> None:
    filled = validate_config(config)
    run = next(r for r in iter_runs(filled) if r.mode == "asft")
    spec = train_spec(filled, run)
    assert spec["loss"] == {
        "weighting": "dft",
        "kl_weight": 0.05,
        "kl_direction": "forward",
        "keep_ratio": 0.7,
        "clip_mult": 3.0,
        "alpha": 1.0,
    }
    assert "benchmarks" not in str(spec) and "sampling" not in str(spec)


def test_sampling_presets_and_overrides(config: dict) -> None:
    assert resolve_sampling({"preset": "paper"})["n"] == 16
    assert resolve_sampling({"preset": "paper"}, {"n": 4})["n"] == 4
    assert resolve_sampling(None, {"max_new_tokens": 7}) | {} == {
        "preset": "greedy",
        "n": 1,
        "temperature": 0.0,
        "top_p": 1.0,
        "max_new_tokens": 7,
        "seed": 0,
    }
    config["benchmarks"]["arith"]["sampling"] = {"preset": "paper", "max_new_tokens": 64}
    spec = eval_spec(validate_config(config), "demo", "arith")
    assert spec["sampling"]["n"] == 16 and spec["sampling"]["max_new_tokens"] == 64
    assert spec["template"] == "alpaca"  # defaults to the training template


def test_deepspeed_file_is_checked(config: dict, tmp_path) -> None:
    training = config["experiments"]["demo"]["training"]
    training["deepspeed"] = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="experiments.demo.training.deepspeed: cannot read"):
        validate_config(config)
    broken = tmp_path / "zero3.json"
    broken.write_text('{"zero_optimization": {"stage": 3}')
    training["deepspeed"] = str(broken)
    with pytest.raises(ConfigError, match="experiments.demo.training.deepspeed: cannot read .*zero3.json"):
        validate_config(config)
    broken.write_text('{"zero_optimization": {"stage": 3}}')
    for finetune in ("lora", "full"):  # ZeRO-3 full fine-tuning is supported (tested with the real engine)
        training["finetune"] = finetune
        validate_config(config)


def test_lora_direct_needs_a_lora_experiment(config: dict) -> None:
    config["experiments"]["demo"]["evaluation"]["lora_direct"] = True
    validate_config(config)
    config["experiments"]["demo"]["training"]["finetune"] = "full"
    with pytest.raises(ConfigError, match="experiments.demo.evaluation.lora_direct: needs training.finetune: lora"):
        validate_config(config)


def test_optimizer_names_are_checked_before_any_job(config: dict) -> None:
    config["experiments"]["demo"]["training"]["optim"] = "sgd"
    validate_config(config)
    config["experiments"]["demo"]["training"]["optim"] = "adamw_torhc"
    with pytest.raises(ConfigError, match="experiments.demo.training.optim: 'adamw_torhc' is not one of"):
        validate_config(config)


def test_shipped_configs_are_valid() -> None:
    from asft.config import load_config
    from tests.conftest import REPO

    for path in sorted((REPO / "config").glob("*.yaml")):
        assert list(iter_runs(load_config(path))), path
