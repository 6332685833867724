"""BN running statistics that follow gradient accumulation: one update per optimizer step.

With gradient accumulation a batch of ``B = k·b`` samples is run as ``k`` micro-batches of ``b``
and the gradients are summed before one optimizer step. BN's running statistics do not follow:
torch updates them once per *micro-batch*, with the micro-batch's statistics, so

* the EMA forgets ``k`` times faster than in the large-batch run being emulated (``k`` steps of
  ``momentum`` per optimizer step), and ``num_batches_tracked`` counts micro-batches (with
  ``momentum=None`` the cumulative average weights them instead of the steps);
* the stored variance is an average of micro-batch variances, ``E[σ²_b]``, which is smaller than
  the large batch's ``σ²_B`` by the spread of the micro-batch means, and is Bessel-corrected with
  ``b`` rather than ``B``.

:func:`accumulate_stats` fixes this. While it is open, every BN layer in training mode still
normalises each micro-batch with that micro-batch's statistics (the forward and the gradients are
exactly as before), but its running statistics are left alone and the exact moments of its input
``(n, μ, M2)`` (:class:`batchnorm.stats.Moments`; with ``mask=`` the valid positions only,
:func:`batchnorm.stats.masked_moments`) are recorded. :meth:`StatsAccumulator.step` — call it next to
``optimizer.step()``, or leave it to the end of the ``with`` block — merges them exactly (Chan)::

    n = Σ nᵢ,   μ = Σ nᵢ μᵢ / n,   M2 = Σ M2ᵢ + Σ nᵢ (μᵢ − μ)²,   σ² = M2 / n

and applies **one** running-statistics update per layer (:func:`batchnorm.update_running_stats`
with ``μ``, ``σ²``, ``n`` and the layer's ``momentum``, ``momentum=None`` included): the running
statistics one forward of the large batch would have produced from the same layer inputs, exactly
(to the last few bits in float64). For the first BN layer of a model (whose input depends only on
the weights) that is exactly the large-batch run's; a deeper BN layer's input was normalised
upstream by micro-batch statistics, which the large batch would have normalised differently, so
there the result is the exact statistics of the inputs it actually saw. SyncBN layers are merged
across ranks as well (one ``all_gather`` of ``2C + 1`` numbers per layer at ``step``), giving the
global large batch's statistics.

What it cannot change: each micro-batch is still *normalised* with its own statistics (noisier than
the large batch's, as Ghost BN's virtual batches are). Normalising with the large batch's
statistics would need them before the first micro-batch's forward, i.e. another forward pass over
all ``k`` micro-batches (or activations kept for all of them, which is what accumulation avoids).

Example::

    acc = batchnorm.accumulate_stats(model)
    with acc:
        for step_batches in loader_of_k_microbatches:
            for xb, yb in step_batches:
                loss_fn(model(xb), yb).backward()
            optimizer.step(); optimizer.zero_grad()
            acc.step()                          # one running-statistics update per optimizer step

Works on this package's BN modules (``BatchNorm*``, ``BatchNormAct*``, ``SyncBatchNorm``) and on
``torch.nn.BatchNorm1d/2d/3d`` / ``torch.nn.SyncBatchNorm``; layers with other running statistics
(Batch Renorm, Ghost BN, InPlace-ABN, your subclasses with their own ``forward``) are refused
unless left out with ``layers=``. A layer called several times per forward gets one update from
all its inputs merged. During each micro-batch's forward a layer runs with
``track_running_stats=False`` (torch's and this package's meaning in training, ``SyncBatchNorm``
across ranks included: batch statistics, buffers not touched), switched back on right after. A
forward that raises records nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .._checks import check_mask
from ..core import functional as F
from ..core._bnlayers import channel_axis, iter_bn, running_var_unbiased, select_layers
from ..core.modules import _BatchNorm
from ..stats import Moments, acc_dtype, masked_moments, merge_moments
from .sync import SyncBatchNorm

__all__ = ["StatsAccumulator", "accumulate_stats", "all_merge_moments"]

_TORCH_BN = nn.modules.batchnorm._BatchNorm


def _plain(m: nn.Module) -> bool:
    """Layers whose training statistics are plain (masked) batch moments of their input."""
    if isinstance(m, _BatchNorm):  # (ours first: our classes are torch's classes too)
        return type(m).forward in (_BatchNorm.forward, SyncBatchNorm.forward)
    return isinstance(m, _TORCH_BN) and type(m).forward in (_TORCH_BN.forward, nn.SyncBatchNorm.forward)


def _peers(m: nn.Module) -> tuple[bool, Any]:
    """``(True, process group)`` for a SyncBN layer with peers to merge its moments with (the group may
    be None: the default group), else ``(False, None)``."""
    if not isinstance(m, SyncBatchNorm | nn.SyncBatchNorm):
        return False, None
    if not dist.is_available() or not dist.is_initialized():
        return False, None
    group = m.process_group
    return dist.get_world_size(group) > 1, group


def all_merge_moments(local: Moments, group: Any = None) -> Moments:
    """Exact merge of every rank's ``Moments`` (one ``all_gather`` of ``2C + 1`` float64 numbers).

    Ranks with nothing (count 0) take part and contribute nothing. Every rank gets the same result,
    merged in rank order. (The same count-weighted merge SyncBN's forward does.)
    """
    c = local.mean.numel()
    parts = [local.count.reshape(1), local.mean.reshape(-1), local.m2.reshape(-1)]
    packed = torch.cat([p.to(torch.float64) for p in parts])
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, packed, group=group)
    table = torch.stack(parts)
    return merge_moments(table[:, 0], table[:, 1:c + 1], table[:, c + 1:])


@dataclass
class _Record:
    moments: list[Moments] = field(default_factory=list)
    pending: Moments | None = None  # the moments of the forward in progress (tracking switched off)


class StatsAccumulator:
    """Collects the BN layers' micro-batch moments and applies one running-statistics update per step.

    Use it as a context manager (see :func:`accumulate_stats` and the module docstring); ``step()``
    applies the pending update, ``discard()`` drops it, leaving the statistics with the ``with`` block
    applies what is pending (unless the block raised: then it is dropped).
    """

    def __init__(self, model: nn.Module, layers: list[str] | None = None) -> None:
        op = "batchnorm.accumulate_stats"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{op}: expected an nn.Module, got {type(model).__name__}")
        found = {name: m for name, m in iter_bn(model) if isinstance(m, _TORCH_BN | _BatchNorm)}
        chosen = select_layers(op, found, layers)
        odd = [f"{name or '<model>'} ({type(m).__name__})" for name, m in chosen.items() if not _plain(m)]
        if odd:
            raise ValueError(f"{op}: {odd} keep running statistics other than plain batch moments (Batch "
                             f"Renorm, Ghost BN, InPlace-ABN or a subclass with its own forward); leave them "
                             f"out with layers=[...] (they then update per micro-batch, as before)")
        self.layers: dict[str, nn.Module] = chosen
        self._records: dict[nn.Module, _Record] = {m: _Record() for m in chosen.values()}
        self._handles: list[Any] = []

    # -- hooks ------------------------------------------------------------------------------
    @staticmethod
    def _tracking(m: nn.Module) -> bool:
        return m.training and m.track_running_stats and m.running_mean is not None

    def _pre(self, m: nn.Module, args: tuple, kwargs: dict) -> None:
        rec = self._records[m]
        self._release(m)  # (a previous forward of this layer raised: its switch is still on)
        if not self._tracking(m) or not args:
            return
        x = args[0]
        mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
            return  # the layer's own check raises its clear error
        axis = channel_axis(m) % x.ndim
        with torch.no_grad():
            if x.numel() == 0:  # an empty SyncBN shard: count 0
                c = x.shape[axis]
                z = torch.zeros(c, dtype=acc_dtype(x.dtype), device=x.device)
                mom = Moments(z.new_zeros(()), z, z.clone())
            elif mask is not None:
                mom = masked_moments(x.detach(), check_mask(type(m).__name__, mask, x, axis), axis)
            else:
                mom = Moments.of(x.detach(), axis)
        rec.pending = mom
        # Training with track_running_stats off is torch's "batch statistics, no update": the same
        # output and gradients, the buffers neither written nor saved for backward.
        m.track_running_stats = False

    def _release(self, m: nn.Module) -> Moments | None:
        """Switch the layer's tracking back on; returns the pending moments (None if none)."""
        rec = self._records[m]
        mom, rec.pending = rec.pending, None
        if mom is not None:
            m.track_running_stats = True
        return mom

    def _post(self, m: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        mom = self._release(m)
        if mom is None or output is None:  # not tracking, or the forward raised: nothing to record
            return
        self._records[m].moments.append(mom)

    # -- public -----------------------------------------------------------------------------
    def __enter__(self) -> StatsAccumulator:
        if self._handles:
            raise RuntimeError("batchnorm.accumulate_stats: this accumulator is already open; use one "
                               "`with` block at a time")
        for m in self.layers.values():
            self._handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            # always_call: also after a forward that raised (output None), so tracking is back on
            self._handles.append(m.register_forward_hook(self._post, with_kwargs=True, always_call=True))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.step()
            else:
                self.discard()
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            for m in self.layers.values():
                self._release(m)

    @property
    def pending(self) -> dict[str, int]:
        """``{layer name: micro-batches recorded since the last step}``."""
        return {name: len(self._records[m].moments) for name, m in self.layers.items()}

    def discard(self) -> None:
        """Forget the recorded micro-batches (the running statistics stay as they are)."""
        for rec in self._records.values():
            rec.moments.clear()

    def merged(self) -> dict[str, Moments]:
        """The merged moments per layer that :meth:`step` would apply (local: before any cross-rank merge)."""
        out = {}
        for name, m in self.layers.items():
            moms = self._records[m].moments
            if moms:
                out[name] = merge_moments(torch.stack([p.count.to(torch.float64) for p in moms]),
                                          torch.stack([p.mean.to(torch.float64) for p in moms]),
                                          torch.stack([p.m2.to(torch.float64) for p in moms]))
        return out

    def step(self) -> list[str]:
        """Apply one running-statistics update per layer from its merged micro-batch moments.

        Every layer that ran in training mode since the last step is updated once, with the
        merged mean, biased variance ``M2 / n`` and count ``n`` (unbiased correction ``n/(n − 1)``
        as the layer stores it), its ``momentum`` (``None``: the cumulative average, counting
        optimizer steps) and its ``nonfinite`` policy. SyncBN layers merge across their process
        group first: every rank must call ``step`` the same number of times. Returns the names of
        the layers updated.
        """
        merged = self.merged()
        updated = []
        for name, m in self.layers.items():
            mom = merged.get(name)
            synced, group = _peers(m)
            if synced:  # every rank joins, also one with nothing recorded for this layer
                if mom is None:
                    z = torch.zeros(m.num_features, dtype=torch.float64, device=m.running_mean.device)
                    mom = Moments(z.new_zeros(()), z, z.clone())
                mom = all_merge_moments(mom, group)
            self._records[m].moments.clear()
            if mom is None or float(mom.count) == 0:
                continue
            n = int(float(mom.count))
            acc = acc_dtype(m.running_mean.dtype)
            mean, var = mom.mean.to(acc), mom.var.to(acc)
            policy = getattr(m, "nonfinite", "update")
            op = f"batchnorm.accumulate_stats ({name or type(m).__name__})"
            if F._skip_nonfinite(op, policy, mean, var, subject="the merged micro-batch statistics"):
                continue
            F.update_running_stats(m.running_mean, m.running_var, mean, var, n, m.momentum,
                                   m.num_batches_tracked, running_var_unbiased(m), inplace=True)
            updated.append(name)
        return updated


def accumulate_stats(model: nn.Module, layers: list[str] | None = None) -> StatsAccumulator:
    """A context manager: BN running statistics that follow gradient accumulation (module docstring).

    Args:
        model: the model (or a single BN layer).
        layers: names (as in ``model.named_modules()``) of the BN layers to accumulate; None = all.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), BatchNorm1d(8))
        >>> data = torch.randn(32, 4)
        >>> with accumulate_stats(model):                  # 4 micro-batches, one update at the end
        ...     for xb in data.chunk(4):
        ...         model(xb).sum().backward()
        >>> int(model[1].num_batches_tracked)
        1
    """
    return StatsAccumulator(model, layers)
