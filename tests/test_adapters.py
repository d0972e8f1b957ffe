"""PEFT LoRA adapter checkpoints (geometry.offline.adapters): planted factors with known spectra, peft's
scaling (alpha / r, rsLoRA alpha / sqrt(r)), base names in the rows, the same numbers as the merged
weights, and DoRA / other adapter types refused in one line."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from geometry import AnalysisConfig, analyze
from geometry.errors import GeometryError

SHAPES = {"q_proj": (48, 64), "v_proj": (16, 64), "o_proj": (64, 48)}
ADAPTED = ("q_proj", "v_proj")
R = 4


def _name(layer, module):
    return f"model.layers.{layer}.self_attn.{module}.weight"


def _orthonormal(g, m, k):
    return torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q


def _base(root, g):
    base = {_name(i, m): torch.randn(*s, generator=g) / 8 for i in range(2) for m, s in SHAPES.items()}
    (root / "base").mkdir()
    save_file(base, str(root / "base" / "model.safetensors"))
    (root / "base" / "config.json").write_text(json.dumps({"hidden_size": 64, "model_type": "llama"}))
    return base


def _adapter(d, g, sing, *, alpha=8, rslora=False, extra=None):
    """B = U diag(sing), A = V^T with orthonormal U, V: scale * B A has singular values scale * sing."""
    d.mkdir(parents=True)
    tensors, factors = {}, {}
    for i in range(2):
        for m in ADAPTED:
            rows, cols = SHAPES[m]
            U, V = _orthonormal(g, rows, R), _orthonormal(g, cols, R)
            key = f"base_model.model.model.layers.{i}.self_attn.{m}"
            tensors[f"{key}.lora_A.weight"] = V.T.float().contiguous()  # (r, n)
            tensors[f"{key}.lora_B.weight"] = (U * torch.tensor(sing, dtype=torch.float64)).float().contiguous()
            factors[_name(i, m)] = (tensors[f"{key}.lora_B.weight"].double(), tensors[f"{key}.lora_A.weight"].double())
    save_file(tensors, str(d / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": R, "lora_alpha": alpha, "use_rslora": rslora, "target_modules": list(ADAPTED),
           **(extra or {})}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return factors


@pytest.mark.parametrize("rslora", [False, True])
def test_planted_adapters_measure_scale_times_B_A(tmp_path, rslora):
    g = torch.Generator().manual_seed(0)
    base = _base(tmp_path, g)
    sings = {10: [4e-2, 2e-2, 1e-2, 5e-3], 20: [8e-2, 3e-2, 1e-2, 1e-3]}
    facts = {step: _adapter(tmp_path / "run" / f"checkpoint-{step}", g, s, alpha=16, rslora=rslora)
             for step, s in sings.items()}
    scale = 16 / math.sqrt(R) if rslora else 16 / R
    res = analyze(str(tmp_path / "base"), [str(tmp_path / "run")], config=AnalysisConfig(device="cpu", lock_k=2))
    matrices = {r.matrix for r in res}
    assert matrices == {_name(i, m) for i in range(2) for m in ADAPTED}  # the base's names; o_proj not adapted
    assert any("LoRA adapter checkpoints: measuring the 4 adapted matrices of 6" in n for n in res.notes)
    for step, planted in sings.items():
        for name in matrices:
            got = {r.metric: r.value for r in res.where(step=step, matrix=name)}
            B, A = facts[step][name]
            D = scale * B @ A  # from the stored float32 factors, in float64
            s = np.linalg.svd(D.numpy(), compute_uv=False)[:R]
            np.testing.assert_allclose(s, scale * np.array(planted), rtol=1e-6)  # the planted spectrum
            assert got["fro_norm"] == pytest.approx(np.linalg.norm(s), rel=1e-10)
            assert got["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-8)
            assert got["r99"] == np.searchsorted(np.cumsum(s**2) / (s**2).sum(), 0.99 - 1e-12) + 1
            # the overlap of the update with W0's top-k directions
            U0, _, V0h = np.linalg.svd(base[name].double().numpy())
            k = AnalysisConfig().principal_size(D.shape, 64)
            want = np.sum((U0[:, :k].T @ D.numpy() @ V0h[:k].T) ** 2) / np.sum(D.numpy() ** 2)
            assert got["overlap_2s"] == pytest.approx(want, rel=1e-7)


def test_adapter_and_merged_runs_line_up(tmp_path):
    g = torch.Generator().manual_seed(1)
    base = _base(tmp_path, g)
    facts = _adapter(tmp_path / "lora" / "checkpoint-5", g, [5e-2, 3e-2, 2e-2, 1e-2])
    merged = {k: (W.double() + (facts[k][0] * 2) @ facts[k][1]).float() if k in facts else W  # scale 8 / 4
              for k, W in base.items()}
    (tmp_path / "merged" / "checkpoint-5").mkdir(parents=True)
    save_file(merged, str(tmp_path / "merged" / "checkpoint-5" / "model.safetensors"))
    cfg = AnalysisConfig(device="cpu", lock_k=2, include=("q_proj", "v_proj"))
    a = analyze(str(tmp_path / "base"), [str(tmp_path / "lora")], config=cfg)
    b = analyze(str(tmp_path / "base"), [str(tmp_path / "merged")], config=cfg)
    key = {(r.matrix, r.metric): r.value for r in b}
    assert {(r.matrix, r.metric) for r in a} == set(key)
    for r in a:
        if r.metric in ("fro_norm", "stable_rank", "nss", "overlap_2s", "angle_max_u", "mask_overlap_principal"):
            # the merged file holds W0 + D rounded to float32: agreement to that rounding
            assert r.value == pytest.approx(key[(r.matrix, r.metric)], rel=2e-3, abs=1e-9), r


@pytest.mark.parametrize("extra, message", [({"use_dora": True}, "DoRA adapters are not supported"),
                                            ({"peft_type": "IA3"}, "adapter type IA3 is not supported")])
def test_dora_and_other_adapter_types_are_refused_in_one_line(tmp_path, extra, message):
    g = torch.Generator().manual_seed(2)
    _base(tmp_path, g)
    _adapter(tmp_path / "run" / "checkpoint-1", g, [1e-2] * R, extra=extra)
    with pytest.raises(GeometryError, match=message) as err:
        analyze(str(tmp_path / "base"), [str(tmp_path / "run")], config=AnalysisConfig(device="cpu"))
    assert "\n" not in str(err.value)
