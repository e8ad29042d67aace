"""Sources: local paths, checksummed URLs and the hub call (exercised on local files, no network)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from asft import fetch
from asft.data import DataFormatError, read_instruction_jsonl
from asft.fetch import SourceError, download_url, fetch_dataset, fetch_model


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dataset_from_path_maps_fields_and_caps_size(tmp_path: Path) -> None:
    rows = [{"problem": f"p{i}", "solution": f"s{i}", "extra": i} for i in range(10)]
    src = _write_rows(tmp_path / "raw.jsonl", rows)
    out = tmp_path / "out" / "train.jsonl"
    spec = {"source": {"path": str(src)}, "fields": {"instruction": "problem", "response": "solution"}}
    assert fetch_dataset({**spec, "max_samples": 4, "shuffle_seed": 1}, out) == 4
    records = read_instruction_jsonl(out)
    assert len(records) == 4 and all(r["instruction"].startswith("p") for r in records)
    # The same seed picks the same subset; the whole file without a cap keeps the order.
    again = tmp_path / "again.jsonl"
    fetch_dataset({**spec, "max_samples": 4, "shuffle_seed": 1}, again)
    assert again.read_text() == out.read_text()
    fetch_dataset(spec, again)
    assert [r["instruction"] for r in read_instruction_jsonl(again)] == [f"p{i}" for i in range(10)]


def test_dataset_missing_column_names_the_row(tmp_path: Path) -> None:
    src = _write_rows(tmp_path / "raw.jsonl", [{"instruction": "a", "response": "b"}, {"instruction": "c"}])
    with pytest.raises(DataFormatError, match="row 1: missing or non-string column"):
        fetch_dataset({"source": {"path": str(src)}}, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_url_source_verifies_sha256(tmp_path: Path) -> None:
    src = _write_rows(tmp_path / "remote.jsonl", [{"instruction": "a", "response": "b"}])
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = download_url(src.as_uri(), digest, tmp_path / "dl" / "remote.jsonl")
    assert dest.read_bytes() == src.read_bytes()
    with pytest.raises(SourceError, match="sha256 mismatch"):
        download_url(src.as_uri(), "0" * 64, tmp_path / "dl2" / "remote.jsonl")
    assert not list((tmp_path / "dl2").iterdir())  # nothing half-written is left
    out = tmp_path / "train.jsonl"
    assert fetch_dataset({"source": {"url": src.as_uri(), "sha256": digest}}, out) == 1


def test_model_from_path_is_linked_not_copied(tmp_path: Path) -> None:
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "resources" / "models" / "m"
    fetch_model({"path": str(model)}, out)
    assert out.is_symlink() and (out / "config.json").exists()
    with pytest.raises(SourceError, match="not a model directory"):
        fetch_model({"path": str(tmp_path)}, out)


def test_hub_model_download_pins_the_revision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {}

    def fake_snapshot_download(**kwargs):  # stands in for the network; the call itself is what we check
        calls.update(kwargs)
        Path(kwargs["local_dir"]).mkdir(parents=True)
        (Path(kwargs["local_dir"]) / "config.json").write_text("{}")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = tmp_path / "models" / "qwen"
    fetch.fetch_model({"hub": "Qwen/Qwen2.5-7B", "revision": "abc123"}, out)
    assert calls["repo_id"] == "Qwen/Qwen2.5-7B" and calls["revision"] == "abc123"
    assert (out / "config.json").exists() and not out.with_name("qwen.tmp").exists()


def test_demo_source_requires_the_build(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="run `asft build-demo` first"):
        fetch_model({"demo": "model"}, tmp_path / "m", demo_dir=tmp_path / "nowhere")


def test_paper_benchmark_checksums_match_the_real_files(tmp_path: Path) -> None:
    """The pinned sha256 values in config/paper.yaml are those of the benchmark files we test with."""
    from asft.config import load_config
    from asft.fetch import fetch_benchmark
    from tests.conftest import REPO, SHARED_BENCHMARKS

    if not SHARED_BENCHMARKS.exists():
        pytest.skip("shared benchmark files not present")
    benchmarks = load_config(REPO / "config" / "paper.yaml")["benchmarks"]
    for name in ("aime24", "amc23", "gsm8k"):
        local = SHARED_BENCHMARKS / name / "test.jsonl"
        entry = {"format": name, "source": {"url": local.as_uri(), "sha256": benchmarks[name]["source"]["sha256"]}}
        count = fetch_benchmark(entry, tmp_path / f"{name}.jsonl")
        assert count == sum(1 for line in local.read_text().splitlines() if line.strip())


def test_benchmark_sources_in_a_list_are_concatenated(tmp_path: Path) -> None:
    """MMLU's medical subjects come as one hub repo each; the benchmark is their rows in order."""
    from asft.fetch import fetch_benchmark

    rows = [
        {"subject": s, "question": f"{s}?", "choices": ["a", "b", "c", "d"], "answer": i} for i, s in enumerate("xy")
    ]
    first, second = tmp_path / "x.jsonl", tmp_path / "y.jsonl"
    first.write_text(json.dumps(rows[0]) + "\n")
    second.write_text(json.dumps(rows[1]) + "\n")
    entry = {"format": "mmlu_medical", "source": [{"path": str(first)}, {"path": str(second)}]}
    out = tmp_path / "out" / "mmlu.jsonl"
    assert fetch_benchmark(entry, out) == 2
    normalised = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["question"], r["gold"]) for r in normalised] == [("0", "x?", "A"), ("1", "y?", "B")]
