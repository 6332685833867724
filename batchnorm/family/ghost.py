"""Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017): BN over virtual sub-batches.

Large batches give BN very precise statistics and so remove the noise that regularises training
with small batches. Ghost BN splits the batch along N into virtual ("ghost") batches of
``virtual_batch_size`` samples and normalises each with its own statistics::

    x = [X¹; X²; …; Xᵏ]  along N,   |Xˡ| = virtual_batch_size
    yˡ = act(γ · (Xˡ − μˡ) / sqrt(σ²ˡ + ε) + β)      μˡ, σ²ˡ: per-channel moments of Xˡ (biased)

Inference is plain BN with the running statistics.

How it runs: the k equal ghost batches go through **one** call of the ordinary training op
(:class:`batchnorm.core.autograd.BatchNormTrainFn`, so the fast kernels, the fused activation and the
hand-derived backward serve it). The input ``(k·g, C, *S)`` is viewed as ``(k, g, C, *S)`` and
rearranged to ``(g, k·C, *S)``: the ghost index becomes part of the channel axis, γ and β are
repeated k times, and the op's per-"channel" statistics are exactly the per-ghost ones. (With
``k = 1`` the rearrangement is a view and the layer is BN exactly.) Channels-last input
(``channel_axis=-1``) is rearranged the same way to ``(g, *S, k·C)``.

Running statistics — the choice, ``stats_update``:

* ``"average"`` (default): **one** EMA step per forward, like BN, with the ghost batches' pooled
  statistics: mean ``Σ nˡ μˡ / Σ nˡ`` (the batch mean) and variance ``Σ M2ˡ / Σ (nˡ − 1)``
  (the pooled unbiased within-ghost variance; ``Σ M2ˡ / Σ nˡ`` with ``running_var_unbiased=False``),
  where ``M2ˡ = nˡ σ²ˡ``. ``momentum`` keeps its meaning (weight of one training step) and
  ``num_batches_tracked`` grows by 1 per forward, so a BN checkpoint and its hyper-parameters carry
  over unchanged. These are the statistics the layer actually normalises with in training (within-ghost
  variance, not the larger whole-batch one).
* ``"sequential"``: the paper's Algorithm 1, one EMA step per ghost batch in order (exactly what
  calling BN on X¹, …, Xᵏ in turn would do); ``num_batches_tracked`` grows by k. With k ghost batches
  per step the running statistics forget k times faster: with ``momentum=0.1`` and k = 64 they reflect
  only the last ~10 ghost batches, so lower ``momentum`` accordingly.

Batches that do not divide (``remainder``, checked before anything runs):

* ``"error"`` (default, as Keras's ``virtual_batch_size``): ``N % virtual_batch_size != 0`` raises;
* ``"merge_last"``: the leftover samples join the last ghost batch (sizes g, …, g, g + N mod g);
  a batch smaller than g is one ghost batch;
* ``"allow_smaller"``: the leftover samples form a smaller last ghost batch (sizes g, …, g, N mod g).

In training every ghost batch needs at least 2 values per channel (``size · prod(S) >= 2``),
otherwise its variance is undefined; the error says which option fixes it.

Paper: Elad Hoffer, Itay Hubara, Daniel Soudry, "Train longer, generalize better: closing the
generalization gap in large batch training of neural networks", NeurIPS 2017.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._checks import check_input
from ..core.autograd import refuse_capture, train_apply
from ..core.functional import RunningStats, _check_train_args, _skip_nonfinite, update_running_stats
from ..core.modules import _BatchNorm
from ..stats import merge_moments

__all__ = [
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "ghost_batch_norm_train",
    "ghost_batch_sizes",
]

REMAINDERS = ("error", "merge_last", "allow_smaller")
STATS_UPDATES = ("average", "sequential")


def _check_virtual_batch_size(op: str, virtual_batch_size: object) -> int:
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int):
        raise TypeError(f"{op}: expected virtual_batch_size to be an int (samples per ghost batch), got "
                        f"{virtual_batch_size!r} of type {type(virtual_batch_size).__name__}; e.g. "
                        f"virtual_batch_size=32")
    if virtual_batch_size <= 0:
        raise ValueError(f"{op}: expected virtual_batch_size to be a positive int, got {virtual_batch_size}; "
                         f"e.g. virtual_batch_size=32 (use BatchNorm for whole-batch statistics)")
    return virtual_batch_size


def _check_remainder(op: str, remainder: object) -> str:
    if remainder not in REMAINDERS:
        raise ValueError(f"{op}: expected remainder to be one of {REMAINDERS}, got {remainder!r}: 'error' "
                         f"rejects a batch that virtual_batch_size does not divide, 'merge_last' adds the "
                         f"leftover samples to the last ghost batch, 'allow_smaller' makes them a smaller "
                         f"one")
    return str(remainder)


def _check_stats_update(op: str, stats_update: object) -> str:
    if stats_update not in STATS_UPDATES:
        raise ValueError(f"{op}: expected stats_update to be one of {STATS_UPDATES}, got {stats_update!r}: "
                         f"'average' = one EMA step per forward with the pooled ghost statistics, "
                         f"'sequential' = one EMA step per ghost batch (the paper)")
    return str(stats_update)


def ghost_batch_sizes(n: int, virtual_batch_size: int, remainder: str = "error") -> list[int]:
    """Sizes of the ghost batches a batch of ``n`` samples is split into (in order along N).

    Example:
        >>> ghost_batch_sizes(10, 4, "merge_last"), ghost_batch_sizes(10, 4, "allow_smaller")
        ([4, 6], [4, 4, 2])
    """
    op = "batchnorm.ghost_batch_sizes"
    g = _check_virtual_batch_size(op, virtual_batch_size)
    remainder = _check_remainder(op, remainder)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{op}: expected the batch size n to be a positive int, got {n!r}")
    k, rest = divmod(n, g)
    if rest == 0:
        return [g] * k
    if remainder == "error":
        raise ValueError(f"{op}: a batch of {n} samples does not split into ghost batches of "
                         f"virtual_batch_size={g} ({n} % {g} = {rest}); use a batch size that is a multiple "
                         f"of {g}, drop the last incomplete batch (DataLoader(drop_last=True)), or pass "
                         f"remainder='merge_last' or 'allow_smaller'")
    if k == 0:
        return [n]
    if remainder == "merge_last":
        return [g] * (k - 1) + [g + rest]
    return [g] * k + [rest]


def _ghost_forward(x, weight, bias, eps, axis, act, slope, g, k):
    """BN of k equal ghost batches of g samples in one op call: ``(y, means (k, C), vars (k, C))``."""
    if k == 1:
        y, mean, var = train_apply(x, weight, bias, eps, axis, act, slope)
        return y, mean[None], var[None]
    c = x.shape[axis]
    rest = x.shape[1:]
    # (k·g, *rest) -> (k, g, *rest) -> move k next to the channel -> merge (k, C) into one axis.
    xs = x.reshape(k, g, *rest).movedim(0, axis)
    merged = (*xs.shape[:axis], k * c, *xs.shape[axis + 2:])
    xm = xs.reshape(merged)
    wm = None if weight is None else weight.repeat(k)
    bm = None if bias is None else bias.repeat(k)
    ym, mean, var = train_apply(xm, wm, bm, eps, axis, act, slope)
    y = ym.reshape(xs.shape).movedim(axis, 0).reshape(x.shape)
    return y, mean.reshape(k, c), var.reshape(k, c)


def ghost_batch_norm_train(
    x: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    virtual_batch_size: int,
    remainder: str = "error",
    stats_update: str = "average",
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: torch.Tensor | None = None,
    channel_axis: int = 1,
    activation: str = "identity",
    negative_slope: float = 0.01,
    running_var_unbiased: bool = True,
    nonfinite: str = "update",
) -> tuple[torch.Tensor, RunningStats]:
    """Training-mode Ghost BN: each virtual batch of ``virtual_batch_size`` samples normalised on its own.

    ``yˡ = act(γ (Xˡ − μˡ) / sqrt(σ²ˡ + ε) + β)`` for the ghost batches ``Xˡ`` along axis 0 (N); see
    :mod:`batchnorm.family.ghost` for the running-statistics choice and the remainder rule.

    Args:
        x: input of rank 2–5, batch on axis 0, channels on ``channel_axis`` (not 0).
        running_mean, running_var: population estimates to update, or None to track nothing.
        weight, bias: γ and β of shape (C,), or None.
        virtual_batch_size: samples per ghost batch (int > 0). ``>= N`` (when it divides N, or with
            a remainder option) is plain BN.
        remainder: ``"error"`` (default), ``"merge_last"`` or ``"allow_smaller"``.
        stats_update: ``"average"`` (default; one EMA step per forward with the pooled ghost
            statistics) or ``"sequential"`` (one EMA step per ghost batch, as in the paper).
        momentum, eps, num_batches_tracked, activation, negative_slope, running_var_unbiased,
        nonfinite: as in :func:`batchnorm.core.functional.batch_norm_train`.

    Returns:
        ``(y, RunningStats(mean, var, num_batches_tracked))``; ``num_batches_tracked`` grows by 1
        (``"average"``) or by the number of ghost batches (``"sequential"``).

    Example:
        >>> x = torch.randn(32, 4, 6, 6)
        >>> y, new = ghost_batch_norm_train(x, torch.zeros(4), torch.ones(4), virtual_batch_size=8)
        >>> y[:8].mean(dim=(0, 2, 3)).abs().max() < 1e-5      # each ghost batch is normalised
        tensor(True)
    """
    op = "batchnorm.ghost_batch_norm_train"
    g = _check_virtual_batch_size(op, virtual_batch_size)
    remainder = _check_remainder(op, remainder)
    stats_update = _check_stats_update(op, stats_update)
    x, axis = check_input(op, x, channel_axis=channel_axis, training=True)
    if axis == 0:
        raise ValueError(f"{op}: channel_axis={channel_axis} is the batch axis; ghost batches split axis 0 "
                         f"(N), so the channels must be on another axis (1 or -1)")
    c = x.shape[axis]
    eps, momentum, act, slope, nonfinite = _check_train_args(
        op, x, axis, running_mean, running_var, weight, bias, eps=eps, momentum=momentum,
        activation=activation, negative_slope=negative_slope, nonfinite=nonfinite,
        num_batches_tracked=num_batches_tracked)
    sizes = ghost_batch_sizes(x.shape[0], g, remainder)
    per_sample = x.numel() // (x.shape[0] * c)
    if min(sizes) * per_sample < 2:
        small = min(sizes)
        raise ValueError(f"{op}: a ghost batch of {small} sample(s) has {small * per_sample} value per "
                         f"channel "
                         f"(input shape {tuple(x.shape)}, ghost batch sizes {sizes}); training needs at "
                         f"least 2 to define a variance - use a larger virtual_batch_size"
                         + (" or remainder='merge_last'" if remainder == "allow_smaller" else ""))

    # Equal-sized runs of ghost batches: one op call each (at most two runs).
    runs: list[tuple[int, int]] = []  # (size, count)
    for s in sizes:
        if runs and runs[-1][0] == s:
            runs[-1] = (s, runs[-1][1] + 1)
        else:
            runs.append((s, 1))
    ys, means, vars_, counts = [], [], [], []
    start = 0
    for size, count in runs:
        part = x if len(runs) == 1 else x.narrow(0, start, size * count)
        y, m, v = _ghost_forward(part, weight, bias, eps, axis, act, slope, size, count)
        ys.append(y)
        means.append(m)
        vars_.append(v)
        counts += [size * per_sample] * count
        start += size * count
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=0)
    old = RunningStats(running_mean, running_var, num_batches_tracked)
    if running_mean is None:
        return y, old
    mean_k, var_k = torch.cat(means), torch.cat(vars_)
    if _skip_nonfinite(op, nonfinite, mean_k, var_k, subject="a ghost batch's statistics"):
        return y, old
    return y, _update(running_mean, running_var, mean_k, var_k, counts, momentum, num_batches_tracked,
                      running_var_unbiased, stats_update)


def _update(running_mean, running_var, mean_k, var_k, counts, momentum, nbt, unbiased, stats_update):
    """Fold the k ghost batches' (mean, biased var) into the running statistics (see module doc)."""
    if stats_update == "sequential":
        new = RunningStats(running_mean, running_var, nbt)
        for i, n in enumerate(counts):
            new = update_running_stats(new.mean, new.var, mean_k[i], var_k[i], n, momentum,
                                       new.num_batches_tracked, unbiased)
        return new
    if len(counts) == 1:  # one ghost batch: BN's own update, bit for bit
        return update_running_stats(running_mean, running_var, mean_k[0], var_k[0], counts[0], momentum,
                                    nbt, unbiased)
    cnt = torch.tensor(counts, dtype=mean_k.dtype, device=mean_k.device)
    pooled = merge_moments(cnt, mean_k, var_k * cnt[:, None])
    # Within-ghost M2 only (Σ M2ˡ): the merged m2 also holds the between-ghost spread, which the
    # layer never normalises with.
    within = (var_k * cnt[:, None]).sum(0)
    dof = cnt.sum() - (len(counts) if unbiased else 0)
    var = within / dof.clamp_min(1)
    return update_running_stats(running_mean, running_var, pooled.mean, var, sum(counts), momentum,
                                nbt, unbiased=False)


