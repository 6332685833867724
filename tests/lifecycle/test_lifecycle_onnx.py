"""ONNX export of models with our BN modules: standard ops only, onnxruntime agrees with PyTorch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers.lifecycle_models import TinyResNet, randomize_bn
from helpers.util import assert_close
from torch import nn

import batchnorm.core.modules as M
from batchnorm.lifecycle.convert import convert_to_batchnorm
from batchnorm.lifecycle.freeze import freeze
from batchnorm.lifecycle.onnx import export, prepare_for_export

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# Raised inside torch's own exporter (torch.export pytree internals), not by this package.
pytestmark = [
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
]


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _ops(path):
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), "non-standard op domain"
    return [n.op_type for n in model.graph.node]


def test_resnet_with_our_modules_exports_and_matches_onnxruntime(tmp_path):
    model = convert_to_batchnorm(randomize_bn(TinyResNet())).eval()
    assert isinstance(model.bn1, M.BatchNorm2d)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "resnet.onnx"
    export(model, (x,), path)
    ops = _ops(path)
    # every Conv/Linear -> BN pair is folded by the exporter's optimizer; no custom op is left
    assert "Conv" in ops and not any("batchnorm" in o.lower() and o != "BatchNormalization" for o in ops)
    with torch.no_grad():
        want = model(x).numpy()
    assert_close(_run(path, x), want, rtol=1e-4, atol=1e-5, what="onnxruntime vs torch")
    # the model passed in is untouched
    assert isinstance(model.bn1, M.BatchNorm2d) and not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("act", "op"), [("relu", "Relu"), ("leaky_relu", "LeakyRelu")])
def test_batchnorm_act_exports_standard_bn_and_activation(tmp_path, act, op):
    layer = M.BatchNormAct2d(4, activation=act, negative_slope=0.1)
    model = randomize_bn(nn.Sequential(nn.AvgPool2d(1), layer, M.BatchNormAct1d(4, activation="identity")))
    model = nn.Sequential(model[0], model[1], nn.Flatten(2), model[2]).train()  # exported in eval mode
    x = torch.randn(3, 4, 5, 5)
    path = tmp_path / f"{act}.onnx"
    export(model, (x,), path)
    ops = _ops(path)
    assert ops.count("BatchNormalization") == 2 and op in ops
    model.eval()
    with torch.no_grad():
        want = model(x).numpy()
    assert_close(_run(path, x), want, rtol=1e-5, atol=1e-5, what=act)
    assert model[1].activation == act


def test_fold_and_frozen_layers_and_legacy_exporter(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), M.BatchNormAct2d(4, activation="elu", negative_slope=0.5),
                          nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    randomize_bn(model)
    freeze(model, layers=["3"])
    model.eval()
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        want = model(x).numpy()
    prepared = prepare_for_export(model, fold=True)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in prepared.modules())
    path = tmp_path / "folded.onnx"
    export(model, (x,), path, fold=True, dynamo=False, input_names=["x"])
    ops = _ops(path)
    assert "BatchNormalization" not in ops and "Elu" in ops
    assert_close(_run(path, x), want, rtol=1e-5, atol=1e-5, what="folded")


def test_export_errors():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="channel_axis=-1"):
        export(nn.Sequential(M.BatchNorm2d(4, channel_axis=-1)), (x,))
    with pytest.raises(ValueError, match="no running statistics"):
        export(nn.Sequential(M.BatchNorm2d(3, track_running_stats=False)), (x,))
    with pytest.raises(TypeError, match="Module"):
        prepare_for_export("model")
    assert np.isfinite(x.numpy()).all()


def test_direct_torch_export_with_custom_translation_table(tmp_path):
    from batchnorm.lifecycle.onnx import custom_translation_table

    model = nn.Sequential(M.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.2),
                          M.BatchNorm2d(4, channel_axis=-1),
                          M.BatchNormAct2d(4, affine=False, activation="elu"))
    randomize_bn(model).eval()
    x = torch.randn(2, 4, 5, 4)
    path = tmp_path / "direct.onnx"
    torch.onnx.export(model, (x,), path, dynamo=True, custom_translation_table=custom_translation_table())
    ops = _ops(path)
    assert ops.count("BatchNormalization") == 3 and "Transpose" in ops and "LeakyRelu" in ops
    with torch.no_grad():
        want = model(x).numpy()
    assert_close(_run(path, x), want, rtol=1e-5, atol=1e-5, what="direct export")


def test_bn_family_exports_as_its_eval_equivalent(tmp_path):
    """InPlaceABN, BatchRenorm and GhostBatchNorm used to fail inside the exporter (issue 16)."""
    import batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), batchnorm.InPlaceABN2d(4, activation="elu", negative_slope=0.7),
                          nn.Conv2d(4, 4, 1), batchnorm.BatchRenorm2d(4),
                          nn.Conv2d(4, 4, 1), batchnorm.GhostBatchNorm2d(4, virtual_batch_size=2))
    randomize_bn(model)
    with torch.no_grad():
        model[1].weight[0] = 1e-7  # below eps_gamma: the export must use the same gamma_eff
    model.eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        want = model(x).numpy()
    prepared = prepare_for_export(model)
    assert not any(type(m).__module__.startswith("batchnorm") for m in prepared.modules())
    with torch.no_grad():
        assert_close(prepared(x), want, rtol=1e-6, atol=1e-6, what="eval equivalent")
    path = tmp_path / "family.onnx"
    export(model, (x,), path, dynamo=False, input_names=["x"])
    ops = _ops(path)
    assert "Elu" in ops and set(ops) <= {"Conv", "BatchNormalization", "Elu"}  # (the exporter may fuse BN)
    assert_close(_run(path, x), want, rtol=1e-5, atol=1e-5, what="onnxruntime")
