"""What counts as a BN layer for the lifecycle tools, and how to read its conventions.

The lifecycle tools (recalibrate, freeze, fold, convert, checkpoint, diagnostics) work on our
modules (:class:`batchnorm.core.modules._BatchNorm`), on every ``torch.nn.BatchNorm*`` (including
``SyncBatchNorm`` and the lazy variants once materialised) and on
:class:`batchnorm.lifecycle.freeze.FrozenBatchNorm`.
Torch's modules have no ``channel_axis`` / ``running_var_unbiased`` / ``activation`` attributes:
they are channels-first, store the unbiased variance and have no fused activation.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .modules import _BatchNorm

_TORCH_BN = nn.modules.batchnorm._BatchNorm  # BatchNorm1d/2d/3d, SyncBatchNorm, LazyBatchNorm*


# Other BN-like classes register here when their module is imported (freeze.py adds FrozenBatchNorm);
# no instance of them can exist before that, so nothing is missed and there is no import cycle.
_EXTRA: list[type] = []


def register_bn_type(cls: type) -> None:
    if cls not in _EXTRA:
        _EXTRA.append(cls)


def is_bn(module: nn.Module) -> bool:
    """True for our BN modules, torch's ``_BatchNorm`` subclasses and registered types (FrozenBatchNorm)."""
    return isinstance(module, (_BatchNorm, _TORCH_BN, *_EXTRA))


def iter_bn(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every BN layer in ``model`` (the model itself included)."""
    for name, m in model.named_modules():
        if is_bn(m):
            yield name, m


def channel_axis(m: nn.Module) -> int:
    return int(getattr(m, "channel_axis", 1))


def running_var_unbiased(m: nn.Module) -> bool:
    return bool(getattr(m, "running_var_unbiased", True))


def activation(m: nn.Module) -> tuple[str, float]:
    return str(getattr(m, "activation", "identity")), float(getattr(m, "negative_slope", 0.01))


def activation_module(act: str, slope: float) -> nn.Module:
    """The ``torch.nn`` module for a fused activation (``slope`` = leaky slope or ELU α)."""
    if act == "identity":
        return nn.Identity()
    if act == "relu":
        return nn.ReLU()
    if act == "leaky_relu":
        return nn.LeakyReLU(slope)
    if act == "elu":
        return nn.ELU(alpha=slope)
    if act == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if act in _SIMPLE_ACTS:
        return _SIMPLE_ACTS[act]()
    raise ValueError(f"batchnorm: unknown activation {act!r}; expected one of identity, relu, leaky_relu, "
                     f"elu, {', '.join(_SIMPLE_ACTS)}, gelu_tanh")


_SIMPLE_ACTS = {"silu": nn.SiLU, "hardswish": nn.Hardswish, "gelu": nn.GELU, "sigmoid": nn.Sigmoid,
                "tanh": nn.Tanh}  # activations without a parameter: name -> torch module


def activation_of_module(m: nn.Module) -> tuple[str, float] | None:
    """The fused activation (name, slope) that a ``torch.nn`` activation module computes, or None.

    Exact types only (a subclass may compute something else): ReLU, LeakyReLU, ELU, SiLU, Hardswish,
    GELU (``approximate`` "none" or "tanh"), Sigmoid, Tanh — the inverse of :func:`activation_module`.
    """
    t = type(m)
    if t is nn.ReLU:
        return "relu", 0.01
    if t is nn.LeakyReLU:
        return "leaky_relu", float(m.negative_slope)
    if t is nn.ELU:
        return "elu", float(m.alpha)
    if t is nn.GELU:
        return {"none": ("gelu", 0.01), "tanh": ("gelu_tanh", 0.01)}.get(m.approximate)
    for name, cls in _SIMPLE_ACTS.items():
        if t is cls:
            return name, 0.01
    return None


def share_state(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` the very tensors of ``old`` (parameters and buffers) and its train/eval mode."""
    if old.affine:
        new.weight = old.weight
        new.bias = old.bias
    new.running_mean = old.running_mean
    new.running_var = old.running_var
    new.num_batches_tracked = old.num_batches_tracked
    new.train(old.training)
    return new


def select_layers(op: str, found: dict, layers, what: str = "BN layers of the model") -> dict:
    """``found`` restricted to the names in ``layers`` (all of it for None), checked first.

    Raises TypeError for a bare string (a common slip for a one-name list) and ValueError naming
    the unknown names and the ones that exist.
    """
    if layers is None:
        return dict(found)
    if isinstance(layers, str):
        raise TypeError(f"{op}: expected layers to be a list of names, got the string {layers!r}")
    names = list(layers)
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"{op}: {missing} are not {what}; those are {list(found)}")
    return {n: found[n] for n in names}
