"""Fold inference-mode BN into the preceding convolution or linear layer.

In eval mode BN is a per-channel affine map with constants, so a ``Conv → BN`` pair is one convolution
(Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", CVPR 2018, §3.2). Per output channel ``o``, with ``s_o = γ_o / sqrt(σ²_run,o + ε)``::

    W'[o] = s_o · W[o]                      (every weight that produces output channel o)
    b'[o] = s_o · (b[o] − μ_run,o) + β_o    (b = 0 when the layer has no bias)

which removes one read and one write of the activation per BN layer at inference. The fold is computed
in **float64** on the CPU and then cast to the layer's dtype/device: a channel with a tiny running
variance has a huge ``s_o``, and ``s_o · (b − μ) + β`` computed in float32 would cancel.

Supported layers (exact types, since a subclass may change what ``forward`` computes, e.g. weight
standardisation): ``nn.Conv1d/2d/3d`` (any ``groups``, ``stride``, ``dilation``, ``padding_mode``),
``nn.ConvTranspose1d/2d/3d`` (any ``groups``; output channels sit on weight axis 1) and ``nn.Linear``.
BN layers: ours (``BatchNorm*``, ``BatchNormAct*`` — the activation stays in place as a separate
``nn.ReLU`` / ``nn.LeakyReLU`` / ``nn.ELU`` module), ``torch.nn.BatchNorm*`` and
:class:`batchnorm.lifecycle.freeze.FrozenBatchNorm`, in eval mode with running statistics. A BN after a
convolution must normalise channel axis 1; after a ``Linear`` the features are on the last axis,
which BN sees as axis 1 only for 2-D ``(N, C)`` input (or with ``channel_axis=-1``): a ``Linear`` on
``(N, L, C)`` followed by ``BatchNorm1d`` normalises L, not C, and is not foldable — fx cannot see input
ranks: with ``example_inputs`` :func:`fold_bn` records them and leaves such a pair (with a warning);
without, it folds a ``Linear → BN`` pair and warns that the fold is unverified.

Finding the pairs in a whole model (:func:`find_foldable`):

* ``method="fx"``: ``torch.fx`` symbolic tracing (BN layers are kept as leaves). A pair is folded
  when the BN's only input is the output of a supported layer, that output has no other user, and
  each of the two modules is called exactly once. Works for models whose layers are attributes used
  in ``forward`` (torchvision's ResNet ``self.conv1``/``self.bn1``). Tracing fails on data-dependent
  Python control flow.
* ``method="sequential"``: adjacent children of every plain ``nn.Sequential`` (not of subclasses
  that override ``forward``), modules used once in the model.
* ``method="record"``: one recorded run on ``example_inputs`` (forward hooks): a pair is a BN whose
  input *is* the tensor a supported layer returned, both called once, that tensor given to no other
  layer. Works on any model that runs — data-dependent control flow, ``transformers``-style models
  fx cannot trace — and sees the real ranks (a ``Linear`` on ``(N, L, C)`` before ``BatchNorm1d`` is
  rejected), and uses of the layer's output outside modules (``bn(a) + a``) through a
  ``TorchFunctionMode`` (reads of shape or dtype are no uses); the verification on the same inputs
  checks the rest.
* ``method="auto"`` (default): fx; if tracing fails, a recorded run when ``example_inputs`` are
  given, else sequential — and then :func:`fold_bn` warns (:class:`FoldWarning`) naming the BN
  layers it left, since pairs outside plain ``nn.Sequential`` may have been missed.

What :func:`fold_bn` cannot verify it says: a ``Linear → BN`` pair folded without ``example_inputs``
(correct only for 2-D input) and every found pair that was rejected raise a :class:`FoldWarning`
naming the layers. With ``example_inputs`` the folded model's output (tensors, tuples, lists, dicts,
``ModelOutput``-like mappings) is compared with the original's; any error rolls everything back.

:func:`fold_bn` replaces each folded layer with its folded copy and each BN with ``nn.Identity()``
(or its activation), keeping the model's class and ``forward`` — the modules are swapped in place of
the attributes the model already calls.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core import _bnlayers

__all__ = ["FoldWarning", "find_foldable", "fold_bn", "fold_conv_bn"]


class FoldWarning(UserWarning):
    """fold_bn left foldable-looking BN layers unfolded, or folded a pair it could not verify."""

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_SUPPORTED = (*_CONV, *_CONV_T, nn.Linear)
_NAMES = "Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear"


def _foldable_layer(m: nn.Module) -> bool:
    return type(m) in _SUPPORTED


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _activation_module(bn: nn.Module) -> nn.Module:
    """What stays of ``bn`` after its affine map is folded away: its fused activation, followed by any
    ``drop``/``act`` children it calls after BN (timm's ``BatchNormAct2d``, our ``TimmBatchNormAct2d``:
    ``act(drop(BN(x)))``), so e.g. a SiLU there is kept rather than silently dropped."""
    fused = _bnlayers.activation_module(*_bnlayers.activation(bn))
    post = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
            if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    if not post:
        return fused
    return nn.Sequential(*([] if isinstance(fused, nn.Identity) else [fused]), *post)


def _check_pair(op: str, layer: nn.Module, bn: nn.Module, where: str = "") -> None:
    at = f" ({where})" if where else ""
    if isinstance(getattr(layer, "weight", None), nn.parameter.UninitializedTensorMixin):
        raise ValueError(f"{op}: the {type(layer).__name__}{at} is lazy and not initialised; run one forward "
                         f"pass first")
    if not isinstance(layer, nn.Module) or not _foldable_layer(layer):
        raise TypeError(f"{op}: cannot fold BN into a {type(layer).__name__}{at}; supported layers are "
                        f"exactly {_NAMES} (subclasses may compute something else)")
    if not isinstance(bn, nn.Module) or not _bnlayers.is_bn(bn):
        raise TypeError(f"{op}: expected a batch-norm layer to fold, got {type(bn).__name__}{at}")
    frozen = type(bn).__name__ == "FrozenBatchNorm"
    if getattr(bn, "running_mean", None) is None:
        raise ValueError(f"{op}: {type(bn).__name__}{at} has no running statistics (track_running_stats="
                         f"False): it always normalises with batch statistics and cannot be folded")
    if bn.training and not frozen:
        raise ValueError(f"{op}: {type(bn).__name__}{at} is in training mode, where it normalises with batch "
                         f"statistics; folding uses the running statistics of eval mode: call model.eval() "
                         f"first (or freeze the layer with batchnorm.lifecycle.freeze)")
    c = _out_channels(layer)
    if bn.num_features != c:
        raise ValueError(f"{op}: the {type(layer).__name__}{at} has {c} output channels but the BN "
                         f"normalises {bn.num_features}; they are not a Conv/Linear -> BN pair")
    axis = _bnlayers.channel_axis(bn)
    if axis != 1 and not (isinstance(layer, nn.Linear) and axis == -1):
        raise ValueError(f"{op}: the BN{at} normalises channel_axis={axis}, but the {type(layer).__name__} "
                         f"writes its output channels on axis 1; such a pair cannot be folded")
    var = bn.running_var.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(var).all() & torch.isfinite(bn.running_mean.detach()).all()):
        raise ValueError(f"{op}: the BN{at} has non-finite running statistics; recalibrate it "
                         f"(batchnorm.lifecycle.recalibrate) before folding")
    if not bool((var + bn.eps > 0).all()):
        raise ValueError(f"{op}: the BN{at} has running_var + eps <= 0 in some channel (eps={bn.eps}); the "
                         f"fold would divide by zero. Use eps > 0 or recalibrate the statistics")


def fold_conv_bn(layer: nn.Module, bn: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Fold one eval-mode BN into the layer before it; the inputs are left unchanged.

    Args:
        layer: an ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` or ``nn.Linear`` (with or without bias).
        bn: the BN layer applied to ``layer``'s output (eval mode, or frozen; running statistics).

    Returns:
        ``(folded, activation)``: a copy of ``layer`` (same type, dtype, device, ``requires_grad``;
        always with a bias) such that ``folded(x) == bn(layer(x))`` up to rounding, and the BN's fused
        activation as a module (``nn.Identity()`` for plain BN). Apply ``activation`` after ``folded``.

    Example:
        >>> conv, bn = nn.Conv2d(3, 8, 3, bias=False), BatchNorm2d(8).eval()
        >>> folded, act = fold_conv_bn(conv, bn)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.allclose(act(folded(x)), bn(conv(x)), atol=1e-5)
        True
    """
    op = "fold_conv_bn"
    _check_pair(op, layer, bn)
    return _fold(layer, bn), _activation_module(bn)


