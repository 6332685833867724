"""How a kernel call runs on threads: one OpenMP region on torch's team, or a Python thread pool.

The team tasks are numba C callbacks (one per operation × layout × dtype) that take their share of
channels or rows by ``omp_get_thread_num`` (:mod:`batchnorm.kernels._omp`); where there is no
OpenMP team to share, :func:`_parallel` splits the same kernels over a small ``nogil`` thread pool.
"""

from __future__ import annotations

import array
import concurrent.futures
import os
import struct
import threading

import numpy as np
import torch

from ._numba_setup import configure

configure()  # the cache folder must be known before numba is imported

import numba as nb  # noqa: E402
from numba import carray  # noqa: E402

from . import _omp  # noqa: E402
from ._cpu_common import _STRICT  # noqa: E402
from ._cpu_mc import _apply_mc, _constants_mc, _dx_mc, _grad_coefs_mc, _grad_sums_mc, _stats_mc, _sums_mc  # noqa: E402
from ._cpu_ncl import _backward_ncl, _forward_ncl  # noqa: E402

# =============================================================================================
# Team tasks: one whole operation as one OpenMP parallel region on torch's own team (see
# batchnorm.kernels._omp for why). Each is compiled (lazily) into a C callback ``fn(block)``: the
# block is an int64 array holding sizes, flags, eps and the addresses of the arrays, laid out as
# below; thread t of nt takes channels [t·C/nt, (t+1)·C/nt) or rows [t·M/nt, (t+1)·M/nt) — the
# same split as the Python thread pool, so for the same thread count both give the same sums (and
# elementwise results equal to the last bit, or within one rounding where a multiply-add was fused
# differently).
# =============================================================================================
_BLOCK = 25
(_B_N, _B_C, _B_L, _B_TRAIN, _B_SUMS, _B_AC, _B_EPS, _B_X, _B_Y, _B_DY, _B_DX, _B_MEAN, _B_VAR,
 _B_W, _B_B, _B_CST, _B_SV, _B_DW, _B_DB, _B_P1, _B_P2, _B_INV, _B_NT, _B_RES, _B_DRES) = range(_BLOCK)
# sizes: (N, C, L) kernels  N, C, L;  (M, C) kernels  N = M, C, L = rows of the partial-sum tables
# _B_AC: the activation code (_cpu_common._KIND); _B_RES: the residual's address, 0 for none;
# _B_DRES: the residual's gradient (backward of BN + residual + act, (N, C, L) only), 0 for none


@nb.njit(**_STRICT)
def _at(addr, shape, dt):
    """The array at address ``addr`` (a block entry) with the given shape and dtype.

    (It takes the address, not the block and a slot number: a constant slot argument would compile
    one specialisation per slot, 0.07 s each.)"""
    return carray(_omp.voidptr(addr), shape, dt)


@nb.njit(**_STRICT)
def _part(total):
    """(t, lo, hi): this thread's index and its share [lo, hi) of range(total)."""
    t = _omp.thread_num()
    nt = _omp.num_threads()
    return t, t * total // nt, (t + 1) * total // nt


@nb.njit(**_STRICT)
def _team_forward_ncl_body(blk, dt):
    N, C, L = blk[_B_N], blk[_B_C], blk[_B_L]
    _, c0, c1 = _part(C)
    f64 = np.float64
    hasres = blk[_B_RES] != 0
    res = _at(blk[_B_RES] if hasres else blk[_B_X], (N, C, L), dt)
    _forward_ncl(_at(blk[_B_X], (N, C, L), dt), res, _at(blk[_B_Y], (N, C, L), dt), _at(blk[_B_MEAN], C, f64),
                 _at(blk[_B_VAR], C, f64), _at(blk[_B_W], C, f64), _at(blk[_B_B], C, f64),
                 blk.view(f64)[_B_EPS], blk[_B_TRAIN] != 0, blk[_B_AC], hasres, blk[_B_NT] != 0,
                 _at(blk[_B_CST], (6, C), dt), _at(blk[_B_SV], 4, dt), c0, c1)


