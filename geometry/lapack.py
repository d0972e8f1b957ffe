"""The LAPACK and BLAS routines the CPU kernels need, called without holding Python's GIL.

scipy's f2py wrappers (``scipy.linalg.lapack``) keep the GIL for the whole call, so two threads measuring two
matrices would take turns in every eigensolver. The same routines are reached here through the function
pointers scipy exports for Cython (``scipy.linalg.cython_lapack``, ``cython_blas``: the LAPACK scipy itself
links, whatever the build), called by ctypes, which releases the GIL: two threads then run two eigensolvers
at once (benchmarks/bench_kernels.py). Arguments follow the Fortran
interface (pointers to everything, column-major arrays); results are bit-identical to scipy's wrappers given
the same workspace. A failure (LAPACK's info != 0) raises torch.linalg.LinAlgError.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import sys
from functools import cache
from types import ModuleType

import numpy as np
import scipy
import torch


def _kernels(name: str) -> ModuleType:
    """scipy.linalg's Cython module ``name`` loaded on its own: ``import scipy.linalg`` would load the rest of
    scipy.linalg too (260 modules, 15 MB more resident, of a 90M pair's 345 MB peak; measured), none of it used
    here. Registered under its name: a later ``import scipy.linalg`` or ``from scipy.linalg import cython_lapack``
    takes it as it is (Cython refuses to load a module twice in one process); only ``scipy.linalg.cython_lapack``
    as an attribute of the package is not set. The plain import where scipy.linalg is loaded already, or where
    scipy lays its files out otherwise."""
    full = f"scipy.linalg.{name}"
    if full in sys.modules or "scipy.linalg" in sys.modules:
        return importlib.import_module(full)
    found = importlib.machinery.PathFinder.find_spec(name, [f"{path}/linalg" for path in scipy.__path__])
    spec = importlib.util.spec_from_file_location(full, found.origin) if found and found.origin else None
    if spec is None or spec.loader is None:
        return importlib.import_module(full)
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[full]
        raise
    return module


cython_lapack, cython_blas = _kernels("cython_lapack"), _kernels("cython_blas")

_api = ctypes.pythonapi
_api.PyCapsule_GetName.restype, _api.PyCapsule_GetName.argtypes = ctypes.c_char_p, [ctypes.py_object]
_api.PyCapsule_GetPointer.restype = ctypes.c_void_p
_api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


@cache
def _routine(module, name: str, nargs: int):
    capsule = module.__pyx_capi__[name]
    address = _api.PyCapsule_GetPointer(capsule, _api.PyCapsule_GetName(capsule))
    return ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * nargs)(address)  # CFUNCTYPE: the GIL is released


def _int(v: int) -> ctypes.c_int:
    return ctypes.c_int(int(v))


def _ptr(x) -> int | ctypes._CArgObject:
    """What a Fortran argument is given: an array's data, or the address of a ctypes scalar."""
    return x.ctypes.data if isinstance(x, np.ndarray) else ctypes.byref(x)


def _call(module, name: str, *args) -> None:
    _routine(module, name, len(args))(*(_ptr(a) for a in args))


def _char(c: str) -> ctypes.c_char:
    return ctypes.c_char(c.encode())


def _check(info: ctypes.c_int, routine: str) -> None:
    if info.value != 0:
        raise torch.linalg.LinAlgError(f"LAPACK {routine} failed (info {info.value})")


def _with_workspace(name: str, *args, integer: bool = False) -> None:
    """Call LAPACK routine ``name`` whose arguments end in (work, lwork[, iwork, liwork], info): once asking
    the workspace it wants (lwork = -1), then with it; raises on a nonzero info."""
    info, query, iquery = ctypes.c_int(0), np.empty(1), np.empty(1, dtype=np.intc)
    _call(cython_lapack, name, *args, query, _int(-1), *((iquery, _int(-1)) if integer else ()), info)
    _check(info, name)
    work = np.empty(max(1, int(query[0])))
    iwork = np.empty(max(1, int(iquery[0])), dtype=np.intc)
    _call(cython_lapack, name, *args, work, _int(work.size), *((iwork, _int(iwork.size)) if integer else ()), info)
    _check(info, name)


def _fortran(a: np.ndarray) -> np.ndarray:
    """An array LAPACK writes into: it must be that array itself, in the layout LAPACK reads."""
    if a.dtype != np.float64 or not a.flags.f_contiguous or not a.flags.writeable:
        raise ValueError("a LAPACK argument must be a writable float64 column-major array")
    return a


def sytrd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q^T A Q = tridiag(d, e) for symmetric A (r x r, its lower triangle read), in place: ``a`` then holds the
    reflectors of Q below the subdiagonal. Returns (d (r,), e (r - 1,), tau (r - 1,))."""
    a = _fortran(a)
    r = a.shape[0]
    d, e, tau = np.empty(r), np.empty(max(r - 1, 1)), np.empty(max(r - 1, 1))
    _with_workspace("dsytrd", _char("L"), _int(r), a, _int(r), d, e, tau)
    return d, e[: r - 1], tau[: r - 1]


def sterf(d: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Every eigenvalue of the symmetric tridiagonal (d, e), ascending (d and e are not changed)."""
    w, e = np.array(d, dtype=np.float64), np.array(e, dtype=np.float64)
    info = ctypes.c_int(0)
    _call(cython_lapack, "dsterf", _int(w.size), w, e if e.size else np.empty(1), info)
    _check(info, "dsterf")
    return w


def stemr(d: np.ndarray, e: np.ndarray, il: int, iu: int) -> np.ndarray:
    """Eigenvectors il..iu (1-based, ascending order) of the symmetric tridiagonal (d, e) by MRRR, (r, iu-il+1)."""
    r, k = d.size, iu - il + 1
    d, e = np.array(d, dtype=np.float64), np.append(np.asarray(e, dtype=np.float64), 0.0)  # e: r entries
    w, z, isuppz = np.empty(r), np.empty((r, k), order="F"), np.empty(2 * k, dtype=np.intc)
    found, tryrac = ctypes.c_int(0), ctypes.c_int(1)
    vl = vu = ctypes.c_double(0.0)
    _with_workspace("dstemr", _char("V"), _char("I"), _int(r), d, e, vl, vu, _int(il), _int(iu), found, w, z,
                    _int(r), _int(k), isuppz, tryrac, integer=True)
    if found.value != k:
        raise torch.linalg.LinAlgError(f"LAPACK dstemr found {found.value} of {k} eigenvectors")
    return z


def stein(d: np.ndarray, e: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Eigenvectors of the symmetric tridiagonal (d, e) for its eigenvalues w (ascending), by inverse iteration,
    those of close eigenvalues reorthogonalised, (r, len(w)). Raises when an eigenvector does not converge."""
    r, k = d.size, w.size
    z = np.empty((r, k), order="F")
    iblock = np.ones(r, dtype=np.intc)  # one block: (d, e) taken whole
    isplit = np.zeros(r, dtype=np.intc)
    isplit[0] = r
    info = ctypes.c_int(0)
    _call(cython_lapack, "dstein", _int(r), np.ascontiguousarray(d, dtype=np.float64),
          np.ascontiguousarray(e, dtype=np.float64) if r > 1 else np.empty(1), _int(k),
          np.ascontiguousarray(w, dtype=np.float64), iblock, isplit, z, _int(r), np.empty(5 * r),
          np.empty(r, dtype=np.intc), np.empty(max(1, k), dtype=np.intc), info)
    _check(info, "dstein")
    return z


def ormtr(a: np.ndarray, tau: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Q z in place, Q the orthogonal matrix of ``sytrd`` (its reflectors in ``a`` and ``tau``): z (r, k)
    column-major, in the tridiagonal's basis, goes back to A's."""
    z = _fortran(z)
    r, k = z.shape
    _with_workspace("dormtr", _char("L"), _char("L"), _char("N"), _int(r), _int(k), _fortran(a), _int(r),
                    np.ascontiguousarray(tau, dtype=np.float64), z, _int(r))
    return z


def syevd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All eigenvalues (ascending) and eigenvectors of symmetric A (its lower triangle read), by divide and
    conquer, in place: ``a`` becomes the eigenvectors."""
    a = _fortran(a)
    r = a.shape[0]
    w = np.empty(r)
    _with_workspace("dsyevd", _char("V"), _char("L"), _int(r), a, _int(r), w, integer=True)
    return w, a


def syevr(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All eigenvalues (ascending) and eigenvectors (r, r, column-major) of symmetric A (its lower triangle read)
    by MRRR; ``a`` is destroyed. Its workspace is O(r) where divide and conquer's (``syevd``) is 2 r^2."""
    a = _fortran(a)
    r = a.shape[0]
    w, z, isuppz = np.empty(r), np.empty((r, r), order="F"), np.empty(2 * max(r, 1), dtype=np.intc)
    found, zero = ctypes.c_int(0), ctypes.c_double(0.0)
    _with_workspace("dsyevr", _char("V"), _char("A"), _char("L"), _int(r), a, _int(r), zero, zero, _int(1),
                    _int(r), zero, found, w, z, _int(r), isuppz, integer=True)
    return w, z


def syrk_add(c: np.ndarray, a: np.ndarray) -> None:
    """C += A A^T in place, its upper triangle only (BLAS dsyrk): c (r, r) column-major, a (r, b) float64 in
    either order (a row-major a is its transpose in column-major order: syrk's "T" form, no copy)."""
    c = _fortran(c)
    r, b = a.shape
    one = ctypes.c_double(1.0)
    if not a.flags.f_contiguous and a.flags.c_contiguous and a.dtype == np.float64:
        _call(cython_blas, "dsyrk", _char("U"), _char("T"), _int(r), _int(b), one, a, _int(b), one, c, _int(r))
        return
    a = np.asfortranarray(a, dtype=np.float64)
    _call(cython_blas, "dsyrk", _char("U"), _char("N"), _int(r), _int(b), one, a, _int(r), one, c, _int(r))
