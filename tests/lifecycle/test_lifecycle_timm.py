"""timm interop: BatchNormAct2d / SyncBatchNormAct through convert_to_batchnorm, and timm_norm_layer."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import batchnorm as bn
from batchnorm.core.modules import _BatchNorm
from batchnorm.lifecycle.convert import TimmBatchNormAct2d, TimmSyncBatchNormAct
from tests.helpers.ecosystem import import_timm
from tests.helpers.util import assert_close

timm = import_timm()
norm_act = timm.layers.norm_act


def _fill_stats(layer):
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return layer


@pytest.mark.parametrize("act_layer,fused", [(nn.ReLU, "relu"), (nn.SiLU, None), (nn.Hardswish, None),
                                             (functools.partial(nn.LeakyReLU, 0.2), "leaky_relu"),
                                             (nn.ELU, "elu"), (None, "identity")])
def test_timm_bnact_converts_with_same_activation_and_keys(act_layer, fused):
    ref = _fill_stats(norm_act.BatchNormAct2d(6, act_layer=act_layer, apply_act=act_layer is not None))
    ref = ref.double()
    ours = bn.convert_to_batchnorm(copy.deepcopy(ref))
    assert type(ours) is TimmBatchNormAct2d
    assert list(ours.state_dict()) == list(ref.state_dict())
    if fused is None:  # run as timm's very module after our BN
        assert ours.activation == "identity" and type(ours.act) is type(ref.act)
    else:
        assert ours.activation == fused and type(ours.act) is nn.Identity
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    for mode in ("train", "eval"):
        getattr(ref, mode)()
        getattr(ours, mode)()
        yr, yo = ref(x), ours(x)
        assert_close(yo, yr, rtol=1e-10, atol=1e-12, what=f"{act_layer} {mode}")
        (gr,) = torch.autograd.grad(yr.sum(), x)
        (go,) = torch.autograd.grad(yo.sum(), x)
        assert_close(go, gr, rtol=1e-9, atol=1e-11, what=f"{act_layer} {mode} grad")
    for a, b in zip(ref.buffers(), ours.buffers()):
        assert_close(b, a, rtol=1e-12, atol=1e-12, what="running statistics")


def test_timm_drop_layer_is_kept_and_not_fused():
    ref = norm_act.BatchNormAct2d(4, act_layer=nn.ReLU, drop_layer=lambda: nn.Dropout(0.5))
    ours = bn.convert_to_batchnorm(copy.deepcopy(ref))
    assert ours.activation == "identity" and type(ours.drop) is nn.Dropout and type(ours.act) is nn.ReLU
    x = torch.randn(3, 4, 4, 4)
    torch.manual_seed(3)
    yr = ref(x)
    torch.manual_seed(3)
    yo = ours(x)
    assert_close(yo, yr, rtol=1e-5, atol=1e-6, what="drop then act")


@pytest.mark.parametrize("name,count", [("efficientnet_b0", 49), ("mobilenetv3_small_100", 34),
                                        ("regnety_002", 44)])
def test_timm_models_convert_every_layer_and_back(name, count):
    model = timm.create_model(name, pretrained=False, num_classes=5).eval()
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    bn.convert_to_batchnorm(model)
    ours = [m for m in model.modules() if isinstance(m, bn.TimmBatchNormAct2d)]
    left = [m for m in model.modules() if type(m) in (norm_act.BatchNormAct2d, nn.BatchNorm2d)]
    assert len(ours) == count and not left
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5, what=name)
    back = bn.convert_to_torch(model)
    assert sum(type(m) is norm_act.BatchNormAct2d for m in back.modules()) == count
    assert list(back.state_dict()) == keys
    with torch.no_grad():
        assert_close(back(x), ref(x), rtol=1e-4, atol=1e-5, what=f"{name} back to timm")


def test_timm_sync_bnact_converts():
    ref = norm_act.convert_sync_batchnorm(nn.Sequential(norm_act.BatchNormAct2d(4, act_layer=nn.SiLU)))
    assert type(ref[0]) is norm_act.SyncBatchNormAct
    ours = bn.convert_to_batchnorm(copy.deepcopy(ref))
    assert type(ours[0]) is TimmSyncBatchNormAct and type(ours[0].act) is nn.SiLU
    assert isinstance(ours[0], bn.SyncBatchNorm)
    x = torch.randn(3, 4, 5, 5)
    ref.eval()
    ours.eval()
    assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6, what="sync eval")  # no process group: eval path
    back = bn.convert_to_torch(ours)
    assert type(back[0]) is norm_act.SyncBatchNormAct and type(back[0].act) is nn.SiLU


def test_timm_frozen_layer_is_left_alone():
    frozen = norm_act.FrozenBatchNormAct2d(4)
    out = bn.convert_to_batchnorm(nn.Sequential(frozen))
    assert out[0] is frozen


def test_timm_subclass_of_bnact_is_not_converted():
    class Custom(norm_act.BatchNormAct2d):
        def forward(self, x):
            return super().forward(x) * 2

    layer = Custom(4)
    assert bn.convert_to_batchnorm(nn.Sequential(layer))[0] is layer


@pytest.mark.parametrize("name,act", [("efficientnet_b0", nn.SiLU), ("regnety_002", nn.ReLU),
                                      ("resnet18", None)])
def test_timm_create_model_with_our_norm_layer(name, act):
    factory = bn.timm_norm_layer()
    model = timm.create_model(name, pretrained=False, num_classes=5, norm_layer=factory)
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm | _BatchNorm)]
    assert layers and all(type(m) is TimmBatchNormAct2d for m in layers)
    if act is None:  # ResNet applies its own activation: our layer must add none
        assert all(m.activation == "identity" and type(m.act) is nn.Identity for m in layers)
    else:  # the model's activation is bound to every layer that timm builds as norm + act
        assert any(type(m.act) is act or m.activation == act.__name__.lower() for m in layers)
    ref = timm.create_model(name, pretrained=False, num_classes=5)
    model.load_state_dict(ref.state_dict())
    model.eval()
    ref.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5, what=f"{name} with timm_norm_layer")


def test_timm_norm_layer_defaults_are_bound():
    factory = bn.timm_norm_layer(eps=1e-3, momentum=0.01)
    layer = timm.layers.get_norm_act_layer(factory, nn.SiLU)(8)
    assert (layer.eps, layer.momentum, type(layer.act)) == (1e-3, 0.01, nn.SiLU)


def test_timm_norm_layer_refuses_a_timm_that_would_drop_activations(monkeypatch):
    cna = timm.layers.create_norm_act
    monkeypatch.setattr(cna, "get_norm_act_layer", lambda norm_layer, act_layer=None: norm_layer)
    with pytest.raises(RuntimeError, match="lose their activations"):
        bn.timm_norm_layer()
    monkeypatch.setattr(cna, "_NORM_ACT_TYPES", frozenset())
    with pytest.raises(RuntimeError, match="_NORM_ACT_TYPES"):
        bn.timm_norm_layer()


def test_timm_bnact_builds_timm_activation_names():
    layer = TimmBatchNormAct2d(4, act_layer="silu")
    assert type(layer.act) is nn.SiLU and layer.activation == "identity"
    layer = TimmBatchNormAct2d(4, act_layer=nn.GELU)  # no inplace argument
    assert type(layer.act) is nn.GELU
