"""Math answer grading with math-verify, in worker processes with a per-item timeout.

Model text reaches sympy (whose parser evaluates code) only inside a worker process: a fresh
`python -m asft.evaluation.grading`, so nothing of the caller is forked and a caller script without a
`__main__` guard is not re-executed, as multiprocessing's spawn would do. Two time limits protect each item:
the worker arms a per-item interval timer (math-verify's own alarms are switched off, so one budget covers
extraction, gold parsing and comparison), and the parent kills a worker that stays silent past the budget plus
a grace period (a computation stuck in C code never sees the signal). A timeout or a parse failure grades as
incorrect and is counted in `GradeResult.status`, never a crash or a hang. The parent only slices and ships text:
completions are cut to their last MAX_COMPLETION_CHARS characters, which bounds every parser's work, and even the
text-only answer shown for a timed-out item is found inside the worker, under the item's timer.
"""

from __future__ import annotations

import atexit
import bisect
import dataclasses
import functools
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from asft.evaluation.benchmarks import last_boxed

Status = Literal["ok", "timeout", "error"]

DEFAULT_TIMEOUT_S = 5.0
STARTUP_S = 60.0  # a worker's interpreter start and math-verify import, on a loaded machine
KILL_GRACE_S = 1.0  # the parent waits this long past the worker's own deadline before killing it
WORKER_MEMORY_BYTES = 4 << 30  # address-space cap per worker: "expand (x+1)^(10^6)" fails, not the node
DEFAULT_CHUNK = 16  # items sent to a worker at once: fewer pipe round trips, same per-item timeout
# Completions are graded on their last this-many characters (answers come at the end). About 5,000 tokens of text:
# more than a typical max_new_tokens, and small enough that a parser's worst case stays within a short timeout.
MAX_COMPLETION_CHARS = 20_000

# Tests only: "module:function" called with (completion, gold) before each item inside a worker, so a test can
# make a worker hang. It comes from the environment of the process that starts the workers, never from model text.
TEST_HOOK_ENV = "ASFT_GRADING_TEST_HOOK"
_TIMEOUT_ENV = "ASFT_GRADING_TIMEOUT"


@dataclass(frozen=True)
class GradeResult:
    correct: bool
    extracted: str | None
    status: Status
    truncated: bool = False  # only the last MAX_COMPLETION_CHARS characters of the completion were graded


# --------------------------------------------------------------------------------------------------------------
# Text-only helpers (safe in any process: no sympy, no eval).

# These run in linear time: no lazy group followed by a quantifier over the same characters, and no lazy group
# that scans to the end of the text from each of many start positions (math spans are found by _last_math_span).
_GSM8K_ANSWER = re.compile(r"^[ \t]*####([^\n]*)", re.MULTILINE)  # the answer is trimmed in Python
_ANSWER_IS = re.compile(r"answer(?:\s+is|\s*:)\s*([^\n]+)", re.I)
_MATH_OPENER = re.compile(r"\$|\\[\[(]")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _normalize_text(text: str) -> str:
    """Spellings math-verify's LaTeX parser does not read: the Unicode degree sign."""
    return text.replace("°", "^\\circ")


def _gsm8k_answer(text: str) -> str | None:
    """The GSM8K convention: a last line "#### 42" states the answer."""
    for line in reversed(_GSM8K_ANSWER.findall(text)):
        answer = line.strip(" \t")
        if answer and not answer[0].isspace():
            return answer.replace(",", "").strip()
    return None


def _occurrences(text: str, needle: str) -> list[int]:
    """The start of every occurrence of `needle`, overlapping ones included ("$$$" holds "$$" at 0 and at 1)."""
    return [m.start() for m in re.finditer(f"(?={re.escape(needle)})", text)]


def _last_math_span(text: str) -> str | None:
    r"""The content of the last $$…$$, $…$, \[…\] or \(…\) span, as `findall` of the lazy regex
    `\$\$(.+?)\$\$|\$([^$]+?)\$|\\\[(.+?)\\\]|\\\((.+?)\\\)` (re.S) finds them: leftmost first, none overlapping.

    That regex rescans to the end of the text from every unclosed opener ("\[" * n costs n² steps); here each
    opener looks its closer up in a sorted list of positions instead.
    """
    closers = {needle: _occurrences(text, needle) for needle in ("$$", "$", "\\]", "\\)")}

    def first(needle: str, at_least: int) -> int | None:
        positions = closers[needle]
        index = bisect.bisect_left(positions, at_least)
        return positions[index] if index < len(positions) else None

    last, position = None, 0
    while (opener := _MATH_OPENER.search(text, position)) is not None:
        start = opener.start()
        position = start + 1  # nothing opens here: the next try starts one character on
        if text.startswith("$$", start):
            end = first("$$", start + 3)  # .+? takes at least one character
            begin = start + 2
        elif text[start] == "$":
            end = first("$", start + 1)  # [^$]+? runs to the next "$" (not the very next character: that is $$)
            begin = start + 1
        else:
            end = first("\\]" if text[start + 1] == "[" else "\\)", start + 3)
            begin = start + 2
        if end is not None:
            last = text[begin:end]
            position = end + (begin - start)  # closers are as long as their openers
    return last


