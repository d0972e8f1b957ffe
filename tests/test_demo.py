"""`geometry demo --quick` end to end: every run trained and recorded, report and figures written."""

import re

import pytest
from matplotlib.image import imread

from geometry.cli import main
from geometry.lab.study import CONTROLS, MAIN, PROJECTED
from geometry.table import Table


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    assert main(["demo", "--quick", "-o", str(out)]) == 0
    return out


def test_report_has_every_section_and_a_verdict_per_claim(demo):
    text = (demo / "report.md").read_text()
    for section in ("## Claims at this scale", "## Update sparsity (Table 1)", "## Localisation of the update mask",
                    "## Principal angles and spectral shift", "## Subspace locking", "## Gradient projection"):
        assert section in text
    verdicts = re.findall(r"^- \*\*(reproduced|not reproduced|undecided)\*\*", text, flags=re.M)
    assert len(verdicts) == 11
    assert "77.20" in text  # the paper's RLVR sparsity stands beside ours


def test_every_run_is_analyzed_and_tracked(demo):
    runs = set(MAIN) | set(CONTROLS) | set(PROJECTED)
    snapshots = Table.from_csv(demo / "analysis" / "metrics.csv")
    tracking = Table.from_csv(demo / "analysis" / "tracking.csv")
    assert set(snapshots.unique("run")) == runs == set(tracking.unique("run"))
    assert len(snapshots.where(run="sft").unique("step")) == 5  # snapshots at 20%, 40%, ... 100%
    assert sorted(tracking.where(run="opd").unique("step")) == list(range(1, 11))  # every step


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
