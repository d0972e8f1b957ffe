"""`geometry analyze` end to end on real safetensors files: outputs, several runs, and bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from geometry.cli import main
from geometry.offline import analyze as A
from geometry.offline.outputs import FILES, REPORT
from geometry.table import Table

NAMES = [f"model.layers.{i}.mlp.{m}.weight" for i in range(2) for m in ("up_proj", "down_proj")]


def _model(seed: int, shape=(24, 16)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(*(shape if "up" in n else shape[::-1]), generator=g) for n in NAMES}


def _save(tensors, path):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    return path


@pytest.fixture
def run(tmp_path):
    base = _model(0)
    _save(base, tmp_path / "base")
    g = torch.Generator().manual_seed(1)
    for step in (10, 20, 30):
        _save({n: w + 1e-2 * step / 30 * torch.randn(w.shape, generator=g) for n, w in base.items()},
              tmp_path / "run" / f"checkpoint-{step}")
    return tmp_path


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_analyze_writes_every_output(run, capsys):
    code, out, _ = _cli(capsys, "analyze", run / "base", run / "run", "-o", run / "out", "--no-progress")
    assert code == 0
    assert sorted(p.name for p in (run / "out").iterdir()) == sorted(FILES + REPORT)
    table = Table.from_csv(run / "out" / "metrics.csv")
    assert table.unique("step") == [10, 20, 30]
    assert set(table.unique("matrix")) == set(NAMES)
    assert {"sparsity_bf16", "nss", "sim_final_v", "locking_onset_step"} <= set(table.unique("metric"))
    summary = json.loads((run / "out" / "summary.json").read_text())
    assert summary["runs"]["run"]["steps"] == [10, 20, 30]
    md = (run / "out" / "summary.md").read_text()
    assert "Table 1 layout" in md and "Subspace locking" in md


def test_quick_analysis_reports_the_update_alone(run, capsys):
    code, _, _ = _cli(capsys, "analyze", run / "base", run / "run", "-o", run / "full", "--no-progress")
    code_q, _, _ = _cli(capsys, "analyze", run / "base", run / "run", "-o", run / "quick", "--quick", "--html",
                        "--no-progress")
    assert code == code_q == 0
    full, quick = (Table.from_csv(run / d / "metrics.csv") for d in ("full", "quick"))
    metrics = set(quick.unique("metric"))
    assert {"sparsity_bf16", "stable_rank", "rel_norm", "sim_final_v", "locking_onset_step"} <= metrics
    assert not metrics & {"nss", "angle_max_u", "overlap_2s", "mask_overlap_principal", "intruders"}
    got = {(r.step, r.matrix, r.metric): r.value for r in quick}
    same = [r for r in full if r.metric in metrics]
    assert len(same) == len(got) and all(got[(r.step, r.matrix, r.metric)] == r.value or r.value != r.value
                                         for r in same)  # the same numbers as the full suite's (NaN: NaN)
    md = (run / "quick" / "summary.md").read_text()
    assert "Rank of the cumulative update" in md and "Principal angles" not in md and "Localisation" not in md
    assert "quick suite" in md  # the notes say what was left out
    figures = {p.name for p in (run / "quick" / "figures").iterdir()}
    assert "angles_spectra.png" not in figures and {"sparsity_localisation.png", "locking.png"} <= figures


def test_several_runs_each_with_its_own_base(run, capsys):
    # the second run starts from the first run's final checkpoint, as OPD/RLVR start from an SFT anchor
    anchor = run / "run" / "checkpoint-30"
    _save({n: w * 1.001 for n, w in _model(0).items()}, run / "run2" / "checkpoint-5")
    code, _, _ = _cli(capsys, "analyze", "--run", "sft", run / "base", run / "run",
                      "--run", "opd", anchor, run / "run2", "-o", run / "out", "--no-progress")
    assert code == 0
    table = Table.from_csv(run / "out" / "metrics.csv")
    assert table.unique("run") == ["sft", "opd"]
    assert table.where(run="opd").unique("step") == [5]


def test_runs_of_one_base_share_its_decomposition(run, monkeypatch):
    # SFT and RLVR from one pretrained base, OPD from the SFT anchor between them in the list: the base's
    # groups are decomposed once for both of its runs, and each run gets the rows, curves and notes it gets
    # alone, in the order the runs were given
    _save({n: w * 1.001 for n, w in _model(0).items()}, run / "run2" / "checkpoint-5")
    # RLVR's base a copy, as each run's recorder stores its own: the same bytes under another name and header
    (run / "copy").mkdir()
    save_file(_model(0), str(run / "copy" / "base.safetensors"), metadata={"run": "rlvr"})
    runs = [A.Run("sft", run / "base", [run / "run"]), A.Run("opd", run / "run" / "checkpoint-30", [run / "run2"]),
            A.Run("rlvr", run / "copy" / "base.safetensors", [run / "run2"])]
    calls = []
    real = A.decompose_base
    monkeypatch.setattr(A, "decompose_base", lambda *a, **k: calls.append(1) or real(*a, **k))
    together = A.analyze(runs)
    shared = len(calls)
    alone = [A.analyze([r]) for r in runs]
    assert shared * 3 == (len(calls) - shared) * 2  # two bases decomposed where one a run took three
    assert together.unique("run") == ["sft", "opd", "rlvr"]

    def rows(a):
        return [(*r[:-1], repr(r.value)) for r in a.rows]  # repr: NaN equal to NaN, every bit compared

    assert rows(together) == [row for a in alone for row in rows(a)]
    curves = [c for a in alone for c in a.curves]
    assert [c[:-1] for c in together.curves] == [c[:-1] for c in curves]
    assert all(np.array_equal(c.values, d.values, equal_nan=True) for c, d in zip(together.curves, curves, strict=True))
    sharing = [n for n in together.notes if "one base decomposition" in n]
    assert sharing == ["sft, rlvr: one base decomposition for these runs, whose bases hold the same matrices "
                       "bit for bit"]
    assert [n for n in together.notes if n not in sharing] == [n for a in alone for n in a.notes]
    assert together.labels == {k: v for a in alone for k, v in a.labels.items()}


def test_runs_of_bases_one_entry_apart_are_measured_apart(run, monkeypatch):
    other = _model(0)
    other[NAMES[-1]][-1, -1] += 1e-3  # the last entry of the last matrix: read last when the bases are compared
    _save(other, run / "other")
    calls = []
    real = A.decompose_base
    monkeypatch.setattr(A, "decompose_base", lambda *a, **k: calls.append(1) or real(*a, **k))
    two = A.analyze([A.Run("a", run / "base", [run / "run"]), A.Run("b", run / "other", [run / "run"])])
    assert len(calls) == 4  # two groups (up_proj, down_proj), each base decomposed on its own
    a, b = (two.where(run=r, metric="nss") for r in ("a", "b"))
    assert [r.value for r in a] != [r.value for r in b]


def _expect_error(capsys, run, *argv, match: str):
    out_dir = run / "out-bad"
    code, _, err = _cli(capsys, "analyze", *argv, "-o", out_dir, "--no-progress")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("geometry: error:"), err
    assert match in lines[0], lines[0]
    assert not out_dir.exists(), "a failed analysis must leave no output behind"


def test_missing_file(run, capsys):
    _expect_error(capsys, run, run / "base", run / "nope", match="nope")


def test_truncated_checkpoint(run, capsys):
    f = run / "run" / "checkpoint-20" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _expect_error(capsys, run, run / "base", run / "run", match="checkpoint-20")


def test_shape_mismatch_is_an_error_or_a_listed_skip(run, capsys):
    bad = _model(0)
    bad[NAMES[0]] = torch.zeros(5, 5)
    _save(bad, run / "run" / "checkpoint-40")
    _expect_error(capsys, run, run / "base", run / "run", match="shape")
    code, _, err = _cli(capsys, "analyze", run / "base", run / "run", "--skip-mismatch", "-o", run / "o",
                        "--no-progress")
    assert code == 0 and NAMES[0] in err
    assert NAMES[0] not in Table.from_csv(run / "o" / "metrics.csv").unique("matrix")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(run, capsys, value):
    bad = _model(0)
    bad[NAMES[1]][3, 2] = value
    _save(bad, run / "run" / "checkpoint-40")
    _expect_error(capsys, run, run / "base", run / "run", match="NaN/Inf")


def test_empty_dir(run, capsys):
    (run / "empty").mkdir()
    _expect_error(capsys, run, run / "base", run / "empty", match="empty")


def test_non_matrix_tensor_asked_for(run, capsys):
    tensors = _model(0) | {"model.norm.weight": torch.ones(16)}
    _save(tensors, run / "b2")
    _save(tensors, run / "c2" / "checkpoint-1")
    _expect_error(capsys, run, run / "b2", run / "c2", "--include", r"model\.norm", match="not a matrix")


def test_unknown_option_and_bad_values(run, capsys):
    _expect_error(capsys, run, run / "base", run / "run", "--frobnicate", match="unrecognized")
    _expect_error(capsys, run, run / "base", run / "run", "--tau", "2", match="tau")
    _expect_error(capsys, run, run / "base", run / "run", "--include", "(", match="regex")


def test_pickle_refused_without_opt_in(run, capsys):
    (run / "pkl").mkdir()
    torch.save(_model(0), run / "pkl" / "pytorch_model.bin")
    _expect_error(capsys, run, run / "base", run / "pkl", match="pickle")


def test_real_process_exit_code_and_no_traceback(run):
    proc = subprocess.run([sys.executable, "-m", "geometry", "analyze", str(run / "base"), str(run / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
