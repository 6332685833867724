"""The ``"numba"`` backend: fused CPU kernels for float32/float64 BN (+ activation), train and eval.

Same functions and signatures as :mod:`batchnorm.kernels.torch_backend` (the reference each kernel
must match; read them side by side)::

    train_forward  y = act(γ (x − μ_B) / sqrt(σ²_B + ε) + β),  returns (y, μ_B, σ²_B)
    backward       dz = dy · act'(z);  g = Σ dz,  h = Σ dz · x̂  (per channel)
                   dx = γ · invstd · (dz − g/n − x̂ · h/n),  dγ = h,  dβ = g
    eval_forward   y = act(γ (x − mean) / sqrt(var + ε) + β)   (given statistics)
    eval_backward  dx = γ · invstd · dz,  dγ = Σ dz · x̂,  dβ = Σ dz

Memory layouts (anything else — CUDA, float16/bfloat16, non-contiguous inputs, tensor
subclasses — is left to the torch backend by :func:`supports`):

* ``(N, C, L)``: a contiguous tensor with channels on any axis, viewed as ``(before, C, after)``
  (NCHW, NCDHW, (N, C, L), …). A thread owns a range of channels and takes them in blocks of
  about 2 MiB of data (one channel if a channel is larger); for each i it walks the block's
  channels ``x[i, cb:ce, :]`` as one contiguous stretch, so the statistics sweep and the normalise
  sweep of a block follow each other while the block is still in cache (2 MiB L2 per core here)
  and short runs (L = 784 for 28×28) do not restart the hardware prefetcher at every run.
* ``(M, C)``: channels innermost — (N, C) input, channels-last memory (NHWC/NDHWC with
  ``channel_axis=1``) or a logically channels-last tensor (``channel_axis=-1``). Threads own
  blocks of rows and keep per-channel vectors of partial sums, added up afterwards. The sums take
  ``R = max(1, 1024 // C)`` rows at a time as one stretch of ``R·C`` lanes (lane ``j·C + c`` is
  channel c), four stretches per update of the lane accumulators: with C = 64 a row is only 256
  bytes, and row-by-row loops ran at 60 % of a read-only pass (128×64×56×56 channels-last train
  forward 15.4 → 11.1 ms, backward 23.2 → 19.3 ms, kernels alone on 2 threads).

Passes over memory: train forward reads x once for the statistics and once more to write y (the
second read comes from cache in the ``(N, C, L)`` layout); the backward reads x and dy once for
g and h and once more to write dx; eval reads x and writes y. The backward needs only x, dy and
the per-channel mean and variance: relu/leaky_relu masks are recomputed from
``z = (x − mean)·γ·invstd + β`` (cheaper than reading y; the dx pass uses the very instructions of
the forward, so it sees the forward's mask bit for bit); ELU reads ``y`` for ``act'(z) = y + α``.
Outputs (y, dx) of at least :data:`STREAM_MIN_BYTES` (8 MiB) are written with **streaming stores**
(:mod:`batchnorm.kernels._stream`), which skip the read-for-ownership a plain store makes of each
line: 128×64×56×56 NCHW fwd+bwd 32.1 → 28.0 ms, eval 8.8 → 7.3 ms (2 threads, ``batchnorm bench``),
and still 1.1–1.5× faster when the next op reads the output (``batchnorm bench --stream``). The
rows must start on 64-byte lines (NCHW runs of L values with 16 | L for float32, 8 | L for float64;
channels-last rows of C channels likewise) and ELU keeps plain stores; elsewhere plain stores run.

Numerics, where they happen:

* Statistics in one sweep with a **shift**: with ``k`` = the channel's first value,
  ``S₁ = Σ (x − k)``, ``S₂ = Σ (x − k)²``, ``mean = k + S₁/n``, ``var = S₂/n − (S₁/n)²``. Because
  ``k`` is one of the data, ``|mean − k|`` is a few standard deviations and the subtraction does
  not cancel even when ``|mean| ≫ std`` (float32 data of mean 1e4 and std 1 keeps float32
  accuracy). If the shift happens to be far out (``(mean − k)² > 10⁶·var``, e.g. an outlier
  first value) the variance is recomputed two-pass, ``Σ (x − mean)² / n``, which is exact.
* The sums run in the input dtype over short stretches (runs of ≤ 4096 values, or blocks of 16
  rows) and every stretch's total is added in **float64**: float32 rounding stays that of a
  4096-term sum however large the batch. The variance is clamped at 0; NaN/Inf propagate (no
  ``nnan``/``ninf`` fast-math flags), so the ``nonfinite`` policies of the modules see them.
* Elementwise work is done in the input dtype (float32 SIMD lanes are twice as many as float64):
  ``z = ((x − hi) − lo)·(γ·invstd) + β`` where ``hi`` is the float64 mean rounded to the input
  dtype and ``lo = mean − hi``. ``x − hi`` is exact near the mean (Sterbenz), so the split mean
  keeps float32 outputs exact to rounding when ``|mean| ≫ std``. These loops are compiled with
  ``fastmath={"contract"}`` only (fused multiply-add, never re-association, which could merge
  ``hi`` and ``lo``); the sums use ``{"reassoc", "contract"}`` so that they vectorise, and take
  ``Σ dz·(x − hi)`` with ``lo·Σ dz`` subtracted afterwards in float64.
* The batch mean and variance are returned as **float64** tensors (the torch backend returns the
  accumulation dtype): the backward needs the mean to better than float32 precision when
  ``|mean| ≫ std``; running statistics are cast to their buffer dtype by the caller.

Activations: identity, relu and leaky_relu are one code path (``z`` if ``z > 0`` else
``neg·z`` with neg = 1, 0, slope), ELU a run-time flag; activation, slope and α are run-time
values, so each kernel compiles once per dtype (float32, float64) and no more.

Threads: the kernels are plain sequential numba functions over a range of channels or rows. A call
runs as **one OpenMP parallel region on torch's own thread team** (:mod:`batchnorm.kernels._omp`):
a numba ``cfunc`` per operation and dtype takes its share by ``omp_get_thread_num`` and, in the
``(M, C)`` layout, meets the team at a barrier between the statistics and the normalise sweep. On
a private thread pool the same kernels lost half their speed to torch's idle OpenMP workers, which
spin for milliseconds after every torch op (32×256×28×28 eval: 1.3 ms alone, 2.2–4.6 ms after a
torch op; on the team 0.95 ms either way, the speed of a torch copy). Where torch has no OpenMP
team to share (macOS/Windows builds, a forked child, ``BATCHNORM_OMP=0``) the same kernels run on
a small Python thread pool (``nogil``) with the same split. ``torch.get_num_threads()`` threads,
one for inputs under 64 Ki values; a channel is never split, so ``(N, C, L)`` results do not depend
on the thread count.

Allocation, measured for a 128×64×56×56 float32 output (103 MB) on 2 cores (medians, ms). Quiet
machine (``taskset -c 0,1``, same CPU family); "tuned" = ``mallopt(M_MMAP_MAX=0,
M_TRIM_THRESHOLD=1 GiB)`` before any allocation:

                                        glibc default   tuned
    copy_ into a preallocated tensor          8.6         9.5
    x.clone() (fresh pages)                  33.8         9.6
    native relu(batch_norm) fwd+bwd         172.8        80.8

and on the shared 2-core machine (``batchnorm bench --alloc``; contended, compare within the list):

    copy_ into a preallocated tensor             23.9
    torch.empty_like + copy_ (fresh pages)       54.2
    our pool's empty_like + copy_                24.0
    our train fwd+relu, torch.empty_like outputs 63.1
    our train fwd+relu, pool outputs (default)   25.0
    our train fwd+relu into one reused buffer    24.7

A tensor above glibc's mmap threshold (≤ 32 MiB) is a fresh ``mmap``: every 4 KiB page faults and
is zero-filled on first write. Choice: outputs (y, dx) come from :mod:`batchnorm.kernels._pool`,
which hands a buffer out again only when nothing else references it (autograd-safe by
construction), so a training loop writes into warm pages; it is as fast as a preallocated buffer.
Rejected: the glibc tuning also removes the faults (and halves native BN's time) but changes the
allocator of the whole process — freed memory is never returned to the OS — which a library must
not do behind a user's back (and ``mallopt`` is glibc-only; ``batchnorm bench --alloc`` shows its
effect); writing outputs in place of a temporary is unsafe while the caller still holds it.
Saved tensors: the training op saves x, γ, β, the per-channel mean and variance (C values each)
and y only for ELU — nothing of the input's size is allocated for the backward.

Compilation: lazily at first use, ``cache=True``, cache folder from
:mod:`batchnorm.kernels._numba_setup`. Importing :mod:`batchnorm` imports neither this module nor
numba. One callback per operation × layout × dtype is compiled, only when used. First use of one
layout and dtype (forward + backward), measured on the 2-core machine: cold (fresh cache) 5.9–6.5 s
for NCHW float32, 8.7–10.0 s for channels-last float32 (the same code on different days; 7.5 s more
when a model uses both); cached 0.28 s — 0.2 s of it importing numba. A cache hit is loaded
without numba's full target refresh (:func:`_load_cached_callback`), which would import all of
numba's NumPy support and, through it, SciPy's BLAS (0.6 s before); later calls pay nothing.
"""

