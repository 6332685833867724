"""Conversion torch.nn.BatchNorm* <-> ours: parameters, buffers, mode, dtype, device, requires_grad kept."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.lifecycle_models import TinyResNet, randomize_bn
from helpers.util import assert_close
from torch import nn

import batchnorm.core.modules as M
from batchnorm.family.sync import SyncBatchNorm
from batchnorm.lifecycle.convert import convert_to_batchnorm, convert_to_torch


def _bn_types(model):
    return [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm | M._BatchNorm)]


def test_torchvision_like_model_round_trip_same_outputs_and_shared_tensors():
    ref = randomize_bn(TinyResNet()).eval()
    model = copy.deepcopy(ref)
    x = torch.randn(4, 3, 8, 8)
    params_before = {n: p for n, p in model.named_parameters()}
    model.layer1[0].bn1.weight.requires_grad_(False)
    out = convert_to_batchnorm(model)
    assert out is model
    types = _bn_types(model)
    assert len(types) == 7 and all(t in (M.BatchNorm1d, M.BatchNorm2d) for t in types)
    assert type(model.bn_fc) is M.BatchNorm1d and type(model.layer1[1].downsample[1]) is M.BatchNorm2d
    # same Parameter objects (an optimizer built before still works), requires_grad kept
    for n, p in model.named_parameters():
        assert p is params_before[n], n
    assert not model.layer1[0].bn1.weight.requires_grad
    assert set(model.state_dict()) == set(ref.state_dict())
    with torch.no_grad():
        assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5, what="eval outputs")
    # training mode: same outputs and the same running statistics afterwards
    model.train()
    ref.train()
    assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5, what="train outputs")
    for (n, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert_close(a.reshape(-1), b.reshape(-1), rtol=1e-5, atol=1e-6, what=n)
    back = convert_to_torch(model)
    assert all(t in (nn.BatchNorm1d, nn.BatchNorm2d) for t in _bn_types(back))
    for n, p in back.named_parameters():
        assert p is params_before[n], n
    back.eval()
    ref.eval()
    with torch.no_grad():
        assert_close(back(x), ref(x), rtol=1e-5, atol=1e-5, what="round trip")


def test_mode_dtype_are_kept_per_layer():
    model = nn.Sequential(nn.BatchNorm1d(3, dtype=torch.float64),
                          nn.BatchNorm3d(2, affine=False, momentum=None),
                          nn.BatchNorm2d(4, eps=1e-3, track_running_stats=False))
    model[0].eval()
    convert_to_batchnorm(model)
    a, b, c = model
    assert (type(a), type(b), type(c)) == (M.BatchNorm1d, M.BatchNorm3d, M.BatchNorm2d)
    assert not a.training and b.training and c.training
    assert a.weight.dtype == torch.float64 and a.running_mean.dtype == torch.float64
    assert b.weight is None and b.momentum is None and b.running_mean.dtype == torch.float32
    assert c.eps == 1e-3 and c.running_mean is None and c.weight.device.type == "cpu"


def test_sync_batchnorm_both_ways_keeps_process_group():
    group = object()  # any process-group handle is passed through untouched
    model = nn.Sequential(nn.Linear(2, 3), nn.SyncBatchNorm(3, process_group=group))
    convert_to_batchnorm(model)
    assert type(model[1]) is SyncBatchNorm and model[1].process_group is group
    convert_to_torch(model)
    assert type(model[1]) is nn.SyncBatchNorm and model[1].process_group is group


def test_fused_activation_splits_and_fuses_back_with_original_keys():
    model = nn.Sequential(M.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.2),
                          M.BatchNormAct1d(3),
                          M.BatchNormAct3d(2, activation="elu", negative_slope=0.7))
    randomize_bn(model).eval()
    keys = set(model.state_dict())
    ref = copy.deepcopy(model)
    convert_to_torch(model)
    assert isinstance(model[0], nn.Sequential) and type(model[0][1]) is nn.LeakyReLU
    assert model[0][1].negative_slope == 0.2 and type(model[2][1]) is nn.ELU and model[2][1].alpha == 0.7
    assert not model[0].training and not model[0][0].training
    x = torch.randn(5, 4, 3, 3)
    assert_close(model[0](x), ref[0](x), rtol=1e-6, atol=1e-6, what="split leaky")
    convert_to_batchnorm(model, fuse_activations=True)
    assert [type(m) for m in model] == [M.BatchNormAct2d, M.BatchNormAct1d, M.BatchNormAct3d]
    assert model[0].activation == "leaky_relu" and model[2].negative_slope == 0.7
    assert set(model.state_dict()) == keys


def test_model_that_is_a_bn_layer_and_nested_subclass_left_alone():
    class MyBN(nn.BatchNorm2d):
        def forward(self, x):  # a different computation: must not be converted
            return super().forward(x) * 2

    bn = nn.BatchNorm2d(3)
    new = convert_to_batchnorm(bn)
    assert type(new) is M.BatchNorm2d and new.weight is bn.weight
    model = nn.Sequential(MyBN(3))
    convert_to_batchnorm(model)
    assert type(model[0]) is MyBN


def test_rejections_leave_model_unchanged():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.LazyBatchNorm1d())
    with pytest.raises(ValueError, match="lazy layer"):
        convert_to_batchnorm(model)
    assert type(model[0]) is nn.BatchNorm2d  # validated before replacing anything
    with pytest.raises(TypeError, match=r"nn\.Module"):
        convert_to_batchnorm([nn.BatchNorm2d(3)])

    cases = [
        (M.BatchNorm2d(3, channel_axis=-1), "channel_axis=-1"),
        (M.BatchNorm2d(3, running_var_unbiased=False), "running_var_unbiased=False"),
        (M.BatchNorm2d(3, nonfinite="skip"), "nonfinite='skip'"),
        (SyncBatchNorm(3, timeout=5.0), "timeout"),
    ]
    for layer, msg in cases:
        model = nn.Sequential(M.BatchNorm1d(2), layer)
        with pytest.raises(ValueError, match=msg):
            convert_to_torch(model)
        assert type(model[0]) is M.BatchNorm1d and model[1] is layer
    lenient = convert_to_torch(nn.Sequential(M.BatchNorm2d(3, running_var_unbiased=False)), strict=False)
    assert type(lenient[0]) is nn.BatchNorm2d


def test_bn_variant_with_own_forward_strict_and_lenient():
    renorm = pytest.importorskip("batchnorm.family.renorm")
    layer = renorm.BatchRenorm2d(3)
    model = nn.Sequential(M.BatchNorm2d(3), layer)
    with pytest.raises(ValueError, match="own forward"):
        convert_to_torch(model)
    assert type(model[0]) is M.BatchNorm2d
    convert_to_torch(model, strict=False)
    assert type(model[0]) is nn.BatchNorm2d and model[1] is layer
