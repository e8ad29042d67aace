"""Training-step time and peak memory of each mode relative to SFT, through the real training stage (TRL; LoRA or full).

    python benchmarks/train_step.py                         # the demo model (CPU-sized)
    python benchmarks/train_step.py --shape qwen2.5-0.5b    # random weights with Qwen2.5-0.5B's shapes (GPU)
    python benchmarks/train_step.py --modes sft asft asft@cached sft+kl sft+kl@cached sft-lr sft-lr@cached
    python benchmarks/train_step.py --modes sft asft asft@cached --samples 64 --finetune full --out table.md

A mode is a row of the config's `modes` (the demo experiment's); `MODE@cached` reads the reference from a cache
(`training.reference: cached`, `training.reference_samples: --samples`) instead of running it live (`MODE` or
`MODE@live`). The cache is built once per (shape, data, training settings) with `asft.reference_stage`, before any
timing, and its build time is reported above the table. `--finetune full` trains every weight, so a live anchored
mode loads a frozen copy of the model as its reference; a cached one loads none.

Reports the median seconds per optimizer step after warm-up, from the training log's `step_seconds`, and the
time of the reference forward alone on the same batches (the frozen model, no grad, with its full-vocabulary
logits, which any exact KL needs): a live anchored mode cannot cost less than the SFT step plus that forward, so
its `floor` = 1 + ref_forward / sft step is the ratio a perfect implementation would reach. Each run's peak host
memory (and on CUDA its peak GPU memory) comes from the run's train summary (`host_peak_rss_gb`,
`gpu_peak_allocated_gb`). Every run, the model build, the cache build and the reference forward run in a fresh
interpreter started by this (light, torch-free) one, so each run's peaks are its own: a child's ru_maxrss starts at
its parent's high-water mark on Linux. The scratch folder (models, caches, runs) is removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
REFERENCES = ("live", "cached")
CONFIG = Path(__file__).resolve().parents[1] / "config" / "config.yaml"
EXPERIMENT = "demo"  # the config's experiment whose training block and mode rows the runs use


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


def parse_mode(name: str) -> tuple[str, str]:
    """`asft@cached` -> ("asft", "cached"); a plain name is live."""
    mode, _, reference = name.partition("@")
    reference = reference or "live"
    if reference not in REFERENCES:
        raise ValueError(f"mode {name!r}: the reference after '@' must be one of {REFERENCES}")
    return mode, reference


def build_model(work: Path, shape: str) -> Path:
    """The demo model (built and briefly pretrained here), or random weights with `shape`'s architecture and the
    demo's tokenizer; returns its directory. Loads torch and transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from asft.demo import build_demo

    build_demo(work / "demo", n_train=16, n_test=4, n_pretrain=64, pretrain_steps=2)
    model_dir = work / "demo" / "model"
    if shape == "demo":
        return model_dir
    demo = Qwen2Config.from_pretrained(model_dir)
    tokens = {k: getattr(demo, k) for k in ("eos_token_id", "pad_token_id", "bos_token_id")}
    model = AutoModelForCausalLM.from_config(Qwen2Config(**SHAPES[shape], **tokens))
    model.save_pretrained(work / shape)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(work / shape)
    return work / shape


def bench_config(
    steps: int,
    batch: int,
    max_length: int,
    finetune: str = "lora",
    reference: str = "live",
    samples: int = 16,
) -> dict:
    """The repository's config with the demo experiment's training block set for timing, validated (defaults filled).

    With reference cached, `training.reference: cached` and `training.reference_samples: samples`, as a config
    would set them; live leaves both out of the run specs (`asft.matrix.run_training`).
    """
    from asft.config import validate_config
    from asft.config_files import read_config_file

    raw = read_config_file(CONFIG)
    raw["experiments"][EXPERIMENT]["training"].update(
        finetune=finetune,
        max_steps=steps,
        per_device_train_batch_size=batch,
        max_length=max_length,
        logging_steps=1,
        kl_log_every=0,  # measure each mode's own cost, not the optional drift logging
        save_steps=10**6,
        report_to=["none"],
        dtype="auto",
        learning_rate=1e-4,
        reference=reference,
        reference_samples=samples,
    )
    return validate_config(raw, source=f"{CONFIG} (benchmark settings)")


def mode_spec(config: dict, mode: str) -> dict:
    """The train spec of the experiment's (first) run of `mode`."""
    from asft.config import iter_runs, train_spec

    runs = [r for r in iter_runs(config, EXPERIMENT) if r.mode == mode]
    if not runs:
        raise SystemExit(f"mode {mode!r} is not one of experiments.{EXPERIMENT}.modes in {CONFIG}")
    return train_spec(config, runs[0])


def folder_bytes(path: Path) -> int:
    """Apparent size of every file under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def host_hwm_gb() -> float | None:
    """This process's peak RSS from /proc (VmHWM: the address space's own high-water mark, which unlike
    ru_maxrss does not start at the parent's); None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


