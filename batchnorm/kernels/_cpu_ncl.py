"""The ``(N, C, L)`` kernels: channels on any axis of a contiguous tensor (NCHW, NCDHW, (N, C, L)).

Reference (:mod:`batchnorm.kernels.torch_backend`; read it beside this file)::

    train forward  μ_c = mean(x[:, c, :]),  σ²_c = mean((x[:, c, :] − μ_c)²)      (biased)
                   y = act(γ_c (x − μ_c) / sqrt(σ²_c + ε) + β_c)
    backward       dz = dy · act'(z);  g_c = Σ dz,  h_c = Σ dz · x̂
                   dx = γ_c · invstd_c · (dz − g_c/n − x̂ · h_c/n),  dγ = h,  dβ = g
    eval           y = act(γ_c (x − mean_c) / sqrt(var_c + ε) + β_c),  dx = γ_c · invstd_c · dz

A call handles the channels ``[c0, c1)`` in blocks of about 2 MiB (:func:`_ncl_block`), so the
statistics sweep and the normalise sweep of a block follow each other while it is in cache.
"""

from __future__ import annotations

import math

import numpy as np

from ._numba_setup import configure

configure()  # the cache folder must be known before numba is imported

import numba as nb  # noqa: E402

from . import _stream  # noqa: E402
from ._cpu_common import (  # noqa: E402
    _CHUNK,
    _NCL_BLOCK_BYTES,
    _SHIFT_GUARD,
    _STRICT,
    _dx1,
    _finish_stats,
    _out,
    _out_res,
    _run_grad_sums,
    _run_grad_sums_res,
    _run_grad_sums_smooth,
    _run_m2,
    _run_sums,
    _set_constants,
    _smooth,
    _smooth_grad,
)


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
def _forward_ncl(x, res, y, mean, var, w, b, eps, train, ac, hasres, nt, cst, sv, c0, c1):
    """Train (``train``: statistics into mean/var first) or eval forward of channels [c0, c1); ``ac``:
    the activation code (see _cpu_common._KIND); ``hasres``: add the residual ``res`` before the
    activation (piecewise-linear codes only); ``nt``: stream y (code 0 without residual; every run
    y[i, c] must start on a 64-byte line)."""
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
                if ac == 1:
                    for j in range(L):
                        z = ((x[i, c, j] - hi) - lo) * sc + bc
                        y[i, c, j] = z if z > zero else alpha * math.expm1(z)
                elif ac > 1:
                    for j in range(L):
                        z = ((x[i, c, j] - hi) - lo) * sc + bc
                        y[i, c, j] = _smooth(np.float64(z), ac)
                elif hasres:
                    for j in range(L):
                        y[i, c, j] = _out_res(x[i, c, j], res[i, c, j], hi, lo, sc, bc, zero, neg)
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
def _backward_ncl(x, dy, y, dx, mean, var, w, b, eps, train, sums, ac, nt, cst, sv, dw, db, c0, c1,
                  dres, hasres):
    """Backward of channels [c0, c1): pass 1 g, h (if ``sums``); pass 2 dx.

    train: dx = sc·dz − sc·g/n − (x − μ)·sc·invstd²·h'/n, where h' = Σ dz·(x − μ) (the batch
    statistics depend on x); eval: dx = sc·dz. ``y`` is read only for ELU (act' = y + α; the smooth
    activations recompute act'(z) from z). ``nt``: stream dx (code 0; every run dx[i, c] must start on a
    64-byte line).

    ``hasres`` (y = act(BN(x) + residual), code 0 with a slope ≥ 0): pass 1 reads x, dy and y, writes
    dz = dy·act'(z) into ``dres`` (the residual's gradient) and sums it; pass 2 reads x and dres (still
    in cache, block by block) and writes dx — the two sweeps of BN + act, where the activation's
    backward, then BN's, took three.
    """
    N, _, L = x.shape
    n = N * L
    zero, one, neg, alpha = sv[0], sv[1], sv[2], sv[3]
    B = _ncl_block(N, L, x.itemsize, 4 if hasres else (3 if ac == 1 else 2), c0, c1)
    elu = ac == 1
    # pass 2's dz: dy·act'(z) for BN + act; with a residual, the dz pass 1 wrote (act' is then 1: neg = one)
    src = dres if hasres else dy
    ng = one if hasres else neg
    gb = np.zeros(B)
    hb = np.zeros(B)
    inv = np.empty(B)
    for cb in range(c0, c1, B):
        ce = min(cb + B, c1)
        gb[:] = 0.0
        hb[:] = 0.0
        for c in range(cb, ce):
            inv[c - cb] = _set_constants(cst, c, mean[c], var[c], w[c], b[c], eps)
        if sums or hasres:
            for i in range(N):
                for c in range(cb, ce):
                    hi, lo, sc, bc = cst[0, c], cst[1, c], cst[2, c], cst[3, c]
                    for j0 in range(0, L, _CHUNK):
                        e = j0 + _CHUNK
                        if hasres:
                            gj, hj = _run_grad_sums_res(x[i, c, j0:e], dy[i, c, j0:e], y[i, c, j0:e],
                                                        dres[i, c, j0:e], hi, sv)
                        elif ac > 1:
                            gj, hj = _run_grad_sums_smooth(x[i, c, j0:e], dy[i, c, j0:e], hi, lo, sc, bc, ac)
                        else:
                            gj, hj = _run_grad_sums(x[i, c, j0:e], dy[i, c, j0:e], y[i, c, j0:e], hi, lo,
                                                    sc, bc, sv, elu)
                        gb[c - cb] += gj
                        hb[c - cb] += hj
        for c in range(cb, ce):
            g = gb[c - cb]
            # Σ dz·(x − hi) − lo·Σ dz = Σ dz·(x − mean)
            hs = hb[c - cb] - cst[1, c] * g if sums or hasres else 0.0
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
                elif ac > 1:
                    for j in range(L):
                        d = (x[i, c, j] - hi) - lo
                        z = d * sc + bc
                        dzs = dy[i, c, j] * _smooth_grad(np.float64(z), ac)
                        dx[i, c, j] = sc * dzs + q * d + r
                elif nt:
                    dxr = dx[i, c]
                    for j in range(L):
                        v = _dx1(x[i, c, j], src[i, c, j], hi, lo, sc, bc, q, r, zero, one, ng)
                        _stream.store(dxr, j, v)
                else:
                    for j in range(L):
                        dx[i, c, j] = _dx1(x[i, c, j], src[i, c, j], hi, lo, sc, bc, q, r, zero, one, ng)
    if nt:
        _stream.fence()
