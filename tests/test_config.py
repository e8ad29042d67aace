"""Config schema errors and the run matrix, without Snakemake."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from asft import layout
from asft.config import (
    ConfigError,
    eval_spec,
    find_run,
    iter_runs,
    load_config,
    merge_spec,
    mode_label,
    resolve_sampling,
    run_by_id,
    runs_by_id,
    train_spec,
    validate_config,
)
from tests.conftest import REPO


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
        # numpy (transformers' set_seed) refuses seeds >= 2**32, once the train or evaluation job has started
        (
            lambda c: c["experiments"]["demo"].update(seeds=[0, 2**32]),
            "experiments.demo.seeds[1]: 4294967296 is greater than the maximum of 4294967295",
        ),
        (lambda c: c["demo"].update(seed=2**32), "demo.seed: 4294967296 is greater than the maximum"),
        (
            lambda c: c["experiments"]["demo"]["evaluation"]["sampling"].update(seed=2**32),
            "experiments.demo.evaluation.sampling.seed: 4294967296 is greater than the maximum",
        ),
        (
            lambda c: c["benchmarks"]["arith"].update(sampling={"seed": 2**32}),
            "benchmarks.arith.sampling.seed: 4294967296 is greater than the maximum",
        ),
        # each entry type has exactly one demo artefact
        (
            lambda c: c["models"]["tiny"].update(source={"demo": "data/train.jsonl"}),
            "models.tiny.source.demo: 'data/train.jsonl' is not one of ['model']",
        ),
        (
            lambda c: c["datasets"]["arith"].update(source={"demo": "benchmarks/arith.jsonl"}),
            "datasets.arith.source.demo: 'benchmarks/arith.jsonl' is not one of "
            "['data/train.jsonl', 'data/choice_train.jsonl']",
        ),
        (
            lambda c: c["benchmarks"]["arith"].update(source={"demo": "model"}),
            "benchmarks.arith.source.demo: 'model' is not one of "
            "['benchmarks/arith.jsonl', 'benchmarks/choice.jsonl', 'benchmarks/code.jsonl', "
            "'benchmarks/alpaca_eval.json']",
        ),
        (
            lambda c: c["benchmarks"]["arith"].update(source=[{"demo": "benchmarks/arith.jsonl"}, {"demo": "model"}]),
            "benchmarks.arith.source[1].demo: 'model' is not one of "
            "['benchmarks/arith.jsonl', 'benchmarks/choice.jsonl', 'benchmarks/code.jsonl', "
            "'benchmarks/alpaca_eval.json']",
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


def test_layout_templates_are_the_concrete_paths_with_wildcards(config: dict) -> None:
    """The rules' patterns and the paths `rule all` requests come from one definition; existing results stay valid
    only while these strings do."""
    assert layout.RUN_WILDCARDS == "results/{experiment}/runs/{model}/{dataset}/{mode_label}/seed{seed}"
    run = list(iter_runs(validate_config(config)))[3]
    wildcards = {
        "experiment": run.experiment,
        "model": run.model,
        "dataset": run.dataset,
        "mode_label": run.mode_label,
        "seed": run.seed,
        "benchmark": "arith",
    }
    exp, rid = run.experiment, run.run_id
    assert layout.RUN_WILDCARDS.format(**wildcards) == layout.run_dir(exp, rid) == run.run_dir
    assert layout.TRAIN_WILDCARDS.format(**wildcards) == layout.train_dir(exp, rid) == f"{run.run_dir}/train"
    assert layout.MERGED_WILDCARDS.format(**wildcards) == layout.merged_dir(exp, rid) == f"{run.run_dir}/merged"
    assert layout.EVAL_WILDCARDS.format(**wildcards) == layout.eval_dir(exp, rid, "arith")
    assert layout.eval_dir(exp, rid, "arith") == f"{run.run_dir}/eval/arith"
    assert layout.checkpoints_dir(exp, rid) == f"{run.run_dir}/checkpoints"
    assert layout.BASE_EVAL_WILDCARDS.format(**wildcards) == "results/demo/base/tiny/eval/arith"
    assert layout.TABLES_WILDCARDS.format(**wildcards) == layout.tables_dir(exp) == "results/demo/tables"
    assert layout.PLOTS_WILDCARDS.format(**wildcards) == layout.plots_dir(exp) == "results/demo/plots"
    assert layout.TRAIN_LOG_WILDCARDS.format(**wildcards) == "logs/demo/train/tiny/arith/asft-kl0.05/seed0.log"
    assert layout.EVAL_LOG_WILDCARDS.format(**wildcards) == "logs/demo/evaluate/tiny/arith/asft-kl0.05/seed0/arith.log"


def test_runs_are_found_by_id(config: dict) -> None:
    config["experiments"]["other"] = copy.deepcopy(config["experiments"]["demo"])
    filled = validate_config(config)
    runs = runs_by_id(filled)
    assert list(runs.values()) == list(iter_runs(filled))
    for run in iter_runs(filled):
        assert run_by_id(runs, run.experiment, run.run_id) is runs[(run.experiment, run.run_id)]
        assert find_run(filled, run.experiment, run.run_id) == run
    with pytest.raises(ConfigError, match="experiments.demo: no run with id 'tiny/arith/asft/seed0'"):
        run_by_id(runs, "demo", "tiny/arith/asft/seed0")  # an anchored mode's id carries its KL weight


def test_merge_uses_the_evaluation_dtype_and_the_training_remote_code_setting(config: dict) -> None:
    """A model that needed remote code to train needs it to merge; the merged weights exist to be evaluated."""
    assert merge_spec(validate_config(config), "demo") == {"dtype": "auto", "trust_remote_code": False}
    config["experiments"]["demo"]["training"].update(trust_remote_code=True, dtype="float32")
    config["experiments"]["demo"]["evaluation"]["dtype"] = "bfloat16"
    assert merge_spec(validate_config(config), "demo") == {"dtype": "bfloat16", "trust_remote_code": True}


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
        "sft_weight": 0.0,
    }  # iw_sft's own keys (iw_temp, iw_clip) stay out of other weightings' specs: finished runs keep their params
    assert "benchmarks" not in str(spec) and "sampling" not in str(spec)
    config["modes"]["iw-sft"] = {"weighting": "iw_sft", "iw_clip": 4.0}
    config["experiments"]["demo"]["modes"].append("iw-sft")
    filled = validate_config(config)
    iw = train_spec(filled, next(r for r in iter_runs(filled) if r.mode == "iw-sft"))
    assert iw["loss"]["iw_temp"] == 1.0 and iw["loss"]["iw_clip"] == 4.0


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


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (  # a mode whose name is another mode's label
            lambda c: (
                c["modes"].update({"asft-kl0.05": {"weighting": "dft"}}),
                c["experiments"]["demo"]["modes"].append("asft-kl0.05"),
            ),
            "experiments.demo.modes: modes[3] 'asft' (kl_weight 0.05) and modes[7] 'asft-kl0.05' give the same run id "
            "'tiny/arith/asft-kl0.05/seed0'",
        ),
        (  # two KL weights that print alike with {:g}
            lambda c: c["experiments"]["demo"].update(kl_weights=[0.1234561, 0.1234564]),
            "experiments.demo.kl_weights: modes[3] 'asft' with kl_weights[0] = 0.1234561 and modes[3] 'asft' with "
            "kl_weights[1] = 0.1234564 give the same run id 'tiny/arith/asft-kl0.123456/seed0'",
        ),
        (  # the id is a folder name, and some file systems ignore case
            lambda c: (
                c["modes"].update({"SFT": {"weighting": "dft"}}),
                c["experiments"]["demo"]["modes"].append("SFT"),
            ),
            "experiments.demo.modes: modes[0] 'sft' and modes[7] 'SFT' give run ids 'tiny/arith/SFT/seed0' and "
            "'tiny/arith/sft/seed0', which differ only in case",
        ),
    ],
)
def test_run_ids_are_unique_within_an_experiment(config: dict, mutate, expected: str) -> None:
    mutate(config)
    with pytest.raises(ConfigError) as info:
        validate_config(config, source="config/config.yaml")
    assert "config/config.yaml: invalid configuration" in str(info.value)
    assert expected in str(info.value)


def test_equal_run_ids_in_different_experiments_are_fine(config: dict) -> None:
    """Each experiment has its own results/<experiment>/ folder."""
    config["experiments"]["other"] = config["experiments"]["demo"]
    runs = list(iter_runs(validate_config(config)))
    assert len({(r.experiment, r.run_id) for r in runs}) == len(runs) == 14


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c["modes"]["asft"].update(kl_weight=math.nan), "modes.asft.kl_weight: nan is not a finite number"),
        (
            lambda c: c["modes"]["sft-topk"].update(keep_ratio=math.nan),
            "modes.sft-topk.keep_ratio: nan is not a finite number",
        ),
        (
            lambda c: c["experiments"]["demo"]["training"].update(learning_rate=math.inf),
            "experiments.demo.training.learning_rate: inf is not a finite number",
        ),
        (
            lambda c: c["experiments"]["demo"].update(kl_weights=[0.1, math.inf]),
            "experiments.demo.kl_weights[1]: inf is not a finite number",
        ),
    ],
)
def test_nan_and_inf_are_refused(config: dict, mutate, expected: str) -> None:
    mutate(config)
    with pytest.raises(ConfigError, match="config/config.yaml: invalid configuration") as info:
        validate_config(config, source="config/config.yaml")
    assert expected in str(info.value)


def write_demo_config(path: Path, edit) -> Path:  # noqa: ANN001
    """The shipped demo config as text, edited line-wise: YAML-level problems cannot be written from a dict."""
    text = (REPO / "config" / "config.yaml").read_text()
    path.write_text(edit(text))
    return path


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    path = write_demo_config(
        tmp_path / "dup.yaml",
        lambda text: text.replace("  sft: {weighting: none}\n", "  sft: {weighting: none}\n  sft: {weighting: dft}\n"),
    )
    line = path.read_text().splitlines().index("  sft: {weighting: dft}") + 1
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: invalid configuration:")
    assert f"modes.sft: duplicate key on line {line} (first on line {line - 1}" in str(info.value)


def test_duplicate_keys_are_reported_together_and_merge_keys_still_work(tmp_path: Path) -> None:
    path = write_demo_config(
        tmp_path / "dup.yaml",
        lambda text: text.replace("      max_steps: 40\n", "      max_steps: 40\n      max_steps: 4\n").replace(
            "    seeds: [0]\n", "    seeds: [0]\n    seeds: [1]\n"
        ),
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "experiments.demo.seeds: duplicate key" in str(info.value)
    assert "experiments.demo.training.max_steps: duplicate key" in str(info.value)
    # A merge key's values may be overridden: that is what it is for, not a repeated key.
    merged = write_demo_config(
        tmp_path / "merged.yaml",
        lambda text: text.replace(
            "  asft: {weighting: dft, kl_weight: 0.05}", "  asft: {<<: *dft, kl_weight: 0.05}"
        ).replace("  dft: {weighting: dft}", "  dft: &dft {weighting: dft, kl_weight: 0.0}"),
    )
    assert load_config(merged)["modes"]["asft"] == load_config(REPO / "config" / "config.yaml")["modes"]["asft"]


def test_duplicate_json_keys_are_refused(tmp_path: Path, demo_config: dict) -> None:
    body = json.dumps(demo_config, indent="\t")  # tab-indented JSON is not YAML: it is read as JSON first
    path = tmp_path / "config.json"
    path.write_text(body.replace('"weighting": "none"', '"weighting": "none",\n"weighting": "dft"', 1))
    with pytest.raises(ConfigError, match=r"modes\.sft\.weighting: duplicate key"):
        load_config(path)
    path.write_text(body)
    assert list(iter_runs(load_config(path)))


def test_snakemake_dry_run_refuses_duplicate_keys_and_nan(tmp_path: Path) -> None:
    """Snakemake reads --configfile with its own loader; the workflow must refuse what `asft validate-config` does."""
    duplicate = write_demo_config(
        tmp_path / "dup.yaml",
        lambda text: text.replace("  sft: {weighting: none}\n", "  sft: {weighting: none}\n  sft: {weighting: dft}\n"),
    )
    nan = write_demo_config(
        tmp_path / "nan.yaml",
        lambda text: text.replace("asft: {weighting: dft, kl_weight: 0.05}", "asft: {weighting: dft, kl_weight: .nan}"),
    )
    for path, key in ((duplicate, "modes.sft: duplicate key"), (nan, "modes.asft.kl_weight: nan is not a finite")):
        result = subprocess.run(
            [sys.executable, "-m", "snakemake", "--cores", "1", "-n", "--configfile", str(path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        assert f"{path}: invalid configuration" in output and key in output, output


def test_lr_scheduler_names_are_checked_before_any_job(config: dict) -> None:
    training = config["experiments"]["demo"]["training"]
    for name in ("linear", "cosine", "constant_with_warmup"):
        training["lr_scheduler_type"] = name
        validate_config(config)
    training["lr_scheduler_type"] = "cosin"
    with pytest.raises(ConfigError, match="experiments.demo.training.lr_scheduler_type: 'cosin' is not a transformers"):
        validate_config(config)
    # Real SchedulerType values that need settings (min_lr, evaluation during training) the schema cannot give
    for name in ("cosine_with_min_lr", "reduce_lr_on_plateau", "warmup_stable_decay"):
        training["lr_scheduler_type"] = name
        with pytest.raises(ConfigError, match=f"experiments.demo.training.lr_scheduler_type: '{name}' needs"):
            validate_config(config)


def test_greedy_decoding_with_several_samples_is_refused(config: dict) -> None:
    sampling = config["experiments"]["demo"]["evaluation"]["sampling"]
    sampling["n"] = 4  # with the greedy preset: 4 identical generations
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    assert (
        "experiments.demo.evaluation.sampling.n: n = 4 with temperature 0 (from "
        "experiments.demo.evaluation.sampling.preset) on benchmark 'arith'"
    ) in str(info.value)
    sampling["temperature"] = 0.7
    validate_config(config)
    # resolved per benchmark: the benchmark's own temperature 0 turns the paper preset's 16 samples into copies
    sampling.clear()
    config["benchmarks"]["arith"]["sampling"] = {"preset": "paper", "temperature": 0}
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    assert (
        "benchmarks.arith.sampling.preset: n = 16 with temperature 0 (from benchmarks.arith.sampling.temperature)"
    ) in str(info.value)
    config["benchmarks"]["arith"]["sampling"] = {"preset": "paper"}
    validate_config(config)
    # multiple-choice benchmarks are scored from letter log-probabilities: sampling settings do not apply
    config["benchmarks"]["arith"].update(format="medqa", sampling={"preset": "greedy", "n": 4})
    validate_config(config)


def test_local_path_sources_must_exist(config: dict, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    data = tmp_path / "train.jsonl"
    data.write_text("")
    config["models"]["tiny"]["source"] = {"path": str(model)}
    config["datasets"]["arith"]["source"] = {"path": str(tmp_path / "trian.jsonl")}
    config["benchmarks"]["arith"]["source"] = [{"path": str(data)}, {"path": str(tmp_path)}]
    with pytest.raises(ConfigError) as info:
        validate_config(config, source="config/config.yaml")
    message = str(info.value)
    assert f"models.tiny.source.path: {model} is not a model directory (no config.json)" in message
    assert f"datasets.arith.source.path: {tmp_path / 'trian.jsonl'} does not exist" in message
    assert f"benchmarks.arith.source[1].path: {tmp_path} is not a file" in message
    (model / "config.json").write_text("{}")
    config["datasets"]["arith"]["source"] = {"path": str(data)}
    config["benchmarks"]["arith"]["source"] = [{"path": str(data)}]
    validate_config(config)
    # entries no experiment uses are never fetched, so are not checked
    config["models"]["spare"] = {"source": {"path": str(tmp_path / "nowhere")}}
    validate_config(config)


def test_report_to_backends_must_be_installed(config: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    training = config["experiments"]["demo"]["training"]
    training["report_to"] = ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="experiments.demo.training.report_to: 'wandb' needs the 'wandb' package"):
        validate_config(config)
    training["report_to"] = ["none"]
    validate_config(config)


def test_an_evaluation_template_other_than_the_training_one_must_be_allowed(config: dict) -> None:
    evaluation = config["experiments"]["demo"]["evaluation"]
    evaluation["template"] = "alpaca"  # the training template: nothing to allow
    validate_config(config)
    evaluation["template"] = "plain"
    with pytest.raises(
        ConfigError,
        match=r"experiments\.demo\.evaluation\.template: 'plain' differs from training\.template 'alpaca'",
    ):
        validate_config(config)
    evaluation["allow_template_mismatch"] = True
    assert eval_spec(validate_config(config), "demo", "arith")["template"] == "plain"


def test_cached_reference_is_refused_with_a_reverse_kl_anchor(config: dict) -> None:
    training = config["experiments"]["demo"]["training"]
    filled = validate_config(config)["experiments"]["demo"]["training"]
    assert filled["reference"] == "live" and filled["reference_samples"] == 16  # today's results stay exact
    training["reference"] = "cached"
    validate_config(config)  # every demo anchor is forward
    config["modes"]["asft-rev"] = {"weighting": "dft", "kl_weight": 0.05, "kl_direction": "reverse"}
    config["modes"]["dft-rev0"] = {"weighting": "dft", "kl_direction": "reverse"}  # no anchor: fine
    config["experiments"]["demo"]["modes"] += ["dft-rev0"]
    validate_config(config)
    config["experiments"]["demo"]["modes"] += ["asft-rev"]
    with pytest.raises(ConfigError, match=r"experiments.demo.training.reference: cached .*\['asft-rev'\]"):
        validate_config(config)
    training["reference"] = "live"
    validate_config(config)
    training["reference_samples"] = 0
    with pytest.raises(ConfigError, match="reference_samples"):
        validate_config(config)
