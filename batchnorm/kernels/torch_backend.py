"""The torch composite backend: the fallback that runs everywhere (CPU, CUDA, any float dtype, any layout).

Each function has the signature every backend shares (see :mod:`batchnorm.kernels`). They are
written with differentiable torch ops and never modify their inputs, so the same formulas also
serve double backward (autograd differentiates through them).

Statistics come from :func:`batchnorm.stats.batch_moments` (two-pass, accumulation in ≥ float32);
normalisation is ``(x − mean) · (γ / sqrt(var + ε)) + β`` in the accumulation dtype, cast back to
the input dtype. Subtracting the mean first keeps float32 exact to rounding even for data with
``|mean| ≫ std`` (the folded ``x · scale + shift`` form would cancel there).
"""

from __future__ import annotations

import torch

from ..stats import acc_dtype, batch_moments, reduce_dims

name = "torch"


def _view(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


# activations whose derivative is not a function of the output alone: the backward recomputes z
_GRAD_FROM_INPUT = ("silu", "hardswish", "gelu", "gelu_tanh", "sigmoid", "tanh")


def act_forward(z: torch.Tensor, act: str, slope: float) -> torch.Tensor:
    """``act(z)`` as torch's own functional ops (``slope``: leaky_relu's slope, elu's α)."""
    if act == "identity":
        return z
    if act == "relu":
        return torch.relu(z)
    if act == "leaky_relu":
        return torch.nn.functional.leaky_relu(z, slope)
    if act == "elu":
        return torch.nn.functional.elu(z, slope)
    if act == "silu":
        return torch.nn.functional.silu(z)
    if act == "hardswish":
        return torch.nn.functional.hardswish(z)
    if act == "gelu":
        return torch.nn.functional.gelu(z)
    if act == "gelu_tanh":
        return torch.nn.functional.gelu(z, approximate="tanh")
    if act == "sigmoid":
        return torch.sigmoid(z)
    if act == "tanh":
        return torch.tanh(z)
    raise ValueError(f"batchnorm: unknown activation {act!r}")


def act_forward_(z: torch.Tensor, act: str, slope: float) -> torch.Tensor:
    """``act(z)`` written into ``z`` (a fresh output no one else holds) where torch has an in-place op
    that autograd accepts — relu, silu, hardswish, sigmoid, tanh, and leaky_relu/elu with a positive
    slope (their backward reads act' from the output) — as torchvision's blocks run them
    (``nn.ReLU(inplace=True)``, …); else :func:`act_forward` (gelu has no in-place op)."""
    if act == "identity":
        return z
    if act == "relu":
        return torch.relu_(z)
    if act == "leaky_relu" and slope > 0:
        return torch.nn.functional.leaky_relu(z, slope, inplace=True)
    if act == "elu" and slope > 0:
        return torch.nn.functional.elu(z, slope, inplace=True)
    if act == "silu":
        return torch.nn.functional.silu(z, inplace=True)
    if act == "hardswish":
        return torch.nn.functional.hardswish(z, inplace=True)
    if act == "sigmoid":
        return torch.sigmoid_(z)
    if act == "tanh":
        return torch.tanh_(z)
    return act_forward(z, act, slope)


def act_grad_from_output(y: torch.Tensor, act: str, slope: float) -> torch.Tensor | None:
    """d act/dz expressed through the output y = act(z) (None for identity).

    relu: 1 where y > 0; leaky_relu (slope > 0): 1 where y > 0 else slope; elu: 1 where y > 0
    else y + α; sigmoid y(1 − y); tanh 1 − y² (silu, hardswish and gelu need z). At z = 0 this gives 0
    for relu and slope for leaky_relu, as torch does.
    """
    if act == "identity":
        return None
    pos = y > 0
    if act == "relu":
        return pos.to(y.dtype)
    if act == "leaky_relu":
        # scalar-only torch.where yields float32: build the slope in y's dtype (float64 stays exact)
        return torch.where(pos, torch.ones_like(y), torch.full_like(y, slope))
    if act == "elu":
        return torch.where(pos, torch.ones_like(y), y + slope)
    if act == "sigmoid":
        return y * (1 - y)
    if act == "tanh":
        return 1 - y * y
    if act in _GRAD_FROM_INPUT:
        raise ValueError(f"batchnorm: the derivative of {act!r} is not a function of its output; recompute "
                         f"z = γ·x̂ + β and use the derivative from the input")
    raise ValueError(f"batchnorm: unknown activation {act!r}")


def _act_grad_from_input(z: torch.Tensor, act: str, slope: float) -> torch.Tensor | None:
    if act == "identity":
        return None
    if act == "relu":
        return (z > 0).to(z.dtype)
    if act == "leaky_relu":
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope))
    if act == "elu":
        return torch.where(z > 0, torch.ones_like(z), slope * torch.exp(z.clamp_max(0)))
    if act in ("silu", "sigmoid"):
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s)) if act == "silu" else s * (1 - s)
    if act == "hardswish":  # torch's convention at the kinks: 0 up to −3, z/3 + ½ between, 1 from 3 on
        return torch.where(z <= -3, torch.zeros_like(z), torch.where(z < 3, z / 3 + 0.5, torch.ones_like(z)))
    if act == "gelu":
        return (0.5 * (1 + torch.erf(z * 0.7071067811865476))
                + z * 0.3989422804014327 * torch.exp(-0.5 * z * z))
    if act == "gelu_tanh":
        k = 0.7978845608028654
        t = torch.tanh(k * (z + 0.044715 * z * z * z))
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * 0.044715 * z * z)
    if act == "tanh":
        return 1 - torch.tanh(z) ** 2
    raise ValueError(f"batchnorm: unknown activation {act!r}")


