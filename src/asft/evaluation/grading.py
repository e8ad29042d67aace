"""Math answer grading with math-verify, in a pool of worker processes with a per-item timeout.

The worker (grading_worker.py) parses model text under a per-item timer; this module is the parent side, which
never parses model text itself: it only slices and ships it. Completions are cut to their last
MAX_COMPLETION_CHARS characters, which bounds every parser's work, and a worker that stays silent past the budget
plus a grace period is killed and replaced (a computation stuck in C code never sees the worker's signal). A
timeout or a parse failure grades as incorrect and is counted in `GradeResult.status`, never a crash or a hang.
Multiple-choice letters are graded here too (`grade_choice`), without a worker: there is nothing to parse.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, cast

from asft.evaluation.extraction import extract_answer
from asft.evaluation.grading_worker import DEFAULT_TIMEOUT_S, TEST_HOOK_ENV, TIMEOUT_ENV, GradeResult, Status

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "MAX_COMPLETION_CHARS",
    "TEST_HOOK_ENV",
    "ChoicePick",
    "GradeResult",
    "MathGrader",
    "Status",
    "extract_answer",
    "grade_choice",
    "grade_math_batch",
    "pick_choice",
]

STARTUP_S = 60.0  # a worker's interpreter start and math-verify import, on a loaded machine
KILL_GRACE_S = 1.0  # the parent waits this long past the worker's own deadline before killing it
DEFAULT_CHUNK = 16  # items sent to a worker at once: fewer pipe round trips, same per-item timeout
# Completions are graded on their last this-many characters (answers come at the end). About 5,000 tokens of text:
# more than a typical max_new_tokens, and small enough that a parser's worst case stays within a short timeout.
MAX_COMPLETION_CHARS = 20_000

Item = tuple[int, str, str]


class _Worker:
    """One grading process, fed through a non-blocking pipe so a stuck worker can never block the parent."""

    def __init__(self, timeout_s: float) -> None:
        src = str(Path(__file__).resolve().parents[2])  # the workers import asft from where this process did
        path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, PYTHONPATH=path, **{TIMEOUT_ENV: repr(timeout_s)})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "asft.evaluation.grading_worker"],
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
        # Every item was answered or marked failed: the loop only ends once no item is queued or pending.
        graded = cast(list[GradeResult], results)
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


def grade_choice(predicted_letter: str | None, gold_letter: str) -> bool:
    """Letters compare case- and space-insensitively; no prediction is wrong."""
    return predicted_letter is not None and predicted_letter.strip().upper() == gold_letter.strip().upper()


@dataclasses.dataclass(frozen=True)
class ChoicePick:
    """The letter upstream's medical evaluation picks, how it got there, and the log-prob it kept per letter."""

    letter: str
    method: str  # "top10": a letter among the top tokens; "fallback_text": found in the greedy token's text;
    # "default": neither, so the first letter (upstream answers "A")
    scores: dict[str, float]


def pick_choice(top: Sequence[tuple[str, float]], text: str, letters: Sequence[str]) -> ChoicePick:
    """Upstream's letter rule (zhuchichi56/ASFT eval/medeval/vllm_medical_test.py, get_answer_from_logprobs).

    Each of the top next tokens (likeliest first) that reads as a letter once stripped and upper-cased ("A", " A",
    "a") records its log-prob for that letter, a later (less likely) variant overwriting an earlier one, as
    upstream's dict does; the letter with the highest recorded log-prob wins. With no letter among them, the
    greedy token's text is searched for the letters in order (`extract_answer_letter_fallback`), else "A".
    """
    allowed = tuple(letters)  # whole letters only: "AB" is not a letter of "ABCD"
    scores: dict[str, float] = {}
    for token, logprob in top:
        key = token.strip().upper()
        if key in allowed:
            scores[key] = logprob
    if scores:
        return ChoicePick(max(scores, key=scores.__getitem__), "top10", scores)
    upper = text.strip().upper()
    for letter in allowed:
        if letter in upper:
            return ChoicePick(letter, "fallback_text", scores)
    return ChoicePick(allowed[0], "default", scores)
