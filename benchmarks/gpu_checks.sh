#!/usr/bin/env bash
# The GPU checks recorded in the closing notes: loss-head memory/time at Qwen2.5-7B shapes, the training-step
# ratio on Qwen2.5-0.5B shapes, and the pipeline's CLI stages in bf16. Usage: bash benchmarks/gpu_checks.sh OUTDIR
set -uo pipefail
out=${1:?output directory}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 - <<'PY' | tee -a "$out/gpu.txt"
import importlib
for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "pyarrow", "fsspec", "tokenizers", "huggingface_hub"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # report, keep going
        print(name, "IMPORT FAILED:", err)
PY
python3 benchmarks/loss_head.py --device cuda --dtype bfloat16 --chunk-sizes 512 1024 2048 | tee "$out/loss_head.md"
python3 benchmarks/loss_head.py --device cuda --dtype bfloat16 --chunk-sizes 1024 --frozen-head | tee -a "$out/loss_head.md"
python3 benchmarks/loss_head.py --device cuda --dtype float32 --chunk-sizes 1024 | tee -a "$out/loss_head.md"
python3 benchmarks/train_step.py --shape qwen2.5-0.5b --modes sft asft sft-lr sft-topk --steps 20 --batch 8 --words 300 \
  --out "$out/train_step.md" > "$out/train_step.log" 2>&1; tail -8 "$out/train_step.log"
work=$(mktemp -d)
asft() { python3 -m asft.cli "$@"; }
asft build-demo --out "$work/demo" > "$out/stages.log" 2>&1
start=$(date +%s)
asft train --model "$work/demo/model" --data "$work/demo/data/train.jsonl" --spec @.whl/specs/train_asft.json \
  --out "$work/run/train" --checkpoints "$work/run/ckpt" >> "$out/stages.log" 2>&1
asft merge --base "$work/demo/model" --adapter "$work/run/train" --out "$work/run/merged" >> "$out/stages.log" 2>&1
asft fetch-benchmark --spec '{"format":"math500","source":{"demo":"benchmarks/arith.jsonl"}}' --demo-dir "$work/demo" \
  --out "$work/run/arith.jsonl" >> "$out/stages.log" 2>&1
asft evaluate --model "$work/run/merged" --benchmark "$work/run/arith.jsonl" --spec @.whl/specs/eval.json \
  --out-dir "$work/run/eval" >> "$out/stages.log" 2>&1
echo "stages seconds: $(( $(date +%s) - start ))" | tee -a "$out/stages.log"
cp "$work/run/train/train_log.jsonl" "$work/run/train/train_summary.json" "$work/run/eval/metrics.json" "$out/" 2>/dev/null
tail -5 "$out/stages.log"
