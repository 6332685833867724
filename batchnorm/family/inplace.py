"""In-place activated Batch Normalization (InPlace-ABN): BN + invertible activation, saving only its output.

Rota Bulò, Porzi & Kontschieder, "In-Place Activated BatchNorm for Memory-Optimized Training of
DNNs", CVPR 2018. A standard ``conv → BN → activation`` block keeps three full-size tensors alive
for the backward: the conv output ``x`` (BN needs it), the BN output ``z`` (the activation needs
it) and the activation output ``y`` (the next conv needs it). InPlace-ABN keeps only ``y`` — which
the next layer saves anyway — plus a few numbers per channel, and recomputes the rest from ``y``.

Forward (training), per channel with batch mean ``μ`` and biased variance ``σ²``::

    z = γ · (x − μ) / sqrt(σ² + ε) + β,    y = act(z)            (y overwrites x when inplace=True)

Backward from ``y`` alone (paper, Sec. 3), ``n`` values per channel::

    z  = act⁻¹(y)                      leaky_relu: y > 0 ? y : y / slope;  elu: y > 0 ? y : log1p(y / α)
    x̂  = (z − β) / γ
    dz = dy · act'(z)                  read from y: 1 for y > 0, else slope (leaky) or y + α (elu)
    g  = Σ dz,    h = Σ dz · x̂
    dx = γ / sqrt(σ² + ε) · (dz − g/n − x̂ · h/n),    dγ = h,    dβ = g

which is exactly the gradient of BN + activation (:class:`batchnorm.BatchNormAct2d`,
``torch.nn.BatchNorm2d`` + activation) up to float rounding. In eval mode the statistics are the
running ones and ``dx = γ / sqrt(var + ε) · dz``.

**Invertible activations only**: ``"identity"``, ``"leaky_relu"`` with ``negative_slope > 0`` and
``"elu"`` with ``α = negative_slope > 0``. ReLU maps every ``z ≤ 0`` to 0, so ``z`` (and with it
``x̂``) cannot be recovered: it is rejected with a ``ValueError``. ELU's inverse loses accuracy
where the output saturates (``z ≪ 0``, ``y → −α``), but there ``act'(z) = y + α → 0``, so those
elements carry (almost) no gradient.

**γ near zero** (our choice, documented and tested): ``x̂ = (z − β)/γ`` needs ``γ ≠ 0``. The op
uses the *effective* scale ``γ_eff = sign(γ) · max(|γ|, eps_gamma)`` (with ``sign(0) = +1``) in
the forward *and* the backward, so the inversion is always consistent with what the forward
computed. For ``|γ| ≥ eps_gamma`` (default 1e-5) this is standard BN exactly; for smaller ``|γ|``
(e.g. ResNet's zero-initialised last γ) the output differs from BN by at most
``eps_gamma · |x̂|``. The gradient for γ is ``h``, the gradient with respect to ``γ_eff``, passed
straight through (so a γ at 0 still moves). The mapillary ``inplace_abn`` library instead uses
``|γ| + ε`` everywhere, which changes every output and flips negative γ; we keep BN's maths.
Conditioning: ``x̂`` is recovered with absolute error about ``ulp(|z|) / |γ|``, so a very small
|γ| next to a large |β| costs float32 accuracy in ``dx`` and ``dγ`` — the price of not storing x.

**In place and autograd.** With ``inplace=True`` (the default) ``y`` is written into ``x``'s
storage and the returned tensor *is* ``x`` (``y is x``; under ``no_grad`` with an ``x`` that
requires grad, an alias of it); its autograd history is rewritten as for any in-place op (the
Function calls ``ctx.mark_dirty(x)``, which bumps ``x``'s version counter, so every tensor
saved before the overwrite is known to be stale). Consequences, each guarded:

* ``x`` must not be a leaf that requires grad, or a view of one (its ``.grad`` would be computed
  from overwritten values) — rejected before anything is written, with a ``ValueError``;
* ``x`` must not have overlapping memory (``expand``-ed tensors) — ``ValueError``;
* ``x`` must not be saved by the op that produced it (``exp``, ``sigmoid``, ``tanh``, ``relu``,
  another InPlaceABN or a fused BN + activation all save their *output*) — detected from the
  saved tensors of ``x.grad_fn`` (and of its base's, for a view) and rejected in the forward,
  with a ``ValueError``. So two InPlace-ABN layers in a row need ``inplace=False`` on the second
  (or any op between them that does not save its output, as a conv);
* any *other* op that saved ``x`` before the overwrite (e.g. ``w = x * s`` then ``iabn(x)``) is
  caught by autograd's version counter at backward time: "one of the variables needed for
  gradient computation has been modified by an inplace operation". Likewise if ``y`` itself is
  modified in place after the call (we saved it).
* ``x`` used *after* the call reads ``y`` (in-place semantics: ``x.sum() + y.sum()`` is
  ``2 · y.sum()``), with correct gradients.

With ``inplace=False`` a new tensor is returned and ``x`` is left alone — the memory saving for
the backward is the same (``x`` is still not saved), only the forward's peak is higher.

The gradient ``dx`` is written into fresh memory, not into ``dy``'s storage as the paper allows:
autograd may hand the same gradient tensor to several consumers (``a + b`` passes one tensor to
both branches, ``sum`` passes an expanded one), so overwriting it is unsafe without ownership
information that autograd does not expose. Double backward (``create_graph=True``) is not
supported (``x`` is gone) and raises a ``RuntimeError``; use :class:`batchnorm.BatchNormAct2d`.

Kernels: numba (:mod:`batchnorm.kernels.inplace_cpu`) for float32/float64 CPU tensors that are
contiguous, channels-last or have channels innermost; the torch composite path (statistics from
:func:`batchnorm.stats.batch_moments`) for everything else (other dtypes, CUDA, odd strides), and
when ``batchnorm.kernels.set_backend("torch")`` or ``set_backend("native")`` is in force (torch's
native batch-norm ops allocate their output, so the in-place torch path stands in for them).
:func:`inplace_backend_for` tells which one runs. Speed: on CPU a leaky_relu/identity layer runs
several times faster than ``nn.BatchNorm2d`` + ``nn.LeakyReLU`` (see ``benchmarks/inplace_bench.py``);
elu is 2–4× slower than torch's, its ``expm1``/``log1p`` being scalar in numba. On CUDA the composite
torch path is correct but unfused (a conv/BN/act training step took 2.5× torch's time on an H100).

Example:
    >>> import torch
    >>> from batchnorm.family.inplace import InPlaceABN2d
    >>> block = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
    ...                             InPlaceABN2d(8, activation="leaky_relu", negative_slope=0.01))
    >>> y = block(torch.randn(4, 3, 16, 16))
    >>> y.sum().backward()
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import nn

from .. import kernels as _kernels
from .._checks import (
    check_channel_tensor,
    check_eps,
    check_input,
)
from ..core.autograd import refuse_capture
from ..core.functional import RunningStats, _check_train_args, _skip_nonfinite, update_running_stats
from ..core.modules import _BatchNorm
from ..kernels.torch_backend import act_grad_from_output
from ..stats import acc_dtype, batch_moments, reduce_dims

__all__ = [
    "INVERTIBLE_ACTIVATIONS",
    "InPlaceABN1d",
    "InPlaceABN2d",
    "InPlaceABN3d",
    "InPlaceABNEvalFn",
    "InPlaceABNTrainFn",
    "effective_weight",
    "inplace_abn_eval",
    "inplace_abn_train",
    "inplace_backend_for",
]

INVERTIBLE_ACTIVATIONS = ("identity", "leaky_relu", "elu")
_ACT_CODE = {"identity": 0, "leaky_relu": 1, "elu": 2}


# ------------------------------------------------------------------------------------------ checks
def _check_invertible(op: str, activation: object, negative_slope: object) -> tuple[str, float]:
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, int | float):
        raise TypeError(f"{op}: expected negative_slope to be a number, got {negative_slope!r}")
    slope = float(negative_slope)
    if activation == "relu":
        raise ValueError(f"{op}: activation 'relu' is not invertible (it maps every z <= 0 to 0, so the "
                         f"backward cannot recover z from the output); use 'leaky_relu' with "
                         f"negative_slope > 0 (e.g. 0.01), 'elu' or 'identity' - or BatchNormAct, which "
                         f"saves its input")
    if activation not in INVERTIBLE_ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {activation!r}; expected one of "
                         f"{', '.join(INVERTIBLE_ACTIVATIONS)} (invertible activations)")
    if activation in ("leaky_relu", "elu") and not (slope > 0 and math.isfinite(slope)):
        what = "negative_slope" if activation == "leaky_relu" else "negative_slope (elu's alpha)"
        raise ValueError(f"{op}: {activation} is invertible only with a finite {what} > 0, got {slope!r}; "
                         f"use e.g. negative_slope=0.01 for leaky_relu or 1.0 for elu")
    return str(activation), slope


def _check_eps_gamma(op: str, eps_gamma: object) -> float:
    if (isinstance(eps_gamma, bool) or not isinstance(eps_gamma, int | float)
            or not (eps_gamma > 0 and math.isfinite(eps_gamma))):
        raise ValueError(f"{op}: expected eps_gamma to be a finite number > 0 (the smallest |gamma| the "
                         f"backward divides by), got {eps_gamma!r}; the default is 1e-5")
    return float(eps_gamma)


def _saved_by_producer(x: torch.Tensor) -> str | None:
    """Name of the autograd node that produced ``x`` (or its base) and saved a tensor sharing its memory."""
    ptr = x.untyped_storage().data_ptr()
    nodes = [x.grad_fn]
    if x._base is not None:
        nodes.append(x._base.grad_fn)
    for node in nodes:
        if node is None:
            continue
        for name in dir(node):
            if not (name.startswith("_saved_") or name == "saved_tensors"):
                continue
            try:
                val = getattr(node, name)
            except RuntimeError:  # already freed or already modified: nothing left to protect
                continue
            for t in val if isinstance(val, tuple | list) else (val,):
                if isinstance(t, torch.Tensor) and t.device == x.device and \
                        t.untyped_storage().data_ptr() == ptr:
                    return node.name()
    return None


_EXACT_OVERLAP_MAX = 1 << 16  # elements up to which an unproven layout is checked exactly


def _may_overlap(x: torch.Tensor) -> bool:
    """Whether two elements of ``x`` may share memory (torch has no public internal-overlap check
    for non-zero strides: ``as_strided`` views pass its own ``assert_no_internal_overlap``).

    Proof of no overlap: with the dimensions of size > 1 sorted by stride, each stride exceeds the
    largest offset reachable by the smaller ones (``stride_i > Σ_j<i stride_j·(size_j − 1)``), so
    every index tuple has its own offset (mixed-radix argument). Layouts that fail the proof are
    checked exactly (distinct offsets) up to :data:`_EXACT_OVERLAP_MAX` elements, beyond that
    treated as overlapping (the error says how to proceed)."""
    if x.is_contiguous() or x.numel() <= 1:
        return False
    dims = sorted((abs(st), n) for st, n in zip(x.stride(), x.shape) if n > 1)
    reach = 0
    for st, n in dims:
        if st <= reach:
            break
        reach += st * (n - 1)
    else:
        return False
    if x.numel() > _EXACT_OVERLAP_MAX:
        return True
    offsets = torch.zeros((), dtype=torch.int64)
    for st, n in zip(x.stride(), x.shape):
        offsets = (offsets.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * st).reshape(-1)
    return int(torch.unique(offsets).numel()) != x.numel()


def _check_inplace_target(op: str, x: torch.Tensor) -> None:
    """Reject writing into ``x`` where it would corrupt a tensor that is still needed. Writes nothing."""
    if torch.is_grad_enabled() and x.requires_grad:
        if x.is_leaf:
            raise ValueError(f"{op}: inplace=True would overwrite a leaf tensor that requires grad (its "
                             f".grad is computed from it); pass inplace=False, or give the layer the output "
                             f"of an op (e.g. a conv) rather than a parameter or leaf input")
        base = x._base
        if base is not None and base.is_leaf and base.requires_grad:
            raise ValueError(f"{op}: inplace=True would overwrite a view of a leaf tensor that requires "
                             f"grad; pass inplace=False, or clone the input first")
    if _may_overlap(x):
        raise ValueError(f"{op}: inplace=True cannot write into an input whose elements share memory "
                         f"(strides {tuple(x.stride())} for shape {tuple(x.shape)}, e.g. from expand() or "
                         f"as_strided()): writing one element would change another. Pass inplace=False "
                         f"or .contiguous() the input first")
    if x.requires_grad and torch.is_grad_enabled():
        producer = _saved_by_producer(x)
        if producer is not None:
            raise ValueError(f"{op}: inplace=True would overwrite the input, but {producer} (the op that "
                             f"produced it) saved it for its own backward, so that gradient would be "
                             f"computed from overwritten values; pass inplace=False, or put the layer "
                             f"after an op that does not save its output (conv, linear, add)")


# ------------------------------------------------------------------------------------------ helpers
def effective_weight(weight: torch.Tensor | None, eps_gamma: float, c: int, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """``γ_eff = sign(γ) · max(|γ|, eps_gamma)`` with ``sign(0) = +1`` (ones when ``weight`` is None).

    The scale InPlace-ABN uses in its forward and divides by in its backward; equal to γ wherever
    ``|γ| ≥ eps_gamma``. Returned detached, in ``dtype``.
    """
    if weight is None:
        return torch.ones(c, dtype=dtype, device=device)
    w = weight.detach().to(dtype)
    sign = torch.where(w < 0, -1.0, 1.0).to(dtype)
    return torch.where(w.abs() < eps_gamma, sign * eps_gamma, w)


def _view(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def _cpu_kernels() -> ModuleType | None:
    try:
        from ..kernels import inplace_cpu
    except ImportError:  # numba missing: the torch path runs
        return None
    return inplace_cpu


# Below this many elements a kernel runs on one thread: waking numba's OpenMP team costs ~20 µs on
# a quiet machine and tens of *milliseconds* on an oversubscribed one (measured: 24 ms vs 2 µs
# single-threaded for a 72-element input at load 13 on 2 cores), far more than the work itself.
_PARALLEL_MIN = 1 << 15


@contextlib.contextmanager
def _threads_for(numel: int) -> Iterator[None]:
    """numba threads for a kernel on ``numel`` elements: torch's count, or 1 for small inputs.

    numba's "omp" threading layer and torch share the process's OpenMP runtime, so
    ``numba.set_num_threads`` also changes ``torch.get_num_threads()``: torch's count is read
    first and put back afterwards, so a call never changes how many threads torch uses.
    """
    import numba

    n_torch = torch.get_num_threads()
    want = 1 if numel < _PARALLEL_MIN else max(1, min(n_torch, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != want:
        numba.set_num_threads(want)
    try:
        yield
    finally:
        if torch.get_num_threads() != n_torch:
            torch.set_num_threads(n_torch)


def _layout(x: torch.Tensor, axis: int) -> str | None:
    """"ncl" (contiguous, viewable as (before, C, after)), "mc" (channels innermost) or None."""
    if (type(x) not in (torch.Tensor, torch.nn.Parameter) or x.device.type != "cpu"
            or x.dtype not in (torch.float32, torch.float64) or x.layout != torch.strided):
        return None  # subclasses, CUDA, half precision, sparse: the torch path
    after = math.prod(x.shape[axis + 1:])
    if after > 1 and x.is_contiguous():
        return "ncl"
    if x.movedim(axis, -1).is_contiguous():
        return "mc"
    return None


def _np(t: torch.Tensor, layout: str, axis: int):
    c = t.shape[axis]
    t = t.detach()
    if layout == "ncl":
        return t.view(math.prod(t.shape[:axis]), c, -1).numpy()
    return t.movedim(axis, -1).reshape(-1, c).numpy()


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like`` through the kernels' reuse pool (recycled pages, no fresh page faults)."""
    try:
        from ..kernels import _pool
    except ImportError:
        return torch.empty_like(x)
    return _pool.empty_like(x)


