"""`asft` command line: one subcommand per pipeline stage, each taking explicit paths and a JSON spec.

The Snakemake rules call exactly these commands, so every stage also runs (and is tested) without Snakemake.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any


def _json_arg(value: str) -> Any:
    """A JSON value given inline or as @path."""
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from err


def _cmd_build_demo(args: argparse.Namespace) -> None:
    from asft.demo import build_demo
    from asft.layout import DEMO_MANIFEST
    from asft.run_io import write_text_atomic

    options = args.options or {}
    manifest = args.out / DEMO_MANIFEST
    manifest.unlink(missing_ok=True)  # the manifest marks a finished build; it is written last
    summary = build_demo(args.out, **options)
    write_text_atomic(manifest, json.dumps({"options": options, **summary}, indent=2, sort_keys=True))
    print(json.dumps(summary, indent=2))


def _cmd_validate_config(args: argparse.Namespace) -> None:
    from asft.config import iter_runs, load_config

    config = load_config(args.config)
    runs = list(iter_runs(config))
    print(f"{args.config}: valid; {len(runs)} training runs")
    for run in runs:
        print(f"  {run.experiment}: {run.run_id}")


def _cmd_plan(args: argparse.Namespace) -> None:
    import yaml

    from asft.config import ConfigError, read_config_file, validate_config
    from asft.plan import Throughput, render

    raw = read_config_file(args.config)
    if not isinstance(raw, dict):
        raise ConfigError(f"{args.config}: the top level must be a mapping")
    for item in args.set:  # top-level overrides, parsed as YAML values like snakemake's --config
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        raw[key] = yaml.safe_load(value)
    if args.reference:
        from asft.config_checks import with_reference

        raw = with_reference(raw, args.reference)
    config = validate_config(raw, source=str(args.config))
    rates = {"train_tflops": args.train_tflops, "eval_tflops": args.eval_tflops}
    print(render(config, args.by, args.format, Throughput(**{k: v for k, v in rates.items() if v is not None})))


def _cmd_fetch_model(args: argparse.Namespace) -> None:
    from asft.fetch import fetch_model

    fetch_model(args.source, args.out, demo_dir=args.demo_dir, lock=args.lock)


def _cmd_fetch_dataset(args: argparse.Namespace) -> None:
    from asft.fetch import fetch_dataset

    count = fetch_dataset(args.spec, args.out, demo_dir=args.demo_dir, lock=args.lock)
    logging.info("wrote %d records to %s", count, args.out)


def _cmd_fetch_benchmark(args: argparse.Namespace) -> None:
    from asft.fetch import fetch_benchmark

    count = fetch_benchmark(args.spec, args.out, demo_dir=args.demo_dir, lock=args.lock)
    logging.info("wrote %d problems to %s", count, args.out)


def _cmd_lock(args: argparse.Namespace) -> None:
    from asft.config import load_config
    from asft.source_lock import collect_lock, read_lock, write_lock

    existing = read_lock(args.out)
    entries, notes = collect_lock([load_config(c) for c in args.config], args.resources, existing, args.update)
    for note in notes:
        logging.warning("%s", note)
    write_lock(args.out, entries)
    changed = sorted(k for k in entries if existing.get(k) != entries[k])
    logging.info("%s: %d entries, %d new or changed: %s", args.out, len(entries), len(changed), ", ".join(changed))


def _cmd_train(args: argparse.Namespace) -> None:
    from asft.distributed import check_devices, launch_command

    num_processes = args.spec["training"].get("num_processes", 1)
    num_nodes = args.spec["training"].get("num_nodes", 1)
    check_devices(num_processes, args.spec["training"].get("deepspeed"))
    command = launch_command(args.argv, num_processes, num_nodes)
    if command is not None:  # one rank per GPU; each rank runs this same command
        logging.info("launching %d data-parallel ranks on each of %d node(s): %s", num_processes, num_nodes, command)
        raise SystemExit(subprocess.run(command).returncode)
    from asft.training import train  # the training stack loads only where a rank trains

    summary = train(args.model, args.data, args.spec, args.out, args.checkpoints, reference_cache=args.reference)
    print(json.dumps(summary, indent=2))


def _cmd_reference_check(args: argparse.Namespace) -> None:
    from asft.config import ConfigError, read_config_file, validate_config
    from asft.reference_check import write_report

    raw = read_config_file(args.config)
    if not isinstance(raw, dict):
        raise ConfigError(f"{args.config}: the top level must be a mapping")
    config = validate_config(raw, source=str(args.config))
    rows = write_report(config, args.workdir, args.benchmark, args.out)
    print((args.out / "reference_check.md").read_text(), end="")
    print(f"{len(rows)} rows; wrote {args.out}/reference_check.{{csv,md,png}}")


def _cmd_reference(args: argparse.Namespace) -> None:
    from asft.reference_stage import build_reference_cache  # loads TRL: only where the stage runs

    summary = build_reference_cache(args.model, args.data, args.spec, args.out, args.batch_size, args.seed)
    print(json.dumps(summary, indent=2))


def _cmd_trace(args: argparse.Namespace) -> None:
    from asft.tracing.stage import trace

    meta = trace(args.model, args.data, args.spec, args.out, adapter_dir=args.adapter, reference_dir=args.reference)
    print(json.dumps({k: meta[k] for k in ("traced_tokens", "target_tokens", "tokens_per_second", "peak_memory_gb")}))


def _cmd_trace_analysis(args: argparse.Namespace) -> None:
    from asft.tracing.analysis import analyse_trace

    result = analyse_trace(args.trace, args.out)
    print(json.dumps({k: result[k] for k in ("gini", "tokens_for_80pct", "opposing_fraction")}))


def _cmd_trace_compare(args: argparse.Namespace) -> None:
    from asft.tracing.compare import write_comparison

    write_comparison(args.analyses, args.out)


def _cmd_merge(args: argparse.Namespace) -> None:
    from asft.merge import merge_lora

    merge_lora(args.base, args.adapter, args.out, dtype=args.dtype, trust_remote_code=args.trust_remote_code)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from asft.evaluation.runner import evaluate

    metrics = evaluate(args.model, args.benchmark, args.spec, args.out_dir, run_info=args.run, adapter_dir=args.adapter)
    print(json.dumps({k: metrics[k] for k in ("benchmark", "avg_at_n", "n_problems", "n_samples")}))


def _cmd_aggregate(args: argparse.Namespace) -> None:
    from asft.aggregation import aggregate, to_markdown

    table = aggregate(
        args.experiment,
        args.metrics,
        args.train_dirs,
        args.table_dir,
        args.plot_dir,
        args.benchmarks,
        eval_identities=args.runs,
        train_identities=args.train_runs,
    )
    print(to_markdown(table, f"{args.experiment}: accuracy (%)"))


def _cmd_paper(args: argparse.Namespace) -> None:
    from asft.paper.render import render_target

    for path in render_target(args.name, args.records, args.out_dir):
        print(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asft", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-demo", help="build the embedded tiny model, its training data and benchmark")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--options", type=_json_arg, help="JSON: seed, n_train, n_test, n_pretrain, pretrain_steps")
    p.set_defaults(func=_cmd_build_demo)

    p = sub.add_parser("validate-config", help="validate a config file and list its runs")
    p.add_argument("config", type=Path)
    p.set_defaults(func=_cmd_validate_config)

    p = sub.add_parser("plan", help="count a config's jobs and estimate their GPU-hours, before submitting them")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="top-level override (repeatable)")
    p.add_argument("--by", choices=["experiment", "table"], default="experiment", help="rows per experiment or target")
    p.add_argument(
        "--reference",
        choices=["live", "cached"],
        help="plan every experiment with this training.reference (cached: where its anchors allow it)",
    )
    p.add_argument("--format", choices=["text", "csv"], default="text")
    # defaults live in asft.plan, which is imported only when planning (it pulls in pandas)
    p.add_argument("--train-tflops", type=float, help="achieved TFLOP/s per GPU (default: H100 peak x 30%% MFU)")
    p.add_argument("--eval-tflops", type=float, help="achieved TFLOP/s per GPU (default: H100 peak x 10%%)")
    p.set_defaults(func=_cmd_plan)

    for name, func, helptext in (
        ("fetch-model", _cmd_fetch_model, "materialise a model directory from its source"),
        ("fetch-dataset", _cmd_fetch_dataset, "write a training set as instruction/response JSONL"),
        ("fetch-benchmark", _cmd_fetch_benchmark, "download, verify and normalise a benchmark"),
    ):
        p = sub.add_parser(name, help=helptext)
        if name == "fetch-model":
            p.add_argument("--source", type=_json_arg, required=True, help="JSON source (hub/path/demo)")
        else:
            p.add_argument("--spec", type=_json_arg, required=True, help="JSON entry from the config")
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--demo-dir", type=Path, help="where `build-demo` wrote the demo artefacts")
        p.add_argument(
            "--lock",
            type=_json_arg,
            default=None,
            help="JSON lock entry (benchmarks: one entry or null per source) from asft.source_lock.lock_for; "
            "null = unlocked",
        )
        p.set_defaults(func=func)

    p = sub.add_parser("lock", help="pin the hub commits and file hashes that fetches resolved in a lock file")
    p.add_argument("--config", type=Path, action="append", required=True, help="config file (repeatable)")
    p.add_argument("--resources", type=Path, default=Path("resources"), help="where the fetches wrote")
    p.add_argument("--out", type=Path, required=True, help="lock file, merged with its current entries")
    p.add_argument("--update", action="store_true", help="allow changing an entry's locked commit or files")
    p.set_defaults(func=_cmd_lock)

    p = sub.add_parser("train", help="train one run (LoRA adapter or full weights)")
    p.add_argument("--model", type=Path, required=True, help="base model directory")
    p.add_argument("--data", type=Path, required=True, help="instruction/response JSONL")
    p.add_argument("--spec", type=_json_arg, required=True, help="JSON run spec (inline or @file)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--checkpoints", type=Path, required=True, help="resumable checkpoints, outside --out")
    p.add_argument("--reference", type=Path, default=None, help="reference cache (training.reference: cached)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("reference", help="cache the frozen reference's statistics over a run's training data")
    p.add_argument("--model", type=Path, required=True, help="base model directory (the reference)")
    p.add_argument("--data", type=Path, required=True, help="instruction/response JSONL, as given to `asft train`")
    p.add_argument("--spec", type=_json_arg, required=True, help="JSON reference or run spec (inline or @file)")
    p.add_argument("--out", type=Path, required=True, help="the cache folder (written whole or not at all)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward (no effect on the statistics)")
    p.add_argument("--seed", type=int, default=0, help="seed of the K reference samples per token")
    p.set_defaults(func=_cmd_reference)

    p = sub.add_parser("reference-check", help="cached vs live reference: accuracy and KL over seeds, with CIs")
    p.add_argument(
        "--config", type=Path, required=True, help="the config the workflow ran (config/reference_cache.yaml)"
    )
    p.add_argument("--workdir", type=Path, default=Path("."), help="where snakemake ran (holds results/)")
    p.add_argument("--benchmark", required=True, help="the benchmark to compare accuracy on")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_cmd_reference_check)

    p = sub.add_parser("trace", help="per-token gradients of sampled training batches (asft.tracing)")
    p.add_argument("--model", type=Path, required=True, help="the model (a LoRA run's base, or full weights)")
    p.add_argument("--adapter", type=Path, help="a LoRA run's adapter (its training output)")
    p.add_argument("--reference", type=Path, help="the reference model for p_ref when there is no adapter to disable")
    p.add_argument("--data", type=Path, required=True, help="instruction/response JSONL, as given to `asft train`")
    p.add_argument("--spec", type=_json_arg, required=True, help="JSON trace spec (inline or @file)")
    p.add_argument("--out", type=Path, required=True, help="the trace folder (written whole or not at all)")
    p.set_defaults(func=_cmd_trace)

    p = sub.add_parser("trace-analysis", help="metrics, summary, plot and HTML viewer of one trace")
    p.add_argument("--trace", type=Path, required=True, help="a folder `asft trace` wrote")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_cmd_trace_analysis)

    p = sub.add_parser("trace-compare", help="several traces' analyses side by side, with the published findings")
    p.add_argument("--analyses", type=Path, nargs="+", required=True, help="analysis.json files")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_cmd_trace_compare)

    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model")
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--adapter", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("evaluate", help="evaluate one model on one benchmark")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--adapter", type=Path, default=None, help="LoRA adapter applied to --model, not merged")
    p.add_argument("--benchmark", type=Path, required=True, help="normalised benchmark JSONL")
    p.add_argument("--spec", type=_json_arg, required=True)
    p.add_argument("--run", type=_json_arg, default=None, help="JSON identity of the run, copied to metrics")
    p.add_argument("--out-dir", type=Path, required=True)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("aggregate", help="results table and training-curve plots for one experiment")
    p.add_argument("--experiment", required=True)
    p.add_argument("--metrics", type=Path, nargs="+", required=True)
    p.add_argument("--train-dirs", type=Path, nargs="*", default=[], help="training outputs (train_log.jsonl)")
    p.add_argument("--benchmarks", nargs="*", default=None, help="column order")
    p.add_argument("--table-dir", type=Path, required=True)
    p.add_argument("--plot-dir", type=Path, required=True)
    p.add_argument(
        "--runs", type=_json_arg, default=None, help="JSON list: what each --metrics file is for this experiment"
    )
    p.add_argument("--train-runs", type=_json_arg, default=None, help="JSON list parallel to --train-dirs")
    p.set_defaults(func=_cmd_aggregate)

    p = sub.add_parser("paper", help="one table or figure of the paper, from the records of its experiments")
    p.add_argument("--name", required=True, help="table1, table4, table5, fork, fig1 ... fig5")
    p.add_argument("--records", type=Path, nargs="+", required=True, help="experiments' tables dirs (evals.jsonl ...)")
    p.add_argument("--out-dir", type=Path, required=True)
    p.set_defaults(func=_cmd_paper)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by the user's input (bad config, data, source, a learning rate that diverges), reported in
    one line."""
    from asft.config import ConfigError
    from asft.data import DataFormatError
    from asft.divergence import TrainingDivergedError
    from asft.evaluation.benchmarks import BenchmarkFormatError
    from asft.fetch import SourceError

    return (ConfigError, DataFormatError, BenchmarkFormatError, SourceError, FileNotFoundError, TrainingDivergedError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        args.func(args)
    except _user_errors() as err:
        # Config, data and source errors already name the file/line/key; a traceback adds nothing for the user.
        if args.verbose:
            raise
        print(f"asft {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
