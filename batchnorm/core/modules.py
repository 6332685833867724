"""Drop-in modules for ``torch.nn.BatchNorm1d/2d/3d`` and the fused ``BatchNormAct1d/2d/3d``.

The modules hold state and nothing else: ``forward`` turns the flags into arguments of
:mod:`batchnorm.core.functional` and copies the returned running statistics into the buffers under
``no_grad``. Constructor, buffers, ``state_dict`` keys (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``) and train/eval behaviour are PyTorch's, so a
``torch.nn.BatchNorm2d`` state_dict loads into :class:`BatchNorm2d` and back.

Extras, all keyword-only and off by default:

* ``channel_axis`` — the axis that holds channels (``-1`` for channels-last tensors such as NHWC);
* ``running_var_unbiased`` — what ``running_var`` stores (PyTorch: unbiased; Keras/Flax: biased);
* ``nonfinite`` — ``"update"`` (PyTorch), ``"skip"`` or ``"raise"`` for batches with NaN/Inf;
* :meth:`from_convention` — build a layer from Keras, Flax or Darknet conventions.
* ``forward(input, mask=)`` — masked BN for padded batches: training statistics of the valid
  positions only (see :func:`batchnorm.batch_norm_train`).

Conventions table (``momentum`` is always PyTorch's weight of the new batch)::

    convention  momentum  eps    running_var stores   source
    torch       0.1       1e-5   unbiased             torch.nn.BatchNorm2d
    keras       0.01      1e-3   biased               keras BatchNormalization(momentum=0.99)
    flax        0.01      1e-5   biased               flax.linen.BatchNorm(momentum=0.99)
    darknet     0.01      1e-6   unbiased             article 003: EMA with β = 0.99, ε = 0.000001

(Keras's and Flax's ``momentum=0.99`` is a *decay*: the weight of the old average.)
"""

from __future__ import annotations

import numbers
import operator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.nn.modules.batchnorm import _NormBase

from .. import kernels
from .._checks import (
    ACTIVATIONS,
    check_activation,
    check_input,
    check_input_shape,
    check_mask,
    check_momentum,
    check_nonfinite,
)
from ..kernels import native_backend, torch_backend
from . import functional as F
from .autograd import capturing

__all__ = [
    "CONVENTIONS",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
]

CONVENTIONS: dict[str, dict[str, Any]] = {
    "torch": {"momentum": 0.1, "eps": 1e-5, "running_var_unbiased": True},
    "keras": {"momentum": 0.01, "eps": 1e-3, "running_var_unbiased": False},
    "flax": {"momentum": 0.01, "eps": 1e-5, "running_var_unbiased": False},
    "darknet": {"momentum": 0.01, "eps": 1e-6, "running_var_unbiased": True},
}


def _ctor_numbers(op: str, num_features: object, eps: object,
                  momentum: object) -> tuple[int, float, float | None]:
    """The constructor's numbers, accepted as ``torch.nn.BatchNorm*`` accepts them.

    torch takes any integer-like ``num_features`` (``np.int64(4)``; 0 gives an empty layer), any
    ``eps`` (0 or negative only fails at a training forward: "eps must be positive") and any
    ``momentum`` (1.5 and negative values work: they extrapolate the running average). So do we,
    with these deliberate differences, each an earlier and clearer error than torch's: a bool,
    float or other non-integer ``num_features`` is a TypeError (torch: TypeError from
    ``torch.empty``), a negative one a ValueError (torch: RuntimeError "negative dimension");
    an ``eps`` or ``momentum`` that is not a real number is a TypeError here (torch: only at the
    first forward). ``eps ≤ 0`` raises at a forward that uses batch statistics, like torch's.
    """
    if isinstance(num_features, bool):
        raise TypeError(f"{op}: expected num_features to be an int, got the bool {num_features!r}")
    try:
        n = operator.index(num_features)
    except TypeError:
        raise TypeError(f"{op}: expected num_features to be an int, got {num_features!r} "
                        f"({type(num_features).__name__}); pass the number of channels C, e.g. "
                        f"x.shape[1]") from None
    if n < 0:
        raise ValueError(f"{op}: expected num_features >= 0, got {n}; pass the number of channels C of "
                         f"the input, e.g. x.shape[1]")
    for name, v in (("eps", eps), ("momentum", momentum)):
        if v is None and name == "momentum":
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{op}: expected {name} to be a real number{' or None' * (name == 'momentum')}, "
                            f"got {v!r}; typical values: eps=1e-5, momentum=0.1 (None: cumulative average)")
    return n, float(eps), None if momentum is None else float(momentum)


