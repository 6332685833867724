"""Export models that use this package's BN modules to ONNX with standard operators only.

Our modules run BN through custom code — an ``autograd.Function`` in eager mode and the
``batchnorm::*`` custom ops (:mod:`batchnorm.core.ops`) under ``torch.compile``/``torch.export`` — and no
ONNX exporter knows those ops: ``torch.onnx.export`` on such a model fails (dynamo exporter:
"Failed to convert the exported program"), or, with the TorchScript exporter, unrolls the maths
into loose ``Sub``/``Mul``/``Add`` nodes. :func:`export` takes the robust route: it exports a
**copy** of the model in which every BN module of ours is replaced by ``torch.nn.BatchNorm*`` with
the same tensors (:func:`batchnorm.lifecycle.convert.convert_to_torch`; fused activations become separate
``ReLU``/``LeakyRelu``/``Elu`` nodes, frozen layers become eval-mode BN), so the exporter emits the
standard ``BatchNormalization`` operator — or folds it into the preceding ``Conv``, which both
exporters do for ``Conv → BN`` when constant folding is on. ``fold=True`` folds Conv/Linear → BN pairs
first with :func:`batchnorm.lifecycle.fold.fold_bn` (in float64; exact also for channels with tiny variance).

The model is exported in **eval mode** (running statistics; BN in training mode has no static ONNX
form). The model you pass is not modified. Layers with ``channel_axis != 1`` raise (ONNX's
BatchNormalization normalises axis 1: permute your data to channels-first).

Example:
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8)).eval()
    >>> export(model, (torch.randn(1, 3, 32, 32),), "model.onnx")
    >>> # onnxruntime.InferenceSession("model.onnx").run(None, {"x": ...})

Alternatively, call ``torch.onnx.export(model, args, f, dynamo=True,
custom_translation_table=custom_translation_table())`` on the model itself: the table maps our
``batchnorm::eval_forward`` op to ``BatchNormalization`` (+ the activation; ``Transpose`` around it for
``channel_axis != 1``). Training-mode BN (``batchnorm::train_forward``) has no translation.

Requires the ``onnx`` extra (``onnx``, ``onnxscript`` for the default dynamo exporter).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..core import _bnlayers
from .convert import convert_to_torch
from .fold import fold_bn
from .freeze import FrozenBatchNorm, unfreeze

__all__ = ["custom_translation_table", "export", "prepare_for_export"]


def prepare_for_export(model: nn.Module, *, fold: bool = False) -> nn.Module:
    """The copy :func:`export` hands to ``torch.onnx.export``: eval mode, torch BN modules only.

    The BN family becomes its eval-mode equivalent first: BatchRenorm and GhostBatchNorm a
    ``BatchNormNd`` with their running statistics, InPlace-ABN a ``BatchNormNd`` (with
    ``γ_eff``) and its activation — exactly what they compute in eval mode. Not exportable (a
    ValueError says why): layers with ``channel_axis != 1`` and layers without running statistics.

    Useful to export with your own exporter settings, or with another exporter (TensorRT, OpenVINO,
    coremltools) that knows ``torch.nn.BatchNorm*`` but not our modules. ``model`` is not modified.
    """
    op = "batchnorm.onnx.prepare_for_export"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: expected a torch.nn.Module, got {type(model).__name__}")
    for name, m in _bnlayers.iter_bn(model):
        if _bnlayers.channel_axis(m) != 1:
            raise ValueError(f"{op}: BN layer {name or '<model>'} normalises channel_axis="
                             f"{_bnlayers.channel_axis(m)}, but ONNX BatchNormalization normalises axis 1; "
                             f"permute the data to channels-first and build the layer with channel_axis=1")
        if getattr(m, "running_mean", None) is None:
            raise ValueError(f"{op}: BN layer {name or '<model>'} has no running statistics "
                             f"(track_running_stats=False), so it normalises with batch statistics even in "
                             f"eval mode, which ONNX BatchNormalization cannot express; recalibrate a layer "
                             f"with running statistics (batchnorm.lifecycle.recalibrate) instead")
    work = copy.deepcopy(model)
    if any(isinstance(m, FrozenBatchNorm) for m in work.modules()):
        work = unfreeze(work)
    work.eval()
    work = _family_to_eval_equivalent(work)
    if fold:
        fold_bn(work, inplace=True)
    work = convert_to_torch(work, strict=False)
    return work.eval()


_TORCH_BN_FOR_RANKS = {(2, 3): nn.BatchNorm1d, (4,): nn.BatchNorm2d, (5,): nn.BatchNorm3d}


def _family_to_eval_equivalent(work: nn.Module) -> nn.Module:
    """Replace the BN variants with their own forward by what they compute in eval mode, in torch
    modules the exporters know: BatchRenorm and GhostBatchNorm normalise with the running statistics
    exactly like ``BatchNormNd``; InPlace-ABN is ``BatchNormNd`` with ``γ_eff`` (see
    :func:`batchnorm.family.inplace.effective_weight`) followed by its activation. (Exported as they
    are, the exporters would trace into the numba kernels and fail with their own errors.)"""
    import torch

    from ..family.ghost import _GhostBatchNorm
    from ..family.inplace import _InPlaceABN, effective_weight
    from ..family.renorm import _BatchRenorm

    replace = {}
    for name, m in work.named_modules():
        if not isinstance(m, (_BatchRenorm, _GhostBatchNorm, _InPlaceABN)):
            continue
        cls = _TORCH_BN_FOR_RANKS.get(tuple(type(m)._ranks))
        if cls is None:
            raise ValueError(f"batchnorm.onnx.prepare_for_export: layer {name or '<model>'} "
                             f"({type(m).__name__}) accepts input ranks {type(m)._ranks}, which match no "
                             f"torch BatchNorm1d/2d/3d; rebuild it as a BatchNorm*d-ranked variant")
        ref = m.running_mean
        bn = cls(m.num_features, m.eps, m.momentum, m.affine, True, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            bn.running_mean.copy_(m.running_mean)
            bn.running_var.copy_(m.running_var)
            if m.affine:
                w = m.weight
                if isinstance(m, _InPlaceABN):
                    w = effective_weight(m.weight, m.eps_gamma, m.num_features, w.dtype, w.device)
                bn.weight.copy_(w)
                bn.bias.copy_(m.bias)
        act = _bnlayers.activation(m) if isinstance(m, _InPlaceABN) else ("identity", 0.0)
        new = bn if act[0] == "identity" else nn.Sequential(bn, _bnlayers.activation_module(*act))
        replace[name] = new.eval()
    for name, new in replace.items():
        if not name:
            return new
        parent, _, attr = name.rpartition(".")
        setattr(work.get_submodule(parent) if parent else work, attr, new)
    return work


def export(
    model: nn.Module,
    args: Sequence[Any],
    f: str | os.PathLike | None = None,
    *,
    fold: bool = False,
    dynamo: bool = True,
    **kwargs: Any,
) -> Any:
    """``torch.onnx.export`` of an eval-mode copy of ``model`` with our BN modules made standard.

    Args:
        model: any ``nn.Module`` (ours, torch's or mixed BN layers; BatchNormAct; FrozenBatchNorm).
        args: example positional inputs, as for ``torch.onnx.export``.
        f: the ``.onnx`` file to write (None: only return the exporter's result).
        fold: fold Conv/Linear → BN pairs first (float64), leaving no BatchNormalization after a
            supported layer.
        dynamo: use the torch.export-based exporter (default, PyTorch's default since 2.9; needs
            onnxscript) or the legacy TorchScript one (``False``; deprecated by PyTorch).
        **kwargs: passed to ``torch.onnx.export`` (``input_names``, ``output_names``,
            ``dynamic_shapes``/``dynamic_axes``, ``opset_version``, ...).

    Returns what ``torch.onnx.export`` returns (an ``ONNXProgram`` with ``dynamo=True``).
    """
    import torch.onnx

    work = prepare_for_export(model, fold=fold)
    return torch.onnx.export(work, tuple(args), f, dynamo=dynamo, **kwargs)


def _eval_forward_onnx(x, mean, var, weight, bias, eps: float, channel_axis: int, act: str, slope: float):
    """onnxscript translation of ``batchnorm::eval_forward`` (traced: attributes are Python values)."""
    from onnxscript import opset18 as op

    if weight is None:
        weight = op.Expand(op.CastLike(op.Constant(value_float=1.0), mean), op.Shape(mean))
    if bias is None:
        bias = op.Expand(op.CastLike(op.Constant(value_float=0.0), mean), op.Shape(mean))
    perm = None
    if channel_axis != 1:
        rank = len(x.shape) if x.shape is not None else None
        if rank is None:
            raise ValueError("batchnorm.onnx: channel_axis != 1 needs an input of known rank to export")
        perm = [0, channel_axis, *[d for d in range(1, rank) if d != channel_axis]]
        x = op.Transpose(x, perm=perm)
    y = op.BatchNormalization(x, weight, bias, mean, var, epsilon=float(eps))
    if perm is not None:
        inverse = [perm.index(d) for d in range(len(perm))]
        y = op.Transpose(y, perm=inverse)
    if act == "relu":
        y = op.Relu(y)
    elif act == "leaky_relu":
        y = op.LeakyRelu(y, alpha=float(slope))
    elif act == "elu":
        y = op.Elu(y, alpha=float(slope))
    return y


def custom_translation_table() -> dict[Any, Any]:
    """``{torch.ops.batchnorm.eval_forward.default: translation}`` for ``torch.onnx.export(dynamo=True)``.

    Lets the torch.export-based exporter translate our eval-mode op directly (the model keeps its own
    modules; no copy). Example::

        torch.onnx.export(model.eval(), (x,), "m.onnx", dynamo=True,
                          custom_translation_table=batchnorm.lifecycle.onnx.custom_translation_table())
    """
    import torch

    from ..core import ops  # noqa: F401 - registers torch.ops.batchnorm.*

    return {torch.ops.batchnorm.eval_forward.default: _eval_forward_onnx}
