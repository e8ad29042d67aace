"""The paper's tables and figures from our results, with the published numbers beside ours.

Pure rendering: it takes the tidy ``evals``, ``trains`` and ``curves`` frames (see ``asft.paper.selection`` for
their columns) and writes files; which runs fill which cell is data, in ``asft.paper.catalogue``.
"""

from __future__ import annotations

from asft.paper.catalogue import TABLES
from asft.paper.figures import FIGURES, figure_caption, render_figure, write_figure
from asft.paper.tables import build_table, layout_of, table_caption, write_table

__all__ = [
    "FIGURES",
    "TABLES",
    "build_table",
    "figure_caption",
    "layout_of",
    "render_figure",
    "table_caption",
    "write_figure",
    "write_table",
]