def _fold(layer: nn.Module, bn: nn.Module) -> nn.Module:
    f64 = {"device": "cpu", "dtype": torch.float64}
    c = _out_channels(layer)
    mean = bn.running_mean.detach().to(**f64)
    var = bn.running_var.detach().to(**f64)
    gamma = bn.weight.detach().to(**f64) if bn.weight is not None else torch.ones(c, **f64)
    beta = bn.bias.detach().to(**f64) if bn.bias is not None else torch.zeros(c, **f64)
    s = gamma / torch.sqrt(var + bn.eps)
    w = layer.weight.detach().to(**f64)
    b = layer.bias.detach().to(**f64) if layer.bias is not None else torch.zeros(c, **f64)
    if isinstance(layer, _CONV_T):
        # weight (in, out/g, *k): output channel o = group · (out/g) + j sits on axis 1 of its group's rows
        g = layer.groups
        shaped = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        scale = s.reshape(g, 1, w.shape[1], *([1] * (w.ndim - 2)))
        w_new = (shaped * scale).reshape(w.shape)
    else:  # Conv (any groups) and Linear: weight (out, ...), output channel on axis 0
        w_new = w * s.reshape(-1, *([1] * (w.ndim - 1)))
    b_new = (b - mean) * s + beta
    folded = copy.deepcopy(layer)
    ref = layer.weight
    like = {"device": ref.device, "dtype": ref.dtype}
    folded.weight = nn.Parameter(w_new.to(**like), requires_grad=ref.requires_grad)
    folded.bias = nn.Parameter(b_new.to(**like), requires_grad=ref.requires_grad)
    return folded


