"""Batch Renormalization (Ioffe, 2017): BN whose training output matches inference.

Plain BN normalises with the statistics of the current mini-batch in training and with the
running (population) statistics at inference. For small or non-i.i.d. batches the two differ, and
the network learns on activations it will never see again. Batch Renorm corrects the batch-normalised
value by a per-channel affine map towards the running statistics::

    μ_B, σ²_B = batch mean and biased batch variance           (the ones BN normalises with)
    σ_B = sqrt(σ²_B + ε),    σ = sqrt(running_var + ε)
    r = clip(σ_B / σ, 1/r_max, r_max)                          (treated as a constant: no gradient)
    d = clip((μ_B − running_mean) / σ, −d_max, d_max)          (treated as a constant: no gradient)
    x̂ = (x − μ_B) / σ_B
    y = act(γ · (x̂ · r + d) + β)

When neither clip is active, ``x̂ · r + d = (x − running_mean) / σ`` exactly: the training output is the
inference output. ``r_max = 1, d_max = 0`` gives ``r = 1, d = 0``: plain BN, bit for bit.

Which variances (the choice matters for r):

* ``σ_B`` uses the **biased** batch variance, the one that normalises ``x̂``. Any other choice would
  break the identity above.
* ``σ`` uses ``running_var`` **as stored**, which is what inference divides by: the unbiased
  estimate by default (PyTorch), the biased one with ``running_var_unbiased=False`` (Keras/Flax).
* r and d are computed from the running statistics *before* this batch is folded in; the running
  statistics are then updated exactly as BN updates them (EMA of the batch mean and of the batch
  variance, PyTorch ``momentum``). The paper keeps a running σ instead of a running σ²; we keep σ²
  so that checkpoints are interchangeable with ``torch.nn.BatchNorm*``.

How it runs: with r and d constant, ``x ↦ γ (x̂ r + d) + β`` is BN with weight ``γ r`` and bias
``γ d + β``. We first compute the batch moments as the selected backend does (:mod:`batchnorm.stats`
for the torch backend, the fused kernel's statistics pass otherwise — an extra read of x, because r
and d must be known before the normalising pass), then call the ordinary training op
(:func:`batchnorm.core.functional.batch_norm_train`, so the fast kernels and the fused activation serve
it) with that effective weight and bias. Autograd's chain rule through ``γ r`` and ``γ d + β`` then
gives exactly the paper's gradients, ``∂γ = Σ dy · (x̂ r + d)`` and ``∂β = Σ dy``, and ``∂x`` is
BN's backward with weight ``γ r``.

The warm-up schedule (:class:`RenormSchedule`): the paper trains with ``r_max = 1, d_max = 0`` (plain
BN) for the first 5k steps, then "gradually" relaxes them to ``r_max = 3`` (reached at 40k steps) and
``d_max = 5`` (reached at 25k steps). We use a linear ramp between those points; the step is the
layer's ``num_batches_tracked`` (batches seen before this one), so the schedule survives a
checkpoint round trip without any extra state.

Paper: Sergey Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
Batch-Normalized Models", NeurIPS 2017.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import kernels
from .._checks import check_channel_tensor, check_eps, check_input
from ..core import functional as F
from ..core.autograd import refuse_capture
from ..core.functional import RunningStats
from ..core.modules import _BatchNorm
from ..kernels import torch_backend
from ..stats import acc_dtype, batch_moments

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "RenormSchedule",
    "batch_renorm_train",
    "renorm_factors",
]


def _check_r_max(op: str, r_max: object) -> float:
    if isinstance(r_max, bool) or not isinstance(r_max, int | float) or not r_max >= 1:
        raise ValueError(f"{op}: expected r_max to be a number >= 1 (r is clipped to [1/r_max, r_max]), got "
                         f"{r_max!r}; r_max=1 turns the correction off (plain BN), the paper relaxes it to 3")
    return float(r_max)


def _check_d_max(op: str, d_max: object) -> float:
    if isinstance(d_max, bool) or not isinstance(d_max, int | float) or not d_max >= 0:
        raise ValueError(f"{op}: expected d_max to be a number >= 0 (d is clipped to [-d_max, d_max]), got "
                         f"{d_max!r}; d_max=0 turns the shift off (plain BN), the paper relaxes it to 5")
    return float(d_max)


def _check_step(op: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{op}: expected {name} to be an int >= 0 (a count of training steps), "
                         f"got {value!r}")
    return value


@dataclass(frozen=True)
class RenormSchedule:
    """The paper's warm-up of the clipping limits, as a function of the training step.

    Shape (``t`` = batches seen before this one, i.e. the layer's ``num_batches_tracked``)::

        r_max(t) = 1                                         for t <= warmup_steps
                 = 1 + (r_max − 1) · (t − warmup_steps) / (r_max_steps − warmup_steps)   (linear ramp)
                 = r_max                                     for t >= r_max_steps
        d_max(t) = the same ramp from 0 to d_max, reaching it at d_max_steps

    During warm-up the layer is plain BN. Defaults are the paper's ImageNet values (5k steps of BN,
    r_max = 3 at 40k steps, d_max = 5 at 25k steps); scale the step counts to your run length.

    Args:
        warmup_steps: steps with ``r_max = 1, d_max = 0``. Default 5000.
        r_max: final r_max (>= 1). Default 3.
        d_max: final d_max (>= 0). Default 5.
        r_max_steps: step at which r_max is reached (>= warmup_steps). Default 40000.
        d_max_steps: step at which d_max is reached (>= warmup_steps). Default 25000.

    Example:
        >>> s = RenormSchedule(warmup_steps=100, r_max_steps=300, d_max_steps=200)
        >>> s(0), s(200), s(1000)
        ((1.0, 0.0), (2.0, 5.0), (3.0, 5.0))
    """

    warmup_steps: int = 5000
    r_max: float = 3.0
    d_max: float = 5.0
    r_max_steps: int = 40000
    d_max_steps: int = 25000

    def __post_init__(self) -> None:
        op = "batchnorm.RenormSchedule"
        w = _check_step(op, "warmup_steps", self.warmup_steps)
        _check_r_max(op, self.r_max)
        _check_d_max(op, self.d_max)
        if not (math.isfinite(self.r_max) and math.isfinite(self.d_max)):
            raise ValueError(f"{op}: expected finite final limits for a ramp, got r_max={self.r_max!r}, "
                             f"d_max={self.d_max!r}; for no clipping at all pass r_max/d_max to the layer")
        for name in ("r_max_steps", "d_max_steps"):
            v = _check_step(op, name, getattr(self, name))
            if v < w:
                raise ValueError(f"{op}: expected {name} >= warmup_steps ({w}), got {v}; the ramp starts "
                                 f"after the warm-up and ends at {name}")

    @staticmethod
    def _ramp(t: int, start: int, end: int, lo: float, hi: float) -> float:
        if t <= start:
            return lo
        if t >= end:
            return hi
        return lo + (hi - lo) * (t - start) / (end - start)

    def __call__(self, step: int) -> tuple[float, float]:
        """``(r_max, d_max)`` in force at training step ``step`` (batches seen so far)."""
        t = int(step)
        return (self._ramp(t, self.warmup_steps, self.r_max_steps, 1.0, float(self.r_max)),
                self._ramp(t, self.warmup_steps, self.d_max_steps, 0.0, float(self.d_max)))


def renorm_factors(
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    *,
    eps: float = 1e-5,
    r_max: float = 3.0,
    d_max: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch Renorm's per-channel correction ``(r, d)``, detached, in the accumulation dtype.

    ``r = clip(sqrt(batch_var + ε) / sqrt(running_var + ε), 1/r_max, r_max)`` and
    ``d = clip((batch_mean − running_mean) / sqrt(running_var + ε), −d_max, d_max)``.
    ``batch_var`` is the biased batch variance (the one BN normalises with); ``running_var`` is used
    as stored (see the module docstring).

    Example:
        >>> r, d = renorm_factors(torch.tensor([1.0]), torch.tensor([4.0]), torch.tensor([0.0]),
        ...                       torch.tensor([1.0]), eps=0.0, r_max=3.0, d_max=5.0)
        >>> r.item(), d.item()
        (2.0, 1.0)
    """
    op = "batchnorm.renorm_factors"
    eps = check_eps(op, eps)
    r_max = _check_r_max(op, r_max)
    d_max = _check_d_max(op, d_max)
    acc = acc_dtype(batch_mean.dtype)
    with torch.no_grad():
        sigma = torch.sqrt(running_var.detach().to(acc) + eps)
        r = (torch.sqrt(batch_var.detach().to(acc) + eps) / sigma).clamp(1.0 / r_max, r_max)
        d = ((batch_mean.detach().to(acc) - running_mean.detach().to(acc)) / sigma).clamp(-d_max, d_max)
    return r, d


