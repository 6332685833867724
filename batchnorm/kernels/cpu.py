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
  (NCHW, NCDHW, (N, C, L), …). ``prange`` over channels: one thread owns a channel and walks its
  N contiguous runs of L values, so the statistics sweep and the normalise sweep of a channel
  follow each other while the channel is still in the 2 MiB L2 cache.
* ``(M, C)``: channels innermost — (N, C) input, channels-last memory (NHWC/NDHWC with
  ``channel_axis=1``) or a logically channels-last tensor (``channel_axis=-1``). ``prange`` over
  blocks of rows; each block keeps its own per-channel vector of partial sums; the vectors are
  added up after the parallel loop.

Passes over memory: train forward reads x once for the statistics and once more to write y (the
second read comes from cache in the ``(N, C, L)`` layout); the backward reads x and dy once for
g and h and once more to write dx; eval reads x and writes y. The backward needs only x, dy and
the per-channel mean and variance: relu/leaky_relu masks are recomputed from ``z = x̂·γ + β``
(cheaper than reading y); ELU reads ``y`` for ``act'(z) = y + α``.

Numerics, where they happen:

* Everything is computed in float64 inside the kernels, whatever the input dtype (the float32
  loads are widened; the arithmetic is not the bottleneck, memory is). Outputs are rounded once to
  the input dtype, so float32 results equal the float64 oracle to float32 rounding.
* Statistics in one sweep with a **shift**: with ``k`` = the channel's first value,
  ``S₁ = Σ (x − k)``, ``S₂ = Σ (x − k)²``, ``mean = k + S₁/n``, ``var = S₂/n − (S₁/n)²``. Because
  ``k`` is one of the data, ``|mean − k|`` is a few standard deviations and the subtraction does
  not cancel even when ``|mean| ≫ std`` (float32 data of mean 1e4 and std 1 keeps float32
  accuracy). If the shift happens to be far out (``(mean − k)² > 10⁶·var``, e.g. an outlier
  first value) the variance is recomputed two-pass, ``Σ (x − mean)² / n``, which is exact. The
  variance is clamped at 0; NaN/Inf propagate (no ``nnan``/``ninf`` fast-math flags), so the
  ``nonfinite`` policies of the modules see them as with torch.
* ``fastmath`` allows re-association and contraction only (``reassoc``, ``contract``): the sums
  vectorise; in float64 the re-ordering changes results by ~1e-16 relative.
* The batch mean and variance are returned as **float64** tensors (the torch backend returns the
  accumulation dtype): the backward re-reads x and needs the mean to better than float32 precision
  when ``|mean| ≫ std``; running statistics are cast to their buffer dtype by the caller.

Activations are one run-time integer code (0 identity, 1 relu, 2 leaky_relu, 3 elu with
``α = slope``), so each kernel compiles once per dtype: 4 kernels × {float32, float64}.

Compilation: lazily at first use, ``cache=True``, cache folder from
:mod:`batchnorm.kernels._numba_setup`. Importing :mod:`batchnorm` does not import this module or
numba. Threads: numba's parallel loops use ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import _pool
from ._numba_setup import configure, sync_threads

configure()  # the cache folder must be known before numba is imported

import numba as nb  # noqa: E402

__all__ = ["backward", "eval_backward", "eval_forward", "name", "supports", "train_forward"]

name = "numba"

_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "elu": 3}
_FM = {"reassoc", "contract"}  # vectorisable sums; no nnan/ninf, so NaN/Inf behave like torch
_JIT = {"cache": True, "fastmath": _FM, "nogil": True, "error_model": "numpy"}
_SHIFT_GUARD = 1e6  # (mean − shift)² / var above this: redo the variance two-pass


# =============================================================================================
# Kernels. Arrays: x, y, dy, dx in the input dtype; mean, var, w, b, dw, db float64 (C,).
# `neg` is the slope of the piecewise-linear activations for z ≤ 0: identity 1, relu 0, leaky s.
# =============================================================================================
@nb.njit(**_JIT)
def _neg_slope(code, slope):
    if code == 0:
        return 1.0
    if code == 1:
        return 0.0
    return slope


