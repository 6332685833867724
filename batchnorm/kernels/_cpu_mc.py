"""The ``(M, C)`` kernels: channels innermost — (N, C) input, channels-last memory, ``channel_axis=-1``.

Same formulas as the ``(N, C, L)`` kernels (:mod:`batchnorm.kernels._cpu_ncl`), with the
reference in :mod:`batchnorm.kernels.torch_backend`. A call handles rows ``[r0, r1)``; threads
keep per-channel partial sums over ``R·C`` lanes (``R = max(1, 1024 // C)`` rows at a time) that
are added up afterwards, so the per-channel sums vectorise without re-association.
"""

from __future__ import annotations

import math

import numpy as np

from ._numba_setup import configure

configure()  # the cache folder must be known before numba is imported

import numba as nb  # noqa: E402

from . import _stream  # noqa: E402
from ._cpu_common import (  # noqa: E402
    _LANES,
    _ROWS,
    _SHIFT_GUARD,
    _STRICT,
    _dx1,
    _finish_stats,
    _out,
    _out_res,
    _set_constants,
    _smooth,
    _smooth_grad,
)


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
def _apply_mc(x, res, y, ac, hasres, nt, cst, sv, r0, r1):
    """y = act(((x − hi) − lo)·sc + β [+ res]) for rows [r0, r1); ``ac``: activation code (_KIND);
    ``hasres``: add the residual (code 0 only); ``nt``: stream y (code 0, no residual; rows on 64-byte
    lines)."""
    C = x.shape[1]
    zero, neg, alpha = sv[0], sv[2], sv[3]
    hi, lo, sc, bb = cst[0], cst[1], cst[2], cst[3]
    for i in range(r0, r1):
        if ac == 1:
            for c in range(C):
                z = ((x[i, c] - hi[c]) - lo[c]) * sc[c] + bb[c]
                y[i, c] = z if z > zero else alpha * math.expm1(z)
        elif ac > 1:
            for c in range(C):
                z = ((x[i, c] - hi[c]) - lo[c]) * sc[c] + bb[c]
                y[i, c] = _smooth(np.float64(z), ac)
        elif hasres:
            for c in range(C):
                y[i, c] = _out_res(x[i, c], res[i, c], hi[c], lo[c], sc[c], bb[c], zero, neg)
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
def _grad_sums_mc(x, dy, y, ac, cst, sv, pg, ph, r0, r1):
    """pg, ph (float64 vectors, overwritten) ← g = Σ dz and h' = Σ dz·(x − hi) of rows [r0, r1).

    Same lane layout as :func:`_sums_mc`: groups of R rows as W = R·C lanes, four groups per update;
    ELU (whose derivative reads y) and the smooth activations (``ac`` >= 2: act'(z) by _smooth_grad)
    go row by row, which keeps the compiled code small.
    """
    M, C = x.shape
    R, W = _lanes(C)
    zero, one, neg, alpha = sv[0], sv[1], sv[2], sv[3]
    for c in range(C):
        pg[c] = 0.0
        ph[c] = 0.0
    hw, lw, sw, bw = _tile(cst[0], W), _tile(cst[1], W), _tile(cst[2], W), _tile(cst[3], W)
    elu = ac == 1
    groups = 0 if ac != 0 else (r1 - r0) // R // 4 * 4  # whole groups, in fours (others: row by row)
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
            if ac > 1:
                for c in range(C):
                    d = x[i, c] - hw[c]
                    z = (d - lw[c]) * sw[c] + bw[c]
                    dzs = dy[i, c] * _smooth_grad(np.float64(z), ac)
                    ag[c] += dzs
                    ah[c] += dzs * d
            else:
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
def _dx_mc(x, dy, y, dx, ac, nt, cst, sv, r0, r1):
    """dx = sc·dz + q·(x − μ) + r for rows [r0, r1); ``nt``: stream dx (code 0; rows on 64-byte lines)."""
    C = x.shape[1]
    zero, one, neg, alpha = sv[0], sv[1], sv[2], sv[3]
    hi, lo, sc, bb, q, r = cst[0], cst[1], cst[2], cst[3], cst[4], cst[5]
    for i in range(r0, r1):
        if ac == 1:
            for c in range(C):
                d = (x[i, c] - hi[c]) - lo[c]
                z = d * sc[c] + bb[c]
                dz = dy[i, c] * (one if z > zero else y[i, c] + alpha)
                dx[i, c] = sc[c] * dz + q[c] * d + r[c]
        elif ac > 1:
            for c in range(C):
                d = (x[i, c] - hi[c]) - lo[c]
                z = d * sc[c] + bb[c]
                dzs = dy[i, c] * _smooth_grad(np.float64(z), ac)
                dx[i, c] = sc[c] * dzs + q[c] * d + r[c]
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
