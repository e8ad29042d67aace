"""The reference stage in the run matrix and the DAG: one reference job per (model, dataset, reference settings),
read by every cached run with those settings, and a change of those settings replans only what depends on them."""

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
from asft.job_resources import reference_request, train_request
from asft.matrix import REFERENCE_SETTINGS, reference_jobs, reference_key, reference_spec
from tests.conftest import REPO
from tests.test_workflow import copy_workflow, snakemake_env


def _check_config() -> dict:
    return yaml.safe_load((REPO / "config" / "reference_cache.yaml").read_text())


def test_one_reference_job_per_model_dataset_and_settings() -> None:
    """The checked-in check config: 2 modes × 3 seeds × K ∈ {4, 16, 64} cached runs read 3 caches, one per K; its
    live experiment reads none and its runs' specs carry no reference keys."""
    config = validate_config(_check_config())
    jobs = reference_jobs(config)
    assert sorted(spec["training"]["reference_samples"] for spec, _ in jobs.values()) == [4, 16, 64]
    readers: dict[tuple, int] = {}
    for run in iter_runs(config):
        spec = reference_spec(config, run)
        training = train_spec(config, run)["training"]
        if run.experiment == "live":
            assert spec is None and "reference" not in training and "reference_samples" not in training
            continue
        key = (run.model, run.dataset, reference_key(spec))
        assert key in jobs and training["reference_samples"] == spec["training"]["reference_samples"]
        readers[key] = readers.get(key, 0) + 1
    assert sorted(readers.values()) == [6, 6, 6]  # asft and sft+kl, three seeds each


def test_only_the_reference_settings_replan_a_cache() -> None:
    """A learning rate, KL weight or seed of a cached experiment shares its cache; a max_length, template, dtype
    or K does not, and each experiment that changes one gets a cache of its own."""
    base = _check_config()
    base["experiments"].pop("live")
    del base["experiments"]["cached"]["sweep"]
    config = validate_config(copy.deepcopy(base))
    (key,) = reference_jobs(config)
    for field, value in [("learning_rate", 5e-4), ("max_steps", 7), ("kl_log_every", 0)]:
        changed = copy.deepcopy(base)
        changed["experiments"]["other"] = copy.deepcopy(changed["experiments"]["cached"])
        changed["experiments"]["other"]["training"][field] = value
        assert list(reference_jobs(validate_config(changed))) == [key], field
    for field, value in [("max_length", 96), ("dtype", "bfloat16"), ("reference_samples", 8), ("max_samples", 100)]:
        assert field in REFERENCE_SETTINGS
        changed = copy.deepcopy(base)
        changed["experiments"]["other"] = copy.deepcopy(changed["experiments"]["cached"])
        changed["experiments"]["other"]["training"][field] = value
        keys = list(reference_jobs(validate_config(changed)))
        assert len(keys) == 2 and keys[0] == key, field


def test_a_cached_run_asks_for_no_reference_copy_and_the_cache_job_for_a_forward() -> None:
    """Full fine-tuning with a cached reference loads one model, so its train job asks for half the weights'
    host memory of a live one; the reference job asks for the GPUs an evaluation of the model gets."""
    base = _check_config()
    base["models"]["big"] = {"source": {"hub": "org/big", "revision": "0" * 40}, "parameters_b": 7.0}
    for name in ("live", "cached"):
        exp = base["experiments"][name]
        exp["models"], exp["training"]["finetune"] = ["big"], "full"
        exp["training"].pop("lora")
    config = validate_config(base)
    live = next(r for r in iter_runs(config, "live") if r.mode == "asft")
    cached = next(r for r in iter_runs(config, "cached") if r.mode == "asft")
    live_mb, cached_mb = train_request(config, live, 2).mem_mb, train_request(config, cached, 2).mem_mb
    assert live_mb - cached_mb == 7.0 * 4 * 1000  # one float32 copy of 7B parameters (the config's dtype), one rank
    job = reference_request(config, cached, 2)
    assert job.gpus == 1 and job.nodes == 1


