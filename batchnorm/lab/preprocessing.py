"""Input preprocessing of articles 000–003: min-max scaling, mean normalisation and z-score.

All three use **per-channel dataset statistics**: for images ``(N, C, H, W)`` channel ``c`` has the
global mean and standard deviation over all ``N·H·W`` values (article 000's "global channel mean
and std over N images")::

    μ_c = (1 / NHW) Σ_{n,h,w} x[n,c,h,w]          σ_c² = (1 / NHW) Σ (x[n,c,h,w] − μ_c)²

    min-max scaling      x' = (x − min_c) / (max_c − min_c)           → values in [0, 1]
    mean normalisation   x' = (x − μ_c) / (max_c − min_c)             → mean 0, range 1
    z-score              x' = (x − μ_c) / σ_c                         → mean 0, std 1

Article 000 first averages per-image means and stds. For images of equal size the average of the
per-image means *is* the global mean, but the average of per-image stds is not the global std: it
misses the between-image part of the variance (law of total variance), so it is smaller. We use
the exact global std, which is what "statistics of the data set" means for a z-score.

The statistics are computed in one streaming pass over chunks (:class:`ChannelStats`): each chunk's
``(count, mean, M2)`` comes from :meth:`batchnorm.stats.Moments.of` (two-pass inside the chunk, in
float64) and chunks are combined with :func:`batchnorm.stats.merge_moments` (Chan's exact,
count-weighted merge). Memory is one chunk, so data larger than RAM works (feed chunks from
:func:`batchnorm.lab.data.iter_idx`), and a large common offset (mean 1e6, std 1) costs no accuracy,
unlike the one-pass ``E[x²] − E[x]²``.

Example:
    >>> import numpy as np
    >>> x = np.random.rand(1000, 3, 8, 8).astype(np.float32)
    >>> st = channel_stats(x, chunk_size=128)           # or: st = ChannelStats(); st.update(chunk)...
    >>> z = normalize(x, st, "zscore")                  # per-channel mean 0, std 1
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from batchnorm.stats import Moments, merge_moments

__all__ = ["METHODS", "ChannelStats", "channel_stats", "normalize"]

METHODS = ("minmax", "mean", "zscore", "none")


class ChannelStats:
    """Streaming per-channel count, mean, variance, min and max (channels on axis 1).

    ``update(chunk)`` takes ``(n, C, ...)`` arrays or tensors (``(n, C)``, ``(n, C, H, W)``, ...);
    any dtype, upcast to float64. Chunk moments are merged with
    :func:`batchnorm.stats.merge_moments`, so the result equals the statistics of the concatenation.
    """

    def __init__(self) -> None:
        self._moments: Moments | None = None
        self._min: torch.Tensor | None = None
        self._max: torch.Tensor | None = None
        self.samples = 0

    def update(self, chunk: np.ndarray | torch.Tensor) -> ChannelStats:
        """Fold one chunk of samples in; returns self."""
        # numpy chunks are copied as float64 (read-only memmaps included); tensors are used as they are
        x = chunk if isinstance(chunk, torch.Tensor) else torch.from_numpy(np.array(chunk, dtype=np.float64))
        if x.ndim < 2:
            raise ValueError(f"ChannelStats.update: expected a chunk of shape (n, C, ...), got shape "
                             f"{tuple(x.shape)}; add a channel axis, e.g. x[:, None]")
        if self._moments is not None and x.shape[1] != self._moments.mean.numel():
            raise ValueError(f"ChannelStats.update: expected {self._moments.mean.numel()} channels on "
                             f"axis 1, got chunk of shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            return self
        x = x.to(torch.float64)
        m = Moments.of(x, channel_axis=1)
        cmin = x.transpose(0, 1).reshape(x.shape[1], -1).amin(1)
        cmax = x.transpose(0, 1).reshape(x.shape[1], -1).amax(1)
        if self._moments is None:
            self._moments, self._min, self._max = m, cmin, cmax
        else:
            old = self._moments
            self._moments = merge_moments(torch.stack([old.count, m.count]), torch.stack([old.mean, m.mean]),
                                          torch.stack([old.m2, m.m2]))
            self._min = torch.minimum(self._min, cmin)
            self._max = torch.maximum(self._max, cmax)
        self.samples += int(x.shape[0])
        return self

    def _need(self) -> Moments:
        if self._moments is None:
            raise ValueError("ChannelStats: no data seen yet; call update(chunk) with at least one sample")
        return self._moments

    @property
    def count(self) -> int:
        """Values per channel seen (samples × spatial size)."""
        return int(self._need().count)

    @property
    def mean(self) -> np.ndarray:
        return self._need().mean.numpy()

    @property
    def var(self) -> np.ndarray:
        """Biased (population) variance."""
        return self._need().var.numpy()

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    @property
    def min(self) -> np.ndarray:
        self._need()
        return self._min.numpy()

    @property
    def max(self) -> np.ndarray:
        self._need()
        return self._max.numpy()

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "samples": self.samples, "mean": self.mean.tolist(),
                "std": self.std.tolist(), "min": self.min.tolist(), "max": self.max.tolist()}


def channel_stats(data: np.ndarray | torch.Tensor | Iterable[np.ndarray | torch.Tensor],
                  chunk_size: int = 4096) -> ChannelStats:
    """Per-channel statistics of ``data`` in one streaming pass.

    Args:
        data: an array/tensor ``(N, C, ...)`` (read ``chunk_size`` samples at a time; a numpy
            memmap therefore never loads whole), or any iterable of such chunks.
        chunk_size: samples per chunk for array input.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"channel_stats: expected chunk_size to be a positive int, got {chunk_size!r}")
    st = ChannelStats()
    if isinstance(data, np.ndarray | torch.Tensor):
        for i in range(0, data.shape[0], chunk_size):
            st.update(data[i:i + chunk_size])
    else:
        for chunk in data:
            st.update(chunk)
    return st


def normalize(x: np.ndarray | torch.Tensor, stats: ChannelStats, method: str = "zscore") -> torch.Tensor:
    """Apply ``method`` (``"minmax"``, ``"mean"``, ``"zscore"`` or ``"none"``) with per-channel ``stats``.

    Returns float32 ``torch.Tensor`` of ``x``'s shape. A constant channel (range or std 0, e.g. the
    always-blank border pixels) is only shifted, never divided by 0.
    """
    if method not in METHODS:
        raise ValueError(f"normalize: unknown method {method!r}; expected one of {METHODS}")
    if isinstance(x, torch.Tensor):
        t = x.to(torch.float64)
    else:
        t = torch.from_numpy(np.array(x, dtype=np.float64))
    if t.ndim < 2 or t.shape[1] != len(stats.mean):
        raise ValueError(f"normalize: expected input (N, {len(stats.mean)}, ...) matching the statistics, "
                         f"got shape {tuple(t.shape)}")
    view = (1, -1) + (1,) * (t.ndim - 2)
    mean = torch.as_tensor(stats.mean).view(view)
    lo = torch.as_tensor(stats.min).view(view)
    rng = torch.as_tensor(stats.max - stats.min).view(view)
    std = torch.as_tensor(stats.std).view(view)
    safe_rng = torch.where(rng > 0, rng, torch.ones_like(rng))
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    if method == "minmax":
        out = (t - lo) / safe_rng
    elif method == "mean":
        out = (t - mean) / safe_rng
    elif method == "zscore":
        out = (t - mean) / safe_std
    else:
        out = t
    return out.to(torch.float32)
