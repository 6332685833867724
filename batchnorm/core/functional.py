"""Batch Normalization as pure torch functions: state in, state out.

Two families live here:

* the ``tf.nn`` style pair :func:`moments` and :func:`batch_norm` (reference article 002)::

      mean, variance = moments(x, axes=[0, 2, 3])
      y = batch_norm(x, mean, variance, offset=beta, scale=gamma, variance_epsilon=1e-3)

  ``batch_norm`` computes ``scale · (x − mean) / sqrt(variance + ε) + offset`` with broadcasting
  and is differentiable through every argument (plain torch ops);

* the training/eval pair that the modules use, with the hand-derived backward
  (:class:`batchnorm.core.autograd.BatchNormTrainFn`) and the fast kernels where they apply::

      y, state = batch_norm_train(x, running_mean, running_var, weight, bias,
                                  momentum=0.1, eps=1e-5, num_batches_tracked=nbt)
      y = batch_norm_eval(x, state.mean, state.var, weight, bias, eps=1e-5)

  :func:`batch_norm_train` never writes into its arguments: it returns the new running statistics
  as a :class:`RunningStats`; the caller decides where they go (or, with ``inplace_stats=True``, it
  writes them into the given buffers, as ``torch.nn.functional.batch_norm`` does).

Conventions: channels on ``channel_axis`` (1 = channels-first such as NCHW, -1 = channels-last such
as NHWC); ranks 2 to 5. Normalisation uses the biased batch variance with ε inside the square root.
``momentum`` is PyTorch's weight of the new batch (Keras's ``decay=0.99`` is ``momentum=0.01``) and
``None`` means the cumulative average. ``running_var`` stores the unbiased variance
``var · n/(n−1)`` like PyTorch, or the biased one (Keras, Flax) with ``running_var_unbiased=False``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from .._checks import (
    check_activation,
    check_channel_tensor,
    check_distinct,
    check_eps,
    check_input,
    check_mask,
    check_momentum,
    check_nonfinite,
    check_num_batches_tracked,
    check_tensor,
)
from ..stats import acc_dtype, masked_moments
from .autograd import capturing, eval_apply, masked_train_apply, train_apply

__all__ = [
    "RunningStats",
    "batch_norm",
    "batch_norm_eval",
    "batch_norm_train",
    "moments",
    "update_running_stats",
]


class RunningStats(NamedTuple):
    """Population estimates after a training step (None where not tracked)."""

    mean: torch.Tensor | None
    var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None


def moments(
    x: torch.Tensor, axes: Sequence[int] | None = None, keepdim: bool = False, *,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of ``x`` over ``axes`` (``tf.nn.moments``).

    Two-pass (mean first, then mean squared deviation), accumulated in float32 for half-precision
    input and returned in ``x``'s dtype. Differentiable.

    Args:
        x: floating tensor.
        axes: axes to reduce; default all but axis 1 (per-channel statistics of NC... input).
        keepdim: keep reduced axes with size 1 (``keep_dims`` in TensorFlow).
        mask: optional bool tensor, True = valid: the moments of the valid values only
            (``Σ m·x / Σ m`` and ``Σ m·(x − μ)² / Σ m``, see :func:`batchnorm.stats.masked_moments`).
            Its shape is ``x``'s without axis 1 (``(N, L)`` for ``(N, C, L)``; size-1 axes
            broadcast) and it needs the default per-channel ``axes`` (all but axis 1). Not
            differentiable with respect to the mask; differentiable in ``x``.

    Example:
        >>> x = torch.randn(8, 3, 4, 4)
        >>> mean, var = moments(x, axes=[0, 2, 3])
        >>> mean.shape
        torch.Size([3])
    """
    op = "batchnorm.moments"
    x = check_tensor(op, x)
    if x.numel() == 0:
        raise ValueError(f"{op}: got an empty input of shape {tuple(x.shape)}; moments of no values are "
                         f"undefined - skip the call for empty inputs")
    if axes is None:
        if x.ndim < 2:
            raise ValueError(f"{op}: default axes need an input of rank >= 2, got {x.ndim}-D; pass axes=")
        axes = [d for d in range(x.ndim) if d != 1]
    if isinstance(axes, (int, torch.Tensor)) or not isinstance(axes, Sequence):
        raise TypeError(f"{op}: expected axes to be a list or tuple of ints, got {axes!r}; for one axis "
                        f"write axes=[{axes!r}]")
    dims = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, int) or not -x.ndim <= a < x.ndim:
            raise ValueError(f"{op}: axis {a!r} is out of range for a {x.ndim}-D input; give ints in "
                             f"[{-x.ndim}, {x.ndim - 1}]")
        dims.append(a % x.ndim)
    if len(set(dims)) != len(dims):
        raise ValueError(f"{op}: repeated axis in axes={list(axes)}; list each axis once")
    if mask is not None:
        return _masked_moments_tf(op, x, dims, keepdim, mask)
    xa = x.to(acc_dtype(x.dtype))
    if not dims:  # axes=[] reduces nothing (NumPy, TensorFlow); torch would read dim=[] as "every axis"
        return x.clone(), ((xa - xa) ** 2).to(x.dtype)
    mean = xa.mean(dim=dims, keepdim=True)
    var = ((xa - mean) ** 2).mean(dim=dims, keepdim=keepdim)
    if not keepdim:
        mean = mean.squeeze(dims)
    return mean.to(x.dtype), var.to(x.dtype)


