"""`geometry demo --quick` end to end: every run and seed trained and recorded, report and figures written."""

import contextlib
import io
import math
import re

import pytest
from matplotlib.image import imread
from md_tables import assert_tables_keep_columns

from geometry.cli import main
from geometry.errors import GeometryError
from geometry.lab.paper import PAPER_SPARSITY
from geometry.lab.study import CONTROLS, MAIN, PROJECTED, data_dir
from geometry.table import Table


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    with contextlib.redirect_stderr(Terminal()) as err:  # as on a terminal: the progress bars are drawn
        assert main(["demo", "--quick", "-o", str(out)]) == 0
    (out.parent / "stderr.txt").write_text(err.getvalue())
    return out


def test_report_has_every_section_and_a_verdict_per_claim(demo):
    text = (demo / "report.md").read_text()
    for section in ("## Claims at this scale", "## Setup: differences from the paper", "## Learning rates",
                    "## Update sparsity (Table 1)", "## Localisation of the update mask",
                    "## Principal angles and spectral shift", "## Subspace locking", "## Are there boundaries",
                    "## Gradient projection"):
        assert section in text
    verdicts = re.findall(r"^- \*\*(reproduced|contradicted|partly|inconclusive)\*\* \(claim (\d+)\)", text,
                          flags=re.M)
    assert [int(i) for _, i in verdicts] == list(range(1, 11))
    assert f"{100 * PAPER_SPARSITY['rlvr']:.2f}" in text  # the paper's RLVR sparsity stands beside ours
    assert "closest to the paper" not in (demo / "analysis" / "summary.md").read_text()


def _table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of the markdown table whose header row starts with ``header``, split on unescaped '|'."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_every_pair_is_shown_once_with_its_test(demo):
    """The table of pairs: every claim's pairs with difference, interval, p, Holm p and status; every row
    keeps the header's columns; no claim repeats another's pair (the same ordering of the same figure)."""
    from geometry.lab.claims import claims, views
    from geometry.lab.study import load_study

    study = load_study(demo)
    cl = claims(study, views(study))
    rows = _table_rows((demo / "report.md").read_text(), "| claim | pair |")
    assert all(len(r) == len(rows[0]) == 8 for r in rows) and rows[1][0].startswith("---")
    assert [(int(r[0]), r[1], r[-1]) for r in rows[2:]] == [
        (i, p.text, p.status) for i, c in enumerate(cl, 1) for p in c.pairs]
    figures = [(c.evidence.split(":")[0], p.text) for c in cl for p in c.pairs]
    assert len(figures) == len(set(figures)) == 20
    for text in ("SFT < OPD", "OPD < RLVR"):  # sparsity and low-magnitude overlap, not a second sparsity claim
        assert sum(p.text == text for c in cl for p in c.pairs) == 2
    text = (demo / "report.md").read_text()
    for header in ("| run | bf16 sparsity", "| run | trainer", "| regime | unconstrained"):
        table = _table_rows(text, header)
        assert len({len(r) for r in table}) == 1, header  # '|' in a cell is escaped


def test_notes_collapse_to_one_line_per_setting():
    from geometry.lab.report import collapse_notes

    labels = ["sft/s0", "sft/s1", "opd/s0"]
    notes = ["sft/s0: k = 16", "sft/s1: k = 16", "opd/s0: k = 16", "sft/s0, opd/s0: one base decomposition",
             "a note about no run", "opd/s0: k = 8", "sft/s0: one for these runs", "sft/s1: one for these runs"]
    assert collapse_notes(notes, labels) == ["all runs: k = 16", "sft/s0, opd/s0: one base decomposition",
                                             "a note about no run", "opd/s0: k = 8", "sft/s0: one for these runs",
                                             "sft/s1: one for these runs"]


def test_every_table_of_the_report_keeps_its_columns(demo):
    assert assert_tables_keep_columns((demo / "report.md").read_text()) >= 8


