"""Obtain models, datasets and benchmarks from a pinned source: the hub, a URL, a local path, or the demo build.

Every source ends as the same local artefact (a model directory, an instruction/response JSONL, a normalised
benchmark JSONL), so the later stages never care where things came from. Beside it a sidecar records what was
resolved (hub commit, sha256 of every file read), and a lock entry, when given, pins both (asft.source_lock).
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import os
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from asft.data import iter_json_objects, prepare_dataset_records, write_jsonl
from asft.dataset_formats import convert_rows
from asft.run_io import atomic_dir, atomic_file, temp_sibling
from asft.source_lock import (
    MODEL_SIDECAR,
    SourceError,
    check_entry,
    hash_tree,
    resolve_commit,
    sha256_of,
    sidecar_of,
    verify_files,
    write_sidecar,
)

__all__ = ["SourceError", "download_url", "fetch_benchmark", "fetch_dataset", "fetch_model", "redact_url", "sha256_of"]

logger = logging.getLogger(__name__)

Lock = dict[str, Any] | None


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


# Model files worth downloading: weights, configs, tokenizers, chat templates (not training states or READMEs).
_MODEL_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def _hub_commit(source: dict, repo_type: str, lock: Lock) -> str:
    """The commit to download: the locked one when there is a lock entry (never the branch head), else what
    the source's revision points at now."""
    if lock is not None:
        return check_entry(lock, source["hub"], source["revision"], repo_type)
    return resolve_commit(source["hub"], source["revision"], repo_type)


def _hub_record(source: dict, repo_type: str, commit: str, files: dict[str, str], lock: Lock) -> dict[str, Any]:
    """A hub source's sidecar record, its files checked against the lock entry first when there is one."""
    if lock is not None:
        verify_files(lock, files)
    return {
        "kind": "hub",
        "repo": source["hub"],
        "repo_type": repo_type,
        "revision": source["revision"],
        "commit": commit,
        "files": files,
        "lock": None if lock is None else lock.get("key", "lock entry"),
    }


def _refuse_lock(source: dict, lock: Lock) -> None:
    if lock is not None:
        raise SourceError(
            f"{lock.get('key', 'lock entry')}: the lock pins hub {lock.get('repo')}, but the source is "
            f"{sorted(_redact_source(source))}; rerun `asft lock --update`"
        )


def _reuse_partial_snapshot(tmp: Path, commit: str) -> None:
    """Keep a killed job's partial download (snapshot_download resumes it) only if it is of the same commit:
    files of another commit left in it would end up in the model."""
    marker = tmp / ".cache" / "asft-commit"
    if tmp.exists() and (not marker.exists() or marker.read_text() != commit):
        shutil.rmtree(tmp)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(commit)


