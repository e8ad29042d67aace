"""What each fetch resolved (hub commit, sha256 of every file), recorded beside its output and pinned in a lock.

A hub `revision` may be a branch such as `main`, whose head moves. Every fetch therefore writes a sidecar with
the commit it downloaded and the sha256 of each file it read. `asft lock` gathers the sidecars into a checked-in
lock file (config key `source_lock`); a fetch given its lock entry downloads the locked commit, not the branch
head, and refuses any file whose sha256 differs from the lock.

Sidecar (`resources/datasets/<name>.source.json`, `resources/benchmarks/<name>.source.json`,
`resources/models/<name>/.asft-source.json`):
    {"asft_source": 1, "sources": [{"kind": "hub", "repo", "repo_type", "revision", "commit",
     "files": {name: sha256}, "lock": "<lock key>" | null}, ...], ...}   (lock null = fetched unlocked)
Lock file:
    {"asft_source_lock": 1, "entries": {"models.<name>" | "datasets.<name>" | "benchmarks.<name>[i]":
     {"repo", "repo_type", "revision", "commit", "files": {name: sha256}}}}
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from asft.run_io import write_text_atomic

SIDECAR_VERSION = 1
LOCK_VERSION = 1
MODEL_SIDECAR = ".asft-source.json"
ENTRY_FIELDS = ("repo", "repo_type", "revision", "commit", "files")
KINDS = ("models", "datasets", "benchmarks")
# Files a download tool keeps for itself inside the folder it fills; they are no part of the artefact.
_NOT_CONTENT = (".cache", MODEL_SIDECAR)


class SourceError(ValueError):
    """A source that cannot be obtained or does not match its pinned checksum or lock entry."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file below `root`, keyed by its POSIX path relative to `root`, download caches left out."""
    root = Path(root)
    files = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if relative.parts[0] in _NOT_CONTENT or not path.is_file():
            continue
        files[relative.as_posix()] = sha256_of(path)
    return files


def resolve_commit(repo: str, revision: str, repo_type: str) -> str:
    """The commit `revision` (branch, tag or commit) of a hub repo points at now."""
    from huggingface_hub import HfApi

    try:
        sha = HfApi().repo_info(repo_id=repo, revision=revision, repo_type=repo_type).sha
    except Exception as err:  # network, auth, unknown repo or revision: all end the fetch the same way
        raise SourceError(f"hub {repo_type} {repo}@{revision}: cannot resolve the revision: {err}") from err
    if not sha:
        raise SourceError(f"hub {repo_type} {repo}@{revision}: the hub returned no commit")
    return sha


def lock_key(kind: str, name: str, index: int | None = None) -> str:
    """The lock file's key of one source: `datasets.x`, `models.x`, or `benchmarks.x[i]` (benchmarks may list
    several sources, so theirs always carries the index)."""
    return f"{kind}.{name}" if kind != "benchmarks" else f"{kind}.{name}[{0 if index is None else index}]"


def check_entry(entry: Mapping[str, Any], repo: str, revision: str, repo_type: str) -> str:
    """The commit to download for a source under lock `entry`; refuses an entry written for another repo or
    revision, since the config then asks for something the lock never saw."""
    key = entry.get("key", "lock entry")
    missing = [field for field in ENTRY_FIELDS if field not in entry]
    if missing:
        raise SourceError(f"{key}: lock entry lacks {missing}")
    asked = (repo, revision, repo_type)
    locked = (entry["repo"], entry["revision"], entry["repo_type"])
    if asked != locked:
        raise SourceError(
            f"{key}: the lock pins {locked[2]} {locked[0]}@{locked[1]} but the config asks for "
            f"{repo_type} {repo}@{revision}; rerun `asft lock --update` after fetching"
        )
    return str(entry["commit"])


def verify_files(entry: Mapping[str, Any], files: Mapping[str, str]) -> None:
    """Refuse any downloaded file whose sha256 differs from the lock, and a download that lacks or adds files."""
    key = entry.get("key", "lock entry")
    locked: Mapping[str, str] = entry["files"]
    for name, actual in sorted(files.items()):
        if name not in locked:
            raise SourceError(f"{key}: {name}: downloaded but not in the lock (commit {entry['commit']})")
        if locked[name] != actual:
            raise SourceError(f"{key}: {name}: sha256 {actual} differs from the locked {locked[name]}")
    absent = sorted(set(locked) - set(files))
    if absent:
        raise SourceError(f"{key}: locked file(s) {absent} were not downloaded (commit {entry['commit']})")