def test_a_terminal_sees_the_training_and_analysis_bars_with_an_eta(demo):
    err = (demo.parent / "stderr.txt").read_text()
    assert re.search(r"training: .*\d+/14 \[[\d:]+<[\d:]+", err)  # --quick: 2 seeds x 7 runs
    assert re.search(r"analyze sft/s0 and 13 more runs: .*<[\d:]+", err)
    bars = {line.split(":")[0] for line in err.splitlines() if "%|" in line}
    assert bars == {"training", "analyze sft/s0 and 13 more runs"}  # no library's bar besides ours


def test_every_run_and_seed_is_analyzed_and_tracked(demo):
    labels = {f"{n}/s{s}" for n in (*MAIN, *CONTROLS, *PROJECTED) for s in (0, 1)}  # --quick: 2 seeds
    snapshots = Table.from_csv(demo / "analysis" / "metrics.csv")
    tracking = Table.from_csv(demo / "analysis" / "tracking.csv")
    assert set(snapshots.unique("run")) == labels == set(tracking.unique("run"))
    assert len(snapshots.where(run="sft/s0").unique("step")) == 5  # snapshots at 20%, 40%, ... 100%
    assert sorted(tracking.where(run="opd/s1").unique("step")) == list(range(1, 11))  # every step


def test_figures_are_real_pngs(demo):
    names = sorted(p.name for p in (demo / "figures").glob("*.png"))
    assert names == ["angles_spectra.png", "locking.png", "projection.png", "rank_norm.png",
                     "sparsity_localisation.png"]
    for name in names:
        img = imread(demo / "figures" / name)
        assert img.shape[0] > 300 and img.shape[1] > 500 and img.std() > 0.01


