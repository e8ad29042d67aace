"""Obtain models, datasets and benchmarks from a pinned source: the hub, a URL, a local path, or the demo build.

Every source ends as the same local artefact (a model directory, an instruction/response JSONL, a normalised
benchmark JSONL), so the later stages never care where things came from.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from asft.data import iter_json_objects, prepare_dataset_records, write_jsonl
from asft.run_io import atomic_dir, atomic_file, temp_sibling


class SourceError(ValueError):
    """A source that cannot be obtained or does not match its pinned checksum."""


# Query parameters whose values are credentials: API tokens, signed-URL signatures (S3, GCS, Azure SAS), keys.
_SECRET_PARAM = re.compile(r"token|sig|key|pass|pwd|secret|credential|auth|session", re.I)
_REDACTED = "***"


def redact_url(url: str) -> str:
    """`url` fit for a message or a log: the user:password@ part and the values of secret-looking query (and
    fragment) parameters become "***". Every message that shows a source's URL goes through here."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # not parseable, so its secrets cannot be told apart: show none of it
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = _REDACTED + "@" + netloc.rpartition("@")[2]

    def params(text: str) -> str:
        pairs = (pair.partition("=") for pair in text.split("&"))
        return "&".join(k + sep + (_REDACTED if sep and _SECRET_PARAM.search(k) else v) for k, sep, v in pairs)

    return urllib.parse.urlunsplit(
        parts._replace(netloc=netloc, query=params(parts.query), fragment=params(parts.fragment))
    )


def _scrub(text: str, url: str) -> str:
    """`text` (an exception's message) with `url`, its user:password and its secret parameter values redacted
    wherever they appear: urllib quotes URLs, or parts of them, in its errors."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return text.replace(url, redact_url(url))
    secrets = [parts.netloc.rpartition("@")[0], parts.password or ""]
    for params in (parts.query, parts.fragment):
        secrets += [v for k, _, v in (pair.partition("=") for pair in params.split("&")) if _SECRET_PARAM.search(k)]
    text = text.replace(url, redact_url(url))
    for secret in sorted(filter(None, secrets), key=len, reverse=True):  # "user:pw" before "pw" alone
        text = text.replace(secret, _REDACTED)
    return text


def _redact_source(source: dict) -> dict:
    return {k: redact_url(v) if k == "url" and isinstance(v, str) else v for k, v in source.items()}


def _request(url: str) -> urllib.request.Request:
    """urllib does not send a URL's user:password itself (it takes them for part of the host name): they go in a
    Basic Authorization header instead, one that is not repeated on a redirect to another host."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return urllib.request.Request(url)
    request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])))
    user, password = urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or "")
    credentials = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    request.add_unredirected_header("Authorization", f"Basic {credentials}")
    return request


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_url(url: str, sha256: str, dest: Path) -> Path:
    """Download to `dest` and verify the pinned checksum; a mismatch leaves no file behind."""
    with atomic_file(dest) as tmp:
        with tmp.open("wb") as handle:
            try:
                with urllib.request.urlopen(_request(url), timeout=60) as response:  # noqa: S310 - http(s)/file
                    shutil.copyfileobj(response, handle)
            except (OSError, ValueError) as err:  # ValueError: a URL urllib cannot use, and its message quotes it
                # `from None`: a chained traceback would print the unredacted original message.
                raise SourceError(f"{redact_url(url)}: download failed: {_scrub(str(err), url)}") from None
        actual = sha256_of(tmp)
        if actual != sha256:
            raise SourceError(f"{redact_url(url)}: sha256 mismatch: expected {sha256}, got {actual}")
    return dest


def _demo_path(source: dict, demo_dir: Path | None) -> Path:
    if demo_dir is None:
        raise SourceError(f"source {_redact_source(source)} is a demo artefact but no --demo-dir was given")
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
        demo = _demo_path(source, demo_dir)
        with atomic_dir(out_dir) as tmp:
            shutil.copytree(demo, tmp, dirs_exist_ok=True)
    elif "hub" in source:
        from huggingface_hub import snapshot_download

        # Not emptied first: snapshot_download resumes what a killed job already downloaded there.
        tmp = temp_sibling(out_dir)
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
        name = Path(urllib.parse.urlsplit(source["url"]).path).name or "download"  # never the user:password@
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
            origin=json.dumps(_redact_source(dataset["source"]), sort_keys=True),
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
        with atomic_file(out_path) as tmp:
            normalize_benchmark(benchmark["format"], raw, tmp)
    return sum(1 for line in out_path.open(encoding="utf-8") if line.strip())
