"""Results table and plots from metrics.json files and training logs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from asft.aggregation import aggregate, load_metrics, results_table


def _metrics(path: Path, benchmark: str, score: float, run: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "benchmark": benchmark,
                "avg_at_n": score,
                "avg_ci": [score - 0.1, score + 0.1],
                "n_problems": 10,
                "n_samples": 10,
                "template": "alpaca",
                "backend": "transformers",
                "run": run,
                "per_problem": {str(i): float(i < round(10 * score)) for i in range(10)},
            }
        )
    )
    return path


def _run(mode_label: str, seed: int) -> dict:
    return {"model": "tiny", "dataset": "arith", "mode_label": mode_label, "seed": seed}


@pytest.fixture
def metrics_files(tmp_path: Path) -> list[Path]:
    files = []
    for bench, base in (("b1", 0.1), ("b2", 0.3)):
        files.append(_metrics(tmp_path / f"base/{bench}.json", bench, base, {"model": "tiny", "mode_label": "base"}))
        for seed, bump in ((0, 0.2), (1, 0.4)):
            files.append(_metrics(tmp_path / f"sft{seed}/{bench}.json", bench, base + bump, _run("sft", seed)))
        files.append(_metrics(tmp_path / f"asft/{bench}.json", bench, base + 0.5, _run("asft-kl0.05", 0)))
    return files


def test_table_has_base_first_seed_means_and_average(metrics_files: list[Path]) -> None:
    table = results_table(load_metrics(metrics_files), benchmarks=["b2", "b1"])
    assert list(table["mode"]) == ["base", "asft-kl0.05", "sft"]
    assert list(table.columns) == ["model", "dataset", "mode", "b2", "b1", "average", "seeds"]
    sft = table.set_index("mode").loc["sft"]
    assert sft["b1"] == pytest.approx(40.0) and sft["b2"] == pytest.approx(60.0)  # mean over two seeds
    assert sft["average"] == pytest.approx(50.0) and sft["seeds"] == 2


def test_aggregate_writes_table_markdown_and_plot(metrics_files: list[Path], tmp_path: Path) -> None:
    train_dirs = []
    for label, slope in (("tiny/arith/sft/seed0", 0.1), ("tiny/arith/asft-kl0.05/seed0", 0.05)):
        train_dir = tmp_path / "runs" / label / "train"
        train_dir.mkdir(parents=True)
        (train_dir / "run_spec.json").write_text(json.dumps({"run_id": label}))
        lines = [{"step": s, "loss": 2 - slope * s, "ce": 2 - slope * s, "kl": slope * s / 10} for s in range(1, 9)]
        (train_dir / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        train_dirs.append(train_dir)
    table = aggregate("demo", metrics_files, train_dirs, tmp_path / "tables", tmp_path / "plots", ["b1", "b2"])
    assert pd.read_csv(tmp_path / "tables/results.csv").shape == (3, 7)
    markdown = (tmp_path / "tables/results.md").read_text()
    assert "| tiny | - | base | 10.0 | 30.0 | 20.0 | 1 |" in markdown
    assert (tmp_path / "plots/training_curves.png").stat().st_size > 10_000
    assert len(pd.read_csv(tmp_path / "tables/scores_long.csv")) == len(metrics_files)
    assert table["average"].notna().all()
    comparisons = pd.read_csv(tmp_path / "tables/comparisons_vs_base.csv")
    asft = comparisons[(comparisons["mode"] == "asft-kl0.05") & (comparisons["benchmark"] == "b1")].iloc[0]
    assert asft["diff_vs_base"] == pytest.approx(50.0) and asft["n_problems"] == 10  # 6/10 vs 1/10 solved
    assert asft["ci_low"] <= 50.0 <= asft["ci_high"]
    assert len(comparisons) == len(metrics_files) - 2  # every run on both benchmarks, not the base itself