from __future__ import annotations

import array
import concurrent.futures
import functools
import math
import os
import struct
import threading

import numpy as np
import torch

from . import _pool
from ._numba_setup import configure

configure()  # the cache folder must be known before numba is imported

import numba as nb  # noqa: E402
from numba import carray  # noqa: E402

from . import _omp, _stream  # noqa: E402

__all__ = ["backward", "eval_backward", "eval_forward", "name", "supports", "train_forward"]

name = "numba"

_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "elu": 3}
_FM = {"reassoc", "contract"}  # lets the sums vectorise; no nnan/ninf, so NaN/Inf behave like torch
# elementwise loops: no re-association (the split mean must survive), fused multiply-add allowed
_STRICT = {"cache": True, "nogil": True, "error_model": "numpy", "fastmath": {"contract"}}
_SUMS = {**_STRICT, "fastmath": _FM}  # reductions: re-association lets them vectorise
_SHIFT_GUARD = 1e6  # (mean − shift)² / var above this: redo the variance two-pass
_CHUNK = 4096  # values summed in the input dtype before the partial sum joins the float64 total
_ROWS = 16  # (M, C) layout: rows summed in the input dtype before joining the float64 totals
_NCL_BLOCK_BYTES = 1 << 21  # (N, C, L): most input data in one block of channels (L2: 2 MiB a core)
_LANES = 1024  # (M, C) sums: rows are summed R = max(1, _LANES // C) at a time, as one vector of R·C lanes


# =============================================================================================
# Kernels.
#   x, y, dy, dx      input dtype (float32 or float64), kernel shape (N, C, L) or (M, C)
#   mean, var, w, b   float64 (C,): statistics and γ, β
#   dw, db            float64 (C,): outputs of the backward
#   cst               input dtype (6, C): per-channel constants the kernels fill and then use
#                     [0] hi = mean rounded, [1] lo = mean − hi, [2] sc = γ·invstd, [3] β,
#                     [4] q, [5] r (backward: dx = sc·dz + q·(x − mean) + r)
#   sv                input dtype [0, 1, neg, α]: neg is the slope for z ≤ 0 of identity (1),
#                     relu (0) and leaky_relu (slope); α is ELU's
# Elementwise loops compute z = ((x − hi) − lo)·sc + β in the input dtype: hi is x's dtype, so
# x − hi is exact near the mean, and the split mean keeps float32 exact when |mean| ≫ std. These
# loops are compiled without fast-math, so the compiler cannot re-associate the split away.
# =============================================================================================
@nb.njit(**_SUMS)
def _run_sums(run, k, zero):
    """Σ (v − k) and Σ (v − k)² over a contiguous run (≤ _CHUNK values), summed in the input dtype."""
    a1 = zero
    a2 = zero
    for j in range(run.shape[0]):
        d = run[j] - k
        a1 += d
        a2 += d * d
    return a1, a2


@nb.njit(**_SUMS)
def _run_m2(run, m):
    """Σ (v − m)² in float64 (the exact second pass of the shift guard)."""
    s = 0.0
    for j in range(run.shape[0]):
        d = run[j] - m
        s += d * d
    return s


@nb.njit(**_SUMS)
def _run_grad_sums(xr, dyr, yr, hi, lo, sc, b, sv, elu):
    """g = Σ dz and h' = Σ dz·(x − hi) over a run of ≤ _CHUNK values (h' − lo·g = Σ dz·(x − mean))."""
    zero, one, neg, alpha = sv[0], sv[1], sv[2], sv[3]
    ag = zero
    ah = zero
    if elu:
        for j in range(xr.shape[0]):
            d = xr[j] - hi
            z = (d - lo) * sc + b
            dz = dyr[j] * (one if z > zero else yr[j] + alpha)
            ag += dz
            ah += dz * d
    else:
        for j in range(xr.shape[0]):
            d = xr[j] - hi
            z = (d - lo) * sc + b
            dz = dyr[j] * (one if z > zero else neg)
            ag += dz
            ah += dz * d
    return ag, ah


