"""Freezing BN layers: running statistics used and never updated, also after model.train(); unfreeze."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers.core_util import assert_empty_batch_changes_nothing
from helpers.lifecycle_models import TinyResNet, randomize_bn
from helpers.util import assert_close
from torch import nn

import batchnorm.core.modules as M
from batchnorm import reference
from batchnorm.lifecycle.freeze import FrozenBatchNorm, freeze, unfreeze


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_frozen_model_survives_train_and_matches_eval_mode_reference():
    model = randomize_bn(TinyResNet())
    convert_half = model.layer1[1]  # mix: some of ours, some torch's
    convert_half.bn1 = M.BatchNorm2d(12)
    randomize_bn(model, seed=3)
    ref = copy.deepcopy(model).eval()
    keys = set(model.state_dict())
    freeze(model)
    assert sum(isinstance(m, FrozenBatchNorm) for m in model.modules()) == 7
    assert set(model.state_dict()) == keys
    model.train()
    state = _bn_state(model)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    for _ in range(2):
        y = model(x)
        y.square().sum().backward()
    y_ref = ref(x_ref)
    y_ref.square().sum().backward()
    assert_close(y, y_ref, rtol=1e-5, atol=1e-6, what="outputs")
    # two backward passes on the frozen side, one on the reference
    assert_close(x.grad, 2 * x_ref.grad, rtol=1e-4, atol=1e-6, what="input grads")
    for k, v in model.state_dict().items():
        if k in state:
            assert torch.equal(v, state[k]), k
    assert model.bn1.weight.grad is None and not model.bn1.weight.requires_grad
    assert model.conv1.weight.grad is not None


def test_train_affine_keeps_gamma_beta_trainable_with_eval_grads():
    bn = randomize_bn(nn.Sequential(nn.BatchNorm1d(3)))[0]
    ref = copy.deepcopy(bn).eval()
    frozen = freeze(bn, train_affine=True)
    assert isinstance(frozen, FrozenBatchNorm) and frozen.train_affine
    frozen.train()
    x = torch.randn(6, 3)
    frozen(x).pow(3).sum().backward()
    ref(x).pow(3).sum().backward()
    assert_close(frozen.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6, what="dγ")
    assert_close(frozen.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-6, what="dβ")


def test_fused_activation_channels_last_against_oracle():
    bn = M.BatchNormAct2d(3, activation="leaky_relu", negative_slope=0.2, channel_axis=-1,
                          dtype=torch.float64)
    randomize_bn(nn.Sequential(bn))
    frozen = freeze(nn.Sequential(bn))[0].train()
    x = torch.randn(2, 4, 4, 3, dtype=torch.float64)
    expect = reference.forward_eval(x.numpy(), bn.running_mean.numpy(), bn.running_var.numpy(),
                                    bn.weight.detach().numpy(), bn.bias.detach().numpy(), eps=bn.eps,
                                    channel_axis=-1, act="leaky_relu", slope=0.2)
    assert_close(frozen(x), expect, rtol=1e-12, atol=1e-12, what="frozen vs oracle")
    assert frozen.activation == "leaky_relu" and frozen.ranks == (4,)


def test_gradcheck_float64():
    fz = FrozenBatchNorm(3, eps=1e-3, activation="elu", negative_slope=0.5, train_affine=True,
                         dtype=torch.float64)
    with torch.no_grad():
        fz.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
        fz.running_var.copy_(torch.tensor([0.5, 1.5, 2.0]))
        fz.weight.copy_(torch.tensor([1.2, 0.7, -0.4]))
    x = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    w = fz.weight

    def f(x_, w_):
        return torch.func.functional_call(fz, {"weight": w_}, (x_,))

    assert torch.autograd.gradcheck(f, (x, w))


def test_unfreeze_restores_original_modules_and_requires_grad_and_follows_dtype():
    a, b = nn.BatchNorm2d(4), M.BatchNormAct2d(4, activation="relu")
    a.bias.requires_grad_(False)
    handle_calls = []
    b.register_forward_hook(lambda *_: handle_calls.append(1))
    model = randomize_bn(nn.Sequential(a, b))
    freeze(model)
    assert not a.weight.requires_grad
    model.double()
    model.eval()
    unfreeze(model)
    assert model[0] is a and model[1] is b
    assert a.weight.requires_grad and not a.bias.requires_grad and b.weight.requires_grad
    assert a.running_mean.dtype == torch.float64 and b.weight.dtype == torch.float64
    assert not a.training and not b.training
    model.train()
    before = a.running_mean.clone()
    model(torch.randn(3, 4, 2, 2, dtype=torch.float64))
    assert not torch.equal(a.running_mean, before)  # trainable again
    assert handle_calls == [1]  # the original's hooks came back with it


def test_deepcopy_and_state_dict_round_trip_while_frozen():
    model = randomize_bn(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)))
    sd = copy.deepcopy(model.state_dict())
    frozen = freeze(copy.deepcopy(model))
    fresh = freeze(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)))
    fresh.load_state_dict(frozen.state_dict())
    for k, v in sd.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    back = unfreeze(copy.deepcopy(frozen))
    assert type(back[1]) is nn.BatchNorm2d
    assert back[1].running_var.data_ptr() != model[1].running_var.data_ptr()


def test_built_directly_and_to_module_by_rank():
    fz = FrozenBatchNorm(5, ranks=(2, 3), activation="relu")
    bn = fz.to_module()
    assert type(bn) is M.BatchNormAct1d and bn.weight is fz.weight and bn.weight.requires_grad
    assert type(FrozenBatchNorm(5, ranks=(5,)).to_module()) is M.BatchNorm3d


def test_error_paths_leave_model_unchanged():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="no running statistics"):
        freeze(model)
    assert type(model[0]) is nn.BatchNorm2d and model[0].weight.requires_grad
    freeze(model, layers=["0"])
    assert isinstance(model[0], FrozenBatchNorm) and type(model[1]) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="not BN layers"):
        freeze(model, layers=["2"])
    with pytest.raises(TypeError, match="list of names"):
        freeze(model, layers="0")
    with pytest.raises(TypeError, match="Module"):
        freeze("model")
    with pytest.raises(ValueError, match="not frozen"):
        unfreeze(model, layers=["1"])
    with pytest.raises(TypeError, match="list of names"):
        unfreeze(model, layers="0")
    lazy = nn.Sequential(nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="lazy"):
        freeze(lazy)
    with pytest.raises(TypeError, match="not a batch-norm layer"):
        FrozenBatchNorm.from_module(nn.Linear(2, 2))
    # a frozen layer without an original and with no single class for its ranks cannot be unfrozen
    both = nn.Sequential(FrozenBatchNorm(3, ranks=(4,)), FrozenBatchNorm(3))
    with pytest.raises(ValueError, match="no single BatchNorm"):
        unfreeze(both)
    assert isinstance(both[0], FrozenBatchNorm)  # nothing replaced
    with pytest.raises(ValueError, match="ranks"):
        FrozenBatchNorm(3, ranks=(1,))
    with pytest.raises(ValueError, match="expected 4-D"):
        both[0](torch.randn(2, 3))
    with pytest.raises(ValueError, match="expected 3 channels"):
        both[1](torch.randn(2, 4))
    assert np.isfinite(both[1](torch.randn(1, 3)).detach().numpy()).all()  # batch of 1 is fine when frozen


def test_frozen_layer_loads_a_version_1_state_dict_like_torch():
    """Issue 16: state dicts saved before num_batches_tracked existed (version 1) load, as in torch."""
    from collections import OrderedDict

    from batchnorm.lifecycle.freeze import FrozenBatchNorm

    src = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        src.running_mean.uniform_()
    old = OrderedDict((k, v) for k, v in src.state_dict().items() if k != "num_batches_tracked")
    old._metadata = OrderedDict({"": {"version": 1}})
    frozen = FrozenBatchNorm(3)
    frozen.load_state_dict(old)
    assert torch.equal(frozen.running_mean, src.running_mean) and int(frozen.num_batches_tracked) == 0
    torch.nn.BatchNorm2d(3).load_state_dict(old)  # the reference behaviour
    new = OrderedDict(old)
    new._metadata = OrderedDict({"": {"version": 2}})  # a version-2 dict without the key: a real miss
    for layer in (FrozenBatchNorm(3), torch.nn.BatchNorm2d(3)):
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            layer.load_state_dict(new)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_train_affine_must_be_a_bool(bad):
    from batchnorm.lifecycle.freeze import FrozenBatchNorm, freeze

    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    with pytest.raises(TypeError, match="train_affine to be True or False"):
        freeze(model, train_affine=bad)
    assert type(model[0]) is torch.nn.BatchNorm2d
    with pytest.raises(TypeError, match="train_affine"):
        FrozenBatchNorm(3, train_affine=bad)


# ---------------------------------------------------------------- empty batch (N = 0), as BatchNorm*
# (assert_empty_batch_changes_nothing: tests/helpers/core_util.py)


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 5), (0, 3, 4, 4), (0, 3, 2, 2, 2)])
@pytest.mark.parametrize("train_affine", [True, False])
@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("training", [True, False])
def test_frozen_empty_batch_changes_nothing(shape, train_affine, activation, training):
    layer = FrozenBatchNorm(3, train_affine=train_affine, activation=activation)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        layer.weight.uniform_(0.5, 2)
        layer.num_batches_tracked.fill_(9)
    layer.train(training)
    assert_empty_batch_changes_nothing(layer, shape)


def test_frozen_empty_batch_channels_last_and_checks():
    layer = FrozenBatchNorm(3, channel_axis=-1, train_affine=True)
    assert_empty_batch_changes_nothing(layer, (0, 4, 4, 3))
    with pytest.raises(ValueError, match="channels"):
        FrozenBatchNorm(3)(torch.randn(0, 4, 2, 2))
    with pytest.raises(ValueError):
        FrozenBatchNorm(3, ranks=(4,))(torch.randn(0, 3))


def test_frozen_model_empty_batch():
    model = freeze(TinyResNet().eval())
    state = copy.deepcopy(model.state_dict())
    y = model(torch.randn(0, 3, 16, 16))
    assert y.shape[0] == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