def _masked_moments_tf(op, x, dims, keepdim, mask):
    """:func:`moments` with a mask: per-channel (axis 1) moments of the valid values."""
    if x.ndim < 2 or sorted(dims) != [d for d in range(x.ndim) if d != 1]:
        raise ValueError(f"{op}: a mask needs per-channel moments (axes = every axis but 1, the default), "
                         f"got axes={dims} for a {x.ndim}-D input; leave axes=None")
    check_mask(op, mask, x, 1)
    mom = masked_moments(x, mask, 1)
    if float(mom.count) == 0:
        raise ValueError(f"{op}: the mask marks no valid position (all False); moments of no values are "
                         f"undefined - skip the call, or check the mask")
    mean, var = mom.mean.to(x.dtype), mom.var.to(x.dtype)
    if keepdim:
        shape = [1] * x.ndim
        shape[1] = -1
        mean, var = mean.reshape(shape), var.reshape(shape)
    return mean, var


def batch_norm(
    x: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    offset: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    variance_epsilon: float = 1e-3,
) -> torch.Tensor:
    """``scale · (x − mean) / sqrt(variance + variance_epsilon) + offset`` (``tf.nn.batch_normalization``).

    All of ``mean``, ``variance``, ``offset``, ``scale`` broadcast against ``x`` (for NCHW input use
    shape ``(C, 1, 1)`` or ``keepdim=True`` moments; for NHWC, shape ``(C,)``). ``offset`` (β) and
    ``scale`` (γ) may be None. Differentiable through every tensor argument.

    Example:
        >>> x = torch.randn(16, 4)
        >>> m, v = moments(x, axes=[0])
        >>> y = batch_norm(x, m, v, variance_epsilon=1e-5)
    """
    op = "batchnorm.batch_norm"
    x = check_tensor(op, x)
    variance_epsilon = check_eps(op, variance_epsilon)
    parts = {"mean": mean, "variance": variance, "offset": offset, "scale": scale}
    for name, t in parts.items():
        if t is None:
            if name in ("mean", "variance"):
                raise TypeError(f"{op}: {name} is required (a tensor broadcastable to the input)")
            continue
        t = check_tensor(op, t, name)
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but the input is on {x.device}; move them to "
                             f"one device")
        try:
            torch.broadcast_shapes(t.shape, x.shape)
        except RuntimeError:
            raise ValueError(f"{op}: {name} of shape {tuple(t.shape)} does not broadcast against the input "
                             f"of shape {tuple(x.shape)}; for NCHW input give it shape (C, 1, 1)") from None
    inv = torch.rsqrt(variance + variance_epsilon)
    if scale is not None:
        inv = inv * scale
    y = (x - mean) * inv
    return y + offset if offset is not None else y


