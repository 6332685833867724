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


class _BatchNorm(nn.Module):
    """Base of every BN module here: owns γ/β, the running buffers and the flag checks.

    Disabled parameters and buffers are registered as None (``affine=False``,
    ``track_running_stats=False``), as in ``torch.nn.modules.batchnorm._NormBase``. Rank
    variants override only ``_ranks``.
    """

    _version = 2
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
        super().__init__()
        op = type(self).__name__
        self.num_features = check_num_features(op, num_features)
        self.eps = check_eps(op, eps)
        self.momentum = check_momentum(op, momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        if isinstance(channel_axis, bool) or not isinstance(channel_axis, int):
            raise TypeError(f"{op}: expected channel_axis to be an int (1 or -1), got {channel_axis!r}")
        self.channel_axis = channel_axis
        self.running_var_unbiased = bool(running_var_unbiased)
        self.nonfinite = check_nonfinite(op, nonfinite)
        act = self._default_activation if activation is None else activation
        self.activation, self.negative_slope = check_activation(op, act, negative_slope)
        factory = {"device": device, "dtype": dtype}
        if self.affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:  # torch >= 2.6: BatchNormNd(..., bias=False) keeps γ and drops β
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, **{k: v for k, v in factory.items() if k != "dtype"}),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    # -- state --------------------------------------------------------------------------------
    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batches tracked."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """γ = 1, β = 0 and fresh running statistics."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checkpoints from before num_batches_tracked existed (version < 2) keep the layer's current
        # count (0 for a fresh layer), exactly as torch's _NormBase does.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = (self.num_batches_tracked if self.num_batches_tracked is not None
                               and self.num_batches_tracked.device != torch.device("meta")
                               else torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

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


class BatchNorm1d(_BatchNorm):
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


class BatchNorm2d(_BatchNorm):
    """Batch Normalization over a 4-D ``(N, C, H, W)`` input (drop-in for ``torch.nn.BatchNorm2d``).

    Same formula, arguments and conventions as :class:`BatchNorm1d`; statistics per channel over
    N, H and W. Channels-last memory format works as is; a logically NHWC tensor needs
    ``channel_axis=-1``.

    Example:
        >>> bn = BatchNorm2d(16)
        >>> y = bn(torch.randn(8, 16, 5, 5))
    """

    _ranks = (4,)


class BatchNorm3d(_BatchNorm):
    """Batch Normalization over a 5-D ``(N, C, D, H, W)`` input (drop-in for ``torch.nn.BatchNorm3d``).

    Same formula, arguments and conventions as :class:`BatchNorm1d`.
    """

    _ranks = (5,)


class _BatchNormAct(_BatchNorm):
    _default_activation = "relu"


class BatchNormAct1d(_BatchNormAct):
    """BN fused with an activation, ``act(BN(x))``, over ``(N, C)`` or ``(N, C, L)``.

    ``activation`` is ``"relu"`` (default), ``"leaky_relu"`` (``negative_slope``), ``"elu"``
    (α = ``negative_slope``) or ``"identity"``. One op forward and one backward, with no
    intermediate tensor between BN and the activation; state_dict-compatible with BatchNorm1d.
    """

    _ranks = (2, 3)


class BatchNormAct2d(_BatchNormAct):
    """BN fused with an activation over ``(N, C, H, W)``; see :class:`BatchNormAct1d`.

    Example:
        >>> layer = BatchNormAct2d(16, activation="leaky_relu", negative_slope=0.1)
        >>> y = layer(torch.randn(4, 16, 8, 8))
    """

    _ranks = (4,)


class BatchNormAct3d(_BatchNormAct):
    """BN fused with an activation over ``(N, C, D, H, W)``; see :class:`BatchNormAct1d`."""

    _ranks = (5,)
