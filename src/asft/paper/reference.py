"""Published numbers shipped with the package (copied verbatim from the papers), and strict lookups into them.

A lookup that names a row or column the reference file does not have raises: that is a typo in the catalogue,
and silently printing "—" for it would hide a wrong comparison.
"""

from __future__ import annotations

import math
from functools import cache
from importlib import resources

import pandas as pd

REFERENCE_FILES = (
    "asft_paper_table1.csv",
    "asft_paper_table2.csv",
    "asft_paper_table3.csv",
    "asft_paper_table4.csv",
    "asft_paper_table5.csv",
    "asft_paper_figures.md",
    "token_sft_fork_results.csv",
    "dft_paper_table1.csv",
    "third_party_reproductions.csv",
)


def reference_text(name: str) -> str:
    """The raw text of a shipped reference file, '#' comment lines included."""
    if name not in REFERENCE_FILES:
        raise KeyError(f"unknown reference file {name!r}; shipped: {', '.join(REFERENCE_FILES)}")
    return resources.files("asft.paper").joinpath("reference", name).read_text(encoding="utf-8")


@cache
def _load(name: str) -> pd.DataFrame:
    from io import StringIO

    # Key columns ("10k", "base") stay strings; values become floats.
    return pd.read_csv(StringIO(reference_text(name)), comment="#", dtype=str, keep_default_na=False)


def reference_table(name: str) -> pd.DataFrame:
    """A reference CSV as strings (comment lines dropped), in the file's row and column order."""
    return _load(name).copy()


@cache
def _rows(name: str, key_columns: tuple[str, ...]) -> dict[tuple[str, ...], list[dict[str, str]]]:
    table = _load(name)
    missing = [c for c in key_columns if c not in table.columns]
    if missing:
        raise KeyError(f"{name}: no column(s) {missing}; columns are {list(table.columns)}")
    rows: dict[tuple[str, ...], list[dict[str, str]]] = {}
    for record in table.to_dict("records"):
        rows.setdefault(tuple(record[c] for c in key_columns), []).append(record)
    return rows


def published_value(name: str, key_columns: tuple[str, ...], key: tuple[str, ...], column: str) -> float | None:
    """The published value of one cell; None where the file leaves the cell empty.

    Raises KeyError when the key row or the column does not exist in the file.
    """
    if column not in _load(name).columns:
        raise KeyError(f"{name}: no column(s) {[column]}; columns are {list(_load(name).columns)}")
    if len(key) != len(key_columns):
        raise KeyError(f"{name}: key {key} does not match key columns {key_columns}")
    hits = _rows(name, tuple(key_columns)).get(tuple(key), [])
    where = dict(zip(key_columns, key, strict=True))
    if not hits:
        raise KeyError(f"{name}: no row with {where}")
    if len(hits) > 1:
        raise KeyError(f"{name}: several rows with {where}")
    text = hits[0][column].strip()
    if not text:
        return None
    value = float(text)
    return None if math.isnan(value) else value


def reference_keys(name: str, key_columns: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The row keys of a reference CSV in file order."""
    table = _load(name)
    return [tuple(row) for row in table[list(key_columns)].itertuples(index=False, name=None)]
