"""Sources: local paths, checksummed URLs, hub downloads, sidecars and the lock (on local files, no network)."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from asft import fetch
from asft.cli import main as asft_main
from asft.data import DataFormatError, read_instruction_jsonl
from asft.dataset_formats import medmcqa_pair
from asft.fetch import SourceError, download_url, fetch_benchmark, fetch_dataset, fetch_model
from asft.source_lock import lock_for, read_lock, sidecar_of


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


def test_demo_source_requires_the_build(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="run `asft build-demo` first"):
        fetch_model({"demo": "model"}, tmp_path / "m", demo_dir=tmp_path / "nowhere")


def test_paper_benchmark_checksums_match_the_real_files(tmp_path: Path) -> None:
    """The pinned sha256 values in config/paper.yaml are those of the benchmark files we test with."""
    from asft.config import load_config
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


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:secret@host.org/a/b.jsonl?token=abc&name=x", "https://***@host.org/a/b.jsonl?token=***&name=x"),
        (
            "https://host/x?X-Amz-Signature=s&X-Amz-Credential=c&v=1",
            "https://host/x?X-Amz-Signature=***&X-Amz-Credential=***&v=1",
        ),
        (
            "https://host:8080/x?sig=s&api_key=k&password=p#access_token=t",
            "https://host:8080/x?sig=***&api_key=***&password=***#access_token=***",
        ),
        ("https://ghp_token@host/x.jsonl", "https://***@host/x.jsonl"),
        ("file:///data/train.jsonl", "file:///data/train.jsonl"),
        ("http://[::1", "<unparseable URL>"),
    ],
    ids=["userinfo-and-token", "s3-signature", "fragment", "token-as-user", "file", "unparseable"],
)
def test_redact_url(url: str, shown: str) -> None:
    assert fetch.redact_url(url) == shown


class _Server(http.server.BaseHTTPRequestHandler):
    """Serves BODY to requests carrying the Basic credentials user:secret, and 401 to any other."""

    BODY = json.dumps({"instruction": "a", "response": "b"}).encode() + b"\n"
    seen: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        auth = self.headers.get("Authorization")
        self.seen.append(auth)
        ok = auth == "Basic " + base64.b64encode(b"user:secret").decode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", str(len(self.BODY) if ok else 0))
        self.end_headers()
        if ok:
            self.wfile.write(self.BODY)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A local HTTP server (no network); proxies from the environment are bypassed for it."""
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_credentials_are_sent_and_never_shown(server: str, tmp_path: Path) -> None:
    """user:password@ becomes a Basic Authorization header (urllib would take it for part of the host name), and
    no error message repeats the password or a token."""
    digest = hashlib.sha256(_Server.BODY).hexdigest()
    url = f"http://user:secret@{server}/train.jsonl?token=tok123"
    assert download_url(url, digest, tmp_path / "a.jsonl").read_bytes() == _Server.BODY
    assert _Server.seen[-1] == "Basic " + base64.b64encode(b"user:secret").decode()
    failures = [
        (url, "0" * 64),  # sha256 mismatch
        (f"http://user:wrong@{server}/train.jsonl?sig=sig456", digest),  # HTTP 401
        ("//user:secret@host/x?token=tok123", digest),  # a URL urllib refuses (its ValueError quotes it)
    ]
    for bad_url, sha in failures:
        with pytest.raises(SourceError) as caught:
            download_url(bad_url, sha, tmp_path / "b.jsonl")
        message = str(caught.value)
        assert "***" in message and not {"secret", "wrong", "tok123", "sig456"} & set(re.findall(r"\w+", message))
        error = caught.value  # nor a chained original exception, whose traceback would show the secret
        assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_dataset_errors_name_the_url_source_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_download(url: str, sha256: str, dest: Path) -> Path:
        return _write_rows(dest, [{"instruction": "a"}])

    monkeypatch.setattr(fetch, "download_url", fake_download)
    source = {"url": "https://user:secret@host/train.jsonl?token=tok123", "sha256": "0" * 64}
    with pytest.raises(DataFormatError, match="missing or non-string column") as caught:
        fetch_dataset({"source": source}, tmp_path / "out.jsonl")
    assert "https://***@host/train.jsonl?token=***" in str(caught.value)
    assert "secret" not in str(caught.value) and "tok123" not in str(caught.value)


