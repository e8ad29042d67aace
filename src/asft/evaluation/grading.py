"""Math answer grading with math-verify, in worker processes with a per-item timeout.

Model text reaches sympy only inside a worker process; math-verify uses signal alarms (not thread-safe), which
is fine in a worker's main thread, and the parent also kills any worker that stays silent past the timeout.
A timeout or a parse failure grades as incorrect and is counted, never a crash or a hang.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

# Tests only: a completion equal to this env var's value (read by the parent per batch) makes a worker hang.
_HANG_FOR_TESTS = "ASFT_GRADING_TEST_HANG"


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


def _worker(conn: Connection, timeout_s: int, hang_marker: str | None) -> None:
    """Grade (index, completion, gold) items as they arrive; answer each with (index, result)."""
    while True:
        job = conn.recv()
        if job is None:
            return
        for index, completion, gold in job:
            if hang_marker and completion == hang_marker:
                time.sleep(3600)
            try:
                result = grade_math(completion, gold, timeout_s)
            except Exception:  # noqa: BLE001 - any parser failure is an ungradable answer
                result = GradeResult(False, None, "error")
            conn.send((index, result))


class _Worker:
    def __init__(self, context: mp.context.BaseContext, timeout_s: float) -> None:
        self.conn, child = context.Pipe()
        args = (child, max(1, int(timeout_s)), os.environ.get(_HANG_FOR_TESTS))
        self.process = context.Process(target=_worker, args=args, daemon=True)
        self.process.start()
        child.close()
        self.pending: list[tuple[int, str, str]] = []
        self.last_seen = time.monotonic()

    def submit(self, items: list[tuple[int, str, str]]) -> None:
        self.pending.extend(items)
        self.last_seen = time.monotonic()
        self.conn.send(items)

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
        self.conn.close()


def _context() -> mp.context.BaseContext:
    """A forkserver with math-verify preloaded: workers start in milliseconds without inheriting torch threads."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["math_verify", "asft.evaluation.grading"])
    return context


def grade_math_batch(
    pairs: Sequence[tuple[str, str]], workers: int = 2, timeout_s: float = 5.0, chunk: int = 16
) -> list[GradeResult]:
    """Grade (completion, gold) pairs in worker processes; each item gets at most ~timeout_s seconds."""
    if not pairs:
        return []
    context = _context()
    items = [(i, c, g) for i, (c, g) in enumerate(pairs)]
    queue = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    results: list[GradeResult | None] = [None] * len(items)
    pool = [_Worker(context, timeout_s) for _ in range(max(1, min(workers, len(queue))))]
    try:
        for worker in pool:
            if queue:
                worker.submit(queue.pop(0))
        while any(w.pending for w in pool):
            ready = wait([w.conn for w in pool if w.pending], timeout=0.1)
            for slot, worker in enumerate(pool):
                died = False
                if worker.conn in ready:
                    try:
                        index, result = worker.conn.recv()
                    except (EOFError, OSError):  # the worker died mid-item
                        died = True
                    else:
                        results[index] = result
                        worker.pending.pop(0)  # a worker answers its items in order
                        worker.last_seen = time.monotonic()
                timed_out = bool(worker.pending) and time.monotonic() - worker.last_seen > timeout_s
                if died or timed_out:
                    # The first pending item is the one it was grading: it fails; the rest go to a new worker.
                    (stuck_index, _, _), *rest = worker.pending
                    results[stuck_index] = GradeResult(False, None, "timeout" if timed_out else "error")
                    worker.kill()
                    worker = pool[slot] = _Worker(context, timeout_s)
                    if rest:
                        worker.submit(rest)
                if not worker.pending and queue:
                    worker.submit(queue.pop(0))
    finally:
        for worker in pool:
            worker.close()
    return [r if r is not None else GradeResult(False, None, "error") for r in results]


def grade_choice(predicted_letter: str | None, gold_letter: str) -> bool:
    return predicted_letter is not None and predicted_letter.strip().upper() == gold_letter.strip().upper()
