"""Picking the rows of the tidy input frames that one table cell or figure point stands for.

A filter is a plain mapping {column: value}. A tuple value means "any of these"; for ``experiment`` the tuple is
also a priority order (the first experiment that has matching rows wins), so a row can borrow e.g. a base model
evaluated in another experiment without double counting. ``None`` matches a missing value. Floats compare with
a relative tolerance so 0.05 from YAML equals 0.05 from a CSV.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

Filter = Mapping[str, object]

# The columns that tell two trained configurations apart (everything but the seed).
CONFIG_COLUMNS = (
    "experiment",
    "model",
    "dataset",
    "mode",
    "kl_weight",
    "sft_weight",
    "kl_direction",
    "sweep_key",
    "sweep_value",
    "init_label",  # a continual run's parent (sft+dapo vs asft+dapo)
)
# stack: the software versions of the run (asft.stack_versions), listed under each table
EVAL_COLUMNS = (*CONFIG_COLUMNS, "seed", "benchmark", "step", "accuracy", "n", "ci_low", "ci_high", "scale", "stack")
TRAIN_COLUMNS = (
    *CONFIG_COLUMNS,
    "seed",
    "finetune",
    "lora_r",
    "wall_time_s",
    "accelerator",
    "accelerator_count",
    "peak_gpu_memory_gb",
    "peak_host_memory_gb",
    "loss_scaling",
    "stack",
)
CURVE_COLUMNS = ("experiment", "model", "dataset", "mode", "kl_weight", "step", "kl", "loss")


def normalise(frame: pd.DataFrame | None, columns: tuple[str, ...]) -> pd.DataFrame:
    """A copy with every expected column present, so absent results read as missing rather than crash."""
    frame = pd.DataFrame() if frame is None else frame.copy()
    for column in columns:
        if column not in frame.columns:
            frame[column] = np.nan
    return frame.reset_index(drop=True)


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA or value is pd.NaT


def _matches(actual: object, value: object) -> bool:
    values = value if isinstance(value, tuple | list | frozenset | set) else (value,)
    for item in values:
        if item is None:
            if _is_missing(actual):
                return True
        elif _is_missing(actual):
            continue
        elif isinstance(item, float | int) and not isinstance(item, bool):
            try:
                if math.isclose(float(actual), float(item), rel_tol=1e-6):
                    return True
            except (TypeError, ValueError):
                continue
        elif actual == item:
            return True
    return False


class Indexed:
    """A tidy frame as plain records grouped by experiment: a table asks for hundreds of cells, and pandas
    boolean indexing per cell costs tens of milliseconds each."""

    def __init__(self, frame: pd.DataFrame | None, columns: tuple[str, ...]) -> None:
        self.frame = normalise(frame, columns)
        self.columns = set(self.frame.columns)
        self.records: list[dict] = [
            {k: (None if _is_missing(v) else v) for k, v in record.items()} for record in self.frame.to_dict("records")
        ]
        self.by_experiment: dict[object, list[int]] = {}
        for i, record in enumerate(self.records):
            self.by_experiment.setdefault(record.get("experiment"), []).append(i)
        self._cache: dict[tuple, list[int]] = {}

    def positions(self, spec: Filter, final_only: bool = True) -> list[int]:
        """Positions of the records matching ``spec``; only final models (no step) unless told otherwise."""
        key = (tuple(sorted((k, _hashable(v)) for k, v in spec.items())), final_only)
        if key not in self._cache:
            self._cache[key] = self._positions(spec, final_only)
        return self._cache[key]

    def _positions(self, spec: Filter, final_only: bool) -> list[int]:
        unknown = [column for column in spec if column not in self.columns]
        if unknown:
            raise KeyError(f"filter names column(s) {unknown} that the frame does not have")
        conditions = [(k, v) for k, v in spec.items() if k != "experiment"]
        check_step = final_only and "step" in self.columns and "step" not in spec
        experiments = spec.get("experiment")
        if experiments is None:
            groups = [list(range(len(self.records)))]
        else:
            order = experiments if isinstance(experiments, tuple | list) else (experiments,)
            groups = [self.by_experiment.get(e, []) for e in order]
        for group in groups:  # the first experiment with matching rows wins
            hits = [
                i
                for i in group
                if (not check_step or self.records[i]["step"] is None)
                and all(_matches(self.records[i][k], v) for k, v in conditions)
            ]
            if hits:
                return hits
        return []

    def rows(self, spec: Filter, final_only: bool = True) -> list[dict]:
        return [self.records[i] for i in self.positions(spec, final_only)]

    def select(self, spec: Filter, final_only: bool = True) -> pd.DataFrame:
        return self.frame.iloc[self.positions(spec, final_only)]


def _hashable(value: object) -> object:
    return tuple(value) if isinstance(value, list | tuple | set | frozenset) else value


def indexed(frame: pd.DataFrame | Indexed | None, columns: tuple[str, ...]) -> Indexed:
    """Index a frame once; an already indexed one passes through."""
    return frame if isinstance(frame, Indexed) else Indexed(frame, columns)


def check_single_config(rows: list[dict], spec: Filter) -> None:
    """Raise when a filter matches two trained configurations: averaging them would be a silent mistake."""
    keys = {tuple(_config_value(row.get(c)) for c in CONFIG_COLUMNS) for row in rows}
    if len(keys) > 1:
        listing = "\n".join(str(dict(zip(CONFIG_COLUMNS, k, strict=True))) for k in sorted(keys, key=str))
        raise ValueError(
            f"filter {dict(spec)} matches {len(keys)} configurations; narrow it (e.g. kl_weight):\n{listing}"
        )


def _config_value(value: object) -> object:
    if isinstance(value, float | int) and not isinstance(value, bool):
        return float(f"{float(value):.6g}")
    return value


@dataclass(frozen=True)
class Measure:
    """One aggregated value (mean over seeds) with what it rests on."""

    value: float | None
    n: int | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    seeds: int = 0
    smoke: bool = False
    note: str = ""

    @property
    def missing(self) -> bool:
        return self.value is None or (isinstance(self.value, float) and math.isnan(self.value))


MISSING = Measure(None)


def _numbers(rows: list[dict], column: str) -> list[float]:
    out = []
    for row in rows:
        try:
            value = float(row.get(column))
        except (TypeError, ValueError):
            continue
        if not math.isnan(value):
            out.append(value)
    return out


def accuracy(evals: Indexed, spec: Filter, benchmark: str) -> Measure:
    """Mean accuracy over seeds, in percent; the CI is the envelope of the seeds' CIs (one seed: its CI)."""
    rows = [r for r in evals.rows({**spec, "benchmark": benchmark}) if _numbers([r], "accuracy")]
    check_single_config(rows, spec)
    if not rows:
        return MISSING
    acc, low, high, n = (_numbers(rows, c) for c in ("accuracy", "ci_low", "ci_high", "n"))
    return Measure(
        value=100 * float(np.mean(acc)),
        n=int(max(n)) if n else None,
        ci_low=100 * min(low) if low else None,
        ci_high=100 * max(high) if high else None,
        seeds=len(rows),
        smoke=any(r.get("scale") == "smoke" for r in rows),
    )


