"""The tidy output table: one row per (run, step, matrix, metric), schema in SPEC.md."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

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
    """An immutable list of rows with the few queries that plots and summaries need."""

    def __init__(self, rows: Iterable[Row] = ()):
        self.rows: list[Row] = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)

    def __add__(self, other: Table) -> Table:
        return Table(self.rows + other.rows)

    def where(self, **equal) -> Table:
        """Rows whose named columns equal the given values; a list or tuple value means 'any of'."""

        def keep(row: Row) -> bool:
            for col, want in equal.items():
                got = getattr(row, col)
                if isinstance(want, (list, tuple, set)):
                    if got not in want:
                        return False
                elif got != want:
                    return False
            return True

        return Table(r for r in self.rows if keep(r))

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