# --- the hub, sidecars and the lock -------------------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeHub:
    """Stands in for the hub's network side only: repos hold files per commit and branches point at commits.
    Our code's calls (resolve, hf_hub_download, snapshot_download) are the real ones, made against this."""

    def __init__(self) -> None:
        self.commits: dict[tuple[str, str], dict[str, bytes]] = {}
        self.refs: dict[tuple[str, str], str] = {}
        self.downloads: list[dict] = []
        self.resolved: list[tuple[str, str]] = []

    def push(self, repo: str, files: dict[str, bytes], branch: str = "main") -> str:
        commit = _sha(repr((repo, sorted(files.items()), len(self.commits))).encode())[:40]
        self.commits[(repo, commit)] = files
        self.refs[(repo, branch)] = commit
        return commit

    def _files(self, repo: str, revision: str) -> dict[str, bytes]:
        commit = self.refs.get((repo, revision), revision)
        if (repo, commit) not in self.commits:
            raise FileNotFoundError(f"{repo}@{revision}")
        return self.commits[(repo, commit)]

    def repo_info(self, repo_id: str, revision: str, repo_type: str):  # HfApi().repo_info
        self.resolved.append((repo_id, revision))
        self._files(repo_id, revision)
        return type("Info", (), {"sha": self.refs.get((repo_id, revision), revision)})()

    def hf_hub_download(self, repo_id: str, filename: str, revision: str, repo_type: str, local_dir: Path) -> str:
        self.downloads.append({"repo": repo_id, "filename": filename, "revision": revision, "type": repo_type})
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True, exist_ok=True)  # as the real one does
        target.write_bytes(self._files(repo_id, revision)[filename])
        return str(target)

    def snapshot_download(self, repo_id: str, revision: str, local_dir: Path, repo_type: str = "model", **kw):
        self.downloads.append({"repo": repo_id, "revision": revision, "type": repo_type, **kw})
        metadata = Path(local_dir) / ".cache" / "huggingface" / "download"  # as the real one keeps it
        metadata.mkdir(parents=True, exist_ok=True)
        (metadata / "test.jsonl.metadata").write_text("commit\netag\n")
        for name, data in self._files(repo_id, revision).items():
            target = Path(local_dir) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return str(local_dir)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    import huggingface_hub

    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: fake)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


NUMINA = b"".join(json.dumps({"instruction": f"q{i}", "response": f"a{i}"}).encode() + b"\n" for i in range(5))
HUB_FILE = {"hub": "chichi56/ASFT", "revision": "main", "filename": "numina_cot_10k.jsonl"}


def test_hub_file_is_fetched_and_its_commit_and_hash_recorded(hub: FakeHub, tmp_path: Path) -> None:
    commit = hub.push("chichi56/ASFT", {"numina_cot_10k.jsonl": NUMINA, "other.jsonl": b"{}\n"})
    out = tmp_path / "resources" / "datasets" / "numina.jsonl"
    assert fetch_dataset({"source": HUB_FILE}, out) == 5
    assert hub.downloads == [
        {"repo": "chichi56/ASFT", "filename": "numina_cot_10k.jsonl", "revision": commit, "type": "dataset"}
    ]
    assert [r["instruction"] for r in read_instruction_jsonl(out)] == [f"q{i}" for i in range(5)]
    sidecar = json.loads(sidecar_of(out).read_text())
    assert sidecar_of(out) == out.with_name("numina.source.json")
    assert sidecar == {
        "asft_source": 1,
        "format": "instruction_response",
        "output": {"file": "numina.jsonl", "sha256": _sha(out.read_bytes())},
        "records": 5,
        "skipped": {},
        "sources": [
            {
                "kind": "hub",
                "repo": "chichi56/ASFT",
                "repo_type": "dataset",
                "revision": "main",
                "commit": commit,
                "files": {"numina_cot_10k.jsonl": _sha(NUMINA)},
                "lock": None,  # fetched unlocked
            }
        ],
    }
    assert sorted(p.name for p in out.parent.iterdir()) == ["numina.jsonl", "numina.source.json"]


def _lock_entry(commit: str, files: dict[str, str], key: str = "datasets.numina") -> dict:
    repo = {"repo": "chichi56/ASFT", "repo_type": "dataset", "revision": "main"}
    return {**repo, "commit": commit, "files": files, "key": key}


def test_a_lock_entry_downloads_the_locked_commit_not_the_branch_head(hub: FakeHub, tmp_path: Path) -> None:
    old = hub.push("chichi56/ASFT", {"numina_cot_10k.jsonl": NUMINA})
    hub.push("chichi56/ASFT", {"numina_cot_10k.jsonl": NUMINA + NUMINA})  # main moves on
    out = tmp_path / "numina.jsonl"
    lock = _lock_entry(old, {"numina_cot_10k.jsonl": _sha(NUMINA)})
    assert fetch_dataset({"source": HUB_FILE}, out, lock=lock) == 5
    assert [d["revision"] for d in hub.downloads] == [old] and hub.resolved == []  # the head is never asked
    record = json.loads(sidecar_of(out).read_text())["sources"][0]
    assert record["commit"] == old and record["lock"] == "datasets.numina"


