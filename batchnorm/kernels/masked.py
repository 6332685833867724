"""Masked BN (padded batches) as torch composite ops: statistics over the valid positions only.

The maths, per channel, with ``m`` the mask (1 = valid, 0 = padding; broadcast over channels) and
``n = Σ m`` the valid count (from :func:`batchnorm.stats.masked_moments`)::

    μ = Σ m·x / n,   σ² = Σ m·(x − μ)² / n                      (biased, valid positions only)
    x̂ = (x − μ) / sqrt(σ² + ε),   z = γ·x̂ + β,   y = act(z)     (at EVERY position, valid or not)

Backward: every output depends on μ and σ², but only valid inputs do, so with ``dz = dy · act'(z)``
and the sums taken over **all** positions (``g = Σ dz``, ``h = Σ dz·x̂``)::

    ∂x = γ·invstd·(dz − m·(g + x̂·h) / n),   ∂γ = h,   ∂β = g

A padded position (``m = 0``) gets the elementwise part ``γ·invstd·dz`` only (it does not move the
statistics). With ``dy = 0`` at the padding (a masked loss) this is exactly plain BN's gradient on
the valid positions packed together. Padding values never enter the statistics, but ``g`` and ``h``
run over every position (padded outputs depend on μ and σ² too): pad with finite values (zeros),
since ``0 · NaN`` is NaN and NaN/Inf padding would make the gradients NaN. Everything runs in the
accumulation dtype (float32 for half/float32 input, float64 for float64), as in
:mod:`batchnorm.kernels.torch_backend`, whose ``eval_forward`` normalises the output (so a fast
backend's can too: it is a plain per-channel affine map once μ and σ² are known).
"""

from __future__ import annotations

import torch

from ..stats import acc_dtype, masked_moments, reduce_dims
from .torch_backend import _act_grad_from_input, _view, act_grad_from_output

__all__ = ["masked_backward", "masked_stats"]


def masked_stats(x: torch.Tensor, mask: torch.Tensor, channel_axis: int):
    """``(mean, biased_var, count)`` of the valid positions (accumulation dtype; count a 0-d tensor)."""
    mom = masked_moments(x, mask, channel_axis)
    return mom.mean, mom.var, mom.count


def masked_backward(dy, x, y, mask, count, weight, bias, mean, var, eps, channel_axis, act, slope):
    """Closed-form backward of masked training BN (module docstring); returns ``(dx, dweight, dbias)``.

    ``y`` is the forward's output (read for non-identity activations); None recomputes ``z`` from
    ``x`` (the double-backward path). ``count`` is the valid count (a 0-d tensor or a number).
    """
    acc = acc_dtype(x.dtype)
    nd = x.ndim
    dims = reduce_dims(nd, channel_axis)
    invstd = torch.rsqrt(var.to(acc) + eps)
    xhat = (x.to(acc) - _view(mean.to(acc), nd, channel_axis)) * _view(invstd, nd, channel_axis)
    dz = dy.to(acc)
    if act != "identity":
        if y is None:
            z = xhat if weight is None else xhat * _view(weight.to(acc), nd, channel_axis)
            if bias is not None:
                z = z + _view(bias.to(acc), nd, channel_axis)
            dz = dz * _act_grad_from_input(z, act, slope)
        else:
            dz = dz * act_grad_from_output(y.to(acc), act, slope)
    g = dz.sum(dim=dims)
    h = (dz * xhat).sum(dim=dims)
    n = count.to(acc) if isinstance(count, torch.Tensor) else float(count)
    scale = invstd if weight is None else invstd * weight.to(acc)
    corr = _view(g / n, nd, channel_axis) + xhat * _view(h / n, nd, channel_axis)
    dx = _view(scale, nd, channel_axis) * torch.where(mask.unsqueeze(channel_axis), dz - corr, dz)
    dweight = None if weight is None else h.to(weight.dtype)
    dbias = None if bias is None else g.to(bias.dtype)
    return dx.to(x.dtype), dweight, dbias


def differentiable_masked_backward(dy, x, mask, weight, bias, eps, channel_axis, act, slope):
    """:func:`masked_backward` with the statistics recomputed from ``x`` with grad (double backward)."""
    mean, var, count = masked_stats(x, mask, channel_axis)
    return masked_backward(dy, x, None, mask, count, weight, bias, mean, var, eps, channel_axis, act, slope)
