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
``(N, L, C)`` followed by ``BatchNorm1d`` normalises L, not C, and is not foldable — the automatic
search cannot see input ranks, so check such models with ``fold_bn(..., example_inputs=...)``.

Finding the pairs in a whole model (:func:`find_foldable`):

* ``method="fx"``: ``torch.fx`` symbolic tracing (BN layers are kept as leaves). A pair is folded
  when the BN's only input is the output of a supported layer, that output has no other user, and
  each of the two modules is called exactly once. Works for models whose layers are attributes used
  in ``forward`` (torchvision's ResNet ``self.conv1``/``self.bn1``). Tracing fails on data-dependent
  Python control flow.
* ``method="sequential"``: adjacent children of every plain ``nn.Sequential`` (not of subclasses
  that override ``forward``), modules used once in the model.
* ``method="auto"`` (default): fx, and if tracing fails, sequential.

:func:`fold_bn` replaces each folded layer with its folded copy and each BN with ``nn.Identity()``
(or its activation), keeping the model's class and ``forward`` — the modules are swapped in place of
the attributes the model already calls.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core import _bnlayers

__all__ = ["find_foldable", "fold_bn", "fold_conv_bn"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_SUPPORTED = (*_CONV, *_CONV_T, nn.Linear)
_NAMES = "Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear"


def _foldable_layer(m: nn.Module) -> bool:
    return type(m) in _SUPPORTED


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _activation_module(bn: nn.Module) -> nn.Module:
    return _bnlayers.activation_module(*_bnlayers.activation(bn))


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


def find_foldable(model: nn.Module, *, method: str = "auto") -> list[tuple[str, str]]:
    """``(layer name, BN name)`` of every foldable pair in ``model`` (see the module docstring).

    Found pairs are structural: :func:`fold_bn` still checks each pair (eval mode, running statistics,
    channel counts) and raises if one cannot be folded.
    """
    op = "find_foldable"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: expected a torch.nn.Module, got {type(model).__name__}")
    if method not in ("auto", "fx", "sequential"):
        raise ValueError(f"{op}: expected method 'auto', 'fx' or 'sequential', got {method!r}")
    if method == "sequential":
        return _pairs_sequential(model)
    try:
        return _pairs_fx(model)
    except Exception as e:  # symbolic tracing fails on data-dependent control flow and exotic code
        if method == "fx":
            raise ValueError(f"{op}: torch.fx could not trace {type(model).__name__} ({type(e).__name__}: "
                             f"{e}); use method='sequential' (adjacent layers in nn.Sequential)") from e
        return _pairs_sequential(model)


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
        method: how to find the pairs: ``"auto"``, ``"fx"`` or ``"sequential"`` (module docstring).
        inplace: change ``model`` itself; by default a deep copy is folded and returned.
        example_inputs: optional positional inputs; when given, the folded model's output is compared
            with the original's and a ValueError is raised (nothing changed) if they differ by more than
            ``atol + rtol·|y|`` — the check for pairs whose input rank the search cannot see.

    Returns the folded model (the same class; folded layers replaced, BN layers replaced by
    ``nn.Identity()`` or their fused activation). Pairs are validated and computed before anything is
    replaced: an error leaves ``model`` unchanged.
    """
    op = "fold_bn"
    pairs = find_foldable(model, method=method)
    folded: list[tuple[str, nn.Module, str, nn.Module]] = []
    for lname, bname in pairs:
        layer, bn = model.get_submodule(lname), model.get_submodule(bname)
        _check_pair(op, layer, bn, where=f"{lname} -> {bname}")
        folded.append((lname, _fold(layer, bn), bname, _activation_module(bn).train(bn.training)))
    want = None
    if example_inputs is not None:
        with torch.no_grad():
            want = model(*example_inputs)
    target = model if inplace else copy.deepcopy(model)
    originals = [(lname, target.get_submodule(lname), bname, target.get_submodule(bname))
                 for lname, _, bname, _ in folded]
    for lname, new_layer, bname, act in folded:
        _set(target, lname, new_layer)
        _set(target, bname, act)
    if want is not None:
        with torch.no_grad():
            got = target(*example_inputs)
        if not torch.allclose(got, want, atol=atol, rtol=rtol):
            for lname, old_layer, bname, old_bn in originals:  # leave an in-place model as it was
                _set(target, lname, old_layer)
                _set(target, bname, old_bn)
            err = (got - want).abs().max().item()
            raise ValueError(f"{op}: the folded model's output differs from the original's by up to "
                             f"{err:.3g} (atol={atol}, rtol={rtol}); a found pair is not equivalent after "
                             f"folding (e.g. Linear on (N, L, C) input followed by BatchNorm1d). Fold the "
                             f"pairs you trust "
                             f"with fold_conv_bn, or use method='sequential'")
    return target


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
