"""The float64 NumPy oracle: Batch Normalization written as plainly as the maths.

Every backend of the library (the torch composite path, the numba kernels, SyncBN, Batch Renorm,
Ghost BN, recalibration) is tested against the functions in this file. They favour clarity over
speed, compute everything in float64, and never mutate their inputs.

Conventions (the same as :mod:`batchnorm.core.functional`):

* ``x`` has its channels on ``channel_axis`` (1 for NCHW, -1 for NHWC); statistics are taken
  per channel over every other axis, ``n = x.size // C`` values per channel.
* Normalisation uses the **biased** batch variance ``var = mean((x - mean)²)`` and puts ε inside
  the square root: ``x̂ = (x - mean) / sqrt(var + ε)``; ``y = γ x̂ + β``.
* ``momentum`` is PyTorch's: the weight of the *new* batch, ``r ← (1 - m) r + m s``; ``None`` is
  the cumulative average ``m = 1 / num_batches_tracked`` (after counting this batch).
* ``running_var`` stores the unbiased variance ``var · n / (n - 1)`` unless told otherwise.

The backward is the closed form derived step by step in reference article 003: with
``g = Σ dy`` and ``h = Σ dy · x̂`` per channel::

    ∂β = g,    ∂γ = h,    ∂x = γ / (n · sqrt(var + ε)) · (n · dy − g − x̂ · h)
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "activation",
    "activation_grad",
    "backward",
    "backward_residual",
    "forward_eval",
    "forward_train",
    "forward_train_residual",
    "moments",
    "update_running_stats",
]


def _reduce_axes(ndim: int, channel_axis: int) -> tuple[int, ...]:
    c = channel_axis % ndim
    return tuple(a for a in range(ndim) if a != c)


def _bshape(ndim: int, channel_axis: int, c: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[channel_axis % ndim] = c
    return tuple(shape)


def moments(x: np.ndarray, channel_axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance, two-pass in float64: ``var = mean((x - mean)²)``."""
    x = np.asarray(x, dtype=np.float64)
    axes = _reduce_axes(x.ndim, channel_axis)
    mean = x.mean(axis=axes)
    centred = x - mean.reshape(_bshape(x.ndim, channel_axis, mean.size))
    var = (centred * centred).mean(axis=axes)
    return mean, var


_erf = np.vectorize(math.erf, otypes=[np.float64])  # (NumPy has no erf; math.erf is exact to rounding)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + e^−z) without overflow warnings for large |z| (e^−|z| ≤ 1)."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _gelu_tanh_inner(z: np.ndarray) -> np.ndarray:
    return np.sqrt(2.0 / np.pi) * (z + 0.044715 * z ** 3)


