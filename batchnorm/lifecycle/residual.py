"""Rewrite ResNet blocks so that each block's tail ``BN → + identity → ReLU`` is one fused op.

:func:`fuse_residual_blocks` walks a model and replaces every block of a registered type by a
:class:`FusedResidualBlock` that holds the block's **own** submodules (same tensors, same
``state_dict`` keys) with its BN layers swapped for ours: the BN → ReLU pairs of the main branch
become :class:`batchnorm.BatchNormAct2d` and the last BN, the add and the final ReLU one
:class:`batchnorm.core.residual.BatchNormAddAct2d`::

    torchvision BasicBlock                        fused
    conv1 → bn1 → relu                            conv1 → bn1 (BatchNormAct2d)
    conv2 → bn2 ─┐                                conv2 ─┐
    downsample(x) or x ── + → relu                downsample(x) or x ── bn2 (BatchNormAddAct2d)

Built in: ``torchvision.models.resnet.BasicBlock`` and ``Bottleneck`` (matched by their qualified
class names, exact types only: a subclass may compute something else; torchvision is never imported
here). The BN layers inside a ``downsample`` branch are converted with
:func:`batchnorm.convert_to_batchnorm`.

**Your own blocks** (the hook): describe the block with :func:`residual_block_spec` and register it::

    register_residual_block(MyBlock, lambda b: residual_block_spec(
        b, main=["conv1", ("bn1", "act1"), "conv2"], tail=("bn2", "act2"), shortcut="downsample"))

``main`` lists the main branch's modules in call order (a ``(bn, activation)`` pair becomes one fused
layer), ``tail`` the last BN and the activation after the add, ``shortcut`` the attribute of the
shortcut branch (None or missing: identity). The same hook takes timm's ResNet blocks when their
optional parts (drop_block, aa, se, drop_path) are unused.

Numbers: the fused block computes the block's formula with the same parameters and running statistics
(to float32 rounding; a step updates the running statistics as the block would). The model is
changed in place and returned; every block is checked before any is replaced.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..core._bnlayers import activation_of_module, share_state
from ..core.modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
)
from ..core.residual import BatchNormAddAct1d, BatchNormAddAct2d, BatchNormAddAct3d
from .convert import convert_to_batchnorm

__all__ = ["FusedResidualBlock", "fuse_residual_blocks", "fuse_sequential_activations",
           "register_residual_block", "residual_block_spec"]

_TORCH_BN = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
_OURS_BN = {BatchNorm1d: 1, BatchNorm2d: 2, BatchNorm3d: 3}
_ACT = {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d}
_ADD_ACT = {1: BatchNormAddAct1d, 2: BatchNormAddAct2d, 3: BatchNormAddAct3d}


class FusedResidualBlock(nn.Module):
    """A residual block as ``tail(main(x), shortcut(x))`` with ``tail`` a fused BN + add + activation.

    ``main`` is a list of ``(attribute name, module)`` called in order; the modules are registered under
    their original names, so the block's ``state_dict`` keys are the original block's.
    """

    def __init__(self, main: Sequence[tuple[str, nn.Module]], tail: tuple[str, nn.Module],
                 shortcut: tuple[str, nn.Module | None] = ("downsample", None)) -> None:
        super().__init__()
        self._main = [name for name, _ in main]
        for name, m in main:
            self.add_module(name, m)
        self._tail = tail[0]
        self.add_module(tail[0], tail[1])
        self._shortcut = shortcut[0]
        self.add_module(shortcut[0], shortcut[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for name in self._main:
            out = getattr(self, name)(out)
        short = getattr(self, self._shortcut)
        return getattr(self, self._tail)(out, x if short is None else short(x))


def _bn_dim(op: str, where: str, bn: nn.Module) -> int:
    d = _TORCH_BN.get(type(bn)) or _OURS_BN.get(type(bn))
    if d is None:
        raise TypeError(f"{op}: {where} is a {type(bn).__name__}; expected torch.nn.BatchNorm1d/2d/3d or "
                        f"batchnorm's BatchNorm1d/2d/3d (exact types)")
    return d


def _fused(bn: nn.Module, act_module: nn.Module | None, cls_by_dim: dict, op: str, where: str) -> nn.Module:
    """Our fused layer with bn's state (shared tensors) and act_module's activation."""
    d = _bn_dim(op, where, bn)
    act = ("identity", 0.01) if act_module is None else activation_of_module(act_module)
    if act is None:
        raise TypeError(f"{op}: {where}: cannot fuse a {type(act_module).__name__}; fusable activations are "
                        f"ReLU, LeakyReLU, ELU, SiLU, Hardswish, GELU, Sigmoid, Tanh")
    ref = bn.weight if bn.weight is not None else bn.running_mean
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    extra = {k: getattr(bn, k) for k in ("channel_axis", "running_var_unbiased", "nonfinite")
             if hasattr(bn, k)}
    new = cls_by_dim[d](bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, **factory,
                        bias=bn.bias is not None or not bn.affine, activation=act[0], negative_slope=act[1],
                        **extra)
    return share_state(new, bn)


def residual_block_spec(block: nn.Module, *, main: Sequence[str | tuple[str, str]], tail: tuple[str, str],
                        shortcut: str | None = "downsample") -> Callable[[], FusedResidualBlock]:
    """Check ``block`` against a description and return a function that builds its fused replacement.

    Args:
        main: the main branch in call order: attribute names, or ``(bn, activation)`` pairs that become
            one :class:`batchnorm.BatchNormAct2d`; a bare BN name becomes our plain BN.
        tail: ``(bn, activation)``: the last BN of the main branch and the activation after the add.
        shortcut: the attribute holding the shortcut branch (its value may be None: identity).

    Raises TypeError/ValueError (changing nothing) if an attribute is missing or a layer cannot be fused.
    """
    op = "fuse_residual_blocks"
    label = type(block).__name__

    def get(name: str) -> nn.Module:
        m = getattr(block, name, None)
        if not isinstance(m, nn.Module):
            raise ValueError(f"{op}: {label} has no submodule {name!r}; check the block description")
        return m

    plan: list[tuple[str, Callable[[], nn.Module]]] = []
    for item in main:
        if isinstance(item, tuple):
            bn_name, act_name = item
            bn, act = get(bn_name), get(act_name)
            _fused(bn, act, _ACT, op, f"{label}.{bn_name}")  # validate now
            plan.append((bn_name, lambda bn=bn, act=act, n=bn_name: _fused(bn, act, _ACT, op,
                                                                          f"{label}.{n}")))
        else:
            m = get(item)
            if type(m) in _TORCH_BN:
                plan.append((item, lambda m=m: convert_to_batchnorm(m)))
            else:
                plan.append((item, lambda m=m: m))
    bn_name, act_name = tail
    bn, act = get(bn_name), get(act_name)
    _fused(bn, act, _ADD_ACT, op, f"{label}.{bn_name}")
    short = getattr(block, shortcut, None) if shortcut is not None else None
    if short is not None and not isinstance(short, nn.Module):
        raise ValueError(f"{op}: {label}.{shortcut} is a {type(short).__name__}, not a module")
    training = block.training

    def build() -> FusedResidualBlock:
        main_mods = [(name, make()) for name, make in plan]
        tail_mod = _fused(bn, act, _ADD_ACT, op, f"{label}.{bn_name}")
        short_mod = None if short is None else convert_to_batchnorm(short)
        out = FusedResidualBlock(main_mods, (bn_name, tail_mod), (shortcut or "downsample", short_mod))
        return out.train(training)

    return build


def _torchvision_basic(block: nn.Module) -> Callable[[], FusedResidualBlock]:
    return residual_block_spec(block, main=["conv1", ("bn1", "relu"), "conv2"], tail=("bn2", "relu"))


def _torchvision_bottleneck(block: nn.Module) -> Callable[[], FusedResidualBlock]:
    return residual_block_spec(block, main=["conv1", ("bn1", "relu"), "conv2", ("bn2", "relu"), "conv3"],
                               tail=("bn3", "relu"))


# qualified class name (built in, matched without importing the library) or class -> rewrite
_BUILTIN: dict[str, Callable[[nn.Module], Callable[[], nn.Module]]] = {
    "torchvision.models.resnet.BasicBlock": _torchvision_basic,
    "torchvision.models.resnet.Bottleneck": _torchvision_bottleneck,
}
_REGISTRY: dict[type, Callable[[nn.Module], Callable[[], nn.Module]]] = {}


def register_residual_block(cls: type, rewrite: Callable[[nn.Module], Callable[[], nn.Module]]) -> None:
    """Teach :func:`fuse_residual_blocks` a block type (exact type; subclasses are not matched).

    ``rewrite(block)`` validates the block and returns a function that builds its replacement
    (usually :func:`residual_block_spec`); it may raise TypeError/ValueError to reject a block.
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_residual_block: expected an nn.Module subclass, got {cls!r}")
    if not callable(rewrite):
        raise TypeError(f"register_residual_block: expected a callable rewrite(block), got {rewrite!r}")
    _REGISTRY[cls] = rewrite


