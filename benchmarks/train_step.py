"""Training-step time of each mode relative to SFT, through the real training stage (TRL + LoRA).

    python benchmarks/train_step.py                         # the demo model (CPU-sized)
    python benchmarks/train_step.py --shape qwen2.5-0.5b    # random weights with Qwen2.5-0.5B's shapes (GPU)

Reports the median seconds per optimizer step after warm-up, from the training log's `step_seconds`, and the
time of the reference forward alone on the same batches (the frozen model, no grad, with its full-vocabulary
logits, which any exact KL needs): an anchored mode cannot cost less than the SFT step plus that forward, so
`floor` = 1 + ref_forward / sft step is the ratio a perfect implementation would reach.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

SHAPES = {
    # Qwen2.5-0.5B's architecture (random weights: only the cost matters here).
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
}


def long_records(n: int, words: int, seed: int) -> list[dict[str, str]]:
    """Problems with long step-by-step responses, so steps are dominated by real sequence work."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        steps = [
            f"{a} + {b} = {a + b}." for a, b in ((rng.randint(1, 99), rng.randint(1, 99)) for _ in range(words // 5))
        ]
        records.append({"instruction": "Add the numbers step by step.", "response": " ".join(steps)})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="demo", choices=["demo", *SHAPES])
    parser.add_argument("--modes", nargs="+", default=["sft", "asft"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the mode list this many times; report each mode's fastest round"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--words", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=None, help="write the table here too")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, Qwen2Config

    from asft.config import iter_runs, load_config, train_spec
    from asft.data import write_jsonl
    from asft.demo import build_demo
    from asft.layout import TRAIN_LOG
    from asft.training import train

    work = Path(tempfile.mkdtemp(prefix="asft-bench-"))
    build_demo(work / "demo", n_train=16, n_test=4, n_pretrain=64, pretrain_steps=2)
    model_dir = work / "demo" / "model"
    if args.shape != "demo":
        from transformers import AutoTokenizer

        demo = Qwen2Config.from_pretrained(model_dir)
        tokens = {k: getattr(demo, k) for k in ("eos_token_id", "pad_token_id", "bos_token_id")}
        model = AutoModelForCausalLM.from_config(Qwen2Config(**SHAPES[args.shape], **tokens))
        model_dir = work / args.shape
        model.save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(work / "demo" / "model").save_pretrained(model_dir)
    data = work / "train.jsonl"
    write_jsonl(data, long_records(args.steps * args.batch, args.words, seed=0))

    config = load_config(Path(__file__).parents[1] / "config" / "config.yaml")
    config["experiments"]["demo"]["training"].update(
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        max_length=args.max_length,
        logging_steps=1,
        kl_log_every=0,  # measure each mode's own cost, not the optional drift logging
        save_steps=10**6,
        report_to=["none"],
        dtype="auto",
        learning_rate=1e-4,
    )
    rounds: dict[str, list[float]] = {mode: [] for mode in args.modes}
    for round_index in range(args.rounds):  # interleaved, so a slow period of the machine hits every mode
        for mode in args.modes:
            run = next(r for r in iter_runs(config) if r.mode == mode)
            out = work / "runs" / f"{mode}-{round_index}"
            train(model_dir, data, train_spec(config, run), out / "train", out / "checkpoints")
            log = [json.loads(line) for line in (out / "train" / TRAIN_LOG).read_text().splitlines()]
            rounds[mode].append(statistics.median(r["step_seconds"] for r in log[3:]))
    results = {mode: min(times) for mode, times in rounds.items()}
    reference = reference_forward_seconds(model_dir, data, args.batch, args.max_length, args.steps)
    lines = [f"shape={args.shape} batch={args.batch} words/response={args.words} steps={args.steps}", ""]
    lines += ["| mode | median s/step (best round) | vs sft | every round |", "|---|---|---|---|"]
    for mode, seconds in results.items():
        every = ", ".join(f"{t:.3f}" for t in rounds[mode])
        lines.append(f"| {mode} | {seconds:.4f} | {seconds / results.get('sft', seconds):.2f}x | {every} |")
    if "sft" in results:
        floor = 1 + reference / results["sft"]
        lines += ["", f"reference forward with logits: {reference:.4f} s/batch; floor for anchored modes: {floor:.2f}x"]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


def reference_forward_seconds(model_dir: Path, data: Path, batch: int, max_length: int, steps: int) -> float:
    """Median seconds of one no-grad forward with full logits over a training batch, after one warm-up batch.

    The trainer's reference forward stops at the hidden states and computes the reference logits chunk by chunk
    inside the loss; together that is this work.
    """
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asft.data import read_instruction_jsonl, to_prompt_completion
    from asft.dtypes import training_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=training_dtype("auto")).to(device).eval()
    pairs = [to_prompt_completion(r, "alpaca") for r in read_instruction_jsonl(data)]
    texts = [p["prompt"] + p["completion"] for p in pairs]
    times = []
    for start in range(0, min(len(texts), batch * steps), batch):
        encoded = tokenizer(
            texts[start : start + batch], return_tensors="pt", padding=True, truncation=True, max_length=max_length
        ).to(device)
        began = time.perf_counter()
        with torch.no_grad():
            model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], use_cache=False)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times[1:] or times)


if __name__ == "__main__":
    main()
