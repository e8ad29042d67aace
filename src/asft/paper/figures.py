"""The paper's figures from our runs, with the published numbers (where the paper states them) as hollow markers.

Every point is looked up through the same selection filters as the tables, so a figure and a table that share a
run (e.g. Figure 3 and Table 5) can never disagree. Missing points are left out and counted in the caption.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from asft.paper.catalogue import (
    BENCHMARK_LABELS,
    MATH,
    MEDICAL,
    METHOD_LABELS,
    MODEL_LABELS,
    PAPER_KL_WEIGHT,
    SMOKE_NOTE,
    math_10k,
    medical_10k,
    sel,
    table5_source,
)
from asft.paper.reference import published_value
from asft.paper.selection import (
    CURVE_COLUMNS,
    EVAL_COLUMNS,
    TRAIN_COLUMNS,
    Filter,
    Indexed,
    Measure,
    accuracy,
    average,
    indexed,
)

FIG2_LAMBDAS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5)
FIG4_COEFFICIENTS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
FIG5_LEARNING_RATES = (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4)
FIG5_BATCH_SIZES = (32, 64, 128, 256)
# The paper's medical defaults (asft_paper_figures.md), where Figure 5 meets Table 1.
PAPER_BATCH_SIZE, PAPER_LEARNING_RATE = 64, 2e-5
FIG3_MODELS = ("llama-2-7b", "llama-2-70b", "qwen2.5-7b", "qwen2.5-32b", "qwen2.5-72b")
# Values the paper states in its text (asft_paper_figures.md), in percent; a test holds them to that file.
FIG1_PAPER_DFT_KL = 2.5
FIG4_PAPER_ASFT_SFT_MATH = {0.01: 27.5, 10.0: 16.8}

COLORS = {"base": "0.35", "sft": "tab:blue", "dft": "tab:orange", "asft": "tab:green", "sft+kl": "tab:purple"}
PAPER_MARKER = {
    "marker": "o",
    "markerfacecolor": "none",
    "markersize": 9,
    "linestyle": "none",
    "markeredgewidth": 1.5,
    "zorder": 5,  # above the bars of Figure 3
}


@dataclass
class _Frames:
    """The inputs of one figure plus a tally of what was looked up, for the caption."""

    evals: Indexed
    trains: Indexed
    curves: Indexed
    looked_up: int = 0
    missing: int = 0
    smoke: bool = False

    def record(self, measure: Measure) -> Measure:
        self.looked_up += 1
        self.missing += int(measure.missing)
        self.smoke |= measure.smoke
        return measure

    def acc(self, spec: Filter, benchmark: str) -> Measure:
        return self.record(accuracy(self.evals, spec, benchmark))

    def avg(self, spec: Filter, benchmarks: tuple[str, ...]) -> Measure:
        return self.record(average([accuracy(self.evals, spec, b) for b in benchmarks]))


@dataclass(frozen=True)
class FigureSpec:
    """A figure: its panel titles and series labels (the layout) and what its caption says."""

    name: str
    title: str
    panels: tuple[str, ...]
    series: tuple[str, ...]
    setting: str
    draw: Callable[[list, _Frames], None] = field(repr=False)
    differences: tuple[str, ...] = ()


def _plot_line(axis, points: list[tuple[float, Measure]], label: str, color: str, **style) -> None:
    kept = [(x, m.value) for x, m in points if not m.missing]
    if kept:
        xs, ys = zip(*sorted(kept), strict=True)
        axis.plot(xs, ys, marker="s", markersize=4, label=label, color=color, **style)


def _hline(axis, measure: Measure, label: str, color: str) -> None:
    if not measure.missing:
        axis.axhline(measure.value, linestyle="--", linewidth=1.1, color=color, label=label)


def _paper_point(axis, x: float, y: float | None, color: str = "black", label: str = "paper") -> None:
    if y is not None:
        axis.plot([x], [y], color=color, markeredgecolor=color, label=label, **PAPER_MARKER)


def _table1(key: tuple[str, str], column: str) -> float | None:
    return published_value("asft_paper_table1.csv", ("train_size", "method"), key, column)


def _finish(axis, title: str, xlabel: str, ylabel: str, log: bool = False) -> None:
    axis.set_title(title, fontsize=10)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    if log:
        axis.set_xscale("log")
    axis.grid(alpha=0.3)
    if not axis.lines and not axis.patches:
        axis.text(0.5, 0.5, "no results", ha="center", va="center", transform=axis.transAxes, color="0.5")


# ---------------------------------------------------------------- Figure 1: training dynamics
FIG1_MODES = ("sft", "dft", "asft", "sft+kl")


def _fig1_final_step(frames: _Frames, spec: Filter, snapshots: pd.DataFrame) -> float | None:
    curve = frames.curves.select(spec, final_only=False)
    steps = pd.to_numeric(curve["step"], errors="coerce").dropna()
    if not steps.empty:
        return float(steps.max())
    steps = pd.to_numeric(snapshots["step"], errors="coerce").dropna()
    return float(steps.max()) if not steps.empty else None


def _draw_fig1(axes: list, frames: _Frames) -> None:
    base = medical_10k("base") | {"experiment": ("fig1", "table1_medical")}
    last_dft_step = None
    for mode in FIG1_MODES:
        spec = sel("fig1", "llama-2-7b", mode, "medmcqa-10k")
        for axis, benchmark in zip(axes[:2], ("mmlu_medical", "medmcqa"), strict=True):
            points = [(0.0, frames.acc(base, benchmark))]
            snapshots = frames.evals.select({**spec, "benchmark": benchmark}, final_only=False)
            for step in sorted(pd.to_numeric(snapshots["step"], errors="coerce").dropna().unique()):
                points.append((float(step), frames.acc({**spec, "step": float(step)}, benchmark)))
            final = _fig1_final_step(frames, spec, snapshots)
            if final is not None:
                points.append((final, frames.acc(spec, benchmark)))
            _plot_line(axis, points, METHOD_LABELS[mode], COLORS[mode])
        curve = frames.curves.select(spec, final_only=False)
        curve = curve[pd.to_numeric(curve["kl"], errors="coerce").notna()].sort_values("step")
        if not curve.empty:
            axes[2].plot(curve["step"], curve["kl"], label=METHOD_LABELS[mode], color=COLORS[mode], linewidth=1.2)
            if mode == "dft":
                last_dft_step = float(curve["step"].max())
    if last_dft_step is not None:
        _paper_point(axes[2], last_dft_step, FIG1_PAPER_DFT_KL, COLORS["dft"], "paper (DFT, about)")
    _finish(axes[0], "MMLU-Medical (out of domain)", "training step", "accuracy (%)")
    _finish(axes[1], "MedMCQA (in domain)", "training step", "accuracy (%)")
    _finish(axes[2], "KL(base ‖ policy) on training data", "training step", "KL per token")


# ---------------------------------------------------------------- Figure 2: KL direction
def _draw_fig2(axes: list, frames: _Frames) -> None:
    for axis, benchmark in zip(axes, MEDICAL, strict=True):
        for mode, label, color in (
            ("asft", "forward KL (ASFT)", "tab:green"),
            ("asft-reverse", "reverse KL", "tab:red"),
        ):
            points = [
                (lam, frames.acc(sel("fig2", "llama-2-7b", mode, "medmcqa-10k", kl_weight=lam), benchmark))
                for lam in FIG2_LAMBDAS
            ]
            _plot_line(axis, points, label, color)
        for mode in ("base", "sft", "dft"):
            _hline(axis, frames.acc(medical_10k(mode), benchmark), METHOD_LABELS[mode], COLORS[mode])
        _paper_point(axis, PAPER_KL_WEIGHT, _table1(("10k", "asft"), benchmark), "tab:green", "paper (forward)")
        _finish(axis, BENCHMARK_LABELS[benchmark], "λ (KL weight)", "accuracy (%)", log=True)


# ---------------------------------------------------------------- Figure 3: model scale
FIG3_MODES = ("base", "sft", "dft", "asft")


def _draw_fig3(axes: list, frames: _Frames) -> None:
    width = 0.8 / len(FIG3_MODES)
    for axis, benchmark in zip(axes, MEDICAL, strict=True):
        for j, mode in enumerate(FIG3_MODES):
            xs, ys, paper_x, paper_y = [], [], [], []
            for i, model in enumerate(FIG3_MODELS):
                x = i + (j - (len(FIG3_MODES) - 1) / 2) * width
                source = table5_source(model, mode)
                measure = frames.acc(source, benchmark) if source is not None else Measure(None)
                if not measure.missing:
                    xs.append(x)
                    ys.append(measure.value)
                value = published_value(
                    "asft_paper_table5.csv", ("model", "method"), (MODEL_LABELS[model], mode), benchmark
                )
                if value is not None:
                    paper_x.append(x)
                    paper_y.append(value)
            axis.bar(xs, ys, width=width * 0.95, color=COLORS[mode], label=METHOD_LABELS[mode])
            axis.plot(
                paper_x, paper_y, color="black", label="paper" if j == 0 else None, **{**PAPER_MARKER, "markersize": 6}
            )
        axis.set_xticks(range(len(FIG3_MODELS)), [MODEL_LABELS[m] for m in FIG3_MODELS], rotation=30, fontsize=8)
        _finish(axis, BENCHMARK_LABELS[benchmark], "", "accuracy (%)")


# ---------------------------------------------------------------- Figure 4: alternative anchoring
def _draw_fig4(axes: list, frames: _Frames) -> None:
    domains = (
        ("math", "fig4_math", "qwen2.5-7b", "numina-cot-10k", MATH, math_10k, "math_avg", "Math average"),
        (
            "medical",
            "fig4_medical",
            "llama-2-7b",
            "medmcqa-10k",
            MEDICAL,
            medical_10k,
            "medical_avg",
            "Medical average",
        ),
    )
    for axis, (domain, experiment, model, dataset, benchmarks, reference, avg_column, title) in zip(
        axes, domains, strict=True
    ):
        sft_anchor = [
            (c, frames.avg(sel(experiment, model, "asft-sft", dataset, sft_weight=c), benchmarks))
            for c in FIG4_COEFFICIENTS
        ]
        kl_anchor = [
            (c, frames.avg(sel(experiment, model, "asft", dataset, kl_weight=c), benchmarks)) for c in FIG4_COEFFICIENTS
        ]
        _plot_line(axis, sft_anchor, "ASFT-SFT (α)", "tab:cyan")
        _plot_line(axis, kl_anchor, "ASFT-KL (λ)", "tab:green")
        for mode in ("base", "sft", "dft"):
            _hline(axis, frames.avg(reference(mode), benchmarks), METHOD_LABELS[mode], COLORS[mode])
        _paper_point(axis, PAPER_KL_WEIGHT, _table1(("10k", "asft"), avg_column), "tab:green", "paper (ASFT-KL)")
        if domain == "math":
            for i, (c, value) in enumerate(FIG4_PAPER_ASFT_SFT_MATH.items()):
                _paper_point(axis, c, value, "tab:cyan", "paper (ASFT-SFT)" if i == 0 else None)
        _finish(axis, title, "anchor coefficient (α or λ)", "average accuracy (%)", log=True)


# ---------------------------------------------------------------- Figure 5: hyper-parameter robustness
FIG5_MODES = ("sft", "dft", "asft")


def _draw_fig5(axes: list, frames: _Frames) -> None:
    sweeps = (
        ("fig5_batch", "global_batch_size", FIG5_BATCH_SIZES, PAPER_BATCH_SIZE, "global batch size"),
        ("fig5_lr", "learning_rate", FIG5_LEARNING_RATES, PAPER_LEARNING_RATE, "learning rate"),
    )
    for axis, (experiment, key, values, paper_x, xlabel) in zip(axes, sweeps, strict=True):
        for mode in FIG5_MODES:
            points = [
                (
                    float(v),
                    frames.avg(
                        sel(experiment, "llama-2-7b", mode, "medmcqa-10k", sweep_key=key, sweep_value=float(v)),
                        MEDICAL,
                    ),
                )
                for v in values
            ]
            _plot_line(axis, points, METHOD_LABELS[mode], COLORS[mode])
            _paper_point(axis, paper_x, _table1(("10k", mode), "medical_avg"), COLORS[mode], f"paper ({mode.upper()})")
        _hline(axis, frames.avg(medical_10k("base"), MEDICAL), "Base", COLORS["base"])
        _finish(axis, f"Medical average vs {xlabel}", xlabel, "average accuracy (%)", log=True)
        if key == "global_batch_size":
            axis.set_xscale("log", base=2)
            axis.set_xticks(list(values), [str(v) for v in values])
            axis.minorticks_off()


FIGURES: dict[str, FigureSpec] = {
    spec.name: spec
    for spec in (
        FigureSpec(
            "fig1",
            "Figure 1",
            ("MMLU-Medical", "MedMCQA", "KL"),
            tuple(METHOD_LABELS[m] for m in FIG1_MODES),
            "Training dynamics of LLaMA-2-7B on MedMCQA 10k: accuracy at intermediate checkpoints (step 0 is the "
            "base model, the last point the final model) and the per-token KL(base ‖ policy) logged in training",
            _draw_fig1,
            ("the hollow DFT marker is the paper's textual 'about 2.5', placed at our last step",),
        ),
        FigureSpec(
            "fig2",
            "Figure 2",
            tuple(BENCHMARK_LABELS[b] for b in MEDICAL),
            ("forward KL (ASFT)", "reverse KL", "Base", "SFT", "DFT"),
            "KL direction, LLaMA-2-7B on MedMCQA 10k, λ on a log axis; dashed lines are our Base, SFT and DFT from "
            "Table 1's 10k runs; hollow markers: the paper's ASFT at λ = 0.05 (Table 1)",
            _draw_fig2,
        ),
        FigureSpec(
            "fig3",
            "Figure 3",
            tuple(BENCHMARK_LABELS[b] for b in MEDICAL),
            tuple(METHOD_LABELS[m] for m in FIG3_MODES),
            "Model scale on the medical benchmarks after MedMCQA 10k training; bars are ours, hollow markers the "
            "paper's values (Table 5)",
            _draw_fig3,
        ),
        FigureSpec(
            "fig4",
            "Figure 4",
            ("Math average", "Medical average"),
            ("ASFT-SFT (α)", "ASFT-KL (λ)", "Base", "SFT", "DFT"),
            "Anchoring with an SFT term (L = L_DFT + α·L_SFT) versus the KL anchor, Qwen2.5-7B on NuminaMath-CoT "
            "10k (math) and LLaMA-2-7B on MedMCQA 10k (medical); dashed lines: our Base, SFT, DFT from Table 1's "
            "10k runs; hollow markers: the paper's ASFT-KL at λ = 0.05 (Table 1) and its ASFT-SFT math values "
            "stated in the text (α = 0.01 and 10)",
            _draw_fig4,
        ),
        FigureSpec(
            "fig5",
            "Figure 5",
            ("Medical average vs global batch size", "Medical average vs learning rate"),
            ("SFT", "DFT", "ASFT", "Base"),
            "Hyper-parameter robustness, LLaMA-2-7B on MedMCQA 10k: medical average against global batch size and "
            "learning rate; hollow markers: the paper's Table 1 values at its defaults (batch 64, lr 2e-5)",
            _draw_fig5,
        ),
    )
}


def _spec(name: str) -> FigureSpec:
    if name not in FIGURES:
        raise KeyError(f"unknown figure {name!r}; known: {', '.join(FIGURES)}")
    return FIGURES[name]


def _frames(evals, trains, curves) -> _Frames:
    return _Frames(indexed(evals, EVAL_COLUMNS), indexed(trains, TRAIN_COLUMNS), indexed(curves, CURVE_COLUMNS))


def _render(name: str, frames: _Frames):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = _spec(name)
    n = len(spec.panels)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.2), squeeze=False)
    axes = list(axes[0])
    spec.draw(axes, frames)
    # One legend for the figure: the series are the same in every panel.
    seen: dict[str, object] = {}
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen.keys()), loc="lower center", ncol=min(6, len(seen)), fontsize=8)
    fig.suptitle(spec.title + (" (smoke scale)" if frames.smoke else ""))
    rows_of_legend = 1 + (len(seen) - 1) // 6 if seen else 0
    fig.tight_layout(rect=(0, 0.06 * rows_of_legend + 0.02, 1, 1))
    return fig


def render_figure(name: str, evals: pd.DataFrame | None, trains: pd.DataFrame | None, curves: pd.DataFrame | None):
    """The matplotlib Figure (Agg), one axis per panel of the paper's figure; the caller closes it."""
    return _render(name, _frames(evals, trains, curves))


