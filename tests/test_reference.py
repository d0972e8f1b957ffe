"""`geometry demo --reference --quick`: the reference study's pipeline end to end, at a 25th of its step counts.

SFT from the less-trained base, then OPD and RLVR from each seed's SFT checkpoint; the full study's report is
committed under docs/study/ (tests/test_docs.py checks the README links it).
"""

import re

import pytest
import torch

from geometry.capture.store import check_store, read_snapshot
from geometry.cli import main
from geometry.lab.regimes import load_student
from geometry.lab.study import REFERENCE_QUICK, REFERENCE_STEPS, data_dir, load_study
from geometry.table import Table


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "report"
    assert main(["demo", "--reference", "--quick", "--no-progress", "-o", str(out)]) == 0
    return out


def test_each_regime_runs_the_papers_step_count_scaled(ref):
    study = load_study(ref)
    want = {n: round(s / REFERENCE_QUICK) for n, s in REFERENCE_STEPS.items()}
    want |= {"sft_proj": want["sft"], "opd_proj": want["opd"]}
    assert {n: {r.steps for r in rs} for n, rs in study.runs.items()} == {n: {s} for n, s in want.items()}
    assert want["rlvr"] / want["opd"] == pytest.approx(1023 / 299, rel=0.05)  # RLVR ~3.4x OPD
    snapshots = Table.from_csv(ref / "analysis" / "metrics.csv")
    assert len(snapshots.where(run="sft/s0").unique("step")) >= 10  # >= 10 snapshots where steps allow


def test_opd_and_rlvr_start_from_their_seeds_sft_checkpoint(ref):
    """Each seed's OPD, RLVR and projected OPD start from that seed's SFT model, saved and rounded to bf16: their
    stores' base equals the SFT store's final bf16 snapshot bit for bit; SFT starts from the bf16 base."""
    base = load_student(data_dir() / "base").state_dict()
    for seed in (0, 1):
        sft = ref / "runs" / "sft" / f"s{seed}"
        final = read_snapshot(sft, check_store(sft).steps[-1])
        assert all(torch.equal(t.float(), base[n]) for n, t in read_snapshot(sft, None).items())
        for name in ("opd", "rlvr", "opd_proj"):
            start = read_snapshot(ref / "runs" / name / f"s{seed}", None)
            assert start.keys() == final.keys()
            assert all(torch.equal(start[n], final[n]) for n in start)
    other = read_snapshot(ref / "runs" / "opd" / "s1", None)
    assert any(not torch.equal(other[n], t) for n, t in read_snapshot(ref / "runs" / "opd" / "s0", None).items())


def test_the_report_reads_as_the_reference_study(ref):
    text = (ref / "report.md").read_text()
    assert text.startswith("# geometry reference study")
    verdicts = re.findall(r"^- \*\*(?:reproduced|contradicted|partly|inconclusive)\*\* \(claim (\d+)\)", text,
                          flags=re.M)
    assert [int(i) for i in verdicts] == list(range(1, 10))  # no controls claim: the controls are not run
    assert "Not run in this study, so not decided: the paper's controls" in text
    assert "W0 = the less-trained base" in text and "W0 = seed 0's SFT checkpoint" in text
    assert "OPD and RLVR from each seed's SFT checkpoint" in text


def test_steps_do_not_apply_to_the_reference_study(capsys, tmp_path):
    assert main(["demo", "--reference", "--steps", "5", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--steps does not apply" in err and "Traceback" not in err
