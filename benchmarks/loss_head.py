"""Peak extra memory and time of the loss head: the full-logits path vs the chunked path.

Each variant (mode × path × LM-head kind) runs in its own subprocess so peaks do not mix. On CPU the peak is the
process's RSS high-water mark beyond its RSS once the inputs exist (the kernel's high-water mark is reset at that
point through /proc/self/clear_refs, so allocating the inputs does not hide anything); on CUDA it is torch's
allocator high-water mark beyond the inputs. A step is one forward + backward of the loss head only; the full-logits
variant builds logits = hidden @ W.T (and the reference's) itself, as the chunked path does internally.

    python benchmarks/loss_head.py                                   # Qwen2.5-7B shapes, CPU float32 (~12 GB)
    python benchmarks/loss_head.py --heads frozen --warmup 0 --repeats 1
    python benchmarks/loss_head.py --tokens 256 --vocab 8192 --hidden 512 --chunk-sizes 32 64   # quick
    python benchmarks/loss_head.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = {"sft": {"weighting": "none"}, "asft": {"weighting": "dft", "kl_weight": 0.05}}


def _rss_bytes(field: str) -> int | None:
    """VmRSS / VmHWM of this process from /proc (Linux), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _PeakMemory:
    """Peak memory beyond the moment `start` is called: CUDA allocator stats, or the process's RSS."""

    def __init__(self, device: str) -> None:
        self.device = device

    def start(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        self.base = _rss_bytes("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak(self) -> int:
        if self.device == "cuda":
            import torch

            return torch.cuda.max_memory_allocated() - self.base
        hwm = _rss_bytes("VmHWM") if self.resettable else None
        return (hwm or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - self.base


def run_variant(args: argparse.Namespace, mode: str, chunk: int | None, head: str) -> dict:
    import torch

    from asft.losses import LossSpec, loss_from_hidden, loss_from_logits

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    spec = LossSpec.from_config(MODES[mode])
    n = args.tokens
    # In place, so creating the inputs never holds two copies (a transient would not matter after the reset, but
    # keeps the whole run within the machine's memory).
    hidden = torch.empty(1, n + 1, args.hidden, device=device, dtype=dtype).normal_(std=1.0)
    ref_hidden = None
    if spec.needs_reference:
        ref_hidden = torch.empty_like(hidden).normal_(std=0.1).add_(hidden)
    weight = torch.empty(args.vocab, args.hidden, device=device, dtype=dtype).normal_(std=0.02)
    weight.requires_grad_(head == "trained")
    hidden.requires_grad_()
    labels = torch.randint(0, args.vocab, (1, n + 1), device=device)

    def step(length: int | None = None) -> None:
        h, ref, y = hidden[:, :length], None if ref_hidden is None else ref_hidden[:, :length], labels[:, :length]
        if chunk is None:
            ref_logits = (ref @ weight.detach().T) if ref is not None else None
            loss, _ = loss_from_logits(h @ weight.T, y, spec, ref_logits)
            del ref_logits
        else:
            loss, _ = loss_from_hidden(h, weight, y, spec, ref, chunk_size=chunk)
        loss.backward()
        hidden.grad = weight.grad = None

    step(length=9)  # a tiny step first, so loading kernels' code and thread pools is not counted as peak memory
    memory = _PeakMemory(device.type)
    memory.start()
    for _ in range(args.warmup):
        step()
    timings = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    return {"mode": mode, "chunk": chunk, "head": head, "peak_extra_bytes": memory.peak(), "seconds": min(timings)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="target tokens (one sequence of tokens + 1)")
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--hidden", type=int, default=3584)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["sft", "asft"])
    parser.add_argument(
        "--heads",
        nargs="+",
        choices=["frozen", "trained"],
        default=["frozen", "trained"],
        help="frozen: LoRA (no head gradient); trained: full fine-tuning (the [V, d] head gradient is in every peak)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (their memory counts)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps; the fastest is reported")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    if args.variant:
        mode, chunk, head = args.variant.split(":")
        print(json.dumps(run_variant(args, mode, None if chunk == "naive" else int(chunk), head)))
        return

    print(
        f"tokens={args.tokens} vocab={args.vocab} hidden={args.hidden} device={args.device} dtype={args.dtype} "
        f"warmup={args.warmup} repeats={args.repeats}\n"
    )
    print("| LM head | mode | path | peak extra memory (MiB) | vs full logits | fwd+bwd (s) | vs full logits |")
    print("|---|---|---|---|---|---|---|")
    for head in args.heads:
        for mode in args.modes:
            naive = None
            for chunk in ["naive", *map(str, args.chunk_sizes)]:
                command = [sys.executable, __file__, *sys.argv[1:], "--variant", f"{mode}:{chunk}:{head}"]
                output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                row = json.loads(output.strip().splitlines()[-1])
                naive = naive or row
                path = "full logits" if row["chunk"] is None else f"chunked {row['chunk']}"
                print(
                    f"| {head} | {mode} | {path} | {row['peak_extra_bytes'] / 2**20:.0f} | "
                    f"{row['peak_extra_bytes'] / max(naive['peak_extra_bytes'], 1):.1%} | {row['seconds']:.3f} | "
                    f"{row['seconds'] / naive['seconds']:.2f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
