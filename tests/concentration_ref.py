"""Plain numpy references for docs/metrics.md items 11 and 12, written from the definitions alone."""

import math
from fractions import Fraction

import numpy as np

ABS = ("1e-8", "1e-7", "1e-6", "1e-4")
REL = ("1e-4", "1e-3", "1e-2")
TOP = (("0.1pct", "0.001"), ("1pct", "0.01"), ("5pct", "0.05"))
LADDERS = [f"sparsity_abs_{t}" for t in ABS] + [f"sparsity_rel_{t}" for t in REL]  # counts: exact
NAMES = LADDERS + [f"energy_top_{p}" for p, _ in TOP] + [f"sv_energy_top_{j}" for j in (1, 4, 16, 64)] + [
    "signal_rank", "signal_energy"]  # every name of items 11 and 12 for D_t (quick and full suites)


def entry_reference(W0: np.ndarray, D: np.ndarray) -> dict[str, float]:
    """Item 11's entry metrics of one update D (m x n) of W0: counts by comparison, top energies by a full sort."""
    W0, D = np.asarray(W0, dtype=np.float64), np.asarray(D, dtype=np.float64)
    a = np.abs(D)
    rms = math.sqrt(np.mean(W0 ** 2))
    out = {f"sparsity_abs_{t}": float(np.mean(a <= float(t))) for t in ABS}
    out.update({f"sparsity_rel_{t}": float(np.mean(a <= float(t) * rms)) for t in REL})
    e = np.sort(a.ravel() ** 2)[::-1]
    for name, p in TOP:
        out[f"energy_top_{name}"] = float(e[: math.ceil(Fraction(p) * e.size)].sum() / e.sum())
    return out


def gd_threshold(s: np.ndarray, shape: tuple[int, int]) -> float:
    """omega(beta) * median(s), Gavish & Donoho 2014 (unknown noise), over all min(m, n) singular values."""
    beta = min(shape) / max(shape)
    return (0.56 * beta ** 3 - 0.95 * beta ** 2 + 1.82 * beta + 1.43) * float(np.median(s))


def spectral_reference(D: np.ndarray) -> dict[str, float]:
    """sv_energy_top_J (item 11) and signal_rank, signal_energy (item 12) from numpy's SVD of D."""
    s = np.linalg.svd(np.asarray(D, dtype=np.float64), compute_uv=False)
    e = s ** 2
    out = {f"sv_energy_top_{j}": float(e[:j].sum() / e.sum()) for j in (1, 4, 16, 64)}
    signal = s > gd_threshold(s, D.shape)
    out["signal_rank"], out["signal_energy"] = float(signal.sum()), float(e[signal].sum() / e.sum())
    return out