# --- work done in a fresh interpreter -------------------------------------------------------------------------------


def spawn(kind: str, scratch: Path, **task: Any) -> Any:
    """Run `worker`'s task `kind` with `task` in a fresh interpreter and return its (JSON) result; the task and
    result files go to a new folder under `scratch`."""
    folder = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=scratch))
    (folder / "task.json").write_text(json.dumps({"kind": kind, **task}, default=str))
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(folder)], check=True)
    return json.loads((folder / "result.json").read_text())


def worker(folder: Path) -> None:
    task = json.loads((folder / "task.json").read_text())
    kind = task.pop("kind")
    result = {"model": _model_task, "cache": _cache_task, "train": _train_task, "ref_forward": _ref_forward_task}[kind](
        **task
    )
    (folder / "result.json").write_text(json.dumps(result, default=str))


def _model_task(work: str, shape: str) -> str:
    return str(build_model(Path(work), shape))


def _cache_task(model_dir: str, data: str, spec: dict, out: str) -> dict:
    from asft.reference_stage import build_reference_cache

    began = time.perf_counter()
    summary = build_reference_cache(Path(model_dir), Path(data), spec, Path(out))
    summary["seconds"] = time.perf_counter() - began
    summary["disk_bytes"] = folder_bytes(Path(out))
    return summary


def _train_task(model_dir: str, data: str, spec: dict, out: str, cache: str | None) -> dict:
    from asft.layout import TRAIN_LOG
    from asft.losses import LossSpec
    from asft.training import train

    out_dir = Path(out)
    summary = train(
        Path(model_dir),
        Path(data),
        spec,
        out_dir / "train",
        out_dir / "checkpoints",
        reference_cache=Path(cache) if cache else None,
    )
    log = [json.loads(line) for line in (out_dir / "train" / TRAIN_LOG).read_text().splitlines()]
    gpu = summary.get("gpu_peak_allocated_gb")
    return {
        "step_seconds": statistics.median(r["step_seconds"] for r in (log[3:] or log)),
        "needs_reference": LossSpec.from_config(spec["loss"]).needs_reference,
        "host_peak_rss_gb": max(summary["host_peak_rss_gb"]),
        "host_rss_after_load_gb": max(summary["host_rss_after_load_gb"]),
        "host_hwm_gb": host_hwm_gb(),
        "gpu_peak_allocated_gb": max(gpu) if gpu else None,
        "accelerator": summary.get("accelerator"),
    }


def _ref_forward_task(model_dir: str, data: str, batch: int, max_length: int, steps: int) -> float:
    return reference_forward_seconds(Path(model_dir), Path(data), batch, max_length, steps)


