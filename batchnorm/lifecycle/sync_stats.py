"""Make plain BN layers' running statistics the same on every rank: an exact, count-weighted merge.

Under DDP with plain (not synchronized) BN, every rank normalises with its own batch statistics
and keeps its own running estimates: they drift apart (different shards, uneven inputs), and
DDP's ``broadcast_buffers`` just copies rank 0's over everybody's, throwing the others away.
:func:`sync_running_stats` replaces each layer's ``running_mean`` / ``running_var`` on every rank
by the statistics of the union of what all ranks have seen. Per layer and channel, rank ``r``
holds a mean ``μ_r`` and a variance ``v_r`` summarising ``n_r`` values; with the exact merge of
:mod:`batchnorm.stats` (Chan et al.)::

    n = Σ n_r,   μ = Σ n_r μ_r / n,   M2 = Σ M2_r + Σ n_r (μ_r − μ)²

which is the law of total variance: the spread *between* the ranks' means is part of the
variance of the whole. (A plain mean of the variances, ``Σ v_r / W``, leaves it out and
under-estimates the variance whenever the shards differ.)

Two ways to say what ``n_r`` is:

* ``counts=None`` (default): ``n_r`` = the layer's ``num_batches_tracked`` — right when every
  rank's batches have the same size. Batches hold many values each, so the Bessel factor of an
  unbiased ``running_var`` is taken as 1: ``M2_r = n_r v_r`` and ``v = M2 / n``.
* ``counts=number`` (or ``{layer name: number}``): ``n_r`` = the number of values per channel
  behind this rank's statistics (e.g. after :func:`batchnorm.recalibrate` over ``N`` images of
  ``H×W`` pixels: ``N·H·W``). Then the merge is exact in the layer's convention: ``M2_r = v_r (n_r
  − 1)`` for an unbiased ``running_var`` (torch's convention, ours by default), ``v_r n_r`` for
  a biased one (``running_var_unbiased=False``), and back the same way.

When to call it: before evaluating or checkpointing a model trained with plain BN under DDP
(``broadcast_buffers=False``, or uneven inputs), on every rank at the same point (it runs two
collectives); e.g. at the end of each epoch, before ``model.eval()`` and
``save_checkpoint``. SyncBatchNorm layers are skipped: their statistics are already identical.
``num_batches_tracked`` becomes the largest over the ranks (calling it twice changes nothing).

Example (in every rank)::

    model = DDP(net, broadcast_buffers=False)
    ...train...
    batchnorm.sync_running_stats(model)          # every rank now holds the same statistics
    if dist.get_rank() == 0:
        batchnorm.save_checkpoint(model.module, "ckpt.pt")
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core._bnlayers import iter_bn, running_var_unbiased
from ..family.sync import SyncBatchNorm
from ..stats import merge_moments

__all__ = ["sync_running_stats"]

_OP = "sync_running_stats"
_F64 = torch.float64


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    out = {}
    for name, m in iter_bn(model):
        if isinstance(m, SyncBatchNorm | nn.SyncBatchNorm):
            continue
        rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
        if isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor):
            out[name] = m
    return out


def _check_count(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value >= 0):
        raise ValueError(f"{_OP}: expected counts to be a finite number >= 0 of values per channel "
                         f"(or a dict of them by layer name), got {value!r} for layer {name!r}")
    return float(value)


def _weights(layers: dict[str, nn.Module], counts: object) -> dict[str, float]:
    if counts is None:
        return {n: float(getattr(m, "num_batches_tracked", torch.tensor(1))) for n, m in layers.items()}
    if isinstance(counts, Mapping):
        unknown = [k for k in counts if k not in layers]
        missing = [n for n in layers if n not in counts]
        if unknown or missing:
            raise ValueError(f"{_OP}: counts must name every BN layer with running statistics; unknown "
                             f"{unknown}, missing {missing}; the layers are {list(layers)}")
        return {n: _check_count(n, counts[n]) for n in layers}
    return {n: _check_count(n, counts) for n in layers}


def sync_running_stats(model: nn.Module, *, counts: float | Mapping[str, float] | None = None,
                       process_group: Any | None = None) -> list[str]:
    """Merge every plain BN layer's running statistics over the ranks of ``process_group``, exactly.

    Args:
        model: the model (DDP-wrapped or not); every rank passes the same architecture.
        counts: what each rank's statistics summarise (see the module docstring): None =
            ``num_batches_tracked`` (equal batch sizes; Bessel factor 1), or the number of values
            per channel, one number or ``{layer name: number}`` (exact in the layer's convention).
        process_group: the ranks to merge over (None = world).

    Returns:
        The names of the layers whose statistics were merged (``[]`` when ``torch.distributed`` is
        not initialised or the group has one rank: nothing to do).

    Raises:
        ValueError: bad ``counts``, or models that differ between ranks (raised on every rank,
            before anything is written).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_OP}: expected an nn.Module, got {type(model).__name__}")
    layers = _layers(model)
    weights = _weights(layers, counts)  # validated before any collective or write
    if not (dist.is_available() and dist.is_initialized()):
        return []
    world = dist.get_world_size(process_group)
    if world < 0:
        raise ValueError(f"{_OP}: this process is not a member of process_group; pass a group that "
                         f"contains it, or None (the world)")
    if world == 1 or not layers:
        return []
    ref = next(iter(layers.values())).running_mean
    device = ref.device
    # 1. the same layers everywhere (sizes of the next collective depend on them)
    sig = torch.tensor([float(len(layers)), float(sum(m.running_mean.numel() for m in layers.values()))],
                       dtype=_F64, device=device)
    sigs = [torch.empty_like(sig) for _ in range(world)]
    dist.all_gather(sigs, sig, group=process_group)
    if any(not torch.equal(s, sig) for s in sigs):
        listed = ", ".join(f"rank {r}: {int(s[0])} layers, {int(s[1])} channels" for r, s in enumerate(sigs))
        raise ValueError(f"{_OP}: the ranks' models differ in their BN layers with running statistics "
                         f"({listed}); call it on the same model on every rank")
    # 2. one all_gather of [n, mean, var] of every layer
    packed = torch.cat([torch.cat([torch.tensor([weights[n]], dtype=_F64, device=device),
                                   m.running_mean.detach().to(_F64), m.running_var.detach().to(_F64)])
                        for n, m in layers.items()])
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed, group=process_group)
    table = torch.stack(parts)  # (W, Σ (2C + 1)), the same on every rank
    new = {}
    at = 0
    for name, m in layers.items():
        c = m.running_mean.numel()
        n, mean, var = table[:, at], table[:, at + 1:at + 1 + c], table[:, at + 1 + c:at + 1 + 2 * c]
        at += 1 + 2 * c
        total = float(n.sum())
        if total <= 0:
            continue  # no rank has seen anything: nothing to merge
        bessel = counts is not None and running_var_unbiased(m)
        m2 = var * ((n - 1).clamp_min(0) if bessel else n)[:, None]
        merged = merge_moments(n, mean, m2)
        v = merged.m2 / (max(total - 1, 1) if bessel else total)
        new[name] = (merged.mean, v, None)
    # 3. num_batches_tracked: the largest over the ranks (one small all_reduce for all layers)
    nbt_layers = [n for n in new if isinstance(getattr(layers[n], "num_batches_tracked", None), torch.Tensor)]
    if nbt_layers:
        nb = torch.stack([layers[n].num_batches_tracked.detach().to(_F64).reshape(()) for n in nbt_layers])
        dist.all_reduce(nb, op=dist.ReduceOp.MAX, group=process_group)
        for n, v in zip(nbt_layers, nb):
            mean, var, _ = new[n]
            new[n] = (mean, var, int(v))
    with torch.no_grad():
        for name, (mean, var, nbt_max) in new.items():
            m = layers[name]
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.to(m.running_var.dtype))
            if nbt_max is not None:
                m.num_batches_tracked.fill_(nbt_max)
    return list(new)
