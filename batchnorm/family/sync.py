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

Running statistics are updated from the global mean and the global variance made unbiased with the
global count ``n / (n − 1)``; every rank computes them from the same gathered numbers in the same
order, so they are bit-identical on every rank.

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
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from .. import kernels
from .._checks import check_input
from ..core import functional as F
from ..core._bnlayers import share_state
from ..core.modules import _BatchNorm
from ..kernels import torch_backend
from ..stats import Moments, acc_dtype, merge_moments, reduce_dims

__all__ = ["SyncBatchNorm", "SyncBatchNormError", "convert_sync_batchnorm"]

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


def _global_moments(x: torch.Tensor, axis: int, group: Any, world: int, timeout: float | None) -> Moments:
    """Merge every rank's per-channel ``(count, mean, M2)`` of ``x`` (one all_gather)."""
    c = x.shape[axis]
    if x.numel() > 0:
        local = Moments.of(x, axis)
        packed = torch.cat([local.count.reshape(1), local.mean, local.m2]).to(_GATHER_DTYPE)
    else:  # an empty shard still takes part, with count 0 (it contributes nothing to the merge)
        packed = torch.zeros(2 * c + 1, dtype=_GATHER_DTYPE, device=x.device)
    parts = [torch.empty_like(packed) for _ in range(world)]
    _run_collective(lambda: dist.all_gather(parts, packed, group=group, async_op=True),
                    "forward all_gather of the batch statistics", group, timeout)
    table = torch.stack(parts)  # (W, 2C + 1), the same on every rank, in rank order
    return merge_moments(table[:, 0], table[:, 1:c + 1], table[:, c + 1:])


def _view(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


class _SyncBatchNormFn(torch.autograd.Function):
    """``y = _SyncBatchNormFn.apply(x, weight, bias, mean, var, n, eps, axis, act, slope, group, timeout)``.

    ``mean``/``var``/``n`` are the *global* statistics (constants here: their dependence on ``x``
    is folded into the backward's ``g/n`` and ``x̂·h/n`` terms, summed over ranks).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, n, eps, axis, act, slope, group, timeout):
        backend = kernels.select(x, axis, act) if x.numel() > 0 else torch_backend
        y = backend.eval_forward(x, mean, var, weight, bias, eps, axis, act, slope)
        ctx.cfg = (n, eps, axis, act, slope, group, timeout)
        ctx.save_for_backward(x, weight, mean, var, y if act != "identity" else None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, var, y = ctx.saved_tensors
        n, eps, axis, act, slope, group, timeout = ctx.cfg
        acc = acc_dtype(x.dtype)
        nd = x.ndim
        dims = reduce_dims(nd, axis)
        invstd = torch.rsqrt(var.to(acc) + eps)
        xhat = (x.to(acc) - _view(mean.to(acc), nd, axis)) * _view(invstd, nd, axis)
        dz = dy.to(acc)
        if act != "identity":
            dz = dz * torch_backend.act_grad_from_output(y.to(acc), act, slope)
        g = dz.sum(dim=dims)
        h = (dz * xhat).sum(dim=dims)
        dx = None
        if ctx.needs_input_grad[0]:
            # The one collective of the backward: Σ over ranks of both per-channel sums, concatenated.
            gh = torch.cat([g, h])
            _run_collective(lambda: dist.all_reduce(gh, op=dist.ReduceOp.SUM, group=group, async_op=True),
                            "backward all_reduce of the gradient sums", group, timeout)
            g_all, h_all = gh.split(g.numel())
            scale = invstd if weight is None else invstd * weight.to(acc)
            dx = _view(scale, nd, axis) * (dz - _view(g_all / n, nd, axis)
                                           - xhat * _view(h_all / n, nd, axis))
            dx = dx.to(x.dtype)
        dw = h.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = g.to(weight.dtype if weight is not None else x.dtype) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None, None, None, None, None


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

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        op = type(self).__name__
        ctx = _world(self.process_group) if self.training else None
        if ctx is None:
            return super().forward(input)
        _, world = ctx
        x, axis = self._check_sync_input(op, input)
        group = self.process_group
        _check_device(op, x, group)
        glob = _global_moments(x, axis, group, world, self.timeout)
        n = float(glob.count)  # exact: float64 counts (one host sync, as in torch's SyncBatchNorm)
        if n <= 1:
            raise ValueError(f"{op}: expected more than 1 value per channel over the global batch when "
                             f"training, got {n:g} (rank-local input shape {tuple(x.shape)}, {world} ranks); "
                             f"use larger batches, or eval mode")
        acc = acc_dtype(x.dtype)
        mean, var = glob.mean.to(acc), glob.var.to(acc)
        y = _SyncBatchNormFn.apply(x, self.weight, self.bias, mean, var, n, self.eps, axis,
                                   self.activation, self.negative_slope, group, self.timeout)
        if self.running_mean is not None:
            self._update_running_stats(op, mean, var, int(n))
        return y

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