def _update_with_numpy(running_mean, running_var, batch_mean, batch_var, factor: float, corr: float) -> bool:
    """The in-place update of :func:`update_running_stats` as NumPy ufuncs on views of CPU buffers
    (float32 or float64, the accumulation dtype): 11 µs against 27 µs for the ten torch ops on a
    small layer, and the same bits — NumPy rounds a float32 array times a float32 scalar in float32,
    as torch rounds a float32 tensor times a Python float. Returns False, writing nothing, where it
    does not apply (another device, tensors that need grad or are not plain tensors, under
    ``torch.compile`` or a functorch transform). The buffers' version counters are bumped, as an
    in-place torch op would, so autograd still notices a graph that saved them."""
    if torch.compiler.is_compiling() or capturing():  # (a tracer or transform sees no NumPy write)
        return False
    with np.errstate(all="ignore"):  # Inf/NaN statistics (and float32 overflow) pass quietly, as in torch
        try:
            r_m, r_v = running_mean.numpy(), running_var.numpy()  # (raises for what NumPy cannot view)
            s_m = batch_mean.detach().numpy().astype(r_m.dtype)   # fresh arrays: the batch stats stay
            s_v = batch_var.detach().numpy().astype(r_m.dtype)
        except (RuntimeError, TypeError, ValueError):
            return False
        f, g, c = (r_m.dtype.type(v) for v in (factor, 1.0 - factor, corr))
        np.multiply(s_m, f, out=s_m)
        np.multiply(s_v, c, out=s_v)
        np.multiply(s_v, f, out=s_v)
        np.add(np.multiply(r_m, g, out=r_m), s_m, out=r_m)
        np.add(np.multiply(r_v, g, out=r_v), s_v, out=r_v)
    torch.autograd.graph.increment_version(running_mean)
    torch.autograd.graph.increment_version(running_var)
    return True


def update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    n: int,
    momentum: float | None = 0.1,
    num_batches_tracked: torch.Tensor | None = None,
    unbiased: bool = True,
    *,
    inplace: bool = False,
) -> RunningStats:
    """One step of the population estimates; returns new tensors and changes nothing (by default).

    ``r ← (1 − f) · r + f · s`` with ``f = momentum``, or ``f = 1 / (t + 1)`` for ``momentum=None``
    (``t`` batches tracked so far) which makes ``r`` the equal-weight average of every batch seen.
    ``batch_var`` is biased; it is stored as ``batch_var · n / (n − 1)`` when ``unbiased``. The
    arithmetic runs in the buffers' accumulation dtype (float32 buffers: float32, like
    ``torch.nn.BatchNorm``), each product rounded before the sum.

    ``inplace=True`` writes the result into ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` (as ``torch.nn.functional.batch_norm`` does) and returns those very
    tensors: the same numbers to the last bit, without new tensors to allocate and copy back (the
    modules use it: about 25 µs less per training step of a small layer). ``batch_mean`` and
    ``batch_var`` are never written.
    """
    _check_update_args(running_mean, running_var, batch_mean, batch_var, n, momentum, num_batches_tracked,
                       unbiased, inplace)
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("batchnorm.update_running_stats: momentum=None (cumulative average) needs "
                             "num_batches_tracked; pass the count of batches seen so far")
        factor = 1.0 / (float(num_batches_tracked) + 1.0)
    else:
        factor = float(momentum)
    acc = acc_dtype(running_mean.dtype)
    corr = n / (n - 1) if unbiased and n > 1 else 1.0
    if (inplace and running_mean.dtype == acc and running_var.dtype == acc
            and _update_with_numpy(running_mean, running_var, batch_mean, batch_var, factor, corr)):
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return RunningStats(running_mean, running_var, num_batches_tracked)
    nbt = None if num_batches_tracked is None else num_batches_tracked + 1
    bv = batch_var.to(acc) * corr
    new_mean = (factor * batch_mean.to(acc) + (1.0 - factor) * running_mean.to(acc)).to(running_mean.dtype)
    new_var = (factor * bv + (1.0 - factor) * running_var.to(acc)).to(running_var.dtype)
    if inplace:  # where NumPy cannot write (float16/bfloat16 buffers, torch.compile, ...): store the above
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
            if num_batches_tracked is not None:
                num_batches_tracked.copy_(nbt)
        return RunningStats(running_mean, running_var, num_batches_tracked)
    return RunningStats(new_mean, new_var, nbt)


