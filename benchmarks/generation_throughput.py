"""Generation throughput of the two backends on the same model and prompts (greedy, fixed length budget).

python benchmarks/generation_throughput.py --model resources/models/tiny --benchmark resources/benchmarks/arith.jsonl
(the vLLM half runs in the interpreter given by --vllm-python, default .venv-vllm/bin/python)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def measure(backend: str, model: str, benchmark: str, max_new_tokens: int, repeats: int) -> dict:
    from asft.data import render_prompt
    from asft.evaluation.backends import SamplingParams, make_backend
    from asft.evaluation.benchmarks import load_normalized

    prompts = [render_prompt(e.question, "alpaca") for e in load_normalized(benchmark)]
    engine = make_backend(backend, model, dtype="float32", batch_size=len(prompts))
    params = SamplingParams(max_new_tokens=max_new_tokens)
    engine.generate(prompts[:4], params)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = engine.generate(prompts, params)
        best = min(best, time.perf_counter() - started)
    tokens = sum(len(engine.tokenizer.encode(o[0], add_special_tokens=False)) for o in outputs)
    return {"backend": backend, "prompts": len(prompts), "tokens": tokens, "seconds": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resources/models/tiny")
    parser.add_argument("--benchmark", default="resources/benchmarks/arith.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    parser.add_argument("--only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args.only, args.model, args.benchmark, args.max_new_tokens, args.repeats)))
        return
    rows = []
    for backend, python in (("transformers", sys.executable), ("vllm", args.vllm_python)):
        command = [python, __file__, *sys.argv[1:], "--only", backend]
        rows.append(
            json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        )
    print("| backend | prompts | generated tokens | seconds | tokens/s |\n|---|---|---|---|---|")
    for row in rows:
        rate = row["tokens"] / row["seconds"]
        print(f"| {row['backend']} | {row['prompts']} | {row['tokens']} | {row['seconds']:.2f} | {rate:.0f} |")


if __name__ == "__main__":
    main()
