"""Synchronized Batch Normalization: statistics of the *global* batch, across processes.

With data parallelism every process (rank) sees ``1/W`` of the batch. Plain BN would normalise
each shard with its own statistics, which changes the model (the statistics of 8 images per GPU
are far noisier than those of 256). :class:`SyncBatchNorm` makes every rank normalise with the
statistics of the whole global batch, so ``W`` processes compute exactly what one process with
the concatenated batch computes.

Forward, per channel (one ``all_gather`` of ``2C + 1`` numbers per rank)::

    rank r:   (n_r, μ_r, M2_r) = Moments.of(x_r)            two-pass, n_r may be 0
    all:      gather [(n_r, μ_r, M2_r) for every r]  ->  merge_moments (Chan, exact, count-weighted)
              n = Σ n_r,  μ = Σ n_r μ_r / n,  M2 = Σ M2_r + Σ n_r (μ_r − μ)²,  σ² = M2 / n
    rank r:   y_r = act(γ (x_r − μ) / sqrt(σ² + ε) + β)

Backward (one ``all_reduce`` of ``2C`` numbers per rank)::

    rank r:   dz = dy · act'(z),  g_r = Σ dz,  h_r = Σ dz · x̂
    all:      [g, h] = all_reduce_sum([g_r, h_r])
    rank r:   dx_r = γ · invstd · (dz − g / n − x̂ · h / n)
              dγ_r = h_r,  dβ_r = g_r      (local: DDP sums/averages parameter gradients)

Masked (``bn(x, mask=m)``, padded batches; ``m`` True = valid, see :mod:`batchnorm.kernels.masked`)::

    rank r:   (n_r, μ_r, M2_r) = masked_moments(x_r, m_r)   valid positions only; n_r = Σ m_r may be 0
    all:      the same gather and merge: n is the global *valid* count
    rank r:   y_r = act(γ (x_r − μ) / sqrt(σ² + ε) + β)     at every position, valid or not
              g_r, h_r over all positions, the same all_reduce, then
              dx_r = γ · invstd · (dz − m_r · (g + x̂ · h) / n)     (padding: γ · invstd · dz)

  Ranks may mix masked and unmasked inputs; a rank whose mask is all False (all padding) takes
  part like an empty shard. The result equals plain BN on the valid positions of every rank packed
  together. A rank whose mask is rejected still takes part in the forward's all_gather (with a
  marker), so every rank raises instead of the others hanging.

Running statistics are updated (in training with ``track_running_stats``, as torch's SyncBN) from
the global mean and the global variance made unbiased with the global count ``n / (n − 1)``; every
rank computes them from the same gathered numbers in the same order, so they are bit-identical on
every rank. A forward that runs inside a backward pass (the
recomputation of ``torch.utils.checkpoint``, reentrant or not) normalises the same way but does not
update them again: with checkpointing the running statistics are those of the plain model.

Conventions and guarantees:

* **Any process group, any backend.** Collectives run on the input's device: gloo for CPU tensors,
  nccl for CUDA tensors (each rank's model on its own GPU, ``torch.cuda.set_device(local_rank)``).
  The statistics are gathered in float64 (``2C + 1`` numbers, negligible traffic) so counts stay
  exact beyond 2²⁴ values per channel and the merge loses nothing; the gradient sums travel in the
  accumulation dtype (float32 for half/float32 input, float64 for float64).
* **Uneven and empty shards.** Ranks may hold different batch sizes, including 0: a rank with an
  empty batch still takes part in both collectives (count 0 contributes nothing to the merge), gets
  an empty output and correct (zero) local parameter gradients. Only the global batch must hold more
  than one value per channel.
* **Falls back to plain BN** (exactly :class:`batchnorm.BatchNorm2d` & co.) in eval mode, and when
  ``torch.distributed`` is unavailable, not initialised, or the group has one rank.
* **Uneven inputs** (ranks with different numbers of batches): wrap the loop in
  ``with sync_join(ddp_model):`` (DDP's ``join`` plus :class:`SyncBatchNormJoinable`); ranks that
  have run out answer every SyncBN collective with zero counts, so the others finish their extra
  batches with the statistics of the batches that exist and nobody hangs.
* **No silent hangs.** Every rank must run forward *and* backward of every SyncBatchNorm layer the
  same number of times. If one does not (it died, took another branch, ran out of batches), the
  others raise :class:`SyncBatchNormError` — naming the layer's collective, the rank and the fix —
  after ``timeout`` seconds (``SyncBatchNorm(timeout=...)``), or after the process group's own
  timeout (``init_process_group(timeout=...)``; 30 min for gloo, 10 min for nccl by default). A
  dead peer usually makes gloo fail at once ("Connection reset by peer"), which is wrapped the same
  way. After such an error the process group is unusable: destroy it and restart the job (e.g.
  ``torchrun --max-restarts``). With nccl a ``timeout`` blocks the CPU until the collective is done.
* Inputs of rank 2 to 5 with channels on ``channel_axis`` (like ``torch.nn.SyncBatchNorm``, plus
  channels-last via ``channel_axis=-1``); fused activations as in :class:`batchnorm.BatchNormAct2d`.

Example (inside each process of ``torchrun --nproc-per-node 2 train.py``)::

    dist.init_process_group("gloo")          # "nccl" on GPUs
    model = batchnorm.convert_sync_batchnorm(model)
    model = torch.nn.parallel.DistributedDataParallel(model)

Paper: Zhang et al., "Context Encoding for Semantic Segmentation", CVPR 2018 (cross-GPU BN);
Peng et al., "MegDet: A Large Mini-Batch Object Detector", CVPR 2018.
"""