@nb.njit(**_STRICT)
def _team_backward_ncl_body(blk, dt):
    N, C, L = blk[_B_N], blk[_B_C], blk[_B_L]
    _, c0, c1 = _part(C)
    f64 = np.float64
    sh = (N, C, L)
    x, dy = _at(blk[_B_X], sh, dt), _at(blk[_B_DY], sh, dt)
    y, dx = _at(blk[_B_Y], sh, dt), _at(blk[_B_DX], sh, dt)
    hasres = blk[_B_DRES] != 0
    dres = _at(blk[_B_DRES] if hasres else blk[_B_DX], sh, dt)
    _backward_ncl(x, dy, y, dx, _at(blk[_B_MEAN], C, f64), _at(blk[_B_VAR], C, f64), _at(blk[_B_W], C, f64),
                  _at(blk[_B_B], C, f64), blk.view(f64)[_B_EPS], blk[_B_TRAIN] != 0, blk[_B_SUMS] != 0,
                  blk[_B_AC], blk[_B_NT] != 0, _at(blk[_B_CST], (6, C), dt), _at(blk[_B_SV], 4, dt),
                  _at(blk[_B_DW], C, f64), _at(blk[_B_DB], C, f64), c0, c1, dres, hasres)


@nb.njit(**_STRICT)
def _team_forward_mc_body(blk, dt):
    """Statistics (train) → barrier → member 0 merges and sets the constants → barrier → apply."""
    M, C, S = blk[_B_N], blk[_B_C], blk[_B_L]
    t, r0, r1 = _part(M)
    f64 = np.float64
    x, cst, sv = _at(blk[_B_X], (M, C), dt), _at(blk[_B_CST], (6, C), dt), _at(blk[_B_SV], 4, dt)
    k = x[0]  # the shift: each channel's first value
    p1, p2 = _at(blk[_B_P1], (S, C), f64), _at(blk[_B_P2], (S, C), f64)  # one row per member
    mean, var = _at(blk[_B_MEAN], C, f64), _at(blk[_B_VAR], C, f64)
    train = blk[_B_TRAIN] != 0
    if train:
        _sums_mc(x, k, p1[t], p2[t], sv, r0, r1)
        _omp.barrier()
    if t == 0:
        if train:
            _stats_mc(x, k, p1, p2, mean, var)
        _constants_mc(mean, var, _at(blk[_B_W], C, f64), _at(blk[_B_B], C, f64), blk.view(f64)[_B_EPS], cst,
                      _at(blk[_B_INV], C, f64))
    _omp.barrier()
    hasres = blk[_B_RES] != 0
    res = _at(blk[_B_RES] if hasres else blk[_B_X], (M, C), dt)
    _apply_mc(x, res, _at(blk[_B_Y], (M, C), dt), blk[_B_AC], hasres, blk[_B_NT] != 0, cst, sv, r0, r1)


@nb.njit(**_STRICT)
def _team_backward_mc_body(blk, dt):
    """Member 0 sets the constants → barrier → g, h' → barrier → member 0 merges, sets q, r → barrier → dx."""
    M, C, S = blk[_B_N], blk[_B_C], blk[_B_L]
    t, r0, r1 = _part(M)
    f64 = np.float64
    x, dy, y = _at(blk[_B_X], (M, C), dt), _at(blk[_B_DY], (M, C), dt), _at(blk[_B_Y], (M, C), dt)
    cst, sv = _at(blk[_B_CST], (6, C), dt), _at(blk[_B_SV], 4, dt)
    pg, ph = _at(blk[_B_P1], (S, C), f64), _at(blk[_B_P2], (S, C), f64)
    ac = blk[_B_AC]
    if t == 0:
        _constants_mc(_at(blk[_B_MEAN], C, f64), _at(blk[_B_VAR], C, f64), _at(blk[_B_W], C, f64),
                      _at(blk[_B_B], C, f64), blk.view(f64)[_B_EPS], cst, _at(blk[_B_INV], C, f64))
    _omp.barrier()
    if blk[_B_SUMS] != 0:
        _grad_sums_mc(x, dy, y, ac, cst, sv, pg[t], ph[t], r0, r1)
    else:  # (no dγ, dβ and no batch statistics: the sums are not needed; the merge reads zeros)
        for c in range(C):
            pg[t, c] = 0.0
            ph[t, c] = 0.0
    _omp.barrier()
    if t == 0:
        _grad_coefs_mc(pg, ph, _at(blk[_B_W], C, f64), _at(blk[_B_INV], C, f64), M, blk[_B_TRAIN] != 0, cst,
                       _at(blk[_B_DW], C, f64), _at(blk[_B_DB], C, f64))
    _omp.barrier()
    _dx_mc(x, dy, y, _at(blk[_B_DX], (M, C), dt), ac, blk[_B_NT] != 0, cst, sv, r0, r1)


