"""Sources: local paths, checksummed URLs and the hub call (exercised on local files, no network)."""

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
