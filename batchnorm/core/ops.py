"""BN's fused ops as torch custom ops (namespace ``batchnorm``), so ``torch.compile`` keeps them whole.

``torch.compile`` cannot trace into numba kernels; an op registered with
:func:`torch.library.custom_op` is instead an opaque node of the graph: Dynamo records it,
``register_fake`` tells the compiler the shapes/dtypes/strides of its outputs without running it,
and ``register_autograd`` gives AOTAutograd the backward (another custom op). A model built from
:mod:`batchnorm.core.modules` therefore compiles with ``fullgraph=True`` — no graph breaks — and the
compiled forward and backward call the same kernels as eager mode (numba on CPU where they
apply, the torch composite path elsewhere: dispatch happens inside the op, at run time).

The ops (all functional: fresh outputs, inputs never modified)::

    batchnorm::train_forward(x, weight?, bias?, eps, channel_axis, act, slope) -> (y, mean, var)
    batchnorm::train_backward(dy, x, y?, weight?, bias?, mean, var, eps, channel_axis, act, slope)
        -> (dx, dweight, dbias)
    batchnorm::eval_forward(x, mean, var, weight?, bias?, eps, channel_axis, act, slope) -> y
    batchnorm::eval_backward(dy, x, y?, weight?, bias?, mean, var, eps, channel_axis, act, slope)
        -> (dx, dweight, dbias)

Conventions: ``channel_axis`` is non-negative; ``act`` one of identity/relu/leaky_relu/elu
(``slope`` = leaky slope or ELU α). ``mean``/``var`` (biased) come back as float64 on CPU (what
the numba backend computes; the backward needs the mean to better than float32 precision when
``|mean| ≫ std``) and in the accumulation dtype elsewhere; they are not differentiable.
``dweight``/``dbias`` are always returned (custom ops cannot return None): zeros when the
parameter is None, and the autograd formula drops them then. ``y`` has ``x``'s strides
(channels-last stays channels-last).

Double backward (``create_graph=True``) evaluates the closed-form backward with differentiable
torch ops on statistics recomputed from ``x``, as :mod:`batchnorm.core.autograd` does.

Eager code does not go through these ops (:func:`batchnorm.core.autograd.train_apply` picks
``BatchNormTrainFn`` there, which skips the dispatcher round trip); they are used while
``torch.compiler.is_compiling()``. They can also be called directly:

    >>> import torch, batchnorm.core.ops
    >>> x = torch.randn(8, 4, 5, 5)
    >>> y, mean, var = torch.ops.batchnorm.train_forward(x, None, None, 1e-5, 1, "relu", 0.0)
"""

import torch
from torch import Tensor

from .. import kernels
from ..kernels import torch_backend
from ..stats import acc_dtype

__all__ = ["eval_backward", "eval_forward", "train_backward", "train_forward"]


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.device.type == "cpu" else acc_dtype(x.dtype)


def _grad_dtype(p: Tensor | None, x: Tensor) -> torch.dtype:
    return x.dtype if p is None else p.dtype


def _in_layout_of(t: Tensor, x: Tensor) -> Tensor:
    """``t`` with the strides ``torch.empty_like(x)`` has (what the fake functions promise).

    The reference strides come from a meta tensor, so the common case (already in layout)
    allocates nothing.
    """
    if t.numel() <= 1 or t.stride() == torch.empty_like(x, device="meta").stride():
        return t
    return torch.empty_like(x).copy_(t)


def _fake_grads(x, weight, bias, channel_axis):
    """Shapes/dtypes of a backward op's ``(dx, dweight, dbias)`` for the compiler."""
    c = x.shape[channel_axis]
    return (torch.empty_like(x), x.new_empty((c,), dtype=_grad_dtype(weight, x)),
            x.new_empty((c,), dtype=_grad_dtype(bias, x)))


def _grads_out(x, weight, bias, dw, db, c):
    dw = dw if dw is not None else x.new_zeros(c, dtype=_grad_dtype(weight, x))
    db = db if db is not None else x.new_zeros(c, dtype=_grad_dtype(bias, x))
    return dw, db


# -------------------------------------------------------------------------------------- train
@torch.library.custom_op("batchnorm::train_forward", mutates_args=())
def train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, channel_axis: int,
                  act: str, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """Training forward on the backend :func:`batchnorm.kernels.select` picks: ``(y, mean, var)``."""
    backend = kernels.select(x, channel_axis, act)
    y, mean, var = backend.train_forward(x, weight, bias, eps, channel_axis, act, slope)
    sd = _stat_dtype(x)
    return _in_layout_of(y, x), mean.to(sd), var.to(sd)