@nb.njit(**_STRICT)
def _finish_stats(s1, s2, n, k):
    """mean and biased variance from shifted sums (the variance is NaN-preserving, clamped at 0)."""
    dm = s1 / n
    v = s2 / n - dm * dm
    return k + dm, v


@nb.njit(**_STRICT)
def _set_constants(cst, c, m, v, w, b, eps):
    """Fill cst[0..3, c] (in the input dtype) for mean m, variance v, γ w, β b; returns invstd."""
    inv = 1.0 / math.sqrt(v + eps)
    cst[0, c] = m
    cst[1, c] = m - cst[0, c]
    cst[2, c] = w * inv
    cst[3, c] = b
    return inv


@nb.njit(**_STRICT)
def _out(xv, hi, lo, sc, bb, zero, neg):
    """act(((x − hi) − lo)·sc + β) for identity, relu, leaky_relu (+ 0: relu gives +0, never −0)."""
    z = ((xv - hi) - lo) * sc + bb
    return z if z > zero else z * neg + zero


@nb.njit(**_STRICT)
def _dx1(xv, dyv, hi, lo, sc, bb, q, r, zero, one, neg):
    """dx = sc·dz + q·(x − μ) + r for one value, dz = dy·act'(z) (identity, relu, leaky_relu)."""
    d = (xv - hi) - lo
    z = d * sc + bb
    dz = dyv * (one if z > zero else neg)
    return sc * dz + q * d + r


# The loops that write y or dx come in two copies, plain and streaming (_stream.store, for rows that
# start on a 64-byte line): with the choice inside one loop, the loop vectorises only if LLVM
# unswitches it, which it does not in every compilation (a 3× slower eval, measured).


