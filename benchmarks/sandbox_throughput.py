"""What the code sandbox costs per generated program: a bare interpreter against the sandboxed one, one by one and
on parallel workers (ratios in one run; absolute times depend on the machine).

    python benchmarks/sandbox_throughput.py --programs 40 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

from asft.evaluation.sandbox import SandboxLimits, run_program, run_programs

# a HumanEval-sized check: define the function, run a handful of asserts
PROGRAM = """
def add(x, y):
    return x + y

for a, b in [(1, 2), (3, 4), (-5, 5), (10**6, 1)]:
    assert add(a, b) == a + b
"""


def bare_seconds(count: int) -> float:
    """The floor: the same program in a plain `python -I` child, no isolation."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(count):
            subprocess.run([sys.executable, "-I", "-c", PROGRAM], cwd=tmp, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    limits = SandboxLimits(timeout_s=20.0)
    layers = run_program(PROGRAM, limits).layers
    bare = bare_seconds(args.programs)
    print(f"isolation layers here: {', '.join(layers)}")
    print(f"bare python -I, sequential: {bare / args.programs * 1000:.0f} ms per program (1.00x)")
    for workers in args.workers:
        started = time.perf_counter()
        results = run_programs([PROGRAM] * args.programs, limits, workers=workers)
        elapsed = time.perf_counter() - started
        assert all(r.status == "passed" for r in results), {r.status for r in results}
        per = elapsed / args.programs
        print(
            f"sandbox, {workers} worker(s): {per * 1000:.0f} ms per program, "
            f"{args.programs / elapsed:.1f} programs/s ({per / (bare / args.programs):.2f}x the bare sequential cost)"
        )


if __name__ == "__main__":
    main()
