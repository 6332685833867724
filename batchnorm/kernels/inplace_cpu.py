"""numba CPU kernels for in-place activated BN (InPlace-ABN): forward in place, backward from the output.

Used by :mod:`batchnorm.inplace` for float32/float64 CPU tensors whose memory is either

* ``(N, C, L)`` — a contiguous tensor with channels on any axis, viewed as (before, C, after);
  one thread owns whole channels (``prange`` over C), so the two statistics passes and the write
  pass over a channel run from cache: about one read of ``x`` from memory and one write of ``y``;
* ``(M, C)`` — channels innermost (``(N, C)`` input, channels-last memory, ``channel_axis=-1``);
  threads own row blocks and keep per-block partial sums that are merged afterwards.

Numerics (the same as :mod:`batchnorm.stats`): sums in float64 whatever the input dtype, the
variance two-pass (mean first, then the mean squared deviation from it), clamped at 0. Partial
per-block moments of the ``(M, C)`` layout are merged with Chan's count-weighted formula, the
formula of :func:`batchnorm.stats.merge_moments`, written out here because it runs inside a
compiled kernel. ``fastmath`` allows re-association and contraction only (so sums vectorise);
NaN and Inf propagate as in torch.

Activation codes: 0 identity, 1 leaky_relu (slope > 0), 2 elu (α > 0). Every kernel takes the
activation as a run-time argument so one compilation serves all three. The backward never sees
``x``: it inverts the activation (``z = y`` for y > 0, ``z = y / slope`` or ``z = log1p(y / α)``
otherwise), recovers ``x̂ = (z − β) / γ`` and reads ``act'(z)`` from ``y`` (1, slope, or y + α).

Compiled lazily on first call, ``cache=True``, in the cache folder chosen by
:mod:`batchnorm.kernels._numba_setup` (``NUMBA_CACHE_DIR`` if set). ``error_model="numpy"`` so
divisions are not guarded by Python's ZeroDivisionError check (which blocks vectorisation).
Threads: :mod:`batchnorm.inplace` sets them before each call — as many as torch uses
(:func:`batchnorm.kernels._numba_setup.sync_threads`), or one for small inputs.
"""

from __future__ import annotations

import math

import numpy as np

from ._numba_setup import configure

configure()  # the cache folder must be known before numba is imported

import numba as nb  # noqa: E402

__all__ = [
    "apply_mc",
    "apply_ncl",
    "backward_mc",
    "backward_ncl",
    "train_forward_mc",
    "train_forward_ncl",
]

_FM = {"reassoc", "contract"}  # vectorisable sums; no nnan/ninf, so NaN/Inf behave like torch
_JIT = {"cache": True, "fastmath": _FM, "nogil": True, "error_model": "numpy"}


@nb.njit(inline="always", fastmath=_FM, error_model="numpy")
def _act(z, act, slope):
    if act == 1:
        return z if z > 0 else z * slope
    if act == 2:
        return z if z > 0 else slope * math.expm1(z)
    return z


@nb.njit(inline="always", fastmath=_FM, error_model="numpy")
def _inv(yv, act, slope, inv_slope):
    """(z, act'(z)) from y = act(z)."""
    if act == 1:
        if yv > 0:
            return yv, 1.0
        return yv * inv_slope, slope
    if act == 2:
        if yv > 0:
            return yv, 1.0
        # y >= -α in exact arithmetic; rounding may put it a hair below: clamp the log argument
        # (those elements have act'(z) = y + α ≈ 0, so their x̂ barely matters).
        r = yv * inv_slope
        if r < -1.0 + 1e-15:
            r = -1.0 + 1e-15
        return math.log1p(r), yv + slope
    return yv, 1.0


