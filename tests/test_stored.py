"""geometry.offline.stored: a matrix left in its file gives the bands, passes and tables of the tensor read whole,
bit for bit; bad values and files met band by band give the lines a whole read gives."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from geometry import kernels
from geometry.errors import GeometryError
from geometry.offline import engine, files
from geometry.offline.analyze import analyze
from geometry.offline.blocked import BlockedUpdate
from geometry.offline.config import AnalysisConfig
from geometry.offline.matrices import MatrixSpec
from geometry.offline.sources import open_source
from geometry.offline.stored import StoredMatrix

SHAPES = {"tall": (45, 16), "wide": (12, 50), "square": (20, 20)}


@pytest.fixture
def small_bands(monkeypatch):
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 0)
    monkeypatch.setattr(kernels, "BLOCK_ROWS", 7)  # bands of 7 rows of the long side, the last one short
    monkeypatch.setattr(files, "ROWS_A_READ", 5)  # a wide matrix's 12 rows by three scattering reads


def _pair(d, dtype):
    g = torch.Generator().manual_seed(3)
    base = {name: (torch.randn(*s, generator=g) / 5).to(dtype) for name, s in SHAPES.items()}
    base["fused"] = (torch.randn(36, 16, generator=g) / 5).to(dtype)  # rows 12..30 taken as one part
    final = {n: (w.double() + torch.randn(w.shape, generator=g, dtype=torch.float64) * 1e-2).to(dtype)
             for n, w in base.items()}
    (d / "base").mkdir()
    (d / "final").mkdir()
    save_file(base, str(d / "base" / "model.safetensors"))
    save_file(final, str(d / "final" / "model.safetensors"))
    specs = [MatrixSpec(n, n, None, 0, n, s) for n, s in SHAPES.items()]
    specs.append(MatrixSpec("fused[part]", "fused", slice(12, 30), 0, "fused", (18, 16)))
    return open_source(d / "base"), open_source(d / "final"), base, final, specs


def _whole(tensors, spec):
    t = tensors[spec.tensor]
    return (t if spec.rows is None else t[spec.rows])[None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bands_and_passes_are_those_of_the_tensor_read_whole(tmp_path, small_bands, dtype):
    b_src, f_src, base, final, specs = _pair(tmp_path, dtype)
    for spec in specs:
        assert StoredMatrix.fits(b_src, spec)
        stored, whole = StoredMatrix(b_src, spec), _whole(base, spec)
        assert stored.shape == whole.shape and stored.dtype == whole.dtype
        bands = 0  # each block is valid until the next: compared in step
        for (part, block), (part_w, block_w) in zip(kernels.long_blocks(stored), kernels.long_blocks(whole),
                                                    strict=True):
            assert part == part_w and torch.equal(block, block_w)
            bands += 1
        assert bands > 1  # several bands, and for the wide matrix several chunks of columns
        assert torch.equal(kernels.fro_norm(stored), kernels.fro_norm(whole))
        streamed = BlockedUpdate(stored, StoredMatrix(f_src, spec))
        held = BlockedUpdate(whole, _whole(final, spec))
        a, b = streamed.gather(1e-3), held.gather(1e-3)
        assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3], strict=True))
        X = torch.randn(1, min(spec.shape), 3, dtype=torch.float64)
        assert torch.equal(streamed.long(X), held.long(X))
        assert torch.equal(streamed.dense(), held.dense())


@pytest.mark.parametrize(("quick", "update_svd"), [(True, "gram"), (False, "gram"), (False, "exact")])
def test_the_suites_streamed_give_the_table_read_whole(tmp_path, small_bands, monkeypatch, quick, update_svd):
    """Every pass of either suite from matrices left in their files: the table of the matrices read whole, bit
    for bit; a large last update leaves intruders undecided by W0's top vectors (counted against all of them)."""
    g = torch.Generator().manual_seed(4)
    base = {f"model.layers.0.{m}.weight": (torch.randn(*s, generator=g) / 6).to(dt)  # a shape each: groups of one
            for m, s, dt in (("mlp.up_proj", (60, 24), torch.float32), ("mlp.down_proj", (24, 60), torch.float32),
                             ("self_attn.q_proj", (24, 24), torch.bfloat16))}
    save_file(base, str(tmp_path / "base.safetensors"))
    for step, scale in ((1, 1e-2), (2, 2e-2), (3, 1.0)):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir(parents=True)
        save_file({n: (w.float() + torch.randn(w.shape, generator=g) * scale).to(w.dtype) for n, w in base.items()},
                  str(tmp_path / "run" / f"checkpoint-{step}" / "model.safetensors"))
    cfg = AnalysisConfig(device="cpu", quick=quick, threads=1, principal_k=4, mask_rank=2, update_svd=update_svd)

    def table():
        a = analyze(tmp_path / "base.safetensors", [tmp_path / "run"], config=cfg)
        return [(r.step, r.matrix, r.metric) for r in a], np.array([r.value for r in a])

    made, undecided = [], []
    monkeypatch.setattr(StoredMatrix, "__init__", _counting(StoredMatrix.__init__, made))
    monkeypatch.setattr(engine, "_all_left", _counting(engine._all_left, undecided))
    keys, streamed = table()
    assert sum(m.batched for m in made) == 3 * 4  # every matrix of the base and the checkpoints left in its file
    assert quick or len(undecided) == 3  # then read as (m, n) for the Gram matrix and W0^T u
    monkeypatch.setattr(StoredMatrix, "fits", staticmethod(lambda source, spec: False))
    keys_w, whole = table()
    assert keys == keys_w and np.array_equal(streamed, whole, equal_nan=True)


def _counting(fn, calls):
    def counted(first, *args, **kwargs):
        calls.append(first)
        return fn(first, *args, **kwargs)
    return counted


def test_bad_values_and_files_met_band_by_band(tmp_path, small_bands):
    b_src, _, base, _, specs = _pair(tmp_path, torch.float32)
    tall = specs[0]
    bad = dict(base)
    bad["tall"] = base["tall"].clone()
    bad["tall"][40, 3] = float("nan")  # in the last band only
    (tmp_path / "nan").mkdir()
    save_file(bad, str(tmp_path / "nan" / "model.safetensors"))
    with pytest.raises(GeometryError, match=r"tensor tall has NaN/Inf values"):
        list(kernels.long_blocks(StoredMatrix(open_source(tmp_path / "nan"), tall)))
    with pytest.raises(GeometryError, match=r"tensor tall has shape \(45, 16\), expected \(44, 16\)"):
        StoredMatrix(b_src, tall._replace(shape=(44, 16)))
    stored = StoredMatrix(b_src, specs[1])  # the wide one; then the file is cut short under it
    path = tmp_path / "base" / "model.safetensors"
    os.truncate(path, path.stat().st_size - 64)
    with pytest.raises(GeometryError, match="truncated"):
        list(kernels.long_blocks(stored))


def test_what_is_read_whole(tmp_path):
    save_file({"w": torch.randn(6, 4, dtype=torch.float64), "v": torch.randn(6)}, str(tmp_path / "m.safetensors"))
    src = open_source(tmp_path / "m.safetensors")
    assert not StoredMatrix.fits(src, MatrixSpec("w", "w", None, 0, "w", (6, 4)))  # float64: the kernels take it whole
    assert not StoredMatrix.fits(src, MatrixSpec("v", "v", None, 0, "v", (6,)))
    assert not StoredMatrix.fits(src, MatrixSpec("w", "w", slice(0, 6, 2), 0, "w", (3, 4)))
