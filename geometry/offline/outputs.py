"""Writing an analysis to a directory: every file lands whole (temporary name, fsync, rename) or not at all.

A new output directory is staged beside its final name and renamed into place in one step, so a failure or
an interrupt (Ctrl-C, SIGTERM) at any moment leaves either nothing or the whole result; into an existing
directory the files are renamed one by one with SIGINT/SIGTERM held back until the last has landed.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from geometry.atomic import fsync_path, write_atomic
from geometry.errors import GeometryError
from geometry.offline import lens, moe
from geometry.offline.analyze import Analysis, Curve, Run
from geometry.offline.config import AnalysisConfig
from geometry.offline.markdown import render_summary
from geometry.offline.pairs import Pairs, PairSummary
from geometry.offline.summary import DERIVED, onset_rows, summarize, summary_json
from geometry.selection import Coverage
from geometry.table import Table

FILES = ("metrics.csv", "summary.json", "summary.md", "curves.npz")  # the tables
PAIRS = "pairs.csv"  # where two runs or more share a base: the runs compared with each other (offline.pairs)
LENS = "lens.json"  # with --lens: each run's final update read as tokens (offline.lens)
REPORT = ("figures", "report.md")  # with figures=True (the CLI's default); report.html with html=True


def write_analysis(analysis: Analysis, out: str | Path, *, figures: bool = False, html: bool = False) -> list[Path]:
    """metrics.csv (the tidy table), summary.json, summary.md and curves.npz (angle curves, spectra); pairs.csv
    where runs share a base (their run-level values under summary.json's "pairs" and in summary.md); lens.json
    with ``config.lens`` (its largest updates' directions in summary.md); with
    ``figures``, the standard figures (figures/*.png) and report.md embedding them; with ``html``, also
    report.html, one self-contained file (geometry.offline.figures).

    Everything is rendered in memory first, so a failure leaves no output files behind. summary.json
    names each run's checkpoints: ``base`` and ``step_labels`` (one per entry of ``steps``).
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
        "summary.json": _with_labels(summary_json(summaries, analysis.notes, dataclasses.asdict(analysis.config)),
                                     analysis.labels, analysis.coverage, analysis.pairs).encode(),
        "summary.md": _with_pairs(_with_experts(render_summary(summaries, analysis.notes, tau, analysis.config.alpha,
                                                               analysis.config.lock_k), analysis),
                                  analysis.pairs, lens.markdown(analysis.lens)).encode(),
        "curves.npz": npz_buf.getvalue(),
    }
    if len(analysis.pairs):
        blobs[PAIRS] = analysis.pairs.to_csv().encode()
    if analysis.config.lens:
        blobs[LENS] = lens.to_json(analysis.lens).encode()
    if figures or html:
        blobs.update(_report_files(analysis, blobs["summary.md"].decode(), html))
    try:
        if out.is_dir():
            _replace_files(blobs, out)
        else:
            _new_dir(blobs, out)
    except OSError as e:
        raise GeometryError(f"cannot write the output to {out}: {e.strerror or e}") from None
    return [out / name for name in blobs]


def _report_files(analysis: Analysis, summary_md: str, html: bool) -> dict[str, bytes]:
    from geometry.offline.figures import report_html, report_markdown, standard_figures

    figs = standard_figures(analysis)
    files = {f"figures/{name}": data for name, data in figs.items()}
    files["report.md"] = report_markdown(summary_md, figs, "figures").encode()
    if html:
        files["report.html"] = report_html(summary_md, figs).encode()
    return files


def _with_experts(summary_md: str, table: Table) -> str:
    """summary.md with the layer x expert view of mixture-of-experts runs (geometry.offline.moe) at its end."""
    section = moe.markdown(table)
    return summary_md if not section else summary_md.rstrip() + "\n\n" + section


def _with_pairs(summary_md: str, pairs: Pairs, *more: str) -> str:
    """summary.md with the runs compared with each other (geometry.offline.pairs), then the sections ``more``,
    before its notes."""
    section = "\n\n".join(s.rstrip() for s in (pairs.markdown(), *more) if s)
    if not section:
        return summary_md
    head, sep, notes = summary_md.partition("\n## Notes\n")
    return head.rstrip() + "\n\n" + section.rstrip() + "\n" + (sep + notes if sep else "")


def _with_labels(text: str, labels: dict[str, dict[int, str]], coverage: dict[str, Coverage],
                 pairs: Pairs | None = None) -> str:
    """summary.json with each run's base and checkpoint names beside its steps, the share of its model
    measured (``coverage``: what was left out, by kind), and the runs compared with each other (``pairs``)."""
    doc = json.loads(text)
    if pairs is not None and pairs.summaries:
        doc["pairs"] = [s.to_json() for s in pairs.summaries]
    for run, entry in doc["runs"].items():
        names = labels.get(run)
        if names:
            entry["base"] = names.get(0)
            entry["step_labels"] = [names.get(step, str(step)) for step in entry["steps"]]
        if run in coverage:
            entry["coverage"] = coverage[run].as_dict()
    return json.dumps(doc, indent=2)


def check_output(out: str | Path) -> None:
    """Refuse, before any work, an output path that is not a directory or where nothing can be written;
    leaves nothing behind."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise GeometryError(f"output path {out} exists and is not a directory")
        where = out
    else:
        where = next(p for p in Path(os.path.abspath(out)).parents if p.exists() or p.is_symlink())
        if not where.is_dir():
            raise GeometryError(f"output path {out}: {where} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tmp-geometry-", dir=where)
        try:
            os.close(fd)
        finally:
            os.unlink(probe)
    except OSError as e:
        raise GeometryError(f"cannot write the output to {out}: {e.strerror or e}") from None


def _stage(blobs: dict[str, bytes], where: Path) -> Path:
    stage = Path(tempfile.mkdtemp(prefix=".tmp-geometry-", dir=where))
    try:
        for name, data in blobs.items():
            (stage / name).parent.mkdir(exist_ok=True)  # figures/
            write_atomic(stage / name, data)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return stage


def _new_dir(blobs: dict[str, bytes], out: Path) -> None:
    """Stage the whole directory beside `out`, then one rename: `out` appears complete or not at all."""
    if out.exists() or out.is_symlink():
        raise GeometryError(f"output path {out} exists and is not a directory")
    absolute = Path(os.path.abspath(out))
    missing = [p for p in absolute.parents if not p.exists()]  # parents to create, deepest first
    try:
        absolute.parent.mkdir(parents=True, exist_ok=True)
        stage = _stage(blobs, absolute.parent)
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(stage, 0o777 & ~umask)  # mkdtemp made it private; an output dir is an ordinary one
            os.rename(stage, absolute)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    except BaseException:
        for p in missing:  # the parents this call made, and only if still empty
            try:
                p.rmdir()
            except OSError:
                break
        raise
    fsync_path(absolute.parent)


def _replace_files(blobs: dict[str, bytes], out: Path) -> None:
    """Stage inside `out`, then rename each file over its old version, interrupts held until all landed."""
    stage = _stage(blobs, out)
    try:
        with _signals_held():
            for name in blobs:  # renames within one filesystem: each lands whole
                (out / name).parent.mkdir(exist_ok=True)
                os.replace(stage / name, out / name)
        fsync_path(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait (are delivered on exit) so that a set of renames completes.

    The handlers are swapped rather than the signals blocked: a process-directed signal goes to any thread
    that does not block it (torch's worker threads among them), and Python then raises in the main thread.
    """
    pending: list[int] = []
    try:
        previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum))
                    for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread, where Python runs no signal handler anyway
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:  # now to whatever handled it before: KeyboardInterrupt, the CLI's SIGTERM, the default
            signal.raise_signal(pending[0])


def load(out: str | Path) -> Analysis:
    """An analysis back from the directory ``write_analysis`` (or ``geometry analyze -o``) wrote.

    Parameters
    ----------
    out : path
        The output directory: metrics.csv, summary.json and curves.npz are read (pairs.csv, lens.json too
        where present).

    Returns
    -------
    Analysis
        Rows, curves, notes, settings, coverage. The per-matrix onset rows that ``write_analysis`` derives are
        left out (writing the result again derives them anew); runs carry their labels only (the base and
        checkpoint paths are not part of the outputs).

    Raises
    ------
    GeometryError
        ``out`` is not an output directory of ``geometry analyze``, or a file in it is unreadable.

    Examples
    --------
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> from geometry import AnalysisConfig, analyze, load
    >>> from geometry.offline.outputs import write_analysis
    >>> d = tempfile.mkdtemp()
    >>> w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    >>> save_file({"model.layers.0.mlp.up_proj.weight": w}, f"{d}/base.safetensors")
    >>> save_file({"model.layers.0.mlp.up_proj.weight": 2 * w}, f"{d}/tuned.safetensors")
    >>> a = analyze(f"{d}/base.safetensors", [f"{d}/tuned.safetensors"], config=AnalysisConfig(quick=True))
    >>> _ = write_analysis(a, f"{d}/out")
    >>> back = load(f"{d}/out")
    >>> back.where(metric="sparsity_bf16").values() == a.where(metric="sparsity_bf16").values()
    True
    """
    out = Path(out)
    for name in ("metrics.csv", "summary.json", "curves.npz"):
        if not (out / name).is_file():
            raise GeometryError(f"{out}: no {name}; not an output directory of `geometry analyze`")
    try:
        table = Table.from_csv(out / "metrics.csv")
        summary = json.loads((out / "summary.json").read_text())
        config = AnalysisConfig(**{**summary.get("config", {}), "device": "auto"})  # written on another machine?
        curves = []
        with np.load(out / "curves.npz") as data:
            for key in data.files:
                run, step, matrix, kind = key.split("|")  # written by write_analysis; names hold no '|'
                curves.append(Curve(run, int(step), matrix, kind, data[key]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GeometryError(f"{out}: unreadable analysis output ({type(e).__name__}: {e})") from None
    rows = [r for r in table if r.metric not in DERIVED]
    labels = {}  # run -> step -> checkpoint name, as _with_labels wrote them
    for run, entry in summary.get("runs", {}).items():
        if "step_labels" in entry:
            labels[run] = {0: entry.get("base"), **dict(zip(entry["steps"], entry["step_labels"], strict=True))}
    runs = [Run(label, "", []) for label in dict.fromkeys(r.run for r in rows)]
    analysis = Analysis(rows, curves, summary.get("notes", []), runs, config, labels)
    analysis.coverage = {run: Coverage.from_dict(entry["coverage"]) for run, entry in summary.get("runs", {}).items()
                         if "coverage" in entry}
    if (out / PAIRS).is_file():
        try:
            analysis.pairs = Pairs(Pairs.rows_from_csv((out / PAIRS).read_text()),
                                   [PairSummary.from_json(d) for d in summary.get("pairs", [])])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise GeometryError(f"{out}: unreadable {PAIRS} ({type(e).__name__}: {e})") from None
    if (out / LENS).is_file():
        try:
            analysis.lens = lens.from_json((out / LENS).read_text())
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise GeometryError(f"{out}: unreadable {LENS} ({type(e).__name__}: {e})") from None
    return analysis
