"""One catalogue target from the records the experiments' aggregations wrote (asft.records)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from asft.data import iter_json_objects
from asft.layout import CURVE_RECORDS, EVAL_RECORDS, TRAIN_RECORDS
from asft.paper.figures import write_figure
from asft.paper.tables import write_table
from asft.paper.targets import is_table


def read_records(records_dirs: Sequence[Path], file_name: str) -> pd.DataFrame:
    """The concatenated records of one kind; a missing file is an error (the rule declares them as inputs)."""
    rows = [row for directory in records_dirs for _, row in iter_json_objects(Path(directory) / file_name)]
    return pd.DataFrame(rows)


def render_target(name: str, records_dirs: Sequence[Path], out_dir: Path) -> list[Path]:
    """Write the table (csv, md, tex, caption) or figure (png, caption) `name` into `out_dir`."""
    evals = read_records(records_dirs, EVAL_RECORDS)
    trains = read_records(records_dirs, TRAIN_RECORDS)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_table(name):
        return list(write_table(name, evals, trains, out_dir).values())
    curves = read_records(records_dirs, CURVE_RECORDS)
    png = write_figure(name, evals, trains, curves, out_dir / f"{name}.png")
    return [png, png.with_suffix(".caption.rst")]
