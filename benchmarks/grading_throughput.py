"""Grading throughput and gold-answer acceptance on real benchmark files.

Every problem's reference answer, written the way the benchmark writes it, is graded against the gold answer our
loader extracts; a correct grader accepts (nearly) all of them. MATH-500 is graded on its full reference solutions
(the answer is a \\boxed{} somewhere in the text), GSM8K on its reference reasoning ("... #### 42"), AIME24 on its
solutions where the file has them, and AIME24/AMC23 on "The answer is \\boxed{<answer>}" and on the bare answer.

The headline row is one cold `grade_math_batch` call on MATH-500 (worker start-up included); the per-set rows
share one warm `MathGrader`, so small sets are not dominated by start-up.

    python benchmarks/grading_throughput.py [--data ../shared/data/benchmarks] [--path math500.jsonl]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections import Counter
from pathlib import Path

from asft.evaluation.benchmarks import load_benchmark
from asft.evaluation.grading import GradeResult, MathGrader, grade_math_batch

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/benchmarks"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def math500_pairs(path: Path) -> list[tuple[str, str]]:
    examples = load_benchmark("math500", path)
    return [(row["solution"], ex.gold) for row, ex in zip(_rows(path), examples, strict=True)]


def cases(data: Path, math500: Path) -> dict[str, list[tuple[str, str]]]:
    """(completion, gold) pairs per set, from the reference's own words."""
    result = {"math500 (solution)": math500_pairs(math500)}
    gsm_path = data / "gsm8k/test.jsonl"
    if gsm_path.exists():
        gsm = load_benchmark("gsm8k", gsm_path)
        result["gsm8k (reasoning)"] = [(r["answer"], e.gold) for r, e in zip(_rows(gsm_path), gsm, strict=True)]
    for name in ("aime24", "amc23"):
        path = data / name / "test.jsonl"
        if not path.exists():
            continue
        examples, rows = load_benchmark(name, path), _rows(path)
        if all(isinstance(r.get("solution"), str) for r in rows):
            result[f"{name} (solution)"] = [(r["solution"], e.gold) for r, e in zip(rows, examples, strict=True)]
        raw = [str(r["answer"]) for r in rows]
        result[f"{name} (boxed)"] = [
            (f"The answer is \\boxed{{{a}}}.", e.gold) for a, e in zip(raw, examples, strict=True)
        ]
        result[f"{name} (bare)"] = [(a, e.gold) for a, e in zip(raw, examples, strict=True)]
    return result


def _row(name: str, pairs: list, results: list[GradeResult], seconds: float) -> str:
    status = Counter(r.status for r in results)
    accepted = sum(r.correct for r in results) / len(results)
    return (
        f"| {name} | {len(pairs)} | {accepted:.1%} | {status['timeout']} | {status['error']} "
        f"| {len(pairs) / seconds:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of <benchmark>/test.jsonl")
    parser.add_argument("--path", type=Path, help="MATH-500 file (default: <data>/math_oai/test.jsonl)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--show-rejected", type=int, default=10)
    args = parser.parse_args()
    math500 = args.path or args.data / "math_oai/test.jsonl"

    print(f"| set | items | accepted | timeouts | errors | samples/s ({args.workers} workers) |")
    print("|---|---|---|---|---|---|")
    headline = math500_pairs(math500)
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    results = grade_math_batch(headline, workers=args.workers, timeout_s=args.timeout)
    seconds = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers have exited and been reaped
    worker_cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    print(_row("math500, cold grade_math_batch", headline, results, seconds))

    rejected = []
    with MathGrader(args.workers, timeout_s=args.timeout) as grader:
        grader.grade([("\\boxed{1}", "1")] * args.workers)  # start the workers outside the timing
        for name, pairs in cases(args.data, math500).items():
            started = time.perf_counter()
            results = grader.grade(pairs)
            print(_row(name, pairs, results, time.perf_counter() - started))
            rejected += [(name, p[1], r) for p, r in zip(pairs, results, strict=True) if not r.correct]
    for name, gold, result in rejected[: args.show_rejected]:
        print(f"rejected: {name}: gold={gold!r} extracted={result.extracted!r} ({result.status})")
    print(
        f"\ncold MATH-500 run: {seconds:.2f} s wall, {worker_cpu:.2f} s worker CPU (start-up included) = "
        f"{len(headline) / worker_cpu:.0f} samples per worker-CPU-second; with {args.workers} idle cores that is "
        f"{args.workers * len(headline) / worker_cpu:.0f} samples/s (the wall rate is lower when the cores are shared)"
    )


if __name__ == "__main__":
    main()
