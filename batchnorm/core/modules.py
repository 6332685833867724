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

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.nn.modules.batchnorm import _NormBase

from .._checks import (
    check_activation,
    check_eps,
    check_input,
    check_mask,
    check_momentum,
    check_nonfinite,
    check_num_features,
)
from . import functional as F

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
        num_features = check_num_features(op, num_features)
        eps = check_eps(op, eps)
        momentum = check_momentum(op, momentum)
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
        """BN of ``input``; ``mask`` (bool, True = valid, the input's shape less the channel axis, e.g.
        ``(N, L)`` for ``(N, C, L)``) makes training statistics those of the valid positions only
        (masked BN for padded batches, see :func:`batchnorm.batch_norm_train`). In eval mode the
        running statistics normalise every position and the mask is only checked."""
        op = type(self).__name__
        batch_stats = self._use_batch_stats()
        x, axis = check_input(op, input, ranks=self._ranks, channel_axis=self.channel_axis,
                              num_features=self.num_features, training=batch_stats and mask is None)
        if mask is not None:
            return self._masked_forward(op, x, axis, mask, batch_stats)
        if not batch_stats:
            return F.batch_norm_eval(x, self.running_mean, self.running_var, self.weight, self.bias,
                                     eps=self.eps, channel_axis=axis, activation=self.activation,
                                     negative_slope=self.negative_slope)
        return self._train_step(F.batch_norm_train, x, axis, inplace_stats=True)

    def _masked_forward(self, op: str, x: torch.Tensor, axis: int, mask: torch.Tensor,
                        batch_stats: bool) -> torch.Tensor:
        if not batch_stats:
            check_mask(op, mask, x, axis)
            return F.batch_norm_eval(x, self.running_mean, self.running_var, self.weight, self.bias,
                                     eps=self.eps, channel_axis=axis, activation=self.activation,
                                     negative_slope=self.negative_slope)
        return self._train_step(F.batch_norm_train, x, axis, inplace_stats=True, mask=mask)

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