# --------------------------------------------------------------------------------- (N, C, L)
@nb.njit(parallel=True, **_JIT)
def _forward_ncl(x, y, mean, var, w, b, eps, train, code, slope):
    """Train (``train``: statistics into mean/var first) or eval forward, one channel per thread."""
    N, C, L = x.shape
    n = N * L
    neg = _neg_slope(code, slope)
    for c in nb.prange(C):
        if train:
            k = np.float64(x[0, c, 0])  # the shift (see module docstring)
            s1 = 0.0
            s2 = 0.0
            for i in range(N):
                for j in range(L):
                    d = x[i, c, j] - k
                    s1 += d
                    s2 += d * d
            dm = s1 / n
            m = k + dm
            v = s2 / n - dm * dm
            if dm * dm > _SHIFT_GUARD * v:  # far-out shift: exact two-pass variance
                s2 = 0.0
                for i in range(N):
                    for j in range(L):
                        d = x[i, c, j] - m
                        s2 += d * d
                v = s2 / n
            if v < 0.0:  # (NaN stays NaN)
                v = 0.0
            mean[c] = m
            var[c] = v
        m = mean[c]
        inv = 1.0 / math.sqrt(var[c] + eps)
        sc = w[c] * inv
        bc = b[c]
        if code == 3:
            for i in range(N):
                for j in range(L):
                    z = (x[i, c, j] - m) * sc + bc
                    y[i, c, j] = z if z > 0.0 else slope * math.expm1(z)
        else:
            for i in range(N):
                for j in range(L):
                    z = (x[i, c, j] - m) * sc + bc
                    y[i, c, j] = z if z > 0.0 else z * neg


@nb.njit(parallel=True, **_JIT)
def _backward_ncl(x, dy, y, dx, mean, var, w, b, eps, train, sums, code, slope, dw, db):
    """Backward, one channel per thread: pass 1 g, h (if ``sums``); pass 2 dx.

    ``train``: dx = sc·dz − sc·g/n − (x − μ)·sc·invstd²·h/n (batch statistics depend on x);
    eval: dx = sc·dz. ``y`` is read only for ELU (act' = y + α).
    """
    N, C, L = x.shape
    n = N * L
    neg = _neg_slope(code, slope)
    for c in nb.prange(C):
        m = mean[c]
        inv = 1.0 / math.sqrt(var[c] + eps)
        sc = w[c] * inv
        bc = b[c]
        g = 0.0
        hs = 0.0  # Σ dz · (x − μ);  h = invstd · hs
        if sums:
            if code == 3:
                for i in range(N):
                    for j in range(L):
                        d = x[i, c, j] - m
                        z = d * sc + bc
                        dz = dy[i, c, j] * (1.0 if z > 0.0 else y[i, c, j] + slope)
                        g += dz
                        hs += dz * d
            else:
                for i in range(N):
                    for j in range(L):
                        d = x[i, c, j] - m
                        z = d * sc + bc
                        dz = dy[i, c, j] * (1.0 if z > 0.0 else neg)
                        g += dz
                        hs += dz * d
        dw[c] = hs * inv
        db[c] = g
        q = -sc * inv * inv * hs / n if train else 0.0
        r = -sc * g / n if train else 0.0
        if code == 3:
            for i in range(N):
                for j in range(L):
                    d = x[i, c, j] - m
                    z = d * sc + bc
                    dz = dy[i, c, j] * (1.0 if z > 0.0 else y[i, c, j] + slope)
                    dx[i, c, j] = sc * dz + q * d + r
        else:
            for i in range(N):
                for j in range(L):
                    d = x[i, c, j] - m
                    z = d * sc + bc
                    dz = dy[i, c, j] * (1.0 if z > 0.0 else neg)
                    dx[i, c, j] = sc * dz + q * d + r