@train_forward.register_fake
def _(x, weight, bias, eps, channel_axis, act, slope):
    c = x.shape[channel_axis]
    sd = _stat_dtype(x)
    return torch.empty_like(x), x.new_empty((c,), dtype=sd), x.new_empty((c,), dtype=sd)


@torch.library.custom_op("batchnorm::train_backward", mutates_args=())
def train_backward(dy: Tensor, x: Tensor, y: Tensor | None, weight: Tensor | None,
                   bias: Tensor | None, mean: Tensor, var: Tensor, eps: float, channel_axis: int, act: str,
                   slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form training backward: ``(dx, dweight, dbias)``."""
    backend = kernels.select(x, channel_axis, act)
    dx, dw, db = backend.backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope)
    dw, db = _grads_out(x, weight, bias, dw, db, x.shape[channel_axis])
    return _in_layout_of(dx, x), dw, db


@train_backward.register_fake
def _(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope):
    return _fake_grads(x, weight, bias, channel_axis)


def _train_setup(ctx, inputs, output):
    x, weight, bias, eps, channel_axis, act, slope = inputs
    y, mean, var = output
    ctx.cfg = (eps, channel_axis, act, slope)
    ctx.has = (weight is not None, bias is not None)
    ctx.save_for_backward(x, weight, bias, mean, var, y if act != "identity" else None)
    ctx.mark_non_differentiable(mean, var)


def _train_grad(ctx, dy, _dmean, _dvar):
    x, weight, bias, mean, var, y = ctx.saved_tensors
    eps, axis, act, slope = ctx.cfg
    if dy is None:
        return None, None, None, None, None, None, None
    if torch.is_grad_enabled():  # double backward: differentiable formula, statistics recomputed from x
        dx, dw, db = torch_backend.differentiable_train_backward(dy, x, weight, bias, eps, axis, act, slope)
    else:
        dx, dw, db = train_backward(dy, x, y, weight, bias, mean, var, eps, axis, act, slope)
    return (dx, dw if ctx.has[0] else None, db if ctx.has[1] else None, None, None, None, None)


train_forward.register_autograd(_train_grad, setup_context=_train_setup)


# --------------------------------------------------------------------------------------- eval
@torch.library.custom_op("batchnorm::eval_forward", mutates_args=())
def eval_forward(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                 eps: float, channel_axis: int, act: str, slope: float) -> Tensor:
    """``act(γ (x − mean)/sqrt(var + ε) + β)`` with given statistics."""
    backend = kernels.select(x, channel_axis, act, "eval")
    return _in_layout_of(backend.eval_forward(x, mean, var, weight, bias, eps, channel_axis, act, slope), x)


@eval_forward.register_fake
def _(x, mean, var, weight, bias, eps, channel_axis, act, slope):
    return torch.empty_like(x)


@torch.library.custom_op("batchnorm::eval_backward", mutates_args=())
def eval_backward(dy: Tensor, x: Tensor, y: Tensor | None, weight: Tensor | None,
                  bias: Tensor | None, mean: Tensor, var: Tensor, eps: float, channel_axis: int, act: str,
                  slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`eval_forward` w.r.t. x, γ, β: ``(dx, dweight, dbias)``."""
    backend = kernels.select(x, channel_axis, act, "eval")
    dx, dw, db = backend.eval_backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope)
    dw, db = _grads_out(x, weight, bias, dw, db, x.shape[channel_axis])
    return _in_layout_of(dx, x), dw, db


@eval_backward.register_fake
def _(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope):
    return _fake_grads(x, weight, bias, channel_axis)


def _eval_setup(ctx, inputs, output):
    x, mean, var, weight, bias, eps, channel_axis, act, slope = inputs
    ctx.cfg = (eps, channel_axis, act, slope)
    ctx.has = (weight is not None, bias is not None)
    ctx.save_for_backward(x, mean, var, weight, bias, output if act != "identity" else None)


def _eval_grad(ctx, dy):
    x, mean, var, weight, bias, y = ctx.saved_tensors
    eps, axis, act, slope = ctx.cfg
    if dy is None:
        return (None,) * 9
    if torch.is_grad_enabled():
        dx, dw, db = torch_backend.eval_backward(dy, x, y, weight, bias, mean, var, eps, axis, act, slope)
    else:
        dx, dw, db = eval_backward(dy, x, y, weight, bias, mean, var, eps, axis, act, slope)
    return (dx, None, None, dw if ctx.has[0] else None, db if ctx.has[1] else None, None, None, None, None)


eval_forward.register_autograd(_eval_grad, setup_context=_eval_setup)