def _check_update_args(running_mean, running_var, batch_mean, batch_var, n, momentum, num_batches_tracked,
                       unbiased, inplace) -> None:
    """Every argument of :func:`update_running_stats`, checked before anything is computed or written."""
    op = "batchnorm.update_running_stats"
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if not isinstance(t, torch.Tensor) or t.ndim != 1:
            raise TypeError(f"{op}: expected {name} to be a 1-D tensor of C values, got "
                            f"{type(t).__name__}{'' if not isinstance(t, torch.Tensor) else tuple(t.shape)}")
    c = running_mean.shape[0]
    for name, t in (("running_var", running_var), ("batch_mean", batch_mean), ("batch_var", batch_var)):
        check_channel_tensor(op, name, t, c, x=running_mean)
    check_channel_tensor(op, "running_mean", running_mean, c)
    for name, t in (("batch_mean", batch_mean), ("batch_var", batch_var)):
        if t is None:
            raise TypeError(f"{op}: {name} is required (the batch statistic of shape ({c},))")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{op}: expected n (values per channel in the batch) to be an int >= 1, got {n!r}")
    check_momentum(op, momentum)
    check_num_batches_tracked(op, num_batches_tracked, like=running_mean)
    if not isinstance(unbiased, bool) or not isinstance(inplace, bool):
        raise TypeError(f"{op}: expected unbiased and inplace to be True or False, got {unbiased!r} and "
                        f"{inplace!r}")
    if inplace:
        check_distinct(op, {"running_mean": running_mean, "running_var": running_var,
                            "num_batches_tracked": num_batches_tracked})


def _check_train_args(op, x, axis, running_mean, running_var, weight, bias, *, eps, momentum, activation,
                      negative_slope, nonfinite, num_batches_tracked, check_act=check_activation):
    """The argument checks every training op shares (after ``check_input``); raises before any state
    changes. Returns ``(eps, momentum, act, slope, nonfinite)`` normalised."""
    c = x.shape[axis]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        check_channel_tensor(op, name, t, c, x=x)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: give both running_mean and running_var, or neither")
    eps = check_eps(op, eps)
    momentum = check_momentum(op, momentum)
    act, slope = check_act(op, activation, negative_slope)
    nonfinite = check_nonfinite(op, nonfinite)
    if momentum is None and running_mean is not None and num_batches_tracked is None:
        raise ValueError(f"{op}: momentum=None (cumulative average) needs num_batches_tracked; pass the "
                         f"count of batches seen so far (torch.tensor(0) at the start)")
    if running_mean is not None:  # what an update writes: validated here, before the first write
        check_num_batches_tracked(op, num_batches_tracked, like=running_mean)
        check_distinct(op, {"running_mean": running_mean, "running_var": running_var,
                            "num_batches_tracked": num_batches_tracked})
    return eps, momentum, act, slope, nonfinite


def _skip_nonfinite(op: str, nonfinite: str, mean: torch.Tensor, var: torch.Tensor, *,
                    subject: str = "this batch's statistics",
                    cause: str = "the input holds non-finite values", note: str = "") -> bool:
    """The ``nonfinite`` policy for the running statistics, shared by every training path.

    False: update them ("update", or the statistics are finite). True: leave them and the batch
    count as they are ("skip"). "raise": FloatingPointError naming ``subject`` and ``cause``.
    """
    if nonfinite == "update" or bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
        return False
    if nonfinite == "raise":
        raise FloatingPointError(f"{op}: {subject} contain NaN or Inf ({cause}); running statistics "
                                 f"were left unchanged{note}. Check the data/learning rate, or use "
                                 f"nonfinite='skip' to ignore such batches")
    return True


