"""Run-level aggregation follows SPEC: weighted sparsity, pooled mask overlap, median onset or 'none'."""

import dataclasses
import json
import math

import pytest

from geometry.offline.markdown import render_summary
from geometry.offline.summary import onset_rows, summarize, summary_json
from geometry.table import Row, Table


def _rows(run, step, matrix, **values):
    return [Row(run, step, matrix, 0, "up_proj", m, float(v)) for m, v in values.items()]


def test_sparsity_is_parameter_weighted_and_mask_overlap_pooled():
    rows = _rows("r", 1, "a", n_params=100, sparsity_bf16=0.9, mask_overlap_lowmag=1.0, nss=1.0, sim_final_v=1)
    rows += _rows("r", 1, "b", n_params=300, sparsity_bf16=0.5, mask_overlap_lowmag=0.0, nss=3.0, sim_final_v=1)
    (s,) = summarize(Table(rows))
    assert s.final("sparsity_bf16") == pytest.approx((0.9 * 100 + 0.5 * 300) / 400)
    # changed entries: a 10, b 150 -> pooled overlap 10 / 160
    assert s.final("mask_overlap_lowmag") == pytest.approx(10 / 160)
    assert s.final("nss") == pytest.approx(2.0)  # unweighted mean


def test_sparsity_ladders_are_parameter_weighted_and_concentration_averaged():
    # docs/metrics.md item 11: every sparsity rung weighted by n_params; energies and signal rank plain means
    ladder = {"sparsity_abs_1e-8": (0.2, 0.6), "sparsity_rel_1e-2": (0.9, 0.1)}
    others = {"energy_top_1pct": (0.3, 0.5), "sv_energy_top_4": (0.8, 0.4), "signal_rank": (3, 6),
              "signal_energy_interval": (0.5, 0.7)}
    rows = []
    for i, (matrix, n) in enumerate((("a", 100), ("b", 300))):
        rows += _rows("r", 1, matrix, n_params=n, sim_final_v=1, **{k: v[i] for k, v in {**ladder, **others}.items()})
    (s,) = summarize(Table(rows))
    for name, (a, b) in ladder.items():
        assert s.final(name) == pytest.approx((a * 100 + b * 300) / 400), name
    for name, (a, b) in others.items():
        assert s.final(name) == pytest.approx((a + b) / 2), name


def _trajectory(run, matrix, sims):
    out = []
    for step, sim in zip((10, 20, 30, 40), sims, strict=True):
        out += _rows(run, step, matrix, n_params=1, sparsity_bf16=0.5, sim_final_v=sim)
    return out


def test_onset_median_and_fraction():
    rows = _trajectory("r", "a", [0.95, 0.95, 0.95, 1.0])  # locks at 10
    rows += _trajectory("r", "b", [0.2, 0.95, 0.99, 1.0])  # locks at 20
    rows += _trajectory("r", "c", [0.2, 0.5, 0.5, 1.0])  # never
    (s,) = summarize(Table(rows))
    assert s.onsets == {"a": 10, "b": 20, "c": None}
    assert (s.locking_onset_step, s.locking_onset_frac) == (20, 0.5)
    per_matrix = {(r.matrix, r.metric): r.value for r in onset_rows(Table(rows))}
    assert per_matrix[("a", "locking_onset_frac")] == 0.25
    assert math.isnan(per_matrix[("c", "locking_onset_step")])


def test_a_run_that_never_locks_says_none():
    rows = _trajectory("r", "a", [0.2, 0.5, 0.5, 1.0]) + _trajectory("r", "b", [0.95, 0.95, 0.5, 1.0])
    (s,) = summarize(Table(rows))
    assert s.locking_onset_step is None
    doc = json.loads(summary_json([s], []))
    assert doc["runs"]["r"]["locking_onset_step"] == "none"
    assert "| r | none | none | 0/2 | none | none | 0/0 |" in render_summary([s], [], 0.9)


def test_attention_onset_is_the_median_over_q_k_v_o_only():
    """Attention matrices lock at step 2, MLP matrices never: the all-matrix median (4 of 6 never lock) says
    none, the attention view says 2 (SPEC 7: the paper's trajectories cover q/k/v/o)."""
    rows = []
    mats = [("model.layers.0.self_attn.q_proj.weight", "q_proj"), ("model.layers.0.self_attn.v_proj.weight", "v_proj"),
            *[(f"model.layers.{i}.mlp.{m}.weight", m) for i in (0, 1) for m in ("up_proj", "down_proj")]]
    for step, att, mlp in ((1, 0.2, 0.2), (2, 0.95, 0.3), (3, 0.97, 0.5), (4, 1.0, 1.0)):
        for name, module in mats:
            rows.append(Row("r", step, name, 0, module, "sim_final_v", att if module.endswith("_proj") and
                            module[0] in "qkvo" else mlp))
    s = summarize(Table(rows))[0]
    assert s.locking_onset_step is None and s.attention == [mats[0][0], mats[1][0]]
    assert (s.attention_onset_step, s.attention_onset_frac) == (2, 0.5)
    assert s.to_json()["locking_onset_attention"] == {"matrices": 2, "step": 2, "frac": 0.5}