def test_a_file_that_differs_from_the_lock_is_refused(hub: FakeHub, tmp_path: Path) -> None:
    commit = hub.push("chichi56/ASFT", {"numina_cot_10k.jsonl": NUMINA})
    out = tmp_path / "numina.jsonl"
    lock = _lock_entry(commit, {"numina_cot_10k.jsonl": "0" * 64})
    with pytest.raises(SourceError, match=r"datasets\.numina: numina_cot_10k\.jsonl: sha256 [0-9a-f]{64} differs"):
        fetch_dataset({"source": HUB_FILE}, out, lock=lock)
    assert not out.exists() and not sidecar_of(out).exists()
    # A lock written for another revision is stale, not silently applied.
    with pytest.raises(SourceError, match=r"datasets\.numina: the lock pins dataset chichi56/ASFT@main"):
        fetch_dataset({"source": {**HUB_FILE, "revision": "v2"}}, out, lock=lock)


def test_hub_model_sidecar_and_lock(hub: FakeHub, tmp_path: Path) -> None:
    commit = hub.push("Qwen/Qwen2.5-7B", {"config.json": b"{}", "model.safetensors": b"weights"})
    out = tmp_path / "models" / "qwen"
    fetch_model({"hub": "Qwen/Qwen2.5-7B", "revision": "main"}, out)
    assert hub.downloads[-1]["revision"] == commit and hub.downloads[-1]["allow_patterns"]
    assert (out / "config.json").exists() and not out.with_name("qwen.tmp").exists()
    record = json.loads((out / ".asft-source.json").read_text())["sources"][0]
    files = {"config.json": _sha(b"{}"), "model.safetensors": _sha(b"weights")}
    assert (record["repo_type"], record["commit"], record["files"]) == ("model", commit, files)
    lock = {"repo": "Qwen/Qwen2.5-7B", "repo_type": "model", "revision": "main", "commit": commit, "key": "models.q"}
    fetch_model({"hub": "Qwen/Qwen2.5-7B", "revision": "main"}, out, lock={**lock, "files": files})
    with pytest.raises(SourceError, match=r"models\.q: model\.safetensors: sha256"):
        fetch_model(
            {"hub": "Qwen/Qwen2.5-7B", "revision": "main"},
            out,
            lock={**lock, "files": {**files, "model.safetensors": "1" * 64}},
        )
    with pytest.raises(SourceError, match=r"models\.q: locked file\(s\) \['tokenizer.json'\] were not downloaded"):
        fetch_model(
            {"hub": "Qwen/Qwen2.5-7B", "revision": "main"},
            out,
            lock={**lock, "files": {**files, "tokenizer.json": "2" * 64}},
        )


def test_hub_split_source_hashes_the_repo_files(hub: FakeHub, tmp_path: Path) -> None:
    """A split (no filename) is read by `datasets` from the repo's files, downloaded and hashed at the commit."""
    rows = b"".join(json.dumps({"problem": f"p{i}", "answer": str(i)}).encode() + b"\n" for i in range(3))
    commit = hub.push("HuggingFaceH4/MATH-500", {"test.jsonl": rows})
    source = {"hub": "HuggingFaceH4/MATH-500", "revision": commit, "split": "test"}
    out = tmp_path / "benchmarks" / "math500.jsonl"
    assert fetch_benchmark({"format": "math500", "source": source}, out) == 3
    sidecar = json.loads(sidecar_of(out).read_text())
    assert sidecar["sources"][0]["files"] == {"test.jsonl": _sha(rows)} and sidecar["records"] == 3


def _config_file(path: Path, datasets: dict) -> Path:
    config = {
        "experiments": {"e": {"models": ["m"], "datasets": sorted(datasets), "modes": ["sft"], "benchmarks": ["b"]}},
        "models": {"m": {"source": {"demo": "model"}}},
        "datasets": datasets,
        "benchmarks": {"b": {"format": "math500", "source": {"demo": "benchmarks/arith.jsonl"}}},
        "modes": {"sft": {"weighting": "none"}},
    }
    path.write_text(json.dumps(config))
    return path


