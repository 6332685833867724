"""The native residual op: ``y = act(BN(x) + res)`` on torch's own batch-norm kernels.

Under ``auto``, small inputs (:data:`batchnorm.kernels.NATIVE_BELOW`) and whatever the numba
kernels do not cover run torch's native ``native_batch_norm``
(:mod:`batchnorm.kernels.native_backend`). This module gives the fused BN + residual add +
activation of :mod:`batchnorm.core.residual` the same path, instead of the ten-odd composite ops of
:mod:`batchnorm.kernels.torch_backend`:

* forward: one ``native_batch_norm`` (statistics and normalisation, through
  :func:`native_backend.train_forward` / :func:`native_backend.eval_forward` with the identity
  activation, so their |mean| ≫ std float64 recompute applies), then ``y += res`` and the activation,
  both **in place** on that fresh output (no tensor anyone else holds is written);
* backward (what :mod:`batchnorm.core.residual` calls with ``dz = dy · act'(z)``, the residual's
  gradient, and the identity activation): ``native_batch_norm_backward`` on ``dz``
  (:func:`native_backend.backward` / :func:`native_backend.eval_backward`).

Every activation is supported: relu, leaky_relu, elu, silu, hardswish, sigmoid and tanh in place,
gelu out of place (the core's backward reads act' from y, or recomputes z from x and the residual
for the smooth ones). Results equal the float64 oracle to float32 rounding
(``tests/core/test_core_native_residual.py``); the BN output is rounded to x's dtype once before
the add (as ``torch.nn.BatchNorm2d`` followed by ``+`` is).

Same residual signatures as the other backends (``supports_residual``, ``train_forward_residual``,
``eval_forward_residual``) plus the BN ``backward`` / ``eval_backward`` the core runs on ``dz``.
"""

from __future__ import annotations

import torch

from . import native_backend
from .native_backend import backward, eval_backward
from .torch_backend import act_forward_

__all__ = ["backward", "eval_backward", "eval_forward_residual", "name", "supports", "supports_residual",
           "train_forward_residual"]

name = "native"


def supports(x: torch.Tensor, channel_axis: int, act: str) -> bool:
    """What torch's batch-norm kernels take (any floating tensor of rank ≥ 2); every activation."""
    return native_backend.supports(x, channel_axis, "identity")


def supports_residual(x: torch.Tensor, res: torch.Tensor, channel_axis: int, act: str) -> bool:
    """A floating input torch's kernels take and a residual tensor of its shape, dtype and device."""
    return (supports(x, channel_axis, act) and isinstance(res, torch.Tensor) and res.shape == x.shape
            and res.dtype == x.dtype and res.device == x.device)


def _add_act_(y: torch.Tensor, res: torch.Tensor, act: str, slope: float) -> torch.Tensor:
    """``act(y + res)`` in place on ``y`` (a fresh output) where torch has the in-place op."""
    return act_forward_(y.add_(res), act, slope)


def train_forward_residual(x, res, weight, bias, eps, channel_axis, act, slope):
    """``(act(BN(x) + res), batch_mean, biased_batch_var)``: one ``native_batch_norm``, then the add and
    the activation in place on its output."""
    y, mean, var = native_backend.train_forward(x, weight, bias, eps, channel_axis, "identity", slope)
    return _add_act_(y, res, act, slope), mean, var


def eval_forward_residual(x, res, mean, var, weight, bias, eps, channel_axis, act, slope):
    """``act((x − mean) · γ / sqrt(var + ε) + β + res)`` with given statistics."""
    y = native_backend.eval_forward(x, mean, var, weight, bias, eps, channel_axis, "identity", slope)
    return _add_act_(y, res, act, slope)
