"""Math answer grading with math-verify, in worker processes with a per-item timeout.

Model text reaches sympy only inside a worker process (a fresh `python -m asft.evaluation.grading`, so nothing
of the caller is forked or re-imported); math-verify uses signal alarms (not thread-safe), which is fine in a
worker's main thread, and the parent also kills any worker that stays silent past the timeout.
A timeout or a parse failure grades as incorrect and is counted, never a crash or a hang.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

# Tests only: a completion equal to this env var's value (as set when a worker starts) makes that worker hang.
_HANG_FOR_TESTS = "ASFT_GRADING_TEST_HANG"
STARTUP_S = 60.0  # a worker's interpreter start and math-verify import, on a loaded machine


@dataclass(frozen=True)
class GradeResult:
    correct: bool
    extracted: str | None
    status: str  # "ok" | "timeout" | "error"


def _gold_candidates(gold: str) -> list[str]:
    """Gold answers are plain strings ("27.0", "\\frac{1}{2}", "(1,2)"); give math-verify a LaTeX wrapper."""
    gold = gold.strip()
    if "\\boxed" in gold or gold.startswith("$"):
        return [gold]
    return [f"${gold}$", f"\\boxed{{{gold}}}"]


def grade_math(completion: str, gold: str, timeout_s: int = 5) -> GradeResult:
    """Grade one completion in this process (call only inside a worker: it parses model text with sympy)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    predicted = parse(
        completion,
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        parsing_timeout=timeout_s,
    )
    extracted = str(predicted[-1]) if predicted else None
    for candidate in _gold_candidates(gold):
        target = parse(
            candidate, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=timeout_s
        )
        if target:
            return GradeResult(bool(verify(target, predicted, timeout_seconds=timeout_s)), extracted, "ok")
    return GradeResult(False, extracted, "error")


def _serve(stdin: TextIO, stdout: TextIO) -> None:
    """Worker loop: one JSON line of [index, completion, gold] items in, one JSON line per graded item out."""
    import math_verify  # noqa: F401 - imported before "ready", so startup does not eat an item's time

    hang_marker = os.environ.get(_HANG_FOR_TESTS)
    timeout_s = int(os.environ.get("ASFT_GRADING_TIMEOUT", "5"))
    stdout.write("ready\n")
    stdout.flush()
    for line in stdin:
        for index, completion, gold in json.loads(line):
            if hang_marker and completion == hang_marker:
                time.sleep(3600)
            try:
                result = grade_math(completion, gold, timeout_s)
            except Exception:  # noqa: BLE001 - any parser failure is an ungradable answer
                result = GradeResult(False, None, "error")
            stdout.write(json.dumps([index, result.correct, result.extracted, result.status]) + "\n")
            stdout.flush()


class _Worker:
    """One grading process (`python -m asft.evaluation.grading`): no fork of the caller, no re-import of __main__."""

    def __init__(self, timeout_s: float) -> None:
        env = dict(os.environ, ASFT_GRADING_TIMEOUT=str(max(1, int(timeout_s))))
        # Unbuffered pipes: `select` must see every byte the worker wrote (a buffered reader could hide lines).
        self.process = subprocess.Popen(
            [sys.executable, "-m", "asft.evaluation.grading"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env=env,
        )
        self.buffer = b""
        self.ready = False  # until the worker has imported math-verify, allow STARTUP_S on top of the timeout
        self.pending: list[tuple[int, str, str]] = []
        self.last_seen = time.monotonic()

    def submit(self, items: list[tuple[int, str, str]]) -> None:
        self.pending.extend(items)
        self.last_seen = time.monotonic()
        self.process.stdin.write((json.dumps(items) + "\n").encode())

    def read(self) -> list[tuple[int, GradeResult]] | None:
        """The answers that arrived (possibly none yet), or None if the worker died."""
        data = os.read(self.process.stdout.fileno(), 1 << 16)
        if not data:
            return None
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        answers = []
        for line in lines:
            if line == b"ready":
                self.ready, self.last_seen = True, time.monotonic()
                continue
            index, correct, extracted, status = json.loads(line)
            answers.append((index, GradeResult(correct, extracted, status)))
        return answers

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()

    def close(self) -> None:
        try:
            self.process.stdin.close()
            self.process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


class MathGrader:
    """A pool of grading processes kept for a whole evaluation; each item gets at most ~timeout_s seconds."""

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, chunk: int = 16) -> None:
        self.size, self.timeout_s, self.chunk = max(1, workers), timeout_s, chunk
        self.pool: list[_Worker] = []

    def __enter__(self) -> MathGrader:
        return self

    def __exit__(self, *exc: object) -> None:
        for worker in self.pool:
            worker.close()
        self.pool = []

    def grade(self, pairs: Sequence[tuple[str, str]]) -> list[GradeResult]:
        """Grade (completion, gold) pairs; a hung or crashed item is marked and its worker replaced."""
        items = [(i, c, g) for i, (c, g) in enumerate(pairs)]
        queue = [items[i : i + self.chunk] for i in range(0, len(items), self.chunk)]
        results: list[GradeResult | None] = [None] * len(items)
        while len(self.pool) < min(self.size, len(queue)):
            self.pool.append(_Worker(self.timeout_s))
        for worker in self.pool:
            if queue:
                worker.submit(queue.pop(0))
        while any(w.pending for w in self.pool):
            streams = {w.process.stdout: w for w in self.pool if w.pending}
            ready, _, _ = select.select(list(streams), [], [], 0.1)
            for slot, worker in enumerate(self.pool):
                died = False
                if worker.process.stdout in ready:
                    answers = worker.read()
                    died = answers is None
                    for index, result in answers or []:
                        results[index] = result
                        worker.pending.pop(0)  # a worker answers its items in order
                        worker.last_seen = time.monotonic()
                limit = self.timeout_s if worker.ready else self.timeout_s + STARTUP_S
                timed_out = bool(worker.pending) and time.monotonic() - worker.last_seen > limit
                if died or timed_out:
                    # The first pending item is the one it was grading: it fails; the rest go to a new worker.
                    (stuck_index, _, _), *rest = worker.pending
                    results[stuck_index] = GradeResult(False, None, "timeout" if timed_out else "error")
                    worker.kill()
                    worker = self.pool[slot] = _Worker(self.timeout_s)
                    if rest:
                        worker.submit(rest)
                if not worker.pending and queue:
                    worker.submit(queue.pop(0))
        return [r if r is not None else GradeResult(False, None, "error") for r in results]


def grade_math_batch(
    pairs: Sequence[tuple[str, str]], workers: int = 2, timeout_s: float = 5.0, chunk: int = 16
) -> list[GradeResult]:
    """Grade (completion, gold) pairs in worker processes (a one-off pool; see MathGrader to keep one)."""
    if not pairs:
        return []
    with MathGrader(workers, timeout_s, chunk) as grader:
        return grader.grade(pairs)


def grade_choice(predicted_letter: str | None, gold_letter: str) -> bool:
    return predicted_letter is not None and predicted_letter.strip().upper() == gold_letter.strip().upper()


if __name__ == "__main__":
    _serve(sys.stdin, sys.stdout)