from __future__ import annotations

import datetime
import math
import os
import threading
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable
from torch.distributed.algorithms.join import Join, Joinable, JoinHook

from .. import kernels
from .._checks import check_input, check_mask
from ..core import functional as F
from ..core._bnlayers import share_state
from ..core.modules import _BatchNorm
from ..kernels import torch_backend
from ..stats import Moments, acc_dtype, masked_moments, merge_moments, reduce_dims

__all__ = ["SyncBatchNorm", "SyncBatchNormError", "SyncBatchNormJoinable", "convert_sync_batchnorm",
           "sync_join"]

_GATHER_DTYPE = torch.float64


class SyncBatchNormError(RuntimeError):
    """A SyncBatchNorm collective failed or timed out (a rank died, hung, or skipped the layer)."""


# -- distributed plumbing ---------------------------------------------------------------------
def _world(group: Any) -> tuple[int, int] | None:
    """``(rank, world_size)`` in ``group``, or None when there is nothing to synchronise with."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    world = dist.get_world_size(group)
    if world < 0:  # this process is not a member of the group
        raise ValueError(f"SyncBatchNorm: this process (global rank {dist.get_rank()}) is not a member of "
                         f"the layer's process_group; build the layer with a group that contains every "
                         f"rank that runs it (dist.new_group(ranks=...)) or process_group=None")
    if world == 1:
        return None
    return dist.get_rank(group), world


def _run_collective(start, what: str, group: Any, timeout: float | None) -> None:
    """Start an async collective, wait for it at most ``timeout`` s, wrap any failure in our error."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    try:
        backend = dist.get_backend(group)
    except Exception:  # pragma: no cover - exotic groups without a backend name
        backend = "?"
    try:
        work = start()
        if timeout is None:
            work.wait()
        elif not work.wait(timeout=datetime.timedelta(seconds=timeout)):
            raise RuntimeError("Operation timed out!")
    except RuntimeError as e:  # DistBackendError and gloo/nccl timeouts are RuntimeErrors
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        limit = (f"timeout={timeout:g} s (SyncBatchNorm(timeout=...))" if timeout is not None else
                 "the process group's timeout (init_process_group(timeout=...))")
        raise SyncBatchNormError(
            f"SyncBatchNorm: the {what} on rank {rank} of {world} ({backend} process group) failed or did "
            f"not complete within {limit} ({cause}). "
            f"Another rank died, hangs, or skipped this layer. Every rank must run forward and backward of "
            f"every SyncBatchNorm layer the same number of times: give all ranks the same number of "
            f"batches (DistributedSampler with drop_last, or equal-length shards; empty batches are fine), "
            f"take the same branches, and check the other ranks' logs. The process group is unusable "
            f"now: destroy it and restart the job (torchrun --max-restarts). To fail faster, pass "
            f"SyncBatchNorm(timeout=seconds) or init_process_group(timeout=timedelta(...))."
        ) from e


def _check_device(op: str, x: torch.Tensor, group: Any) -> None:
    """nccl moves only CUDA tensors: say so before the collective instead of failing inside it."""
    backend = str(dist.get_backend(group))
    if x.device.type == "cpu" and "nccl" in backend and "gloo" not in backend:
        raise ValueError(f"{op}: the input is on the CPU but the process group uses {backend!r}, which "
                         f"only moves CUDA tensors; move the model and data to this rank's GPU "
                         f"(torch.cuda.set_device(local_rank); model.cuda()), or use a gloo group for CPU "
                         f"training (init_process_group('gloo'))")


_REJECTED = -1.0  # the count a rank whose mask was rejected sends: every rank then raises