def _same_layout(t: torch.Tensor, like: torch.Tensor, layout: str, axis: int) -> torch.Tensor:
    ok = t.is_contiguous() if layout == "ncl" else t.movedim(axis, -1).is_contiguous()
    if ok and t.dtype == like.dtype and t.layout == torch.strided:
        return t
    return _empty_like(like).copy_(t)  # e.g. the expanded gradient of y.sum()


def _use_numba(x: torch.Tensor, axis: int) -> str | None:
    """The numba layout to run ``x`` with, or None for the torch path (respects the backend switch)."""
    choice = _kernels.get_backend()
    if choice in ("torch", "native"):
        # "native" means torch's fused native_batch_norm ops, which write a fresh output: that would
        # break the in-place contract, so InPlace-ABN serves it with its in-place torch path
        return None
    layout = _layout(x, axis)
    if layout is not None and _cpu_kernels() is not None:
        return layout
    if choice != "auto":
        raise RuntimeError(f"batchnorm.inplace: forced backend {choice!r} cannot run a {x.dtype} input of "
                           f"shape {tuple(x.shape)} on {x.device} with strides {x.stride()}; use "
                           f"set_backend('auto') to fall back to torch")
    return None


def inplace_backend_for(x: torch.Tensor, channel_axis: int = 1) -> str:
    """``"numba"`` or ``"torch"``: which implementation InPlace-ABN would use for ``x`` now."""
    return "torch" if _use_numba(x, channel_axis % x.ndim) is None else "numba"