def extract_answer(completion: str) -> str | None:
    r"""The answer a completion states, for logs and quick looks: text only (no sympy), in linear time.

    Prefers the last \boxed{} (or \fbox{}), then a GSM8K "#### N" line, then, like math-verify's fallbacks,
    "answer is X" / "answer: X", the last LaTeX math span, and the last number. Grading uses math-verify on the
    same priorities inside the workers, and `GradeResult.extracted` is what it actually matched (or, when grading
    fails, what this found, computed in the worker under the item's timer).
    """
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed.strip()
    gsm8k = _gsm8k_answer(completion)
    if gsm8k is not None:
        return gsm8k
    stated = _ANSWER_IS.findall(completion)
    if stated:
        answer = stated[-1].strip().rstrip(".").strip()
        for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(answer) > len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
                answer = answer[len(left) : -len(right)].strip()
        if answer:
            return answer
    span = _last_math_span(completion)
    if span is not None:
        return span.strip()
    numbers = _NUMBER.findall(completion)
    return numbers[-1].replace(",", "") if numbers else None


def _gold_candidates(gold: str) -> list[str]:
    """Gold answers are plain strings ("27.0", "\\frac{1}{2}", "(1,2)", "3, 5"); give math-verify a wrapper."""
    gold = _normalize_text(gold.strip())
    if not gold:
        return []
    if "\\boxed" in gold or gold.startswith("$"):
        return [gold]
    return [f"${gold}$", f"\\boxed{{{gold}}}"]


def _completion_candidates(completion: str) -> list[str]:
    r"""What to hand math-verify, in order: the last \boxed{} alone first (math-verify would merge every boxed
    value into a set, so a boxed intermediate result would spoil a right final answer), then the whole text
    (math-verify's own priorities: boxed, "final answer is", the last LaTeX span, the last number)."""
    completion = _normalize_text(completion)
    boxed = last_boxed(completion)
    stated = _gsm8k_answer(completion) if boxed is None else boxed
    if stated is None:
        return [completion]
    return [f"\\boxed{{{stated}}}", completion]


# --------------------------------------------------------------------------------------------------------------
# Worker side: math-verify on untrusted text. Only ever called inside a grading worker (or on trusted test text).


@functools.cache
def _configs() -> tuple[list[Any], list[Any]]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    gold = [LatexExtractionConfig(), ExprExtractionConfig()]
    predicted = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return gold, predicted


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple[Any, ...]:
    """Parsed once per distinct gold answer: with n samples per problem the same gold is graded n times."""
    from math_verify import parse

    for candidate in _gold_candidates(gold):
        target = parse(candidate, extraction_config=_configs()[0], parsing_timeout=None)
        if target:
            return tuple(target)
    return ()


def _grade_item(completion: str, gold: str) -> GradeResult:
    """Grade one pair in this process, without a time limit: the worker loop supplies one."""
    from math_verify import parse, verify

    target = _parse_gold(gold)
    if not target:
        return GradeResult(False, None, "error")
    extracted = None
    for candidate in _completion_candidates(completion):
        predicted = parse(candidate, extraction_config=_configs()[1], parsing_timeout=None)
        if not predicted:
            continue
        if extracted is None:
            extracted = str(predicted[-1])  # math-verify returns [sympy value, matched text]
        if verify(list(target), predicted, timeout_seconds=None):
            return GradeResult(True, str(predicted[-1]), "ok")
    return GradeResult(False, extracted, "ok")


class _ItemTimeout(BaseException):
    """Raised by the worker's timer; a BaseException so math-verify's `except Exception` cannot swallow it."""


