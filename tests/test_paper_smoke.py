"""The paper's whole DAG: planned at full scale, and run end to end at the smoke scale on embedded stand-ins.

The smoke run renders every table and figure of the catalogue from real (tiny) training and evaluation jobs;
its tables must have exactly the paper's rows and columns, with the published numbers beside ours.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from asft import layout
from asft.paper import FIGURES, TABLES, layout_of
from asft.paper.reference import reference_table
from asft.paper.targets import paper_target_names
from tests.conftest import REPO
from tests.test_workflow import WORKFLOW_FILES, planned_jobs, snakemake_env

# `--configfile` and `--config` take every following word as theirs: targets go before them
SMOKE = ("--configfile", "config/paper.yaml", "--config", "scale=smoke")


def _snakemake(workdir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", *args],
        cwd=workdir,
        env=snakemake_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _copy_workflow(workdir: Path) -> Path:
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, workdir / name, symlinks=True, ignore=shutil.ignore_patterns("smoke"))
        else:
            shutil.copy(source, workdir / name)
    (workdir / "src").symlink_to(REPO / "src")
    return workdir


def test_the_full_paper_config_plans_every_experiment(tmp_path: Path) -> None:
    workdir = _copy_workflow(tmp_path)
    jobs = planned_jobs(_snakemake(workdir, "paper", "-n", "--configfile", "config/paper.yaml"))
    # the 137 trained runs less fork_all_linear's 6 and alpaca_eval's 3 (not in `paper`), 9 LoRA merges, every
    # table and figure of the paper
    assert jobs["train"] == 128 and jobs["merge"] == 9
    assert jobs["paper_table"] == len(set(TABLES) & set(paper_target_names())) and jobs["paper_figure"] == len(FIGURES)
    assert jobs["evaluate_snapshot"] == 4 * 9 * 2  # Figure 1: 4 modes x 9 snapshots x 2 benchmarks
    one = planned_jobs(_snakemake(workdir, "table4", "-n", "--configfile", "config/paper.yaml"))
    assert one["train"] == 8 and "paper_figure" not in one  # Table 4: 4 medical 10k runs, ASFT-LoRA, IW-SFT, RL
    two = planned_jobs(_snakemake(workdir, "table2", "-n", "--configfile", "config/paper.yaml"))
    # Table 1's 4 medical 10k runs (SFT and ASFT also the continual runs' parents), IW-SFT, GRPO, DAPO, SFT+DAPO,
    # ASFT+DAPO
    assert two["train"] == 9
    three = planned_jobs(_snakemake(workdir, "table3", "-n", "--configfile", "config/paper.yaml"))
    assert three["train"] == 4 and three["evaluate_run"] == 16 and three["evaluate_base"] == 4


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = _copy_workflow(tmp_path_factory.mktemp("paper"))
    result = _snakemake(workdir, "paper", *SMOKE, timeout=2400)
    smoke = workdir / "smoke"
    logs = "\n".join(p.read_text()[-1500:] for p in (smoke / "logs").rglob("*.log")) if result.returncode else ""
    assert result.returncode == 0, result.stderr[-5000:] + logs
    return smoke


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in paper_target_names() if name in TABLES])
def test_smoke_tables_have_the_papers_layout(smoke_run: Path, name: str) -> None:
    files = {kind: smoke_run / path for kind, path in layout.paper_table_files(name).items()}
    assert all(path.stat().st_size > 0 for path in files.values())
    cells = pd.read_csv(files["csv"])
    rows, columns = layout_of(name)
    assert list(dict.fromkeys(cells["row"])) == rows
    assert list(dict.fromkeys(cells["column"])) == columns
    # every cell we built has a number; the published value sits beside it wherever the paper has one
    built = cells[cells["note"] != "not built"] if "note" in cells else cells
    assert built["ours"].notna().all(), built[built["ours"].isna()][["row", "column"]]
    assert cells["published"].notna().sum() > 0
    assert "Smoke scale" in files["md"].read_text()
    if name == "table1":
        reference = reference_table("asft_paper_table1.csv")
        asft_10k = cells[(cells["row"] == "10k · ASFT") & (cells["column"] == "MedQA")]
        published = reference[(reference["train_size"] == "10k") & (reference["method"] == "asft")]["medqa"]
        assert asft_10k["published"].iloc[0] == pytest.approx(float(published.iloc[0]))  # the CSV is read as text


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FIGURES))
def test_smoke_figures_are_rendered(smoke_run: Path, name: str) -> None:
    files = layout.paper_figure_files(name)
    png = smoke_run / files["png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "Smoke scale" in (smoke_run / files["caption"]).read_text()


@pytest.mark.slow
def test_smoke_run_has_nothing_left_to_do(smoke_run: Path) -> None:
    assert planned_jobs(_snakemake(smoke_run.parent, "-n", "paper", *SMOKE)) == {}
