"""Peak extra memory and time of the loss head: full-logits path vs the chunked path.

Each variant runs in its own subprocess so peaks do not mix. On CUDA the peak is torch's allocator high-water
mark beyond the inputs; on CPU it is the process's RSS high-water mark beyond the RSS after inputs exist.

    python benchmarks/loss_head.py                       # Qwen2.5-7B shapes, CPU, float32
    python benchmarks/loss_head.py --device cuda --dtype bfloat16
    python benchmarks/loss_head.py --tokens 256 --vocab 8192 --hidden 512   # quick
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_variant(args: argparse.Namespace, mode: str, chunk: int | None) -> dict:
    import torch

    from asft.losses import LossSpec, loss_from_hidden, loss_from_logits

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    spec = LossSpec(weighting="dft", kl_weight=0.05) if mode == "asft" else LossSpec()
    n = args.tokens
    hidden = torch.randn(1, n + 1, args.hidden, device=device, dtype=dtype) * 0.1
    ref_hidden = hidden + 0.01 * torch.randn_like(hidden) if spec.needs_reference else None
    weight = (torch.randn(args.vocab, args.hidden, device=device, dtype=dtype) * 0.02).requires_grad_(
        not args.frozen_head
    )
    hidden.requires_grad_()
    labels = torch.randint(0, args.vocab, (1, n + 1), device=device)

    def step() -> None:
        if chunk is None:
            ref_logits = (ref_hidden @ weight.T).detach() if ref_hidden is not None else None
            loss, _ = loss_from_logits(hidden @ weight.T, labels, spec, ref_logits)
        else:
            loss, _ = loss_from_hidden(hidden, weight, labels, spec, ref_hidden, chunk_size=chunk)
        loss.backward()
        hidden.grad = weight.grad = None

    # The baseline is taken once the inputs exist and before any step, so the peak covers a whole step.
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()  # warm-up (allocator, kernels); timed steps follow
    timings = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"mode": mode, "chunk": chunk, "peak_extra_bytes": peak, "seconds": min(timings)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--hidden", type=int, default=3584)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--modes", nargs="+", default=["sft", "asft"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frozen-head", action="store_true", help="LoRA: the LM head gets no gradient")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()

    if args.variant:
        mode, chunk = args.variant.split(":")
        print(json.dumps(run_variant(args, mode, None if chunk == "naive" else int(chunk))))
        return

    rows = []
    for mode in args.modes:
        for chunk in ["naive", *map(str, args.chunk_sizes)]:
            command = [sys.executable, __file__, *sys.argv[1:], "--variant", f"{mode}:{chunk}"]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
    head = "frozen (LoRA)" if args.frozen_head else "trained (full fine-tune)"
    print(f"tokens={args.tokens} vocab={args.vocab} hidden={args.hidden} device={args.device} dtype={args.dtype}")
    print(f"LM head: {head}\n")
    print("| mode | path | peak extra memory (MiB) | vs naive | fwd+bwd (s) | vs naive |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes:
        naive = next(r for r in rows if r["mode"] == mode and r["chunk"] is None)
        for row in (r for r in rows if r["mode"] == mode):
            path = "full logits" if row["chunk"] is None else f"chunked ({row['chunk']})"
            print(
                f"| {mode} | {path} | {row['peak_extra_bytes'] / 2**20:.0f} | "
                f"{row['peak_extra_bytes'] / naive['peak_extra_bytes']:.1%} | {row['seconds']:.3f} | "
                f"{row['seconds'] / naive['seconds']:.2f}x |"
            )


if __name__ == "__main__":
    main()
