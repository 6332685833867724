"""Our BN layers in torch's fusion tooling: ``torch.ao.quantization.fuse_modules`` and its QAT variant.

``fuse_modules(model, [["conv", "bn"], ["conv2", "bn2", "relu2"]])`` looks a fuser method up by the
**exact** module types (``(nn.Conv2d, nn.BatchNorm2d)``, ...), so a subclass of torch's BN has none and
the call fails ("did not find fuser method"). :func:`register_fusers` (run once when ``batchnorm`` is
imported) adds entries for our classes to torch's table
(``torch.ao.quantization.fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD``):

    ===============================================  ====================================================
    pattern                                          result (eval: folded; QAT: ``prepare_qat`` ready)
    ===============================================  ====================================================
    ``(ConvNd, BatchNormNd)``                        torch's ``fuse_conv_bn``: folded conv / ``nni.ConvBnNd``
    ``(ConvNd, BatchNormNd, nn.ReLU)``               ``nni.ConvReLUNd`` / ``nni.ConvBnReLUNd``
    ``(ConvNd, BatchNormActNd)`` (fused activation)  as with the separate ``nn.ReLU`` (``LeakyReLU``/``ELU``:
                                                     ``nn.Sequential(fused, activation)``)
    ``(Linear, BatchNorm1d)``, ``(ConvTransposeNd,     torch's ``fuse_linear_bn`` / ``fuse_convtranspose_bn``
    BatchNormNd)``                                   (eval only, as torch)
    ``(BatchNorm2d/3d, nn.ReLU)``                    ``nni.BNReLU2d/3d``
    ===============================================  ====================================================

How: each of our layers is first rebuilt as the matching ``torch.nn.BatchNormNd`` **sharing** its
parameters and buffers (``convert_to_torch``'s rules: ``channel_axis != 1`` and the other settings
torch cannot express raise a ValueError naming the layer), then torch's own fuser method runs. The
folded eval result therefore has torch's numerics; the QAT modules hold a torch BN (fake-quantised
training simulates the deployed model, not our kernels).

``torch.fx.experimental.optimization.fuse`` is different: it matches ``call_module`` nodes of the exact
types ``nn.BatchNormNd``, and ``torch.fx`` traces *through* any module outside ``torch.nn``, so our
layers are never matched there: the model it returns is correct but keeps our BN. Use
:func:`batchnorm.fold_bn` (which knows our layers, fused activations included) to fold for inference.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..core.modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
)

__all__ = ["fuser_method_mapping", "register_fusers"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_PLAIN = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
_ACT = {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d}


def _as_torch(bn: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """``(torch BN sharing bn's tensors, its fused activation module or None)``."""
    from .convert import convert_to_torch

    out = convert_to_torch(bn)  # validates (channel_axis, conventions) with a message naming the layer
    if isinstance(out, nn.Sequential):
        return out[0], out[1]
    return out, None


def _fuse(is_qat: bool, first: nn.Module, bn: nn.Module, act: nn.Module | None = None) -> nn.Module:
    from torch.ao.quantization.fuser_method_mappings import get_fuser_method

    tbn, fused_act = _as_torch(bn)
    if fused_act is not None and act is not None:
        raise ValueError(f"fuse_modules: {type(bn).__name__} already applies {bn.activation!r}; do not list "
                         f"the {type(act).__name__} after it (fuse [conv, bn] only)")
    act = act if act is not None else fused_act
    if act is None:
        return get_fuser_method((type(first), type(tbn)))(is_qat, first, tbn)
    act.train(bn.training)
    if type(act) is nn.ReLU:
        return get_fuser_method((type(first), type(tbn), nn.ReLU))(is_qat, first, tbn, act)
    # torch has no fused Conv+BN+LeakyReLU/ELU module: fuse conv+BN and keep the activation after it.
    return nn.Sequential(get_fuser_method((type(first), type(tbn)))(is_qat, first, tbn), act)


def _fuse_bn_relu(is_qat: bool, bn: nn.Module, relu: nn.Module) -> nn.Module:
    from torch.ao.quantization.fuser_method_mappings import get_fuser_method

    tbn, fused_act = _as_torch(bn)
    if fused_act is not None:
        raise ValueError(f"fuse_modules: {type(bn).__name__} already applies {bn.activation!r}; do not list "
                         f"the {type(relu).__name__} after it")
    return get_fuser_method((type(tbn), nn.ReLU))(is_qat, tbn, relu)


def fuser_method_mapping() -> dict[tuple[type, ...], Callable[..., nn.Module]]:
    """The entries :func:`register_fusers` adds (also usable as ``fuse_modules``'s
    ``fuse_custom_config={"additional_fuser_method_mapping": ...}``)."""
    table: dict[tuple[type, ...], Callable[..., nn.Module]] = {}
    for d, conv in _CONV.items():
        for bn_cls in (_PLAIN[d], _ACT[d]):
            table[(conv, bn_cls)] = _fuse
            table[(conv, bn_cls, nn.ReLU)] = _fuse
            table[(_CONV_T[d], bn_cls)] = _fuse
    for bn_cls in (BatchNorm1d, BatchNormAct1d):
        table[(nn.Linear, bn_cls)] = _fuse
    for d in (2, 3):
        table[(_PLAIN[d], nn.ReLU)] = _fuse_bn_relu
    return table


def register_fusers() -> None:
    """Add :func:`fuser_method_mapping` to torch's default fuser table (idempotent; keeps torch's entries)."""
    from torch.ao.quantization import fuser_method_mappings as fmm

    table = getattr(fmm, "_DEFAULT_OP_LIST_TO_FUSER_METHOD", None)
    if not isinstance(table, dict):  # pragma: no cover - a torch without the table: nothing to extend
        return
    for key, fn in fuser_method_mapping().items():
        table.setdefault(key, fn)