# -- finding pairs ----------------------------------------------------------------------------------
class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _bnlayers.is_bn(m) or _foldable_layer(m) or super().is_leaf_module(m, qualname)


def _pairs_fx(model: nn.Module) -> list[tuple[str, str]]:
    graph = _Tracer().trace(model)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        bn = model.get_submodule(node.target)
        src = node.args[0]
        if not _bnlayers.is_bn(bn) or not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        if len(src.users) != 1 or calls[node.target] != 1 or calls[src.target] != 1:
            continue
        if _foldable_layer(model.get_submodule(src.target)):
            pairs.append((str(src.target), str(node.target)))
    return pairs


def _pairs_sequential(model: nn.Module) -> list[tuple[str, str]]:
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    pairs = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Sequential) or type(m).forward is not nn.Sequential.forward:
            continue
        kids = list(m.named_children())
        for (n1, a), (n2, b) in itertools.pairwise(kids):
            if _foldable_layer(a) and _bnlayers.is_bn(b) and uses[id(a)] == 1 and uses[id(b)] == 1:
                prefix = f"{name}." if name else ""
                pairs.append((prefix + n1, prefix + n2))
    return pairs


def _pairs_record(model: nn.Module, example_inputs: Sequence[Any],
                  rejected: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """Pairs seen in one run of ``model(*example_inputs)`` (module docstring); ``rejected`` gets
    ``{BN name: why}`` for BN layers fed by a supported layer that cannot be folded."""
    calls: Counter = Counter()
    layer_out: dict[str, Any] = {}
    bn_in: dict[str, Any] = {}
    used: list[Any] = []  # every tensor a leaf module or a torch function outside one received (kept
    inside = [0]          # alive, so ids stay unique); depth of leaf-module calls now running
    handles = []

    def post(name: str, kind: str):
        def hook(mod, args, out):
            calls[name] += 1
            if kind == "layer":
                layer_out[name] = out
            elif kind == "bn":
                bn_in[name] = args[0] if len(args) == 1 and isinstance(args[0], torch.Tensor) else None
        return hook

    def enter(mod, args):
        if not inside[0]:
            used.extend(a for a in args if isinstance(a, torch.Tensor))
        inside[0] += 1

    def leave(mod, args, out):
        inside[0] -= 1

    class _Uses(torch.overrides.TorchFunctionMode):
        """Sees uses outside modules (``bn(a) + a``); metadata reads (shape, dtype) are no uses."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if not inside[0] and getattr(func, "__name__", "") not in _METADATA:
                used.extend(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
                used.extend(a for v in (*args, *kwargs.values()) if isinstance(v, (tuple, list))
                            for a in v if isinstance(a, torch.Tensor))
            return func(*args, **kwargs)

    try:
        for name, m in model.named_modules():
            kind = "layer" if _foldable_layer(m) else "bn" if _bnlayers.is_bn(m) else None
            if kind is not None:
                handles.append(m.register_forward_hook(post(name, kind)))
            if kind is not None or next(iter(m.children()), None) is None:
                handles.append(m.register_forward_pre_hook(enter))
                handles.append(m.register_forward_hook(leave, always_call=True))
        with torch.no_grad(), _Uses():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    pairs = []
    for bname, t in bn_in.items():
        src = next((lname for lname, out in layer_out.items() if out is t), None) if t is not None else None
        if src is None:
            continue
        why = None
        if calls[bname] != 1 or calls[src] != 1:
            why = "a layer of the pair is called more than once"
        elif sum(a is t for a in used) != 1:
            why = f"the output of {src} is also used by another layer"
        elif isinstance(model.get_submodule(src), nn.Linear) and t.ndim != 2 \
                and _bnlayers.channel_axis(model.get_submodule(bname)) == 1:
            why = (f"{src} is a Linear on {t.ndim}-D input: the BN normalises axis 1, not the Linear's "
                   f"features on the last axis")
        if why is None:
            pairs.append((src, bname))
        elif rejected is not None:
            rejected[bname] = why
    return pairs


_METADATA = {"__get__", "size", "dim", "numel", "is_contiguous", "stride", "is_floating_point", "type",
             "is_complex", "element_size", "__len__", "data_ptr", "storage_offset"}


def _check_inputs(op: str, model: nn.Module, example_inputs: Any) -> None:
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, (tuple, list)):
        raise TypeError(f"{op}: example_inputs must be a tuple or list of positional inputs, got "
                        f"{type(example_inputs).__name__}; for one tensor x pass example_inputs=(x,)")
    for name, m in _bnlayers.iter_bn(model):
        frozen = type(m).__name__ == "FrozenBatchNorm"
        if m.training and getattr(m, "running_mean", None) is not None and not frozen:
            raise ValueError(f"{op}: BN layer {name or '<model>'} is in training mode: running the model on "
                             f"example_inputs would update its running statistics; call model.eval() first")


def _search(op: str, model: nn.Module, method: str, example_inputs: Any,
            rejected: dict[str, str] | None = None) -> tuple[list[tuple[str, str]], str]:
    """(pairs, how they were found: "fx", "record" or "sequential")."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: expected a torch.nn.Module, got {type(model).__name__}")
    if method not in ("auto", "fx", "sequential", "record"):
        raise ValueError(f"{op}: expected method 'auto', 'fx', 'record' or 'sequential', got {method!r}")
    if example_inputs is not None:
        _check_inputs(op, model, example_inputs)
    if method == "record" and example_inputs is None:
        raise ValueError(f"{op}: method='record' runs the model once: pass example_inputs=(x,)")
    if method == "sequential":
        return _pairs_sequential(model), "sequential"
    if method == "record":
        return _pairs_record(model, example_inputs, rejected), "record"
    try:
        return _pairs_fx(model), "fx"
    except Exception as e:  # symbolic tracing fails on data-dependent control flow and exotic code
        if method == "fx":
            raise ValueError(f"{op}: torch.fx could not trace {type(model).__name__} ({type(e).__name__}: "
                             f"{e}); use method='record' with example_inputs (a recorded run) or "
                             f"method='sequential' (adjacent layers in nn.Sequential)") from e
    if example_inputs is not None:
        return _pairs_record(model, example_inputs, rejected), "record"
    return _pairs_sequential(model), "sequential"