def _rewrite_of(m: nn.Module):
    t = type(m)
    return _REGISTRY.get(t) or _BUILTIN.get(f"{t.__module__}.{t.__qualname__}")


def fuse_residual_blocks(model: nn.Module) -> nn.Module:
    """Replace every registered residual block in ``model`` with its fused :class:`FusedResidualBlock`.

    Returns the model (changed in place; a model that is itself a block is returned replaced). The
    rest of the model is left as it is: combine with :func:`batchnorm.convert_to_batchnorm`
    (``fuse_activations=True``) for the stem and any other BN layer.

    Example:
        >>> import torchvision
        >>> net = fuse_residual_blocks(torchvision.models.resnet18())    # doctest: +SKIP
    """
    op = "fuse_residual_blocks"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: expected a torch.nn.Module, got {type(model).__name__}")
    plans: list[tuple[nn.Module | None, str, Callable[[], nn.Module]]] = []

    def visit(parent: nn.Module | None, attr: str, m: nn.Module) -> None:
        rewrite = _rewrite_of(m)
        if rewrite is not None:
            plans.append((parent, attr, rewrite(m)))  # validates; raises before anything changes
            return
        for name, child in m.named_children():
            visit(m, name, child)

    visit(None, "", model)
    out: Any = model
    with torch.no_grad():
        for parent, attr, build in plans:
            new = build()
            if parent is None:
                out = new
            else:
                setattr(parent, attr, new)
    return out


