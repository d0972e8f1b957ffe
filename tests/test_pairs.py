"""Runs compared with each other (docs/metrics.md item 10): planted answers and a plain numpy reference."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from geometry import kernels
from geometry.offline.analyze import Run, analyze
from geometry.offline.config import AnalysisConfig
from geometry.offline.matrices import select_matrices
from geometry.offline.outputs import PAIRS, load, write_analysis
from geometry.offline.pairs import Visit, pair_counts, visits
from geometry.offline.sources import open_source
from geometry.offline.stored import StoredMatrix


def reference(w0: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> dict[str, float]:
    """Item 10 for one matrix pair, plainly: masks from bf16 bit patterns, everything in float64."""
    def bits(w):
        return torch.from_numpy(w).to(torch.bfloat16).view(torch.int16).numpy()

    ma, mb = bits(w0) != bits(wa), bits(w0) != bits(wb)
    da, db = wa.astype(np.float64) - w0, wb.astype(np.float64) - w0
    both = ma & mb
    return {"pair_mask_jaccard": both.sum() / (ma | mb).sum(),
            "pair_mask_overlap_ratio": both.sum() / (ma.sum() * mb.sum() / w0.size),
            "pair_update_cosine": (da * db).sum() / (np.linalg.norm(da) * np.linalg.norm(db)),
            "pair_sign_agreement": (np.sign(da) == np.sign(db))[both].mean()}


def planted(m: int = 48, n: int = 64, seed: int = 0):
    """W0 on a 1/64 grid (every update below exact in float32) and two runs with planted masks and signs:
    M_a 1200 entries, M_b 1200, 400 shared, of which 300 moved the same way; entries scattered."""
    rng = np.random.default_rng(seed)
    w0 = (rng.integers(-256, 256, (m, n)) / 64).astype(np.float32)
    where = rng.permutation(m * n)
    da, db = np.zeros(m * n, np.float32), np.zeros(m * n, np.float32)
    da[where[:1200]] = 0.5
    db[where[800:1100]] = 0.5  # shared, same sign
    db[where[1100:2000]] = -0.5  # 100 shared with the opposite sign, 800 b's alone
    return w0, w0 + da.reshape(m, n), w0 + db.reshape(m, n)


# |M_a ∩ M_b| = 400 of |M_a ∪ M_b| = 2000; ratio 400 / (1200 * 1200 / 3072); signs 300 of 400;
# <D_a, D_b> = 0.25 (300 - 100), ||D_a|| ||D_b|| = 0.25 * 1200
PLANTED = {"pair_mask_jaccard": 0.2, "pair_mask_overlap_ratio": 400 * 3072 / 1200**2, "pair_sign_agreement": 0.75,
           "pair_update_cosine": 200 / 1200}


@pytest.fixture
def small_bands(monkeypatch):
    monkeypatch.setattr(kernels, "BLOCK_ROWS", 5)  # several bands, one ending short
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 1)


@pytest.mark.parametrize("wide", [False, True])
def test_planted_masks_signs_and_cosine(small_bands, wide):
    w0, wa, wb = planted()
    if wide:  # a wide matrix's bands are its columns
        w0, wa, wb = w0.T.copy(), wa.T.copy(), wb.T.copy()
    got = pair_counts(*(torch.from_numpy(w)[None] for w in (w0, wa, wb))).values()
    ref = reference(w0, wa, wb)
    for name, want in PLANTED.items():
        assert float(got[name][0]) == pytest.approx(want, rel=1e-14) == ref[name]


def test_counts_read_from_files_band_by_band_agree_with_the_reference(tmp_path, small_bands):
    # a batch of three matrices held whole, and each matrix left in its file (read a band at a time)
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal((3, 40, 24)).astype(np.float32)
    wa = w0 + (rng.random(w0.shape) < 0.4) * rng.standard_normal(w0.shape).astype(np.float32) * 1e-2
    wb = w0 + (rng.random(w0.shape) < 0.6) * (1e-2 * rng.standard_normal(w0.shape) + 0.5 * (wa - w0))
    wa, wb = wa.astype(np.float32), wb.astype(np.float32)
    got = pair_counts(*(torch.from_numpy(w) for w in (w0, wa, wb))).values()
    sources = []
    for name, w in (("w0", w0), ("wa", wa), ("wb", wb)):
        save_file({f"m{i}.weight": torch.from_numpy(w[i]) if i != 1 else torch.from_numpy(w[i].T.copy())
                   for i in range(3)}, str(tmp_path / f"{name}.safetensors"))
        sources.append(open_source(tmp_path / f"{name}.safetensors"))
    specs = select_matrices(sources[0], sources[1:]).matrices
    for i in range(3):
        spec = next(s for s in specs if s.name == f"m{i}.weight")
        stored = pair_counts(*(StoredMatrix(s, spec) for s in sources)).values()
        ref = reference(*(w[i] if i != 1 else w[i].T.copy() for w in (w0, wa, wb)))
        for name, want in ref.items():
            assert float(stored[name][0]) == pytest.approx(want, rel=1e-12)
            if i != 1:
                assert float(got[name][i]) == pytest.approx(want, rel=1e-12)


def test_visits_are_common_steps_then_the_final_ones():
    got = visits({"a": [10, 20, 30], "b": [10, 30], "c": [10, 20]})
    assert got == [Visit("a", "b", 10, 10, 10), Visit("a", "c", 10, 10, 10), Visit("b", "c", 10, 10, 10),
                   Visit("a", "c", 20, 20, 20), Visit("a", "b", 30, 30, 30),
                   Visit("a", "c", None, 30, 20), Visit("b", "c", None, 30, 20)]


def _orthonormal(rng, rows: int, cols: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((rows, cols)))[0]


def _write(path, tensors: dict[str, np.ndarray]):
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in tensors.items()},
              str(path / "model.safetensors"))


NAMES = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"]


@pytest.fixture
def subspace_runs(tmp_path):
    """Two runs of one base whose rank-4 updates share 3 left and 1 right of their 4 directions (Sim_K 3/4 and
    1/4 at K = 4), a third run of the same base, and a fourth run from another base (not compared)."""
    rng = np.random.default_rng(2)
    shapes = {NAMES[0]: (40, 32), NAMES[1]: (56, 32)}
    base = {k: rng.standard_normal(s) for k, s in shapes.items()}
    _write(tmp_path / "base", base)
    _write(tmp_path / "other", {k: w + 1 for k, w in base.items()})
    runs = {"a": {}, "b": {}, "c": {}}
    for k, (m, n) in shapes.items():
        U, V = _orthonormal(rng, m, 7), _orthonormal(rng, n, 7)
        s = np.diag([4.0, 3.0, 2.0, 1.0]) * 0.1
        runs["a"][k] = U[:, :4] @ s @ V[:, :4].T
        runs["b"][k] = U[:, [0, 1, 2, 4]] @ s @ V[:, [0, 5, 6, 4]].T
        runs["c"][k] = 1e-3 * rng.standard_normal((m, n))
    for label, updates in runs.items():
        for step, scale in ((10, 0.5), (20, 1.0)):
            _write(tmp_path / label / f"checkpoint-{step}", {k: base[k] + scale * d for k, d in updates.items()})
    _write(tmp_path / "d" / "checkpoint-20", {k: w + 1 + 1e-3 for k, w in base.items()})
    return tmp_path


def test_planted_shared_subspaces_and_the_outputs(subspace_runs, tmp_path):
    root = subspace_runs
    cfg = AnalysisConfig(lock_k=4, quick=True)
    runs = [Run(r, root / "base", [root / r]) for r in "abc"] + [Run("d", root / "other", [root / "d"])]
    a = analyze(runs, config=cfg)
    assert {(s.run_a, s.run_b) for s in a.pairs.summaries} == {("a", "b"), ("a", "c"), ("b", "c")}
    rows = {(r.run_a, r.run_b, r.step, r.matrix, r.metric): r.value for r in a.pairs.rows}
    for step in (10, 20):
        for name in NAMES:
            assert rows[("a", "b", step, name, "pair_sim_u")] == pytest.approx(0.75, abs=1e-7)
            assert rows[("a", "b", step, name, "pair_sim_v")] == pytest.approx(0.25, abs=1e-7)
    # every metric of every matrix and step against the numpy reference on the files as stored
    from safetensors.numpy import load_file

    def weights(path):
        return load_file(str(path / "model.safetensors"))

    w0 = weights(root / "base")
    for (ra, rb, step, name, metric), value in rows.items():
        if metric.startswith("pair_sim"):
            continue
        ref = reference(w0[name], weights(root / ra / f"checkpoint-{step}")[name],
                        weights(root / rb / f"checkpoint-{step}")[name])
        assert value == pytest.approx(ref[metric], rel=1e-12), (ra, rb, step, name, metric)
    # run level: masks pooled over every entry, cosine of all matrices as one vector and the mean over matrices
    ab = next(s for s in a.pairs.summaries if (s.run_a, s.run_b) == ("a", "c"))
    flat = [np.concatenate([weights(root / r / "checkpoint-20")[k].ravel() if r else w0[k].ravel() for k in NAMES])
            for r in ("", "a", "c")]
    pooled = reference(*flat)
    for name, want in pooled.items():
        assert ab.final(name) == pytest.approx(want, rel=1e-12)
    mean = np.mean([rows[("a", "c", 20, k, "pair_update_cosine")] for k in NAMES])
    assert ab.final("pair_update_cosine_mean") == pytest.approx(mean, rel=1e-12)
    assert ab.steps == [10, 20] and ab.final_steps == (20, 20)

    paths = write_analysis(a, tmp_path / "out", figures=True)
    assert tmp_path / "out" / PAIRS in paths
    assert "pairs_heatmap.png" in {p.name for p in (tmp_path / "out" / "figures").iterdir()}
    doc = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(d["run_a"], d["run_b"]) for d in doc["pairs"]] == [("a", "b"), ("a", "c"), ("b", "c")]
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "## Runs compared with each other" in md and md.index("## Runs compared") < md.index("## Notes")
    back = load(tmp_path / "out")
    assert back.pairs.rows == a.pairs.rows or all(
        x[:-1] == y[:-1] and (x.value == y.value or math.isnan(x.value) and math.isnan(y.value))
        for x, y in zip(back.pairs.rows, a.pairs.rows, strict=True))
    assert [s.to_json() for s in back.pairs.summaries] == doc["pairs"]


def test_final_steps_that_differ_are_compared_too(subspace_runs):
    root = subspace_runs
    a = analyze([Run("a", root / "base", [root / "a"]),
                 Run("b", root / "base", [root / "b" / "checkpoint-10"])], config=AnalysisConfig(lock_k=4, quick=True))
    (s,) = a.pairs.summaries
    assert s.steps == [10, None] and s.final_steps == (20, 10)
    finals = [r for r in a.pairs.rows if r.step is None and r.metric == "pair_sim_u"]
    assert len(finals) == len(NAMES) and all(r.value == pytest.approx(0.75, abs=1e-7) for r in finals)


def test_one_run_writes_no_pairs(subspace_runs, tmp_path):
    a = analyze([Run("a", subspace_runs / "base", [subspace_runs / "a"])], config=AnalysisConfig(quick=True))
    assert len(a.pairs) == 0
    write_analysis(a, tmp_path / "out")
    assert not (tmp_path / "out" / PAIRS).exists()
    assert "pairs" not in json.loads((tmp_path / "out" / "summary.json").read_text())


def test_compare_is_the_short_form_of_analyze(subspace_runs, tmp_path, capsys):
    from geometry.cli import main, path_labels

    root = subspace_runs
    code = main(["compare", str(root / "base"), str(root / "a"), str(root / "b" / "checkpoint-20"), "--quick",
                 "--lock-k", "4", "--no-figures", "--no-progress", "-o", str(tmp_path / "cmp")])
    assert code == 0, capsys.readouterr().err
    back = load(tmp_path / "cmp")
    assert back.unique("run") == ["a", "checkpoint-20"]
    (s,) = back.pairs.summaries
    assert (s.run_a, s.run_b, s.steps, s.final_steps) == ("a", "checkpoint-20", [20], (20, 20))
    assert s.final("pair_sim_u") == pytest.approx(0.75, abs=1e-7)
    assert path_labels(["runs/sft/checkpoint-9", "runs/rlvr/checkpoint-9", "x/model.safetensors"]) == [
        "sft/checkpoint-9", "rlvr/checkpoint-9", "x/model"]
    assert main(["compare", str(root / "base"), str(root / "a")]) == 2  # one run: nothing to compare
    assert "at least two runs" in capsys.readouterr().err


def test_every_pair_metric_is_defined_in_docs():
    import re
    from pathlib import Path

    from geometry.offline.pairs import RUN_METRICS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    assert set(RUN_METRICS) <= set(re.findall(r"`([a-z0-9_]+)`", doc))


def test_checkpoints_read_a_few_at_a_time_give_the_same_rows(subspace_runs, monkeypatch):
    import geometry.offline.analyze as A

    runs = [Run(r, subspace_runs / "base", [subspace_runs / r]) for r in "abc"]
    cfg = AnalysisConfig(lock_k=4, quick=True)
    reads = []
    real = A.stored_group
    monkeypatch.setattr(A, "stored_group", lambda *a: reads.append(a[0]) or real(*a))
    together = analyze(runs, config=cfg)
    n_together = len(reads)
    monkeypatch.setattr(A, "group_mb", lambda *a, **k: 1e-6)  # room for one checkpoint: two read at a time
    apart = analyze(runs, config=cfg)
    assert [(*r[:-1], repr(r.value)) for r in apart.pairs.rows] == [(*r[:-1], repr(r.value))
                                                                     for r in together.pairs.rows]
    # 2 groups x 2 steps: the 3 checkpoints read once together, or each pair's two (6 reads) apart
    assert len(reads) - 2 * n_together == 2 * 2 * (6 - 3)


def test_every_pair_of_several_updates_at_once(small_bands):
    # four updates read together: each pair as the reference gives it, an entry moved from +0 to -0 (changed bits,
    # zero update) by two of them included
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal((2, 30, 20)).astype(np.float32)
    w0[:, 0, 0] = 0.0
    ws = []
    for i in range(4):
        w = w0 + (rng.random(w0.shape) < 0.2 + 0.2 * i) * rng.standard_normal(w0.shape).astype(np.float32)
        if i < 2:
            w[:, 0, 0] = -0.0
        ws.append(w.astype(np.float32))
    from geometry.offline.pairs import pair_grams

    grams = pair_grams(torch.from_numpy(w0), [torch.from_numpy(w) for w in ws])
    for i in range(4):
        for j in range(i + 1, 4):
            got = grams.pair(i, j).values()
            for k in range(2):
                ref = reference(w0[k], ws[i][k], ws[j][k])
                for name, want in ref.items():
                    assert float(got[name][k]) == pytest.approx(want, rel=1e-12), (i, j, k, name)


def test_torchrun_gives_the_pairs_of_one_process(subspace_runs, tmp_path):
    # the groups split across two ranks: each rank's pairs travel to rank 0 with its rows
    import os
    import subprocess
    import sys

    from geometry.cli import main

    root = subspace_runs
    args = ["compare", str(root / "base"), str(root / "a"), str(root / "b"), "--quick", "--lock-k", "4",
            "--no-figures", "--no-progress"]
    assert main([*args, "-o", str(tmp_path / "single")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "geometry", *args, "-o", str(tmp_path / "multi")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "2 ranks" in res.stderr
    for name in (PAIRS, "summary.json"):
        assert (tmp_path / "multi" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
