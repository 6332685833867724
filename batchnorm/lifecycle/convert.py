"""Swap every ``torch.nn.BatchNorm*`` in a model for ours, and back.

:func:`convert_to_batchnorm` walks any ``nn.Module`` (a torchvision or timm model, your own) and
replaces each torch BN layer by the matching module of this package:

    ==========================================  ===============================================
    torch                                       batchnorm
    ==========================================  ===============================================
    ``nn.BatchNorm1d/2d/3d``                    :class:`BatchNorm1d/2d/3d`
    ``nn.SyncBatchNorm``                        :class:`batchnorm.family.sync.SyncBatchNorm` (same group)
    ``nn.LazyBatchNorm*`` (materialised)        by rank, as above
    ``nn.Sequential(BN, ReLU|LeakyReLU|ELU)``   :class:`BatchNormAct1d/2d/3d` (``fuse_activations``;
    (or SiLU, Hardswish, GELU, Sigmoid, Tanh)   see ``core._bnlayers.activation_of_module``)
    timm ``BatchNormAct2d``                     :class:`TimmBatchNormAct2d` (same ``act``/``drop``)
    timm ``SyncBatchNormAct``                   :class:`TimmSyncBatchNormAct` (same group)
    ==========================================  ===============================================

**timm.** timm builds most of its models (EfficientNet, MobileNetV3, RegNet, DenseNet, ...) from its own
``timm.layers.BatchNormAct2d``: a ``torch.nn.BatchNorm2d`` subclass that runs BN, then ``self.drop``
(usually ``nn.Identity``), then ``self.act`` (ReLU, SiLU, Hardswish, ...). It becomes a
:class:`TimmBatchNormAct2d`: our fused layer with the same ``drop`` and ``act`` children and the same
state_dict keys. A ReLU/LeakyReLU/ELU behind an identity ``drop`` runs fused inside our kernel (``act``
is then ``nn.Identity()`` and ``activation`` names it); any other activation or drop layer is called as
the very module timm built. timm's ``FrozenBatchNormAct2d`` is left as it is (a constant per-channel
affine whose γ/β are buffers and which has no ``num_batches_tracked``: our ``FrozenBatchNorm`` would
change its keys, and there is nothing to speed up). To build a timm model with our layers from the start,
pass ``norm_layer=timm_norm_layer()`` to ``timm.create_model``.

:func:`convert_to_torch` goes the other way (for ONNX export, or to hand a model to someone who does
not use this package). A fused :class:`BatchNormAct2d` becomes ``nn.Sequential(nn.BatchNorm2d,
nn.ReLU())`` (so that layer's state_dict keys gain a ``.0``); ``convert_to_batchnorm(...,
fuse_activations=True)`` turns such a pair back into one fused module with the original keys.

What is kept: the new layer **shares** the old layer's parameters and buffers (the same tensor objects,
so ``requires_grad``, dtype, device and an optimizer built before the conversion all stay valid) and
gets its hyper-parameters (``eps``, ``momentum``, ``affine``, ``track_running_stats``) and its
train/eval mode. Hooks registered on the old layer are not carried over.

What is not converted (left as it is): subclasses of torch's BN that override ``forward`` (they may
compute something else), and our BN variants that override ``forward`` (e.g. Batch Renorm). A lazy
layer that was never run has no size yet and raises.

Both functions change ``model`` in place (children are replaced) and return it; a ``model`` that is
itself a BN layer is returned converted. Every layer is validated before anything is replaced, so a
rejected call leaves the model unchanged. ``copy.deepcopy(model)`` first if you need the original.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..core._bnlayers import activation_module, activation_of_module
from ..core._bnlayers import share_state as _share_state
from ..core.modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    _BatchNorm,
)
from ..family.sync import SyncBatchNorm

__all__ = ["TimmBatchNormAct2d", "TimmSyncBatchNormAct", "convert_to_batchnorm", "convert_to_torch",
           "timm_norm_layer"]

_TORCH_BASE = nn.modules.batchnorm._BatchNorm
_TORCH_FORWARDS = (_TORCH_BASE.forward, nn.SyncBatchNorm.forward)
_RANKED_TORCH = ((nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3))
_OURS_BY_DIM = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
_ACT_BY_DIM = {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d}
_TORCH_BY_DIM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _sync_cls() -> type | None:
    try:
        from ..family.sync import SyncBatchNorm
    except ImportError:  # pragma: no cover - sync.py ships with the package
        return None
    return SyncBatchNorm


# -- timm's norm + act layers -------------------------------------------------------------------
def _timm_act(act_layer: Any, act_kwargs: dict | None, inplace: bool, apply_act: bool) -> nn.Module:
    """The activation module timm's ``BatchNormAct2d`` would build (``nn.Identity()`` for none)."""
    if not apply_act or act_layer is None:
        return nn.Identity()
    kwargs = dict(act_kwargs or {})
    kwargs.setdefault("inplace", inplace)
    if "timm" in sys.modules or isinstance(act_layer, str):
        from timm.layers import create_act_layer  # strings ("silu", "hard_swish") are timm's names

        act = create_act_layer(act_layer, **kwargs)
    else:
        try:
            act = act_layer(**kwargs)
        except TypeError:  # an activation without an ``inplace`` argument (nn.GELU, nn.Sigmoid)
            kwargs.pop("inplace")
            act = act_layer(**kwargs)
    return nn.Identity() if act is None else act