def _local_moments(x: torch.Tensor, axis: int, mask: torch.Tensor | None,
                   bad: Exception | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's ``(count, mean, M2)`` in float64 (``mask``: valid positions only; count 0-d, on the
    input's device: no host sync before the collective).

    An empty shard, or a mask with no valid position, gives count 0 (it contributes nothing to the
    merge); a rejected mask (``bad``) gives the count ``_REJECTED``.
    """
    c = x.shape[axis]
    if bad is None and x.numel() > 0:
        local = masked_moments(x, mask, axis) if mask is not None else Moments.of(x, axis)
        return (local.count.to(_GATHER_DTYPE), local.mean.to(_GATHER_DTYPE),
                local.m2.to(_GATHER_DTYPE))
    zero = torch.zeros(c, dtype=_GATHER_DTYPE, device=x.device)
    return zero.new_tensor(_REJECTED if bad is not None else 0.0), zero, zero.clone()


def _raise_rejected(op: str, counts: torch.Tensor, bad: Exception | None) -> None:
    """After the gather: the rank whose mask was rejected raises its own error, every other one ours."""
    if bad is not None:
        raise bad
    rejected = (counts == _REJECTED).nonzero().reshape(-1).tolist()
    if rejected:
        ranks = ", ".join(str(r) for r in rejected)
        raise ValueError(f"{op}: the mask of rank {ranks} (of the layer's process group) was rejected (see "
                         f"that rank's error: its shape, dtype or device), so every rank of the group "
                         f"raises; nothing was updated. Fix the mask on that rank")


def _global_moments(x: torch.Tensor, axis: int, group: Any, world: int, timeout: float | None,
                    mask: torch.Tensor | None = None, *, op: str = "SyncBatchNorm",
                    bad: Exception | None = None) -> Moments:
    """Merge every rank's per-channel ``(count, mean, M2)`` of ``x`` (one all_gather).

    With ``mask`` the moments of the valid positions (:func:`batchnorm.stats.masked_moments`).
    """
    c = x.shape[axis]
    count, mean, m2 = _local_moments(x, axis, mask, bad)
    packed = torch.cat([count.reshape(1), mean, m2])
    parts = [torch.empty_like(packed) for _ in range(world)]
    _run_collective(lambda: dist.all_gather(parts, packed, group=group, async_op=True),
                    "forward all_gather of the batch statistics", group, timeout)
    table = torch.stack(parts)  # (W, 2C + 1), the same on every rank, in rank order
    _raise_rejected(op, table[:, 0], bad)
    return merge_moments(table[:, 0], table[:, 1:c + 1], table[:, c + 1:])


def _check_peer_shapes(op: str, num_features: int, group: Any, world: int, timeout: float | None,
                       device: torch.device) -> None:
    """Every rank's layer must have the same ``num_features``: the collectives' sizes depend on it.

    Ranks whose layers differ (a model built from a rank-dependent config) would send tensors of
    different sizes into one all_gather, which gloo answers with an uncatchable abort on one rank
    while the other returns. One tiny all_gather of ``C`` per layer and group, on its first
    synchronized forward, turns that into the same ValueError on every rank.
    """
    mine = torch.tensor([float(num_features)], dtype=_GATHER_DTYPE, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    _run_collective(lambda: dist.all_gather(parts, mine, group=group, async_op=True),
                    "forward all_gather of num_features (the first forward's shape check)", group, timeout)
    sizes = [int(p.item()) for p in parts]
    if len(set(sizes)) > 1:
        listed = ", ".join(f"rank {r}: {c}" for r, c in enumerate(sizes))
        raise ValueError(f"{op}: the layers that synchronise together have different num_features on "
                         f"different ranks ({listed}; ranks of the layer's process group); every rank must "
                         f"build the same model (same channel counts, in the same order of layers)")


# -- uneven inputs: joined ranks shadow the collectives --------------------------------------
# Under sync_join every SyncBN collective is one all_gather of a fixed-size float64 row per rank,
#   [status, layer index, kind, C, count, acc is float64, a (width values), b (width values)]
# status 1 = a rank with data, 0 = a rank that has run out (zeros everywhere: count 0, sums 0);
# kind 0 = forward (a, b = mean, M2), 1 = backward (a, b = Σ dz, Σ dz·x̂). A fixed size and one kind
# of collective let a joined rank answer any sequence of forwards and backwards without knowing it
# in advance (two forwards before a backward, checkpoint recomputation, layers skipped by a branch).
_HEAD = 6
_FWD, _BWD, _FWD_AGAIN = 0, 1, 2  # _FWD_AGAIN: a recomputation (checkpoint), no running-stat update


def _in_backward() -> bool:
    """True while autograd runs a backward pass: a forward there is a checkpoint's recomputation.

    ``torch.utils.checkpoint`` (reentrant or not) reruns the forward inside the backward; the
    batch is the one the first forward already counted in the running statistics, so the rerun
    must not count it again (torch's BN does, once per recomputed layer).
    """
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class _JoinState:
    """What the SyncBN layers of one :func:`sync_join` context share (see SyncBatchNormJoinable)."""

    def __init__(self, group: Any, width: int, timeout: float | None) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.width = width
        self.timeout = timeout

    def row(self, device: torch.device, index: int, kind: int, c: int, count: float, acc64: bool,
            a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        head = torch.tensor([1.0, index, kind, c, count, float(acc64)], dtype=_GATHER_DTYPE, device=device)
        if c == self.width:
            return torch.cat([head, a.to(_GATHER_DTYPE), b.to(_GATHER_DTYPE)])
        pad = torch.zeros(self.width - c, dtype=_GATHER_DTYPE, device=device)
        return torch.cat([head, a.to(_GATHER_DTYPE), pad, b.to(_GATHER_DTYPE), pad])

    def gather(self, row: torch.Tensor, what: str) -> torch.Tensor:
        parts = [torch.empty_like(row) for _ in range(self.world)]
        _run_collective(lambda: dist.all_gather(parts, row, group=self.group, async_op=True),
                        what + " (under sync_join)", self.group, self.timeout)
        return torch.stack(parts)

    def exchange(self, row: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gather the rows of an active rank; return every rank's count and ``a``, ``b`` blocks (W, C)."""
        table = self.gather(row, what)
        head = row[1:4]
        off = (table[:, 0] == 1) & (table[:, 1:4] != head).any(1)  # active ranks in another collective
        if bool(off.any()):
            r = int(off.nonzero()[0])
            i, k, c = (int(v) for v in table[r, 1:4])
            mi, mk, mc = (int(v) for v in head)
            kinds = ("forward", "backward", "forward (recomputed)")
            raise SyncBatchNormError(
                f"SyncBatchNorm: ranks out of step under sync_join: rank {dist.get_rank(self.group)} "
                f"ran the {kinds[mk]} of SyncBN layer {mi} ({mc} channels) while rank {r} ran the "
                f"{kinds[k]} of layer {i} ({c} channels); every rank with data must run the same "
                f"SyncBN layers in the same order (same model, same branches)")
        c = int(row[3])
        return table[:, 4], table[:, _HEAD:_HEAD + c], table[:, _HEAD + self.width:_HEAD + self.width + c]


def _join_moments(x: torch.Tensor, axis: int, state: _JoinState, index: int, kind: int,
                  mask: torch.Tensor | None = None, *, op: str = "SyncBatchNorm",
                  bad: Exception | None = None) -> Moments:
    """:func:`_global_moments` under sync_join: joined ranks' rows have count 0 (they add nothing)."""
    c = x.shape[axis]
    acc64 = acc_dtype(x.dtype) == torch.float64
    count, mean, m2 = _local_moments(x, axis, mask, bad)
    row = state.row(x.device, index, kind, c, float(count), acc64, mean, m2)
    counts, means, m2s = state.exchange(row, "forward all_gather of the batch statistics")
    _raise_rejected(op, counts, bad)
    return merge_moments(counts, means, m2s)


def _view(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


class _SyncBatchNormFn(torch.autograd.Function):
    """``y = _SyncBatchNormFn.apply(x, mask, weight, bias, mean, var, n, eps, axis, act, slope, group,
    timeout, join)``.

    ``mean``/``var``/``n`` are the *global* statistics (constants here: their dependence on ``x``
    is folded into the backward's ``g/n`` and ``x̂·h/n`` terms, summed over ranks); with ``mask``
    (bool, or None) they are those of the valid positions and only valid positions get those terms.
    ``join`` is ``(state, layer index)`` under :func:`sync_join` (the sums then travel as a
    fixed-size row that joined ranks answer with zeros), else None.
    """

    @staticmethod
    def forward(ctx, x, mask, weight, bias, mean, var, n, eps, axis, act, slope, group, timeout, join):
        backend = kernels.select(x, axis, act) if x.numel() > 0 else torch_backend
        y = backend.eval_forward(x, mean, var, weight, bias, eps, axis, act, slope)
        ctx.cfg = (n, eps, axis, act, slope, group, timeout, join)
        ctx.save_for_backward(x, weight, bias, mean, var, y if act != "identity" else None, mask)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, var, y, mask = ctx.saved_tensors
        n, eps, axis, act, slope, group, timeout, join = ctx.cfg
        acc = acc_dtype(x.dtype)
        nd = x.ndim
        dims = reduce_dims(nd, axis)
        invstd = torch.rsqrt(var.to(acc) + eps)
        xhat = (x.to(acc) - _view(mean.to(acc), nd, axis)) * _view(invstd, nd, axis)
        dz = dy.to(acc)
        if act in torch_backend._GRAD_FROM_INPUT:  # silu, hardswish, gelu: act' needs z, not y
            z = xhat if weight is None else xhat * _view(weight.to(acc), nd, axis)
            if bias is not None:
                z = z + _view(bias.to(acc), nd, axis)
            dz = dz * torch_backend._act_grad_from_input(z, act, slope)
        elif act != "identity":
            dz = dz * torch_backend.act_grad_from_output(y.to(acc), act, slope)
        g = dz.sum(dim=dims)
        h = (dz * xhat).sum(dim=dims)
        dx = None
        if ctx.needs_input_grad[0]:
            # The one collective of the backward: Σ over ranks of both per-channel sums, concatenated,
            # in float64 (2C numbers: the sums of every rank arrive exact, and ranks whose inputs
            # differ in dtype still send tensors of one size).
            if join is None:
                gh = torch.cat([g, h]).to(_GATHER_DTYPE)
                _run_collective(lambda: dist.all_reduce(gh, op=dist.ReduceOp.SUM, group=group, async_op=True),
                                "backward all_reduce of the gradient sums", group, timeout)
                g_all, h_all = (t.to(acc) for t in gh.split(g.numel()))
            else:
                state, index = join
                row = state.row(x.device, index, _BWD, g.numel(), 0.0, acc == torch.float64, g, h)
                _, ga, ha = state.exchange(row, "backward all_gather of the gradient sums")
                g_all, h_all = ga.sum(0).to(acc), ha.sum(0).to(acc)  # joined ranks sent zeros
            scale = invstd if weight is None else invstd * weight.to(acc)
            if mask is None:
                inner = dz - _view(g_all / n, nd, axis) - xhat * _view(h_all / n, nd, axis)
            else:  # as kernels.masked: padded positions do not move the statistics
                corr = _view(g_all / n, nd, axis) + xhat * _view(h_all / n, nd, axis)
                inner = torch.where(mask.unsqueeze(axis), dz - corr, dz)
            dx = (_view(scale, nd, axis) * inner).to(x.dtype)
        dw = h.to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        db = g.to(weight.dtype if weight is not None else x.dtype) if ctx.needs_input_grad[3] else None
        return dx, None, dw, db, None, None, None, None, None, None, None, None, None, None


def _check_timeout(op: str, timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (
            timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"{op}: expected timeout to be a positive number of seconds, a timedelta, or None "
                         f"(the process group's timeout), got {timeout!r}")
    return float(timeout)


# -- the module -------------------------------------------------------------------------------
class SyncBatchNorm(_BatchNorm):
    """Batch Normalization over the global batch of all ranks (drop-in for ``torch.nn.SyncBatchNorm``).

    .. math:: y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}} \\gamma + \\beta

    with ``E`` and ``Var`` (biased) taken per channel over the batch of *every* rank in
    ``process_group`` (see the module docstring for the exact merge and backward). In eval mode,
    or without a process group of more than one rank, it is plain BN.

    Args:
        num_features: C.
        eps: added to the variance inside the square root. Default 1e-5.
        momentum: weight of the new batch in the running estimates (PyTorch); None = cumulative
            average. Default 0.1.
        affine: learnable γ (init 1) and β (init 0). Default True.
        track_running_stats: keep running estimates (used in eval). Default True.
        process_group: the ranks to synchronise over; None = the default (world) group.
        device, dtype: factory arguments for parameters and buffers.
        timeout: seconds (or a timedelta) each collective of this layer may take before
            :class:`SyncBatchNormError` is raised; None (default) = the process group's timeout.
        channel_axis, running_var_unbiased, nonfinite, activation, negative_slope: as for
            :class:`batchnorm.BatchNorm2d` / :class:`batchnorm.BatchNormAct2d` (identity by default).

    Shape: input of rank 2 to 5, ``(N, C, *)`` (or channels on ``channel_axis``); output the same.
    ``N`` may differ between ranks and may be 0 on some.

    Example:
        >>> bn = SyncBatchNorm(16)                 # in one process: plain BN
        >>> y = bn(torch.randn(8, 16, 4, 4))
        >>> # under torchrun: model = SyncBatchNorm.convert_sync_batchnorm(model)

    state_dict keys are those of ``torch.nn.SyncBatchNorm`` / ``BatchNorm2d``.
    """

    _ranks = (2, 3, 4, 5)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        timeout: float | datetime.timedelta | None = None,
        channel_axis: int = 1,
        running_var_unbiased: bool = True,
        nonfinite: str = "update",
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> None:
        self_timeout = _check_timeout(type(self).__name__, timeout)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         channel_axis=channel_axis, running_var_unbiased=running_var_unbiased,
                         nonfinite=nonfinite, activation=activation, negative_slope=negative_slope)
        self.process_group = process_group
        self.timeout = self_timeout

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", timeout={self.timeout:g}" if self.timeout is not None else "")

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """BN of ``input`` over the global batch; ``mask`` (bool, True = valid, the input's shape less
        the channel axis, as for :class:`batchnorm.BatchNorm1d`) makes the statistics those of the
        valid positions of every rank (count-weighted; a rank may have none)."""
        op = type(self).__name__
        ctx = _world(self.process_group) if self.training else None
        if ctx is None:
            return super().forward(input, mask=mask)
        _, world = ctx
        x, axis = self._check_sync_input(op, input)
        group = self.process_group
        _check_device(op, x, group)
        bad = None
        if mask is not None:
            try:
                check_mask(op, mask, x, axis)
            except (TypeError, ValueError) as e:  # raised after the gather, so the other ranks raise too
                bad = e
        join = self.__dict__.get("_join")  # (state, layer index) while a sync_join context is open
        # As torch's SyncBN: no update with track_running_stats off (accumulate_stats relies on it).
        update = self.running_mean is not None and self.track_running_stats and not _in_backward()
        if join is not None:
            glob = _join_moments(x, axis, *join, _FWD if update else _FWD_AGAIN, mask, op=op, bad=bad)
        else:
            self._check_peers_once(op, group, world, x.device)
            glob = _global_moments(x, axis, group, world, self.timeout, mask, op=op, bad=bad)
        n = float(glob.count)  # exact: float64 counts (one host sync, as in torch's SyncBatchNorm)
        if n <= 1:
            what = "valid value" if mask is not None else "value"
            raise ValueError(f"{op}: expected more than 1 {what} per channel over the global batch when "
                             f"training, got {n:g} (rank-local input shape {tuple(x.shape)}"
                             f"{f', mask shape {tuple(mask.shape)}' if mask is not None else ''}, {world} "
                             f"ranks); use larger batches, or eval mode")
        acc = acc_dtype(x.dtype)
        mean, var = glob.mean.to(acc), glob.var.to(acc)
        y = _SyncBatchNormFn.apply(x, mask if x.numel() > 0 else None, self.weight, self.bias, mean, var, n,
                                   self.eps, axis, self.activation, self.negative_slope, group,
                                   self.timeout, join)
        if update:
            self._update_running_stats(op, mean, var, int(n))
        return y

    def _check_peers_once(self, op: str, group: Any, world: int, device: torch.device) -> None:
        # Once per layer, process group and process (the key is not meaningful in another process,
        # e.g. after the layer was pickled into a torchrun worker).
        key = (id(group if group is not None else dist.group.WORLD), os.getpid())
        if self.__dict__.get("_peers_checked") != key:
            _check_peer_shapes(op, self.num_features, group, world, self.timeout, device)
            self._peers_checked = key

    def _check_sync_input(self, op: str, input: object) -> tuple[torch.Tensor, int]:
        """Like the base check, but an empty shard is allowed (its rank still joins the collectives)."""
        if isinstance(input, torch.Tensor) and input.numel() == 0 and input.is_floating_point() \
                and input.ndim in self._ranks and -input.ndim <= self.channel_axis < input.ndim:
            axis = self.channel_axis % input.ndim
            if input.shape[axis] != self.num_features:
                raise ValueError(f"{op}: expected {self.num_features} channels on axis {axis}, got "
                                 f"{input.shape[axis]} (input shape {tuple(input.shape)}); build the layer "
                                 f"with num_features={input.shape[axis]}, or set channel_axis")
            return input, axis
        return check_input(op, input, ranks=self._ranks, channel_axis=self.channel_axis,
                           num_features=self.num_features, training=False)

    def _update_running_stats(self, op: str, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        if F._skip_nonfinite(op, self.nonfinite, mean, var, subject="this global batch's statistics",
                             cause="some rank's input holds non-finite values"):
            return
        new = F.update_running_stats(self.running_mean, self.running_var, mean, var, n, self.momentum,
                                     self.num_batches_tracked, self.running_var_unbiased)
        self._store_running_stats(new)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any | None = None) -> nn.Module:
        """Replace every BN layer in ``module`` by a SyncBatchNorm; see :func:`convert_sync_batchnorm`."""
        return convert_sync_batchnorm(module, process_group)


# -- uneven inputs: the Joinable ----------------------------------------------------------------
_SHADOW_GROUPS: dict[int, tuple[Any, Any]] = {}  # id(base group) -> (base group, its shadow group)


def _shadow_group(base: Any) -> Any:
    """A second group over the ranks of ``base`` for SyncBN's collectives under sync_join (cached).

    DDP's join hook shadows DDP's collectives on ``base`` from the main thread while a joined
    rank answers SyncBN's from a helper thread: on separate groups the two sequences cannot
    interleave wrongly. ``dist.new_group`` is collective: every process of the job creates it at
    the same call of :func:`sync_join` (then it is reused).
    """
    hit = _SHADOW_GROUPS.get(id(base))
    if hit is not None and hit[0] is base:
        return hit[1]
    group = dist.new_group(ranks=dist.get_process_group_ranks(base))
    _SHADOW_GROUPS[id(base)] = (base, group)
    return group


class SyncBatchNormJoinable(Joinable):
    """Makes the SyncBatchNorm layers of ``model`` joinable (torch's ``Join`` API, uneven inputs).

    With uneven inputs, a rank that has run out of batches stops calling SyncBN's collectives and
    the others hang in their next forward. Inside the ``Join`` context this object switches every
    SyncBN layer of ``model`` to one fixed-size collective per forward and per backward (see
    ``_HEAD`` in the source), and its hook makes a rank that has joined answer each of them with a
    zero-count row: ``n_r = 0, Σ dz = 0, Σ dz·x̂ = 0`` add nothing to the exact merge, so the ranks
    still running normalise with the statistics of the batches that exist and get the gradient of
    the loss over them, exactly as one process holding those batches.

    The joined rank answers from a helper thread on a second process group (the "shadow group"),
    so it needs no knowledge of how many SyncBN collectives an iteration runs (two forwards before
    one backward, checkpoint recomputation and skipped branches all work) and cannot collide with
    DDP's own shadow collectives on the main thread. It stops when a collective finds every rank
    joined. The running statistics the joined rank missed are replayed from the gathered rows in
    the post-hook (bit-identical to the active ranks'), unless DDP broadcasts buffers from the last
    joiner anyway (``forward_sync_buffers=True``, the default).

    Use it through :func:`sync_join`, which builds ``Join([ddp, SyncBatchNormJoinable(ddp)])`` and
    starts the answering thread as the rank's loop ends. (In a hand-built ``Join`` the DDP model
    must come first, as it notifies the context and counts the ranks still running; its main hook
    then blocks until the others' backward is done, before this object's main hook could start
    the thread that their backward waits for: that is why ``sync_join`` starts it earlier.)

    Args:
        model: a DDP-wrapped model (its ``process_group`` is used) or a plain module whose SyncBN
            layers synchronise over ``process_group``.
        process_group: for a plain module, the group its SyncBN layers use (None = world).
    """

    def __init__(self, model: nn.Module, process_group: Any | None = None) -> None:
        super().__init__()
        op = "SyncBatchNormJoinable"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{op}: expected an nn.Module (the DDP model), got {type(model).__name__}")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{op}: torch.distributed is not initialised; call "
                               f"dist.init_process_group(...) in every rank first")
        ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        base = ddp.process_group if ddp is not None else (process_group or dist.group.WORLD)
        layers = [m for m in model.modules() if isinstance(m, SyncBatchNorm)]
        for i, m in enumerate(layers):
            group = m.process_group if m.process_group is not None else dist.group.WORLD
            if group is not base:
                raise ValueError(f"{op}: SyncBN layer {i} of the model synchronises over another process "
                                 f"group than the join context ({'DDP' if ddp else 'process_group'}); "
                                 f"build its layers with that group (convert_sync_batchnorm(model, group)) "
                                 f"or join with process_group=<the layers' group>")
        # Every rank must have the same layers: the rows' size depends on the widest one.
        width = max((m.num_features for m in layers), default=1)
        ref = next((t for m in layers for t in (*m.parameters(), *m.buffers())), None)
        self._device = ddp.device if ddp is not None else (ref.device if ref is not None
                                                           else torch.device("cpu"))
        mine = torch.tensor([float(len(layers)), float(width)], dtype=_GATHER_DTYPE, device=self._device)
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(base))]
        dist.all_gather(parts, mine, group=base)
        if any(not torch.equal(p, mine) for p in parts):
            listed = ", ".join(f"rank {r}: {int(p[0])} layers, widest {int(p[1])}"
                               for r, p in enumerate(parts))
            raise ValueError(f"{op}: the ranks' models differ in their SyncBN layers ({listed}); every rank "
                             f"must build the same model")
        timeouts = [m.timeout for m in layers]
        timeout = max(timeouts) if timeouts and None not in timeouts else None
        self._base = base
        self._layers = layers
        self._replay = ddp is None or not ddp.forward_sync_buffers
        self._state = _JoinState(_shadow_group(base), width, timeout)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._seen: list[tuple[int, torch.Tensor]] = []  # forward rows this rank answered while joined

    # Joinable's interface
    def join_hook(self, **kwargs: Any) -> JoinHook:
        # Join calls this when it is built: from here on (every rank builds it at the same point)
        # the layers run the fixed-size collectives a joined rank can answer.
        self._thread, self._error = None, None
        self._seen.clear()
        self._open()
        return _SyncBatchNormJoinHook(self)

    @property
    def join_device(self) -> torch.device:
        return self._device

    @property
    def join_process_group(self) -> Any:
        return self._base

    # the layers' join mode
    def _open(self) -> None:
        for i, m in enumerate(self._layers):
            m._join = (self._state, i)

    def _close(self) -> None:
        for m in self._layers:
            m.__dict__.pop("_join", None)

    def _shadow(self) -> None:
        """Answer every SyncBN collective of the ranks still running until all ranks have joined."""
        st = self._state
        row = torch.zeros(_HEAD + 2 * st.width, dtype=_GATHER_DTYPE, device=self._device)
        try:
            while True:
                table = st.gather(row, "collective answered by a joined rank")
                active = table[:, 0] == 1
                if not bool(active.any()):
                    return  # every rank has joined: all of them stop at this same collective
                first = table[int(active.nonzero()[0])]
                if int(first[2]) == _FWD:
                    self._seen.append((int(first[1]), table))
        except BaseException as e:  # reported by the post-hook, in the main thread
            self._error = e

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._shadow, name="SyncBatchNorm-join", daemon=True)
            self._thread.start()

    def _finish(self) -> None:
        if self._thread is None:  # a last joiner: its one shadow collective finds everybody joined
            self._shadow()
        else:
            self._thread.join()
        self._close()
        if self._error is not None:
            raise self._error
        if self._replay:
            self._replay_running_stats()

    def _replay_running_stats(self) -> None:
        """The updates this rank's layers missed while joined, from the very rows the others used."""
        st = self._state
        for index, table in self._seen:
            m = self._layers[index]
            c = m.num_features
            glob = merge_moments(table[:, 4], table[:, _HEAD:_HEAD + c], table[:, _HEAD + st.width:
                                                                                 _HEAD + st.width + c])
            first = table[int((table[:, 0] == 1).nonzero()[0])]
            acc = torch.float64 if bool(first[5]) else torch.float32
            rejected = bool((table[:, 4] < 0).any())  # a rank's mask was rejected: nobody updated
            if m.running_mean is not None and float(glob.count) > 1 and not rejected:
                m._update_running_stats(type(m).__name__, glob.mean.to(acc), glob.var.to(acc),
                                        int(float(glob.count)))
        self._seen.clear()