def _z(x, mean, invstd, weight, bias, nd, axis, acc):
    """z = γ·x̂ + β in the accumulation dtype (the activation's input, for derivatives that need it)."""
    z = (x.to(acc) - _view(mean.to(acc), nd, axis)) * _view(invstd, nd, axis)
    if weight is not None:
        z = z * _view(weight.to(acc), nd, axis)
    if bias is not None:
        z = z + _view(bias.to(acc), nd, axis)
    return z


def supports(x: torch.Tensor, channel_axis: int, act: str) -> bool:
    return True


def _normalise(x, mean, var, weight, bias, eps, channel_axis):
    """``(x − mean) · γ / sqrt(var + ε) + β`` in the accumulation dtype."""
    acc = acc_dtype(x.dtype)
    nd = x.ndim
    invstd = torch.rsqrt(var.to(acc) + eps)
    scale = invstd if weight is None else invstd * weight.to(acc)
    z = (x.to(acc) - _view(mean.to(acc), nd, channel_axis)) * _view(scale, nd, channel_axis)
    if bias is not None:
        z = z + _view(bias.to(acc), nd, channel_axis)
    return z


def eval_forward(x, mean, var, weight, bias, eps, channel_axis, act, slope):
    """``act((x − mean) · γ / sqrt(var + ε) + β)`` with given statistics; output in x's dtype."""
    return act_forward(_normalise(x, mean, var, weight, bias, eps, channel_axis), act, slope).to(x.dtype)


def train_forward(x, weight, bias, eps, channel_axis, act, slope):
    """Training forward: returns ``(y, batch_mean, biased_batch_var)``; statistics in the acc dtype."""
    mean, var, _ = batch_moments(x, channel_axis)
    return eval_forward(x, mean, var, weight, bias, eps, channel_axis, act, slope), mean, var


def backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope):
    """Closed-form training backward (reference article 003), with the activation folded in.

    ``dz = dy · act'(z)``; per channel ``g = Σ dz``, ``h = Σ dz · x̂``::

        ∂x = γ · invstd · (dz − g / n − x̂ · h / n),   ∂γ = h,   ∂β = g

    ``y`` (the op's output) is only needed for non-identity activations. Returns
    ``(dx, dweight, dbias)``; ``dweight``/``dbias`` are None when ``weight``/``bias`` are.
    """
    acc = acc_dtype(x.dtype)
    nd = x.ndim
    dims = reduce_dims(nd, channel_axis)
    n = x.numel() // x.shape[channel_axis]
    invstd = torch.rsqrt(var.to(acc) + eps)
    xhat = (x.to(acc) - _view(mean.to(acc), nd, channel_axis)) * _view(invstd, nd, channel_axis)
    dz = dy.to(acc)
    if act != "identity":
        if y is None or act in _GRAD_FROM_INPUT:  # recompute z (double backward; smooth activations)
            z = xhat if weight is None else xhat * _view(weight.to(acc), nd, channel_axis)
            if bias is not None:
                z = z + _view(bias.to(acc), nd, channel_axis)
            dz = dz * _act_grad_from_input(z, act, slope)
        else:
            dz = dz * act_grad_from_output(y.to(acc), act, slope)
    g = dz.sum(dim=dims)
    h = (dz * xhat).sum(dim=dims)
    scale = invstd if weight is None else invstd * weight.to(acc)
    dx = _view(scale, nd, channel_axis) * (dz - _view(g / n, nd, channel_axis)
                                           - xhat * _view(h / n, nd, channel_axis))
    dweight = None if weight is None else h.to(weight.dtype)
    dbias = None if bias is None else g.to(bias.dtype)
    return dx.to(x.dtype), dweight, dbias


