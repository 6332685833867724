"""Import torchvision / timm / transformers for the ecosystem tests, or skip with the reason.

The registry's ``torchvision==0.28.0`` wheel is a CUDA build: its compiled ``_C.so`` needs
``libtorch_cuda.so`` and does not load beside the CPU torch. torchvision then still imports its
pure-Python parts, except that ``torchvision/_meta_registrations.py`` registers fake kernels for
``torchvision::nms`` and ``torchvision::qnms`` unconditionally, which fails ("operator
torchvision::nms does not exist") when the library that defines them did not load. The model
definitions we use (ResNet, MobileNetV3, EfficientNet, RegNet, DenseNet, and timm's, which import
torchvision) are pure Python and call no compiled op. So, only when that exact failure happens, we
define the two op *schemas* (no kernel) and import again: calling nms then raises "could not run
torchvision::nms ... CPU backend" loudly, everything else is torchvision as shipped. The
workaround itself is :func:`batchnorm.bench._torchvision.import_torchvision` (the model bench uses it).
"""

from __future__ import annotations

import pytest

from batchnorm.bench._torchvision import import_torchvision as _import_torchvision


def import_torchvision():
    """torchvision, with the two schemas defined where its compiled ops cannot load; or skip."""
    try:
        return _import_torchvision()
    except ModuleNotFoundError:
        pytest.skip("torchvision is not installed (pip install -e '.[test]')")


def import_timm():
    import_torchvision()  # timm imports torchvision
    return pytest.importorskip("timm")


def import_transformers():
    return pytest.importorskip("transformers")
