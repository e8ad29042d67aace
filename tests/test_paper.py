"""The paper's tables and figures: layout against the reference CSVs, published values, deltas, missing data."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from asft.paper import FIGURES, TABLES, build_table, layout_of, render_figure, table_caption, write_figure, write_table
from asft.paper.catalogue import MATH, MEDICAL, MODEL_LABELS
from asft.paper.reference import REFERENCE_FILES, published_value, reference_keys, reference_table, reference_text
from asft.paper.tables import published

SIZES = ("10k", "30k", "100k")
TRAINED = ("sft", "sft+kl", "dft", "asft")
KL = 0.05


def _acc(*key: object) -> float:
    """A deterministic accuracy in [0.1, 0.9] per configuration, so every cell differs."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return 0.1 + 0.8 * int.from_bytes(digest[:4], "big") / 2**32


def _run(experiment: str, model: str, dataset: str | None, mode: str, **extra: object) -> dict:
    kl = KL if mode in ("sft+kl", "asft", "asft-reverse") else 0.0
    run = {
        "experiment": experiment,
        "model": model,
        "dataset": dataset,
        "mode": mode,
        "kl_weight": kl,
        "sft_weight": 0.0,
        "kl_direction": "reverse" if mode == "asft-reverse" else ("forward" if kl else None),
        "sweep_key": None,
        "sweep_value": None,
        "seed": None if mode == "base" else 42,
    }
    run.update(extra)
    return run


def _runs() -> list[tuple[dict, tuple[str, ...], dict]]:
    """(run identity, benchmarks, training facts) for every experiment the catalogue draws from."""
    runs: list[tuple[dict, tuple[str, ...], dict]] = []
    full = {"finetune": "full", "lora_r": None, "loss_scaling": "upstream"}

    def add(run: dict, benchmarks: tuple[str, ...], **train: object) -> None:
        runs.append((run, benchmarks, {**full, **train}))

    for experiment, model, prefix, benchmarks in (
        ("table1_math", "qwen2.5-7b", "numina-cot", MATH),
        ("table1_medical", "llama-2-7b", "medmcqa", MEDICAL),
    ):
        add(_run(experiment, model, None, "base"), benchmarks)
        add(_run(f"{experiment}_large", model, None, "base"), benchmarks)
        for size in SIZES:
            for mode in TRAINED:
                name = experiment if size == "10k" else f"{experiment}_large"
                add(_run(name, model, f"{prefix}-{size}", mode), benchmarks)
    for experiment, model, dataset, benchmarks in (
        ("scaling_math", "qwen2.5-7b", "numina-cot-10k", MATH),
        ("scaling_medical", "llama-2-7b", "medmcqa-10k", MEDICAL),
    ):
        for mode in TRAINED:  # no base of their own: the rows borrow Table 1's
            add(_run(experiment, model, dataset, mode), benchmarks, loss_scaling="token")
    add(_run("table4_lora", "llama-2-7b", "medmcqa-10k", "asft"), MEDICAL, finetune="lora", lora_r=8)
    add(_run("table5_qwen7b", "qwen2.5-7b", None, "base"), MEDICAL)
    for mode in TRAINED:
        add(_run("table5_qwen7b", "qwen2.5-7b", "medmcqa-10k", mode), MEDICAL)
    for model, experiment in (
        ("qwen2.5-32b", "table5_32b"),
        ("llama-2-70b", "table5_70b"),
        ("qwen2.5-72b", "table5_70b"),
    ):
        add(_run(experiment, model, None, "base"), MEDICAL)
        for mode in ("sft", "dft", "asft"):
            add(_run(experiment, model, "medmcqa-10k", mode), MEDICAL)
    for mode in ("sft", "dft", "asft", "sft+kl"):
        add(_run("fig1", "llama-2-7b", "medmcqa-10k", mode), ("mmlu_medical", "medmcqa"))
    for mode in ("asft", "asft-reverse"):
        for lam in (0.001, 0.005, 0.01, 0.05, 0.1, 0.5):
            add(_run("fig2", "llama-2-7b", "medmcqa-10k", mode, kl_weight=lam), MEDICAL)
    for experiment, model, dataset, benchmarks in (
        ("fig4_math", "qwen2.5-7b", "numina-cot-10k", MATH),
        ("fig4_medical", "llama-2-7b", "medmcqa-10k", MEDICAL),
    ):
        for c in (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0):
            add(_run(experiment, model, dataset, "asft", kl_weight=c), benchmarks)
            add(
                _run(experiment, model, dataset, "asft-sft", kl_weight=0.0, kl_direction=None, sft_weight=c), benchmarks
            )
    for experiment, key, values in (
        ("fig5_lr", "learning_rate", (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4)),
        ("fig5_batch", "global_batch_size", (32, 64, 128, 256)),
    ):
        for mode in ("sft", "dft", "asft"):
            for value in values:
                run = _run(experiment, "llama-2-7b", "medmcqa-10k", mode, sweep_key=key, sweep_value=float(value))
                add(run, MEDICAL)
    add(_run("fork", "qwen2.5-7b", None, "base"), ("math500",))
    for mode in ("sft", "dft", "asft", "sft-topk", "sft-antiop", "sft-lr"):
        add(_run("fork", "qwen2.5-7b", "numina-cot-100k", mode), ("math500",), finetune="lora", lora_r=32)
    add(_run("fork_quick", "qwen2.5-1.5b", None, "base"), ("math500",))
    for experiment in ("fork_quick", "fork_3ep"):
        add(_run(experiment, "qwen2.5-1.5b", "numina-cot-10k", "asft"), ("math500",), finetune="lora", lora_r=8)
    return runs


