"""What a trace says: the per-token gradient statistics behind the token-weighted modes.

Every statistic is over the traced target tokens t with g_t ≠ 0, from the exact values the trace stage computed:
alignment a_t = cos(g_t, G_b) with G_b the summed gradient of t's batch, magnitude m_t = ‖g_t‖. The stored
projections are checked against them (the largest |cos(Rg_t, RG_b) − a_t| beside its Johnson–Lindenstrauss bound).
Metrics (`analyse`): alignment mean/median, opposing fraction (a_t < 0) and the magnitude share of opposing tokens,
Gini of magnitudes, the fraction of tokens carrying 80% of the summed magnitude, magnitude–alignment and CE–alignment
Pearson and Spearman r, each batch's cancellation ‖G_b‖ / Σ_t m_t, by token class (number, operator, word, format,
other: `token_class`) the count, mean alignment, opposing fraction and mean magnitude, and the Pearson/Spearman r of
each mode's weight w_t (dft, topk, antiop, ref_ratio, as `asft.losses` gives them on the batch) with a_t.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from asft import layout
from asft.run_io import atomic_file, write_text_atomic
from asft.stack_versions import stacks_note

CLASSES = ("number", "operator", "word", "format", "other")
_NUMBER = re.compile(r"^\d+([.,]\d+)*\.?$")
_OPERATORS = set("+-*/=<>^%()[]{}|!×÷·√≤≥≠±∑∏∫∞_\\")
_FORMAT = set(".,;:?!'\"`#~")
_WORD = re.compile(r"^[^\W\d_]+(['’][^\W\d_]+)?$")
MASS_FRACTION = 0.8
TOP_TOKENS = 15


def token_class(text: str, special: bool = False) -> str:
    """number (digits, decimals), operator (arithmetic, relations, brackets), word (letters), format (whitespace,
    punctuation, special tokens) or other (anything mixed, e.g. `3x`, `\\frac`)."""
    stripped = text.strip()
    if special or not stripped or set(stripped) <= _FORMAT:
        return "format"
    if _NUMBER.match(stripped):
        return "number"
    if set(stripped) <= _OPERATORS:
        return "operator"
    if _WORD.match(stripped):
        return "word"
    return "other"


def gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative values: 0 all equal, → 1 one value holds everything."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n, total = x.size, x.sum()
    if n == 0 or total <= 0:
        return math.nan
    return float(2 * np.sum(np.arange(1, n + 1) * x) / (n * total) - (n + 1) / n)


def mass_fraction(values: np.ndarray, fraction: float = MASS_FRACTION) -> float:
    """The smallest fraction of the values (largest first) whose sum reaches `fraction` of the total."""
    x = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    if x.size == 0 or x.sum() <= 0:
        return math.nan
    cumulative = np.cumsum(x) / x.sum()
    return float((np.searchsorted(cumulative, fraction - 1e-12) + 1) / x.size)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 3 or x.std() == 0 or y.std() == 0:
        return math.nan  # undefined: too few tokens, or a constant (e.g. ref_ratio on the base model)
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, np.float64)
    ranks[order] = np.arange(x.size, dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    return pearson(_ranks(x[keep]), _ranks(y[keep])) if keep.sum() >= 3 else math.nan


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    denominator = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, np.sum(a * b, axis=1) / denominator, np.nan)


def traced_table(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """One row per traced token: its target's columns, its exact statistics, its class and text."""
    index = arrays["target_index"]
    special = set(meta.get("special_ids", []))
    texts = [meta["token_text"][str(int(i))] for i in arrays["token_id"][index]]
    table = {name: arrays[name][index] for name in ("batch", "row", "position", "token_id", "ce", "ref_p")}
    table.update({name: arrays[name][index] for name in arrays if name.startswith("weight_")})
    table["alignment"] = arrays["alignment"].astype(np.float64)
    table["magnitude"] = arrays["norm"].astype(np.float64)
    table["text"] = np.array(texts, dtype=object)
    table["class"] = np.array(
        [token_class(t, int(i) in special) for t, i in zip(texts, table["token_id"], strict=True)], dtype=object
    )
    batch_projection = arrays["projected_batch"][table["batch"]]
    table["projected_alignment"] = _cosines(arrays["projected"], batch_projection)
    return table


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def analyse(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> dict[str, Any]:
    """The trace's metrics (module docstring), as a JSON-ready dict (undefined values null)."""
    table = traced_table(arrays, meta)
    live = np.isfinite(table["alignment"]) & (table["magnitude"] > 0)
    a, m = table["alignment"][live], table["magnitude"][live]
    classes = table["class"][live]
    by_class = {}
    for name in CLASSES:
        pick = classes == name
        by_class[name] = {
            "count": int(pick.sum()),
            "share": _finite(pick.mean()) if pick.size else None,
            "mean_alignment": _finite(a[pick].mean()) if pick.any() else None,
            "opposing_fraction": _finite((a[pick] < 0).mean()) if pick.any() else None,
            "mean_magnitude": _finite(m[pick].mean()) if pick.any() else None,
        }
    weights = {}
    for name in sorted(k.removeprefix("weight_") for k in table if k.startswith("weight_")):
        w = table[f"weight_{name}"][live]
        weights[name] = {"pearson": _finite(pearson(w, a)), "spearman": _finite(spearman(w, a))}
    error = np.abs(table["projected_alignment"][live] - a)
    cancellation = []
    for b, batch_norm in enumerate(arrays["batch_norm"]):
        in_batch = arrays["batch"] == b
        traced_in_batch = table["batch"] == b
        scale = in_batch.sum() / max(int(traced_in_batch.sum()), 1)  # a token sample estimates the batch's sum
        total = scale * table["magnitude"][traced_in_batch].sum()
        cancellation.append(_finite(batch_norm / total) if total > 0 else None)
    order = np.argsort(a)
    texts = table["text"][live]

    def tokens(indices: np.ndarray) -> list[dict[str, Any]]:
        return [
            {"text": texts[i], "class": classes[i], "alignment": float(a[i]), "magnitude": float(m[i])} for i in indices
        ]

    return {
        "subject": meta["subject"],
        "tokens": {
            "target": int(arrays["ce"].size),
            "traced": int(table["alignment"].size),
            "zero_gradient": int((~live).sum()),
            "batches": int(arrays["batch_norm"].size),
        },
        "alignment_mean": _finite(a.mean()) if a.size else None,
        "alignment_median": _finite(np.median(a)) if a.size else None,
        "opposing_fraction": _finite((a < 0).mean()) if a.size else None,
        "opposing_magnitude_share": _finite(m[a < 0].sum() / m.sum()) if m.sum() > 0 else None,
        "gini": _finite(gini(m)),
        "tokens_for_80pct": _finite(mass_fraction(m)),
        "magnitude_alignment_pearson": _finite(pearson(m, a)),
        "magnitude_alignment_spearman": _finite(spearman(m, a)),
        "ce_alignment_pearson": _finite(pearson(table["ce"][live], a)),
        "cancellation": cancellation,
        "by_class": by_class,
        "weights_vs_alignment": weights,
        "projection": {
            "dim": int(arrays["projected"].shape[1]),
            "max_abs_error": _finite(error.max()) if error.size else None,
            "mean_abs_error": _finite(error.mean()) if error.size else None,
            "jl_bound": meta["jl_cosine_bound"],
        },
        "top_aligned": tokens(order[::-1][:TOP_TOKENS]),
        "top_opposing": tokens(order[:TOP_TOKENS]),
        "performance": {k: meta.get(k) for k in ("tokens_per_second", "peak_memory_gb", "seconds", "device")},
        "stack": meta.get("stack"),
    }


def format_value(value: Any, percent: bool = False) -> str:
    """A metric as the summaries print it: a percentage with one decimal or three decimals; – when undefined."""
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


HEADLINE = (
    ("Alignment, mean", "alignment_mean", False),
    ("Alignment, median", "alignment_median", False),
    ("Opposing tokens (alignment < 0)", "opposing_fraction", True),
    ("Magnitude share of opposing tokens", "opposing_magnitude_share", True),
    ("Gini of magnitudes", "gini", False),
    ("Tokens for 80% of the magnitude", "tokens_for_80pct", True),
    ("Magnitude–alignment Pearson r", "magnitude_alignment_pearson", False),
    ("Magnitude–alignment Spearman r", "magnitude_alignment_spearman", False),
    ("CE–alignment Pearson r", "ce_alignment_pearson", False),
)


def _cell(text: str) -> str:
    """A token's text in a Markdown table cell: its repr (whitespace visible), with | and ` escaped."""
    return repr(text).replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")


def title_of(subject: dict[str, Any]) -> str:
    parts = [subject.get("mode_label"), subject.get("model"), subject.get("dataset")]
    seed = subject.get("seed")
    return " · ".join(str(p) for p in parts if p) + (f" · seed {seed}" if seed is not None else "")


def markdown_summary(result: dict[str, Any], meta: dict[str, Any]) -> str:
    """The analysis as Markdown: headline metrics, classes, weight correlations, projection check, top tokens."""
    tokens, projection = result["tokens"], result["projection"]
    lines = [
        f"# Per-token gradients: {title_of(result['subject'])}",
        "",
        f"{tokens['traced']} of {tokens['target']} target tokens in {tokens['batches']} batches; "
        f"{meta['parameters']['count']:,} parameters ({meta['parameters']['selector']}), projected to "
        f"d = {projection['dim']}; {tokens['zero_gradient']} tokens with a zero gradient left out.",
        "",
        "| Metric | Value |",
        "|---|---|",
        *[f"| {label} | {format_value(result[key], percent)} |" for label, key, percent in HEADLINE],
        "",
        "## By token class",
        "",
        "| Class | Tokens | Share | Mean alignment | Opposing | Mean magnitude |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["by_class"].items():
        lines.append(
            f"| {name} | {row['count']} | {format_value(row['share'], True)} | {format_value(row['mean_alignment'])} | "
            f"{format_value(row['opposing_fraction'], True)} | {format_value(row['mean_magnitude'])} |"
        )
    lines += ["", "## Mode weights vs alignment", "", "| Weighting | Pearson r | Spearman r |", "|---|---|---|"]
    for name, row in result["weights_vs_alignment"].items():
        lines.append(f"| {name} | {format_value(row['pearson'])} | {format_value(row['spearman'])} |")
    lines += [
        "",
        "## Projection check",
        "",
        f"Largest |projected − exact| alignment {format_value(projection['max_abs_error'])} (mean "
        f"{format_value(projection['mean_abs_error'])}); Johnson–Lindenstrauss bound at d = {projection['dim']} for "
        f"{tokens['traced']} tokens, probability 0.999: {format_value(min(projection['jl_bound'], 2.0))}.",
        "",
        "## Most aligned and most opposing tokens",
        "",
        "| Aligned | a | Opposing | a |",
        "|---|---|---|---|",
    ]
    for up, down in zip(result["top_aligned"], result["top_opposing"], strict=False):
        lines.append(
            f"| {_cell(up['text'])} | {up['alignment']:.3f} | {_cell(down['text'])} | {down['alignment']:.3f} |"
        )
    perf = result["performance"]
    if perf.get("tokens_per_second"):
        lines += ["", f"Traced at {perf['tokens_per_second']:.1f} tokens/s on {perf['device']}, peak memory "
                  f"{perf['peak_memory_gb']:.2f} GB."]  # fmt: skip
    lines += ["", stacks_note([result.get("stack")], "traces")]
    return "\n".join(lines) + "\n"


def plot_analysis(table: dict[str, np.ndarray], result: dict[str, Any], path: Path) -> None:
    """Four panels: alignment histogram, magnitude Lorenz curve, magnitude vs alignment by class, class means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    live = np.isfinite(table["alignment"]) & (table["magnitude"] > 0)
    a, m, classes = table["alignment"][live], table["magnitude"][live], table["class"][live]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    axes[0, 0].hist(a, bins=40, color="#4477aa")
    axes[0, 0].axvline(0, color="k", lw=0.8)
    axes[0, 0].set(xlabel="alignment cos(g_t, G)", ylabel="tokens", title="Alignment with the batch gradient")
    x = np.sort(m)
    lorenz = np.concatenate([[0], np.cumsum(x) / x.sum()]) if x.size else np.array([0.0])
    axes[0, 1].plot(np.linspace(0, 1, lorenz.size), lorenz, color="#cc6677")
    axes[0, 1].plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    axes[0, 1].set(xlabel="fraction of tokens (smallest first)", ylabel="fraction of summed magnitude",
                   title=f"Lorenz curve of magnitudes (Gini {format_value(result['gini'])})")  # fmt: skip
    for name in CLASSES:
        pick = classes == name
        if pick.any():
            axes[1, 0].scatter(a[pick], m[pick], s=6, alpha=0.6, label=name)
    axes[1, 0].set(xlabel="alignment", ylabel="magnitude ‖g_t‖", yscale="log", title="Magnitude vs alignment")
    axes[1, 0].legend(markerscale=2, fontsize=8)
    names = [n for n in CLASSES if result["by_class"][n]["count"]]
    means = [result["by_class"][n]["mean_alignment"] for n in names]
    axes[1, 1].bar(names, means, color="#117733")
    axes[1, 1].axhline(0, color="k", lw=0.8)
    axes[1, 1].set(ylabel="mean alignment", title="Mean alignment by token class")
    fig.suptitle(f"Per-token gradients: {title_of(result['subject'])}")
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Write a figure as PNG through a temp sibling (`asft.run_io.atomic_file`) and close it either way."""
    import matplotlib.pyplot as plt

    try:
        with atomic_file(Path(path)) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)


def view_model(
    table: dict[str, np.ndarray], result: dict[str, Any], meta: dict[str, Any], arrays: dict[str, np.ndarray]
) -> dict[str, Any]:
    """The viewer's input (`asft.tracing.viewer`): each traced sequence's tokens, targets with their statistics,
    targets outside the token sample marked `untraced`."""
    targets = set(zip(arrays["batch"].tolist(), arrays["row"].tolist(), arrays["position"].tolist(), strict=True))
    weight_names = sorted(k.removeprefix("weight_") for k in table if k.startswith("weight_"))
    traced = {}
    for i in range(table["alignment"].size):
        key = (int(table["batch"][i]), int(table["row"][i]), int(table["position"][i]))
        traced[key] = {
            "target": True,
            "index": i,
            "alignment": _finite(table["alignment"][i]),
            "magnitude": _finite(table["magnitude"][i]) if table["magnitude"][i] > 0 else None,
            "ce": _finite(table["ce"][i]),
            "class": table["class"][i],
            "weights": {name: _finite(table[f"weight_{name}"][i]) for name in weight_names},
        }
    sequences = []
    for seq in meta["sequences"]:
        batch, row = seq["batch"], seq["row"]
        tokens = []
        for position, token_id in enumerate(seq["input_ids"]):
            key = (batch, row, position)
            token = {"text": meta["token_text"][str(token_id)], "target": False}
            if key in traced:
                token.update(traced[key])
            elif key in targets:
                token["untraced"] = True
            tokens.append(token)
        sequences.append(
            {
                "id": f"b{batch}/r{row}",
                "batch": batch,
                "row": row,
                "example_id": seq["example_id"],
                "tokens": tokens,
            }
        )
    headline = [[label, format_value(result[key], percent)] for label, key, percent in HEADLINE]
    return {
        "title": title_of(result["subject"]),
        "subtitle": f"{meta['parameters']['selector']} parameters ({meta['parameters']['count']:,}), "
        f"{result['tokens']['traced']} of {result['tokens']['target']} target tokens traced, "
        f"projection d = {result['projection']['dim']}",
        "metrics": headline,
        "classes": list(CLASSES),
        "weight_names": weight_names,
        "sequences": sequences,
    }


def analyse_trace(trace_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write analysis.json, summary.md, analysis.png and viewer.html for the trace folder `trace_dir`."""
    from asft.tracing.stage import load_trace
    from asft.tracing.viewer import write_viewer

    arrays, meta = load_trace(Path(trace_dir))
    result = analyse(arrays, meta)
    table = traced_table(arrays, meta)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_analysis(table, result, out_dir / layout.TRACE_PLOT)
    write_viewer(view_model(table, result, meta, arrays), out_dir / layout.TRACE_VIEWER)
    write_text_atomic(out_dir / layout.TRACE_SUMMARY, markdown_summary(result, meta))
    write_text_atomic(out_dir / layout.TRACE_ANALYSIS, json.dumps(result, indent=1, allow_nan=False))
    return result