def _act_(z: torch.Tensor, act: str, slope: float) -> torch.Tensor:
    if act == "leaky_relu":
        return torch.nn.functional.leaky_relu_(z, slope)
    if act == "elu":
        return torch.nn.functional.elu_(z, slope)
    return z


def _torch_apply(x: torch.Tensor, out: torch.Tensor | None, mean: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor, axis: int, act: str, slope: float) -> torch.Tensor:
    """``act((x − mean) · scale + β)`` into ``out`` (``out`` may be ``x``; None: a new tensor)."""
    nd = x.ndim
    acc = acc_dtype(x.dtype)
    m, k, b = (_view(t.to(acc), nd, axis) for t in (mean, scale, bias))
    if out is x and x.dtype == acc:  # truly in place: no full-size temporary
        return _act_(x.sub_(m).mul_(k).add_(b), act, slope)
    z = _act_((x.to(acc) - m).mul_(k).add_(b), act, slope)
    if out is None:
        return z.to(x.dtype)
    return out.copy_(z)


def _torch_backward(dy, y, w_eff, bias, invstd, axis, act, slope, train):
    """The backward from ``y`` with torch ops; returns ``(dx, g, h)`` in the accumulation dtype."""
    acc = acc_dtype(y.dtype)
    nd = y.ndim
    dims = reduce_dims(nd, axis)
    n = y.numel() // y.shape[axis]
    ya = y.to(acc)
    if act == "leaky_relu":
        z = torch.where(ya > 0, ya, ya / slope)
    elif act == "elu":
        z = torch.where(ya > 0, ya, torch.log1p((ya / slope).clamp_min(-1.0 + 1e-15)))
    else:
        z = ya
    dz = dy.to(acc)
    d = act_grad_from_output(ya, act, slope)
    if d is not None:
        dz = dz * d
    xhat = (z - _view(bias, nd, axis)) / _view(w_eff, nd, axis)
    g = dz.sum(dim=dims)
    h = (dz * xhat).sum(dim=dims)
    k = _view(w_eff * invstd, nd, axis)
    dx = k * (dz - _view(g / n, nd, axis) - xhat * _view(h / n, nd, axis)) if train else k * dz
    return dx.to(y.dtype), g, h