class _TimmNormAct:
    """``act(drop(BN(x)))`` with timm's ``drop`` and ``act`` children (mixed into our BN modules).

    A ReLU/LeakyReLU/ELU behind an identity ``drop`` is moved into the fused op (``activation``) and
    ``act`` becomes ``nn.Identity()``, so it is applied once, inside the kernel.
    """

    def _set_post(self, drop: nn.Module, act: nn.Module) -> None:
        fused = _act_of(act) if type(drop) is nn.Identity else None
        # (only the piecewise-linear family and ELU, as documented: a SiLU/Hardswish stays timm's module,
        # which timm's own tools, e.g. freeze_batch_norm_2d, expect to find as ``act``)
        if fused is not None and fused[0] in ("relu", "leaky_relu", "elu"):
            self.activation, self.negative_slope = fused
            act = nn.Identity()
        else:
            self.activation = "identity"
        self.drop = drop
        self.act = act

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(input)))


class TimmBatchNormAct2d(_TimmNormAct, BatchNormAct2d):
    """timm's ``BatchNormAct2d`` on our kernels: ``act(drop(BN(x)))``, same arguments and state_dict keys.

    Args (timm's): ``num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
    apply_act=True, act_layer=nn.ReLU, act_kwargs=None, inplace=True, drop_layer=None, device=None,
    dtype=None``. ``act_layer`` is a module class or one of timm's names (``"silu"``; needs timm).
    A ReLU/LeakyReLU/ELU with no ``drop_layer`` is fused into the BN op (``activation`` says which,
    ``act`` is ``nn.Identity()``); anything else runs as the module after our BN.

    Example:
        >>> layer = TimmBatchNormAct2d(16, act_layer=nn.SiLU)
        >>> y = layer(torch.randn(4, 16, 8, 8))
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, apply_act: bool = True,
                 act_layer: Any = nn.ReLU, act_kwargs: dict | None = None, inplace: bool = True,
                 drop_layer: Any = None, device: Any = None, dtype: Any = None, **kwargs: Any) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         activation="identity", **kwargs)
        drop = drop_layer() if drop_layer is not None else nn.Identity()
        self._set_post(drop, _timm_act(act_layer, act_kwargs, inplace, apply_act))


class TimmSyncBatchNormAct(_TimmNormAct, SyncBatchNorm):
    """timm's ``SyncBatchNormAct`` on our :class:`batchnorm.SyncBatchNorm`: ``act(drop(SyncBN(x)))``.

    Built by :func:`convert_to_batchnorm` from timm's layer (``drop``/``act`` carried over; a
    ReLU/LeakyReLU/ELU behind an identity ``drop`` is fused, as in :class:`TimmBatchNormAct2d`).
    """


def _timm_classes() -> dict[str, type]:
    """timm's BN + act classes, if timm is imported (no timm layer can exist before it is)."""
    mod = sys.modules.get("timm.layers.norm_act")
    if mod is None:
        return {}
    return {k: getattr(mod, k) for k in ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d")
            if hasattr(mod, k)}