def sidecar_of(output: Path) -> Path:
    """Where a dataset's or benchmark's sidecar lies: beside its JSONL (`x.jsonl` -> `x.source.json`); a model
    directory holds its own (`MODEL_SIDECAR`), so it moves with the directory's atomic rename."""
    output = Path(output)
    return output / MODEL_SIDECAR if output.suffix != ".jsonl" else output.with_suffix(".source.json")


def write_sidecar(path: Path, sources: list[dict[str, Any]], **extra: Any) -> None:
    record = {"asft_source": SIDECAR_VERSION, "sources": sources, **extra}
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_lock(path: Path | None) -> dict[str, dict[str, Any]]:
    """The entries of a lock file; none when there is no lock (path null) or it was not written yet."""
    if path is None or not Path(path).exists():
        return {}
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SourceError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(record, dict) or record.get("asft_source_lock") != LOCK_VERSION:
        raise SourceError(f"{path}: not an asft lock file (version {LOCK_VERSION})")
    return dict(record.get("entries", {}))


def write_lock(path: Path, entries: Mapping[str, dict[str, Any]]) -> None:
    record = {"asft_source_lock": LOCK_VERSION, "entries": dict(sorted(entries.items()))}
    write_text_atomic(Path(path), json.dumps(record, indent=2, sort_keys=True) + "\n")


def lock_for(entries: Mapping[str, dict[str, Any]], kind: str, name: str, n_sources: int = 1) -> Any:
    """The value of a fetch command's `--lock` option: the entry (with its key) for a model or dataset, a list
    with one entry or null per source for a benchmark, or null when nothing of it is locked."""
    if kind != "benchmarks":
        entry = entries.get(lock_key(kind, name))
        return None if entry is None else {**entry, "key": lock_key(kind, name)}
    keys = [lock_key(kind, name, i) for i in range(n_sources)]
    listed = [None if key not in entries else {**entries[key], "key": key} for key in keys]
    return listed if any(listed) else None


def _artefact_path(resources: Path, kind: str, name: str) -> Path:
    from asft import layout

    template = {"models": layout.model_dir, "datasets": layout.dataset_file, "benchmarks": layout.benchmark_file}
    relative = Path(template[kind](name)).relative_to(layout.RESOURCES)
    return sidecar_of(Path(resources) / relative)


def collect_lock(
    configs: Iterable[Mapping[str, Any]],
    resources: Path,
    existing: Mapping[str, dict[str, Any]],
    update: bool = False,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The lock entries of every hub source the configs name that has been fetched, merged into `existing`.

    Returns the new entries and notes on sources left out (not fetched yet, or fetched from another revision
    than the config now asks for). A locked commit or file hash changes only with `update`; otherwise that is
    an error naming the entry, since a lock that silently follows a branch pins nothing.
    """
    from asft.matrix import source_list

    merged = dict(existing)
    notes = []
    seen: dict[str, Any] = {}
    for config in configs:
        for kind in KINDS:
            for name, item in config.get(kind, {}).items():
                sidecar_path = _artefact_path(resources, kind, name)
                for index, source in enumerate(source_list(item)):
                    if "hub" not in source:
                        continue
                    key = lock_key(kind, name, index)
                    if key in seen and seen[key] != source:
                        raise SourceError(f"{key}: the configs give it different sources")
                    seen[key] = source
                    entry = _sidecar_entry(sidecar_path, index, source, notes, key)
                    if entry is None:
                        continue
                    old = merged.get(key)
                    if old is not None and old != entry and not update:
                        raise SourceError(
                            f"{key}: locked at {old.get('revision')} = {old.get('commit')}, fetched "
                            f"{entry['revision']} = {entry['commit']}"
                            + (" with other files" if old.get("commit") == entry["commit"] else "")
                            + "; pass --update to change the lock"
                        )
                    merged[key] = entry
    return merged, notes


def _sidecar_entry(
    path: Path, index: int, source: Mapping[str, Any], notes: list[str], key: str
) -> dict[str, Any] | None:
    if not path.exists():
        notes.append(f"{key}: not fetched ({path} missing); left as it was")
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    fetched = record.get("sources", [])
    if index >= len(fetched) or fetched[index].get("kind") != "hub":
        notes.append(f"{key}: {path} records no hub source {index}; left as it was")
        return None
    got = fetched[index]
    if (got.get("repo"), got.get("revision")) != (source["hub"], source["revision"]):
        notes.append(
            f"{key}: {path} is from {got.get('repo')}@{got.get('revision')}, the config asks for "
            f"{source['hub']}@{source['revision']}; fetch it again first"
        )
        return None
    return {field: got[field] for field in ENTRY_FIELDS}