def fetch_model(source: dict, out_dir: Path, demo_dir: Path | None = None, lock: Lock = None) -> Path:
    """Materialise a model directory at `out_dir` (a symlink for local paths, so nothing large is copied).

    Hub and demo models carry a sidecar inside (`.asft-source.json`); a local path gets none, since the
    directory is the user's own and nothing was resolved.
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or out_dir.is_file():
        out_dir.unlink()
    elif out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if "hub" not in source:
        _refuse_lock(source, lock)
    if "path" in source:
        target = Path(source["path"]).expanduser().resolve()
        if not (target / "config.json").exists():
            raise SourceError(f"{target}: not a model directory (no config.json)")
        out_dir.symlink_to(target, target_is_directory=True)
    elif "demo" in source:
        demo = _demo_path(source, demo_dir)
        with atomic_dir(out_dir) as tmp:
            shutil.copytree(demo, tmp, dirs_exist_ok=True)
            record = {"kind": "demo", "demo": source["demo"], "files": hash_tree(tmp), "lock": None}
            write_sidecar(tmp / MODEL_SIDECAR, [record])
    elif "hub" in source:
        from huggingface_hub import snapshot_download

        commit = _hub_commit(source, "model", lock)
        # Not emptied first: snapshot_download resumes what a killed job already downloaded there.
        tmp = temp_sibling(out_dir)
        _reuse_partial_snapshot(tmp, commit)
        snapshot_download(repo_id=source["hub"], revision=commit, local_dir=tmp, allow_patterns=_MODEL_PATTERNS)
        record = _hub_record(source, "model", commit, hash_tree(tmp), lock)
        write_sidecar(tmp / MODEL_SIDECAR, [record])
        os.replace(tmp, out_dir)
    else:
        raise SourceError(f"models can come from hub, path or demo, not {sorted(source)}")
    return out_dir


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a local JSONL/JSON/Parquet/CSV file, via `datasets` for anything but plain JSONL."""
    if path.suffix == ".jsonl":
        return [record for _, record in iter_json_objects(path, SourceError)]
    if path.name.endswith(".jsonl.gz"):
        # evalplus publishes its benchmarks so. Read line by line, not through `datasets`: Arrow would unify the
        # problems' differently typed test inputs into one column type (ints become floats) or refuse them.
        # unpacked in a folder of its own: a `path:` source's directory is the user's, never written to
        with tempfile.TemporaryDirectory() as tmp:
            plain = Path(tmp) / path.name.removesuffix(".gz")
            try:
                with gzip.open(path, "rb") as packed, plain.open("wb") as unpacked:
                    shutil.copyfileobj(packed, unpacked)
            except (gzip.BadGzipFile, EOFError) as err:
                raise SourceError(f"{path}: not a readable gzip file ({err})") from err
            return [record for _, record in iter_json_objects(plain, SourceError)]
    from datasets import load_dataset

    kind = {".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
    if kind is None:
        raise SourceError(f"{path}: unsupported file type {path.suffix!r} (jsonl, jsonl.gz, json, parquet, csv)")
    return list(load_dataset(kind, data_files=str(path), split="train"))


def _local_record(source: dict, path: Path) -> dict[str, Any]:
    kind = "path" if "path" in source else "demo"
    return {"kind": kind, kind: source[kind], "files": {path.name: sha256_of(path)}, "lock": None}


def _hub_rows(source: dict, work_dir: Path, lock: Lock) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of a hub dataset repo at one commit: one file of it (`filename`) or a split of the whole repo."""
    commit = _hub_commit(source, "dataset", lock)
    if "filename" in source:
        from huggingface_hub import hf_hub_download

        local = Path(
            hf_hub_download(
                repo_id=source["hub"],
                filename=source["filename"],
                revision=commit,
                repo_type="dataset",
                local_dir=work_dir / "hub",
            )
        )
        record = _hub_record(source, "dataset", commit, {source["filename"]: sha256_of(local)}, lock)
        return _read_rows(local), record
    from datasets import load_dataset
    from huggingface_hub import snapshot_download

    # The repo's files are downloaded here, not inside `datasets`, so that each one's sha256 can be recorded
    # and checked; `datasets` then reads the local copy exactly as it would read the repo.
    snapshot = Path(
        snapshot_download(repo_id=source["hub"], repo_type="dataset", revision=commit, local_dir=work_dir / "hub")
    )
    record = _hub_record(source, "dataset", commit, hash_tree(snapshot), lock)
    return list(load_dataset(str(snapshot), source.get("subset"), split=source["split"])), record


def _obtain(
    source: dict, work_dir: Path, demo_dir: Path | None, lock: Lock
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The raw rows a dataset or benchmark source points at, and the sidecar record of where they came from."""
    if "hub" not in source:
        _refuse_lock(source, lock)
    if "path" in source or "demo" in source:
        path = Path(source["path"]).expanduser() if "path" in source else _demo_path(source, demo_dir)
        if not path.exists():
            raise SourceError(f"{path}: no such file")
        return _read_rows(path), _local_record(source, path)
    if "url" in source:
        name = Path(urllib.parse.urlsplit(source["url"]).path).name or "download"  # never the user:password@
        local = download_url(source["url"], source["sha256"], work_dir / name)
        record = {
            "kind": "url",
            "url": redact_url(source["url"]),
            "sha256": source["sha256"],
            "files": {name: source["sha256"]},
            "lock": None,
        }
        return _read_rows(local), record
    if "hub" in source:
        work_dir.mkdir(parents=True, exist_ok=True)
        return _hub_rows(source, work_dir, lock)
    raise SourceError(f"unsupported source {sorted(source)}")


def source_rows(source: dict, work_dir: Path, demo_dir: Path | None = None) -> Iterable[dict[str, Any]]:
    """The raw rows a dataset or benchmark source points at."""
    return _obtain(source, Path(work_dir), demo_dir, None)[0]


def fetch_dataset(dataset: dict, out_path: Path, demo_dir: Path | None = None, lock: Lock = None) -> int:
    """Write the instruction/response JSONL a training run reads and its sidecar; returns the record count."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = sidecar_of(out_path)
    sidecar.unlink(missing_ok=True)  # a sidecar left from an earlier fetch must never describe this output
    fmt = dataset.get("format", "instruction_response")
    skipped: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(dir=out_path.parent) as work:
        rows, record = _obtain(dataset["source"], Path(work), demo_dir, lock)
        records = prepare_dataset_records(
            convert_rows(fmt, rows, skipped),
            dataset.get("fields", {}) if fmt == "instruction_response" else {},
            dataset.get("max_samples"),
            dataset.get("shuffle_seed", 42),
            origin=json.dumps(_redact_source(dataset["source"]), sort_keys=True),
        )
    if skipped:
        logger.info("%s rows skipped: %s", fmt, ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
    # The sidecar is renamed into place before the output, so an output that exists has its own sidecar.
    with atomic_file(out_path) as tmp:
        count = write_jsonl(tmp, records)
        output = {"file": out_path.name, "sha256": sha256_of(tmp)}
        write_sidecar(sidecar, [record], format=fmt, records=count, skipped=dict(skipped), output=output)
    return count


def _benchmark_locks(lock: Lock | list[Lock], count: int) -> list[Lock]:
    """One lock entry (or None) per source: a single entry stands for a single source."""
    if lock is None:
        return [None] * count
    locks = [lock] if isinstance(lock, dict) else list(lock)
    if len(locks) != count:
        raise SourceError(f"{len(locks)} lock entries for {count} benchmark sources")
    return locks


def fetch_benchmark(
    benchmark: dict, out_path: Path, demo_dir: Path | None = None, lock: Lock | list[Lock] = None
) -> int:
    """Write the normalised benchmark JSONL (id, question, gold, choices, kind) and its sidecar; returns the
    problem count."""
    from asft.config import source_list
    from asft.evaluation.benchmarks import normalize_benchmark

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = sidecar_of(out_path)
    sidecar.unlink(missing_ok=True)
    sources = source_list(benchmark)
    locks = _benchmark_locks(lock, len(sources))
    with tempfile.TemporaryDirectory(dir=out_path.parent) as work:
        local = None
        if len(sources) == 1 and "path" in sources[0]:
            local = Path(sources[0]["path"]).expanduser()
        elif len(sources) == 1 and "demo" in sources[0]:
            local = _demo_path(sources[0], demo_dir)
        if local is not None and local.suffix == ".jsonl":
            _refuse_lock(sources[0], locks[0])
            raw = local  # normalise in place so format errors name the user's own file and line
            records = [_local_record(sources[0], local)]
        else:
            raw = Path(work) / "raw.jsonl"
            records = []
            rows: list[dict[str, Any]] = []
            for index, (source, source_lock) in enumerate(zip(sources, locks, strict=True)):
                got, record = _obtain(source, Path(work) / f"source{index}", demo_dir, source_lock)
                rows.extend(got)
                records.append(record)
            write_jsonl(raw, rows)
        with atomic_file(out_path) as tmp:
            normalize_benchmark(benchmark["format"], raw, tmp)
            count = sum(1 for line in tmp.open(encoding="utf-8") if line.strip())
            output = {"file": out_path.name, "sha256": sha256_of(tmp)}
            write_sidecar(sidecar, records, format=benchmark["format"], records=count, output=output)
    return count
