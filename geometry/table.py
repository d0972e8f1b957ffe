"""The tidy output table: one row per (run, step, matrix, metric), schema in SPEC.md."""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

COLUMNS = ("run", "step", "matrix", "layer", "module", "metric", "value")


class Row(NamedTuple):
    run: str  # the run's label (e.g. "sft")
    step: int  # optimizer step of the checkpoint
    matrix: str  # full parameter name, with a "[q]"-style suffix for a split fused matrix
    layer: int | None  # transformer block index, None for embeddings / lm_head
    module: str  # q_proj, k_proj, ..., as the architecture names it
    metric: str  # canonical metric name (SPEC.md, last section)
    value: float


class Table:
    """An immutable list of rows with the few queries that plots and summaries need.

    ``where`` answers from an index on the queried columns, built on the first query of that set of columns:
    a study's report asks thousands of questions of a tracking table of hundreds of thousands of rows.
    """

    def __init__(self, rows: Iterable[Row] = ()):
        self.rows: list[Row] = list(rows)
        self._indexes: dict[tuple[str, ...], dict[tuple, np.ndarray]] = {}  # columns -> their values -> row positions

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)

    def __add__(self, other: Table) -> Table:
        return Table(self.rows + other.rows)

    def where(self, **equal) -> Table:
        """Rows whose named columns equal the given values; a list, tuple or set value means 'any of'. The rows
        keep their order."""
        if not equal:
            return Table(self.rows)
        cols = tuple(sorted(equal))
        wants = [list(dict.fromkeys(v)) if isinstance(v, (list, tuple, set)) else [v] for v in map(equal.get, cols)]
        index = self._index(cols)
        parts = [index[key] for key in itertools.product(*wants) if key in index]
        hits = np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else np.empty(0, dtype=np.int64)
        if len(parts) > 1:  # several keys: merge their positions back into row order
            hits = np.sort(hits)
        return Table(self.rows[i] for i in hits.tolist())

    def _index(self, cols: tuple[str, ...]) -> dict[tuple, np.ndarray]:
        """Row positions by the values of ``cols``, ascending (int64 arrays: 8 bytes a row)."""
        index = self._indexes.get(cols)
        if index is None:
            lists: dict[tuple, list[int]] = {}
            for i, r in enumerate(self.rows):
                lists.setdefault(tuple(getattr(r, c) for c in cols), []).append(i)
            index = self._indexes[cols] = {k: np.array(v, dtype=np.int64) for k, v in lists.items()}
        return index

    def unique(self, column: str) -> list:
        """Distinct values of a column, in first-seen order."""
        return list(dict.fromkeys(getattr(r, column) for r in self.rows))

    def values(self) -> list[float]:
        return [r.value for r in self.rows]

    def to_csv(self, path: str | Path) -> None:
        with open(path, "w", newline="") as f:
            self.write_csv(f)

    def write_csv(self, f) -> None:
        """Write the rows as CSV to an open text stream (values in full precision)."""
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in self.rows:
            w.writerow([r.run, r.step, r.matrix, "" if r.layer is None else r.layer, r.module, r.metric,
                        repr(float(r.value))])

    @classmethod
    def from_csv(cls, path: str | Path) -> Table:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            return cls(
                Row(d["run"], int(d["step"]), d["matrix"], int(d["layer"]) if d["layer"] else None,
                    d["module"], d["metric"], float(d["value"]))
                for d in reader
            )

    def to_pandas(self):
        """The table as a pandas DataFrame (pandas is an optional dependency)."""
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("Table.to_pandas() needs pandas: pip install pandas") from e
        return pd.DataFrame(self.rows, columns=list(COLUMNS))

    def __repr__(self) -> str:
        runs = ", ".join(map(str, self.unique("run")))
        return f"Table({len(self.rows)} rows; runs: {runs})"

