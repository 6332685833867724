"""The one statistics path: per-channel (count, mean, M2) and the exact merge of partial moments.

Everything that needs batch statistics goes through here: the torch backend of the training op,
SyncBN (merging per-rank moments), precise recalibration (merging per-batch moments), Ghost BN
(virtual sub-batches), masked BN (statistics of the valid positions of a padded batch,
:func:`masked_moments`), the accumulation of micro-batch statistics
(:mod:`batchnorm.family.accumulate`) and the lab's streaming dataset statistics.

Numerics, in one place:

* Accumulation dtype is float64 for float64 input and float32 for everything else (float16 and
  bfloat16 are upcast before any sum), see :func:`acc_dtype`.
* The per-tensor variance is **two-pass** (corrected): first the mean, then the mean of squared
  deviations from it, minus the square of the deviations' mean (the first mean's rounding
  error). Unlike the one-pass ``E[x²] - E[x]²`` it does not cancel catastrophically when
  ``|mean| ≫ std`` (float32 data of mean 1e4 and std 1 keeps ~1e-7 relative accuracy).
* Partial moments are merged with Chan et al.'s parallel formula (exact, count-weighted)::

      n = Σ nᵢ,   μ = Σ nᵢ μᵢ / n,   M2 = Σ M2ᵢ + Σ nᵢ (μᵢ − μ)²

  Parts with ``nᵢ = 0`` contribute nothing, so empty ranks and empty batches are fine.
* The variance is clamped at 0: the correction ``− r²`` and the variances that arrive from
  elsewhere (kernels' one-sweep forms, user-supplied moments) may leave it a rounding error
  below 0 for a constant channel; ``sqrt(var + ε)`` must never see that.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Moments", "acc_dtype", "batch_moments", "masked_moments", "merge_moments", "reduce_dims"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for statistics of ``dtype`` input: float64 stays, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_dims(ndim: int, channel_axis: int = 1) -> tuple[int, ...]:
    """All axes but the channel axis (``channel_axis`` may be negative)."""
    c = channel_axis % ndim
    return tuple(d for d in range(ndim) if d != c)


class Moments(NamedTuple):
    """Per-channel partial moments: ``count`` values per channel, their ``mean`` and ``m2 = Σ (x − mean)²``.

    ``count`` is a 0-d float tensor (so it can be all-reduced with the rest).
    """

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    @property
    def var(self) -> torch.Tensor:
        """Biased variance ``m2 / count`` (0 where the count is 0), clamped at 0."""
        return (self.m2 / self.count.clamp_min(1)).clamp_min(0)

    def unbiased_var(self) -> torch.Tensor:
        """Bessel-corrected variance ``m2 / (count − 1)``."""
        return (self.m2 / (self.count - 1).clamp_min(1)).clamp_min(0)

    @staticmethod
    def of(x: torch.Tensor, channel_axis: int = 1) -> Moments:
        """Moments of one tensor (two-pass, in the accumulation dtype)."""
        mean, var, n = batch_moments(x, channel_axis)
        count = torch.tensor(float(n), dtype=mean.dtype, device=mean.device)
        return Moments(count, mean, var * n)


def batch_moments(x: torch.Tensor, channel_axis: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel ``(mean, biased_var, n)`` of ``x`` in the accumulation dtype, corrected two-pass.

    ``m = mean(x)``, ``d = x − m``, ``r = mean(d)``; returns ``m + r`` and ``mean(d²) − r²``
    (Chan, Golub & LeVeque's corrected two-pass algorithm). In exact arithmetic ``r = 0``; in
    float32 it is the rounding error of the first mean, and adding it back makes the mean exact to
    rounding even when ``|mean| ≫ std`` (e.g. data of mean 1e4 and std 1). ``n`` is the number of
    values per channel (``x.numel() // C``).
    """
    dims = reduce_dims(x.ndim, channel_axis)
    xa = x if x.dtype == acc_dtype(x.dtype) else x.to(acc_dtype(x.dtype))
    mean = xa.mean(dim=dims, keepdim=True)
    centred = xa - mean
    resid = centred.mean(dim=dims, keepdim=True)
    var = (centred * centred).mean(dim=dims) - (resid * resid).reshape(-1)
    n = x.numel() // max(x.shape[channel_axis], 1)
    return (mean + resid).reshape(-1), var.clamp_min(0), n


def merge_moments(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor) -> Moments:
    """Exact count-weighted merge of K partial moments (Chan et al.).

    Args:
        counts: ``(K,)`` values per channel in each part (may contain zeros).
        means: ``(K, C)`` per-part means.
        m2s: ``(K, C)`` per-part sums of squared deviations.
    """
    counts = counts.to(means.dtype)
    total = counts.sum()
    w = counts / total.clamp_min(1)
    mean = (w[:, None] * means).sum(0)
    dev = means - mean
    m2 = m2s.sum(0) + (counts[:, None] * dev * dev).sum(0)
    return Moments(total, mean, m2.clamp_min(0))


def masked_moments(x: torch.Tensor, mask: torch.Tensor, channel_axis: int = 1) -> Moments:
    """Per-channel moments of the **valid** positions of ``x``: ``(n, μ, M2)`` over ``mask == True``.

    ``mask`` is a bool tensor with ``x``'s shape less the channel axis (size-1 axes broadcast), e.g.
    ``(N, L)`` for ``(N, C, L)`` input: the same positions are valid in every channel, so the count
    ``n`` is one number (a 0-d tensor, like :meth:`Moments.of`'s)::

        n = Σ m,   μ = Σ m·x / n,   M2 = Σ m·(x − μ)²            (sums over every axis but C)

    computed corrected two-pass as :func:`batch_moments` (``r = Σ m·(x − μ₀) / n`` is added back to the
    first mean ``μ₀`` and ``n·r²`` taken off ``M2``), in the accumulation dtype. Padded positions
    never enter a sum (they are selected away, not multiplied by 0), so whatever they hold — zeros,
    garbage, NaN or Inf — has no effect on the statistics. ``n = 0`` (nothing valid, e.g. a rank
    whose samples are all padding) gives ``Moments(0, 0, 0)``, which :func:`merge_moments` ignores:
    the result is count-weighted and merges exactly with other ranks' or micro-batches' moments.

    The mask is not validated here (see :func:`batchnorm._checks.check_mask`); this is the one
    masked statistics routine the functional op, the modules, SyncBN and the accumulation share.

    Example:
        >>> x = torch.randn(4, 3, 10)
        >>> lengths = torch.tensor([10, 7, 0, 3])
        >>> mask = torch.arange(10)[None, :] < lengths[:, None]          # (N, L), True = valid
        >>> m = masked_moments(x, mask)
        >>> int(m.count), m.mean.shape
        (20, torch.Size([3]))
    """
    axis = channel_axis % x.ndim
    dims = reduce_dims(x.ndim, axis)
    acc = acc_dtype(x.dtype)
    xa = x if x.dtype == acc else x.to(acc)
    m = mask.unsqueeze(axis)
    full = tuple(s for d, s in enumerate(x.shape) if d != axis)
    count = mask.expand(full).sum().to(acc)
    n = count.clamp_min(1)
    shape = [1] * x.ndim
    shape[axis] = -1
    zero = xa.new_zeros(())
    mean0 = torch.where(m, xa, zero).sum(dim=dims) / n
    centred = torch.where(m, xa - mean0.reshape(shape), zero)
    resid = centred.sum(dim=dims) / n
    m2 = (centred * centred).sum(dim=dims) - n * resid * resid
    return Moments(count, mean0 + resid, m2.clamp_min(0))
