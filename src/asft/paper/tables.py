"""Tables in the paper's layout: our value, the published value beside it, and our change from our base model.

``build_table`` turns the catalogue and the tidy frames into a long-form frame (one row per cell); the writers
render that frame, so the CSV, Markdown and LaTeX always show the same numbers.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from asft.paper.catalogue import SMOKE_NOTE, TABLES, Column, Row, TableSpec
from asft.paper.reference import published_value
from asft.paper.selection import (
    EVAL_COLUMNS,
    MISSING,
    TRAIN_COLUMNS,
    Filter,
    Indexed,
    Measure,
    accuracy,
    average,
    indexed,
    peak_memory,
    wall_hours,
)
from asft.stack_versions import stacks_note

CELL_LEGEND = "Each cell: ours, ↑/↓ our change from our base model, (the published value); — = no result."
LONG_COLUMNS = (
    "table",
    "row",
    "block",
    "method",
    "group",
    "column",
    "kind",
    "ours",
    "published",
    "delta_vs_base",
    "n",
    "ci_low",
    "ci_high",
    "seeds",
    "missing",
    "note",
)


def spec_of(name: str) -> TableSpec:
    """The catalogue entry of a table, naming the known tables when the name is wrong."""
    if name not in TABLES:
        raise KeyError(f"unknown table {name!r}; known: {', '.join(TABLES)}")
    return TABLES[name]


def published(spec: TableSpec, row: Row, column: Column) -> float | None:
    """The paper's number for a cell; raises KeyError when the catalogue names a cell the file lacks."""
    if column.reference in row.published:
        return row.published[column.reference]
    if row.reference is None or spec.reference_file is None:
        return None
    return published_value(spec.reference_file, spec.reference_keys, row.reference, column.reference)


def _measure(column: Column, source: Filter | None, evals: Indexed, trains: Indexed) -> Measure:
    if source is None:
        return MISSING
    if column.kind == "benchmark":
        return accuracy(evals, source, column.key)
    if column.kind == "avg":
        return average([accuracy(evals, source, b) for b in column.of])
    if column.kind == "time":
        return wall_hours(trains, source)
    if column.kind == "memory":
        return peak_memory(trains, source)
    raise ValueError(f"unknown column kind {column.kind!r}")


def build_table(name: str, evals: pd.DataFrame | Indexed | None, trains: pd.DataFrame | Indexed | None) -> pd.DataFrame:
    """One row per cell in the paper's order: ours, published, delta vs our base, n, CI, seeds, missing."""
    spec = spec_of(name)
    evals = indexed(evals, EVAL_COLUMNS)
    trains = indexed(trains, TRAIN_COLUMNS)
    records = []
    for row in spec.rows:
        for group, column in spec.columns:
            source = row.sources.get(group.name)
            ours = _measure(column, source, evals, trains)
            delta = None
            base_filter = row.base_filter(group.name)
            if not ours.missing and base_filter is not None and column.kind in ("benchmark", "avg"):
                base = _measure(column, base_filter, evals, trains)
                if not base.missing:
                    delta = ours.value - base.value
            note = "not built" if source is None else ours.note
            records.append(
                {
                    "table": name,
                    "row": row.full_label,
                    "block": row.block,
                    "method": row.method_label,
                    "group": group.name,
                    "column": column.label,
                    "kind": column.kind,
                    "ours": ours.value,
                    "published": published(spec, row, column),
                    "delta_vs_base": delta,
                    "n": ours.n,
                    "ci_low": ours.ci_low,
                    "ci_high": ours.ci_high,
                    "seeds": ours.seeds,
                    "missing": ours.missing,
                    "note": note,
                    "_smoke": ours.smoke,
                }
            )
    frame = pd.DataFrame.from_records(records)
    frame.attrs["smoke"] = bool(frame["_smoke"].any()) or _any_smoke(spec, evals)
    frame.attrs["host_memory"] = bool((frame["note"] == "host").any())
    return frame.drop(columns="_smoke")


def _any_smoke(spec: TableSpec, evals: Indexed) -> bool:
    return any(
        record.get("scale") == "smoke"
        for row in spec.rows
        for source in row.sources.values()
        for record in evals.rows(source)
    )


def layout_of(name: str) -> tuple[list[str], list[str]]:
    """The row and column labels a table has, in order (the same for every input; figures: panels, series)."""
    if name in TABLES:
        spec = TABLES[name]
        return spec.row_labels(), spec.column_labels()
    from asft.paper.figures import FIGURES

    if name in FIGURES:
        figure = FIGURES[name]
        return list(figure.panels), list(figure.series)
    raise KeyError(f"unknown table or figure {name!r}")


# ---------------------------------------------------------------- captions


def _evals_for(spec: TableSpec, evals: Indexed) -> pd.DataFrame:
    positions = sorted({i for row in spec.rows for s in row.sources.values() for i in evals.positions(s, True)})
    return evals.frame.iloc[positions]


