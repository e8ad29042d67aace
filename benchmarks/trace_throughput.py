"""Per-token gradient tracing throughput: target tokens traced per second and peak memory, for the trace's
vmapped vector–Jacobian products (`asft.tracing.gradients.token_gradients`) at several chunk sizes and attention
implementations, against the loop a user would write instead (one `torch.autograd.grad` per token on a retained
graph). Each configuration runs in its own process so its peak memory is its own (host RSS high-water mark on
CPU, `torch.cuda.max_memory_allocated` on a GPU). Ratios compare within one run; absolute rates depend on the
machine.

    python benchmarks/trace_throughput.py                        # the demo-sized model and a 4-layer 512-wide one
    python benchmarks/trace_throughput.py --model Qwen/Qwen2.5-1.5B --seq-len 512 --tokens 64   # on a GPU node
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SHAPES = {
    # the demo's tiny model (asft.demo) and a wider stand-in: random weights, Qwen2 architecture
    "demo": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4},
    "qwen2-512x4": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 8},
}


def build_model(shape: str, model_path: str | None, attention: str, dtype: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    if model_path:
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, dtype), attn_implementation=attention
        )
    else:
        config = Qwen2Config(vocab_size=4096, num_key_value_heads=1, head_dim=32, **SHAPES[shape])
        config._attn_implementation = attention
        model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model.eval()


def measure(args: argparse.Namespace) -> dict:
    """One configuration, in this process: returns tokens/s and peak memory."""
    import torch

    from asft.tracing.gradients import RademacherProjection, select_parameters, token_gradients
    from asft.train_io import peak_host_rss_gb

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args.shape, args.model, args.attention, args.dtype).to(device)
    params = select_parameters(model, "lora")
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, vocab, (args.batch, args.seq_len), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, : args.seq_len // 4] = -100  # a prompt
    traced = torch.arange(args.tokens, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if args.method == "loop":
        from asft.tracing.gradients import token_losses_fn

        losses, _ = token_losses_fn(model, input_ids, attention_mask, labels)
        ce = losses(dict(params))
        for t in traced.tolist():
            torch.autograd.grad(ce[t], list(params.values()), retain_graph=True)
    else:
        projection = RademacherProjection({k: v.numel() for k, v in params.items()}, args.dim, 0, device)
        token_gradients(model, params, input_ids, attention_mask, labels, projection, args.chunk, traced)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else peak_host_rss_gb()
    return {"tokens_per_second": args.tokens / seconds, "peak_memory_gb": peak, "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=["demo", "qwen2-512x4"])
    parser.add_argument("--model", help="a model directory or hub id instead of a random-weight shape")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64, help="target tokens traced per configuration")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--attention", nargs="+", default=["sdpa", "eager"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one configuration as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(argparse.Namespace(**json.loads(args.one)))))
        return
    shapes = [None] if args.model else args.shape
    print("| model | method | attention | chunk | tokens/s | vs loop | peak memory (GB) |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        for attention in args.attention:
            runs = [("loop", 1)] + [("vmap", chunk) for chunk in args.chunks]
            loop_rate = None
            for method, chunk in runs:
                one = {**vars(args), "shape": shape, "attention": attention, "method": method, "chunk": chunk}
                one.pop("one")
                out = subprocess.run(
                    [sys.executable, __file__, "--one", json.dumps(one)], capture_output=True, text=True, check=True
                )
                result = json.loads(out.stdout.strip().splitlines()[-1])
                rate = result["tokens_per_second"]
                loop_rate = loop_rate or rate
                print(
                    f"| {args.model or shape} | {method} | {attention} | {chunk if method == 'vmap' else '–'} | "
                    f"{rate:.1f} | {rate / loop_rate:.2f}× | {result['peak_memory_gb']:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