def fabricate(scale: str = "full", gpu: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Synthetic evals, trains and curves for every experiment, one seed, snapshots for fig1."""
    evals, trains, curves = [], [], []
    for run, benchmarks, train in _runs():
        identity = tuple(run.values())
        steps: list[int | None] = [None, 10, 20] if run["experiment"] == "fig1" and run["mode"] != "base" else [None]
        for benchmark in benchmarks:
            for step in steps:
                acc = _acc(*identity, benchmark, step)
                evals.append(
                    {
                        **run,
                        "benchmark": benchmark,
                        "step": step,
                        "accuracy": acc,
                        "n": 500,
                        "ci_low": acc - 0.02,
                        "ci_high": acc + 0.02,
                        "scale": scale,
                    }
                )
        if run["mode"] == "base":
            continue
        trains.append(
            {
                **run,
                **train,
                "wall_time_s": 3600 * _acc(*identity, "time"),
                "accelerator": "NVIDIA A100-SXM4-80GB" if gpu else "cpu",
                "accelerator_count": 1,
                "peak_gpu_memory_gb": 80 * _acc(*identity, "mem") if gpu else math.nan,
                "peak_host_memory_gb": 10 * _acc(*identity, "host"),
            }
        )
        for step in range(1, 31):
            kl = 0.1 * step if run["mode"] == "dft" else 0.01 * step
            curves.append(
                {k: run[k] for k in ("experiment", "model", "dataset", "mode", "kl_weight")}
                | {"step": step, "kl": kl, "loss": 1 / step}
            )
    return pd.DataFrame(evals), pd.DataFrame(trains), pd.DataFrame(curves)


@pytest.fixture(scope="module")
def frames() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    return fabricate()


def _cell(cells: pd.DataFrame, row: str, column: str) -> pd.Series:
    hit = cells[(cells["row"] == row) & (cells["column"] == column)]
    assert len(hit) == 1, (row, column)
    return hit.iloc[0]


def _ours(evals: pd.DataFrame, experiment: str, model: str, dataset: str | None, mode: str, benchmark: str) -> float:
    rows = evals[
        (evals["experiment"] == experiment)
        & (evals["model"] == model)
        & (evals["mode"] == mode)
        & (evals["benchmark"] == benchmark)
        & evals["step"].isna()
    ]
    if dataset is not None:
        rows = rows[rows["dataset"] == dataset]
    assert len(rows) == 1
    return 100 * float(rows["accuracy"].iloc[0])


# ---------------------------------------------------------------- layout against the reference files


@pytest.mark.parametrize("name", sorted(TABLES))
def test_rows_and_columns_follow_the_reference_order(name: str) -> None:
    spec = TABLES[name]
    keys = [row.reference for row in spec.rows if row.reference is not None]
    if spec.reference_file is None:  # a table of ours: no published row to follow
        assert keys == [] and not any(row.published for row in spec.rows)
        return
    assert keys == reference_keys(spec.reference_file, spec.reference_keys)
    reference_columns = [c for c in reference_table(spec.reference_file).columns if c not in spec.reference_keys]
    ours = [column.reference for _, column in spec.columns]
    assert ours == [c for c in reference_columns if c in ours]
    if name != "fork":  # the fork's file also records the LoRA rank, which is not a result
        assert ours == reference_columns
    rows, columns = layout_of(name)
    assert rows == [row.full_label for row in spec.rows] and len(set(rows)) == len(rows)
    assert columns == [column.label for _, column in spec.columns]


def test_layouts_read_like_the_paper() -> None:
    rows, columns = layout_of("table1")
    assert columns == [
        "MedQA",
        "MMLU-Medical",
        "MedMCQA",
        "Medical Avg",
        "AIME24",
        "MATH-500",
        "Minerva Math",
        "OlympiadBench",
        "AMC23",
        "Math Avg",
    ]
    assert rows[:5] == ["Base", "10k · SFT", "10k · SFT w/ KL", "10k · DFT", "10k · ASFT"]
    assert rows[-1] == "10k · ASFT (token-normalised loss)"
    assert layout_of("table4") == (
        ["SFT", "DFT", "SFT w/ KL", "IW-SFT", "GRPO", "DAPO", "ASFT-LoRA", "ASFT"],
        ["Time (h)", "Memory (GB)", "Medical Avg"],
    )
    assert layout_of("table2") == (
        [
            "sft · DFT",
            "sft · IW-SFT",
            "sft · SFT",
            "sft · ASFT",
            "rl · GRPO",
            "rl · DAPO",
            "continual · SFT + DAPO",
            "continual · ASFT + DAPO",
        ],
        ["MedQA", "MMLU-Medical", "MedMCQA", "Avg"],
    )
    assert layout_of("table3") == (
        ["Base", "SFT", "IW-SFT", "DFT", "ASFT"],
        ["HumanEval", "HumanEval+", "MBPP", "MBPP+", "Avg"],
    )
    rows, columns = layout_of("table5")
    assert columns == ["MedQA", "MMLU-Medical", "MedMCQA", "Avg"]
    assert rows[0] == "LLaMA-2-7B · Base" and rows[-1] == "Qwen2.5-72B · ASFT"
    rows, columns = layout_of("fork")
    assert columns == ["MATH-500"] and len(rows) == 9
    assert layout_of("fig1") == (["MMLU-Medical", "MedMCQA", "KL"], ["SFT", "DFT", "ASFT", "SFT w/ KL"])
    with pytest.raises(KeyError):
        layout_of("table9")


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_catalogue_cell_maps_to_a_reference_cell(name: str) -> None:
    spec = TABLES[name]
    if spec.reference_file is None:
        assert all(published(spec, row, column) is None for row in spec.rows for _, column in spec.columns)
        return
    frame = reference_table(spec.reference_file)
    for row in spec.rows:
        for _, column in spec.columns:
            value = published(spec, row, column)  # raises on a catalogue typo
            if row.reference is not None:
                mask = pd.Series(True, index=frame.index)
                for key_column, key in zip(spec.reference_keys, row.reference, strict=True):
                    mask &= frame[key_column] == key
                assert value == pytest.approx(float(frame.loc[mask, column.reference].iloc[0]))


def test_a_typo_in_a_reference_lookup_raises() -> None:
    with pytest.raises(KeyError, match="no row"):
        published_value("asft_paper_table1.csv", ("train_size", "method"), ("10k", "asft-kl0.05"), "medqa")
    with pytest.raises(KeyError, match="no column"):
        published_value("asft_paper_table1.csv", ("train_size", "method"), ("10k", "asft"), "med_qa")


def test_values_stated_in_text_are_in_the_reference_files() -> None:
    from asft.paper.figures import FIG1_PAPER_DFT_KL, FIG4_PAPER_ASFT_SFT_MATH

    fork_text = reference_text("token_sft_fork_results.csv")
    for row in TABLES["fork"].rows:
        for value in row.published.values():
            assert f"-> {value}" in fork_text
    figures_text = reference_text("asft_paper_figures.md")
    assert f"about {FIG1_PAPER_DFT_KL}" in figures_text
    for alpha, value in FIG4_PAPER_ASFT_SFT_MATH.items():
        assert f"{value / 100:.3f} (alpha {alpha:g})" in figures_text


def test_reference_files_ship_verbatim() -> None:
    shared = Path("/work/shared/reference")
    for name in REFERENCE_FILES:
        text = reference_text(name)
        assert text.startswith("#")
        if (shared / name).exists():
            assert text == (shared / name).read_text(encoding="utf-8")


def test_labels_never_show_internal_ids() -> None:
    internal = [
        "sft+kl",
        "asft-",
        "sft-",
        "kl0",
        "numina",
        "medmcqa-",
        "table1",
        "fork_",
        *MODEL_LABELS,
        "_",
    ]
    for name in TABLES:
        rows, columns = layout_of(name)
        for label in rows + columns:
            assert not any(token in label for token in internal), label
    for figure in FIGURES.values():
        for label in figure.panels + figure.series:
            assert not any(token in label for token in internal), label


# ---------------------------------------------------------------- values


def test_published_values_land_beside_ours(frames) -> None:
    evals, trains, _ = frames
    cells = build_table("table1", evals, trains)
    cell = _cell(cells, "10k · ASFT", "MedQA")
    assert cell["published"] == pytest.approx(39.28)
    assert cell["ours"] == pytest.approx(_ours(evals, "table1_medical", "llama-2-7b", "medmcqa-10k", "asft", "medqa"))
    cell = _cell(cells, "100k · DFT", "AMC23")
    assert cell["published"] == pytest.approx(27.19)
    assert cell["ours"] == pytest.approx(
        _ours(evals, "table1_math_large", "qwen2.5-7b", "numina-cot-100k", "dft", "amc23")
    )
    assert cell["n"] == 500 and cell["ci_low"] < cell["ours"] < cell["ci_high"]
    cells = build_table("table5", evals, trains)
    cell = _cell(cells, "Qwen2.5-32B · ASFT", "MMLU-Medical")
    assert cell["published"] == pytest.approx(79.23)
    expected = _ours(evals, "table5_32b", "qwen2.5-32b", "medmcqa-10k", "asft", "mmlu_medical")
    assert cell["ours"] == pytest.approx(expected)
    # LLaMA-2-7B rows of Table 5 are Table 1's 10k runs
    cell = _cell(cells, "LLaMA-2-7B · SFT", "MedMCQA")
    assert cell["ours"] == pytest.approx(_ours(evals, "table1_medical", "llama-2-7b", "medmcqa-10k", "sft", "medmcqa"))
    cells = build_table("fork", evals, trains)
    assert _cell(cells, "Qwen2.5-7B, LoRA r32, 100k · SFT-AntiOP", "MATH-500")["published"] == pytest.approx(61.0)
    assert _cell(cells, "Qwen2.5-1.5B, LoRA r8, 10k · ASFT, 3 epochs", "MATH-500")["published"] == pytest.approx(37.8)
    assert not cells["missing"].any()


def test_delta_vs_base_and_its_arrow(frames, tmp_path: Path) -> None:
    evals, trains, _ = frames
    evals = evals.copy()
    medical = evals["experiment"] == "table1_medical"
    is_base = medical & (evals["mode"] == "base") & (evals["benchmark"] == "medqa")
    evals.loc[is_base, "accuracy"] = 0.30
    evals.loc[
        medical & (evals["dataset"] == "medmcqa-10k") & (evals["mode"] == "asft") & (evals["benchmark"] == "medqa"),
        "accuracy",
    ] = 0.40
    evals.loc[
        medical & (evals["dataset"] == "medmcqa-10k") & (evals["mode"] == "dft") & (evals["benchmark"] == "medqa"),
        "accuracy",
    ] = 0.25
    cells = build_table("table1", evals, trains)
    assert _cell(cells, "10k · ASFT", "MedQA")["delta_vs_base"] == pytest.approx(10.0)
    assert _cell(cells, "10k · DFT", "MedQA")["delta_vs_base"] == pytest.approx(-5.0)
    assert pd.isna(_cell(cells, "Base", "MedQA")["delta_vs_base"])
    # the scaling ablation borrows Table 1's base
    assert not pd.isna(_cell(cells, "10k · ASFT (token-normalised loss)", "MedQA")["delta_vs_base"])
    md = write_table("table1", evals, trains, tmp_path)["md"].read_text()
    asft_line = next(line for line in md.splitlines() if line.startswith("| 10k | ASFT |"))
    assert asft_line.split(" | ")[2] == "40.00 ↑10.00 (39.28)"
    dft_line = next(line for line in md.splitlines() if line.startswith("| 10k | DFT |"))
    assert dft_line.split(" | ")[2] == "25.00 ↓5.00 (29.69)"
    tex = (tmp_path / "table1.tex").read_text()
    assert r"40.00$_{\uparrow10.00}$ {\small(39.28)}" in tex


def test_averages_are_the_mean_of_the_group(frames) -> None:
    evals, trains, _ = frames
    cells = build_table("table1", evals, trains)
    row = "30k · SFT w/ KL"
    medical = [_cell(cells, row, c)["ours"] for c in ("MedQA", "MMLU-Medical", "MedMCQA")]
    assert _cell(cells, row, "Medical Avg")["ours"] == pytest.approx(sum(medical) / 3)
    math_values = [
        _cell(cells, row, c)["ours"] for c in ("AIME24", "MATH-500", "Minerva Math", "OlympiadBench", "AMC23")
    ]
    assert _cell(cells, row, "Math Avg")["ours"] == pytest.approx(sum(math_values) / 5)
    assert _cell(cells, row, "Math Avg")["published"] == pytest.approx(18.60)
    base_avg = sum(_cell(cells, "Base", c)["ours"] for c in ("MedQA", "MMLU-Medical", "MedMCQA")) / 3
    assert _cell(cells, row, "Medical Avg")["delta_vs_base"] == pytest.approx(sum(medical) / 3 - base_avg)


def test_rows_only_the_paper_has_and_rows_only_we_have(frames, tmp_path: Path) -> None:
    evals, trains, _ = frames
    cells = build_table("table5", evals, trains)
    grpo = _cell(cells, "Qwen2.5-7B · GRPO", "MedQA")
    assert grpo["missing"] and grpo["published"] == pytest.approx(63.00) and grpo["note"] == "not built"
    md = write_table("table5", evals, trains, tmp_path)["md"].read_text()
    assert "| Qwen2.5-7B | GRPO | — (63.00) |" in md
    cells = build_table("table4", evals, trains)
    ours_only = _cell(cells, "SFT w/ KL", "Medical Avg")
    assert pd.isna(ours_only["published"]) and not ours_only["missing"]
    cells = build_table("table1", evals, trains)
    ablation = cells[cells["row"].str.contains("token-normalised")]
    assert ablation["published"].isna().all() and not ablation["missing"].any()


def test_missing_results_render_as_dashes(frames, tmp_path: Path) -> None:
    evals, trains, _ = frames
    gone = (
        (evals["experiment"] == "table1_math_large")
        & (evals["dataset"] == "numina-cot-30k")
        & (evals["benchmark"] == "aime24")
    )
    paths = write_table("table1", evals[~gone], trains, tmp_path)
    cells = pd.read_csv(paths["csv"])
    lost = cells[(cells["row"].str.startswith("30k")) & cells["column"].isin(["AIME24", "Math Avg"])]
    assert lost["missing"].all() and len(lost) == 8
    assert int(cells["missing"].sum()) == 8
    assert "| 30k | ASFT |" in paths["md"].read_text()
    assert "8 of" in paths["caption"].read_text()
    # nothing at all: every table still renders, every cell missing
    for name in TABLES:
        empty = write_table(name, pd.DataFrame(), None, tmp_path / "empty")
        cells = pd.read_csv(empty["csv"])
        assert cells["missing"].all()


def test_tables_list_the_software_versions_under_them(frames, tmp_path: Path) -> None:
    """Every table's Markdown ends with the versions its runs used (asft.stack_versions), distinct sets apart."""
    evals, trains, _ = frames
    old = {"torch": "2.13.0", "transformers": "5.19.0", "vllm": "0.32.0"}
    new = {"torch": "2.13.0", "transformers": "5.24.0", "trl": "1.16.0", "peft": "0.21.2", "deepspeed": "0.19.8"}
    evals, trains = evals.copy(), trains.copy()
    evals["stack"] = [old if i % 2 else new for i in range(len(evals))]
    trains["stack"] = [new] * len(trains)
    md = write_table("table1", evals, trains, tmp_path)["md"].read_text().rstrip().splitlines()
    last_row = max(i for i, line in enumerate(md) if line.startswith("| "))
    tail = [line for line in md[last_row + 1 :] if line]
    assert len(tail) == 3, tail
    assert {line.split(": ", 1)[1] for line in tail[:2]} == {
        "torch 2.13.0, transformers 5.19.0, vllm 0.32.0.",
        "torch 2.13.0, transformers 5.24.0, trl 1.16.0, peft 0.21.2, deepspeed 0.19.8.",
    }
    assert all(line.startswith("Software (") and " evaluations)" in line for line in tail[:2])
    assert tail[2].startswith("Software (all ") and "training runs): torch 2.13.0, transformers 5.24.0" in tail[2]


def test_an_ambiguous_selection_raises(frames) -> None:
    evals, trains, _ = frames
    extra = evals[(evals["experiment"] == "table1_medical") & (evals["mode"] == "asft")].copy()
    extra["kl_weight"] = 0.1
    with pytest.raises(ValueError, match="configurations"):
        build_table("table1", pd.concat([evals, extra]), trains)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_files_written(frames, tmp_path: Path, name: str) -> None:
    evals, trains, _ = frames
    paths = write_table(name, evals, trains, tmp_path)
    assert set(paths) == {"csv", "md", "tex", "caption"}
    cells = pd.read_csv(paths["csv"])
    assert list(cells.columns[:3]) == ["table", "row", "block"]
    for column in ("ours", "published", "delta_vs_base", "n", "ci_low", "ci_high", "missing"):
        assert column in cells.columns
    rows, columns = layout_of(name)
    assert len(cells) == len(rows) * len(columns)
    assert list(dict.fromkeys(cells["row"])) == rows
    md = paths["md"].read_text().splitlines()
    assert md[0] == paths["caption"].read_text().strip().replace("\\", "")
    assert sum(line.startswith("| ") for line in md) == len(rows) + 1
    tex = paths["tex"].read_text()
    assert r"\begin{tabular}" in tex and r"\caption{" in tex
    assert tex.count(r"\\") >= len(rows) + 2


def test_table4_costs_gpu_and_cpu(frames, tmp_path: Path) -> None:
    evals, trains, _ = frames
    cells = build_table("table4", evals, trains)
    lora = trains[trains["experiment"] == "table4_lora"].iloc[0]
    assert _cell(cells, "ASFT-LoRA", "Time (h)")["ours"] == pytest.approx(lora["wall_time_s"] / 3600)
    assert _cell(cells, "ASFT-LoRA", "Memory (GB)")["ours"] == pytest.approx(lora["peak_gpu_memory_gb"])
    assert _cell(cells, "ASFT-LoRA", "Memory (GB)")["published"] == pytest.approx(40.70)
    assert _cell(cells, "ASFT", "Time (h)")["published"] == pytest.approx(0.648)
    assert "smoke" not in table_caption("table4", evals, trains).lower()
    smoke_evals, cpu_trains, _ = fabricate(scale="smoke", gpu=False)
    paths = write_table("table4", smoke_evals, cpu_trains, tmp_path)
    md = paths["md"].read_text()
    assert "Memory (GB; host RSS on CPU runs)" in md
    assert md.startswith("Smoke scale: embedded stand-ins, numbers are not comparable.")
    cells = pd.read_csv(paths["csv"])
    memory = cells[cells["column"] == "Memory (GB)"]
    assert (memory.loc[~memory["missing"], "note"] == "host").all()
    host = cpu_trains[cpu_trains["experiment"] == "table4_lora"].iloc[0]["peak_host_memory_gb"]
    assert memory[memory["row"] == "ASFT-LoRA"]["ours"].iloc[0] == pytest.approx(host, abs=1e-3)


# ---------------------------------------------------------------- figures


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_figures_written_with_the_paper_panels(frames, tmp_path: Path, name: str) -> None:
    evals, trains, curves = frames
    figure = render_figure(name, evals, trains, curves)
    try:
        assert len(figure.get_axes()) == len(FIGURES[name].panels)
        assert all(axis.lines or axis.patches for axis in figure.get_axes())
        labels = {text.get_text() for legend in figure.legends for text in legend.get_texts()}
        assert any(label.startswith("paper") for label in labels)
    finally:
        plt.close(figure)
    out = write_figure(name, evals, trains, curves, tmp_path / f"{name}.png")
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"
    caption = (tmp_path / f"{name}.caption.rst").read_text()
    assert FIGURES[name].title in caption and "no result" not in caption


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_figures_survive_missing_data(tmp_path: Path, name: str) -> None:
    out = write_figure(name, pd.DataFrame(), None, None, tmp_path / f"{name}.png")
    assert out.stat().st_size > 1000
    assert "no result" in (tmp_path / f"{name}.caption.rst").read_text()


def test_figure_points_come_from_the_right_runs(frames) -> None:
    evals, trains, curves = frames
    figure = render_figure("fig2", evals, trains, curves)
    try:
        axis = figure.get_axes()[0]
        forward = next(line for line in axis.lines if line.get_label() == "forward KL (ASFT)")
        xs, ys = forward.get_data()
        assert list(xs) == [0.001, 0.005, 0.01, 0.05, 0.1, 0.5]
        expected = evals[
            (evals["experiment"] == "fig2") & (evals["mode"] == "asft") & (evals["benchmark"] == "medqa")
        ].sort_values("kl_weight")
        assert list(ys) == pytest.approx(list(100 * expected["accuracy"]))
        paper = next(line for line in axis.lines if line.get_label() == "paper (forward)")
        assert list(paper.get_data()[1]) == pytest.approx([39.28])
    finally:
        plt.close(figure)
    smoke = fabricate(scale="smoke")
    figure = render_figure("fig1", *smoke)
    try:
        assert "smoke" in figure._suptitle.get_text()
        kl_axis = figure.get_axes()[2]
        dft = next(line for line in kl_axis.lines if line.get_label() == "DFT")
        assert max(dft.get_data()[1]) == pytest.approx(3.0)
    finally:
        plt.close(figure)