def _batch_norm_eager(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """``F.batch_norm``'s kernel call without its Python checks (ours ran before)."""
    return torch.batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps,
                            torch._C._get_cudnn_enabled())  # (= torch.backends.cudnn.enabled, 0.2 µs less)


def _attr_path(proxy: torch.fx.Proxy, module: nn.Module, name: str) -> str:
    """The qualified name of ``module``'s attribute ``name`` in the model an fx tracer is tracing."""
    path = proxy.tracer.path_of_module(module)
    return f"{path}.{name}" if path else name


class _BatchNorm(_TorchBatchNorm):
    """Base of every BN module here: owns γ/β, the running buffers and the flag checks.

    It *is* torch's ``torch.nn.modules.batchnorm._BatchNorm`` (and each rank class below is a
    ``torch.nn.BatchNorm1d/2d/3d``), so ``isinstance(layer, nn.BatchNorm2d)`` holds and every torch
    helper that looks for BN layers (weight-decay parameter groups, ``swa_utils.update_bn``,
    ``torch.func.replace_all_batch_norm_modules_``, timm's ``freeze_batch_norm_2d``, …) finds ours.
    Parameters, buffers, ``_version = 2`` and the state_dict upgrade of pre-``num_batches_tracked``
    checkpoints are torch's own ``_NormBase`` code; disabled parameters and buffers are registered
    as None (``affine=False``, ``track_running_stats=False``); the rank classes keep torch's
    ``_check_input_dim``. Rank variants override only ``_ranks``.
    """

    _ranks: tuple[int, ...] = (2, 3, 4, 5)
    _default_activation = "identity"

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
        bias: bool = True,
        channel_axis: int = 1,
        running_var_unbiased: bool = True,
        nonfinite: str = "update",
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> None:
        op = type(self).__name__
        # Validate everything before torch's constructor allocates anything.
        num_features, eps, momentum = _ctor_numbers(op, num_features, eps, momentum)
        if type(self).forward is not _BatchNorm.forward:  # a variant with its own maths (renorm, ghost,
            momentum = check_momentum(op, momentum)        # sync, ...): torch has no layer to match there
        if isinstance(channel_axis, bool) or not isinstance(channel_axis, int):
            raise TypeError(f"{op}: expected channel_axis to be an int (1 or -1), got {channel_axis!r}")
        nonfinite = check_nonfinite(op, nonfinite)
        act = self._default_activation if activation is None else activation
        act, slope = check_activation(op, act, negative_slope)
        # torch's _NormBase registers weight/bias/running_mean/running_var/num_batches_tracked exactly
        # as torch.nn.BatchNorm2d does (called directly: the next class in the MRO may be
        # nn.SyncBatchNorm, whose positional arguments differ).
        _NormBase.__init__(self, num_features, eps, momentum, bool(affine), bool(track_running_stats),
                           device, dtype, bias=bias)
        self.channel_axis = channel_axis
        self.running_var_unbiased = bool(running_var_unbiased)
        self.nonfinite = nonfinite
        self.activation, self.negative_slope = act, slope

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` compiles torch's own layer code in our place (numba kernels are not
        scriptable), sharing our parameters and buffers: see :class:`_ScriptableBatchNorm`. Refused,
        loudly, where torch's ``batch_norm`` would compute something else."""
        op = type(self).__name__
        if type(self).forward is not _BatchNorm.forward:
            raise RuntimeError(f"{op}: torch.jit.script cannot compile this BN variant (its forward is "
                               f"not torch's batch_norm); use torch.jit.trace in eval mode, or torch.export")
        if not self.running_var_unbiased or self.nonfinite != "update":
            raise RuntimeError(f"{op}: torch.jit.script compiles torch's batch_norm, which stores the "
                               f"unbiased running variance and folds NaN batches in; this layer has "
                               f"running_var_unbiased={self.running_var_unbiased}, "
                               f"nonfinite={self.nonfinite!r}")
        return _ScriptableBatchNorm(self)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        """torch's rank check, with torch's messages, for this class's ``_ranks`` (torch helpers call it)."""
        if input.dim() not in self._ranks:
            want = "at least 2D" if len(self._ranks) == 4 else " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(f"expected {want} input (got {input.dim()}D input)")

    def extra_repr(self) -> str:
        s = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
             f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}")
        if self.activation != "identity":
            s += f", activation={self.activation!r}"
            if self.activation in ("leaky_relu", "elu"):
                s += f", negative_slope={self.negative_slope}"
        if self.channel_axis != 1:
            s += f", channel_axis={self.channel_axis}"
        if not self.running_var_unbiased:
            s += ", running_var_unbiased=False"
        if self.nonfinite != "update":
            s += f", nonfinite={self.nonfinite!r}"
        return s

    # -- maths --------------------------------------------------------------------------------
    def _use_batch_stats(self) -> bool:
        return self.training or self.running_mean is None

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise ``input`` (see the class docstring); which code runs, fastest first:

        * while a graph is captured or a transform runs (``torch.jit.trace``/``script``, ``torch.export``,
          both ONNX exporters, ``torch.fx`` Proxies, ``torch.func`` transforms, forward-mode AD):
          torch's own ``F.batch_norm`` (+ the activation op), exactly what ``torch.nn.BatchNorm*``
          records (:meth:`_forward_captured`);
        * an empty batch: an empty output, statistics and parameters unchanged (:meth:`_forward_empty`);
        * with ``mask``: masked BN (below);
        * where :func:`batchnorm.kernels.select` picks the native backend (small inputs, CUDA, …) and
          the flags are torch's: torch's ``batch_norm`` called directly (:meth:`_forward_native`);
        * else the functional ops on the selected backend (numba kernels on CPU).

        ``mask`` (bool, True = valid, the input's shape less the channel axis, e.g. ``(N, L)`` for
        ``(N, C, L)``) makes training statistics those of the valid positions only (masked BN for
        padded batches, see :func:`batchnorm.batch_norm_train`). In eval mode the running statistics
        normalise every position and the mask is only checked. torch's ``batch_norm`` has no mask, so
        a masked call refuses to be captured rather than record something else.
        """
        compiling = torch.compiler.is_compiling()
        if type(input) is not torch.Tensor or capturing(compiling):
            if mask is not None:
                raise RuntimeError(f"{type(self).__name__}: a masked call cannot be captured as torch's "
                                   f"batch_norm, which has no mask; capture the model without mask=, or "
                                   f"run the masked step eagerly (or under torch.compile)")
            return self._forward_captured(input)
        if mask is None and not compiling:
            y = self._forward_fast(input)
            if y is not None:
                return y
        op = type(self).__name__
        # (the hot path reads parameters and buffers from the module's dicts: ``self.weight`` goes
        # through ``nn.Module.__getattr__``, ~1.7 µs a read, as much as a small layer's arithmetic)
        buffers = self.__dict__["_buffers"]
        batch_stats = self.training or buffers.get("running_mean") is None
        if not self.eps > 0 and (batch_stats or self.eps < 0):
            raise ValueError(f"{op}: eps must be positive when normalising with batch statistics (and >= 0 "
                             f"with running statistics), got eps={self.eps}; torch raises the same")
        if input.numel() == 0:
            if mask is not None:
                check_mask(op, mask, input, self._check_shape(op, input, False))
            return self._forward_empty(input, batch_stats)
        x, axis = check_input(op, input, ranks=self._ranks, channel_axis=self.channel_axis,
                              num_features=self.num_features, training=batch_stats and mask is None)
        if mask is not None:
            return self._masked_forward(op, x, axis, mask, batch_stats)
        if not compiling and self._runs_native(x, axis, batch_stats):  # (compiled:
            # our custom ops stay whole in the graph; they dispatch to the same backends inside)
            return self._forward_native(x, axis, batch_stats, _batch_norm_eager, inplace_act=True)
        if not batch_stats:
            return F.batch_norm_eval(x, self.running_mean, self.running_var, self.weight, self.bias,
                                     eps=self.eps, channel_axis=axis, activation=self.activation,
                                     negative_slope=self.negative_slope)
        return self._train_step(F.batch_norm_train, x, axis, inplace_stats=True)

    def _forward_fast(self, x: torch.Tensor, res: torch.Tensor | None = None) -> torch.Tensor | None:
        """The common call on the native path — a small input (or a device without our kernels), the
        channels on axis 1, torch's flags — accepted after about 1 µs of checks instead of the general
        path's 3 µs (at 13 µs for a whole ``BatchNorm2d(16)`` eval call on 8×16×8×8, that glue is what
        made small layers slower than torch's). Returns None for anything else, and the general path
        then runs every check, raising its errors: this one only ever accepts what it would accept and
        route to :meth:`_forward_native` (``tests/core/test_core_native.py`` checks the two agree).
        ``res``: the residual of ``act(BN(x) + res)`` (:mod:`batchnorm.core.residual`), which must
        then be a plain tensor of x's shape, dtype and device."""
        choice = kernels._choice
        act = self.activation
        # (the piecewise-linear activations go where the dispatcher says; the smooth ones, silu, gelu, …,
        # run torch's kernel and activation op at every size: see _runs_native)
        piecewise = act in native_backend.ACTIVATIONS
        if (self.channel_axis != 1 or choice not in ("auto", "native") or x.ndim not in self._ranks
                or not (piecewise or act in ACTIVATIONS) or not x.is_floating_point()):
            return None
        bufs = self.__dict__["_buffers"]
        rm = bufs.get("running_mean")
        training = self.training
        batch_stats = training or rm is None
        n, c = x.numel(), x.shape[1]
        eps, m = self.eps, self.momentum
        if (c != self.num_features or n == 0 or not eps > 0 or (m is not None and not 0.0 <= m <= 1.0)
                or (batch_stats and n // c <= 1)):
            return None
        if choice == "auto" and piecewise and x.is_cpu:
            mode = "train" if batch_stats else "eval"
            if n >= kernels.NATIVE_BELOW[mode] and kernels.select(x, 1, act, mode) is not native_backend:
                return None  # (our kernels run this one)
        if not self._params_match(x) or not self._torch_flags(batch_stats):
            return None
        if not batch_stats and x.dtype != torch.float64 and not self._well_conditioned():
            return None
        if res is not None and (type(res) is not torch.Tensor or res.shape != x.shape or res.dtype != x.dtype
                                or res.device != x.device):
            return None
        return self._forward_native(x, 1, batch_stats, _batch_norm_eager, inplace_act=True, res=res)

    def _masked_forward(self, op: str, x: torch.Tensor, axis: int, mask: torch.Tensor,
                        batch_stats: bool) -> torch.Tensor:
        if not batch_stats:
            check_mask(op, mask, x, axis)
            return F.batch_norm_eval(x, self.running_mean, self.running_var, self.weight, self.bias,
                                     eps=self.eps, channel_axis=axis, activation=self.activation,
                                     negative_slope=self.negative_slope)
        return self._train_step(F.batch_norm_train, x, axis, inplace_stats=True, mask=mask)

    def _torch_flags(self, batch_stats: bool) -> bool:
        """Whether torch's ``batch_norm`` computes exactly this layer's step: always in inference; in a
        training step that updates running statistics only with torch's conventions (unbiased
        running variance, NaN batches folded in)."""
        if not (batch_stats and self.training and self.track_running_stats
                and self.__dict__["_buffers"].get("running_mean") is not None):  # (no __getattr__: hot path)
            return True
        return self.running_var_unbiased and self.nonfinite == "update"

    def _runs_native(self, x: torch.Tensor, axis: int, batch_stats: bool) -> bool:
        m = self.momentum
        if m is not None and not 0.0 <= m <= 1.0:  # torch accepts any momentum: so does its layer code
            if not self._torch_flags(batch_stats):
                raise ValueError(f"{type(self).__name__}: momentum={m} outside [0, 1] runs torch's own layer "
                                 f"code, which cannot express running_var_unbiased=False or nonfinite="
                                 f"{self.nonfinite!r}; use a momentum in [0, 1]")
            return True
        # (this path applies the activation as torch's own op, autograd included, so any activation
        # runs here. The smooth ones (silu, gelu, …), which native_backend's functions lack, run here
        # under auto at every size: torch's batch_norm + its activation op measured 1.2-5x faster than
        # our fused numba kernels for them up to 2^23 values, `benchmarks/crossover.py --acts silu`)
        act = self.activation
        if act in native_backend.ACTIVATIONS:
            if kernels.select(x, axis, act, "train" if batch_stats else "eval") is not native_backend:
                return False
        elif (kernels.get_backend() not in ("auto", "native")
              or not native_backend.supports(x, axis, "identity")):
            return False
        if not self._params_match(x):
            return False  # mixed dtypes/devices: the functional path casts or explains
        if not batch_stats and x.dtype != torch.float64 and not self._well_conditioned():
            return False  # |running mean| ≫ std: torch's folded normalisation would lose digits
        return self._torch_flags(batch_stats)

    def _params_match(self, x: torch.Tensor) -> bool:
        """Whether γ (else the running mean) has x's dtype and device, as torch's kernel needs."""
        p = self.__dict__["_parameters"].get("weight")
        if p is None:
            p = self.__dict__["_buffers"].get("running_mean")
        return p is None or (p.dtype == x.dtype and p.device == x.device)

    def _well_conditioned(self) -> bool:
        """Whether torch's kernel normalises with the running statistics as accurately as ours
        (``max |running_mean| / sqrt(running_var + ε)`` ≤ ``native_backend.MAX_SHIFT``; the answer is
        cached there until the buffers change, so eval pays for it once)."""
        buffers = self.__dict__["_buffers"]
        return not native_backend.ill_conditioned(buffers["running_mean"], buffers["running_var"], self.eps)

    def _forward_native(self, x, axis: int, batch_stats: bool, batch_norm, inplace_act: bool, res=None):
        """torch's ``_BatchNorm.forward`` (same statements, same order, same numbers) on channels moved
        to axis 1, then the activation; ``batch_norm`` is ``F.batch_norm`` while capturing (the op a
        tracer records) or ``torch.batch_norm`` eagerly (the same kernel, without F's Python checks:
        the input was validated already, before anything was written). ``res`` (channels on axis 1,
        x's shape): added before the activation, in place on the fresh output when ``inplace_act`` —
        torch's ``bn2 → += identity → relu`` ops, autograd included."""
        training, momentum = self.training, self.momentum
        bufs, params = self.__dict__["_buffers"], self.__dict__["_parameters"]  # (see forward)
        factor = 0.0 if momentum is None else momentum
        if training and self.track_running_stats and bufs.get("num_batches_tracked") is not None:
            nbt = bufs["num_batches_tracked"]
            if isinstance(x, torch.fx.Proxy):  # record the count's update in the fx graph too
                nbt = x.tracer.create_proxy("get_attr", _attr_path(x, self, "num_batches_tracked"), (), {})
            nbt.add_(1)
            if momentum is None:
                factor = 1.0 / float(nbt)
        use_buffers = not training or self.track_running_stats
        xv = x if axis == 1 else x.movedim(axis, 1)
        y = batch_norm(xv, bufs.get("running_mean") if use_buffers else None,
                       bufs.get("running_var") if use_buffers else None,
                       params.get("weight"), params.get("bias"), batch_stats, factor, self.eps)
        if res is not None:
            y = y.add_(res) if inplace_act else y + res
        return self._activate(y if axis == 1 else y.movedim(1, axis), inplace_act)

    def _activate(self, y, inplace: bool):
        """The fused activation as torch's op: in place on a fresh eager output where torch has such an
        op (torch's BN backward reads x, not y; :func:`batchnorm.kernels.torch_backend.act_forward_`),
        out of place while capturing."""
        fn = torch_backend.act_forward_ if inplace else torch_backend.act_forward
        return fn(y, self.activation, self.negative_slope)

    def _forward_captured(self, input):
        """The forward as torch's standard ops, for tracers and transforms (see :meth:`forward`)."""
        op = type(self).__name__
        proxy = isinstance(input, torch.fx.Proxy)
        if not proxy and not isinstance(input, torch.Tensor):
            check_input(op, input)  # raises the usual TypeError
        batch_stats = self.training or self.running_mean is None
        if not self._torch_flags(batch_stats):
            if not proxy and not torch.compiler.is_compiling() and not torch._C._is_tracing():
                # a functorch transform or a tensor subclass: the functional path runs the composite
                # ops (which may refuse loudly, e.g. vmap cannot write batched statistics into
                # unbatched buffers)
                return self._train_step(F.batch_norm_train, input, self._check_shape(op, input, True))
            raise RuntimeError(
                f"{op}: this training step cannot be captured as torch's batch_norm, which stores the "
                f"unbiased running variance and folds NaN batches in (this layer: running_var_unbiased="
                f"{self.running_var_unbiased}, nonfinite={self.nonfinite!r}); capture the model in eval "
                f"mode, or build the layer with running_var_unbiased=True, nonfinite='update'")
        if proxy:
            if self.momentum is None and self.training and self.track_running_stats:
                raise RuntimeError(f"{op}: torch.fx cannot record momentum=None (the cumulative average "
                                   f"reads the batch count as a Python number); trace in eval mode or "
                                   f"set a momentum")
            axis = self.channel_axis
        elif torch._C._is_tracing():  # sizes are traced values here: torch's own rank check only (a
            self._check_input_dim(input)  # wrong channel count fails in F.batch_norm, loudly)
            axis = self.channel_axis % input.dim()
        elif 0 in input.shape:
            axis = self._check_shape(op, input, False)
        else:  # (not the meta stand-in: torch.export would record its allocation)
            axis = check_input(op, input, ranks=self._ranks, channel_axis=self.channel_axis,
                               num_features=self.num_features, training=batch_stats)[1]
        # (traced: F.batch_norm's batch-size check would turn traced sizes into Python bools; the op
        # recorded is the same aten::batch_norm)
        fn = _batch_norm_eager if not proxy and torch._C._is_tracing() else nn.functional.batch_norm
        return self._forward_native(input, axis, batch_stats, fn, inplace_act=False)

    def _check_shape(self, op: str, input: torch.Tensor, batch_stats: bool) -> int:
        """:func:`batchnorm._checks.check_input_shape` for this layer (tracers, empty batches)."""
        return check_input_shape(op, input, ranks=self._ranks, channel_axis=self.channel_axis,
                                 num_features=self.num_features, training=batch_stats)

    def _forward_empty(self, input: torch.Tensor, batch_stats: bool) -> torch.Tensor:
        """An empty batch (``N = 0``, e.g. a detection head without proposals): an empty output connected
        to the graph (the backward gives an empty ``dx`` and zero ``dγ``, ``dβ``), running statistics
        untouched. Unlike torch, ``num_batches_tracked`` is *not* incremented: no batch was seen, and
        with ``momentum=None`` a bumped count would give every later batch a smaller weight in the
        cumulative average."""
        op = type(self).__name__
        axis = self._check_shape(op, input, False)
        if input.shape[axis] == 0:  # no channels at all: nothing to normalise (torch's kernel indexes γ[0])
            return input.clone()
        xv = input.movedim(axis, 1)
        w, b = self.weight, self.bias
        w = w if w is None or w.dtype == input.dtype else w.to(input.dtype)
        b = b if b is None or b.dtype == input.dtype else b.to(input.dtype)
        y = nn.functional.batch_norm(xv, None, None, w, b, True, 0.0, 1e-5)
        return self._activate(y.movedim(1, axis), inplace=False)

    def _train_step(self, fn, x: torch.Tensor, axis: int, **extra: Any) -> torch.Tensor:
        """Run a training-mode functional op (state in, state out) with this layer's flags.

        Every BN variant goes through here: ``fn(x, running_mean, running_var, weight, bias, **flags,
        **extra)`` must return ``(y, RunningStats)``; the returned statistics are stored in the
        buffers. As torch: with buffers present but ``track_running_stats`` switched off (or in
        eval without buffers) batch statistics are used and nothing is updated.
        """
        track = self.training and self.track_running_stats and self.running_mean is not None
        y, new = fn(
            x,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=self.num_batches_tracked if track else None,
            channel_axis=axis,
            activation=self.activation,
            negative_slope=self.negative_slope,
            running_var_unbiased=self.running_var_unbiased,
            nonfinite=self.nonfinite,
            **extra,
        )
        if track:
            self._store_running_stats(new)
        return y

    def _store_running_stats(self, new: F.RunningStats) -> None:
        """Copy a step's returned statistics into the buffers (in place, so references stay valid).

        The functional ops return the very buffer tensors when nothing changed (a skipped batch) or
        when they wrote into them (``batch_norm_train(inplace_stats=True)``, the plain layers' path),
        in which case there is nothing to copy.
        """
        if new.mean is self.running_mean:
            return
        with torch.no_grad():
            self.running_mean.copy_(new.mean)
            self.running_var.copy_(new.var)
            self.num_batches_tracked.copy_(new.num_batches_tracked)

    # -- conventions --------------------------------------------------------------------------
    @classmethod
    def from_convention(cls, convention: str, num_features: int, **kwargs: Any) -> _BatchNorm:
        """Build a layer with another framework's defaults, spelled in PyTorch's terms.

        ``convention`` is one of ``"torch"``, ``"keras"``, ``"flax"``, ``"darknet"`` (see the module
        docstring's table). Keyword arguments override the convention, and ``decay=`` (Keras/Flax's
        ``momentum``, the weight of the old average) is accepted and turned into
        ``momentum = 1 − decay``.

        Example:
            >>> bn = BatchNorm2d.from_convention("keras", 32)          # decay 0.99, eps 1e-3
            >>> (bn.momentum, bn.eps, bn.running_var_unbiased)
            (0.01, 0.001, False)
        """
        if convention not in CONVENTIONS:
            raise ValueError(f"{cls.__name__}.from_convention: unknown convention {convention!r}; "
                             f"expected one of {sorted(CONVENTIONS)}")
        args = dict(CONVENTIONS[convention])
        if "decay" in kwargs:
            decay = kwargs.pop("decay")
            if "momentum" in kwargs:
                raise ValueError(f"{cls.__name__}.from_convention: give decay or momentum, not both")
            if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 <= decay <= 1:
                raise ValueError(f"{cls.__name__}.from_convention: expected decay in [0, 1], got {decay!r}")
            args["momentum"] = 1.0 - float(decay)
        args.update(kwargs)
        return cls(num_features, **args)


class _ScriptableBatchNorm(_TorchBatchNorm):
    """What ``torch.jit.script`` compiles in place of one of our layers (see ``__prepare_scriptable__``).

    A torch ``_BatchNorm`` holding the *very* parameters and buffers of our layer (so a scripted
    model trains the same tensors and has the same state_dict keys) whose ``forward`` is torch's,
    statement for statement, plus the channel move and the fused activation as torch ops; every
    flag is a TorchScript constant, so the compiled graph has no branches left.
    """

    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine",  # noqa: RUF012
                     "channel_axis", "activation", "negative_slope", "min_dim", "max_dim", "want"]
    channel_axis: int
    activation: str
    negative_slope: float
    min_dim: int
    max_dim: int
    want: str

    def __init__(self, src: _BatchNorm) -> None:
        nn.Module.__init__(self)
        for name in ("num_features", "eps", "momentum", "affine", "track_running_stats", "channel_axis",
                     "activation", "negative_slope", "training"):
            setattr(self, name, getattr(src, name))
        self.min_dim, self.max_dim = min(src._ranks), max(src._ranks)
        self.want = ("at least 2D" if len(src._ranks) == 4 else " or ".join(f"{r}D" for r in src._ranks))
        for name in ("weight", "bias"):
            self.register_parameter(name, getattr(src, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(src, name))

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < self.min_dim or input.dim() > self.max_dim:
            raise ValueError(f"expected {self.want} input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        exponential_average_factor = 0.0
        if self.momentum is not None:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
            else:
                exponential_average_factor = self.momentum
        bn_training = True if self.training else (self.running_mean is None) and (self.running_var is None)
        x = input
        if self.channel_axis != 1:
            x = x.movedim(self.channel_axis, 1)
        y = nn.functional.batch_norm(
            x, self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, exponential_average_factor, self.eps)
        if self.channel_axis != 1:
            y = y.movedim(1, self.channel_axis)
        if self.activation == "relu":
            y = nn.functional.relu(y)
        elif self.activation == "leaky_relu":
            y = nn.functional.leaky_relu(y, self.negative_slope)
        elif self.activation == "elu":
            y = nn.functional.elu(y, self.negative_slope)
        return y


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    """Batch Normalization over a 2-D ``(N, C)`` or 3-D ``(N, C, L)`` input (drop-in for torch's).

    .. math:: y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}} \\gamma + \\beta

    Statistics are per channel over the batch (and length); the biased variance normalises, the
    running variance stores the unbiased one by default. In eval mode the running estimates are
    used instead (unless ``track_running_stats=False``).

    Args:
        num_features: C.
        eps: added to the variance inside the square root. Default 1e-5.
        momentum: weight of the new batch in the running estimates (PyTorch convention); None
            for a cumulative average. Default 0.1.
        affine: learnable γ (init 1) and β (init 0). Default True.
        bias: with ``affine``, whether β exists (keyword-only, as in torch). Default True.
        track_running_stats: keep running estimates (used in eval). Default True.
        channel_axis, running_var_unbiased, nonfinite: see :mod:`batchnorm.core.modules`.

    Shape: input ``(N, C)`` or ``(N, C, L)``; output the same.

    Example:
        >>> bn = BatchNorm1d(100)
        >>> y = bn(torch.randn(20, 100))

    Paper: Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
    Internal Covariate Shift", ICML 2015.
    """

    _ranks = (2, 3)


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    """Batch Normalization over a 4-D ``(N, C, H, W)`` input (drop-in for ``torch.nn.BatchNorm2d``).

    Same formula, arguments and conventions as :class:`BatchNorm1d`; statistics per channel over
    N, H and W. Channels-last memory format works as is; a logically NHWC tensor needs
    ``channel_axis=-1``.

    Example:
        >>> bn = BatchNorm2d(16)
        >>> y = bn(torch.randn(8, 16, 5, 5))
    """

    _ranks = (4,)


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    """Batch Normalization over a 5-D ``(N, C, D, H, W)`` input (drop-in for ``torch.nn.BatchNorm3d``).

    Same formula, arguments and conventions as :class:`BatchNorm1d`.
    """

    _ranks = (5,)


class _BatchNormAct(_BatchNorm):
    _default_activation = "relu"


class BatchNormAct1d(_BatchNormAct, nn.BatchNorm1d):
    """BN fused with an activation, ``act(BN(x))``, over ``(N, C)`` or ``(N, C, L)``.

    ``activation`` is ``"relu"`` (default), ``"leaky_relu"`` (``negative_slope``), ``"elu"``
    (α = ``negative_slope``) or ``"identity"``. One op forward and one backward, with no
    intermediate tensor between BN and the activation; state_dict-compatible with BatchNorm1d.
    """

    _ranks = (2, 3)


class BatchNormAct2d(_BatchNormAct, nn.BatchNorm2d):
    """BN fused with an activation over ``(N, C, H, W)``; see :class:`BatchNormAct1d`.

    Example:
        >>> layer = BatchNormAct2d(16, activation="leaky_relu", negative_slope=0.1)
        >>> y = layer(torch.randn(4, 16, 8, 8))
    """

    _ranks = (4,)


class BatchNormAct3d(_BatchNormAct, nn.BatchNorm3d):
    """BN fused with an activation over ``(N, C, D, H, W)``; see :class:`BatchNormAct1d`."""

    _ranks = (5,)
