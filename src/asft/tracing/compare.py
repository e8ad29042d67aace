"""Traces side by side: one table (Markdown, CSV, JSON) and one plot over every analysed trace of the config, with
the token-weighted fork's published findings (paper/reference/fork_gradient_analysis.csv) beside the traces of
the models they were reported for."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from asft.run_io import write_text_atomic
from asft.stack_versions import stacks_note
from asft.tracing.analysis import CLASSES, format_value, save_figure, title_of

PUBLISHED = Path(__file__).parents[1] / "paper" / "reference" / "fork_gradient_analysis.csv"
# (label, how to read it from an analysis, shown as a percentage)
ROWS = (
    ("Gini of magnitudes", "gini", False),
    ("Tokens for 80% of the magnitude", "tokens_for_80pct", True),
    ("Opposing tokens", "opposing_fraction", True),
    ("Mean alignment, number", "number_mean_alignment", False),
    ("Mean alignment, operator", "operator_mean_alignment", False),
    ("Mean alignment, word", "word_mean_alignment", False),
    ("Mean alignment, format", "format_mean_alignment", False),
    ("Magnitude–alignment Pearson r", "magnitude_alignment_pearson", False),
    ("DFT weight–alignment Pearson r", "dft_alignment_pearson", False),
    ("Top-k weight–alignment Pearson r", "topk_alignment_pearson", False),
    ("Anti-op weight–alignment Pearson r", "antiop_alignment_pearson", False),
    ("Ref-ratio weight–alignment Pearson r", "ref_ratio_alignment_pearson", False),
)


def metric(result: dict[str, Any], key: str) -> float | None:
    """A comparison row's value from one analysis (`asft.tracing.analysis.analyse`)."""
    for name in CLASSES:
        if key == f"{name}_mean_alignment":
            return result["by_class"][name]["mean_alignment"]
    if key.endswith("_alignment_pearson") and key != "magnitude_alignment_pearson":
        row = result["weights_vs_alignment"].get(key.removesuffix("_alignment_pearson"))
        return None if row is None else row["pearson"]
    return result[key]


def published() -> dict[str, dict[str, float]]:
    """{model: {metric: value}} as the fork reported it."""
    lines = [line for line in PUBLISHED.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    table: dict[str, dict[str, float]] = {}
    for row in csv.DictReader(lines):
        for model, value in row.items():
            if model != "metric" and value:
                table.setdefault(model, {})[row["metric"]] = float(value)
    return table


def comparison(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Columns: each trace, then the published figures of each model some trace is of."""
    reported = published()
    columns = [{"title": title_of(r["subject"]), "subject": r["subject"], "source": "trace"} for r in results]
    values = [[metric(r, key) for _, key, _ in ROWS] for r in results]
    for model in dict.fromkeys(r["subject"]["model"] for r in results):
        if model in reported:
            columns.append({"title": f"{model} (fork, published)", "subject": {"model": model}, "source": "published"})
            values.append([reported[model].get(key) for _, key, _ in ROWS])
    return {"rows": [{"label": label, "key": key, "percent": pct} for label, key, pct in ROWS], "columns": columns,
            "values": values, "stacks": [r.get("stack") for r in results]}  # fmt: skip


def comparison_markdown(table: dict[str, Any]) -> str:
    titles = [c["title"] for c in table["columns"]]
    lines = [
        "# Per-token gradients across traces",
        "",
        "Published columns: the token-weighted fork's analysis of ASFT training (Qwen2.5-1.5B and 7B); '–' where it "
        "reported nothing. Opposing: alignment < 0.",
        "",
        "| Metric | " + " | ".join(titles) + " |",
        "|---|" + "---|" * len(titles),
    ]
    for i, row in enumerate(table["rows"]):
        cells = [format_value(column_values[i], row["percent"]) for column_values in table["values"]]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", stacks_note(table["stacks"], "traces")]) + "\n"


def comparison_csv(table: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["metric", *[c["title"] for c in table["columns"]]])
    for i, row in enumerate(table["rows"]):
        writer.writerow([row["key"], *["" if v[i] is None else f"{v[i]:.6g}" for v in table["values"]]])
    return out.getvalue()


def plot_comparison(table: dict[str, Any], path: Path) -> None:
    """Mean alignment by token class, one bar group per class, one bar per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = [f"{name}_mean_alignment" for name in CLASSES]
    rows = [i for i, row in enumerate(table["rows"]) if row["key"] in keys]
    width = 0.8 / max(len(table["columns"]), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(rows) + 2), 4))
    for j, column in enumerate(table["columns"]):
        heights = [np.nan if table["values"][j][i] is None else table["values"][j][i] for i in rows]
        hatch = "//" if column["source"] == "published" else None
        ax.bar(np.arange(len(rows)) + j * width, heights, width, label=column["title"], hatch=hatch)
    ax.set_xticks(np.arange(len(rows)) + width * (len(table["columns"]) - 1) / 2)
    ax.set_xticklabels([table["rows"][i]["key"].removesuffix("_mean_alignment") for i in rows])
    ax.axhline(0, color="k", lw=0.8)
    ax.set(ylabel="mean alignment cos(g_t, G)", title="Mean alignment by token class")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def write_comparison(analyses: list[Path], out_dir: Path) -> dict[str, Any]:
    """Read the analyses and write comparison.{md,csv,json,png} into out_dir."""
    results = [json.loads(Path(p).read_text(encoding="utf-8")) for p in analyses]
    table = comparison(results)
    out_dir = Path(out_dir)
    plot_comparison(table, out_dir / "comparison.png")
    write_text_atomic(out_dir / "comparison.csv", comparison_csv(table))
    write_text_atomic(out_dir / "comparison.json", json.dumps(table, indent=1, allow_nan=False))
    write_text_atomic(out_dir / "comparison.md", comparison_markdown(table))
    return table
