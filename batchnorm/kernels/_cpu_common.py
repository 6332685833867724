"""Compile flags, tuning constants and the scalar/run helpers both memory layouts' kernels share.

Part of the ``"numba"`` backend (:mod:`batchnorm.kernels.cpu` explains the design, the numerics
and the measurements); the reference formulas are :mod:`batchnorm.kernels.torch_backend`'s.
"""

from __future__ import annotations

import math

import numpy as np

from ._numba_setup import configure

configure()  # the cache folder must be known before numba is imported

import numba as nb  # noqa: E402

_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "elu": 3, "silu": 4, "hardswish": 5, "gelu": 6,
          "gelu_tanh": 7, "sigmoid": 8, "tanh": 9}
# The kernels' run-time activation code ``ac``: 0 the piecewise-linear family (identity, relu,
# leaky_relu: one vectorised code path with the slope in sv), 1 ELU (its derivative read from y), and
# >= 2 the smooth activations, evaluated by _smooth / _smooth_grad (float64, from z). One compiled
# kernel serves them all: a new activation is a new branch, not a new specialisation.
_KIND = {"identity": 0, "relu": 0, "leaky_relu": 0, "elu": 1, "silu": 2, "hardswish": 3, "gelu": 4,
         "gelu_tanh": 5, "sigmoid": 6, "tanh": 7}
_SQRT1_2 = 0.7071067811865476  # 1/√2
_INV_SQRT_2PI = 0.3989422804014327  # 1/√(2π)
_K_TANH = 0.7978845608028654  # √(2/π), GELU's tanh approximation (Hendrycks & Gimpel 2016)
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


@nb.njit(**_SUMS)
def _run_grad_sums_res(xr, dyr, yr, dzr, hi, sv):
    """The residual backward's first sweep over a run: dz = dy·act'(z) with act' read from y (as
    torch's threshold/leaky_relu backward do; a slope ≥ 0), written to ``dzr`` (it is the residual's
    gradient, and the dx sweep's input), and g = Σ dz, h' = Σ dz·(x − hi)."""
    zero, one, neg = sv[0], sv[1], sv[2]
    ag = zero
    ah = zero
    for j in range(xr.shape[0]):
        dz = dyr[j] * (one if yr[j] > zero else neg)
        dzr[j] = dz
        ag += dz
        ah += dz * (xr[j] - hi)
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


@nb.njit(**_STRICT)
def _smooth(z, ac):
    """The smooth activations (``ac`` >= 2) of a float64 z, as torch defines them:
    silu z·σ(z); hardswish z·clamp(z + 3, 0, 6)/6; gelu z·Φ(z) (erf); gelu_tanh
    ½z(1 + tanh(√(2/π)(z + 0.044715 z³))); sigmoid σ(z) = 1/(1 + e^−z); tanh."""
    if ac == 2:
        return z / (1.0 + math.exp(-z))
    if ac == 3:
        return z * min(max(z + 3.0, 0.0), 6.0) / 6.0
    if ac == 4:
        return 0.5 * z * (1.0 + math.erf(z * _SQRT1_2))
    if ac == 5:
        return 0.5 * z * (1.0 + math.tanh(_K_TANH * (z + 0.044715 * z * z * z)))
    if ac == 6:
        return 1.0 / (1.0 + math.exp(-z))
    return math.tanh(z)


@nb.njit(**_STRICT)
def _smooth_grad(z, ac):
    """d act/dz of :func:`_smooth` at a float64 z (hardswish as torch's backward: 0 for z ≤ −3,
    z/3 + ½ for −3 < z < 3, 1 from 3 on)."""
    if ac == 2:
        s = 1.0 / (1.0 + math.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    if ac == 3:
        if z <= -3.0:
            return 0.0
        return z / 3.0 + 0.5 if z < 3.0 else 1.0
    if ac == 4:
        return 0.5 * (1.0 + math.erf(z * _SQRT1_2)) + z * _INV_SQRT_2PI * math.exp(-0.5 * z * z)
    if ac == 5:
        t = math.tanh(_K_TANH * (z + 0.044715 * z * z * z))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _K_TANH * (1.0 + 3.0 * 0.044715 * z * z)
    if ac == 6:
        s = 1.0 / (1.0 + math.exp(-z))
        return s * (1.0 - s)
    t = math.tanh(z)
    return 1.0 - t * t


@nb.njit(**_SUMS)
def _run_grad_sums_smooth(xr, dyr, hi, lo, sc, b, ac):
    """:func:`_run_grad_sums` for a smooth activation: g, h' in float64 (dz from z, never from y)."""
    ag = 0.0
    ah = 0.0
    for j in range(xr.shape[0]):
        d = xr[j] - hi
        z = (d - lo) * sc + b
        dz = dyr[j] * _smooth_grad(np.float64(z), ac)
        ag += dz
        ah += dz * d
    return ag, ah


@nb.njit(**_STRICT)
def _out_res(xv, rv, hi, lo, sc, bb, zero, neg):
    """act(((x − hi) − lo)·sc + β + r) for identity, relu, leaky_relu: BN, residual add, activation."""
    z = (((xv - hi) - lo) * sc + bb) + rv
    return z if z > zero else z * neg + zero


# The loops that write y or dx come in two copies, plain and streaming (_stream.store, for rows that
# start on a 64-byte line): with the choice inside one loop, the loop vectorises only if LLVM
# unswitches it, which it does not in every compilation (a 3× slower eval, measured).
