"""The catalogue's Snakemake targets and the experiments each one reads.

A table's experiments are read off its rows' filters, so they cannot drift from what the table shows; a figure
names its own, since its panels are drawn by code.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from asft.config_files import ConfigError
from asft.paper.catalogue import TABLES
from asft.paper.figures import FIGURES

_FIGURE_EXPERIMENTS: dict[str, tuple[str, ...]] = {
    "fig1": ("fig1",),
    "fig2": ("fig2", "table1_medical"),
    "fig3": ("table1_medical", "table5_qwen7b", "table5_32b", "table5_70b"),
    "fig4": ("fig4_math", "fig4_medical", "table1_math", "table1_medical"),
    "fig5": ("fig5_lr", "fig5_batch", "table1_medical"),
}


def _filter_experiments(filters: Iterator[Mapping[str, Any]]) -> Iterator[str]:
    for spec in filters:
        experiment = spec["experiment"]
        yield from (experiment,) if isinstance(experiment, str) else experiment


def _table_filters(name: str) -> Iterator[Mapping[str, Any]]:
    for row in TABLES[name].rows:
        yield from row.sources.values()
        yield from (row.base or {}).values()


def target_names() -> list[str]:
    """Every table and figure, in the paper's order."""
    return [*TABLES, *FIGURES]


def paper_target_names() -> list[str]:
    """What `snakemake paper` renders: the paper's and the fork's tables and every figure, not our extra tables."""
    return [name for name in target_names() if name not in TABLES or TABLES[name].in_paper]


def is_table(name: str) -> bool:
    return name in TABLES


def experiments_of(name: str) -> list[str]:
    """The experiments whose records a table or figure is rendered from, in a stable order."""
    if name in TABLES:
        return list(dict.fromkeys(_filter_experiments(_table_filters(name))))
    if name in FIGURES:
        return list(_FIGURE_EXPERIMENTS[name])
    raise KeyError(f"unknown table or figure {name!r}; known: {', '.join(target_names())}")


def check_catalogue(config: Mapping[str, Any], source: str) -> None:
    """`catalogue: paper` promises every target: refuse a config that lacks an experiment one of them reads."""
    if config.get("catalogue") != "paper":
        return
    missing = {
        experiment: [name for name in target_names() if experiment in experiments_of(name)]
        for name in target_names()
        for experiment in experiments_of(name)
        if experiment not in config["experiments"]
    }
    if missing:
        lines = "\n  ".join(
            f"experiments.{exp}: missing (read by {', '.join(names)})" for exp, names in missing.items()
        )
        raise ConfigError(f"{source}: catalogue: paper needs these experiments:\n  {lines}")


def report_caption(name: str) -> str:
    """What a table or figure shows and how it differs from the paper, for `snakemake --report` (the rendered
    files' own captions add what the run measured: hardware, missing cells, the smoke scale)."""
    if name in TABLES:
        spec = TABLES[name]
        differences = "; ".join(spec.differences)
        text = f"{spec.title}. {spec.setting}. Decoding: {spec.decoding}."
        text += f" Differences from the paper: {differences}." if differences else ""
    else:
        text = f"{FIGURES[name].title}. {FIGURES[name].setting}."
    return text.replace("@", "\\@")  # reStructuredText would make "avg@16" a mail link
