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
    if fold:
        fold_bn(work, inplace=True)
    work = convert_to_torch(work, strict=False)
    return work.eval()


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