def software_note(name: str, evals: pd.DataFrame | Indexed | None, trains: pd.DataFrame | Indexed | None) -> str:
    """The software versions (asft.stack_versions) of the evaluations and training runs the table rests on."""
    spec = spec_of(name)
    ran_evals = _evals_for(spec, indexed(evals, EVAL_COLUMNS))
    ran_trains = _trains_for(spec, indexed(trains, TRAIN_COLUMNS))
    notes = (stacks_note(ran_evals["stack"], "evaluations"), stacks_note(ran_trains["stack"], "training runs"))
    return "\n".join(note for note in notes if note)


def _trains_for(spec: TableSpec, trains: Indexed) -> pd.DataFrame:
    positions = sorted({i for row in spec.rows for s in row.sources.values() for i in trains.positions(s, False)})
    return trains.frame.iloc[positions]


def hardware_note(trains: pd.DataFrame) -> str:
    """Which accelerators our runs used, e.g. '8× NVIDIA H100 80GB HBM3'."""
    if trains.empty:
        return ""
    kinds = []
    for (accelerator, count), _ in trains.groupby(["accelerator", "accelerator_count"], dropna=False):
        if pd.isna(accelerator):
            continue
        kinds.append(f"{int(count)}× {accelerator}" if not pd.isna(count) else str(accelerator))
    return ", ".join(sorted(set(kinds)))


def table_caption(name: str, evals: pd.DataFrame | Indexed | None, trains: pd.DataFrame | Indexed | None) -> str:
    """The table's caption: setting, decoding, how to read a cell, and where we differ from the paper."""
    trains = indexed(trains, TRAIN_COLUMNS)
    return _caption(spec_of(name), build_table(name, evals, trains), trains)


def _caption(spec: TableSpec, cells: pd.DataFrame, trains: Indexed) -> str:
    parts = []
    if cells.attrs["smoke"]:
        parts.append(SMOKE_NOTE)
    parts.append(f"{spec.title}. {spec.setting}. Decoding: {spec.decoding}.")
    if spec.name == "table4":
        parts.append(
            "Time is wall-clock hours of our training run; memory is peak GPU memory, max over ranks"
            + (" (host RSS for runs without a GPU)." if cells.attrs["host_memory"] else ".")
            + " Each cell: ours, ↑/↓ our change from our base model (accuracy only), (the published value)."
        )
    else:
        parts.append(CELL_LEGEND)
    ran = _trains_for(spec, trains)
    hardware = hardware_note(ran)
    if hardware:
        parts.append(f"Our runs: {hardware}.")
    if not ran.empty:
        if spec.name in ("table1", "table5") and (ran["finetune"] == "lora").any():
            parts.append("Some of our runs used LoRA where the paper fine-tuned all weights.")
        if spec.name != "table1" and (ran["loss_scaling"] == "token").any():
            parts.append("Some of our runs normalise the loss per token, unlike the paper's code.")
    differences = list(spec.differences)
    n_missing = int(cells["missing"].sum())
    if n_missing:
        differences.append(f"{n_missing} of {len(cells)} cells have no result of ours")
    if differences:
        parts.append("Differences from the paper: " + "; ".join(differences) + ".")
    return " ".join(parts)


# ---------------------------------------------------------------- rendering


def _fmt(value: object, kind: str) -> str:
    if value is None or pd.isna(value):
        return "—"
    digits = {"time": 3, "memory": 2}.get(kind, 2)
    return f"{float(value):.{digits}f}"


def _delta(value: object) -> str:
    if value is None or pd.isna(value):
        return ""
    arrow = "↑" if value > 0 else "↓" if value < 0 else "="
    return f" {arrow}{abs(float(value)):.2f}"


def cell_text(cell: pd.Series) -> str:
    """'41.50 ↑10.12 (42.03)': ours, our change from our base, the published value."""
    return (
        f"{_fmt(cell['ours'], cell['kind'])}{_delta(cell['delta_vs_base'])} ({_fmt(cell['published'], cell['kind'])})"
    )


def _column_headers(spec: TableSpec, cells: pd.DataFrame) -> list[str]:
    headers = []
    for _, column in spec.columns:
        label = column.label
        if column.kind == "memory" and cells.attrs.get("host_memory"):
            label = "Memory (GB; host RSS on CPU runs)"
        headers.append(label)
    return headers


def _grid(spec: TableSpec, cells: pd.DataFrame) -> list[tuple[Row, list[str]]]:
    by_row = {label: frame for label, frame in cells.groupby("row", sort=False)}
    return [(row, [cell_text(c) for _, c in by_row[row.full_label].iterrows()]) for row in spec.rows]


