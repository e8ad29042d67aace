"""AlpacaEval-style pairwise judging: an LLM judge behind an OpenAI-compatible endpoint compares a candidate's
answer with a reference answer, and the win rate (with a bootstrap CI over instructions) is the score.

The judge sees the instruction and the two answers in an order fixed per instruction by a seeded, balanced
assignment: half the candidates are shown first, half second, so a judge that always names one position scores
exactly 0.5 rather than 0 or 1. A reply that names neither answer is counted as `unparsed`, never as a tie.

HTTP goes through the standard library (urllib) on purpose: the evaluation may run in the vLLM environment, which
need not have httpx. The API key is read from an environment variable whose *name* is configured; its value is
held only in the request headers and never enters a repr, log record, exception or written file.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import logging
import math
import os
import random
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from asft.evaluation.metrics import bootstrap_ci

log = logging.getLogger(__name__)

DEFAULT_KEY_ENV = "ASFT_JUDGE_API_KEY"
APIS = ("chat", "completions")
Outcome = Literal["win", "loss", "tie", "unparsed"]
SCORES: dict[str, float] = {"win": 1.0, "loss": 0.0, "tie": 0.5}
# Transient failures worth another try: timeouts, conflicts, rate limits and server errors. Any other 4xx (a bad
# key, an unknown model, a prompt over the judge's context) fails the same way every time, so it fails at once.
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_BODY_SNIPPET = 300  # characters of an error response kept in the exception, to show what the server said
PROBE_TIMEOUT_S = 15.0  # the most the preflight probe waits (less where timeout_s is less)

JUDGE_PROMPT = """You compare two answers to the same instruction and decide which one a careful reader would prefer.
Prefer the answer that follows the instruction more closely and is correct, relevant and clear. Ignore the order
in which the answers are shown, and do not favour an answer only for being longer.

## Instruction
{instruction}

## Answer 1
{output_1}

## Answer 2
{output_2}

