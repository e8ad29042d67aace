"""The results layout: every file and folder name the stages write and the rules declare, defined once.

The rules (workflow/rules/common.smk) and the package build their paths from here, so a path is never spelled
twice. Import-light on purpose: the Snakefile and the aggregation read it without loading torch.
"""

from __future__ import annotations

# Files of a training output (`<run>/train/`).
TRAIN_LOG = "train_log.jsonl"
RUN_SPEC = "run_spec.json"
TRAIN_SUMMARY = "train_summary.json"

# Files of one evaluation (`<run>/eval/<benchmark>/`).
METRICS = "metrics.json"
SAMPLES = "samples.jsonl"