def test_a_second_demo_replaces_its_own_output_but_not_other_dirs(demo, tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep")
    assert main(["demo", "--quick", "-o", str(tmp_path)]) == 2
    assert "not a geometry demo output" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep"


def test_data_directory_resolution(tmp_path, monkeypatch, capsys):
    """--data, then $GEOMETRY_DATA, then the repository's data/; a missing model is one clear error."""
    monkeypatch.delenv("GEOMETRY_DATA", raising=False)
    assert (data_dir() / "student" / "config.json").is_file()
    monkeypatch.setenv("GEOMETRY_DATA", str(tmp_path))
    with pytest.raises(GeometryError, match="student: no model here"):
        data_dir()
    assert data_dir(data_dir.__globals__["REPO_DATA"]) == data_dir.__globals__["REPO_DATA"]
    assert main(["demo", "--quick", "--data", str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    assert "geometry lab pretrain" in capsys.readouterr().err


def test_tracking_at_k_matches_the_capture_reader(demo):
    """The study's batched per-step curves at K = 16 (all the recorder tracks) equal geometry.capture's
    per-matrix reader on the same store; at a smaller K they are computed from the top-K columns."""
    from pathlib import Path

    from geometry.capture.trajectory import tracking_table
    from geometry.lab.regimes import TrainResult
    from geometry.lab.study import tracking_at

    store = demo / "runs" / "opd" / "s0"
    res = TrainResult("opd", 0, Path(store), 10, 1e-6, 0.0, 0.0, 0, 0.0)
    got = {(r.step, r.matrix, r.metric): r.value for r in tracking_at(res, 16)}
    want = {(r.step, r.matrix, r.metric): r.value for r in tracking_table(store, run="opd/s0")}
    assert set(got) == set(want)
    assert all(math.isclose(got[k], want[k], rel_tol=1e-9, abs_tol=1e-12)
               or (math.isnan(got[k]) and math.isnan(want[k])) for k in got)
    small = {(r.step, r.matrix, r.metric): r.value for r in tracking_at(res, 4)}
    assert any(abs(small[k] - got[k]) > 1e-3 for k in got if k[2] == "track_sim_final_v" and k[0] < 10)


def test_a_long_runs_tracking_keeps_evenly_spaced_steps_with_unchanged_values(demo, monkeypatch):
    """A run tracked at more than TRACKED_ROWS steps keeps that many, first and last included, each row equal to
    the full table's (Sim_K to the previous step still refers to the previous tracked step)."""
    from pathlib import Path

    from geometry.capture.trajectory import tracking_table
    from geometry.lab import study as study_mod
    from geometry.lab.regimes import TrainResult

    store = demo / "runs" / "opd" / "s0"
    res = TrainResult("opd", 0, Path(store), 10, 1e-6, 0.0, 0.0, 0, 0.0)
    monkeypatch.setattr(study_mod, "TRACKED_ROWS", 4)
    few = study_mod.tracking_at(res, 16)
    assert sorted(few.unique("step")) == [1, 4, 7, 10]
    full = {(r.step, r.matrix, r.metric): r.value for r in tracking_table(store, run="opd/s0")}
    got = {(r.step, r.matrix, r.metric): r.value for r in few}
    assert got.keys() == {k for k in full if k[0] in (1, 4, 7, 10)}
    assert all(got[k] == full[k] or (math.isnan(got[k]) and math.isnan(full[k])) for k in got)


def test_k_is_just_below_opds_stable_rank(demo):
    from geometry.lab.study import load_study

    bd = load_study(demo).boundaries
    assert bd.lock_k == max(1, min(16, math.ceil(bd.opd_stable_rank) - 1))
    assert f"K = {bd.lock_k}" in (demo / "report.md").read_text()


def test_a_finished_demo_reads_back_and_rerenders_the_same_report(demo, tmp_path):
    import shutil

    from geometry.lab.report import write_report
    from geometry.lab.study import load_study

    copy = tmp_path / "copy"
    shutil.copytree(demo, copy)
    (copy / "report.md").unlink()
    study = load_study(copy)
    assert {r.seed for r in study.runs["opd"]} == {0, 1} and study.config.lock_k == study.boundaries.lock_k
    write_report(study, rerender=True)
    assert (copy / "report.md").read_text() == (demo / "report.md").read_text()


@pytest.mark.parametrize("variant_gain", [0.15, 0.0])
def test_the_teaching_section_reads_each_gain_against_one_binomial_sd(demo, variant_gain):
    """Planted gains on the demo's own runs: OPD +0.2 points, the SFT-budget variant +15 (clear:
    above one sd, 5 points at 100 problems) or +0 (not)."""
    from geometry.lab.claims import views
    from geometry.lab.setting import teaching_lines
    from geometry.lab.study import load_study

    study = load_study(demo)
    jitter = [0.0, 0.002]  # two seeds, so each gain has an interval
    opd = [r._replace(acc_after=r.acc_before + 0.002 + j) for r, j in zip(study.runs["opd"], jitter, strict=True)]
    var = [r._replace(name="opd_sftlr", acc_after=r.acc_before + variant_gain + j)
           for r, j in zip(study.runs["opd"], jitter, strict=True)]
    V = views(study)
    V.all.update({f"opd_sftlr/s{r.seed}": V.all[f"opd/s{r.seed}"] for r in var})  # its update: OPD's, planted
    text = "\n".join(teaching_lines(study._replace(runs={**study.runs, "opd": opd, "opd_sftlr": var}), V.all))
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| opd")}
    assert "not clear" in rows["opd"] and "OPD's gain is not clear." in text
    if variant_gain:
        assert "| clear |" in rows["opd_sftlr"] and "the teacher teaches once OPD has SFT's update budget" in text
    else:
        assert "not clear" in rows["opd_sftlr"] and "not clear either." in text
    variant, sft, own = re.findall(r"(?:update is|SFT's|at its own) (\S+ \[\S+, \S+\])% bf16-sparse", text)
    assert variant == own != sft  # the variant's planted update is OPD's