def _grads(ctx, dx, g, h, iw, ib):
    """(dx, dweight, dbias) for the inputs that need them; ``iw``/``ib``: positions of weight/bias."""
    need = ctx.needs_input_grad
    wdt, bdt = ctx.dtypes
    return (dx if need[0] else None), (h.to(wdt) if need[iw] else None), (g.to(bdt) if need[ib] else None)


def _forward(ctx, x, weight, bias, mean, var, eps, eps_gamma, axis, act, slope, inplace):
    """Shared forward: batch statistics when ``mean`` is None; returns ``(y, mean, var)``."""
    c = x.shape[axis]
    layout = _use_numba(x, axis)
    acc = torch.float64 if layout is not None else acc_dtype(x.dtype)  # numba sums in float64
    w_eff = effective_weight(weight, eps_gamma, c, acc, x.device)
    b = torch.zeros(c, dtype=acc, device=x.device) if bias is None else bias.detach().to(acc)
    out = x if inplace else (_empty_like(x) if layout is not None else None)
    if layout is not None:
        K = _cpu_kernels()
        xa, ya = _np(x, layout, axis), _np(out, layout, axis)
        if mean is None:
            m, v = torch.empty(c, dtype=acc), torch.empty(c, dtype=acc)
            fn = K.train_forward_ncl if layout == "ncl" else K.train_forward_mc
            with _threads_for(x.numel()):
                fn(xa, ya, w_eff.numpy(), b.numpy(), eps, _ACT_CODE[act], slope, m.numpy(), v.numpy())
        else:
            m, v = mean.detach().to(acc), var.detach().to(acc)
            scale = w_eff * torch.rsqrt(v + eps)
            fn = K.apply_ncl if layout == "ncl" else K.apply_mc
            with _threads_for(x.numel()):
                fn(xa, ya, m.numpy(), scale.numpy(), b.numpy(), _ACT_CODE[act], slope)
        y = out
    else:
        if mean is None:
            m, v, _ = batch_moments(x, axis)
        else:
            m, v = mean.detach().to(acc), var.detach().to(acc)
        y = _torch_apply(x, out, m, w_eff * torch.rsqrt(v + eps), b, axis, act, slope)
    invstd = torch.rsqrt(v + eps)
    ctx.cfg = (axis, act, slope, layout, mean is None)
    ctx.dtypes = (weight.dtype if weight is not None else None, bias.dtype if bias is not None else None)
    if inplace:
        ctx.mark_dirty(x)
    ctx.save_for_backward(y, w_eff, b, invstd)
    ctx.set_materialize_grads(False)
    return y, m, v


