"""Writing an analysis to a directory: every file lands whole (temporary name, fsync, rename) or not at all."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from geometry.atomic import write_atomic
from geometry.errors import GeometryError
from geometry.offline.analyze import Analysis
from geometry.offline.markdown import render_summary
from geometry.offline.summary import onset_rows, summarize, summary_json

FILES = ("metrics.csv", "summary.json", "summary.md", "curves.npz")


def write_analysis(analysis: Analysis, out: str | Path) -> list[Path]:
    """metrics.csv (the tidy table), summary.json, summary.md and curves.npz (angle curves, spectra).

    Everything is rendered in memory first, so a failure leaves no output files behind.
    """
    out = Path(out)
    tau = analysis.config.tau
    table = analysis + onset_rows(analysis, tau)
    summaries = summarize(analysis, tau)
    csv_buf = io.StringIO()
    table.write_csv(csv_buf)
    npz_buf = io.BytesIO()
    np.savez_compressed(npz_buf, **{f"{c.run}|{c.step}|{c.matrix}|{c.kind}": c.values for c in analysis.curves})
    blobs = {
        "metrics.csv": csv_buf.getvalue().encode(),
        "summary.json": summary_json(summaries, analysis.notes).encode(),
        "summary.md": render_summary(summaries, analysis.notes, tau, analysis.config.alpha).encode(),
        "curves.npz": npz_buf.getvalue(),
    }
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".tmp-geometry-", dir=out))
    except OSError as e:
        raise GeometryError(f"cannot create output directory {out}: {e.strerror}") from None
    try:
        for name, data in blobs.items():  # stage everything first: a failure here leaves nothing behind
            write_atomic(stage / name, data)
        for name in blobs:  # renames within one filesystem: each lands whole
            os.replace(stage / name, out / name)
    except OSError as e:
        raise GeometryError(f"cannot write to {out}: {e.strerror}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
    return [out / name for name in blobs]


def read_curves(path: str | Path, kind: str) -> dict[tuple[str, int, str], np.ndarray]:
    """The curves of one kind ("angles_u", "angles_v", "spectrum") from a curves.npz, keyed (run, step, matrix)."""
    out = {}
    with np.load(path) as data:
        for key in data.files:
            run, step, matrix, k = key.split("|")  # written by write_analysis; names hold no '|'
            if k == kind:
                out[(run, int(step), matrix)] = data[key]
    return out
