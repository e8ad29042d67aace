"""Obtain models, datasets and benchmarks from a pinned source: the hub, a URL, a local path, or the demo build.

Every source ends as the same local artefact (a model directory, an instruction/response JSONL, a normalised
benchmark JSONL), so the later stages never care where things came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from asft.data import iter_json_objects, prepare_dataset_records, write_jsonl


class SourceError(ValueError):
    """A source that cannot be obtained or does not match its pinned checksum."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_url(url: str, sha256: str, dest: Path) -> Path:
    """Download to `dest` and verify the pinned checksum; a mismatch leaves no file behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - schema allows http(s)/file
                shutil.copyfileobj(response, tmp)
        except OSError as err:
            os.unlink(tmp.name)
            raise SourceError(f"{url}: download failed: {err}") from err
    actual = sha256_of(Path(tmp.name))
    if actual != sha256:
        os.unlink(tmp.name)
        raise SourceError(f"{url}: sha256 mismatch: expected {sha256}, got {actual}")
    os.replace(tmp.name, dest)
    return dest


def _demo_path(source: dict, demo_dir: Path | None) -> Path:
    if demo_dir is None:
        raise SourceError(f"source {source} is a demo artefact but no --demo-dir was given")
    path = Path(demo_dir) / source["demo"]
    if not path.exists():
        raise SourceError(f"{path}: demo artefact missing; run `asft build-demo` first")
    return path


def fetch_model(source: dict, out_dir: Path, demo_dir: Path | None = None) -> Path:
    """Materialise a model directory at `out_dir` (a symlink for local paths, so nothing large is copied)."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or out_dir.is_file():
        out_dir.unlink()
    elif out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if "path" in source:
        target = Path(source["path"]).expanduser().resolve()
        if not (target / "config.json").exists():
            raise SourceError(f"{target}: not a model directory (no config.json)")
        out_dir.symlink_to(target, target_is_directory=True)
    elif "demo" in source:
        shutil.copytree(_demo_path(source, demo_dir), out_dir)
    elif "hub" in source:
        from huggingface_hub import snapshot_download

        tmp = out_dir.with_name(out_dir.name + ".tmp")
        snapshot_download(
            repo_id=source["hub"],
            revision=source["revision"],
            local_dir=tmp,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
        )
        os.replace(tmp, out_dir)
    else:
        raise SourceError(f"models can come from hub, path or demo, not {sorted(source)}")
    return out_dir


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a local JSONL/JSON/Parquet/CSV file, via `datasets` for anything but plain JSONL."""
    if path.suffix == ".jsonl":
        return [record for _, record in iter_json_objects(path, SourceError)]
    from datasets import load_dataset

    kind = {".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
    if kind is None:
        raise SourceError(f"{path}: unsupported file type {path.suffix!r} (jsonl, json, parquet, csv)")
    return list(load_dataset(kind, data_files=str(path), split="train"))


def source_rows(source: dict, work_dir: Path, demo_dir: Path | None = None) -> Iterable[dict[str, Any]]:
    """The raw rows a dataset or benchmark source points at."""
    if "path" in source:
        path = Path(source["path"]).expanduser()
        if not path.exists():
            raise SourceError(f"{path}: no such file")
        return _read_rows(path)
    if "demo" in source:
        return _read_rows(_demo_path(source, demo_dir))
    if "url" in source:
        name = Path(source["url"].split("?")[0]).name or "download"
        return _read_rows(download_url(source["url"], source["sha256"], work_dir / name))
    if "hub" in source:
        if "filename" in source:
            from huggingface_hub import hf_hub_download

            local = hf_hub_download(
                repo_id=source["hub"],
                filename=source["filename"],
                revision=source["revision"],
                repo_type="dataset",
                local_dir=work_dir,
            )
            return _read_rows(Path(local))
        from datasets import load_dataset

        return list(
            load_dataset(source["hub"], source.get("subset"), revision=source["revision"], split=source["split"])
        )
    raise SourceError(f"unsupported source {sorted(source)}")


def fetch_dataset(dataset: dict, out_path: Path, demo_dir: Path | None = None) -> int:
    """Write the instruction/response JSONL a training run reads; returns the record count."""
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(dir=out_path.parent if out_path.parent.exists() else None) as work:
        rows = source_rows(dataset["source"], Path(work), demo_dir)
        records = prepare_dataset_records(
            rows,
            dataset.get("fields", {}),
            dataset.get("max_samples"),
            dataset.get("shuffle_seed", 42),
            origin=json.dumps(dataset["source"], sort_keys=True),
        )
    return write_jsonl(out_path, records)


def fetch_benchmark(benchmark: dict, out_path: Path, demo_dir: Path | None = None) -> int:
    """Write the normalised benchmark JSONL (id, question, gold, choices, kind); returns the problem count."""
    from asft.config import source_list
    from asft.evaluation.benchmarks import normalize_benchmark

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sources = source_list(benchmark)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as work:
        local = None
        if len(sources) == 1 and "path" in sources[0]:
            local = Path(sources[0]["path"]).expanduser()
        elif len(sources) == 1 and "demo" in sources[0]:
            local = _demo_path(sources[0], demo_dir)
        if local is not None and local.suffix == ".jsonl":
            raw = local  # normalise in place so format errors name the user's own file and line
        else:
            raw = Path(work) / "raw.jsonl"
            rows = (row for source in sources for row in source_rows(source, Path(work), demo_dir))
            write_jsonl(raw, rows)
        tmp = out_path.with_name(out_path.name + ".tmp")
        normalize_benchmark(benchmark["format"], raw, tmp)
        os.replace(tmp, out_path)
    return sum(1 for line in out_path.open(encoding="utf-8") if line.strip())