# The callbacks ``void fn(int64 *block)``: one per operation and dtype, compiled only when used.
def _team_forward_ncl_f32(data):
    _team_forward_ncl_body(carray(data, _BLOCK), np.float32)


def _team_forward_ncl_f64(data):
    _team_forward_ncl_body(carray(data, _BLOCK), np.float64)


def _team_backward_ncl_f32(data):
    _team_backward_ncl_body(carray(data, _BLOCK), np.float32)


def _team_backward_ncl_f64(data):
    _team_backward_ncl_body(carray(data, _BLOCK), np.float64)


def _team_forward_mc_f32(data):
    _team_forward_mc_body(carray(data, _BLOCK), np.float32)


def _team_forward_mc_f64(data):
    _team_forward_mc_body(carray(data, _BLOCK), np.float64)


def _team_backward_mc_f32(data):
    _team_backward_mc_body(carray(data, _BLOCK), np.float32)


def _team_backward_mc_f64(data):
    _team_backward_mc_body(carray(data, _BLOCK), np.float64)


_TEAM_FNS = {(fn.__name__[6:-4], fn.__name__[-3:]): fn for fn in (
    _team_forward_ncl_f32, _team_forward_ncl_f64, _team_backward_ncl_f32, _team_backward_ncl_f64,
    _team_forward_mc_f32, _team_forward_mc_f64, _team_backward_mc_f32, _team_backward_mc_f64)}
_team_cfuncs: dict[tuple[str, str], int] = {}
_team_keep: list = []  # the compiled libraries the callbacks' addresses point into
_team_lock = threading.Lock()


_CALLBACK_SIG = "void(CPointer(int64))"


def _compile_callback(pyfunc) -> int:
    """Address of ``void pyfunc(int64 *block)`` compiled by numba, from numba's cache when it is there.

    A cache hit is loaded by :func:`_load_cached_callback`; a miss, or any failure of that shortcut
    (another numba's internals), takes ``numba.cfunc``, which compiles and saves (or loads).
    """
    try:
        address, keep = _load_cached_callback(pyfunc)
    except Exception:  # a miss, or any failure of the shortcut: numba's own path
        keep = nb.cfunc(_CALLBACK_SIG, **_STRICT)(pyfunc)
        address = keep.address
    _team_keep.append(keep)
    return address


def _load_cached_callback(pyfunc) -> tuple[int, object]:
    """(address, compile result to keep alive) of ``pyfunc``'s callback in numba's cache; raises on a miss.

    ``numba.cfunc`` refreshes the target context before it looks in the cache, importing every
    registry numba has — its NumPy support, and SciPy's BLAS through it: 0.36 s of the 0.6 s a first
    call cost here, for machine code that needs none of it. This sets up only what the machine code
    links against — numba's helper and math symbols (registered when the context is built), its
    runtime (``rtsys.initialize``) and our OpenMP symbols (bound before any callback is made) — and
    reads the very cache entry ``numba.cfunc`` would read.
    """
    from numba.core import sigutils
    from numba.core.ccallback import CFunc
    from numba.core.compiler_lock import global_compiler_lock
    from numba.core.runtime import rtsys

    cf = CFunc(pyfunc, sigutils.normalize_signature(_CALLBACK_SIG), locals={},
               options={k: v for k, v in _STRICT.items() if k != "cache"})
    cf.enable_caching()
    with global_compiler_lock:
        ctx = cf._targetdescr.target_context
        rtsys.initialize(ctx)
        cres = cf._cache._load_overload(cf._sig, ctx)
    if cres is None:
        raise LookupError("not in numba's cache (first use, or the source changed)")
    return cres.library.get_pointer_to_function(cres.fndesc.llvm_cfunc_wrapper_name), cres


