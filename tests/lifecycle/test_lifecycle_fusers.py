"""torch.ao.quantization.fuse_modules (eval and QAT) and torch.fx's fuse on our BN layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.ao.nn import intrinsic as nni
from torch.ao.quantization import fuse_modules, fuse_modules_qat

import batchnorm as bn
from batchnorm.lifecycle.fusers import fuser_method_mapping, register_fusers
from tests.helpers.util import assert_close


def _trained(model, x):
    model.train()
    model(x)
    return model.eval()


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), bn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3), bn.BatchNormAct2d(8),
        nn.Conv2d(8, 8, 3), bn.BatchNormAct2d(8, activation="leaky_relu", negative_slope=0.2),
        nn.Conv2d(8, 8, 1), bn.BatchNorm2d(8),
    ).double()


def test_fuse_modules_eval_matches_unfused():
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    model = _trained(_net(), x)
    groups = [["0", "1", "2"], ["3", "4"], ["5", "6"], ["7", "8"]]
    fused = fuse_modules(copy.deepcopy(model), groups)
    assert type(fused[0]) is nni.ConvReLU2d and type(fused[3]) is nni.ConvReLU2d
    assert type(fused[5]) is nn.Sequential and type(fused[5][1]) is nn.LeakyReLU
    assert type(fused[7]) is nn.Conv2d
    assert not any(isinstance(m, bn.BatchNorm2d | bn.BatchNormAct2d) for m in fused.modules())
    with torch.no_grad():
        assert_close(fused(x), model(x), rtol=1e-10, atol=1e-12, what="fuse_modules eval")


def test_fuse_modules_linear_and_bn_relu():
    x = torch.randn(6, 5, dtype=torch.float64)
    model = _trained(nn.Sequential(nn.Linear(5, 4), bn.BatchNorm1d(4)).double(), x)
    fused = fuse_modules(copy.deepcopy(model), [["0", "1"]])
    assert type(fused[0]) is nn.Linear
    with torch.no_grad():
        assert_close(fused(x), model(x), rtol=1e-10, atol=1e-12, what="linear + bn")
    x4 = torch.randn(2, 3, 4, 4)
    m2 = _trained(nn.Sequential(bn.BatchNorm2d(3), nn.ReLU()), x4)
    f2 = fuse_modules(copy.deepcopy(m2), [["0", "1"]])
    assert type(f2[0]) is nni.BNReLU2d
    with torch.no_grad():
        assert_close(f2(x4), m2(x4), rtol=1e-5, atol=1e-6, what="bn + relu")


@pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning")
def test_fuse_modules_qat_prepares_and_trains():
    model = _trained(_net().float(), torch.randn(4, 3, 12, 12))
    groups = [["0", "1", "2"], ["3", "4"], ["5", "6"]]
    qat = fuse_modules_qat(copy.deepcopy(model).train(), groups)
    assert type(qat[0]) is nni.ConvBnReLU2d and type(qat[3]) is nni.ConvBnReLU2d
    assert type(qat[5]) is nn.Sequential and type(qat[5][0]) is nni.ConvBn2d
    # the torch BN inside carries our layer's statistics and settings
    assert type(qat[0][1]) is nn.BatchNorm2d
    assert torch.equal(qat[0][1].running_mean, model[1].running_mean) and model[1].num_batches_tracked == 1
    assert torch.equal(qat[3][1].running_var, model[4].running_var)
    qat.qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
    prepared = torch.ao.quantization.prepare_qat(qat)
    y = prepared(torch.randn(2, 3, 12, 12))
    y.sum().backward()
    assert y.shape == (2, 8, 6, 6)


def test_fuse_modules_errors_name_the_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn.BatchNormAct2d(4), nn.ReLU()).eval()
    with pytest.raises(ValueError, match="already applies 'relu'"):
        fuse_modules(copy.deepcopy(model), [["0", "1", "2"]])
    nhwc = nn.Sequential(nn.Conv2d(3, 4, 1), bn.BatchNorm2d(4, channel_axis=-1)).eval()
    with pytest.raises(ValueError, match="channel_axis=-1"):
        fuse_modules(nhwc, [["0", "1"]])
    assert type(nhwc[1]) is bn.BatchNorm2d  # left as it was


def test_register_fusers_is_idempotent_and_keeps_torch_entries():
    from torch.ao.quantization import fuser_method_mappings as fmm

    before = dict(fmm._DEFAULT_OP_LIST_TO_FUSER_METHOD)
    register_fusers()
    after = fmm._DEFAULT_OP_LIST_TO_FUSER_METHOD
    assert after == before  # already registered at import
    assert after[(nn.Conv2d, nn.BatchNorm2d)] is fmm.fuse_conv_bn
    for key in fuser_method_mapping():
        assert key in after


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_fx_fuse_keeps_our_layers_and_stays_correct():
    from torch.fx.experimental.optimization import fuse

    x = torch.randn(4, 3, 10, 10, dtype=torch.float64)
    model = _trained(nn.Sequential(nn.Conv2d(3, 8, 3), bn.BatchNorm2d(8)).double(), x)
    fused = fuse(model)
    with torch.no_grad():
        assert_close(fused(x), model(x), rtol=1e-10, atol=1e-12, what="fx fuse")
    # the documented limit: fx's fuse matches the exact types nn.BatchNormNd (and fx traces through
    # our modules), so the BN stays, as a call of torch's functional batch_norm; fold_bn folds it
    targets = [n.target for n in fused.graph.nodes if n.op == "call_function"]
    assert nn.functional.batch_norm in targets
    folded = bn.fold_bn(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    with torch.no_grad():
        assert_close(folded(x), model(x), rtol=1e-10, atol=1e-12, what="fold_bn")
