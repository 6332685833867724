"""Import torchvision's pure-Python model definitions where its compiled ops do not load.

The registry's CUDA-built torchvision wheel has a compiled ``_C.so`` that needs ``libtorch_cuda.so``
and does not load beside a CPU torch. torchvision then still imports its pure-Python parts, except
that ``torchvision/_meta_registrations.py`` registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` unconditionally, which fails ("operator torchvision::nms does not exist").
The model definitions (ResNet, MobileNetV3, EfficientNet, ...) call no compiled op. So, only when
that exact failure happens, the two op *schemas* (no kernel) are defined and the import retried:
calling nms then raises "could not run torchvision::nms ... CPU backend" loudly; everything else is
torchvision as shipped.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import torch

__all__ = ["import_torchvision"]

_LIB = None


def _purge(prefix: str) -> None:
    for k in [k for k in sys.modules if k == prefix or k.startswith(prefix + ".")]:
        del sys.modules[k]


def import_torchvision() -> ModuleType:
    """torchvision, with the nms/qnms schemas defined where its compiled ops cannot load.

    Raises ModuleNotFoundError where torchvision is not installed, and any other import error as is.
    """
    global _LIB
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:
        if "torchvision::" not in str(e) or _LIB is not None:
            raise
        _purge("torchvision")
    _LIB = torch.library.Library("torchvision", "FRAGMENT")
    for name in ("nms", "qnms"):  # the schemas of torchvision/csrc/ops/nms.cpp
        if not hasattr(torch.ops.torchvision, name):
            _LIB.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return importlib.import_module("torchvision")
