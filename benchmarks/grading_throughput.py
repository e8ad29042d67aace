"""Grading throughput and gold-answer acceptance on real benchmark files.

For each benchmark, every problem's reference answer, written the way the benchmark writes it, is graded against
the gold answer our loader extracts; a correct grader accepts (nearly) all of them. MATH-500 is graded on its full
reference solutions (the answer inside the solution text), GSM8K on its reference reasoning ("... #### 42"),
AIME24/AMC23 on "The answer is \\boxed{<answer>}" and on the bare answer text.

    python benchmarks/grading_throughput.py --data ../shared/data/benchmarks
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from asft.evaluation.benchmarks import load_benchmark
from asft.evaluation.grading import MathGrader


def cases(data: Path) -> dict[str, list[tuple[str, str]]]:
    """(completion, gold) pairs per benchmark, from the reference's own words."""

    def rows(folder: str) -> list[dict]:
        return [json.loads(line) for line in (data / folder / "test.jsonl").read_text().splitlines() if line.strip()]

    result = {}
    math = load_benchmark("math500", data / "math_oai/test.jsonl")
    result["math500 (solution)"] = [(r["solution"], e.gold) for r, e in zip(rows("math_oai"), math, strict=True)]
    gsm = load_benchmark("gsm8k", data / "gsm8k/test.jsonl")
    result["gsm8k (reasoning)"] = [(r["answer"], e.gold) for r, e in zip(rows("gsm8k"), gsm, strict=True)]
    for name in ("aime24", "amc23"):
        examples = load_benchmark(name, data / name / "test.jsonl")
        raw = [str(r["answer"]) for r in rows(name)]
        result[f"{name} (boxed)"] = [
            (f"The answer is \\boxed{{{a}}}.", e.gold) for a, e in zip(raw, examples, strict=True)
        ]
        result[f"{name} (bare)"] = [(a, e.gold) for a, e in zip(raw, examples, strict=True)]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/benchmarks")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--show-rejected", type=int, default=3)
    args = parser.parse_args()
    print(f"| set | items | accepted | samples/s ({args.workers} workers) |\n|---|---|---|---|")
    with MathGrader(args.workers, timeout_s=5.0) as grader:
        grader.grade([("\\boxed{1}", "1")] * args.workers)  # start the workers outside the timing
        rejected = []
        for name, pairs in cases(args.data).items():
            started = time.perf_counter()
            results = grader.grade(pairs)
            seconds = time.perf_counter() - started
            accepted = sum(r.correct for r in results)
            rejected += [
                (name, p[1], r.extracted, r.status) for p, r in zip(pairs, results, strict=True) if not r.correct
            ]
            print(f"| {name} | {len(pairs)} | {accepted / len(pairs):.1%} | {len(pairs) / seconds:.0f} |")
    for name, gold, extracted, status in rejected[: args.show_rejected * 4]:
        print(f"rejected: {name}: gold={gold!r} extracted={extracted!r} ({status})")


if __name__ == "__main__":
    main()