# --------------------------------------------------------------------------------------- (N, C, L)
@nb.njit(parallel=True, **_JIT)
def train_forward_ncl(x, y, w, b, eps, act, slope, mean_out, var_out):
    """Batch statistics and ``y = act(γ (x − μ)/sqrt(σ² + ε) + β)``; ``y`` may be ``x`` (in place)."""
    N, C, L = x.shape
    n = N * L
    for c in nb.prange(C):
        s = 0.0
        for i in range(N):
            for j in range(L):
                s += x[i, c, j]
        m = s / n
        ss = 0.0
        for i in range(N):
            for j in range(L):
                d = x[i, c, j] - m
                ss += d * d
        v = max(ss / n, 0.0)
        scale = w[c] / math.sqrt(v + eps)
        beta = b[c]
        for i in range(N):
            for j in range(L):
                y[i, c, j] = _act((x[i, c, j] - m) * scale + beta, act, slope)
        mean_out[c] = m
        var_out[c] = v


@nb.njit(parallel=True, **_JIT)
def apply_ncl(x, y, mean, scale, b, act, slope):
    """``y = act((x − mean) · scale + β)`` with given per-channel statistics (eval mode)."""
    N, C, L = x.shape
    for c in nb.prange(C):
        m = mean[c]
        k = scale[c]
        beta = b[c]
        for i in range(N):
            for j in range(L):
                y[i, c, j] = _act((x[i, c, j] - m) * k + beta, act, slope)


@nb.njit(parallel=True, **_JIT)
def backward_ncl(y, dy, dx, w, b, invstd, act, slope, train, g_out, h_out):
    """Backward from the output: ``dx`` (may be ``dy``), ``g = Σ dz`` and ``h = Σ dz·x̂`` per channel.

    ``train``: ``dx = γ·invstd·(dz − g/n − x̂·h/n)``; otherwise (eval, statistics constant)
    ``dx = γ·invstd·dz``. ``w`` must not contain 0 (the caller clamps |γ|).
    """
    N, C, L = y.shape
    n = N * L
    inv_slope = 1.0 / slope if slope != 0 else 0.0
    for c in nb.prange(C):
        gam = w[c]
        inv_g = 1.0 / gam
        beta = b[c]
        g = 0.0
        h = 0.0
        for i in range(N):
            for j in range(L):
                z, d = _inv(y[i, c, j], act, slope, inv_slope)
                dz = dy[i, c, j] * d
                g += dz
                h += dz * ((z - beta) * inv_g)
        k = gam * invstd[c]
        gn = g / n if train else 0.0
        hn = h / n if train else 0.0
        for i in range(N):
            for j in range(L):
                z, d = _inv(y[i, c, j], act, slope, inv_slope)
                dz = dy[i, c, j] * d
                dx[i, c, j] = k * (dz - gn - ((z - beta) * inv_g) * hn)
        g_out[c] = g
        h_out[c] = h