# --------------------------------------------------------------------------------- (N, C, L)
# One call handles the channels [c0, c1); threads get disjoint channel ranges (see _parallel). The
# channels go in blocks whose data fit in L2 (_ncl_block): each sweep over a block walks
# x[i, cb:ce, :], one contiguous stretch per i, so short runs (L = 784 for 28×28) do not restart
# the hardware prefetcher at every run, and the second sweep still finds the block in cache.
@nb.njit(**_STRICT)
def _ncl_block(N, L, itemsize, tensors, c0, c1):
    """Channels per block: as many as keep the block's data in ``tensors`` inputs within _NCL_BLOCK_BYTES
    (measured on 32×256×28×28, 2 threads: backward 2.97 → 2.13–2.21 ms with blocks of 2 MiB, against
    one channel at a time; 0.5, 1 and 4 MiB blocks were slower)."""
    return max(1, min(c1 - c0, _NCL_BLOCK_BYTES // (N * L * itemsize * tensors)))


@nb.njit(**_STRICT)
def _forward_ncl(x, y, mean, var, w, b, eps, train, elu, nt, cst, sv, c0, c1):
    """Train (``train``: statistics into mean/var first) or eval forward of channels [c0, c1); ``nt``:
    stream y (non-ELU; every run y[i, c] must start on a 64-byte line)."""
    N, _, L = x.shape
    zero, neg, alpha = sv[0], sv[2], sv[3]
    B = _ncl_block(N, L, x.itemsize, 1, c0, c1)
    s1 = np.zeros(B)
    s2 = np.zeros(B)
    for cb in range(c0, c1, B):
        ce = min(cb + B, c1)
        if train:
            s1[:] = 0.0
            s2[:] = 0.0
            for i in range(N):  # channel c's sums run over i, then its runs' chunks, as for one channel
                for c in range(cb, ce):
                    k = x[0, c, 0]  # the shift (see module docstring)
                    for j0 in range(0, L, _CHUNK):  # (sub-runs bound the rounding of the dtype sums)
                        a1, a2 = _run_sums(x[i, c, j0:j0 + _CHUNK], k, zero)
                        s1[c - cb] += a1
                        s2[c - cb] += a2
            for c in range(cb, ce):
                k = x[0, c, 0]
                m, v = _finish_stats(s1[c - cb], s2[c - cb], N * L, k)
                if (m - k) * (m - k) > _SHIFT_GUARD * v:  # far-out shift: exact two-pass variance
                    m2 = 0.0
                    for i in range(N):
                        m2 += _run_m2(x[i, c], m)
                    v = m2 / (N * L)
                if v < 0.0:  # (NaN stays NaN)
                    v = 0.0
                mean[c] = m
                var[c] = v
        for c in range(cb, ce):
            _set_constants(cst, c, mean[c], var[c], w[c], b[c], eps)
        for i in range(N):
            for c in range(cb, ce):
                hi, lo, sc, bc = cst[0, c], cst[1, c], cst[2, c], cst[3, c]
                if elu:
                    for j in range(L):
                        z = ((x[i, c, j] - hi) - lo) * sc + bc
                        y[i, c, j] = z if z > zero else alpha * math.expm1(z)
                elif nt:
                    yr = y[i, c]
                    for j in range(L):
                        _stream.store(yr, j, _out(x[i, c, j], hi, lo, sc, bc, zero, neg))
                else:
                    for j in range(L):
                        y[i, c, j] = _out(x[i, c, j], hi, lo, sc, bc, zero, neg)
    if nt:
        _stream.fence()


@nb.njit(**_STRICT)
def _backward_ncl(x, dy, y, dx, mean, var, w, b, eps, train, sums, elu, nt, cst, sv, dw, db, c0, c1):
    """Backward of channels [c0, c1): pass 1 g, h (if ``sums``); pass 2 dx.

    train: dx = sc·dz − sc·g/n − (x − μ)·sc·invstd²·h'/n, where h' = Σ dz·(x − μ) (the batch
    statistics depend on x); eval: dx = sc·dz. ``y`` is read only for ELU (act' = y + α). ``nt``:
    stream dx (non-ELU; every run dx[i, c] must start on a 64-byte line).
    """
    N, _, L = x.shape
    n = N * L
    zero, one, neg, alpha = sv[0], sv[1], sv[2], sv[3]
    B = _ncl_block(N, L, x.itemsize, 3 if elu else 2, c0, c1)
    gb = np.zeros(B)
    hb = np.zeros(B)
    inv = np.empty(B)
    for cb in range(c0, c1, B):
        ce = min(cb + B, c1)
        gb[:] = 0.0
        hb[:] = 0.0
        for c in range(cb, ce):
            inv[c - cb] = _set_constants(cst, c, mean[c], var[c], w[c], b[c], eps)
        if sums:
            for i in range(N):
                for c in range(cb, ce):
                    hi, lo, sc, bc = cst[0, c], cst[1, c], cst[2, c], cst[3, c]
                    for j0 in range(0, L, _CHUNK):
                        e = j0 + _CHUNK
                        gj, hj = _run_grad_sums(x[i, c, j0:e], dy[i, c, j0:e], y[i, c, j0:e], hi, lo, sc, bc,
                                                sv, elu)
                        gb[c - cb] += gj
                        hb[c - cb] += hj
        for c in range(cb, ce):
            g = gb[c - cb]
            hs = hb[c - cb] - cst[1, c] * g if sums else 0.0  # Σ dz·(x − hi) − lo·Σ dz = Σ dz·(x − mean)
            iv = inv[c - cb]
            dw[c] = hs * iv
            db[c] = g
            sc64 = w[c] * iv
            cst[4, c] = -sc64 * iv * iv * hs / n if train else 0.0
            cst[5, c] = -sc64 * g / n if train else 0.0
        for i in range(N):
            for c in range(cb, ce):
                hi, lo, sc, bc, q, r = cst[0, c], cst[1, c], cst[2, c], cst[3, c], cst[4, c], cst[5, c]
                if elu:
                    for j in range(L):
                        d = (x[i, c, j] - hi) - lo
                        z = d * sc + bc
                        dz = dy[i, c, j] * (one if z > zero else y[i, c, j] + alpha)
                        dx[i, c, j] = sc * dz + q * d + r
                elif nt:
                    dxr = dx[i, c]
                    for j in range(L):
                        v = _dx1(x[i, c, j], dy[i, c, j], hi, lo, sc, bc, q, r, zero, one, neg)
                        _stream.store(dxr, j, v)
                else:
                    for j in range(L):
                        dx[i, c, j] = _dx1(x[i, c, j], dy[i, c, j], hi, lo, sc, bc, q, r, zero, one, neg)
    if nt:
        _stream.fence()


# ------------------------------------------------------------------------------------ (M, C)
# One call handles the rows [r0, r1); threads get disjoint row blocks. Every loop runs over
# channels (lanes) innermost, so the per-channel sums vectorise with no re-association.
@nb.njit(**_STRICT)
def _lanes(C):
    """R, W: the (M, C) sums take R consecutive rows at a time as one stretch of W = R·C lanes."""
    R = max(1, _LANES // C)
    return R, R * C


@nb.njit(**_STRICT)
def _tile(v, W):
    """v (C,) repeated to W lanes: lane j·C + c holds v[c]."""
    C = v.shape[0]
    out = np.empty(W, dtype=v.dtype)
    for j in range(W // C):
        for c in range(C):
            out[j * C + c] = v[c]
    return out


@nb.njit(**_STRICT)
def _fold(a, p, C, zero):
    """p[c] += Σ_j a[j·C + c] (float64), then a = 0."""
    for j in range(a.shape[0] // C):
        for c in range(C):
            p[c] += a[j * C + c]
            a[j * C + c] = zero


@nb.njit(**_STRICT)
def _sums_mc(x, k, p1, p2, sv, r0, r1):
    """p1, p2 (float64 vectors, overwritten) ← the shifted sums of rows [r0, r1).

    Groups of R rows are summed lane by lane as one stretch of W = R·C contiguous values (lane j·C + c
    is channel c of the group's j-th row), four groups per update of the lane sums, so a small C still
    makes long vector loops; each lane sums _ROWS values in x's dtype before the lanes are folded into
    the float64 totals. The rows after the last four whole groups (< 4·R) are summed row by row.
    """
    M, C = x.shape
    R, W = _lanes(C)
    zero = sv[0]
    for c in range(C):  # (explicit loops: a slice assignment costs compile time)
        p1[c] = 0.0
        p2[c] = 0.0
    groups = (r1 - r0) // R // 4 * 4  # whole groups, in fours
    v = x.reshape(M * C)[r0 * C:(r0 + groups * R) * C].reshape((groups, W))  # group g = row g of v
    kw = _tile(k, W)
    a1 = np.zeros(W, dtype=x.dtype)
    a2 = np.zeros(W, dtype=x.dtype)
    for g0 in range(0, groups, _ROWS):
        for g in range(g0, min(g0 + _ROWS, groups), 4):  # four groups per update: ¼ of the lane traffic
            for j in range(W):
                k_ = kw[j]
                d0, d1, d2, d3 = v[g, j] - k_, v[g + 1, j] - k_, v[g + 2, j] - k_, v[g + 3, j] - k_
                a1[j] += (d0 + d1) + (d2 + d3)
                a2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        _fold(a1, p1, C, zero)
        _fold(a2, p2, C, zero)
    for i0 in range(r0 + groups * R, r1, _ROWS):  # the < 4·R rows after the last four whole groups
        for i in range(i0, min(i0 + _ROWS, r1)):
            for c in range(C):
                d = x[i, c] - k[c]
                a1[c] += d
                a2[c] += d * d
        _fold(a1[:C], p1, C, zero)
        _fold(a2[:C], p2, C, zero)


@nb.njit(**_STRICT)
def _stats_mc(x, k, p1, p2, mean, var):
    """Merge the blocks' shifted sums (same shift everywhere: a plain sum) into mean and variance."""
    M, C = x.shape
    for c in range(C):
        s1 = 0.0
        s2 = 0.0
        for t in range(p1.shape[0]):
            s1 += p1[t, c]
            s2 += p2[t, c]
        kc = np.float64(k[c])
        m, v = _finish_stats(s1, s2, M, kc)
        if (m - kc) * (m - kc) > _SHIFT_GUARD * v:  # far-out shift: exact two-pass variance (rare)
            s2 = 0.0
            for i in range(M):
                d = x[i, c] - m
                s2 += d * d
            v = s2 / M
        if v < 0.0:
            v = 0.0
        mean[c] = m
        var[c] = v


@nb.njit(**_STRICT)
def _constants_mc(mean, var, w, b, eps, cst, inv):
    for c in range(mean.shape[0]):
        inv[c] = _set_constants(cst, c, mean[c], var[c], w[c], b[c], eps)


@nb.njit(**_STRICT)
def _apply_mc(x, y, elu, nt, cst, sv, r0, r1):
    """y = act(((x − hi) − lo)·sc + β) for rows [r0, r1); ``nt``: stream y (non-ELU; rows on 64-byte
    lines)."""
    C = x.shape[1]
    zero, neg, alpha = sv[0], sv[2], sv[3]
    hi, lo, sc, bb = cst[0], cst[1], cst[2], cst[3]
    for i in range(r0, r1):
        if elu:
            for c in range(C):
                z = ((x[i, c] - hi[c]) - lo[c]) * sc[c] + bb[c]
                y[i, c] = z if z > zero else alpha * math.expm1(z)
        elif nt:
            yr = y[i]
            for c in range(C):
                _stream.store(yr, c, _out(x[i, c], hi[c], lo[c], sc[c], bb[c], zero, neg))
        else:
            for c in range(C):
                y[i, c] = _out(x[i, c], hi[c], lo[c], sc[c], bb[c], zero, neg)
    if nt:
        _stream.fence()


@nb.njit(**_STRICT)
def _dz(xv, dyv, yv, h, lo, sc, bb, zero, one, neg, alpha, elu):
    """(dz, x − hi) for one value: z = ((x − hi) − lo)·sc + β, dz = dy·act'(z) (ELU's from y)."""
    d = xv - h
    z = (d - lo) * sc + bb
    if elu:
        return dyv * (one if z > zero else yv + alpha), d
    return dyv * (one if z > zero else neg), d


@nb.njit(**_STRICT)
def _grad_sums_mc(x, dy, y, elu, cst, sv, pg, ph, r0, r1):
    """pg, ph (float64 vectors, overwritten) ← g = Σ dz and h' = Σ dz·(x − hi) of rows [r0, r1).

    Same lane layout as :func:`_sums_mc`: groups of R rows as W = R·C lanes, four groups per update;
    ELU (whose derivative reads y) goes row by row, which keeps the compiled code small.
    """
    M, C = x.shape
    R, W = _lanes(C)
    zero, one, neg, alpha = sv[0], sv[1], sv[2], sv[3]
    for c in range(C):
        pg[c] = 0.0
        ph[c] = 0.0
    hw, lw, sw, bw = _tile(cst[0], W), _tile(cst[1], W), _tile(cst[2], W), _tile(cst[3], W)
    groups = 0 if elu else (r1 - r0) // R // 4 * 4  # whole groups, in fours (ELU: row by row, less code)
    lo_, hi_ = r0 * C, (r0 + groups * R) * C
    vx = x.reshape(M * C)[lo_:hi_].reshape((groups, W))  # group g = row g
    vd = dy.reshape(M * C)[lo_:hi_].reshape((groups, W))
    ag = np.zeros(W, dtype=x.dtype)
    ah = np.zeros(W, dtype=x.dtype)
    for g0 in range(0, groups, _ROWS):
        for g in range(g0, min(g0 + _ROWS, groups), 4):
            for j in range(W):
                h, lo, sc, bb = hw[j], lw[j], sw[j], bw[j]
                z0, d0 = _dz(vx[g, j], vd[g, j], zero, h, lo, sc, bb, zero, one, neg, alpha, False)
                z1, d1 = _dz(vx[g + 1, j], vd[g + 1, j], zero, h, lo, sc, bb, zero, one, neg, alpha, False)
                z2, d2 = _dz(vx[g + 2, j], vd[g + 2, j], zero, h, lo, sc, bb, zero, one, neg, alpha, False)
                z3, d3 = _dz(vx[g + 3, j], vd[g + 3, j], zero, h, lo, sc, bb, zero, one, neg, alpha, False)
                ag[j] += (z0 + z1) + (z2 + z3)
                ah[j] += (z0 * d0 + z1 * d1) + (z2 * d2 + z3 * d3)
        _fold(ag, pg, C, zero)
        _fold(ah, ph, C, zero)
    for i0 in range(r0 + groups * R, r1, _ROWS):  # the rows after the last four whole groups
        for i in range(i0, min(i0 + _ROWS, r1)):
            for c in range(C):
                dz, d = _dz(x[i, c], dy[i, c], y[i, c], hw[c], lw[c], sw[c], bw[c], zero, one, neg, alpha,
                            elu)
                ag[c] += dz
                ah[c] += dz * d
        _fold(ag[:C], pg, C, zero)
        _fold(ah[:C], ph, C, zero)


@nb.njit(**_STRICT)
def _grad_coefs_mc(pg, ph, w, inv, M, train, cst, dw, db):
    """Merge the blocks' g, h' and set q, r (cst[4], cst[5]) of dx = sc·dz + q·(x − μ) + r."""
    for c in range(w.shape[0]):
        g = 0.0
        hs = 0.0
        for t in range(pg.shape[0]):
            g += pg[t, c]
            hs += ph[t, c]
        hs -= cst[1, c] * g  # Σ dz·(x − hi) − lo·Σ dz = Σ dz·(x − mean)
        dw[c] = hs * inv[c]
        db[c] = g
        sc64 = w[c] * inv[c]
        cst[4, c] = -sc64 * inv[c] * inv[c] * hs / M if train else 0.0
        cst[5, c] = -sc64 * g / M if train else 0.0


@nb.njit(**_STRICT)
def _dx_mc(x, dy, y, dx, elu, nt, cst, sv, r0, r1):
    """dx = sc·dz + q·(x − μ) + r for rows [r0, r1); ``nt``: stream dx (non-ELU; rows on 64-byte lines)."""
    C = x.shape[1]
    zero, one, neg, alpha = sv[0], sv[1], sv[2], sv[3]
    hi, lo, sc, bb, q, r = cst[0], cst[1], cst[2], cst[3], cst[4], cst[5]
    for i in range(r0, r1):
        if elu:
            for c in range(C):
                d = (x[i, c] - hi[c]) - lo[c]
                z = d * sc[c] + bb[c]
                dz = dy[i, c] * (one if z > zero else y[i, c] + alpha)
                dx[i, c] = sc[c] * dz + q[c] * d + r[c]
        elif nt:
            dxr = dx[i]
            for c in range(C):
                v = _dx1(x[i, c], dy[i, c], hi[c], lo[c], sc[c], bb[c], q[c], r[c], zero, one, neg)
                _stream.store(dxr, c, v)
        else:
            for c in range(C):
                dx[i, c] = _dx1(x[i, c], dy[i, c], hi[c], lo[c], sc[c], bb[c], q[c], r[c], zero, one, neg)
    if nt:
        _stream.fence()


# =============================================================================================
# Team tasks: one whole operation as one OpenMP parallel region on torch's own team (see
# batchnorm.kernels._omp for why). Each is compiled (lazily) into a C callback ``fn(block)``: the
# block is an int64 array holding sizes, flags, eps and the addresses of the arrays, laid out as
# below; thread t of nt takes channels [t·C/nt, (t+1)·C/nt) or rows [t·M/nt, (t+1)·M/nt) — the
# same split as the Python thread pool, so for the same thread count both give the same sums (and
# elementwise results equal to the last bit, or within one rounding where a multiply-add was fused
# differently).
# =============================================================================================
_BLOCK = 23
(_B_N, _B_C, _B_L, _B_TRAIN, _B_SUMS, _B_ELU, _B_EPS, _B_X, _B_Y, _B_DY, _B_DX, _B_MEAN, _B_VAR,
 _B_W, _B_B, _B_CST, _B_SV, _B_DW, _B_DB, _B_P1, _B_P2, _B_INV, _B_NT) = range(_BLOCK)
# sizes: (N, C, L) kernels  N, C, L;  (M, C) kernels  N = M, C, L = rows of the partial-sum tables


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
    _forward_ncl(_at(blk[_B_X], (N, C, L), dt), _at(blk[_B_Y], (N, C, L), dt), _at(blk[_B_MEAN], C, f64),
                 _at(blk[_B_VAR], C, f64), _at(blk[_B_W], C, f64), _at(blk[_B_B], C, f64),
                 blk.view(f64)[_B_EPS], blk[_B_TRAIN] != 0, blk[_B_ELU] != 0, blk[_B_NT] != 0,
                 _at(blk[_B_CST], (6, C), dt), _at(blk[_B_SV], 4, dt), c0, c1)


@nb.njit(**_STRICT)
def _team_backward_ncl_body(blk, dt):
    N, C, L = blk[_B_N], blk[_B_C], blk[_B_L]
    _, c0, c1 = _part(C)
    f64 = np.float64
    sh = (N, C, L)
    x, dy = _at(blk[_B_X], sh, dt), _at(blk[_B_DY], sh, dt)
    y, dx = _at(blk[_B_Y], sh, dt), _at(blk[_B_DX], sh, dt)
    _backward_ncl(x, dy, y, dx, _at(blk[_B_MEAN], C, f64), _at(blk[_B_VAR], C, f64), _at(blk[_B_W], C, f64),
                  _at(blk[_B_B], C, f64), blk.view(f64)[_B_EPS], blk[_B_TRAIN] != 0, blk[_B_SUMS] != 0,
                  blk[_B_ELU] != 0, blk[_B_NT] != 0, _at(blk[_B_CST], (6, C), dt), _at(blk[_B_SV], 4, dt),
                  _at(blk[_B_DW], C, f64), _at(blk[_B_DB], C, f64), c0, c1)


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
    _apply_mc(x, _at(blk[_B_Y], (M, C), dt), blk[_B_ELU] != 0, blk[_B_NT] != 0, cst, sv, r0, r1)


@nb.njit(**_STRICT)
def _team_backward_mc_body(blk, dt):
    """Member 0 sets the constants → barrier → g, h' → barrier → member 0 merges, sets q, r → barrier → dx."""
    M, C, S = blk[_B_N], blk[_B_C], blk[_B_L]
    t, r0, r1 = _part(M)
    f64 = np.float64
    x, dy, y = _at(blk[_B_X], (M, C), dt), _at(blk[_B_DY], (M, C), dt), _at(blk[_B_Y], (M, C), dt)
    cst, sv = _at(blk[_B_CST], (6, C), dt), _at(blk[_B_SV], 4, dt)
    pg, ph = _at(blk[_B_P1], (S, C), f64), _at(blk[_B_P2], (S, C), f64)
    elu = blk[_B_ELU] != 0
    if t == 0:
        _constants_mc(_at(blk[_B_MEAN], C, f64), _at(blk[_B_VAR], C, f64), _at(blk[_B_W], C, f64),
                      _at(blk[_B_B], C, f64), blk.view(f64)[_B_EPS], cst, _at(blk[_B_INV], C, f64))
    _omp.barrier()
    if blk[_B_SUMS] != 0:
        _grad_sums_mc(x, dy, y, elu, cst, sv, pg[t], ph[t], r0, r1)
    else:  # (no dγ, dβ and no batch statistics: the sums are not needed; the merge reads zeros)
        for c in range(C):
            pg[t, c] = 0.0
            ph[t, c] = 0.0
    _omp.barrier()
    if t == 0:
        _grad_coefs_mc(pg, ph, _at(blk[_B_W], C, f64), _at(blk[_B_INV], C, f64), M, blk[_B_TRAIN] != 0, cst,
                       _at(blk[_B_DW], C, f64), _at(blk[_B_DB], C, f64))
    _omp.barrier()
    _dx_mc(x, dy, y, _at(blk[_B_DX], (M, C), dt), elu, blk[_B_NT] != 0, cst, sv, r0, r1)


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
          "inv": _B_INV}


def _block(arrays: dict[str, torch.Tensor | int], sizes: tuple[int, ...],
           flags: tuple[bool, bool, bool, bool], eps: float) -> array.array:
    """The int64 argument block of a team task (see the layout above); ``flags`` = (train, sums, elu, nt).

    A stdlib ``array`` (0.7 µs to build, against 5 µs for a torch tensor); its address is
    ``block.buffer_info()[0]`` and it must stay referenced until the task returns. An entry of
    ``arrays`` is a tensor or an address (an int) in a tensor the caller keeps alive.
    """
    vals = [0] * _BLOCK
    vals[_B_N], vals[_B_C], vals[_B_L] = sizes
    vals[_B_TRAIN], vals[_B_SUMS], vals[_B_ELU], vals[_B_NT] = (int(f) for f in flags)
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


# =============================================================================================
# torch <-> kernel glue
# =============================================================================================
_CL = {4: (torch.channels_last, (0, 2, 3, 1)), 5: (torch.channels_last_3d, (0, 2, 3, 4, 1))}


def _plan(x: torch.Tensor, axis: int) -> tuple[str, tuple[int, ...] | None, tuple[int, ...]] | None:
    """How x's memory maps onto a kernel: ("ncl" | "mc", permutation to memory order, kernel shape)."""
    c = x.shape[axis]
    if x.is_contiguous():
        outer = math.prod(x.shape[:axis])
        inner = math.prod(x.shape[axis + 1:])
        if inner == 1:
            return "mc", None, (outer, c)
        return "ncl", None, (outer, c, inner)
    if axis == 1 and x.ndim in _CL and x.is_contiguous(memory_format=_CL[x.ndim][0]):
        return "mc", _CL[x.ndim][1], (x.numel() // c, c)
    return None


def _np(t: torch.Tensor, plan) -> np.ndarray:
    """A numpy view (no copy) of ``t`` in the kernel's shape; raises if t does not follow the plan."""
    _, perm, shape = plan
    t = t.detach()
    if perm is not None:
        t = t.permute(perm)
    return t.view(shape).numpy()


def _like(src: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``src`` in x's dtype and (dense) memory layout (a copy only if it is not already).

    Gradients often arrive expanded (``y.sum().backward()`` gives a zero-stride dy): such a view
    is not dense, is copied, and so never costs a separate compilation for strided arrays.
    """
    src = src.detach()
    if src.dtype == x.dtype and src.shape == x.shape and src.stride() == x.stride():
        return src
    return _empty_like(x).copy_(src)


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    return _pool.empty_like(x)


def _vec(t: torch.Tensor | None, c: int, fill: float) -> torch.Tensor:
    """γ, β or statistics as a contiguous float64 (C,) tensor (no copy if already one; never written)."""
    if t is None:
        return torch.full((c,), fill, dtype=torch.float64)
    t = t.detach()
    if t.dim() != 1:
        t = t.reshape(c)
    if t.dtype != torch.float64:
        t = t.double()  # (2 µs against 4.4 µs for reshape + to + contiguous: six calls a training step)
    return t if t.is_contiguous() else t.contiguous()


_SV_CACHE: dict[tuple, torch.Tensor] = {}


def _sv(dtype, act: str, slope: float) -> torch.Tensor:
    """The kernels' scalar vector [0, 1, neg, α] in the input dtype (read-only; a few per model)."""
    key = (dtype, act, float(slope))
    sv = _SV_CACHE.get(key)
    if sv is None:
        neg = {"identity": 1.0, "relu": 0.0, "leaky_relu": slope, "elu": 0.0}[act]
        sv = _SV_CACHE.setdefault(key, torch.tensor([0.0, 1.0, neg, slope], dtype=dtype))
    return sv


@functools.lru_cache(maxsize=256)
def _scratch_layout(dtype, c: int, parts: int) -> tuple[int, dict[str, tuple[int, tuple[int, ...], type]]]:
    """Size in bytes of :func:`_scratch`'s buffer and where each table lies in it: name → (byte
    offset, shape, numpy dtype). The float64 tables first (8-byte aligned), ``cst`` last."""
    f64, n64 = np.float64, c * (1 + 2 * parts) if parts else 0
    dt = f64 if dtype == torch.float64 else np.float32
    tables = {"cst": (8 * n64, (6, c), dt)}
    if parts:
        tables.update(inv=(0, (c,), f64), p1=(8 * c, (parts, c), f64),
                      p2=(8 * c * (1 + parts), (parts, c), f64))
    return 8 * n64 + 6 * c * np.dtype(dt).itemsize, tables


def _scratch(dtype, c: int, parts: int) -> tuple[torch.Tensor, dict[str, int]]:
    """A call's scratch in one allocation (each torch allocation costs ~1 µs: a small layer's step
    made nine): the constant table ``cst`` (6, C) in the input dtype and, for the (M, C) kernels
    (``parts`` > 0), ``inv`` (C,) and the partial-sum tables ``p1``, ``p2`` (parts, C) in float64,
    which the kernels overwrite before they read them. Returns the buffer (keep it referenced until
    the task returns) and each table's address."""
    nbytes, tables = _scratch_layout(dtype, c, parts)
    ws = torch.empty(nbytes, dtype=torch.uint8)
    base = ws.data_ptr()
    return ws, {name: base + off for name, (off, _, _) in tables.items()}


def _scratch_np(ws: torch.Tensor, dtype, c: int, parts: int) -> dict[str, np.ndarray]:
    """The tables of :func:`_scratch` as numpy views (for the Python thread pool)."""
    raw = ws.numpy()
    return {name: raw[off:off + math.prod(shape) * np.dtype(dt).itemsize].view(dt).reshape(shape)
            for name, (off, shape, dt) in _scratch_layout(dtype, c, parts)[1].items()}


def _env_bytes(name: str, default: int) -> int:
    value = _pool.env_amount(name, int, "a whole number of bytes", f"unset it or give e.g. {default}")
    return default if value is None else value


STREAM_MIN_BYTES = _env_bytes("BATCHNORM_STREAM_MIN_BYTES", 8 << 20)
"""Outputs (y, dx) of at least this many bytes are written with streaming stores (see
:mod:`batchnorm.kernels._stream`: they skip the read-for-ownership of each line but leave the
output out of cache for the next op; a loss below ~8 MB on the 2-core machine, a gain above). From
the environment variable ``BATCHNORM_STREAM_MIN_BYTES`` at import; assign to change it later (a
very large value turns streaming off). Results are the same to the last bit either way."""


def _streams(out: torch.Tensor, act: str, inner: int) -> bool:
    """Whether the kernels stream ``out``: large enough, not ELU (its loops keep plain stores), and every
    run of ``inner`` values starts on a 64-byte line."""
    nbytes = out.numel() * out.element_size()
    return (nbytes >= STREAM_MIN_BYTES and act != "elu" and out.data_ptr() % 64 == 0
            and inner * out.element_size() % 64 == 0)


def supports(x: torch.Tensor, channel_axis: int, act: str) -> bool:
    """float32/float64 CPU tensors, contiguous or channels-last, plain torch.Tensor (not a subclass)."""
    return (type(x) in (torch.Tensor, torch.nn.Parameter)
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and x.layout == torch.strided
            and x.numel() > 0
            and act in _CODES
            and _plan(x, channel_axis % x.ndim) is not None)


def _launch(op: str, arrays: dict[str, torch.Tensor | int], sizes: tuple[int, ...],
            flags: tuple[bool, bool, bool, bool],
            eps: float, threads: int) -> None:
    """One team task: ``op`` over ``arrays`` (all dense, in x's memory order) on ``threads`` threads."""
    blk = _block(arrays, sizes, flags, eps)
    dtype = "f64" if arrays["x"].dtype == torch.float64 else "f32"
    _omp.run(_team_address(op, dtype), blk.buffer_info()[0], threads)


def _forward(x, mean, var, weight, bias, eps, axis, act, slope, train):
    """y = act(BN(x)); writes the batch statistics into the float64 ``mean``/``var`` when ``train``."""
    plan = _plan(x, axis)
    kind, _, shape = plan
    c = x.shape[axis]
    y = _empty_like(x)
    w, b = _vec(weight, c, 1.0), _vec(bias, c, 0.0)
    sv, elu = _sv(x.dtype, act, slope), act == "elu"
    eps = float(eps)
    nt = _threads(x.numel(), c if kind == "ncl" else shape[0])
    stream = _streams(y, act, shape[-1])
    # cst; for (M, C) also inv and the partial sums, one row per thread (eval: never read)
    ws, scratch = _scratch(x.dtype, c, nt if kind == "mc" else 0)
    if _omp.runtime():
        arrays = {"x": x, "y": y, "mean": mean, "var": var, "w": w, "b": b, "sv": sv, **scratch}
        sizes = shape if kind == "ncl" else (*shape, nt)
        _launch("forward_" + kind, arrays, sizes, (train, False, elu, stream), eps, nt)
        return y
    # the Python thread pool (no OpenMP team to share): the same kernels on numpy views
    xa, ya = _np(x, plan), _np(y, plan)
    m, v, w, b, sv = (t.numpy() for t in (mean, var, w, b, sv))
    tables = _scratch_np(ws, x.dtype, c, nt if kind == "mc" else 0)
    cst = tables["cst"]
    if kind == "ncl":
        _parallel(_forward_ncl, [(xa, ya, m, v, w, b, eps, train, elu, stream, cst, sv, lo, hi)
                                 for lo, hi in _split(c, nt)])
        return y
    parts = _split(shape[0], nt)
    if train:
        p1, p2 = tables["p1"], tables["p2"]
        _parallel(_sums_mc, [(xa, xa[0], p1[t], p2[t], sv, lo, hi) for t, (lo, hi) in enumerate(parts)])
        _stats_mc(xa, xa[0], p1, p2, m, v)
    _constants_mc(m, v, w, b, eps, cst, tables["inv"])
    _parallel(_apply_mc, [(xa, ya, elu, stream, cst, sv, lo, hi) for lo, hi in parts])
    return y


def train_forward(x, weight, bias, eps, channel_axis, act, slope):
    """Training forward; returns ``(y, batch_mean, biased_batch_var)`` with float64 statistics."""
    c = x.shape[channel_axis]
    mean = torch.empty(c, dtype=torch.float64)
    var = torch.empty(c, dtype=torch.float64)
    y = _forward(x, mean, var, weight, bias, eps, channel_axis, act, slope, True)
    return y, mean, var


def eval_forward(x, mean, var, weight, bias, eps, channel_axis, act, slope):
    """``act((x − mean) · γ / sqrt(var + ε) + β)`` with given statistics; output in x's dtype."""
    c = x.shape[channel_axis]
    return _forward(x, _vec(mean, c, 0.0), _vec(var, c, 1.0), weight, bias, eps, channel_axis, act, slope,
                    False)


def _backward(dy, x, y, weight, bias, mean, var, eps, axis, act, slope, train):
    plan = _plan(x, axis)
    kind, _, shape = plan
    c = x.shape[axis]
    dy = _like(dy, x)
    if act == "elu":
        if y is None:  # ELU's derivative is read from its output; recompute it if not given
            y = eval_forward(x, mean, var, weight, bias, eps, axis, act, slope)
        y = _like(y, x)
    else:
        y = x  # not read; same array type keeps a single compiled specialisation
    dx = _empty_like(x)
    w, b = _vec(weight, c, 1.0), _vec(bias, c, 0.0)
    m, v = _vec(mean, c, 0.0), _vec(var, c, 1.0)
    dw = torch.empty(c, dtype=torch.float64)
    db = torch.empty(c, dtype=torch.float64)
    sums = train or weight is not None or bias is not None
    sv, elu = _sv(x.dtype, act, slope), act == "elu"
    eps = float(eps)
    nt = _threads(x.numel(), c if kind == "ncl" else shape[0])
    stream = _streams(dx, act, shape[-1])
    ws, scratch = _scratch(x.dtype, c, nt if kind == "mc" else 0)
    if _omp.runtime():
        arrays = {"x": x, "dy": dy, "y": y, "dx": dx, "mean": m, "var": v, "w": w, "b": b, "sv": sv,
                  "dw": dw, "db": db, **scratch}
        sizes = shape if kind == "ncl" else (*shape, nt)
        _launch("backward_" + kind, arrays, sizes, (train, sums, elu, stream), eps, nt)
    else:  # the Python thread pool
        xa, dya, ya, dxa = (_np(t, plan) for t in (x, dy, y, dx))
        m_, v_, w_, b_, sv_, dw_, db_ = (t.numpy() for t in (m, v, w, b, sv, dw, db))
        tables = _scratch_np(ws, x.dtype, c, nt if kind == "mc" else 0)
        cst_ = tables["cst"]
        if kind == "ncl":
            args = (xa, dya, ya, dxa, m_, v_, w_, b_, eps, train, sums, elu, stream, cst_, sv_, dw_, db_)
            _parallel(_backward_ncl, [(*args, lo, hi) for lo, hi in _split(c, nt)])
        else:
            pg, ph, inv = tables["p1"], tables["p2"], tables["inv"]
            _constants_mc(m_, v_, w_, b_, eps, cst_, inv)
            parts = _split(shape[0], nt)
            if sums:
                _parallel(_grad_sums_mc, [(xa, dya, ya, elu, cst_, sv_, pg[t], ph[t], lo, hi)
                                          for t, (lo, hi) in enumerate(parts)])
            else:
                pg[:] = 0.0
                ph[:] = 0.0
            _grad_coefs_mc(pg, ph, w_, inv, shape[0], train, cst_, dw_, db_)
            _parallel(_dx_mc, [(xa, dya, ya, dxa, elu, stream, cst_, sv_, lo, hi) for lo, hi in parts])
    dweight = None if weight is None else dw.to(weight.dtype)
    dbias = None if bias is None else db.to(bias.dtype)
    return dx, dweight, dbias


def backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope):
    """Training backward (dx, dγ, dβ) in two passes; ``mean``/``var`` are train_forward's statistics."""
    return _backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope, True)


def eval_backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope):
    """Backward of :func:`eval_forward` w.r.t. x, γ, β (statistics are constants)."""
    return _backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope, False)