def find_foldable(model: nn.Module, *, method: str = "auto",
                  example_inputs: Sequence[Any] | None = None) -> list[tuple[str, str]]:
    """``(layer name, BN name)`` of every foldable pair in ``model`` (see the module docstring).

    Found pairs are structural: :func:`fold_bn` still checks each pair (eval mode, running statistics,
    channel counts) and raises if one cannot be folded. ``example_inputs`` (a tuple of positional
    inputs) are needed for ``method="record"`` and used by ``"auto"`` when fx cannot trace.
    """
    return _search("find_foldable", model, method, example_inputs)[0]


def _mismatch(got: Any, want: Any, atol: float, rtol: float, where: str = "output") -> str | None:
    """Why two model outputs differ (None: they agree), for tensors in any nesting of containers."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return f"{where}: expected a tensor of shape {tuple(want.shape)}, got {type(got).__name__}"
        if want.is_floating_point() or want.is_complex():
            if torch.allclose(got, want, atol=atol, rtol=rtol, equal_nan=True):
                return None
            return f"{where} differs by up to {(got - want).abs().max().item():.3g}"
        return None if torch.equal(got, want) else f"{where} differs"
    if isinstance(want, Mapping):
        if not isinstance(got, Mapping) or list(got.keys()) != list(want.keys()):
            return f"{where}: the keys differ"
        return next((m for k in want
                     if (m := _mismatch(got[k], want[k], atol, rtol, f"{where}[{k!r}]"))), None)
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            return f"{where}: expected a sequence of {len(want)} items"
        return next((m for i, (g, w) in enumerate(zip(got, want, strict=True))
                     if (m := _mismatch(g, w, atol, rtol, f"{where}[{i}]"))), None)
    try:
        same = bool(got == want)
    except Exception:  # an object without a truth value (e.g. an array): compare the types only
        same = type(got) is type(want)
    return None if same else f"{where}: {got!r} != {want!r}"


def fold_bn(
    model: nn.Module,
    *,
    method: str = "auto",
    inplace: bool = False,
    example_inputs: Sequence[Any] | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> nn.Module:
    """Fold every foldable eval-mode BN of ``model`` into the layer before it.

    Args:
        model: any ``nn.Module`` in eval mode (BN layers in training mode raise; frozen layers fold).
        method: how to find the pairs: ``"auto"``, ``"fx"``, ``"record"`` or ``"sequential"`` (module
            docstring).
        inplace: change ``model`` itself; by default a deep copy is folded and returned.
        example_inputs: optional tuple of positional inputs; when given, the pairs' real input ranks
            are checked, and the folded model's output is compared with the original's: a ValueError
            is raised (nothing changed) if they differ by more than ``atol + rtol·|y|``.

    Returns the folded model (the same class; folded layers replaced, BN layers replaced by
    ``nn.Identity()`` or their fused activation). Pairs are validated and computed before anything is
    replaced, and any error afterwards (a failing forward, an output that differs or cannot be
    compared) restores every replaced module: an error leaves ``model`` unchanged.

    Warns (:class:`FoldWarning`) when it folded a ``Linear → BN`` pair without ``example_inputs``
    (unverified: correct only for 2-D input), when found pairs were rejected, and when fx could not
    trace the model and, with no ``example_inputs`` to record a run, BN layers are left.
    """
    op = "fold_bn"
    for name, v in (("atol", atol), ("rtol", rtol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"{op}: expected {name} a finite number >= 0, got {v!r}")
    rejected: dict[str, str] = {}
    pairs, how = _search(op, model, method, example_inputs, rejected)
    folded: list[tuple[str, nn.Module, str, nn.Module]] = []
    for lname, bname in pairs:
        layer, bn = model.get_submodule(lname), model.get_submodule(bname)
        _check_pair(op, layer, bn, where=f"{lname} -> {bname}")
        folded.append((lname, _fold(layer, bn), bname, _activation_module(bn).train(bn.training)))
    if example_inputs is not None and how != "record":  # fx/sequential cannot see ranks: record them
        seen = _pairs_record(model, example_inputs, rejected)
        folded = [f for f in folded if (f[0], f[2]) in seen or f[2] not in rejected]
    want = None
    if example_inputs is not None:
        with torch.no_grad():
            want = model(*example_inputs)
    target = model if inplace else copy.deepcopy(model)
    originals = [(lname, target.get_submodule(lname), bname, target.get_submodule(bname))
                 for lname, _, bname, _ in folded]
    try:
        for lname, new_layer, bname, act in folded:
            _set(target, lname, new_layer)
            _set(target, bname, act)
        if want is not None:
            with torch.no_grad():
                got = target(*example_inputs)
            why = _mismatch(got, want, atol, rtol)
            if why is not None:
                raise ValueError(f"{op}: the folded model's output differs from the original's ({why}; "
                                 f"atol={atol}, rtol={rtol}); a found pair is not equivalent after folding "
                                 f"(e.g. a layer's output also used outside the BN). Nothing was changed: "
                                 f"fold the pairs you trust with fold_conv_bn")
    except BaseException:
        for lname, old_layer, bname, old_bn in reversed(originals):  # leave an in-place model as it was
            _set(target, lname, old_layer)
            _set(target, bname, old_bn)
        raise
    _warn_unverified(op, folded, rejected, how, example_inputs is not None, method, target)
    return target


def _warn_unverified(op: str, folded, rejected: dict[str, str], how: str, had_inputs: bool, method: str,
                     target: nn.Module) -> None:
    linear = [f"{lname} -> {bname}" for lname, layer, bname, _ in folded if isinstance(layer, nn.Linear)]
    if linear and not had_inputs:
        warnings.warn(f"{op}: folded Linear -> BN pair(s) {', '.join(linear)} without example_inputs: "
                      f"correct only if the Linear sees 2-D (N, C) input (on (N, L, C) a BatchNorm1d "
                      f"normalises L); pass example_inputs=(x,) to check", FoldWarning, stacklevel=3)
    if rejected:
        said = "; ".join(f"{b}: {why}" for b, why in rejected.items())
        warnings.warn(f"{op}: left unfolded: {said}", FoldWarning, stacklevel=3)
    if how == "sequential" and method == "auto":
        left = [n for n, m in _bnlayers.iter_bn(target) if getattr(m, "running_mean", None) is not None]
        if left:
            warnings.warn(f"{op}: torch.fx could not trace {type(target).__name__}, so only adjacent layers "
                          f"of plain nn.Sequential were searched; BN layers left: {', '.join(left)}. Pass "
                          f"example_inputs=(x,) to find the rest by a recorded run", FoldWarning,
                          stacklevel=3)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