def batch_norm_train(
    x: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: torch.Tensor | None = None,
    channel_axis: int = 1,
    activation: str = "identity",
    negative_slope: float = 0.01,
    running_var_unbiased: bool = True,
    nonfinite: str = "update",
    inplace_stats: bool = False,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, RunningStats]:
    """Training-mode BN: normalise with batch statistics, return the output and new running stats.

    ``y = act(γ · (x − μ_B) / sqrt(σ²_B + ε) + β)`` with per-channel batch mean ``μ_B`` and biased
    variance ``σ²_B``. The backward is the closed form of article 003 (fused with the activation).

    Args:
        x: input of rank 2–5, channels on ``channel_axis``.
        running_mean, running_var: current population estimates, or None to track nothing.
        weight, bias: γ and β of shape (C,), or None.
        momentum: weight of this batch in the EMA; None = cumulative average.
        eps: added to the variance inside the square root.
        num_batches_tracked: batches seen so far (0-d long tensor), incremented in the result.
        channel_axis: 1 (channels-first) or -1 (channels-last), any axis works.
        activation: "identity", "relu", "leaky_relu" or "elu" fused after the affine step.
        negative_slope: leaky_relu slope, or elu's α.
        running_var_unbiased: store ``σ²_B · n/(n−1)`` (PyTorch) or ``σ²_B`` (Keras/Flax).
        nonfinite: what a batch with NaN/Inf statistics does to the running stats: "update" (fold it
            in, like PyTorch), "skip" (leave them and the batch count as they were), "raise".
        inplace_stats: write the new running statistics into ``running_mean``, ``running_var`` and
            ``num_batches_tracked`` (as ``torch.nn.functional.batch_norm`` does) and return those
            tensors, instead of returning new ones (see :func:`update_running_stats`). Only after every
            check has passed and the output is computed: a bad call still changes nothing.
        mask: masked BN for padded batches: a bool tensor, True = valid, with the input's shape
            less the channel axis (``(N, L)`` for ``(N, C, L)``, ``(N,)`` for ``(N, C)``, ``(N, H, W)``
            or ``(N, 1, 1)`` for ``(N, C, H, W)``). The statistics are those of the valid positions
            only (``n = Σ m``, ``μ = Σ m·x / n``, ``σ² = Σ m·(x − μ)² / n``); every position, valid
            or not, is normalised with them; the backward is the exact gradient of that (padded
            positions get the elementwise part ``γ·invstd·dy`` only, see
            :mod:`batchnorm.kernels.masked`); the running statistics and the unbiased correction
            ``n/(n − 1)`` use the valid count. Fewer than 2 valid values per channel is an error.
            Equals plain BN on the valid positions packed together (outputs there, gradients,
            running statistics).

    Returns:
        ``(y, RunningStats(mean, var, num_batches_tracked))``; the stats are the inputs unchanged
        when nothing is tracked or the batch was skipped.
    """
    op = "batchnorm.batch_norm_train"
    x, axis = check_input(op, x, channel_axis=channel_axis, training=True)
    c = x.shape[axis]
    eps, momentum, act, slope, nonfinite = _check_train_args(
        op, x, axis, running_mean, running_var, weight, bias, eps=eps, momentum=momentum,
        activation=activation, negative_slope=negative_slope, nonfinite=nonfinite,
        num_batches_tracked=num_batches_tracked)

    if mask is not None:
        check_mask(op, mask, x, axis)
        n = int(mask.expand([s for d, s in enumerate(x.shape) if d != axis]).sum())
        if n <= 1:
            raise ValueError(f"{op}: expected more than 1 valid value per channel when training, got {n} "
                             f"(mask of shape {tuple(mask.shape)} on input shape {tuple(x.shape)}; variance "
                             f"undefined); use a batch with at least 2 valid positions, or eval mode")
        y, mean, var, _ = masked_train_apply(x, mask, weight, bias, eps, axis, act, slope)
    else:
        y, mean, var = train_apply(x, weight, bias, eps, axis, act, slope)  # (custom op under torch.compile)
        n = x.numel() // c
    old = RunningStats(running_mean, running_var, num_batches_tracked)
    if running_mean is None or _skip_nonfinite(op, nonfinite, mean, var):
        return y, old
    return y, update_running_stats(running_mean, running_var, mean, var, n, momentum,
                                   num_batches_tracked, running_var_unbiased, inplace=inplace_stats)


def batch_norm_eval(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    channel_axis: int = 1,
    activation: str = "identity",
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """Inference-mode BN with given population statistics: ``act(γ (x − mean)/sqrt(var + ε) + β)``.

    Gradients flow to ``x``, ``weight`` and ``bias``; the statistics are treated as constants.
    """
    op = "batchnorm.batch_norm_eval"
    x, axis = check_input(op, x, channel_axis=channel_axis)
    c = x.shape[axis]
    if mean is None or var is None:
        raise TypeError(f"{op}: mean and var are required; for batch statistics use batch_norm_train")
    for name, t in (("mean", mean), ("var", var), ("weight", weight), ("bias", bias)):
        check_channel_tensor(op, name, t, c, x=x)
    eps = check_eps(op, eps)
    act, slope = check_activation(op, activation, negative_slope)
    return eval_apply(x, mean.detach(), var.detach(), weight, bias, eps, axis, act, slope)