Reply with the single character 1 if Answer 1 is better, or 2 if Answer 2 is better, and nothing else.
Better answer:"""

# "1", "2", "Answer 1", "Output (a)", "[[2]]", "(b).", "Verdict: 1", "tie"; anything else is unparsed.
_VERDICT = re.compile(
    r"(?:(?:the\s+)?(?:better|preferred)(?:\s+(?:answer|output))?\s*(?:is)?\s*[:\-]?|verdict\s*[:\-]|"
    r"answer\s*:)?\s*(?:answer|output)?\s*[\[\(\"'*]*\s*(?P<choice>1|2|a|b|tie)\s*[\]\)\"'*]*\s*[.!]?",
    re.IGNORECASE,
)
_POSITION = {"1": "1", "a": "1", "2": "2", "b": "2", "tie": "tie"}


class JudgeError(RuntimeError):
    """A judge request that failed for good: names the URL and what the server said, never the key."""


@dataclass(frozen=True)
class JudgeEndpoint:
    """Where the judge lives and how to call it. Holds the NAME of the key's environment variable, not the key,
    so that this object can be printed, logged and written to metrics.json safely."""

    base_url: str  # OpenAI-style, with the /v1 suffix: http://127.0.0.1:8000/v1
    model: str
    api: Literal["chat", "completions"] = "chat"  # "completions" for a judge model without a chat template
    # The defaults are the config schema's (config.schema.yaml, evaluation.judge); backoff_s is not in the schema.
    api_key_env: str = DEFAULT_KEY_ENV
    timeout_s: float = 120.0
    max_retries: int = 4
    backoff_s: float = 1.0  # wait before retry k (0-based) is backoff_s * 2**k
    concurrency: int = 8
    max_tokens: int = 16
    prompt: str = field(default=JUDGE_PROMPT, repr=False)

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlsplit(self.base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"judge base_url must be an http(s) URL, got {self.base_url!r}")
        if parsed.username is not None or parsed.password is not None:
            # The URL is logged and written to metrics; a credential in it would leak. Never echo it back.
            raise ValueError(f"judge base_url must not hold credentials; put the key in ${self.api_key_env}")
        if self.api not in APIS:
            raise ValueError(f"judge api must be one of {APIS}, got {self.api!r}")
        if not self.model:
            raise ValueError("judge model must be named")
        if self.timeout_s <= 0 or self.max_retries < 0 or self.backoff_s < 0 or self.concurrency < 1:
            raise ValueError("judge needs timeout_s > 0, max_retries >= 0, backoff_s >= 0 and concurrency >= 1")
        if self.max_tokens < 1:
            raise ValueError(f"judge max_tokens must be >= 1, got {self.max_tokens}")
        for slot in ("{instruction}", "{output_1}", "{output_2}"):
            if slot not in self.prompt:
                raise ValueError(f"judge prompt lacks the {slot} slot")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> JudgeEndpoint:
        """From the config's judge block; unknown keys are refused so that a typo is not silently a default."""
        known = {f for f in cls.__dataclass_fields__ if f != "prompt"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown judge setting(s) {unknown}; expected some of {sorted(known)}")
        return cls(**config)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + ("/chat/completions" if self.api == "chat" else "/completions")

    def has_key(self) -> bool:
        return bool(os.environ.get(self.api_key_env))

    def is_local(self) -> bool:
        """Whether the endpoint is on this machine (localhost, 127.0.0.0/8, ::1): the one place a keyless server is
        expected. Anywhere else an unset key is far more likely a forgotten export than a server without auth."""
        host = (urllib.parse.urlsplit(self.base_url).hostname or "").rstrip(".").lower()
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:  # a host name other than localhost
            return False

    def probe(self) -> None:
        """One cheap request (GET {base_url}/models, with the key's header) before any work is done, so that a
        judge that cannot be reached or refuses the key fails the job at once rather than after every answer has
        been generated. Raises JudgeError naming the URL (never the key) when the endpoint cannot be reached or
        answers 401/403; any other reply (a server without /models, say) shows it is there, and only a warning is
        logged. Not retried: the job has not started, so rerunning it costs nothing."""
        url = self.base_url.rstrip("/") + "/models"
        request = urllib.request.Request(url, headers=self._headers(), method="GET")
        try:
            with urllib.request.urlopen(request, timeout=min(self.timeout_s, PROBE_TIMEOUT_S)):
                return
        except urllib.error.HTTPError as err:  # raised `from None`, as in `complete`: the message says it all
            detail = self._redact(err.read().decode("utf-8", "replace")[:_BODY_SNIPPET])
            if err.code in (401, 403):
                raise JudgeError(
                    f"judge at {url} refused the request (HTTP {err.code}: {detail}); check the key in "
                    f"${self.api_key_env}"
                ) from None
            log.warning("judge probe %s answered HTTP %d (%s); going on, as the server is there", url, err.code,
                        detail)  # fmt: skip
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
            reason = self._redact(str(getattr(err, "reason", err)))
            raise JudgeError(
                f"judge at {url} cannot be reached ({type(err).__name__}: {reason}); is the server up, and can "
                "this machine reach it (a compute node may have no network)?"
            ) from None

    def describe(self) -> dict[str, Any]:
        """What metrics.json records about the judge: everything needed to repeat the run, except the key."""
        settings = {k: v for k, v in asdict(self).items() if k != "prompt"}
        prompt_sha256 = hashlib.sha256(self.prompt.encode("utf-8")).hexdigest()
        return {**settings, "prompt_sha256": prompt_sha256, "api_key_set": self.has_key()}

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:  # a local server needs none; sending "Bearer " with nothing would only confuse it
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _redact(self, text: str) -> str:
        """Servers sometimes echo the credential they rejected; such an echo must not reach an exception."""
        key = os.environ.get(self.api_key_env)
        return text.replace(key, "[redacted]") if key else text

    def complete(self, prompt: str) -> str:
        """The judge's reply text for one prompt (temperature 0), retrying transient failures with backoff."""
        if self.api == "chat":
            payload: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
        else:
            payload = {"prompt": prompt}
        payload |= {"model": self.model, "temperature": 0.0, "max_tokens": self.max_tokens, "n": 1}
        body = json.dumps(payload).encode("utf-8")
        failure = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return self._reply_text(response.read())
            except urllib.error.HTTPError as err:
                # Errors are raised `from None`: the message says all the server said (key redacted), and a
                # chained urllib error would only repeat it, unredacted.
                detail = self._redact(err.read().decode("utf-8", "replace")[:_BODY_SNIPPET])
                failure = f"HTTP {err.code}: {detail}"
                if err.code in (401, 403):
                    raise JudgeError(
                        f"judge at {self.url} refused the request ({failure}); check the key in ${self.api_key_env}"
                    ) from None
                if err.code not in RETRY_STATUSES:
                    raise JudgeError(f"judge request to {self.url} failed ({failure})") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
                reason = getattr(err, "reason", err)
                failure = f"{type(err).__name__}: {self._redact(str(reason))}"
            log.warning("judge request to %s failed (attempt %d of %d): %s", self.url, attempt + 1,
                        self.max_retries + 1, failure)  # fmt: skip
        raise JudgeError(f"judge request to {self.url} failed after {self.max_retries + 1} attempts ({failure})")

    def _reply_text(self, raw: bytes) -> str:
        text: Any = None
        try:
            choice = json.loads(raw)["choices"][0]
            text = choice["message"]["content"] if self.api == "chat" else choice["text"]
            valid = text is None or isinstance(text, str)
        except (ValueError, KeyError, IndexError, TypeError):
            valid = False
        if not valid:
            snippet = self._redact(raw[:_BODY_SNIPPET].decode("utf-8", "replace"))
            raise JudgeError(f"judge at {self.url} sent no {self.api} completion: {snippet!r}") from None
        return text or ""  # a chat reply's content may be null; that is an unparsed verdict, not a crash


@dataclass(frozen=True)
class Verdict:
    """One comparison: which position the judge named and what that means for the candidate."""

    id: str
    candidate_first: bool  # the candidate was shown as answer 1
    reply: str  # the judge's raw text, kept so that an unparsed verdict can be inspected
    preferred: Literal["first", "second", "tie"] | None  # None when unparsed
    outcome: Outcome

    @property
    def score(self) -> float | None:
        return SCORES.get(self.outcome)

    def to_record(self) -> dict[str, Any]:
        return {**asdict(self), "score": self.score}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Verdict:
        """Read back a `to_record` line (a resumed run's work file)."""
        if record.get("outcome") not in ("win", "loss", "tie", "unparsed"):
            raise ValueError(f"not a verdict record: outcome {record.get('outcome')!r}")
        return cls(
            str(record["id"]), bool(record["candidate_first"]), record["reply"], record["preferred"], record["outcome"]
        )


def parse_verdict(reply: str) -> Literal["1", "2", "tie"] | None:
    """The position the judge named: "1", "2" or "tie"; None when the reply's first line says neither clearly."""
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    if not lines:
        return None
    match = _VERDICT.fullmatch(lines[0].strip("`#> "))
    return _POSITION[match.group("choice").lower()] if match else None  # type: ignore[return-value]


def assign_positions(n: int, seed: int) -> list[bool]:
    """Whether each candidate is shown first: a seeded shuffle of ceil(n/2) True and floor(n/2) False, so the
    two positions are balanced exactly and a purely positional judge cannot move the win rate off 0.5."""
    order = [index < (n + 1) // 2 for index in range(n)]
    random.Random(seed).shuffle(order)
    return order


def _outcome(position: str | None, candidate_first: bool) -> tuple[Outcome, Any]:
    if position is None:
        return "unparsed", None
    if position == "tie":
        return "tie", "tie"
    preferred = "first" if position == "1" else "second"
    return ("win" if (preferred == "first") == candidate_first else "loss"), preferred


def judge_pairs(
    endpoint: JudgeEndpoint,
    instructions: Sequence[str],
    candidates: Sequence[str],
    references: Sequence[str],
    seed: int,
    ids: Sequence[str] | None = None,
    done: Mapping[str, Verdict] | None = None,
    on_verdict: Callable[[Verdict], None] | None = None,
) -> list[Verdict]:
    """Judge each candidate against its reference; verdicts come back in input order.

    Identical answers are a tie without asking the judge (as AlpacaEval scores them): there is nothing to prefer.
    Requests run `endpoint.concurrency` at a time; a request that fails for good raises JudgeError.
    For a resumable run: `on_verdict` sees each new verdict as it arrives (in this thread, so it may append to a
    file), and `done` holds an earlier attempt's verdicts by id, reused where the position still agrees. Positions
    are assigned over the whole list, so pass every item each time, not only those left to do; `done` must come
    from the same candidates (the caller's staleness check), as only the id and position are compared here.
    """
    n = len(instructions)
    if not len(candidates) == len(references) == n:
        raise ValueError(f"need one candidate and one reference per instruction: {n}, {len(candidates)}, "
                         f"{len(references)}")  # fmt: skip
    ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"need one id per instruction: {n} instructions, {len(ids)} ids")
    if len(set(ids)) != n:
        raise ValueError("ids must be unique: verdicts and per-problem scores are keyed by them")
    firsts = assign_positions(n, seed)
    results: list[Verdict | None] = [None] * n
    for index, item_id in enumerate(ids):
        prior = (done or {}).get(item_id)
        if prior is not None and prior.candidate_first == firsts[index]:
            results[index] = prior
    todo = [index for index, verdict in enumerate(results) if verdict is None]
    log.info("judging %d pairs (%d done before) with %s at %s (key from $%s: %s)", len(todo), n - len(todo),
             endpoint.model, endpoint.url, endpoint.api_key_env, "set" if endpoint.has_key() else "unset")  # fmt: skip

    def one(index: int) -> Verdict:
        candidate, reference, first = candidates[index], references[index], firsts[index]
        if candidate.strip() == reference.strip():
            return Verdict(ids[index], first, "", "tie", "tie")
        output_1, output_2 = (candidate, reference) if first else (reference, candidate)
        prompt = endpoint.prompt.format(instruction=instructions[index], output_1=output_1, output_2=output_2)
        reply = endpoint.complete(prompt)
        outcome, preferred = _outcome(parse_verdict(reply), first)
        return Verdict(ids[index], first, reply, preferred, outcome)

    pool = ThreadPoolExecutor(max_workers=max(1, min(endpoint.concurrency, len(todo))))
    try:
        futures = {pool.submit(one, index): index for index in todo}
        for future in as_completed(futures):
            verdict = future.result()
            results[futures[future]] = verdict
            if on_verdict is not None:
                on_verdict(verdict)
    finally:  # on a failure, requests not yet sent are dropped rather than sent for nothing
        pool.shutdown(wait=True, cancel_futures=True)
    return [verdict for verdict in results if verdict is not None]


def win_rate(verdicts: Sequence[Verdict], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """The metrics block: win rate over the parsed verdicts (wins count 1, ties 0.5) with a percentile bootstrap
    CI over instructions, the outcome counts, and `first_preferred_share`, the share of decided verdicts that
    named the first position (0.5 for an unbiased judge, 1.0 for one that always says "1").

    Unparsed verdicts are left out of the rate and reported beside it: folding them in as ties would pull every
    model towards 0.5 and hide a judge that cannot follow the format.
    """
    counts = {outcome: sum(v.outcome == outcome for v in verdicts) for outcome in ("win", "loss", "tie", "unparsed")}
    scored = {v.id: v.score for v in verdicts if v.score is not None}
    scores = list(scored.values())
    decided = [v for v in verdicts if v.preferred in ("first", "second")]
    return {
        "n_problems": len(verdicts),
        "n_judged": len(scores),
        "win_rate": float(np.mean(scores)) if scores else math.nan,
        "win_rate_ci": list(bootstrap_ci(scores, n_boot, alpha, seed)) if scores else [math.nan, math.nan],
        "wins": counts["win"],
        "losses": counts["loss"],
        "ties": counts["tie"],
        "unparsed": counts["unparsed"],
        "unparsed_share": counts["unparsed"] / len(verdicts) if verdicts else 0.0,
        "candidate_first_share": sum(v.candidate_first for v in verdicts) / len(verdicts) if verdicts else 0.0,
        "first_preferred_share": sum(v.preferred == "first" for v in decided) / len(decided) if decided else math.nan,
        "per_problem": scored,
    }
