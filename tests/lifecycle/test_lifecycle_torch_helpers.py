"""Torch (and timm) helpers that find BN layers with isinstance, run on our layers.

Each helper is compared with what it does to torch's own layer. Where the helper rebuilds a bare torch
layer and so drops our fused activation (``nn.SyncBatchNorm.convert_sync_batchnorm``, timm's
``freeze_batch_norm_2d``), the test pins that down and checks our replacement
(``batchnorm.convert_sync_batchnorm``, ``batchnorm.freeze``) keeps it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm as bn
from tests.helpers.util import assert_close

_TORCH_BN = nn.modules.batchnorm._BatchNorm


def _net(ours: bool, act: bool = False):
    torch.manual_seed(0)
    norm = (bn.BatchNormAct2d(6) if act else bn.BatchNorm2d(6)) if ours else nn.BatchNorm2d(6)
    return nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), norm, nn.Flatten(), nn.Linear(6 * 4 * 4, 3))


def test_our_layers_are_torch_bn_for_isinstance():
    for layer in (bn.BatchNorm1d(3), bn.BatchNorm2d(3), bn.BatchNorm3d(3), bn.BatchNormAct2d(3),
                  bn.TimmBatchNormAct2d(3)):
        assert isinstance(layer, _TORCH_BN), type(layer).__name__
    assert isinstance(bn.BatchNorm2d(3), nn.BatchNorm2d) and isinstance(bn.BatchNorm1d(3), nn.BatchNorm1d)


def test_weight_decay_param_groups_skip_our_bn():
    model = _net(ours=True)
    no_decay = {id(p) for m in model.modules() if isinstance(m, _TORCH_BN) for p in m.parameters()}
    decay = [p for p in model.parameters() if id(p) not in no_decay]
    assert no_decay == {id(model[1].weight), id(model[1].bias)}
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4},
                           {"params": [p for p in model.parameters() if id(p) in no_decay],
                            "weight_decay": 0.0}], lr=0.1)
    assert len(opt.param_groups[1]["params"]) == 2


def test_swa_update_bn_recomputes_our_statistics():
    from torch.optim.swa_utils import update_bn

    g = torch.Generator().manual_seed(1)
    loader = [torch.randn(5, 3, 6, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    ref, ours = _net(ours=False).double(), _net(ours=True).double()
    ours.load_state_dict(ref.state_dict())
    for model in (ref, ours):
        model.train()
        model(torch.randn(4, 3, 6, 6, dtype=torch.float64) * 5)  # statistics update_bn must replace
        update_bn(loader, model)
    assert ours[1].momentum == 0.1  # restored
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(ours[1], name), getattr(ref[1], name), rtol=1e-12, atol=1e-12, what=name)


def test_torch_convert_sync_batchnorm_drops_our_activation_and_ours_keeps_it():
    model = _net(ours=True, act=True).eval()
    x = torch.randn(2, 3, 6, 6)
    want = model(x)
    torch_sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert type(torch_sync[1]) is nn.SyncBatchNorm  # torch rebuilt a bare layer: the ReLU is gone
    assert not torch.allclose(torch_sync(x), want)
    ours = bn.convert_sync_batchnorm(copy.deepcopy(model))
    assert isinstance(ours[1], bn.SyncBatchNorm) and ours[1].activation == "relu"
    assert_close(ours(x), want, rtol=1e-5, atol=1e-6, what="batchnorm.convert_sync_batchnorm")


def test_torch_convert_sync_batchnorm_on_plain_layer_keeps_numbers():
    model = _net(ours=True).eval()
    x = torch.randn(2, 3, 6, 6)
    torch_sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert type(torch_sync[1]) is nn.SyncBatchNorm
    assert_close(torch_sync(x), model(x), rtol=1e-5, atol=1e-6, what="torch convert_sync_batchnorm")


def test_func_replace_all_batch_norm_modules_then_vmap():
    from torch.func import functional_call, replace_all_batch_norm_modules_, vmap

    model = _net(ours=True).double()
    replace_all_batch_norm_modules_(model)
    layer = model[1]
    assert layer.running_mean is None and layer.running_var is None and not layer.track_running_stats
    xs = torch.randn(3, 4, 3, 6, 6, dtype=torch.float64)  # 3 independent batches of 4
    params = dict(model.named_parameters())
    out = vmap(lambda x: functional_call(model, params, (x,)))(xs)
    want = torch.stack([model(x) for x in xs])
    assert_close(out, want, rtol=1e-10, atol=1e-12, what="vmap after replace_all_batch_norm_modules_")


def test_timm_freeze_batch_norm_2d_on_our_layers():
    from tests.helpers.ecosystem import import_timm

    timm = import_timm()
    plain = _net(ours=True).eval()
    x = torch.randn(2, 3, 6, 6)
    frozen = timm.layers.freeze_batch_norm_2d(copy.deepcopy(plain))
    assert type(frozen[1]).__name__ == "FrozenBatchNorm2d"
    assert_close(frozen(x), plain(x), rtol=1e-5, atol=1e-6, what="timm freeze, plain BN")
    fused = _net(ours=True, act=True).eval()
    timm_frozen = timm.layers.freeze_batch_norm_2d(copy.deepcopy(fused))
    # timm rebuilds a bare FrozenBatchNorm2d for any nn.BatchNorm2d: our fused ReLU is dropped
    assert not torch.allclose(timm_frozen(x), fused(x))
    ours = bn.freeze(copy.deepcopy(fused))
    assert_close(ours(x), fused(x), rtol=1e-5, atol=1e-6, what="batchnorm.freeze keeps the activation")


@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU])
def test_timm_freeze_batch_norm_2d_on_converted_timm_layer(act):
    from tests.helpers.ecosystem import import_timm

    timm = import_timm()
    layer = bn.convert_to_batchnorm(timm.layers.BatchNormAct2d(4, act_layer=act)).eval()
    x = torch.randn(2, 4, 3, 3)
    frozen = timm.layers.freeze_batch_norm_2d(copy.deepcopy(layer))
    same = torch.allclose(frozen(x), layer(x), atol=1e-6)
    # timm's isinstance(BatchNormAct2d) is false for ours: it builds a FrozenBatchNorm2d without act
    assert not same