def test_load_gives_back_what_write_analysis_wrote(tmp_path):
    """write -> load -> write: the same tables, summaries and curves (the onset rows are derived anew)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    import geometry
    from geometry.offline.outputs import write_analysis

    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "o_proj")]
    base = {n: torch.randn(16, 16, generator=g) for n in names}
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    for step in (2, 4):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir(parents=True)
        save_file({n: w + 1e-2 * step * torch.randn(16, 16, generator=g) for n, w in base.items()},
                  str(tmp_path / "run" / f"checkpoint-{step}" / "model.safetensors"))
    cfg = geometry.AnalysisConfig(lock_k=2, alpha=0.25, device="cpu")
    first = geometry.analyze(tmp_path / "base", [tmp_path / "run"], label="sft", config=cfg)
    write_analysis(first, tmp_path / "a")
    again = geometry.load(tmp_path / "a")
    def key(rows):  # NaN != NaN: compare NaN values as equal
        return [(*r[:-1], "nan" if math.isnan(r.value) else r.value) for r in rows]

    assert key(again.rows) == key(first.rows) and again.notes == first.notes
    assert dataclasses.replace(again.config, device="cpu") == cfg  # the device is chosen anew where it is loaded
    assert [r.label for r in again.runs] == ["sft"]
    write_analysis(again, tmp_path / "b")
    for name in ("metrics.csv", "summary.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in "ab")
    assert a["config"].pop("device") == "cpu" and b["config"].pop("device") == "auto" and a == b
    with np.load(tmp_path / "a" / "curves.npz") as a, np.load(tmp_path / "b" / "curves.npz") as b:
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
    with pytest.raises(geometry.GeometryError, match="no metrics.csv"):
        geometry.load(tmp_path)


def test_reading_ties_each_phrase_to_its_value_and_threshold():
    from geometry.offline.reading import reading
    from geometry.offline.summary import RunSummary

    def run(name, sp, ratio, low, angle, rank, frac):
        per_step = {"sparsity_bf16": [sp], "overlap_2s_ratio": [ratio], "mask_overlap_lowmag_ratio": [low],
                    "angle_max_u": [angle], "stable_rank": [rank]}
        return RunSummary(name, [10], 4, per_step, {}, None if frac is None else 10 * frac, frac, [], None, None)

    rules, blank, rlvr, sft = reading([run("rlvr", 0.8, 0.5, 1.6, 0.2, 3.0, 0.2),
                                       run("sft", 0.05, 1.4, 0.9, 14.0, 40.0, None)], 16)
    assert "sparse when >= 50%" in rules and "dense below 20%" in rules and "K = 16" in rules and blank == ""
    assert rlvr.startswith("- **rlvr**: sparse at bf16 (80.0% unchanged); off W0's")
    assert "off W0's principal directions (0.50x random)" in rlvr
    assert "in low-magnitude entries beyond chance (1.60x)" in rlvr and "barely rotates" in rlvr
    assert "low update rank (stable rank 3)" in rlvr and "locks early (onset at 20%" in rlvr
    assert "dense at bf16 (5.0% unchanged); toward W0's" in sft
    assert "rotates the top-k" in sft and "high update rank" in sft and "does not lock" in sft
    assert "partly sparse at bf16 (45.0% unchanged)" in reading([run("x", 0.45, 1, 1, 1, 1, 0.5)], 16)[2]
    text = "\n".join(reading([run("rlvr", 0.8, 0.5, 1.6, 0.2, 3.0, 0.2)], 16))
    assert "paper" not in text and "closest" not in text and "resembl" not in text  # no regime labels


def test_where_by_index_gives_the_rows_a_plain_scan_gives_in_order():
    """Table.where answers from per-column-set indexes; a plain filter over the rows is the reference."""
    import random

    rng = random.Random(0)
    t = Table(Row(rng.choice("abc"), rng.randrange(4), rng.choice("mn"), rng.choice([0, 1, None]),
                  rng.choice(["q_proj", "k_proj", "v_proj"]), rng.choice(["x", "y"]), rng.random())
              for _ in range(500))

    def scan(**eq):
        return [r for r in t if all(getattr(r, c) in (v if isinstance(v, (list, tuple, set)) else [v])
                                    for c, v in eq.items())]

    queries = [dict(run="a"), dict(run="a", metric="y"), dict(module=["v_proj", "q_proj"], run="b"),
               dict(step=(3, 1, 3), layer=None), dict(metric={"x"}, module="k_proj", matrix="n"), dict(run="z"),
               dict(run=[]), dict(run="a")]  # the last asks an index already built
    for q in queries:
        assert t.where(**q).rows == scan(**q), q
    assert t.where().rows == t.rows