def batch_renorm_train(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: torch.Tensor | None = None,
    channel_axis: int = 1,
    activation: str = "identity",
    negative_slope: float = 0.01,
    running_var_unbiased: bool = True,
    nonfinite: str = "update",
) -> tuple[torch.Tensor, RunningStats]:
    """Training-mode Batch Renorm: ``act(γ (x̂ r + d) + β)``; returns the output and new running stats.

    r and d (see :func:`renorm_factors`) come from this batch's moments and the running statistics
    passed in, before they are updated; they carry no gradient. The running statistics are updated
    as in :func:`batchnorm.core.functional.batch_norm_train`. Inference is plain BN with the running
    statistics (:func:`batchnorm.core.functional.batch_norm_eval`).

    Args:
        x: input of rank 2–5, channels on ``channel_axis``.
        running_mean, running_var: the population estimates μ and σ² (required: r and d are
            defined against them).
        weight, bias: γ and β of shape (C,), or None.
        r_max: clip limit of r (>= 1; ``math.inf`` = no clipping). Default 3.
        d_max: clip limit of d (>= 0; ``math.inf`` = no clipping). Default 5.
        momentum, eps, num_batches_tracked, channel_axis, activation, negative_slope,
        running_var_unbiased, nonfinite: as in :func:`batchnorm.core.functional.batch_norm_train`.

    Returns:
        ``(y, RunningStats(mean, var, num_batches_tracked))``.

    Shape: ``x`` and ``y`` the same; everything else ``(C,)``.

    Example:
        >>> x = torch.randn(4, 3, 5, 5)
        >>> rm, rv = torch.zeros(3), torch.ones(3)
        >>> y, new = batch_renorm_train(x, rm, rv, r_max=3.0, d_max=5.0)
        >>> new.mean.shape
        torch.Size([3])
    """
    op = "batchnorm.batch_renorm_train"
    r_max = _check_r_max(op, r_max)
    d_max = _check_d_max(op, d_max)
    x, axis = check_input(op, x, channel_axis=channel_axis, training=True)
    if running_mean is None or running_var is None:
        raise TypeError(f"{op}: running_mean and running_var are required (r and d correct the batch "
                        f"statistics towards them); without running statistics use batch_norm_train")
    c = x.shape[axis]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        check_channel_tensor(op, name, t, c, x=x)
    eps = check_eps(op, eps)
    # Everything else (momentum, activation, nonfinite, ...) is validated by batch_norm_train before
    # any tensor is produced; nothing here writes state.
    batch_mean, batch_var = _batch_stats(x.detach(), eps, axis)
    r, d = renorm_factors(batch_mean, batch_var, running_mean, running_var, eps=eps, r_max=r_max, d_max=d_max)
    w_eff, b_eff = _effective_affine(weight, bias, r, d)
    return F.batch_norm_train(
        x, running_mean, running_var, w_eff, b_eff,
        momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked, channel_axis=axis,
        activation=activation, negative_slope=negative_slope,
        running_var_unbiased=running_var_unbiased, nonfinite=nonfinite,
    )


