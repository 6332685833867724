"""Float64 NumPy references for the BN family (Batch Renorm, Ghost BN), written from the papers.

Kept separate from the library on purpose: these are the formulas as printed, loops and all, so the
library's fused/reshaped implementations are checked against something that shares no code path
with them (only :mod:`batchnorm.reference`, itself the float64 BN oracle).
"""

from __future__ import annotations

import numpy as np

from batchnorm import reference as ref


def _bshape(ndim: int, axis: int, c: int) -> tuple[int, ...]:
    s = [1] * ndim
    s[axis % ndim] = c
    return tuple(s)


def _axes(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a != axis % ndim)


# -- Batch Renormalization (Ioffe 2017, Algorithm 1) ---------------------------------------------

def renorm_rd(x, running_mean, running_var, eps, r_max, d_max, axis=1):
    """r = clip(σ_B/σ, 1/r_max, r_max), d = clip((μ_B − μ)/σ, −d_max, d_max); σ_B from the biased var."""
    mu_b, var_b = ref.moments(x, axis)
    sigma_b = np.sqrt(var_b + eps)
    sigma = np.sqrt(np.asarray(running_var, np.float64) + eps)
    r = np.clip(sigma_b / sigma, 1.0 / r_max, r_max)
    d = np.clip((mu_b - np.asarray(running_mean, np.float64)) / sigma, -d_max, d_max)
    return r, d


def renorm_forward(x, running_mean, running_var, weight, bias, eps, r_max, d_max, axis=1,
                   act="identity", slope=0.01):
    """``y = act(γ (x̂ r + d) + β)`` with ``x̂ = (x − μ_B)/σ_B``. Returns ``(y, r, d)``."""
    x = np.asarray(x, np.float64)
    c = x.shape[axis]
    shp = _bshape(x.ndim, axis, c)
    mu_b, var_b = ref.moments(x, axis)
    r, d = renorm_rd(x, running_mean, running_var, eps, r_max, d_max, axis)
    xhat = (x - mu_b.reshape(shp)) / np.sqrt(var_b + eps).reshape(shp)
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    b = np.zeros(c) if bias is None else np.asarray(bias, np.float64)
    z = w.reshape(shp) * (xhat * r.reshape(shp) + d.reshape(shp)) + b.reshape(shp)
    return ref.activation(z, act, slope), r, d


def renorm_backward(dy, x, running_mean, running_var, weight, bias, eps, r_max, d_max, axis=1,
                    act="identity", slope=0.01):
    """The paper's backward (r, d constants), term by term. Returns ``(dx, dγ, dβ)``.

    ∂ℓ/∂x̂ = ∂ℓ/∂y · γ;  ∂ℓ/∂σ_B = Σ ∂ℓ/∂x̂ (x − μ_B)(−r/σ_B²);  ∂ℓ/∂μ_B = Σ ∂ℓ/∂x̂ (−r/σ_B);
    ∂ℓ/∂x = ∂ℓ/∂x̂ · r/σ_B + ∂ℓ/∂σ_B (x − μ_B)/(m σ_B) + ∂ℓ/∂μ_B / m;
    ∂ℓ/∂γ = Σ ∂ℓ/∂y (x̂ r + d);  ∂ℓ/∂β = Σ ∂ℓ/∂y.
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    c = x.shape[axis]
    shp = _bshape(x.ndim, axis, c)
    axes = _axes(x.ndim, axis)
    m = x.size // c
    mu_b, var_b = ref.moments(x, axis)
    sigma_b = np.sqrt(var_b + eps)
    r, d = renorm_rd(x, running_mean, running_var, eps, r_max, d_max, axis)
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    b = np.zeros(c) if bias is None else np.asarray(bias, np.float64)
    xc = x - mu_b.reshape(shp)
    xr = xc / sigma_b.reshape(shp) * r.reshape(shp) + d.reshape(shp)
    z = w.reshape(shp) * xr + b.reshape(shp)
    dz = dy * ref.activation_grad(z, act, slope)
    dxhat = dz * w.reshape(shp)
    dsigma = (dxhat * xc).sum(axis=axes) * (-r / sigma_b**2)
    dmu = dxhat.sum(axis=axes) * (-r / sigma_b)
    dx = (dxhat * (r / sigma_b).reshape(shp) + dsigma.reshape(shp) * xc / (m * sigma_b.reshape(shp))
          + dmu.reshape(shp) / m)
    return dx, (dz * xr).sum(axis=axes), dz.sum(axis=axes)


# -- Ghost Batch Normalization (Hoffer et al. 2017, Algorithm 1) ------------------------------------

def split_sizes(n: int, g: int, remainder: str) -> list[int]:
    """Ghost batch sizes, written independently of the library."""
    full, rest = n // g, n % g
    if rest == 0:
        return [g] * full
    if remainder == "merge_last":
        return [n] if full == 0 else [g] * (full - 1) + [g + rest]
    if remainder == "allow_smaller":
        return [g] * full + [rest]
    raise ValueError("does not divide")


def _chunks(x, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(x[start:start + s])
        start += s
    return out


def ghost_forward(x, sizes, weight, bias, eps, axis=1, act="identity", slope=0.01):
    """Each ghost batch normalised with its own statistics. Returns ``(y, [means], [biased vars])``."""
    ys, means, vars_ = [], [], []
    for xc in _chunks(np.asarray(x, np.float64), sizes):
        y, m, v = ref.forward_train(xc, weight, bias, eps, axis, act, slope)
        ys.append(y)
        means.append(m)
        vars_.append(v)
    return np.concatenate(ys, axis=0), means, vars_


def ghost_backward(dy, x, sizes, weight, bias, eps, axis=1, act="identity", slope=0.01):
    """BN's closed-form backward per ghost batch; γ/β gradients summed over ghost batches."""
    dxs, dw, db = [], 0.0, 0.0
    for dyc, xc in zip(_chunks(np.asarray(dy, np.float64), sizes), _chunks(np.asarray(x, np.float64), sizes)):
        dx, dwc, dbc = ref.backward(dyc, xc, weight, bias, eps, axis, act, slope)
        dxs.append(dx)
        dw = dw + dwc
        db = db + dbc
    return np.concatenate(dxs, axis=0), dw, db


def ghost_update_sequential(rm, rv, means, vars_, counts, momentum, nbt, unbiased=True):
    """The paper's choice: one EMA step per ghost batch, in order."""
    for m, v, n in zip(means, vars_, counts):
        rm, rv, nbt = ref.update_running_stats(rm, rv, m, v, n, momentum, nbt, unbiased)
    return rm, rv, nbt


def ghost_update_average(rm, rv, means, vars_, counts, momentum, nbt, unbiased=True):
    """One EMA step with the count-weighted mean of ghost means and the pooled within-ghost variance."""
    counts = np.asarray(counts, np.float64)
    mean = sum(n * m for n, m in zip(counts, means)) / counts.sum()
    m2 = sum(n * v for n, v in zip(counts, vars_))
    var = m2 / (counts.sum() - (len(counts) if unbiased else 0))
    return ref.update_running_stats(rm, rv, mean, var, int(counts.sum()), momentum, nbt, unbiased=False)