def test_dry_run_plans_the_reference_jobs_and_passes_the_cache_to_training(tmp_path: Path) -> None:
    """`snakemake -n` on the check config: 3 reference jobs, and each cached train job is given its cache."""
    workdir = copy_workflow(tmp_path / "wf")
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "--configfile", "config/reference_cache.yaml"],
        cwd=workdir,
        env=snakemake_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, re.M))
    assert counts["reference"] == "3" and counts["train"] == "24", counts
    trains = [line for line in result.stdout.splitlines() if re.match(r"(Shell command: )?asft train ", line)]
    cached = [line for line in trains if "--reference" in line]
    assert len(trains) == 24 and len(cached) == 18
    references = set(re.findall(r"--reference (\S+)", "\n".join(cached)))
    assert len(references) == 3
    assert all(path.startswith(f"{layout.RESULTS}/references/tiny/arith/") for path in references)
    assert all("/cached/" in line for line in cached)


def test_plan_counts_reference_jobs_instead_of_reference_forwards() -> None:
    """`asft plan`: a cached anchored run's FLOPs are the policy's alone, and each cache is one job of one forward
    pass over the examples; `--reference` plans a config as if every experiment used that reference."""
    from asft.config_checks import with_reference
    from asft.plan import build_plan, reference_flops, rows_by_experiment, train_flops

    raw = _check_config()
    raw["models"]["tiny"]["parameters_b"] = 1.0
    raw["datasets"]["arith"] |= {"examples": 512, "mean_tokens": 100}
    config = validate_config(raw)
    live = next(r for r in iter_runs(config, "live") if r.mode == "asft")
    cached = next(r for r in iter_runs(config, "cached") if r.mode == "asft")
    n_tokens = 40 * 16 * 100  # max_steps x batch x tokens
    assert train_flops(config, live)[0] == (4 + 2) * 1e9 * n_tokens  # LoRA policy + a reference forward per step
    assert train_flops(config, cached)[0] == 4 * 1e9 * n_tokens
    assert reference_flops(config, cached)[0] == 2 * 1e9 * 512 * 100  # each of the 512 examples once
    assert rows_by_experiment(build_plan(config))[-1].reference_jobs == 3
    assert rows_by_experiment(build_plan(validate_config(with_reference(raw, "live"))))[-1].reference_jobs == 0
    reverse = copy.deepcopy(raw)
    reverse["modes"]["asft"]["kl_direction"] = "reverse"
    assert "reference" not in with_reference(reverse, "cached")["experiments"]["live"]["training"]


def test_reference_check_summary_compares_each_cached_variant_with_live() -> None:
    """`asft reference-check`'s table: seed means and SDs, the late KL, and each cached variant's paired
    difference from live; a difference within the live seeds' SD is reported as within seed spread."""
    from asft.reference_check import late_kl, markdown, summarise

    def record(variant: str, seed: int, correct: list[int], kl: float) -> dict:
        return {
            "mode": "asft",
            "variant": variant,
            "seed": seed,
            "accuracy": sum(correct) / len(correct),
            "per_problem": {f"p{i}": float(c) for i, c in enumerate(correct)},
            "kl_curve": [(step, kl * step / 8) for step in range(1, 9)],
        }

    assert late_kl([(1, 1.0), (2, 2.0), (3, 3.0), (4, 5.0)]) == 5.0  # the last quarter of the logged steps
    live = [record("live", 0, [1, 1, 0, 0], 0.2), record("live", 1, [1, 0, 1, 1], 0.4)]  # seed SD 0.177
    near = [record("cached K=16", 0, [1, 1, 0, 0], 0.3), record("cached K=16", 1, [1, 0, 1, 0], 0.3)]
    far = [record("cached K=4", s, [1, 1, 1, 1], 0.9) for s in (0, 1)]
    rows = summarise(live + near + far)
    assert [r["variant"] for r in rows] == ["live", "cached K=4", "cached K=16"]  # live, then by K
    assert rows[0]["accuracy"] == 0.625 and "delta_accuracy" not in rows[0]
    assert rows[2]["delta_accuracy"] == pytest.approx(-0.125) and rows[2]["within_seed_spread"]
    assert rows[1]["delta_accuracy"] == pytest.approx(0.375) and not rows[1]["within_seed_spread"]
    assert rows[1]["delta_late_kl"] == pytest.approx(0.9 * 0.9375 - 0.3 * 0.9375)
    table = markdown(rows)
    assert "| asft | cached K=4 | 2 | 100.0 (0.0)" in table and "| no |" in table
