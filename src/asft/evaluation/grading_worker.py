"""The grading worker: math-verify on untrusted model text, one item at a time under a per-item timer.

Started by the pool in grading.py as a fresh `python -m asft.evaluation.grading_worker` (nothing of the caller is
forked, and a caller script without a `__main__` guard is not re-executed, as multiprocessing's spawn would do).
Model text reaches sympy, whose parser evaluates code, only here. The worker arms a per-item interval timer
(math-verify's own alarms are switched off, so one budget covers extraction, gold parsing and comparison); the
parent kills a worker that stays silent past that budget, for a computation stuck in C code never sees the signal.
Protocol: one JSON line of [index, completion, gold] items in, one JSON line [index, correct, extracted, status]
per graded item out, after a first "ready" line.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Literal

from asft.evaluation.extraction import completion_candidates, extract_answer, gold_candidates
from asft.test_hooks import load_hook

Status = Literal["ok", "timeout", "error"]

DEFAULT_TIMEOUT_S = 5.0
WORKER_MEMORY_BYTES = 4 << 30  # address-space cap per worker: "expand (x+1)^(10^6)" fails, not the node

# Tests only: "module:function" called with (completion, gold) before each item inside a worker, so a test can
# make a worker hang. It comes from the environment of the process that starts the workers, never from model text.
TEST_HOOK_ENV = "ASFT_GRADING_TEST_HOOK"
TIMEOUT_ENV = "ASFT_GRADING_TIMEOUT"  # the per-item budget, set by the pool for the workers it starts


@dataclass(frozen=True)
class GradeResult:
    correct: bool
    extracted: str | None
    status: Status
    truncated: bool = False  # only the tail of the completion was graded (grading.MAX_COMPLETION_CHARS)


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

    for candidate in gold_candidates(gold):
        target = parse(candidate, extraction_config=_configs()[0], parsing_timeout=None)
        if target:
            return tuple(target)
    return ()


def grade_item(completion: str, gold: str) -> GradeResult:
    """Grade one pair in this process, without a time limit: the worker loop supplies one."""
    from math_verify import parse, verify

    target = _parse_gold(gold)
    if not target:
        return GradeResult(False, None, "error")
    extracted = None
    for candidate in completion_candidates(completion):
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


def serve() -> None:
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
    hook = load_hook(TEST_HOOK_ENV)
    timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
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
                result = grade_item(completion, gold)
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


if __name__ == "__main__":
    serve()