def eval_backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope):
    """Backward of :func:`eval_forward` w.r.t. x, γ, β (the statistics are constants here)."""
    acc = acc_dtype(x.dtype)
    nd = x.ndim
    dims = reduce_dims(nd, channel_axis)
    invstd = torch.rsqrt(var.to(acc) + eps)
    dz = dy.to(acc)
    if act in _GRAD_FROM_INPUT:
        dz = dz * _act_grad_from_input(_z(x, mean, invstd, weight, bias, nd, channel_axis, acc), act, slope)
    elif act != "identity":
        dz = dz * act_grad_from_output(y.to(acc), act, slope)
    scale = invstd if weight is None else invstd * weight.to(acc)
    dx = (dz * _view(scale, nd, channel_axis)).to(x.dtype)
    dweight = dbias = None
    if weight is not None:
        xhat = (x.to(acc) - _view(mean.to(acc), nd, channel_axis)) * _view(invstd, nd, channel_axis)
        dweight = (dz * xhat).sum(dim=dims).to(weight.dtype)
    if bias is not None:
        dbias = dz.sum(dim=dims).to(bias.dtype)
    return dx, dweight, dbias


def differentiable_train_backward(dy, x, weight, bias, eps, channel_axis, act, slope):
    """The closed-form training backward as differentiable torch ops, for double backward.

    The statistics are recomputed from ``x`` with grad (the saved ones are constants to autograd),
    so differentiating this gives exact second derivatives. Used by
    :class:`batchnorm.core.autograd.BatchNormTrainFn` and by the custom op's autograd in
    :mod:`batchnorm.core.ops` (it lives here so that neither of them imports the other).
    """
    m, v, _ = batch_moments(x, channel_axis)
    return backward(dy, x, None, weight, bias, m, v, eps, channel_axis, act, slope)


# -- BN + residual add + activation: y = act(BN(x) + res) ---------------------------------------------
def supports_residual(x: torch.Tensor, res: torch.Tensor, channel_axis: int, act: str) -> bool:
    return True


def eval_forward_residual(x, res, mean, var, weight, bias, eps, channel_axis, act, slope):
    """``act((x − mean) · γ / sqrt(var + ε) + β + res)`` with given statistics (accumulation dtype, then
    rounded once to x's dtype)."""
    z = _normalise(x, mean, var, weight, bias, eps, channel_axis) + res.to(acc_dtype(x.dtype))
    return act_forward(z, act, slope).to(x.dtype)


def train_forward_residual(x, res, weight, bias, eps, channel_axis, act, slope):
    """``(act(BN(x) + res), batch_mean, biased_batch_var)`` with batch statistics."""
    mean, var, _ = batch_moments(x, channel_axis)
    return eval_forward_residual(x, res, mean, var, weight, bias, eps, channel_axis, act, slope), mean, var


def residual_grad(dy, x, res, y, weight, bias, mean, var, eps, channel_axis, act, slope):
    """``dz = dy · act'(z)`` of ``y = act(z)``, ``z = BN(x) + res``: the gradient of the residual, and
    what the BN backward (with the identity activation) takes as its ``dy``.

    The piecewise-linear activations and ELU read act' from y with torch's own one-pass backward ops
    (``threshold_backward``, ``leaky_relu_backward``, ``elu_backward``); the smooth ones recompute z.
    Differentiable (double backward), as the rest of this module."""
    if act == "identity":
        return dy
    if act == "relu":
        return torch.ops.aten.threshold_backward(dy, y, 0)
    if act == "leaky_relu" and slope >= 0:
        return torch.ops.aten.leaky_relu_backward(dy, y, slope, True)
    if act == "elu" and slope >= 0:
        return torch.ops.aten.elu_backward(dy, slope, 1, 1, True, y)
    acc = acc_dtype(x.dtype)
    if act in _GRAD_FROM_INPUT:
        if mean.dtype == torch.float64 and acc != torch.float64:
            # float64 statistics (the native backend's recompute for |mean| ≫ std, the numba kernels):
            # z in float64 too, else rounding the mean to float32 costs z ~|mean|·2⁻²⁴/std
            acc, x = torch.float64, x.to(torch.float64)
        z = _normalise(x, mean, var, weight, bias, eps, channel_axis) + res.to(acc)
        return (dy.to(acc) * _act_grad_from_input(z, act, slope)).to(dy.dtype)
    return (dy.to(acc) * act_grad_from_output(y.to(acc), act, slope)).to(dy.dtype)