def _batch_stats(x: torch.Tensor, eps: float, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This batch's per-channel (mean, biased var), computed the way the selected backend computes them.

    torch backend: :func:`batchnorm.stats.batch_moments`. A fast backend: its own training forward
    (its statistics are what the op will normalise with; the throw-away output comes from the
    kernels' reuse pool). That is one read of x in a fused kernel instead of torch's two passes with
    a full-size temporary (which, counting the page faults of that temporary, costs twice the whole
    fused BN forward and backward on a 128×64×16×16 input).
    """
    backend = kernels.select(x, axis, "identity")
    if backend is torch_backend:
        mean, var, _ = batch_moments(x, axis)
        return mean, var
    with torch.no_grad():
        _, mean, var = backend.train_forward(x, None, None, eps, axis, "identity", 0.0)
    return mean, var


def _effective_affine(
    weight: torch.Tensor | None, bias: torch.Tensor | None, r: torch.Tensor, d: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(γ r, γ d + β)``: BN with these gives γ (x̂ r + d) + β; autograd supplies ∂γ = r·Σdy x̂ + d·Σdy."""
    if weight is None:
        w_eff, b_eff = r, d
    else:
        w_eff, b_eff = weight * r.to(weight.dtype), weight * d.to(weight.dtype)
    if bias is not None:
        b_eff = b_eff.to(bias.dtype) + bias
    return w_eff, b_eff


class _BatchRenorm(_BatchNorm):
    """Base of BatchRenorm1d/2d/3d: BN's state and conventions plus the r/d correction in training."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        r_max: float | None = None,
        d_max: float | None = None,
        schedule: RenormSchedule | None = None,
        **kwargs: Any,
    ) -> None:
        op = type(self).__name__
        # Validate our own arguments before the base class allocates anything.
        if r_max is not None:
            r_max = _check_r_max(op, r_max)
        if d_max is not None:
            d_max = _check_d_max(op, d_max)
        if schedule is not None and not isinstance(schedule, RenormSchedule):
            raise TypeError(f"{op}: expected schedule to be a batchnorm.RenormSchedule or None, got "
                            f"{type(schedule).__name__}; e.g. RenormSchedule(warmup_steps=500, "
                            f"r_max_steps=4000, d_max_steps=2500)")
        if schedule is not None and r_max is not None and d_max is not None:
            raise ValueError(f"{op}: schedule is unused when both r_max and d_max are fixed; pass the "
                             f"limits or a schedule, not both")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.r_max = r_max
        self.d_max = d_max
        self.schedule = schedule if schedule is not None else RenormSchedule()

    def current_limits(self) -> tuple[float, float]:
        """``(r_max, d_max)`` that the next training step uses (fixed values, else the schedule at
        ``num_batches_tracked``)."""
        step = 0 if self.num_batches_tracked is None else int(self.num_batches_tracked)
        sr, sd = self.schedule(step)
        return (sr if self.r_max is None else self.r_max, sd if self.d_max is None else self.d_max)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.r_max is not None:
            s += f", r_max={self.r_max}"
        if self.d_max is not None:
            s += f", d_max={self.d_max}"
        if self.r_max is None or self.d_max is None:
            s += f", schedule={self.schedule}"
        return s

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats and self.running_mean is not None):
            # Inference (running statistics), or no running statistics to renormalise against (or
            # tracking switched off after construction, as torch treats it): plain BN.
            return super().forward(input)
        op = type(self).__name__
        refuse_capture(op, input)
        # an empty batch: as BN (an empty output, zero dγ/dβ, state unchanged, num_batches_tracked not
        # bumped, so the r/d schedule stays put)
        if isinstance(input, torch.Tensor) and input.numel() == 0:
            return super().forward(input)
        x, axis = check_input(op, input, ranks=self._ranks, channel_axis=self.channel_axis,
                              num_features=self.num_features, training=True)
        r_max, d_max = self.current_limits()
        return self._train_step(batch_renorm_train, x, axis, r_max=r_max, d_max=d_max)


class BatchRenorm1d(_BatchRenorm, nn.BatchNorm1d):
    """Batch Renormalization over ``(N, C)`` or ``(N, C, L)``; same state and state_dict keys as BatchNorm1d.

    Training: ``y = γ (x̂ r + d) + β`` with r, d the clipped, gradient-free corrections of the
    batch statistics towards the running ones (see :mod:`batchnorm.family.renorm`). Inference: identical to
    BN (running statistics). ``track_running_stats=False`` leaves nothing to correct towards: the
    layer is then plain BN.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as
            :class:`batchnorm.BatchNorm1d` (PyTorch conventions).
        r_max: fixed clip limit of r (>= 1), or None (default) to follow ``schedule``.
        d_max: fixed clip limit of d (>= 0), or None (default) to follow ``schedule``.
        schedule: a :class:`RenormSchedule` (default: the paper's, 5k steps of BN, then linear
            ramps to r_max = 3 at 40k and d_max = 5 at 25k steps), read at ``num_batches_tracked``.
        channel_axis, running_var_unbiased, nonfinite, activation, negative_slope: as BatchNorm1d
            (``activation`` is fused after the affine step).

    Example:
        >>> layer = BatchRenorm1d(16, r_max=3.0, d_max=5.0)
        >>> y = layer(torch.randn(8, 16))

    Paper: Ioffe, "Batch Renormalization", NeurIPS 2017.
    """

    _ranks = (2, 3)


class BatchRenorm2d(_BatchRenorm, nn.BatchNorm2d):
    """Batch Renormalization over ``(N, C, H, W)``; loads ``torch.nn.BatchNorm2d`` checkpoints.

    See :class:`BatchRenorm1d` for the formula and arguments. The schedule's step is
    ``num_batches_tracked``, so a BatchNorm2d checkpoint resumes the schedule where its count is.

    Example:
        >>> layer = BatchRenorm2d(8, schedule=RenormSchedule(warmup_steps=100, r_max_steps=1000,
        ...                                                  d_max_steps=600))
        >>> y = layer(torch.randn(4, 8, 6, 6))
    """

    _ranks = (4,)


class BatchRenorm3d(_BatchRenorm, nn.BatchNorm3d):
    """Batch Renormalization over ``(N, C, D, H, W)``; see :class:`BatchRenorm1d`."""

    _ranks = (5,)