def fuse_sequential_activations(model: nn.Module) -> nn.Module:
    """Fuse every BN directly followed by an activation inside a Sequential, keeping the keys.

    In every ``nn.Sequential`` (or subclass that keeps Sequential's ``forward``, such as torchvision's
    ``Conv2dNormActivation``), a child BN (torch's or ours, exact types) followed by a fusable
    activation module (ReLU, LeakyReLU, ELU, SiLU, Hardswish, GELU, Sigmoid, Tanh) becomes
    :class:`batchnorm.BatchNormAct2d` (sharing the BN's tensors) and the activation ``nn.Identity()``:
    the child names, and so the ``state_dict`` keys, stay as they were. (``convert_to_batchnorm
    (fuse_activations=True)`` fuses only two-element Sequentials, changing their keys.) In place;
    returns ``model``.
    """
    op = "fuse_sequential_activations"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: expected a torch.nn.Module, got {type(model).__name__}")
    plans: list[tuple[nn.Module, str, str, nn.Module, nn.Module]] = []
    for m in model.modules():
        if not isinstance(m, nn.Sequential) or type(m).forward is not nn.Sequential.forward:
            continue
        names = list(m._modules)
        for a, b in itertools.pairwise(names):
            bn, act = m._modules[a], m._modules[b]
            if (type(bn) in _TORCH_BN or type(bn) in _OURS_BN) and activation_of_module(act) is not None:
                plans.append((m, a, b, bn, act))
    with torch.no_grad():
        for m, a, b, bn, act in plans:
            setattr(m, a, _fused(bn, act, _ACT, op, a))
            setattr(m, b, nn.Identity())
    return model