def _load_test_hook() -> Callable[[str, str], None] | None:
    spec = os.environ.get(TEST_HOOK_ENV)
    if not spec:
        return None
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _serve() -> None:
    """Worker loop: one JSON line of [index, completion, gold] items in, one JSON line per graded item out."""
    import logging

    # The protocol gets a private copy of stdout; anything a library prints goes to stderr instead.
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" and parse-failure chatter
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, resource.RLIM_INFINITY))
    except (ImportError, ValueError, OSError):  # best effort: some sandboxes refuse it
        pass
    _configs()
    _parse_gold("1")  # import and warm up math-verify before "ready", so startup does not eat an item's time
    hook = _load_test_hook()
    timeout_s = float(os.environ.get(_TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    expired = False

    def on_alarm(signum: int, frame: object) -> None:
        nonlocal expired
        expired = True
        raise _ItemTimeout

    signal.signal(signal.SIGALRM, on_alarm)
    protocol.write("ready\n")
    protocol.flush()
    for line in sys.stdin.buffer:
        for index, completion, gold in json.loads(line):
            expired = False
            shown = None  # the text-only answer, kept for the samples file if grading fails
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout_s)
                if hook is not None:
                    hook(completion, gold)
                shown = extract_answer(completion)
                result = _grade_item(completion, gold)
                signal.setitimer(signal.ITIMER_REAL, 0)
            except _ItemTimeout:
                result = GradeResult(False, None, "timeout")
            except Exception:  # noqa: BLE001 - any parser failure is an ungradable answer
                result = GradeResult(False, None, "error")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if expired:  # the timer fired but something inside swallowed the exception
                result = GradeResult(False, result.extracted, "timeout")
            if result.status != "ok" and result.extracted is None:
                result = dataclasses.replace(result, extracted=shown)
            protocol.write(json.dumps([index, result.correct, result.extracted, result.status]) + "\n")
            protocol.flush()


# --------------------------------------------------------------------------------------------------------------
# Parent side: a pool of workers that never parses model text itself.

Item = tuple[int, str, str]


class _Worker:
    """One grading process, fed through a non-blocking pipe so a stuck worker can never block the parent."""

    def __init__(self, timeout_s: float) -> None:
        src = str(Path(__file__).resolve().parents[2])  # the workers import asft from where this process did
        path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, PYTHONPATH=path, **{_TIMEOUT_ENV: repr(timeout_s)})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "asft.evaluation.grading"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env=env,
        )
        self.stdin: BinaryIO = self.process.stdin  # type: ignore[assignment]
        self.stdout: BinaryIO = self.process.stdout  # type: ignore[assignment]
        os.set_blocking(self.stdin.fileno(), False)
        self.outbox = b""
        self.inbox = b""
        self.ready = False
        self.pending: deque[Item] = deque()
        self.last_seen = time.monotonic()

    def alive(self) -> bool:
        return self.process.poll() is None

    def submit(self, items: Sequence[Item]) -> None:
        self.pending.extend(items)
        self.outbox += (json.dumps(list(items)) + "\n").encode()
        self.last_seen = time.monotonic()

    def flush(self) -> bool:
        """Write what the pipe takes now; False if the worker is gone."""
        try:
            written = os.write(self.stdin.fileno(), self.outbox[: 1 << 16])
        except BlockingIOError:
            return True
        except (BrokenPipeError, OSError):
            return False
        self.outbox = self.outbox[written:]
        return True

    def read(self) -> list[tuple[int, GradeResult]] | None:
        """The answers that arrived (possibly none yet), or None if the worker died."""
        data = os.read(self.stdout.fileno(), 1 << 16)
        if not data:
            return None
        *lines, self.inbox = (self.inbox + data).split(b"\n")
        answers = []
        for line in lines:
            self.last_seen = time.monotonic()
            if line == b"ready":
                self.ready = True
                continue
            index, correct, extracted, status = json.loads(line)
            answers.append((index, GradeResult(bool(correct), extracted, status)))
        return answers

    def overdue(self, timeout_s: float) -> bool:
        limit = timeout_s + KILL_GRACE_S + (0.0 if self.ready else STARTUP_S)
        return bool(self.pending) and time.monotonic() - self.last_seen > limit

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.stdin.close()
        self.stdout.close()

    def close(self) -> None:
        try:
            os.set_blocking(self.stdin.fileno(), True)
            self.stdin.close()  # EOF: the worker's loop ends
            self.process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self.stdout.close()