def _caption(spec: FigureSpec, frames: _Frames) -> str:
    parts = [SMOKE_NOTE] if frames.smoke else []
    parts.append(f"{spec.title}. {spec.setting}.")
    differences = list(spec.differences)
    if frames.missing:
        differences.append(f"{frames.missing} of {frames.looked_up} points have no result of ours and are not drawn")
    if differences:
        parts.append("Differences from the paper: " + "; ".join(differences) + ".")
    return " ".join(parts)


def figure_caption(
    name: str, evals: pd.DataFrame | None, trains: pd.DataFrame | None, curves: pd.DataFrame | None
) -> str:
    """The figure's caption: what it plots, which markers are the paper's, and how many points are missing."""
    import matplotlib.pyplot as plt

    frames = _frames(evals, trains, curves)
    plt.close(_render(name, frames))  # the tally of missing points comes from drawing
    return _caption(_spec(name), frames)


def write_figure(
    name: str,
    evals: pd.DataFrame | None,
    trains: pd.DataFrame | None,
    curves: pd.DataFrame | None,
    out_path: Path | str,
) -> Path:
    """Write the PNG and <name>.caption.rst next to it; returns the PNG's path."""
    import matplotlib.pyplot as plt

    from asft.paper.tables import rst_escape

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    frames = _frames(evals, trains, curves)
    fig = _render(name, frames)
    try:
        fig.savefig(out_path, dpi=120)
    finally:
        plt.close(fig)
    (out_path.parent / f"{name}.caption.rst").write_text(rst_escape(_caption(_spec(name), frames)) + "\n")
    return out_path
