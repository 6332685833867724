"""The one statistics path: per-channel (count, mean, M2) and the exact merge of partial moments.

Everything that needs batch statistics goes through here: the torch backend of the training op,
SyncBN (merging per-rank moments), precise recalibration (merging per-batch moments), Ghost BN
(virtual sub-batches) and the lab's streaming dataset statistics.

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

__all__ = ["Moments", "acc_dtype", "batch_moments", "merge_moments", "reduce_dims"]


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