class MathGrader:
    """A pool of grading processes kept for a whole evaluation; each item gets at most ~timeout_s seconds.

    Items go to workers in chunks (throughput); each worker answers item by item, so the parent knows which item
    a silent worker is stuck on: that one is marked "timeout", the worker is killed and replaced, and the rest of
    its chunk goes back to the queue.
    """

    def __init__(self, workers: int = 2, timeout_s: float = DEFAULT_TIMEOUT_S, chunk: int = DEFAULT_CHUNK) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.size, self.timeout_s, self.chunk = max(1, workers), float(timeout_s), max(1, chunk)
        self.pool: list[_Worker] = []
        self.restarts = 0  # workers killed (hung) or found dead, over this grader's life

    def __enter__(self) -> MathGrader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for worker in self.pool:
            worker.close()
        self.pool = []

    def _fresh(self) -> _Worker:
        return _Worker(self.timeout_s)

    def grade(self, pairs: Sequence[tuple[str, str]]) -> list[GradeResult]:
        """Grade (completion, gold) pairs; a hung or crashed item is marked and its worker replaced."""
        try:
            return self._grade(pairs)
        except BaseException:  # interrupted mid-batch: workers hold stale items, so none is reused
            for worker in self.pool:
                worker.kill()
            self.pool = []
            raise

    def _grade(self, pairs: Sequence[tuple[str, str]]) -> list[GradeResult]:
        # Slicing is the only thing this process does to model text: parsing happens in the workers, on the tail.
        truncated = [len(str(c)) > MAX_COMPLETION_CHARS for c, _ in pairs]
        items = [(i, str(c)[-MAX_COMPLETION_CHARS:], str(g)) for i, (c, g) in enumerate(pairs)]
        chunk = max(1, min(self.chunk, -(-len(items) // self.size)))  # small batches still use every worker
        queue: deque[list[Item]] = deque(items[i : i + chunk] for i in range(0, len(items), chunk))
        results: list[GradeResult | None] = [None] * len(items)
        for slot, worker in enumerate(self.pool):
            if not worker.alive():  # died while idle: replace it before it is given an item
                worker.kill()
                self.pool[slot] = self._fresh()
        while len(self.pool) < min(self.size, len(queue)):
            self.pool.append(self._fresh())
        failed_starts = 0
        while queue or any(w.pending for w in self.pool):
            for worker in self.pool:
                if not worker.pending and queue:
                    worker.submit(queue.popleft())
            busy = [w for w in self.pool if w.pending]
            readable, writable, _ = select.select(
                [w.stdout for w in busy], [w.stdin for w in busy if w.outbox], [], 0.05
            )
            for slot, worker in enumerate(self.pool):
                if not worker.pending:
                    continue
                died = worker.stdin in writable and not worker.flush()
                if worker.stdout in readable:
                    answers = worker.read()
                    died = died or answers is None
                    for index, result in answers or []:
                        if worker.pending and worker.pending[0][0] == index:  # answers come in order
                            worker.pending.popleft()
                            results[index] = result
                timed_out = not died and worker.overdue(self.timeout_s)
                if not (died or timed_out):
                    continue
                if not worker.ready:  # not the item's fault: retry once on a fresh worker, then give up
                    failed_starts += 1
                    if failed_starts >= 2:
                        raise RuntimeError("grading workers fail to start (see their stderr above)")
                else:
                    # The first pending item is the one it was grading: it fails; the rest are requeued.
                    stuck, *rest = worker.pending
                    results[stuck[0]] = GradeResult(False, None, "timeout" if timed_out else "error")
                    worker.pending = deque(rest)
                if worker.pending:
                    queue.appendleft(list(worker.pending))
                worker.kill()
                self.restarts += 1
                self.pool[slot] = self._fresh()
        graded = [r if r is not None else GradeResult(False, None, "error") for r in results]
        return [dataclasses.replace(r, truncated=True) if cut else r for r, cut in zip(graded, truncated, strict=True)]


def grade_math_batch(
    pairs: Sequence[tuple[str, str]],
    workers: int = 2,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    chunk: int = DEFAULT_CHUNK,
) -> list[GradeResult]:
    """Grade (completion, gold) pairs in worker processes (a one-off pool; see MathGrader to keep one)."""
    if not pairs:
        return []
    with MathGrader(workers, timeout_s, chunk) as grader:
        return grader.grade(pairs)


_shared: MathGrader | None = None
_shared_lock = threading.Lock()


def _close_shared() -> None:
    if _shared is not None:
        _shared.close()


def grade_math(completion: str, gold: str) -> bool:
    """Whether one completion's answer equals the gold answer; graded in a shared one-worker pool that lives
    until exit, so single calls cost a pipe round trip rather than a process start (and no model text is parsed
    in this process)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = MathGrader(workers=1, timeout_s=DEFAULT_TIMEOUT_S)
            atexit.register(_close_shared)
        return _shared.grade([(completion, gold)])[0].correct


def grade_choice(predicted_letter: str | None, gold_letter: str) -> bool:
    """Letters compare case- and space-insensitively; no prediction is wrong."""
    return predicted_letter is not None and predicted_letter.strip().upper() == gold_letter.strip().upper()


if __name__ == "__main__":
    _serve()