def average(parts: list[Measure]) -> Measure:
    """The paper's group average: the plain mean of the group's benchmark columns, missing if any is missing."""
    if not parts or any(p.missing for p in parts):
        return Measure(None, smoke=any(p.smoke for p in parts))
    ns = [p.n for p in parts]
    return Measure(
        value=float(np.mean([p.value for p in parts])),
        n=sum(n for n in ns if n is not None) if all(n is not None for n in ns) else None,
        seeds=min(p.seeds for p in parts),
        smoke=any(p.smoke for p in parts),
    )


def train_rows(trains: Indexed, spec: Filter) -> list[dict]:
    """The training runs a filter stands for (the same filter as the evaluations)."""
    rows = trains.rows(spec, final_only=False)
    check_single_config(rows, spec)
    return rows


def wall_hours(trains: Indexed, spec: Filter) -> Measure:
    """Mean wall time over seeds, in hours."""
    seconds = _numbers(train_rows(trains, spec), "wall_time_s")
    if not seconds:
        return MISSING
    return Measure(float(np.mean(seconds)) / 3600, seeds=len(seconds))


def peak_memory(trains: Indexed, spec: Filter) -> Measure:
    """Peak GPU memory (GB, max over ranks and seeds); host RSS where the run had no GPU, noted as 'host'."""
    rows = train_rows(trains, spec)
    gpu = _numbers(rows, "peak_gpu_memory_gb")
    if gpu:
        return Measure(max(gpu), seeds=len(rows), note="gpu")
    host = _numbers(rows, "peak_host_memory_gb")
    if not host:
        return MISSING
    return Measure(max(host), seeds=len(rows), note="host")