# ------------------------------------------------------------------------------------------ (M, C)
def _blocks(m: int) -> int:
    # enough blocks for every thread, each at least a few rows long
    return max(1, min(m // 8 if m >= 8 else 1, 4 * nb.get_num_threads()))


@nb.njit(parallel=True, **_JIT)
def _mc_partial_moments(x, nblk, counts, means, m2s):
    M, C = x.shape
    step = (M + nblk - 1) // nblk
    for k in nb.prange(nblk):
        lo = k * step
        hi = min(M, lo + step)
        cnt = max(hi - lo, 0)
        counts[k] = cnt
        acc = np.zeros(C)
        for r in range(lo, hi):
            for c in range(C):
                acc[c] += x[r, c]
        for c in range(C):
            means[k, c] = acc[c] / cnt if cnt > 0 else 0.0
        acc[:] = 0.0
        for r in range(lo, hi):
            for c in range(C):
                d = x[r, c] - means[k, c]
                acc[c] += d * d
        for c in range(C):
            m2s[k, c] = acc[c]


@nb.njit(**_JIT)
def _chan_merge(counts, means, m2s, mean_out, var_out):
    """Chan et al.: μ = Σ nₖ μₖ / n,  M2 = Σ M2ₖ + Σ nₖ (μₖ − μ)²  (as batchnorm.stats.merge_moments)."""
    K, C = means.shape
    n = 0.0
    for k in range(K):
        n += counts[k]
    for c in range(C):
        mu = 0.0
        for k in range(K):
            mu += counts[k] / n * means[k, c]
        m2 = 0.0
        for k in range(K):
            d = means[k, c] - mu
            m2 += m2s[k, c] + counts[k] * d * d
        mean_out[c] = mu
        var_out[c] = max(m2 / n, 0.0)


@nb.njit(parallel=True, **_JIT)
def _mc_apply(x, y, nblk, mean, scale, b, act, slope):
    M, C = x.shape
    step = (M + nblk - 1) // nblk
    for k in nb.prange(nblk):
        lo = k * step
        hi = min(M, lo + step)
        for r in range(lo, hi):
            for c in range(C):
                y[r, c] = _act((x[r, c] - mean[c]) * scale[c] + b[c], act, slope)


@nb.njit(parallel=True, **_JIT)
def _mc_grad_sums(y, dy, nblk, inv_w, b, act, slope, gs, hs):
    M, C = y.shape
    step = (M + nblk - 1) // nblk
    inv_slope = 1.0 / slope if slope != 0 else 0.0
    for k in nb.prange(nblk):
        lo = k * step
        hi = min(M, lo + step)
        g = np.zeros(C)
        h = np.zeros(C)
        for r in range(lo, hi):
            for c in range(C):
                z, d = _inv(y[r, c], act, slope, inv_slope)
                dz = dy[r, c] * d
                g[c] += dz
                h[c] += dz * ((z - b[c]) * inv_w[c])
        for c in range(C):
            gs[k, c] = g[c]
            hs[k, c] = h[c]


@nb.njit(parallel=True, **_JIT)
def _mc_dx(y, dy, dx, nblk, inv_w, b, k_c, gn, hn, act, slope):
    M, C = y.shape
    step = (M + nblk - 1) // nblk
    inv_slope = 1.0 / slope if slope != 0 else 0.0
    for k in nb.prange(nblk):
        lo = k * step
        hi = min(M, lo + step)
        for r in range(lo, hi):
            for c in range(C):
                z, d = _inv(y[r, c], act, slope, inv_slope)
                dz = dy[r, c] * d
                dx[r, c] = k_c[c] * (dz - gn[c] - ((z - b[c]) * inv_w[c]) * hn[c])


def train_forward_mc(x, y, w, b, eps, act, slope, mean_out, var_out):
    """``(M, C)`` version of :func:`train_forward_ncl` (block partial moments, Chan merge)."""
    M, C = x.shape
    nblk = _blocks(M)
    counts = np.zeros(nblk)
    means = np.zeros((nblk, C))
    m2s = np.zeros((nblk, C))
    _mc_partial_moments(x, nblk, counts, means, m2s)
    _chan_merge(counts, means, m2s, mean_out, var_out)
    scale = w / np.sqrt(var_out + eps)
    _mc_apply(x, y, nblk, mean_out, scale, b, act, slope)


def apply_mc(x, y, mean, scale, b, act, slope):
    """``(M, C)`` version of :func:`apply_ncl`."""
    _mc_apply(x, y, _blocks(x.shape[0]), mean, scale, b, act, slope)


def backward_mc(y, dy, dx, w, b, invstd, act, slope, train, g_out, h_out):
    """``(M, C)`` version of :func:`backward_ncl`."""
    M, C = y.shape
    nblk = _blocks(M)
    gs = np.zeros((nblk, C))
    hs = np.zeros((nblk, C))
    inv_w = 1.0 / w
    _mc_grad_sums(y, dy, nblk, inv_w, b, act, slope, gs, hs)
    g = gs.sum(0)
    h = hs.sum(0)
    k_c = w * invstd
    zero = np.zeros(C)
    _mc_dx(y, dy, dx, nblk, inv_w, b, k_c, g / M if train else zero, h / M if train else zero, act, slope)
    g_out[:] = g
    h_out[:] = h