# ------------------------------------------------------------------------------------ (M, C)
@nb.njit(parallel=True, **_JIT)
def _forward_mc(x, y, mean, var, w, b, eps, train, code, slope, nblk):
    """Train or eval forward over rows; block t of rows is [t·M/nblk, (t+1)·M/nblk)."""
    M, C = x.shape
    neg = _neg_slope(code, slope)
    if train:
        k = np.empty(C)  # shift: the first row
        for c in range(C):
            k[c] = x[0, c]
        p1 = np.zeros((nblk, C))
        p2 = np.zeros((nblk, C))
        for t in nb.prange(nblk):
            a1 = p1[t]
            a2 = p2[t]
            for i in range(t * M // nblk, (t + 1) * M // nblk):
                for c in range(C):
                    d = x[i, c] - k[c]
                    a1[c] += d
                    a2[c] += d * d
        for c in range(C):
            s1 = 0.0
            s2 = 0.0
            for t in range(nblk):
                s1 += p1[t, c]
                s2 += p2[t, c]
            dm = s1 / M
            m = k[c] + dm
            v = s2 / M - dm * dm
            if dm * dm > _SHIFT_GUARD * v:  # far-out shift: exact two-pass variance (rare)
                s2 = 0.0
                for i in range(M):
                    d = x[i, c] - m
                    s2 += d * d
                v = s2 / M
            if v < 0.0:
                v = 0.0
            mean[c] = m
            var[c] = v
    sc = np.empty(C)
    for c in range(C):
        sc[c] = w[c] * (1.0 / math.sqrt(var[c] + eps))
    for t in nb.prange(nblk):
        for i in range(t * M // nblk, (t + 1) * M // nblk):
            if code == 3:
                for c in range(C):
                    z = (x[i, c] - mean[c]) * sc[c] + b[c]
                    y[i, c] = z if z > 0.0 else slope * math.expm1(z)
            else:
                for c in range(C):
                    z = (x[i, c] - mean[c]) * sc[c] + b[c]
                    y[i, c] = z if z > 0.0 else z * neg


@nb.njit(parallel=True, **_JIT)
def _backward_mc(x, dy, y, dx, mean, var, w, b, eps, train, sums, code, slope, dw, db, nblk):
    """Backward over rows: per-block partial g, h vectors, summed; then dx (see _backward_ncl)."""
    M, C = x.shape
    neg = _neg_slope(code, slope)
    inv = np.empty(C)
    sc = np.empty(C)
    for c in range(C):
        inv[c] = 1.0 / math.sqrt(var[c] + eps)
        sc[c] = w[c] * inv[c]
    pg = np.zeros((nblk, C))
    ph = np.zeros((nblk, C))
    if sums:
        for t in nb.prange(nblk):
            ag = pg[t]
            ah = ph[t]
            for i in range(t * M // nblk, (t + 1) * M // nblk):
                if code == 3:
                    for c in range(C):
                        d = x[i, c] - mean[c]
                        z = d * sc[c] + b[c]
                        dz = dy[i, c] * (1.0 if z > 0.0 else y[i, c] + slope)
                        ag[c] += dz
                        ah[c] += dz * d
                else:
                    for c in range(C):
                        d = x[i, c] - mean[c]
                        z = d * sc[c] + b[c]
                        dz = dy[i, c] * (1.0 if z > 0.0 else neg)
                        ag[c] += dz
                        ah[c] += dz * d
    q = np.zeros(C)
    r = np.zeros(C)
    for c in range(C):
        g = 0.0
        hs = 0.0
        for t in range(nblk):
            g += pg[t, c]
            hs += ph[t, c]
        dw[c] = hs * inv[c]
        db[c] = g
        if train:
            q[c] = -sc[c] * inv[c] * inv[c] * hs / M
            r[c] = -sc[c] * g / M
    for t in nb.prange(nblk):
        for i in range(t * M // nblk, (t + 1) * M // nblk):
            if code == 3:
                for c in range(C):
                    d = x[i, c] - mean[c]
                    z = d * sc[c] + b[c]
                    dz = dy[i, c] * (1.0 if z > 0.0 else y[i, c] + slope)
                    dx[i, c] = sc[c] * dz + q[c] * d + r[c]
            else:
                for c in range(C):
                    d = x[i, c] - mean[c]
                    z = d * sc[c] + b[c]
                    dz = dy[i, c] * (1.0 if z > 0.0 else neg)
                    dx[i, c] = sc[c] * dz + q[c] * d + r[c]


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


def _like(src: torch.Tensor, x: torch.Tensor, plan) -> torch.Tensor:
    """``src`` in x's dtype and memory layout (a copy only if it is not already)."""
    if src.dtype == x.dtype and src.shape == x.shape:
        try:
            _np(src, plan)
            return src
        except RuntimeError:
            pass
    return _empty_like(x).copy_(src)


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    return _pool.empty_like(x)


def _vec(t: torch.Tensor | None, c: int, fill: float) -> np.ndarray:
    if t is None:
        return np.full(c, fill)
    return t.detach().to(torch.float64).reshape(c).numpy()


def _nblk(m: int) -> int:
    return max(1, min(m, 4 * nb.get_num_threads()))


def supports(x: torch.Tensor, channel_axis: int, act: str) -> bool:
    """float32/float64 CPU tensors, contiguous or channels-last, plain torch.Tensor (not a subclass)."""
    return (type(x) in (torch.Tensor, torch.nn.Parameter)
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and x.layout == torch.strided
            and x.numel() > 0
            and act in _CODES
            and _plan(x, channel_axis % x.ndim) is not None)


def _forward(x, mean_np, var_np, weight, bias, eps, axis, act, slope, train):
    plan = _plan(x, axis)
    c = x.shape[axis]
    sync_threads()
    y = _empty_like(x)
    xa, ya = _np(x, plan), _np(y, plan)
    w, b = _vec(weight, c, 1.0), _vec(bias, c, 0.0)
    code = _CODES[act]
    if plan[0] == "ncl":
        _forward_ncl(xa, ya, mean_np, var_np, w, b, float(eps), train, code, float(slope))
    else:
        _forward_mc(xa, ya, mean_np, var_np, w, b, float(eps), train, code, float(slope), _nblk(xa.shape[0]))
    return y


def train_forward(x, weight, bias, eps, channel_axis, act, slope):
    """Training forward; returns ``(y, batch_mean, biased_batch_var)`` with float64 statistics."""
    c = x.shape[channel_axis]
    mean = torch.empty(c, dtype=torch.float64)
    var = torch.empty(c, dtype=torch.float64)
    y = _forward(x, mean.numpy(), var.numpy(), weight, bias, eps, channel_axis, act, slope, True)
    return y, mean, var


def eval_forward(x, mean, var, weight, bias, eps, channel_axis, act, slope):
    """``act((x − mean) · γ / sqrt(var + ε) + β)`` with given statistics; output in x's dtype."""
    c = x.shape[channel_axis]
    return _forward(x, _vec(mean, c, 0.0), _vec(var, c, 1.0), weight, bias, eps, channel_axis, act, slope,
                    False)


def _backward(dy, x, y, weight, bias, mean, var, eps, axis, act, slope, train):
    plan = _plan(x, axis)
    c = x.shape[axis]
    sync_threads()
    dy = _like(dy, x, plan)
    code = _CODES[act]
    if code == 3:
        if y is None:  # ELU's derivative is read from its output; recompute it if not given
            y = eval_forward(x, mean, var, weight, bias, eps, axis, act, slope)
        y = _like(y, x, plan)
    else:
        y = x  # not read; same array type keeps a single compiled specialisation
    dx = _empty_like(x)
    xa, dya, ya, dxa = _np(x, plan), _np(dy, plan), _np(y, plan), _np(dx, plan)
    w, b = _vec(weight, c, 1.0), _vec(bias, c, 0.0)
    m, v = _vec(mean, c, 0.0), _vec(var, c, 1.0)
    dw = np.empty(c)
    db = np.empty(c)
    sums = train or weight is not None or bias is not None
    if plan[0] == "ncl":
        _backward_ncl(xa, dya, ya, dxa, m, v, w, b, float(eps), train, sums, code, float(slope), dw, db)
    else:
        _backward_mc(xa, dya, ya, dxa, m, v, w, b, float(eps), train, sums, code, float(slope), dw, db,
                     _nblk(xa.shape[0]))
    dweight = None if weight is None else torch.from_numpy(dw).to(weight.dtype)
    dbias = None if bias is None else torch.from_numpy(db).to(bias.dtype)
    return dx, dweight, dbias


def backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope):
    """Training backward (dx, dγ, dβ) in two passes; ``mean``/``var`` are train_forward's statistics."""
    return _backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope, True)


def eval_backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope):
    """Backward of :func:`eval_forward` w.r.t. x, γ, β (statistics are constants)."""
    return _backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope, False)