class _SyncBatchNormJoinHook(JoinHook):
    def __init__(self, joinable: SyncBatchNormJoinable) -> None:
        self.joinable = joinable

    def main_hook(self) -> None:
        # Called once per iteration of the ranks still running; the thread answers all of them.
        self.joinable._start()

    def post_hook(self, is_last_joiner: bool) -> None:
        self.joinable._finish()


class _SyncJoin:
    """The context manager :func:`sync_join` returns: torch's ``Join``, plus cleanup on errors."""

    def __init__(self, join: Join, joinable: SyncBatchNormJoinable | None, throw: bool) -> None:
        self._join = join
        self._joinable = joinable
        self._throw = throw

    def __enter__(self) -> _SyncJoin:
        self._join.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if exc[0] is None and self._joinable is not None and not self._throw:
                # This rank has run out of inputs. Answer SyncBN from now on, *before* Join runs the
                # hooks: DDP's main hook comes first and blocks until the others' backward has
                # reduced its gradients, and their backward needs our SyncBN answers.
                self._joinable._start()
            self._join.__exit__(*exc)
        finally:
            if self._joinable is not None:
                self._joinable._close()


def sync_join(model: nn.Module, *, divide_by_initial_world_size: bool = True, enable: bool = True,
              throw_on_early_termination: bool = False) -> _SyncJoin:
    """``with sync_join(ddp_model):`` — DDP's ``ddp_model.join()`` that also shadows SyncBN.

    DDP's own ``join()`` shadows only DDP's gradient all-reduces; a model with SyncBN layers then
    hangs as soon as one rank runs out of batches (pytorch#38174). This context adds
    :class:`SyncBatchNormJoinable`: ranks that have run out answer every SyncBN forward and backward
    collective with zero counts, so the others finish their extra batches normalised with the
    statistics of the batches that exist (as one process would), and nobody hangs. The
    keyword arguments are DDP's ``join`` arguments. Every process of the job must enter it (it may
    create a process group once). A model without SyncBN layers gets plain ``ddp_model.join()``.

    Example::

        model = DDP(batchnorm.convert_sync_batchnorm(net))
        with batchnorm.sync_join(model):
            for x, y in my_uneven_loader:           # ranks may hold different numbers of batches
                loss_fn(model(x), y).backward()
                opt.step(); opt.zero_grad()
    """
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(f"sync_join: expected a DistributedDataParallel model (DDP's join context), got "
                        f"{type(model).__name__}; wrap the model in DDP, or build "
                        f"torch.distributed.algorithms.join.Join([..., SyncBatchNormJoinable(model)]) "
                        f"yourself")
    has_sync = any(isinstance(m, SyncBatchNorm) for m in model.modules())
    joinable = SyncBatchNormJoinable(model) if enable and has_sync else None
    joinables: list[Joinable] = [model] if joinable is None else [model, joinable]
    join = Join(joinables, enable, throw_on_early_termination,
                divide_by_initial_world_size=divide_by_initial_world_size)
    return _SyncJoin(join, joinable, throw_on_early_termination)


