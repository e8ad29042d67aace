"""Building a reference cache (`asft reference`, asft.reference_stage.build_reference_cache): time and disk size.

    python benchmarks/reference_cache_build.py                          # the demo model, K = 4, 16, 64
    python benchmarks/reference_cache_build.py --shape qwen2.5-0.5b     # random weights, Qwen2.5-0.5B's shapes (GPU)
    python benchmarks/reference_cache_build.py --samples 16 --examples 256 --out build.md

The model and the data (long step-by-step responses) are those of benchmarks/train_step.py, the training settings
its demo experiment's with `training.reference: cached` and `training.reference_samples: K`. For each K the whole
`build_reference_cache` call is timed (model load, TRL's tokenisation, the no-grad forward, the statistics and
samples, the writes), after one untimed warm-up build; reported: wall seconds, target tokens, target tokens per
second, bytes on disk (every file of the cache folder) and those bytes per million target tokens, beside the
arrays' formula (asft.reference_cache.bytes_per_token).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from train_step import SHAPES, bench_config, build_model, folder_bytes, long_records, mode_spec

VLLM_NOTE = (
    "vLLM builder: not implemented (asft.reference_stage has no vLLM path; it builds with a transformers forward). "
    "vLLM's prompt_logprobs give the target token's log-probability and the top-n per position (max_logprobs, 20 by "
    "default); the exact entropy and K unbiased samples from p_ref need the full distribution, which max_logprobs=-1 "
    "returns only as vocabulary-sized Python lists per position. vLLM also lives in its own environment "
    "(/work/main/.venv-vllm), so a comparison would need a separate builder there."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="demo", choices=["demo", *SHAPES])
    parser.add_argument("--samples", type=int, nargs="+", default=[4, 16, 64], help="K values to build a cache for")
    parser.add_argument("--examples", type=int, default=64, help="records in the data file")
    parser.add_argument("--batch", type=int, default=8, help="examples per forward of the build")
    parser.add_argument("--words", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0, help="seed of the K samples per token")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (model, data, caches)")
    parser.add_argument("--out", type=Path, default=None, help="write the table here too (raw results: .json beside)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="asft-cache-bench-"))
    try:
        run_benchmark(args, work)
    finally:
        if args.keep:
            print(f"scratch folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run_benchmark(args: argparse.Namespace, work: Path) -> None:
    """Build the model and data under `work`, then one cache per K; print (and write) the table."""
    import torch

    from asft import reference_stage
    from asft.data import write_jsonl
    from asft.reference_cache import bytes_per_token
    from asft.reference_stage import build_reference_cache

    model_dir = build_model(work, args.shape)
    data = work / "train.jsonl"
    write_jsonl(data, long_records(args.examples, args.words, seed=0))

    def spec(k: int) -> dict:
        config = bench_config(1, args.batch, args.max_length, "lora", "cached", k)
        return mode_spec(config, "asft")  # the cache depends on the training settings, not on the mode

    warm = work / "warm-up"  # loads TRL and warms the kernels, so the first K timed is not charged for them
    write_jsonl(warm / "train.jsonl", long_records(args.batch, args.words, seed=1))
    build_reference_cache(model_dir, warm / "train.jsonl", spec(args.samples[0]), warm / "cache", seed=args.seed)

    results = []
    for k in args.samples:
        out = work / f"cache-k{k}"
        began = time.perf_counter()
        summary = build_reference_cache(model_dir, data, spec(k), out, seed=args.seed)
        seconds = time.perf_counter() - began
        tokens, disk = summary["target_tokens"], folder_bytes(out)
        results.append(
            {
                "k": k,
                "seconds": seconds,
                "examples": summary["examples"],
                "target_tokens": tokens,
                "tokens_per_second": tokens / seconds,
                "disk_bytes": disk,
                "bytes_per_million_tokens": disk / tokens * 1e6,
                "array_bytes_per_million_tokens": bytes_per_token(k) * 1_000_000,
            }
        )

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    lines = [
        f"shape={args.shape} examples={args.examples} words/response={args.words} max_length={args.max_length} "
        f"batch={args.batch} device={device} (builder: transformers forward, asft.reference_stage)",
        "",
        "| K | build wall s | target tokens | tokens/s | bytes on disk | bytes / M target tokens | arrays only / M |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['k']} | {r['seconds']:.2f} | {r['target_tokens']} | {r['tokens_per_second']:.0f} | "
            f"{r['disk_bytes']} | {r['bytes_per_million_tokens'] / 1e6:.1f} MB | "
            f"{r['array_bytes_per_million_tokens'] / 1e6:.1f} MB |"
        )
    lines.append("")
    lines.append("build wall s: the whole build_reference_cache call (model load and tokenisation included).")
    if "vllm" not in Path(reference_stage.__file__).read_text(encoding="utf-8").lower():
        lines.append(VLLM_NOTE)
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(
            json.dumps({"args": vars(args), "results": results}, default=str, indent=2)
        )


if __name__ == "__main__":
    main()
