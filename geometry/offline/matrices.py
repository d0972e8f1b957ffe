"""Which matrices of a checkpoint are measured (geometry.selection's rule), split where fused, checked against
every checkpoint of the run, and read as stored with their shape and finiteness checked."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from geometry.errors import GeometryError
from geometry.offline.config import ON_MISMATCH
from geometry.selection import as_patterns, choose, layer_of, matches, module_of

if TYPE_CHECKING:
    from geometry.offline.sources import TensorSource

# What the metrics can use: bf16 equality and SVDs of real floating-point weights. Integer, bool and
# float8/float4 weights (quantized checkpoints) are refused for a selected matrix rather than misread.
MEASURABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class MatrixSpec(NamedTuple):
    name: str  # output name: the parameter name, or "<fused name>[q]"-style for a split part
    tensor: str  # the stored tensor to read
    rows: slice | None  # rows of the stored tensor for a split fused part; None = all
    layer: int | None  # block index parsed from the name; None for embeddings / lm_head
    module: str  # q_proj, gate_proj, down_proj, embed_tokens, lm_head, ...
    shape: tuple[int, int]  # shape of the (split) matrix


class Selection(NamedTuple):
    matrices: list[MatrixSpec]
    skipped: list[tuple[str, str]]  # (name, reason); only filled when on_mismatch="skip"


def _fused_parts(module: str, rows: int, config: dict | None) -> list[tuple[str, str, int]] | None:
    """(suffix, module, n_rows) of each part of a contiguously fused matrix, or None to keep it whole.

    Only layouts whose parts are contiguous row blocks are split (Phi-3 qkv_proj, gate_up_proj: gate
    first), and only when config.json's sizes add up to the stored rows exactly. GPT-NeoX/Bloom
    `query_key_value` interleaves q/k/v per head, which one row slice cannot express: kept whole.
    """
    cfg = (config or {}).get("text_config") or config
    if not isinstance(cfg, dict):
        return None

    def size(key: str) -> int | None:  # a hand-edited config.json may hold anything
        v = cfg.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    if module == "qkv_proj":
        heads, hidden = size("num_attention_heads"), size("hidden_size")
        kv = size("num_key_value_heads") or heads
        head_dim = size("head_dim") or (hidden // heads if hidden and heads else None)
        if not (heads and kv and head_dim):
            return None
        q, k = heads * head_dim, kv * head_dim
        parts = [("q", "q_proj", q), ("k", "k_proj", k), ("v", "v_proj", k)]
    elif module == "gate_up_proj" and size("intermediate_size"):
        parts = [("gate", "gate_proj", size("intermediate_size")), ("up", "up_proj", size("intermediate_size"))]
    else:
        return None
    return parts if sum(n for _, _, n in parts) == rows else None


def _specs(name: str, shape: tuple[int, int], config: dict | None) -> list[MatrixSpec]:
    module, layer = module_of(name), layer_of(name)
    parts = _fused_parts(module, shape[0], config)
    if parts is None:
        return [MatrixSpec(name, name, None, layer, module, shape)]
    specs, start = [], 0
    for suffix, part_module, n in parts:
        specs.append(MatrixSpec(f"{name}[{suffix}]", name, slice(start, start + n), layer, part_module,
                                (n, shape[1])))
        start += n
    return specs


def _mismatch(name: str, base: TensorSource, checkpoints: list[TensorSource]) -> str | None:
    """Why a selected matrix cannot be measured (missing, another shape, a dtype the metrics cannot use)."""
    shape = base.shape(name)
    for c in checkpoints:
        if name not in c:
            return f"checkpoint {c.label}: tensor {name} is missing (base {base.label} has shape {shape})"
        if c.shape(name) != shape:
            return f"checkpoint {c.label}: tensor {name} has shape {c.shape(name)}, base has {shape}"
    for c in (base, *checkpoints):
        if c.dtype(name) not in MEASURABLE:
            return (f"{c.label}: tensor {name} is {str(c.dtype(name)).removeprefix('torch.')}; only float16, "
                    "bfloat16, float32 and float64 weights can be measured (dequantize, or --exclude it)")
    return None


def select_matrices(base: TensorSource, checkpoints: list[TensorSource], *, include: Sequence[str] = (),
                    exclude: Sequence[str] = (), embeddings: bool = False, on_mismatch: str = "error") -> Selection:
    """The matrices to measure (geometry.selection), checked against every checkpoint; fused matrices are
    split as `_fused_parts` says. on_mismatch (AnalysisConfig's): "error" raises, "skip" lists."""
    if on_mismatch not in ON_MISMATCH:
        raise GeometryError(f"on_mismatch must be one of {ON_MISMATCH}, got {on_mismatch!r}")
    shapes = {name: base.shape(name) for name in base.names()}
    chosen = choose(shapes, include=include, exclude=exclude, embeddings=embeddings)
    if not chosen:
        named = [n for n in shapes if matches(n, include) and not matches(n, exclude)]
        if as_patterns(include, "include") and named:
            raise GeometryError(f"tensor {named[0]} is not a matrix (shape {shapes[named[0]]})")
        raise GeometryError(f"{base.label}: no matrix selected (include={list(include)}, exclude={list(exclude)})")
    matrices, skipped = [], []
    for name in chosen:
        problem = _mismatch(name, base, checkpoints)
        if problem and on_mismatch == "error":
            raise GeometryError(problem)
        if problem:
            skipped.append((name, problem))
        else:
            matrices.extend(_specs(name, base.shape(name), base.config))
    if not matrices:
        raise GeometryError(f"{base.label}: every selected matrix was skipped, first: {skipped[0][1]}")
    return Selection(matrices, skipped)


def read_matrix(source: TensorSource, spec: MatrixSpec) -> torch.Tensor:
    """One selected matrix as stored (dtype, CPU), rows sliced for a fused part; NaN/Inf refused
    because every metric downstream would silently turn into NaN."""
    t = source.read(spec.tensor, spec.rows)  # (rows, cols)
    check_shape(source, spec, tuple(t.shape))
    return check_finite(source, spec, t)


def check_shape(source: TensorSource, spec: MatrixSpec, shape: tuple[int, ...]) -> None:
    """A matrix read (or about to be) with the shape its selection expects, else one line."""
    if tuple(shape) != tuple(spec.shape):
        raise GeometryError(f"checkpoint {source.label}: tensor {spec.name} has shape {tuple(shape)}, "
                            f"expected {spec.shape}")


def check_finite(source: TensorSource, spec: MatrixSpec, t: torch.Tensor) -> torch.Tensor:
    """t (a matrix or a band of it) if it has no NaN/Inf, else one line. The sum first (one pass, no mask, in the
    stored dtype: 30x faster than a float64 one): finite for almost every matrix; only a non-finite sum (NaN/Inf,
    or an overflow of finite values) pays for the elementwise check."""
    if t.is_floating_point() and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise GeometryError(f"checkpoint {source.label}: tensor {spec.name} has NaN/Inf values")
    return t
