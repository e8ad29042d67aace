"""Worst-case grading time per completion: hostile completions through a warm MathGrader (startup excluded).

Each item must cost at most the timeout (the worker's own timer) or timeout + KILL_GRACE_S (a worker stuck in C
code, killed by the parent). Usage: `python benchmarks/grading_worst_case.py --timeout 1 5`.
"""

from __future__ import annotations

import argparse
import time

from asft.evaluation.grading import MathGrader

N = 100_000
CASES = {
    "#### + 1e5 spaces": "#### a" + " " * N + "b",
    "\\[ x 1e5": "\\[" * N,
    "\\( x 1e5": "\\(" * N,
    "$$a x 1e5": "$$a" * N,
    "$ x 1e5": "$ " * N,
    "\\boxed{ x 1e5": "\\boxed{" * N,
    "answer is + 1 MB": "The answer is " + "x" * 1_000_000,
    "9000 nested braces": "\\boxed{" + "{" * 9000 + "1" + "}" * 9001,
    "2000 nested fracs": "\\boxed{" + "\\frac{1}{" * 2000 + "2" + "}" * 2001,
    "9^{9^{9^9}}": "\\boxed{9^{9^{9^{9}}}}",
    "10^{10^8}": "\\boxed{10^{10^{8}}}",
    "(10^6)!": "\\boxed{(10^{6})!}",
    "2000-term sum": "\\boxed{" + "+".join(f"x_{{{i}}}^{{{i}}}" for i in range(2000)) + "}",
    "5000 numbers": " ".join(str(i) for i in range(5000)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--timeout", type=float, nargs="+", default=[1.0, 5.0])
    args = parser.parse_args()
    for timeout in args.timeout:
        with MathGrader(workers=1, timeout_s=timeout) as grader:
            grader.grade([("\\boxed{1}", "1")])  # start the worker first: startup is not an item's cost
            worst = 0.0
            for name, text in CASES.items():
                started = time.monotonic()
                result = grader.grade([(text, "1")])[0]
                seconds = time.monotonic() - started
                worst = max(worst, seconds)
                print(f"timeout {timeout:g}s  {name:20s} {seconds:6.2f}s  status={result.status}", flush=True)
            print(f"timeout {timeout:g}s: worst {worst:.2f}s per completion, workers killed {grader.restarts}")


if __name__ == "__main__":
    main()