def test_lock_command_round_trip(hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = hub.push("chichi56/ASFT", {"numina_cot_10k.jsonl": NUMINA})
    config = _config_file(
        tmp_path / "c.json", {"numina": {"source": HUB_FILE}, "local": {"source": {"demo": "data/train.jsonl"}}}
    )
    resources, lock_file = tmp_path / "resources", tmp_path / "paper.lock.json"
    out = resources / "datasets" / "numina.jsonl"
    spec = json.dumps({"source": HUB_FILE})
    fetch_cmd = ["fetch-dataset", "--spec", spec, "--out", str(out)]
    lock_cmd = ["lock", "--config", str(config), "--resources", str(resources), "--out", str(lock_file)]
    assert asft_main([*fetch_cmd, "--lock", "null"]) == 0
    assert asft_main(lock_cmd) == 0
    entries = read_lock(lock_file)
    expected = {"repo": "chichi56/ASFT", "repo_type": "dataset", "revision": "main", "commit": first}
    assert entries == {"datasets.numina": {**expected, "files": {"numina_cot_10k.jsonl": _sha(NUMINA)}}}
    # Locked: the branch moves, the fetch still gets the locked commit; the lock command changes nothing.
    second = hub.push("chichi56/ASFT", {"numina_cot_10k.jsonl": NUMINA + NUMINA})
    locked = json.dumps(lock_for(entries, "datasets", "numina"))
    assert asft_main([*fetch_cmd, "--lock", locked]) == 0
    assert len(read_instruction_jsonl(out)) == 5 and asft_main(lock_cmd) == 0 and read_lock(lock_file) == entries
    # Unlocked, it follows the branch; the lock refuses to follow it silently, --update accepts it.
    assert asft_main([*fetch_cmd, "--lock", "null"]) == 0 and len(read_instruction_jsonl(out)) == 10
    assert asft_main(lock_cmd) == 2
    assert f"datasets.numina: locked at main = {first}, fetched main = {second}" in capsys.readouterr().err
    assert read_lock(lock_file) == entries
    assert asft_main([*lock_cmd, "--update"]) == 0
    assert read_lock(lock_file)["datasets.numina"]["commit"] == second


def test_lock_for_gives_benchmarks_one_entry_per_source() -> None:
    entries = {"benchmarks.mmlu[1]": {"commit": "c"}, "datasets.d": {"commit": "d"}}
    assert lock_for(entries, "benchmarks", "mmlu", 3) == [None, {"commit": "c", "key": "benchmarks.mmlu[1]"}, None]
    assert lock_for(entries, "benchmarks", "other", 2) is None and lock_for(entries, "datasets", "x") is None
    assert lock_for(entries, "datasets", "d") == {"commit": "d", "key": "datasets.d"}


# --- MedMCQA in the paper's layout -----------------------------------------------------------------------------------

MEDMCQA_ROW = {
    "id": "x1",
    "question": "Disulfiram is a type of:-",
    "opa": "Aversion therapy",
    "opb": "Anticraving therapy",
    "opc": "Detoxification",
    "opd": "Opioid management therapy",
    "cop": 0,
    "choice_type": "single",
    "exp": "Deterrent agents/Aversive agents Disulfiram ... are usually benzodiazepines.",
    "subject_name": "Psychiatry",
    "topic_name": None,
}


def test_medmcqa_pair_matches_the_papers_appendix_layout() -> None:
    assert medmcqa_pair(MEDMCQA_ROW) == {
        "instruction": (
            "Disulfiram is a type of:-\nA. Aversion therapy\nB. Anticraving therapy\nC. Detoxification\n"
            "D. Opioid management therapy"
        ),
        "response": (
            "Deterrent agents/Aversive agents Disulfiram ... are usually benzodiazepines.\n"
            "So the answer to this question is A"
        ),
    }
    assert medmcqa_pair({**MEDMCQA_ROW, "cop": 3})["response"].endswith("\nSo the answer to this question is D")


def test_medmcqa_dataset_skips_and_counts_rows_without_explanation_or_answer(tmp_path: Path) -> None:
    rows = [
        MEDMCQA_ROW,
        {**MEDMCQA_ROW, "exp": None},
        {**MEDMCQA_ROW, "exp": "  \n"},
        {**MEDMCQA_ROW, "cop": -1},  # the test split's "no answer"
        {**MEDMCQA_ROW, "cop": True},
        {key: value for key, value in MEDMCQA_ROW.items() if key != "opd"},
        {**MEDMCQA_ROW, "question": "Second?", "cop": 2},
    ]
    src = _write_rows(tmp_path / "medmcqa_train.jsonl", rows)
    out = tmp_path / "medmcqa-30k.jsonl"
    assert fetch_dataset({"source": {"path": str(src)}, "format": "medmcqa", "max_samples": 30000}, out) == 2
    records = read_instruction_jsonl(out)
    assert [r["response"][-1] for r in records] == ["A", "C"]
    sidecar = json.loads(sidecar_of(out).read_text())
    assert sidecar["skipped"] == {"no_explanation": 2, "no_answer": 2, "missing_question_or_option": 1}
    assert sidecar["format"] == "medmcqa" and sidecar["records"] == 2
    assert sidecar["sources"][0] == {
        "kind": "path",
        "path": str(src),
        "files": {"medmcqa_train.jsonl": _sha(src.read_bytes())},
        "lock": None,
    }