def _team_address(op: str, dtype: str) -> int:
    """The compiled callback of ``op`` for ``dtype`` ("f32" | "f64"), compiled or loaded from the cache
    at first use."""
    key = (op, dtype)
    addr = _team_cfuncs.get(key)
    if addr is None:
        if not _omp.runtime():  # (the callbacks link against the runtime's functions: LLVM aborts without)
            raise RuntimeError("batchnorm: no OpenMP runtime to run a team task on; use the thread pool path")
        with _team_lock:
            if key not in _team_cfuncs:
                _team_cfuncs[key] = _compile_callback(_TEAM_FNS[key])
            addr = _team_cfuncs[key]
    return addr


_SLOTS = {"x": _B_X, "y": _B_Y, "dy": _B_DY, "dx": _B_DX, "mean": _B_MEAN, "var": _B_VAR, "w": _B_W,
          "b": _B_B, "cst": _B_CST, "sv": _B_SV, "dw": _B_DW, "db": _B_DB, "p1": _B_P1, "p2": _B_P2,
          "inv": _B_INV, "res": _B_RES, "dres": _B_DRES}


def _block(arrays: dict[str, torch.Tensor | int], sizes: tuple[int, ...],
           flags: tuple[bool, bool, int, bool], eps: float) -> array.array:
    """The int64 argument block of a team task (see the layout above); ``flags`` = (train, sums, ac, nt).

    A stdlib ``array`` (0.7 µs to build, against 5 µs for a torch tensor); its address is
    ``block.buffer_info()[0]`` and it must stay referenced until the task returns. An entry of
    ``arrays`` is a tensor or an address (an int) in a tensor the caller keeps alive.
    """
    vals = [0] * _BLOCK
    vals[_B_N], vals[_B_C], vals[_B_L] = sizes
    vals[_B_TRAIN], vals[_B_SUMS], vals[_B_AC], vals[_B_NT] = (int(f) for f in flags)
    vals[_B_EPS] = struct.unpack("<q", struct.pack("<d", eps))[0]  # the float64's bits
    for key, t in arrays.items():
        vals[_SLOTS[key]] = t if type(t) is int else t.data_ptr()
    return array.array("q", vals)


# =============================================================================================
# The fallback runner (no OpenMP team to share, see _omp.runtime): the kernels are compiled with
# nogil=True; a call is split into disjoint channel ranges ((N, C, L)) or row blocks ((M, C)) that run
# on a small Python thread pool, one part on the calling thread.
# =============================================================================================
_MIN_PER_THREAD = 1 << 15  # elements: below this a second thread costs more than it saves
_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_size = 0
_executor_lock = threading.Lock()


def _forget_executor() -> None:
    """In a forked child the pool's threads do not exist: start a new pool there when needed."""
    global _executor, _executor_size
    _executor, _executor_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_executor)


def _threads(numel: int, parts: int) -> int:
    return max(1, min(torch.get_num_threads(), parts, numel // _MIN_PER_THREAD))


def _split(total: int, n: int) -> list[tuple[int, int]]:
    """``n`` balanced ranges [lo, hi) covering ``range(total)``."""
    return [(t * total // n, (t + 1) * total // n) for t in range(n)]


def _parallel(fn, parts: list[tuple]) -> None:
    """``fn(*args)`` for every tuple in ``parts``, concurrently: the first on the calling thread."""
    if len(parts) == 1:
        fn(*parts[0])
        return
    global _executor, _executor_size
    with _executor_lock:
        if _executor is None or _executor_size < len(parts) - 1:
            if _executor is not None:
                _executor.shutdown(wait=False)
            _executor_size = len(parts) - 1
            _executor = concurrent.futures.ThreadPoolExecutor(max_workers=_executor_size,
                                                              thread_name_prefix="batchnorm")
        futures = [_executor.submit(fn, *args) for args in parts[1:]]
    try:
        fn(*parts[0])
    finally:
        for f in futures:
            f.result()