# -- conversion -------------------------------------------------------------------------------
def _convertible(m: nn.Module) -> bool:
    # Only layers whose forward is plain (or synchronized) BN: torch's BatchNorm1d/2d/3d, Lazy*,
    # SyncBatchNorm; ours BatchNorm*, BatchNormAct*, SyncBatchNorm. Subclasses that override forward
    # compute something else (Batch Renorm, Ghost BN, user variants) and are left as they are.
    tbn = nn.modules.batchnorm._BatchNorm
    if isinstance(m, _BatchNorm):  # (first: ours are torch _BatchNorm subclasses too)
        return type(m).forward in (_BatchNorm.forward, SyncBatchNorm.forward)
    return isinstance(m, tbn) and type(m).forward in (tbn.forward, nn.SyncBatchNorm.forward)


def _check_convertible(m: nn.Module) -> None:
    for t in (getattr(m, "weight", None), getattr(m, "running_mean", None)):
        if isinstance(t, nn.parameter.UninitializedTensorMixin):
            raise ValueError(f"convert_sync_batchnorm: {type(m).__name__} is a lazy layer whose number of "
                             f"features is not known yet; run one forward pass (or build it with "
                             f"num_features) before converting")


def convert_sync_batchnorm(module: nn.Module, process_group: Any | None = None) -> nn.Module:
    """Return ``module`` with every batch-norm layer replaced by :class:`SyncBatchNorm`.

    Converted: ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm``, and this package's
    ``BatchNorm1d/2d/3d``, ``BatchNormAct1d/2d/3d`` (the activation is kept) and ``SyncBatchNorm``
    (re-bound to ``process_group``, its ``timeout`` kept). Subclasses that override ``forward`` (BN
    variants with other statistics: Batch Renorm, Ghost BN, your own) are left alone. The new
    layers *share* the old layers' parameters and buffers (same tensor objects, so an optimizer
    built before still works) and keep their hyper-parameters, train/eval mode, dtype and device.
    Children are replaced in place
    and ``module`` is returned (converted, if it is itself a BN layer); every layer is validated
    first, so a rejected call (a lazy layer that never ran) changes nothing. Hooks on old layers
    are not carried over.

    Args:
        module: any ``nn.Module``.
        process_group: the group to synchronise over (None = world).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        >>> net = convert_sync_batchnorm(net)
        >>> type(net[1]).__name__
        'SyncBatchNorm'
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_sync_batchnorm: expected an nn.Module, got {type(module).__name__}")
    for m in module.modules():  # validate everything first: a rejected call changes nothing
        if _convertible(m):
            _check_convertible(m)
    return _convert(module, process_group)


def _convert(module: nn.Module, process_group: Any) -> nn.Module:
    out = module
    if _convertible(module):
        out = _to_sync(module, process_group)
    for name, child in module.named_children():
        new = _convert(child, process_group)
        if new is not child:
            out.add_module(name, new)
    return out


def _to_sync(m: nn.Module, process_group: Any) -> SyncBatchNorm:
    weight = getattr(m, "weight", None)
    running_mean = getattr(m, "running_mean", None)
    ours = isinstance(m, _BatchNorm)
    extras: dict[str, Any] = {}
    if ours:
        extras = {"channel_axis": m.channel_axis, "running_var_unbiased": m.running_var_unbiased,
                  "nonfinite": m.nonfinite, "activation": m.activation, "negative_slope": m.negative_slope}
        if isinstance(m, SyncBatchNorm):
            extras["timeout"] = m.timeout
    ref = weight if weight is not None else running_mean
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    new = SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                        process_group, **factory, **extras)
    share_state(new, m)
    if hasattr(m, "qconfig"):
        new.qconfig = m.qconfig
    return new