def _backward(ctx, dy, iw, ib):
    if torch.is_grad_enabled():
        raise RuntimeError("batchnorm.inplace: double backward (create_graph=True) is not supported by "
                           "InPlace-ABN - its input was overwritten, so second derivatives cannot be "
                           "formed; use batchnorm.BatchNormAct2d (which saves its input) for that")
    y, w_eff, b, invstd = ctx.saved_tensors
    axis, act, slope, layout, train = ctx.cfg
    if layout is not None and dy.device.type == "cpu":
        dyc = _same_layout(dy, y, layout, axis)
        dx = _empty_like(y)
        c = y.shape[axis]
        g, h = torch.empty(c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
        K = _cpu_kernels()
        fn = K.backward_ncl if layout == "ncl" else K.backward_mc
        with _threads_for(y.numel()):
            fn(_np(y, layout, axis), _np(dyc, layout, axis), _np(dx, layout, axis), w_eff.numpy(), b.numpy(),
               invstd.numpy(), _ACT_CODE[act], slope, train, g.numpy(), h.numpy())
    else:
        dx, g, h = _torch_backward(dy, y, w_eff, b, invstd, axis, act, slope, train)
    return _grads(ctx, dx, g, h, iw, ib)


class InPlaceABNTrainFn(torch.autograd.Function):
    """``y = InPlaceABNTrainFn.apply(x, weight, bias, eps, eps_gamma, axis, act, slope, inplace, stats)``.

    Training mode (batch statistics). Saves ``y`` and per-channel ``γ_eff``, ``β``, ``invstd``
    only. The batch ``mean`` and biased ``var`` (constants for autograd) are appended to the list
    ``stats`` rather than returned: a Function that modifies a *view* in place may return only
    one tensor. With ``inplace`` the returned ``y`` is ``x`` (marked dirty). No input checks:
    use :func:`inplace_abn_train`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, eps_gamma, axis, act, slope, inplace, stats):
        y, mean, var = _forward(ctx, x, weight, bias, None, None, eps, eps_gamma, axis, act, slope, inplace)
        stats.extend((mean, var))
        return y

    @staticmethod
    def backward(ctx, dy):
        if dy is None:
            return (None,) * 10
        return (*_backward(ctx, dy, 1, 2), None, None, None, None, None, None, None)


class InPlaceABNEvalFn(torch.autograd.Function):
    """``y = InPlaceABNEvalFn.apply(x, mean, var, weight, bias, eps, eps_gamma, axis, act, slope, inplace)``.

    Eval mode: given (running) statistics, treated as constants; saves ``y`` and per-channel values.
    """

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps, eps_gamma, axis, act, slope, inplace):
        y, _, _ = _forward(ctx, x, weight, bias, mean, var, eps, eps_gamma, axis, act, slope, inplace)
        return y

    @staticmethod
    def backward(ctx, dy):
        if dy is None:
            return (None,) * 11
        dx, dw, db = _backward(ctx, dy, 3, 4)
        return (dx, None, None, dw, db, None, None, None, None, None, None)


# ------------------------------------------------------------------------------------------ functional
def _train(op, x, running_mean, running_var, weight, bias, *, momentum, eps, num_batches_tracked,
           channel_axis, activation, negative_slope, running_var_unbiased, nonfinite, inplace, eps_gamma):
    x, axis = check_input(op, x, channel_axis=channel_axis, training=True)
    c = x.shape[axis]
    eps, momentum, act, slope, nonfinite = _check_train_args(
        op, x, axis, running_mean, running_var, weight, bias, eps=eps, momentum=momentum,
        activation=activation, negative_slope=negative_slope, nonfinite=nonfinite,
        num_batches_tracked=num_batches_tracked, check_act=_check_invertible)
    eps_gamma = _check_eps_gamma(op, eps_gamma)
    if inplace:
        _check_inplace_target(op, x)

    stats: list[torch.Tensor] = []
    y = InPlaceABNTrainFn.apply(x, weight, bias, eps, eps_gamma, axis, act, slope, bool(inplace), stats)
    mean, var = stats
    old = RunningStats(running_mean, running_var, num_batches_tracked)
    if running_mean is None or _skip_nonfinite(op, nonfinite, mean, var, note=" (the output was written)"):
        return y, old
    new = update_running_stats(running_mean, running_var, mean, var, x.numel() // c, momentum,
                               num_batches_tracked, running_var_unbiased)
    # The policy judges what would be stored: the statistics come in float64, and a finite input whose
    # variance overflows the buffers' dtype (x * 1e20 in float32) would store inf.
    if _skip_nonfinite(op, nonfinite, new.mean, new.var,
                       subject=f"the running statistics this batch would store ({running_var.dtype})",
                       cause="finite input whose mean or variance overflows that dtype, e.g. values near "
                             "1e20 in float32", note=" (the output was written)"):
        return y, old
    return y, new


def _eval(op, x, mean, var, weight, bias, *, eps, channel_axis, activation, negative_slope, inplace,
          eps_gamma):
    x, axis = check_input(op, x, channel_axis=channel_axis)
    c = x.shape[axis]
    if mean is None or var is None:
        raise TypeError(f"{op}: mean and var are required; for batch statistics use inplace_abn_train")
    for name, t in (("mean", mean), ("var", var), ("weight", weight), ("bias", bias)):
        check_channel_tensor(op, name, t, c, x=x)
    eps = check_eps(op, eps)
    act, slope = _check_invertible(op, activation, negative_slope)
    eps_gamma = _check_eps_gamma(op, eps_gamma)
    if inplace:
        _check_inplace_target(op, x)
    return InPlaceABNEvalFn.apply(x, mean.detach(), var.detach(), weight, bias, eps, eps_gamma, axis, act,
                                  slope, bool(inplace))


def inplace_abn_train(
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
    activation: str = "leaky_relu",
    negative_slope: float = 0.01,
    running_var_unbiased: bool = True,
    nonfinite: str = "update",
    inplace: bool = True,
    eps_gamma: float = 1e-5,
) -> tuple[torch.Tensor, RunningStats]:
    """Training-mode InPlace-ABN: ``y = act(γ_eff (x − μ_B)/sqrt(σ²_B + ε) + β)``, new running stats.

    Same arguments and conventions as :func:`batchnorm.core.functional.batch_norm_train` (momentum is
    PyTorch's weight of the new batch, None = cumulative average; the running variance stores
    ``σ²_B · n/(n−1)`` unless ``running_var_unbiased=False``), plus:

    Args:
        activation: ``"leaky_relu"`` (default), ``"elu"`` or ``"identity"`` — invertible only.
        negative_slope: leaky_relu slope or elu's α; must be > 0.
        inplace: write ``y`` into ``x``'s storage and return ``x`` (default True). See the module
            docstring for what that means for autograd; the checks run before anything is written.
        eps_gamma: smallest ``|γ|`` used (``γ_eff = sign(γ)·max(|γ|, eps_gamma)``), default 1e-5.

    Returns:
        ``(y, RunningStats(mean, var, num_batches_tracked))``. ``nonfinite="skip"``/``"raise"``
        concern the running statistics only: the output has already been written by then.

    Shape: ``x`` of rank 2–5 with channels on ``channel_axis``; ``y`` the same.

    Example:
        >>> x = torch.randn(8, 4, 5, 5)
        >>> rm, rv = torch.zeros(4), torch.ones(4)
        >>> y, st = inplace_abn_train(x, rm, rv, momentum=0.1)
        >>> y is x
        True
    """
    return _train("batchnorm.inplace_abn_train", x, running_mean, running_var, weight, bias,
                  momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked,
                  channel_axis=channel_axis, activation=activation, negative_slope=negative_slope,
                  running_var_unbiased=running_var_unbiased, nonfinite=nonfinite, inplace=inplace,
                  eps_gamma=eps_gamma)


def inplace_abn_eval(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    channel_axis: int = 1,
    activation: str = "leaky_relu",
    negative_slope: float = 0.01,
    inplace: bool = True,
    eps_gamma: float = 1e-5,
) -> torch.Tensor:
    """Eval-mode InPlace-ABN with given statistics: ``act(γ_eff (x − mean)/sqrt(var + ε) + β)``.

    Gradients flow to ``x``, ``weight`` and ``bias`` (``dx = γ_eff/sqrt(var + ε) · dz``), computed
    from the output; the statistics are constants. ``inplace``/``eps_gamma`` as in
    :func:`inplace_abn_train`.

    Example:
        >>> x = torch.randn(8, 4, 5, 5)
        >>> y = inplace_abn_eval(x, torch.zeros(4), torch.ones(4), inplace=False)
    """
    return _eval("batchnorm.inplace_abn_eval", x, mean, var, weight, bias, eps=eps, channel_axis=channel_axis,
                 activation=activation, negative_slope=negative_slope, inplace=inplace, eps_gamma=eps_gamma)


# ------------------------------------------------------------------------------------------ modules
class _InPlaceABN(_BatchNorm):
    """Base of InPlaceABN1d/2d/3d: _BatchNorm's state and checks, InPlace-ABN's maths."""

    _default_activation = "leaky_relu"

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
        activation: str = "leaky_relu",
        negative_slope: float = 0.01,
        inplace: bool = True,
        eps_gamma: float = 1e-5,
        channel_axis: int = 1,
        running_var_unbiased: bool = True,
        nonfinite: str = "update",
    ) -> None:
        op = type(self).__name__
        act, slope = _check_invertible(op, activation, negative_slope)
        eps_gamma = _check_eps_gamma(op, eps_gamma)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         channel_axis=channel_axis, running_var_unbiased=running_var_unbiased,
                         nonfinite=nonfinite, activation=act, negative_slope=slope)
        self.inplace = bool(inplace)
        self.eps_gamma = eps_gamma

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.activation == "identity":
            s += ", activation='identity'"
        if not self.inplace:
            s += ", inplace=False"
        if self.eps_gamma != 1e-5:
            s += f", eps_gamma={self.eps_gamma}"
        return s

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        op = type(self).__name__
        refuse_capture(op, input)  # (eval too: its |γ| + ε_γ scale and in-place write are not torch's BN)
        batch_stats = self._use_batch_stats()
        if isinstance(input, torch.Tensor) and input.numel() == 0:
            # an empty batch, train or eval: as BN (an empty output, zero dγ/dβ, state unchanged,
            # num_batches_tracked not bumped); a fresh tensor, nothing to write in place
            if not self.eps > 0:
                raise ValueError(f"{op}: eps must be positive, got eps={self.eps}")
            return self._forward_empty(input, batch_stats)
        x, axis = check_input(op, input, ranks=self._ranks, channel_axis=self.channel_axis,
                              num_features=self.num_features, training=batch_stats)
        if not batch_stats:
            return _eval(op, x, self.running_mean, self.running_var, self.weight, self.bias,
                         channel_axis=axis, activation=self.activation, negative_slope=self.negative_slope,
                         inplace=self.inplace, eps_gamma=self.eps_gamma, eps=self.eps)
        return self._train_step(functools.partial(_train, op), x, axis, inplace=self.inplace,
                                eps_gamma=self.eps_gamma)


class InPlaceABN1d(_InPlaceABN, nn.BatchNorm1d):
    """InPlace-ABN over ``(N, C)`` or ``(N, C, L)``: BN + invertible activation saving only its output.

    ``y = act(γ (x − E[x]) / sqrt(Var[x] + ε) + β)`` with ``act`` one of ``"leaky_relu"``
    (default, ``negative_slope=0.01``), ``"elu"`` (α = ``negative_slope``) or ``"identity"``.
    The backward recomputes what it needs from ``y`` (see :mod:`batchnorm.family.inplace`), so the layer
    keeps no copy of its input: about half the activation memory of BN + activation in a
    conv/BN/act network.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as
            ``torch.nn.BatchNorm1d`` (same state_dict keys; checkpoints load both ways).
        activation, negative_slope: the invertible activation (ReLU is rejected).
        inplace: write the output into the input's storage (default True).
        eps_gamma: the smallest ``|γ|`` used in forward and backward (default 1e-5).
        channel_axis, running_var_unbiased, nonfinite: see :mod:`batchnorm.core.modules`.

    Shape: input ``(N, C)`` or ``(N, C, L)``; output the same (the same tensor when inplace).

    Paper: Rota Bulò, Porzi, Kontschieder, "In-Place Activated BatchNorm for Memory-Optimized
    Training of DNNs", CVPR 2018.
    """

    _ranks = (2, 3)


class InPlaceABN2d(_InPlaceABN, nn.BatchNorm2d):
    """InPlace-ABN over ``(N, C, H, W)``; see :class:`InPlaceABN1d` and :mod:`batchnorm.family.inplace`.

    Example:
        >>> iabn = InPlaceABN2d(16, activation="leaky_relu", negative_slope=0.01)
        >>> x = torch.randn(4, 16, 8, 8)
        >>> y = iabn(x)          # y is x: the output overwrote the input
    """

    _ranks = (4,)


class InPlaceABN3d(_InPlaceABN, nn.BatchNorm3d):
    """InPlace-ABN over ``(N, C, D, H, W)``; see :class:`InPlaceABN1d`."""

    _ranks = (5,)
