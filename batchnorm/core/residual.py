"""BN, residual add and activation in one op: ``y = act(BN(x) + residual)`` — the tail of a ResNet block.

Every ResNet block ends ``bn2(conv2(...)) → + identity → ReLU``: as three torch ops that is three
sweeps over memory in the forward (BN writes z₁, the add reads z₁ and the identity and writes z₂,
ReLU reads z₂ and writes y) where one does. Here the forward is BN's two sweeps — statistics of x,
then one sweep that reads x and the residual and writes ``y = act(γ x̂ + β + residual)`` (oneDNN
fuses the same "batch norm + add + relu"; PyTorch does not).

Backward, with ``z = γ x̂ + β + residual`` and ``dz = dy · act'(z)``::

    d(residual) = dz                      (the add passes the gradient on unchanged)
    dx, dγ, dβ  = BN's backward of dz      (article 003's closed form, identity activation)

``dz`` must be written anyway (it *is* the residual's gradient). The numba kernels
(:func:`batchnorm.kernels.cpu.backward_residual`) do the whole backward of a large NCHW-like input in
BN + act's two sweeps: the first reads x, dy and y, writes dz (act' read from y, as torch's
``threshold_backward`` does) and sums it; the second reads x and dz — still in cache, a block of
channels at a time — and writes dx: seven tensor passes where three sweeps take eight. Elsewhere
(smaller inputs, channels-last, other backends; measured in ``benchmarks/residual_backward.py``) dz
comes from torch's own activation backward in one sweep and the two-sweep BN backward runs on it.
``act'`` is read from y for the piecewise-linear activations and ELU; the smooth ones (SiLU, GELU,
…) recompute z from x and the residual.

The fused kernels (:func:`batchnorm.kernels.cpu.train_forward_residual`) cover identity, relu and
leaky_relu on what the numba backend supports; under ``auto`` anything else (small inputs included)
runs torch's native kernel with the add and activation after it in place
(:mod:`batchnorm.kernels.native_residual`), and a forced ``"torch"`` the composite of
:mod:`batchnorm.kernels.torch_backend` (same formulas, same results to rounding).
:func:`residual_backend_for` names the one that would run. Under
``torch.compile`` the composite is traced as plain torch ops.

    >>> block_tail = BatchNormAddAct2d(64)              # ReLU by default
    >>> y = block_tail(torch.randn(8, 64, 4, 4), torch.randn(8, 64, 4, 4))

State, conventions and ``state_dict`` are those of :class:`batchnorm.BatchNorm2d` (so a converted
ResNet's ``bn2`` keeps its keys). See :mod:`batchnorm.lifecycle.residual` for the model conversion.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import kernels
from .._checks import check_activation, check_channel_tensor, check_eps, check_input
from ..kernels import native_backend, native_residual, torch_backend
from ..stats import batch_moments
from .autograd import _records, capturing
from .functional import RunningStats, _check_train_args, _skip_nonfinite, update_running_stats
from .modules import _BatchNormAct

__all__ = [
    "AddAct",
    "BatchNormAddAct1d",
    "BatchNormAddAct2d",
    "BatchNormAddAct3d",
    "batch_norm_add_act_eval",
    "batch_norm_add_act_train",
    "residual_backend_for",
]


def _backend(x: torch.Tensor, res: torch.Tensor, axis: int, act: str, mode: str = "train"):
    """The backend that runs the fused op: the one :func:`batchnorm.kernels.select` picks, if it has
    residual kernels that take these inputs; else, where that is the native backend or the choice is
    ``auto``, torch's native kernel (:mod:`batchnorm.kernels.native_residual`); else (a forced
    backend without a residual kernel for these inputs, or ``"torch"``) the torch composite."""
    mod = kernels.select(x, axis, act, mode)
    fits = getattr(mod, "supports_residual", None)
    if fits is not None and fits(x, res, axis, act):
        return mod
    if ((mod is native_backend or kernels.get_backend() == "auto")
            and native_residual.supports_residual(x, res, axis, act)):
        return native_residual
    return torch_backend


def residual_backend_for(x: torch.Tensor, residual: torch.Tensor, channel_axis: int = 1,
                         activation: str = "relu", *, training: bool = True) -> str:
    """Name of the backend that would run :func:`batch_norm_add_act_train` on these inputs now
    (``"numba"``, ``"native"`` or ``"torch"``): the residual op's counterpart of
    :func:`batchnorm.kernels.backend_for`."""
    return _backend(x, residual, channel_axis % x.ndim, activation, "train" if training else "eval").name


def _fused_backward(backend, x: torch.Tensor, axis: int, act: str, slope: float) -> bool:
    """Whether ``backend`` runs the two-sweep residual backward for ``x`` and ``act`` (the numba
    kernels: :func:`batchnorm.kernels.cpu.backward_residual`, large NCHW-like inputs)."""
    fits = getattr(backend, "supports_backward_residual", None)
    return fits is not None and fits(x, axis, act, slope)


def _differentiable_backward(dy, x, res, weight, bias, eps, axis, act, slope):
    """The backward as differentiable torch ops on statistics recomputed from x (double backward)."""
    m, v, _ = batch_moments(x, axis)
    z = torch_backend._normalise(x, m, v, weight, bias, eps, axis) + res
    grad = torch_backend._act_grad_from_input(z, act, slope)
    dz = dy if grad is None else dy * grad.to(dy.dtype)
    dx, dw, db = torch_backend.backward(dz, x, None, weight, bias, m, v, eps, axis, "identity", slope)
    return dx, dz, dw, db


class BatchNormAddActTrainFn(torch.autograd.Function):
    """``y, mean, var = apply(x, res, weight, bias, eps, channel_axis, act, slope)`` (training)."""

    @staticmethod
    def forward(ctx, x, res, weight, bias, eps, axis, act, slope):
        backend = _backend(x, res, axis, act)
        y, mean, var = backend.train_forward_residual(x, res, weight, bias, eps, axis, act, slope)
        ctx.backend = backend
        ctx.cfg = (eps, axis, act, slope)
        ctx.save_for_backward(x, res, weight, bias, mean, var, y)
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        if dy is None:
            return (None,) * 8
        x, res, weight, bias, mean, var, y = ctx.saved_tensors
        eps, axis, act, slope = ctx.cfg
        if torch.is_grad_enabled():  # a graph of the backward is wanted: differentiable formulas
            dx, dres, dw, db = _differentiable_backward(dy, x, res, weight, bias, eps, axis, act, slope)
        elif _fused_backward(ctx.backend, x, axis, act, slope):  # two sweeps: dz written beside the sums
            dx, dres, dw, db = ctx.backend.backward_residual(dy, x, y, weight, bias, mean, var, eps, axis,
                                                             act, slope)
        else:
            dres = torch_backend.residual_grad(dy, x, res, y, weight, bias, mean, var, eps, axis, act, slope)
            dx, dw, db = ctx.backend.backward(dres, x, None, weight, bias, mean, var, eps, axis, "identity",
                                              slope)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dres if need[1] else None, dw if need[2] else None,
                db if need[3] else None, None, None, None, None)


class BatchNormAddActEvalFn(torch.autograd.Function):
    """``y = apply(x, res, mean, var, weight, bias, eps, channel_axis, act, slope)`` (given statistics)."""

    @staticmethod
    def forward(ctx, x, res, mean, var, weight, bias, eps, axis, act, slope):
        backend = _backend(x, res, axis, act, "eval")
        y = backend.eval_forward_residual(x, res, mean, var, weight, bias, eps, axis, act, slope)
        ctx.backend = backend
        ctx.cfg = (eps, axis, act, slope)
        ctx.save_for_backward(x, res, mean, var, weight, bias, y)
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, dy):
        if dy is None:
            return (None,) * 10
        x, res, mean, var, weight, bias, y = ctx.saved_tensors
        eps, axis, act, slope = ctx.cfg
        backend = torch_backend if torch.is_grad_enabled() else ctx.backend
        if backend is not torch_backend and _fused_backward(backend, x, axis, act, slope):
            dx, dres, dw, db = backend.backward_residual(dy, x, y, weight, bias, mean, var, eps, axis, act,
                                                         slope, train=False)
        else:
            dres = torch_backend.residual_grad(dy, x, res, y, weight, bias, mean, var, eps, axis, act, slope)
            dx, dw, db = backend.eval_backward(dres, x, None, weight, bias, mean, var, eps, axis, "identity",
                                               slope)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dres if need[1] else None, None, None, dw if need[4] else None,
                db if need[5] else None, None, None, None, None)


def _check_residual(op: str, x: torch.Tensor, residual: object) -> torch.Tensor:
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{op}: expected residual to be a torch.Tensor, got {type(residual).__name__}; pass "
                        f"the block's identity (or downsample) branch")
    if residual.shape != x.shape:
        raise ValueError(f"{op}: expected a residual of the input's shape {tuple(x.shape)}, got "
                         f"{tuple(residual.shape)}; a block whose branches differ in shape needs its "
                         f"downsample branch applied first")
    if residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"{op}: the residual is {residual.dtype} on {residual.device} but the input is "
                         f"{x.dtype} on {x.device}; cast or move it (residual.to(x))")
    return residual


def batch_norm_add_act_train(
    x: torch.Tensor,
    residual: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: torch.Tensor | None = None,
    channel_axis: int = 1,
    activation: str = "relu",
    negative_slope: float = 0.01,
    running_var_unbiased: bool = True,
    nonfinite: str = "update",
    inplace_stats: bool = False,
) -> tuple[torch.Tensor, RunningStats]:
    """Training-mode ``y = act(γ (x − μ_B)/sqrt(σ²_B + ε) + β + residual)``; returns ``(y, RunningStats)``.

    The statistics are x's alone (the residual is added after normalisation, as in a ResNet block).
    Every argument but ``residual`` (a tensor of x's shape, dtype and device) is that of
    :func:`batchnorm.batch_norm_train`; the activation defaults to ReLU. Gradients flow to x, the
    residual, γ and β.
    """
    op = "batchnorm.batch_norm_add_act_train"
    x, axis = check_input(op, x, channel_axis=channel_axis, training=True)
    residual = _check_residual(op, x, residual)
    eps, momentum, act, slope, nonfinite = _check_train_args(
        op, x, axis, running_mean, running_var, weight, bias, eps=eps, momentum=momentum,
        activation=activation, negative_slope=negative_slope, nonfinite=nonfinite,
        num_batches_tracked=num_batches_tracked)
    if torch.compiler.is_compiling():  # traced as the torch composite (the kernels are opaque to dynamo)
        y, mean, var = torch_backend.train_forward_residual(x, residual, weight, bias, eps, axis, act, slope)
    elif not _records(x, residual, weight, bias):
        y, mean, var = _backend(x, residual, axis, act).train_forward_residual(x, residual, weight, bias, eps,
                                                                               axis, act, slope)
    else:
        y, mean, var = BatchNormAddActTrainFn.apply(x, residual, weight, bias, eps, axis, act, slope)
    old = RunningStats(running_mean, running_var, num_batches_tracked)
    if running_mean is None or _skip_nonfinite(op, nonfinite, mean, var):
        return y, old
    n = x.numel() // x.shape[axis]
    return y, update_running_stats(running_mean, running_var, mean, var, n, momentum, num_batches_tracked,
                                   running_var_unbiased, inplace=inplace_stats)


def batch_norm_add_act_eval(
    x: torch.Tensor,
    residual: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    channel_axis: int = 1,
    activation: str = "relu",
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """Inference-mode ``y = act(γ (x − mean)/sqrt(var + ε) + β + residual)`` with given statistics."""
    op = "batchnorm.batch_norm_add_act_eval"
    x, axis = check_input(op, x, channel_axis=channel_axis)
    residual = _check_residual(op, x, residual)
    if mean is None or var is None:
        raise TypeError(f"{op}: mean and var are required; for batch statistics use batch_norm_add_act_train")
    c = x.shape[axis]
    for name, t in (("mean", mean), ("var", var), ("weight", weight), ("bias", bias)):
        check_channel_tensor(op, name, t, c, x=x)
    eps = check_eps(op, eps)
    act, slope = check_activation(op, activation, negative_slope)
    mean, var = mean.detach(), var.detach()
    if torch.compiler.is_compiling():
        return torch_backend.eval_forward_residual(x, residual, mean, var, weight, bias, eps, axis, act,
                                                   slope)
    if not _records(x, residual, weight, bias):
        backend = _backend(x, residual, axis, act)
        return backend.eval_forward_residual(x, residual, mean, var, weight, bias, eps, axis, act, slope)
    return BatchNormAddActEvalFn.apply(x, residual, mean, var, weight, bias, eps, axis, act, slope)


class AddAct(nn.Module):
    """``act(x + residual)``: what is left of a :class:`BatchNormAddAct2d` once its BN is folded into
    the convolution before it (:func:`batchnorm.fold_bn`), or a block's tail without BN."""

    def __init__(self, activation: str = "relu", negative_slope: float = 0.01) -> None:
        super().__init__()
        self.activation, self.negative_slope = check_activation("AddAct", activation, negative_slope)

    def forward(self, input: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return torch_backend.act_forward(input + residual, self.activation, self.negative_slope)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class _BatchNormAddAct(_BatchNormAct):
    """Base of the fused BN + residual add + activation modules: ``forward(input, residual)``."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        compiling = torch.compiler.is_compiling()
        if type(input) is torch.Tensor and not compiling and not capturing(compiling):
            # small inputs and devices without our kernels: torch's batch_norm, add_ and activation op,
            # as torch's own block runs them (a custom Function around them cost 40-50 µs a call)
            y = self._forward_fast(input, residual)
            if y is not None:
                return y
        op = type(self).__name__
        batch_stats = self._use_batch_stats()
        x, axis = check_input(op, input, ranks=self._ranks, channel_axis=self.channel_axis,
                              num_features=self.num_features, training=batch_stats)
        residual = _check_residual(op, x, residual)
        if not batch_stats:
            return batch_norm_add_act_eval(x, residual, self.running_mean, self.running_var, self.weight,
                                           self.bias, eps=self.eps, channel_axis=axis,
                                           activation=self.activation, negative_slope=self.negative_slope)

        def train(x: torch.Tensor, *args: Any, **kwargs: Any):
            return batch_norm_add_act_train(x, residual, *args, **kwargs)

        return self._train_step(train, x, axis, inplace_stats=True)


class BatchNormAddAct1d(_BatchNormAddAct):
    """``act(BN(x) + residual)`` over ``(N, C)`` or ``(N, C, L)``; see :mod:`batchnorm.core.residual`."""

    _ranks = (2, 3)


class BatchNormAddAct2d(_BatchNormAddAct):
    """``act(BN(x) + residual)`` over ``(N, C, H, W)`` — a ResNet block's ``bn2 → + identity → relu``.

    Arguments and state are :class:`batchnorm.BatchNormAct2d`'s (ReLU by default); ``forward`` takes
    the block's main branch and its residual (identity or downsample output) of the same shape.

    Example:
        >>> tail = BatchNormAddAct2d(16)
        >>> y = tail(torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8))
    """

    _ranks = (4,)


class BatchNormAddAct3d(_BatchNormAddAct):
    """``act(BN(x) + residual)`` over ``(N, C, D, H, W)``; see :class:`BatchNormAddAct2d`."""

    _ranks = (5,)