def _timm_factory(num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                  track_running_stats: bool = True, apply_act: bool = True, act_layer: Any = None,
                  act_kwargs: dict | None = None, inplace: bool = True, drop_layer: Any = None,
                  device: Any = None, dtype: Any = None) -> nn.Module:
    # act_layer defaults to None (no activation): timm calls a plain ``norm_layer(C)`` where the model
    # applies its own activation (ResNet) and binds ``act_layer`` where the layer must (norm + act).
    return TimmBatchNormAct2d(num_features, eps, momentum, affine, track_running_stats, apply_act,
                              act_layer, act_kwargs, inplace, drop_layer, device, dtype)


def timm_norm_layer(**defaults: Any) -> Callable[..., nn.Module]:
    """A ``norm_layer`` for ``timm.create_model`` that builds our layers (registered with timm's factory).

    timm resolves ``norm_layer`` in two ways: plain-norm models (ResNet) call ``norm_layer(C)``;
    norm + act models (EfficientNet, MobileNetV3, RegNet, DenseNet) go through
    ``timm.layers.get_norm_act_layer``, which accepts a class or a plain function but binds the
    model's ``act_layer`` only to the norm + act layers it knows. This function adds our factory to
    those sets (``_NORM_ACT_TYPES``, ``_NORM_ACT_REQUIRES_ARG``), checks that timm now binds the
    activation, and returns the factory (a ``functools.partial`` with ``defaults``, e.g. ``eps=1e-3``).
    Every layer it builds is a :class:`TimmBatchNormAct2d` (no activation when called plainly).

    Raises ImportError without timm, and RuntimeError if this timm resolves norm layers differently
    (so a model would silently lose its activations).

    Example:
        >>> import timm
        >>> model = timm.create_model("efficientnet_b0", norm_layer=timm_norm_layer())

    Models whose builder fixes ``norm_layer`` itself (timm's MobileNetV3 passes its own) reject the
    argument; build those with timm's layers and call :func:`convert_to_batchnorm`.
    """
    from timm.layers import create_norm_act as cna

    for name in ("_NORM_ACT_TYPES", "_NORM_ACT_REQUIRES_ARG"):
        table = getattr(cna, name, None)
        if not isinstance(table, set):
            raise RuntimeError(f"timm_norm_layer: this timm has no set timm.layers.create_norm_act.{name}; "
                               f"build the model with timm's layers and call convert_to_batchnorm(model)")
        table.add(_timm_factory)
    factory = functools.partial(_timm_factory, **defaults) if defaults else _timm_factory
    probe = cna.get_norm_act_layer(factory, nn.SiLU)
    if not isinstance(probe, functools.partial) or probe.keywords.get("act_layer") is not nn.SiLU:
        raise RuntimeError("timm_norm_layer: timm.layers.get_norm_act_layer did not bind the model's "
                           "act_layer to our factory, so models would lose their activations; build the "
                           "model with timm's layers and call convert_to_batchnorm(model)")
    return factory


def _check_materialised(op: str, name: str, m: nn.Module) -> None:
    for t in (getattr(m, "weight", None), getattr(m, "running_mean", None)):
        if isinstance(t, nn.parameter.UninitializedTensorMixin):
            raise ValueError(f"{op}: layer {name or '<model>'} ({type(m).__name__}) is a lazy layer whose "
                             f"number of features is not known yet; run one forward pass (or build it with "
                             f"num_features) before converting")


def _torch_dim(m: nn.Module) -> int | None:
    for cls, d in _RANKED_TORCH:
        if isinstance(m, cls):
            return d
    return None


def _ours_dim(m: _BatchNorm) -> int | None:
    ranks = tuple(type(m)._ranks)
    return {(2, 3): 1, (4,): 2, (5,): 3}.get(ranks)




def _factory(old: nn.Module) -> dict[str, Any]:
    ref = old.weight if old.weight is not None else old.running_mean
    return {} if ref is None else {"device": ref.device, "dtype": ref.dtype}


def _act_of(m: nn.Module) -> tuple[str, float] | None:
    """Our activation name and slope for a torch activation module we can fuse (exact types only)."""
    return activation_of_module(m)