def to_markdown(name: str, cells: pd.DataFrame, caption: str, footer: str = "") -> str:
    """A Markdown table under its caption line (column groups named above it when there are several), then
    `footer` (the software versions) under it."""
    spec = spec_of(name)
    label_headers = ([spec.block_label] if spec.block_label else []) + ["Method"]
    headers = label_headers + _column_headers(spec, cells)
    lines = [caption, ""]
    if len(spec.groups) > 1:
        spans = "; ".join(f"{g.label}: {g.columns[0].label} to {g.columns[-1].label}" for g in spec.groups)
        lines += [f"Column groups: {spans}.", ""]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row, texts in _grid(spec, cells):
        labels = ([row.block or "—"] if spec.block_label else []) + [row.method_label]
        lines.append("| " + " | ".join(labels + texts) + " |")
    if footer:
        lines += ["", footer]
    return "\n".join(lines) + "\n"


_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "↑": r"$\uparrow$",
    "↓": r"$\downarrow$",
    "—": "--",
    "–": "--",
    "…": r"\dots{}",
    "·": r"$\cdot$",
    "×": r"$\times$",
    "λ": r"$\lambda$",
    "α": r"$\alpha$",
    "‖": r"$\|$",
}


def tex_escape(text: str) -> str:
    """Text safe inside a LaTeX tabular (special characters and the arrows we print)."""
    return "".join(_TEX.get(char, char) for char in text)


def _tex_cell(cell: pd.Series) -> str:
    ours = tex_escape(_fmt(cell["ours"], cell["kind"]))
    delta = _delta(cell["delta_vs_base"]).strip()
    if delta:
        arrow = {"↑": r"\uparrow", "↓": r"\downarrow"}.get(delta[0], "=")
        ours += "$_{" + arrow + delta[1:] + "}$"
    return ours + r" {\small(" + tex_escape(_fmt(cell["published"], cell["kind"])) + ")}"


def to_latex(name: str, cells: pd.DataFrame, caption: str) -> str:
    """A booktabs table with the paper's column groups as spanning headers."""
    spec = spec_of(name)
    n_labels = 2 if spec.block_label else 1
    n_data = len(spec.columns)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\caption{{{tex_escape(caption.replace(f'{spec.title}. ', '', 1))}}}",
        rf"\label{{tab:{name}}}",
        r"\begin{tabular}{" + "l" * n_labels + "c" * n_data + "}",
        r"\toprule",
    ]
    spans, rules, start = [], [], n_labels + 1
    for group in spec.groups:
        width = len(group.columns)
        spans.append(rf"\multicolumn{{{width}}}{{c}}{{{tex_escape(group.label)}}}")
        rules.append(rf"\cmidrule(lr){{{start}-{start + width - 1}}}")
        start += width
    lines.append(" & " * n_labels + " & ".join(spans) + r" \\")
    lines.append(" ".join(rules))
    label_headers = ([spec.block_label] if spec.block_label else []) + ["Method"]
    headers = label_headers + _column_headers(spec, cells)
    lines.append(" & ".join(tex_escape(h) for h in headers) + r" \\")
    lines.append(r"\midrule")
    by_row = {label: frame for label, frame in cells.groupby("row", sort=False)}
    previous_block = None
    for row in spec.rows:
        if previous_block is not None and row.block != previous_block:
            lines.append(r"\midrule")
        previous_block = row.block
        labels = ([row.block] if spec.block_label else []) + [row.method_label]
        texts = [_tex_cell(c) for _, c in by_row[row.full_label].iterrows()]
        lines.append(" & ".join([tex_escape(x) for x in labels] + texts) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def rst_escape(text: str) -> str:
    """Caption text that Snakemake's report (reStructuredText) shows literally."""
    for char in ("\\", "*", "`", "|", "_"):
        text = text.replace(char, "\\" + char)
    return text


def write_table(
    name: str, evals: pd.DataFrame | None, trains: pd.DataFrame | None, out_dir: Path | str
) -> dict[str, Path]:
    """Write <name>.csv (long form), .md, .tex and .caption.rst; returns the paths by suffix."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trains = indexed(trains, TRAIN_COLUMNS)
    evals = indexed(evals, EVAL_COLUMNS)
    cells = build_table(name, evals, trains)
    caption = _caption(spec_of(name), cells, trains)
    software = software_note(name, evals, trains)
    paths = {
        "csv": out_dir / f"{name}.csv",
        "md": out_dir / f"{name}.md",
        "tex": out_dir / f"{name}.tex",
        "caption": out_dir / f"{name}.caption.rst",
    }
    cells.to_csv(paths["csv"], index=False, float_format="%.4f", columns=list(LONG_COLUMNS))
    paths["md"].write_text(to_markdown(name, cells, caption, software), encoding="utf-8")
    # LaTeX keeps nothing under a table but its caption: the versions end the caption there
    tex_caption = f"{caption} {' '.join(software.splitlines())}" if software else caption
    paths["tex"].write_text(to_latex(name, cells, tex_caption), encoding="utf-8")
    paths["caption"].write_text(rst_escape(caption) + "\n", encoding="utf-8")
    return paths