class _GhostBatchNorm(_BatchNorm):
    """Base of GhostBatchNorm1d/2d/3d: BN's state and conventions, statistics per virtual batch."""

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
        virtual_batch_size: int,
        remainder: str = "error",
        stats_update: str = "average",
        **kwargs: Any,
    ) -> None:
        op = type(self).__name__
        g = _check_virtual_batch_size(op, virtual_batch_size)
        remainder = _check_remainder(op, remainder)
        stats_update = _check_stats_update(op, stats_update)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        if self.channel_axis == 0:
            raise ValueError(f"{op}: channel_axis={self.channel_axis} is the batch axis; ghost batches split "
                             f"axis 0 (N), so the channels must be on another axis (1 or -1)")
        self.virtual_batch_size = g
        self.remainder = remainder
        self.stats_update = stats_update

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"
        if self.remainder != "error":
            s += f", remainder={self.remainder!r}"
        if self.stats_update != "average":
            s += f", stats_update={self.stats_update!r}"
        return s

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._use_batch_stats():
            return super().forward(input)  # inference with running statistics: plain BN
        op = type(self).__name__
        refuse_capture(op, input)
        # an empty batch (no ghost batches): as BN, an empty output, state unchanged
        if isinstance(input, torch.Tensor) and input.numel() == 0:
            return super().forward(input)
        x, axis = check_input(op, input, ranks=self._ranks, channel_axis=self.channel_axis,
                              num_features=self.num_features, training=True)
        return self._train_step(ghost_batch_norm_train, x, axis, virtual_batch_size=self.virtual_batch_size,
                                remainder=self.remainder, stats_update=self.stats_update)


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    """Ghost BN over ``(N, C)`` or ``(N, C, L)``: statistics per virtual batch of ``virtual_batch_size``.

    Training normalises each ghost batch (consecutive ``virtual_batch_size`` samples along N) with
    its own mean and biased variance; inference is BN with the running statistics. Same state and
    state_dict keys as :class:`batchnorm.BatchNorm1d`.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as BatchNorm1d.
        virtual_batch_size: samples per ghost batch (keyword, required).
        remainder: ``"error"`` (default) | ``"merge_last"`` | ``"allow_smaller"`` when N is not a
            multiple of ``virtual_batch_size``.
        stats_update: ``"average"`` (default, one EMA step per forward) | ``"sequential"`` (one per
            ghost batch, as in the paper); see :mod:`batchnorm.family.ghost`.
        channel_axis, running_var_unbiased, nonfinite, activation, negative_slope: as BatchNorm1d.

    Example:
        >>> layer = GhostBatchNorm1d(16, virtual_batch_size=8)
        >>> y = layer(torch.randn(64, 16))

    Paper: Hoffer, Hubara & Soudry, "Train longer, generalize better", NeurIPS 2017.
    """

    _ranks = (2, 3)


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    """Ghost BN over ``(N, C, H, W)``; see :class:`GhostBatchNorm1d`. Loads BatchNorm2d checkpoints.

    Example:
        >>> layer = GhostBatchNorm2d(8, virtual_batch_size=4)
        >>> y = layer(torch.randn(16, 8, 5, 5))
    """

    _ranks = (4,)


class GhostBatchNorm3d(_GhostBatchNorm, nn.BatchNorm3d):
    """Ghost BN over ``(N, C, D, H, W)``; see :class:`GhostBatchNorm1d`."""

    _ranks = (5,)