# -- torch -> ours ------------------------------------------------------------------------------
def _timm_plan(name: str, m: nn.Module) -> Callable[[], nn.Module] | None:
    timm = _timm_classes()
    if not timm or type(m) not in (timm.get("BatchNormAct2d"), timm.get("SyncBatchNormAct")):
        return None  # exact types: a subclass of timm's layer may compute something else
    _check_materialised("convert_to_batchnorm", name, m)
    # timm's SyncBatchNormAct gets drop/act as plain attributes from timm's converter (absent: none).
    drop, act = getattr(m, "drop", None) or nn.Identity(), getattr(m, "act", None) or nn.Identity()
    sync = type(m) is timm.get("SyncBatchNormAct")

    def build() -> nn.Module:
        args = (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        if sync:
            new = TimmSyncBatchNormAct(*args, m.process_group, **_factory(m), activation="identity")
        else:
            new = TimmBatchNormAct2d(*args, act_layer=None, **_factory(m))
        new._set_post(drop, act)
        return _share_state(new, m)

    return build


def _to_ours_plan(name: str, m: nn.Module, fuse: bool) -> Callable[[], nn.Module] | None:
    op = "convert_to_batchnorm"
    timm_plan = _timm_plan(name, m)
    if timm_plan is not None:
        return timm_plan
    if (fuse and type(m) is nn.Sequential and len(m) == 2 and isinstance(m[0], _TORCH_BASE)
            and type(m[0]).forward in _TORCH_FORWARDS and _torch_dim(m[0]) is not None
            and _act_of(m[1]) is not None):
        bn, (act, slope) = m[0], _act_of(m[1])
        _check_materialised(op, name, bn)
        d = _torch_dim(bn)

        def fused() -> nn.Module:
            new = _ACT_BY_DIM[d](bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                                 **_factory(bn), activation=act, negative_slope=slope)
            return _share_state(new, bn)

        return fused
    if not isinstance(m, _TORCH_BASE) or type(m).forward not in _TORCH_FORWARDS:
        return None
    _check_materialised(op, name, m)
    if isinstance(m, nn.SyncBatchNorm):
        sync = _sync_cls()
        if sync is None:  # pragma: no cover
            raise ImportError(f"{op}: batchnorm.SyncBatchNorm is unavailable to convert {name}")

        def to_sync() -> nn.Module:
            new = sync(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                       m.process_group, **_factory(m))
            return _share_state(new, m)

        return to_sync
    d = _torch_dim(m)
    if d is None:
        return None

    def to_ours() -> nn.Module:
        new = _OURS_BY_DIM[d](m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                              **_factory(m))
        return _share_state(new, m)

    return to_ours


# -- ours -> torch ------------------------------------------------------------------------------
def _to_torch_plan(name: str, m: nn.Module, strict: bool) -> Callable[[], nn.Module] | None:
    op = "convert_to_torch"
    if not isinstance(m, _BatchNorm):
        return None
    sync = _sync_cls()
    is_sync = sync is not None and isinstance(m, sync)
    is_timm = isinstance(m, _TimmNormAct)
    if (type(m).forward is not _BatchNorm.forward and not (is_sync and type(m).forward is sync.forward)
            and not is_timm):
        if strict:
            raise ValueError(f"{op}: layer {name or '<model>'} is a {type(m).__name__}, a BN variant with "
                             f"its own forward that torch has no module for; pass strict=False to leave such "
                             f"layers as they are")
        return None
    label = f"layer {name or '<model>'} ({type(m).__name__})"
    if m.channel_axis != 1:
        raise ValueError(f"{op}: {label} has channel_axis={m.channel_axis}; torch's BatchNorm only "
                         f"normalises channels on axis 1. Permute the data to channels-first (NCHW; the "
                         f"channels_last memory format is fine) and build the layer with channel_axis=1")
    if strict and not m.running_var_unbiased:
        raise ValueError(f"{op}: {label} stores the biased running variance (running_var_unbiased=False); "
                         f"torch's BatchNorm stores the unbiased one. Eval outputs would be identical, but "
                         f"further training would mix conventions: pass strict=False to convert anyway")
    if strict and m.nonfinite != "update":
        raise ValueError(f"{op}: {label} uses nonfinite={m.nonfinite!r}, which torch's BatchNorm cannot "
                         f"express (it always folds NaN/Inf batches into the running statistics); pass "
                         f"strict=False to convert anyway")
    if strict and is_sync and getattr(m, "timeout", None) is not None:
        raise ValueError(f"{op}: {label} has a collective timeout, which torch.nn.SyncBatchNorm cannot "
                         f"express; pass strict=False to drop it")
    d = _ours_dim(m)
    if not is_sync and d is None:
        raise ValueError(f"{op}: {label} accepts input ranks {type(m)._ranks}, which match no torch "
                         f"BatchNorm1d/2d/3d")

    if is_timm:
        try:
            from timm.layers import norm_act as timm_norm_act
        except ImportError as e:
            raise ImportError(f"{op}: {label} came from timm and converts back to timm's layer; install "
                              f"timm (pip install timm)") from e

    def build() -> nn.Module:
        if is_timm:
            # timm's own layer with the same drop/act modules (a fused activation as its torch module).
            cls = timm_norm_act.SyncBatchNormAct if is_sync else timm_norm_act.BatchNormAct2d
            args = (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            if is_sync:
                bn = cls(*args, m.process_group, **_factory(m))
            else:
                bn = cls(*args, apply_act=False, **_factory(m))
            _share_state(bn, m)
            bn.drop = m.drop
            fused = m.activation != "identity"
            bn.act = activation_module(m.activation, m.negative_slope) if fused else m.act
            return bn
        if is_sync:
            bn = nn.SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                                  m.process_group, **_factory(m))
        else:
            bn = _TORCH_BY_DIM[d](m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                                  **_factory(m))
        _share_state(bn, m)
        if m.activation == "identity":
            return bn
        act = activation_module(m.activation, m.negative_slope)
        return nn.Sequential(bn, act).train(m.training)

    return build


# -- the walk -------------------------------------------------------------------------------------
def _convert(model: nn.Module, plan_of: Callable[[str, nn.Module], Callable[[], nn.Module] | None],
             op: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: expected a torch.nn.Module, got {type(model).__name__}")
    plans: list[tuple[nn.Module | None, str, Callable[[], nn.Module]]] = []

    def visit(parent: nn.Module | None, attr: str, qual: str, m: nn.Module) -> None:
        plan = plan_of(qual, m)  # validates; raises before anything is replaced
        if plan is not None:
            plans.append((parent, attr, plan))
            return
        for child_name, child in m.named_children():
            visit(m, child_name, f"{qual}.{child_name}" if qual else child_name, child)

    visit(None, "", "", model)
    out = model
    with torch.no_grad():
        for parent, attr, plan in plans:
            new = plan()
            if parent is None:
                out = new
            else:
                setattr(parent, attr, new)
    return out


def convert_to_batchnorm(model: nn.Module, *, fuse_activations: bool = False) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm*`` (incl. SyncBatchNorm) in ``model`` with this package's module.

    Args:
        model: any ``nn.Module``; changed in place and returned (see the module docstring).
        fuse_activations: also turn an ``nn.Sequential`` of exactly ``(BatchNormNd, ReLU | LeakyReLU |
            ELU)`` into one :class:`BatchNormActNd` (what :func:`convert_to_torch` makes of a fused
            module). Off by default: it changes that Sequential's structure and state_dict keys.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> net = convert_to_batchnorm(net)
        >>> type(net[1]).__module__
        'batchnorm.core.modules'
    """
    return _convert(model, lambda q, m: _to_ours_plan(q, m, bool(fuse_activations)), "convert_to_batchnorm")


def convert_to_torch(model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Replace every BN module of this package in ``model`` with ``torch.nn.BatchNorm*`` (the inverse).

    ``BatchNormActNd`` becomes ``nn.Sequential(nn.BatchNormNd, activation)``; our SyncBatchNorm becomes
    ``nn.SyncBatchNorm`` with the same process group. Layers torch cannot express raise a ValueError:
    ``channel_axis != 1`` always; with ``strict=True`` (default) also ``running_var_unbiased=False``,
    ``nonfinite != "update"``, a SyncBatchNorm ``timeout``, and BN variants with their own forward
    (``strict=False`` converts the first three anyway — eval outputs are identical — and leaves the
    variants alone).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8))
        >>> convert_to_torch(net)[1]
        Sequential(
          (0): BatchNorm2d(8, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
          (1): ReLU()
        )
    """
    return _convert(model, lambda q, m: _to_torch_plan(q, m, bool(strict)), "convert_to_torch")