# --- the benchmark --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="demo", choices=["demo", *SHAPES])
    parser.add_argument(
        "--modes", nargs="+", default=["sft", "asft"], help="mode rows of the config; MODE@cached reads a cache"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the mode list this many times; report each mode's fastest round"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--words", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--finetune", choices=["lora", "full"], default="lora")
    parser.add_argument("--samples", type=int, default=16, help="K reference samples per token of a cache")
    parser.add_argument("--out", type=Path, default=None, help="write the table here too (raw results: .json beside)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (models, caches, runs)")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return
    try:
        parsed = {name: parse_mode(name) for name in args.modes}
    except ValueError as err:
        parser.error(str(err))
    work = Path(tempfile.mkdtemp(prefix="asft-bench-"))
    try:
        run_benchmark(args, parsed, work)
    finally:
        if args.keep:
            print(f"scratch folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run_benchmark(args: argparse.Namespace, parsed: dict[str, tuple[str, str]], work: Path) -> None:
    """Build the model, the data and the caches under `work`, train every mode, print (and write) the table."""
    from asft.config import canonical_json
    from asft.data import write_jsonl

    model_dir = Path(spawn("model", work, work=work, shape=args.shape))
    data = work / "train.jsonl"
    write_jsonl(data, long_records(args.steps * args.batch, args.words, seed=0))

    configs = {
        reference: bench_config(args.steps, args.batch, args.max_length, args.finetune, reference, args.samples)
        for reference in {reference for _, reference in parsed.values()}
    }
    specs = {name: mode_spec(configs[reference], mode) for name, (mode, reference) in parsed.items()}
    caches: dict[str, tuple[Path, dict]] = {}  # canonical training settings -> (folder, build summary)
    for name, (_, reference) in parsed.items():
        key = canonical_json(specs[name]["training"])
        if reference == "cached" and key not in caches:
            folder = work / "caches" / f"cache-{len(caches)}"
            caches[key] = folder, spawn("cache", work, model_dir=model_dir, data=data, spec=specs[name], out=folder)

    rounds: dict[str, list[dict]] = {name: [] for name in args.modes}
    for round_index in range(args.rounds):  # interleaved, so a slow period of the machine hits every mode
        for name, (_, reference) in parsed.items():
            cache = caches[canonical_json(specs[name]["training"])][0] if reference == "cached" else None
            out = work / "runs" / f"{name.replace('@', '-')}-{round_index}"
            result = spawn("train", work, model_dir=model_dir, data=data, spec=specs[name], out=out, cache=cache)
            rounds[name].append(result)
    live_anchored = any(rounds[name][0]["needs_reference"] for name, (_, ref) in parsed.items() if ref == "live")
    reference = None
    if live_anchored:
        reference = spawn(
            "ref_forward",
            work,
            model_dir=model_dir,
            data=data,
            batch=args.batch,
            max_length=args.max_length,
            steps=args.steps,
        )
    lines = table(args, parsed, rounds, reference, caches)
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        raw = {
            "args": {
                k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("worker", "keep")
            },
            "rounds": rounds,
            "reference_forward_seconds": reference,
            "caches": [{k: v for k, v in summary.items() if k != "identity"} for _, summary in caches.values()],
        }
        args.out.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")


def table(
    args: argparse.Namespace,
    parsed: dict[str, tuple[str, str]],
    rounds: dict[str, list[dict]],
    reference: float | None,
    caches: dict[str, tuple[Path, dict]],
) -> list[str]:
    """The report: one row per mode, its best round's step time, its peaks (largest over rounds), ratios to sft."""
    best = {name: min(r["step_seconds"] for r in results) for name, results in rounds.items()}
    host = {name: max(r["host_peak_rss_gb"] for r in results) for name, results in rounds.items()}
    gpus = {name: [r["gpu_peak_allocated_gb"] for r in results] for name, results in rounds.items()}
    on_gpu = all(None not in values for values in gpus.values())
    gpu = {name: max(values) for name, values in gpus.items()} if on_gpu else {}
    accelerator = next(iter(rounds.values()))[0]["accelerator"]

    def ratio(values: dict[str, float], name: str) -> str:
        return f"{values[name] / values['sft']:.2f}x" if "sft" in values and values["sft"] else "-"

    lines = [
        f"shape={args.shape} finetune={args.finetune} batch={args.batch} words/response={args.words} "
        f"max_length={args.max_length} steps={args.steps} rounds={args.rounds} accelerator={accelerator}",
    ]
    for _, summary in caches.values():
        lines.append(
            f"reference cache (built once, before timing): K={summary['k']}, {summary['target_tokens']} target tokens "
            f"of {summary['examples']} examples, {summary['disk_bytes'] / 1e6:.1f} MB, built in "
            f"{summary['seconds']:.1f} s (model load and tokenisation included)"
        )
    head = "| mode | reference | median s/step (best round) | vs sft | floor | peak host RSS GB | vs sft |"
    rule = "|---|---|---|---|---|---|---|"
    if on_gpu:
        head, rule = head + " peak GPU GB | vs sft |", rule + "---|---|"
    lines += ["", head + " every round (s/step) |", rule + "---|"]
    for name, (_, ref) in parsed.items():
        floor = "-"
        if ref == "live" and rounds[name][0]["needs_reference"] and reference is not None and "sft" in best:
            floor = f"{1 + reference / best['sft']:.2f}x"
        row = f"| {name} | {ref} | {best[name]:.4f} | {ratio(best, name)} | {floor} | {host[name]:.2f} | "
        row += f"{ratio(host, name)} |"
        if on_gpu:
            row += f" {gpu[name]:.2f} | {ratio(gpu, name)} |"
        lines.append(row + " " + ", ".join(f"{r['step_seconds']:.3f}" for r in rounds[name]) + " |")
    if reference is not None:
        line = f"reference forward with logits: {reference:.4f} s/batch"
        if "sft" in best:
            line += f"; floor for live anchored modes: {1 + reference / best['sft']:.2f}x"
        lines += ["", line]
    lines += [
        "",
        "floor: 1 + reference forward / sft step, for live anchored modes (a cached mode runs no reference forward).",
        "peak host RSS: the run's train summary host_peak_rss_gb (largest over rounds); each run is its own process.",
    ]
    hwm_gap = [
        name
        for name, results in rounds.items()
        for r in results
        if r["host_hwm_gb"] is not None and abs(r["host_hwm_gb"] - r["host_peak_rss_gb"]) > 0.05 * r["host_hwm_gb"]
    ]
    if hwm_gap:
        lines.append(f"note: ru_maxrss and /proc VmHWM differ by >5% for {sorted(set(hwm_gap))}")
    return lines


def reference_forward_seconds(model_dir: Path, data: Path, batch: int, max_length: int, steps: int) -> float:
    """Median seconds of one no-grad forward with full logits over a training batch, after one warm-up batch.

    The trainer's reference forward stops at the hidden states and computes the reference logits chunk by chunk
    inside the loss; together that is this work.
    """
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
