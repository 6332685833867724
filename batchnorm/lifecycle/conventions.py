"""Load (and export) BN parameters and statistics written in Keras, Flax or Darknet conventions.

The hyper-parameter conventions (momentum as PyTorch's weight of the new batch, ε, what
``running_var`` stores) are :data:`batchnorm.core.modules.CONVENTIONS`; this module adds the names the
frameworks give the four per-channel arrays, and the conversions between them:

    ==========  =======  ======  ============  ================  ====  =====  ===========
    convention  γ        β       mean          variance          ε     decay  variance is
    ==========  =======  ======  ============  ================  ====  =====  ===========
    torch       weight   bias    running_mean  running_var       1e-5  0.9    unbiased
    keras       gamma    beta    moving_mean   moving_variance   1e-3  0.99   biased
    flax        scale    bias    mean          var               1e-5  0.99   biased
    darknet     scales   biases  rolling_mean  rolling_variance  1e-6  0.99   unbiased
    ==========  =======  ======  ============  ================  ====  =====  ===========

(``decay`` = Keras/Flax's ``momentum`` = 1 − PyTorch's ``momentum``. Flax keeps γ/β under ``params``
and the statistics under ``batch_stats``; a nested dict is accepted. Keras's ``layer.get_weights()``
order is ``[gamma, beta, moving_mean, moving_variance]``; a Darknet ``.weights`` file stores
``biases, scales, rolling_mean, rolling_variance`` before the convolution weights — lists in those
orders are accepted.)

**The biased/unbiased variance question, decided.** Keras and Flax average the *biased* batch variance
``M2/n`` into their moving variance; PyTorch and Darknet average the *unbiased* ``M2/(n − 1)``.
Turning one into the other needs ``n`` — the number of values per channel in each training batch
(batch size × spatial size), which the checkpoint does not record. At inference every framework plugs
the stored number straight into ``sqrt(var + ε)``, so the right move is to **keep the stored value**
(eval outputs then match the source framework exactly) and to make the layer **store future updates in
the source's convention**: :func:`load_convention` sets ``running_var_unbiased`` accordingly on our
modules. ``torch.nn.BatchNorm*`` cannot store a biased variance, so loading a biased one into it is an
error unless you give ``batch_values=n`` (then ``var · n/(n − 1)`` is stored) or
``set_conventions=False`` (copy the numbers, accept mixed conventions if you train on).

**ε matters**: it is part of the inference formula. Give the source layer's ``eps`` (Keras
``keras.applications`` ResNets use 1.001e-5, not the 1e-3 default). Original (pjreddie) Darknet adds
ε *outside* the square root, ``(x − μ)/(sqrt(σ²) + 1e-6)`` (AlexeyAB's fork and article 003 put it
inside); ``eps_outside_sqrt=True`` reproduces it exactly by storing ``(sqrt(σ²) + ε)²`` with ``eps=0``.

Example:
    >>> keras_bn = {"gamma": g, "beta": b, "moving_mean": m, "moving_variance": v}
    >>> bn = BatchNorm2d(64)
    >>> load_convention(bn, keras_bn, "keras", eps=1.001e-5)      # also momentum 0.01, biased var
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core import _bnlayers
from ..core.modules import CONVENTIONS, _BatchNorm

__all__ = ["KEY_NAMES", "export_convention", "load_convention"]

#: Per convention: our state name -> the framework's name for it.
KEY_NAMES: dict[str, dict[str, str]] = {
    "torch": {"weight": "weight", "bias": "bias", "running_mean": "running_mean",
              "running_var": "running_var"},
    "keras": {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
              "running_var": "moving_variance"},
    "flax": {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"},
    "darknet": {"weight": "scales", "bias": "biases", "running_mean": "rolling_mean",
                "running_var": "rolling_variance"},
}
# list orders accepted for the frameworks that have a natural one
_LIST_ORDER = {
    "keras": ("weight", "bias", "running_mean", "running_var"),    # layer.get_weights()
    "darknet": ("bias", "weight", "running_mean", "running_var"),  # .weights file
}


def _check_convention(op: str, convention: object) -> str:
    if convention not in KEY_NAMES or convention not in CONVENTIONS:
        raise ValueError(f"{op}: unknown convention {convention!r}; expected one of {sorted(KEY_NAMES)}")
    return str(convention)


def _check_bn(op: str, bn: object) -> nn.Module:
    if not isinstance(bn, nn.Module) or not _bnlayers.is_bn(bn):
        raise TypeError(f"{op}: expected a batch-norm layer (ours or torch.nn.BatchNorm*), got "
                        f"{type(bn).__name__}; for a whole model, call it per layer")
    if getattr(bn, "running_mean", None) is None:
        raise ValueError(f"{op}: {type(bn).__name__} has no running statistics (track_running_stats=False)")
    return bn


def _check_n(op: str, batch_values: object) -> int | None:
    if batch_values is None:
        return None
    if isinstance(batch_values, bool) or not isinstance(batch_values, int) or batch_values < 2:
        raise ValueError(f"{op}: expected batch_values to be an int >= 2 (values per channel in one training "
                         f"batch: batch size x spatial size), got {batch_values!r}")
    return batch_values


def _flatten(op: str, params: object, convention: str) -> dict[str, Any]:
    if isinstance(params, Mapping):
        flat: dict[str, Any] = {}
        for k, v in params.items():
            if isinstance(v, Mapping):  # flax: {"params": {...}, "batch_stats": {...}}
                for k2, v2 in v.items():
                    if k2 in flat:
                        raise ValueError(f"{op}: key {k2!r} appears twice in the nested params")
                    flat[k2] = v2
            else:
                if k in flat:
                    raise ValueError(f"{op}: key {k!r} appears twice in the nested params")
                flat[k] = v
        return flat
    if isinstance(params, Sequence) and not isinstance(params, str | bytes):
        order = _LIST_ORDER.get(convention)
        if order is None or len(params) != 4:
            have = " or ".join(f"{c}: {[KEY_NAMES[c][o] for o in _LIST_ORDER[c]]}" for c in _LIST_ORDER)
            raise ValueError(f"{op}: a list of arrays is accepted only for keras/darknet with 4 entries "
                             f"({have}); got {len(params)} entries for {convention!r}; pass a dict of names")
        names = KEY_NAMES[convention]
        return {names[o]: a for o, a in zip(order, params)}
    raise TypeError(f"{op}: expected params to be a dict of arrays (or a list for keras/darknet), got "
                    f"{type(params).__name__}")


def _as_f64(op: str, name: str, value: object, c: int) -> torch.Tensor:
    try:
        raw = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
        if raw.dtype.kind == "c":  # the cast would drop the imaginary part (with only a ComplexWarning)
            raise TypeError(f"{op}: {name!r} is complex ({raw.dtype}); BN parameters are real numbers: "
                            f"pass np.real(...) if the real part is what you mean")
        if raw.dtype.kind not in "biuf":
            raise TypeError(f"{op}: {name!r} is not an array of numbers ({type(value).__name__}, dtype "
                            f"{raw.dtype})")
        arr = raw.astype(np.float64)
    except TypeError as e:
        if str(e).startswith(op):
            raise
        raise TypeError(f"{op}: {name!r} is not an array of numbers ({type(value).__name__})") from None
    except ValueError:
        raise TypeError(f"{op}: {name!r} is not an array of numbers ({type(value).__name__})") from None
    if arr.shape != (c,):
        raise ValueError(f"{op}: expected {name!r} of shape ({c},) for a layer with {c} channels, got shape "
                         f"{arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{op}: {name!r} contains NaN or Inf")
    return torch.from_numpy(arr.copy())


def load_convention(
    bn: nn.Module,
    params: Mapping[str, Any] | Sequence[Any],
    convention: str,
    *,
    eps: float | None = None,
    decay: float | None = None,
    batch_values: int | None = None,
    set_conventions: bool = True,
    eps_outside_sqrt: bool = False,
) -> nn.Module:
    """Copy γ, β and the moving statistics given in another framework's convention into ``bn``.

    Args:
        bn: our BN module or a ``torch.nn.BatchNorm*`` (any rank), with running statistics.
        params: arrays (NumPy, torch, lists) of shape (C,) named as in the module table, a nested Flax
            dict, or a keras/darknet list in the documented order. A missing γ means 1 (Keras
            ``scale=False``), a missing β 0 (``center=False``); unknown names are an error.
        convention: ``"keras"``, ``"flax"``, ``"darknet"`` or ``"torch"``.
        eps: the source layer's ε (default: the convention's). Set on the layer.
        decay: the source's decay (Keras/Flax ``momentum``), set as ``momentum = 1 − decay``
            (default: the convention's).
        batch_values: values per channel ``n`` of the source's training batches; when given, the
            variance is converted to the layer's *current* convention (× n/(n − 1) or its inverse)
            and ``running_var_unbiased`` is left alone.
        set_conventions: set ``eps``, ``momentum`` and (ours) ``running_var_unbiased`` from the
            convention (default True); False copies only the numbers.
        eps_outside_sqrt: the source computes ``(x − μ)/(sqrt(σ²) + ε)`` (original Darknet): store
            ``(sqrt(σ²) + ε)²`` and set ``eps = 0``, which is exact at inference.

    Returns ``bn``. Everything is validated before anything is written: on error ``bn`` is unchanged.
    ``num_batches_tracked`` is left as it is.
    """
    op = "load_convention"
    bn = _check_bn(op, bn)
    convention = _check_convention(op, convention)
    n = _check_n(op, batch_values)
    conv = CONVENTIONS[convention]
    names = KEY_NAMES[convention]
    flat = _flatten(op, params, convention)
    ours = {v: k for k, v in names.items()}
    unknown = [k for k in flat if k not in ours]
    if unknown:
        raise ValueError(f"{op}: unknown names {unknown} for the {convention} convention; expected "
                         f"{list(names.values())}")
    for stat in ("running_mean", "running_var"):
        if names[stat] not in flat:
            raise ValueError(f"{op}: {names[stat]!r} is missing; the {convention} convention names the "
                             f"statistics {names['running_mean']!r} and {names['running_var']!r}")
    c = int(bn.num_features)
    values = {ours[k]: _as_f64(op, k, v, c) for k, v in flat.items()}
    if not bn.affine and ("weight" in values or "bias" in values):
        raise ValueError(f"{op}: the layer has affine=False but params give {names['weight']!r}/"
                         f"{names['bias']!r}; build the layer with affine=True")
    if bool((values["running_var"] < 0).any()):
        raise ValueError(f"{op}: {names['running_var']!r} has negative entries; a variance is >= 0")
    new_eps = conv["eps"] if eps is None else eps
    if isinstance(new_eps, bool) or not isinstance(new_eps, int | float) or not (math.isfinite(new_eps)
                                                                                and new_eps >= 0):
        raise ValueError(f"{op}: expected eps to be a number >= 0, got {eps!r}")
    if decay is not None and (isinstance(decay, bool) or not isinstance(decay, int | float)
                              or not 0 <= decay <= 1):
        raise ValueError(f"{op}: expected decay in [0, 1] (Keras/Flax momentum, e.g. 0.99), got {decay!r}")
    new_momentum = conv["momentum"] if decay is None else 1.0 - float(decay)
    source_unbiased = bool(conv["running_var_unbiased"])
    updates = hasattr(bn, "momentum")  # FrozenBatchNorm never updates: its convention is moot
    can_switch = isinstance(bn, _BatchNorm)
    target_unbiased = _bnlayers.running_var_unbiased(bn)
    var = values["running_var"]
    set_flag = False
    if n is not None:
        if source_unbiased and not target_unbiased:
            var = var * ((n - 1) / n)
        elif not source_unbiased and target_unbiased:
            var = var * (n / (n - 1))
    elif set_conventions and source_unbiased != target_unbiased and updates:
        if not can_switch:
            raise ValueError(
                f"{op}: the {convention} moving variance is {'un' if source_unbiased else ''}biased, but "
                f"{type(bn).__name__} stores the {'un' if target_unbiased else ''}biased variance and has no "
                f"switch for it. Convert the layer to ours (batchnorm.convert_to_batchnorm), or pass "
                f"batch_values=n (values per channel per training batch) to convert the number, or "
                f"set_conventions=False to copy it as is (eval outputs are identical)")
        set_flag = True
    if eps_outside_sqrt:
        var = (torch.sqrt(var) + float(new_eps)) ** 2
        new_eps = 0.0
    # -- write (all checks done) --
    with torch.no_grad():
        bn.running_mean.copy_(values["running_mean"].to(bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.dtype))
        if bn.affine:
            bn.weight.copy_(values.get("weight", torch.ones(c, dtype=torch.float64)).to(bn.weight.dtype))
            bn.bias.copy_(values.get("bias", torch.zeros(c, dtype=torch.float64)).to(bn.bias.dtype))
    if set_conventions or eps_outside_sqrt:
        bn.eps = float(new_eps)
    if set_conventions:
        if hasattr(bn, "momentum"):
            bn.momentum = new_momentum
        if set_flag:
            bn.running_var_unbiased = source_unbiased
    return bn


def export_convention(bn: nn.Module, convention: str, *, batch_values: int | None = None
                      ) -> dict[str, np.ndarray]:
    """γ, β and the running statistics of ``bn`` as float64 NumPy arrays named for ``convention``.

    The variance is exported in the target convention: when the layer stores the other kind, give
    ``batch_values=n`` to convert it (see the module docstring); otherwise that is a ValueError.
    Pair it with ``eps=bn.eps`` and ``decay=1 − bn.momentum`` in the target framework. A layer without
    γ/β exports ones/zeros.
    """
    op = "export_convention"
    bn = _check_bn(op, bn)
    convention = _check_convention(op, convention)
    n = _check_n(op, batch_values)
    names = KEY_NAMES[convention]
    c = int(bn.num_features)
    target_unbiased = bool(CONVENTIONS[convention]["running_var_unbiased"])
    source_unbiased = _bnlayers.running_var_unbiased(bn)
    var = bn.running_var.detach().to("cpu", torch.float64).numpy().copy()
    if source_unbiased != target_unbiased:
        if n is None:
            raise ValueError(f"{op}: the layer stores the {'un' if source_unbiased else ''}biased running "
                             f"variance but {convention} expects the {'un' if target_unbiased else ''}biased "
                             f"one; pass batch_values=n (values per channel per training batch) to convert")
        var = var * ((n - 1) / n if source_unbiased else n / (n - 1))

    def arr(t: torch.Tensor | None, fill: float) -> np.ndarray:
        if t is None:
            return np.full(c, fill, dtype=np.float64)
        return t.detach().to("cpu", torch.float64).numpy().copy()

    return {
        names["weight"]: arr(bn.weight, 1.0),
        names["bias"]: arr(bn.bias, 0.0),
        names["running_mean"]: arr(bn.running_mean, 0.0),
        names["running_var"]: var,
    }