def activation(z: np.ndarray, name: str = "identity", slope: float = 0.01) -> np.ndarray:
    """The activations the fused ops support, as torch defines them.

    identity; relu max(z, 0); leaky_relu (slope); elu (α = slope) α(e^z − 1) for z ≤ 0; silu z·σ(z)
    (Swish-1, Ramachandran et al. 2017); hardswish z·clamp(z + 3, 0, 6)/6 (Howard et al. 2019,
    MobileNetV3); gelu z·Φ(z) with Φ(z) = ½(1 + erf(z/√2)) (Hendrycks & Gimpel 2016); gelu_tanh
    ½z(1 + tanh(√(2/π)(z + 0.044715 z³))); sigmoid σ(z) = 1/(1 + e^−z); tanh.
    """
    z = np.asarray(z, dtype=np.float64)
    if name == "identity":
        return z
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, z, slope * z)
    if name == "elu":
        return np.where(z > 0, z, slope * np.expm1(np.minimum(z, 0.0)))
    if name == "silu":
        return z * _sigmoid(z)
    if name == "hardswish":
        return z * np.clip(z + 3.0, 0.0, 6.0) / 6.0
    if name == "gelu":
        return 0.5 * z * (1.0 + _erf(z / np.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * z * (1.0 + np.tanh(_gelu_tanh_inner(z)))
    if name == "sigmoid":
        return _sigmoid(z)
    if name == "tanh":
        return np.tanh(z)
    raise ValueError(f"reference.activation: unknown activation {name!r}")


def activation_grad(z: np.ndarray, name: str = "identity", slope: float = 0.01) -> np.ndarray:
    """d activation / dz at ``z``, with torch's values at the kinks: 0 at z = 0 for relu, ``slope`` at
    z = 0 for leaky_relu; hardswish 0 for z ≤ −3, z/3 + ½ on (−3, 3), 1 from 3 on.

    silu σ(1 + z(1 − σ)); gelu Φ(z) + z·φ(z) with φ the standard normal density; gelu_tanh
    ½(1 + t) + ½z(1 − t²)·√(2/π)(1 + 3·0.044715 z²) with t = tanh(√(2/π)(z + 0.044715 z³));
    sigmoid σ(1 − σ); tanh 1 − tanh².
    """
    z = np.asarray(z, dtype=np.float64)
    if name == "identity":
        return np.ones_like(z)
    if name == "relu":
        return (z > 0).astype(np.float64)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, slope)
    if name == "elu":
        return np.where(z > 0, 1.0, slope * np.exp(np.minimum(z, 0.0)))
    if name == "silu":
        s = _sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if name == "hardswish":
        return np.where(z <= -3.0, 0.0, np.where(z < 3.0, z / 3.0 + 0.5, 1.0))
    if name == "gelu":
        return 0.5 * (1.0 + _erf(z / np.sqrt(2.0))) + z * np.exp(-0.5 * z * z) / np.sqrt(2.0 * np.pi)
    if name == "gelu_tanh":
        t = np.tanh(_gelu_tanh_inner(z))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * np.sqrt(2.0 / np.pi) * (1.0 + 3 * 0.044715 * z * z)
    if name == "sigmoid":
        s = _sigmoid(z)
        return s * (1.0 - s)
    if name == "tanh":
        return 1.0 - np.tanh(z) ** 2
    raise ValueError(f"reference.activation_grad: unknown activation {name!r}")


def forward_train(
    x: np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
    channel_axis: int = 1,
    act: str = "identity",
    slope: float = 0.01,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training forward with batch statistics. Returns ``(y, batch_mean, batch_biased_var)``."""
    x = np.asarray(x, dtype=np.float64)
    mean, var = moments(x, channel_axis)
    y = forward_eval(x, mean, var, weight, bias, eps, channel_axis, act, slope)
    return y, mean, var


def forward_eval(
    x: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
    channel_axis: int = 1,
    act: str = "identity",
    slope: float = 0.01,
) -> np.ndarray:
    """``act(γ (x - mean) / sqrt(var + ε) + β)`` with the given (running or batch) statistics."""
    x = np.asarray(x, dtype=np.float64)
    c = np.size(mean)
    shp = _bshape(x.ndim, channel_axis, c)
    xhat = (x - np.reshape(mean, shp)) / np.sqrt(np.reshape(var, shp).astype(np.float64) + eps)
    z = xhat
    if weight is not None:
        z = z * np.reshape(np.asarray(weight, np.float64), shp)
    if bias is not None:
        z = z + np.reshape(np.asarray(bias, np.float64), shp)
    return activation(z, act, slope)


def backward(
    dy: np.ndarray,
    x: np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
    channel_axis: int = 1,
    act: str = "identity",
    slope: float = 0.01,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closed-form training backward (article 003). Returns ``(dx, dweight, dbias)``.

    With an activation, ``dy`` is first taken through it: ``dz = dy · act'(z)``.
    """
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    mean, var = moments(x, channel_axis)
    c = mean.size
    shp = _bshape(x.ndim, channel_axis, c)
    axes = _reduce_axes(x.ndim, channel_axis)
    n = x.size // c
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean.reshape(shp)) * invstd.reshape(shp)
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    b = np.zeros(c) if bias is None else np.asarray(bias, np.float64)
    z = xhat * w.reshape(shp) + b.reshape(shp)
    dz = dy * activation_grad(z, act, slope)
    g = dz.sum(axis=axes)  # ∂β
    h = (dz * xhat).sum(axis=axes)  # ∂γ
    dx = (w * invstd / n).reshape(shp) * (n * dz - g.reshape(shp) - xhat * h.reshape(shp))
    return dx, h, g


def forward_train_residual(
    x: np.ndarray,
    res: np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
    channel_axis: int = 1,
    act: str = "identity",
    slope: float = 0.01,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BN, residual add, activation: ``y = act(γ x̂ + β + res)`` (a ResNet block's tail). Returns
    ``(y, batch_mean, batch_biased_var)``; the statistics are x's alone."""
    x = np.asarray(x, dtype=np.float64)
    mean, var = moments(x, channel_axis)
    z = forward_eval(x, mean, var, weight, bias, eps, channel_axis) + np.asarray(res, np.float64)
    return activation(z, act, slope), mean, var


def backward_residual(
    dy: np.ndarray,
    x: np.ndarray,
    res: np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
    channel_axis: int = 1,
    act: str = "identity",
    slope: float = 0.01,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Backward of :func:`forward_train_residual`: ``(dx, dres, dweight, dbias)``.

    ``dz = dy · act'(z)`` is the residual's gradient (the add passes it on unchanged); dx, dγ, dβ are
    :func:`backward` of ``dz`` with the identity activation."""
    x = np.asarray(x, dtype=np.float64)
    mean, var = moments(x, channel_axis)
    z = forward_eval(x, mean, var, weight, bias, eps, channel_axis) + np.asarray(res, np.float64)
    dz = np.asarray(dy, np.float64) * activation_grad(z, act, slope)
    dx, dw, db = backward(dz, x, weight, bias, eps, channel_axis)
    return dx, dz, dw, db


def update_running_stats(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    batch_mean: np.ndarray,
    batch_var: np.ndarray,
    n: int,
    momentum: float | None = 0.1,
    num_batches_tracked: int = 0,
    unbiased: bool = True,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One running-statistics step. Returns ``(new_mean, new_var, num_batches_tracked + 1)``.

    ``momentum=None`` gives the cumulative (equal-weight) average of all batch statistics seen.
    ``batch_var`` is the biased batch variance; it is stored times ``n / (n - 1)`` when ``unbiased``.
    """
    nbt = num_batches_tracked + 1
    factor = 1.0 / nbt if momentum is None else float(momentum)
    v = np.asarray(batch_var, np.float64) * (n / (n - 1) if unbiased else 1.0)
    new_mean = (1.0 - factor) * np.asarray(running_mean, np.float64) + factor * batch_mean
    new_var = (1.0 - factor) * np.asarray(running_var, np.float64) + factor * v
    return new_mean, new_var, nbt
