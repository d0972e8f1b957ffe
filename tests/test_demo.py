"""`geometry demo --quick` end to end: every run and seed trained and recorded, report and figures written."""

import math
import re

import pytest
from matplotlib.image import imread

from geometry.cli import main
from geometry.errors import GeometryError
from geometry.lab.report import PAPER_SPARSITY
from geometry.lab.stats import Interval, all_of, below, interval, no_harm
from geometry.lab.study import CONTROLS, MAIN, PROJECTED, data_dir
from geometry.table import Table


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    assert main(["demo", "--quick", "-o", str(out)]) == 0
    return out


def test_report_has_every_section_and_a_verdict_per_claim(demo):
    text = (demo / "report.md").read_text()
    for section in ("## Claims at this scale", "## Setup: differences from the paper", "## Learning rates",
                    "## Update sparsity (Table 1)", "## Localisation of the update mask",
                    "## Principal angles and spectral shift", "## Subspace locking", "## Are there boundaries",
                    "## Gradient projection"):
        assert section in text
    verdicts = re.findall(r"^- \*\*(reproduced|not reproduced|inconclusive)\*\*", text, flags=re.M)
    assert len(verdicts) == 11
    assert f"{100 * PAPER_SPARSITY['rlvr']:.2f}" in text  # the paper's RLVR sparsity stands beside ours


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


def test_intervals_and_verdicts():
    """Student-t 95% interval (t_0.975 with 2 degrees of freedom = 4.303); orderings decided only beyond it."""
    iv = interval([1.0, 2.0, 3.0])
    assert iv.mean == 2.0 and iv.hi - iv.mean == pytest.approx(4.302653 / 3**0.5) and iv.n == 3
    a, b, c = Interval(1, 0.9, 1.1, 3), Interval(2, 1.9, 2.1, 3), Interval(1.5, 0.5, 2.5, 3)
    assert below(a, b) is True and below(b, a) is False and below(a, c) is None
    assert below(a, Interval(2, float("nan"), float("nan"), 1)) is None  # one seed decides nothing
    assert all_of([True, True]) is True and all_of([True, None]) is None and all_of([None, False]) is False
    assert no_harm(Interval(1, -1, 3, 3)) is True and no_harm(Interval(2, 0.5, 3.5, 3)) is False
    assert no_harm(Interval(-2, -3, -1, 3)) is True and no_harm(Interval(1, 1, 1, 1)) is None


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
