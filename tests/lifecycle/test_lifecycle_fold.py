"""Folding eval-mode BN into Conv/ConvTranspose/Linear: one pair, whole models, limits and errors."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.lifecycle_models import TinyResNet, randomize_bn
from helpers.util import assert_close
from torch import nn

import batchnorm.core.modules as M
from batchnorm.lifecycle.fold import FoldWarning, find_foldable, fold_bn, fold_conv_bn
from batchnorm.lifecycle.freeze import freeze

LAYERS = [
    (lambda: nn.Conv1d(4, 6, 3, bias=False), (3, 4, 9), M.BatchNorm1d),
    (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (3, 4, 6, 6), nn.BatchNorm2d),
    (lambda: nn.Conv2d(6, 6, 3, stride=2, groups=6, bias=False, padding_mode="reflect", padding=1),
     (3, 6, 7, 7), M.BatchNorm2d),
    (lambda: nn.Conv3d(2, 4, 2, dilation=1), (2, 2, 4, 4, 4), nn.BatchNorm3d),
    (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2), (3, 4, 5), M.BatchNorm1d),
    (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False), (3, 4, 5, 5), nn.BatchNorm2d),
    (lambda: nn.ConvTranspose3d(2, 3, 2), (2, 2, 3, 3, 3), M.BatchNorm3d),
    (lambda: nn.Linear(5, 6), (7, 5), M.BatchNorm1d),
    (lambda: nn.Linear(5, 6, bias=False), (7, 5), nn.BatchNorm1d),
]


@pytest.mark.parametrize(("make", "shape", "bn_cls"), LAYERS)
def test_fold_one_pair_matches_in_float64_and_float32(make, shape, bn_cls):
    layer = make()
    bn = bn_cls(6 if not isinstance(layer, nn.Conv3d | nn.ConvTranspose3d) else layer.out_channels, eps=1e-3)
    randomize_bn(nn.Sequential(bn)).eval()
    x = torch.randn(shape)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        ll, bb = copy.deepcopy(layer).to(dtype), copy.deepcopy(bn).to(dtype)
        folded, act = fold_conv_bn(ll, bb)
        assert type(folded) is type(layer) and isinstance(act, nn.Identity)
        assert folded.weight.dtype == dtype and folded.bias is not None
        with torch.no_grad():
            assert_close(folded(x.to(dtype)), bb(ll(x.to(dtype))), rtol=tol, atol=tol, what=f"{dtype}")
    # the inputs are not mutated
    w_before = layer.weight.detach().clone()
    fold_conv_bn(layer, bn)
    assert torch.equal(layer.weight, w_before)


def test_tiny_running_variance_folds_in_float64_then_casts():
    # A channel with running variance ~1e-10 has s = γ/sqrt(var + ε) ~ 7e4. When β cancels s·(b − μ) the
    # folded bias b' = s·(b − μ) + β is O(1) but its terms are O(1e5): computed in float32 it would be off
    # by ~1e-2, in float64 and then cast it is exact to float32 rounding.
    conv = nn.Conv2d(3, 4, 3, bias=True)
    bn = M.BatchNorm2d(4, eps=1e-10).eval()
    with torch.no_grad():
        conv.weight.mul_(1e-5)  # keeps s·Wx O(1)
        conv.bias.copy_(torch.tensor([1.0, -0.7, 0.2, 1.3]))
        bn.running_var.copy_(torch.tensor([1e-10, 3e-10, 1.0, 2e-10]))
        bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1, 0.05]))
        s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        bn.bias.copy_(-s * (conv.bias.double() - bn.running_mean.double()) + 0.5)
    x = torch.randn(2, 3, 6, 6)
    folded, _ = fold_conv_bn(conv, bn)
    c64, b64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()  # ground truth: float64 pair
    with torch.no_grad():
        want = b64(c64(x.double()))
        got = folded(x)
    assert want.abs().max() < 10
    assert_close(got, want, rtol=1e-5, atol=1e-5, what="tiny-variance fold")


def test_fused_activation_is_returned_separately():
    bn = M.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.3).eval()
    randomize_bn(nn.Sequential(bn))
    conv = nn.Conv2d(2, 4, 1)
    folded, act = fold_conv_bn(conv, bn)
    assert type(act) is nn.LeakyReLU and act.negative_slope == 0.3
    x = torch.randn(3, 2, 4, 4)
    with torch.no_grad():
        assert_close(act(folded(x)), bn(conv(x)), rtol=1e-5, atol=1e-5, what="act after fold")
    elu = M.BatchNormAct1d(4, activation="elu", negative_slope=0.5).eval()
    assert type(fold_conv_bn(nn.Linear(3, 4), elu)[1]) is nn.ELU


def test_whole_torchvision_like_model_fx():
    model = randomize_bn(TinyResNet()).eval()
    pairs = find_foldable(model)
    assert ("conv1", "bn1") in pairs and ("layer1.1.downsample.0", "layer1.1.downsample.1") in pairs
    assert ("fc", "bn_fc") in pairs and len(pairs) == 7
    x = torch.randn(3, 3, 8, 8)
    folded = fold_bn(model, example_inputs=(x,))
    assert type(folded) is TinyResNet and folded is not model
    assert not any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in folded.modules())
    assert isinstance(folded.bn1, nn.Identity) and isinstance(model.bn1, nn.BatchNorm2d)  # original kept
    with torch.no_grad():
        assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5, what="folded resnet")


def test_sequential_with_fused_act_and_frozen_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3),
                          M.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.2),
                          nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5))
    randomize_bn(model).eval()
    ref = copy.deepcopy(model)
    freeze(model, layers=["3"])
    model.train()  # frozen layers fold in any mode; BatchNormAct2d is in training mode: refused
    with pytest.raises(ValueError, match="training mode"):
        fold_bn(model, method="sequential", inplace=True)
    assert isinstance(model[1], M.BatchNormAct2d)
    model.eval()
    out = fold_bn(model, method="sequential", inplace=True)
    assert out is model and type(model[1]) is nn.LeakyReLU and isinstance(model[3], nn.Identity)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5, what="folded sequential")


class _Dynamic(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            return self.body(x)
        return self.body(-x)


def test_untraceable_model_falls_back_to_sequential():
    model = randomize_bn(_Dynamic()).eval()
    assert find_foldable(model) == [("body.0", "body.1")]
    with pytest.raises(ValueError, match="could not trace"):
        find_foldable(model, method="fx")
    x = torch.randn(2, 2, 3, 3)
    with torch.no_grad():
        assert_close(fold_bn(model)(x), model(x), rtol=1e-5, atol=1e-5, what="fallback fold")


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn2 = nn.BatchNorm2d(3)
        self.conv3 = nn.Conv2d(3, 3, 1)
        self.bn3 = nn.BatchNorm2d(3)

    def forward(self, x):
        a = self.conv(x)
        y = self.bn(a) + a  # conv output has a second user: not foldable
        z = self.bn2(self.conv2(y))
        z = self.bn2(self.conv2(z))  # called twice: not foldable
        return self.bn3(self.conv3(z))  # the only foldable pair


class _MyConv(nn.Conv2d):
    pass


class _Reversed(nn.Sequential):
    def forward(self, x):
        for m in reversed(self):
            x = m(x)
        return x


def test_limits_of_the_search():
    assert find_foldable(_Shared().eval()) == [("conv3", "bn3")]
    assert find_foldable(nn.Sequential(_MyConv(3, 3, 1), nn.BatchNorm2d(3))) == []
    shared_bn = nn.BatchNorm2d(3)
    assert find_foldable(nn.Sequential(nn.Conv2d(3, 3, 1), shared_bn, nn.Conv2d(3, 3, 1), shared_bn),
                         method="sequential") == []
    assert find_foldable(nn.Sequential(_Reversed(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))),
                         method="sequential") == []
    model = _Shared().eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert_close(fold_bn(model)(x), model(x), rtol=1e-5, atol=1e-5, what="partial fold")


def test_a_linear_on_nd_input_is_seen_with_example_inputs_and_left_with_a_warning():
    # Linear on (N, L, C) input followed by BatchNorm1d(L): BN normalises L, not the Linear's outputs
    model = randomize_bn(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))).eval()
    x = torch.randn(3, 4, 4)
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(FoldWarning, match="Linear on 3-D input"):
        out = fold_bn(model, inplace=True, example_inputs=(x,))
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.BatchNorm1d and out is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.warns(FoldWarning, match="without example_inputs"):  # rank unknown: folded, but said so
        fold_bn(model)
    ok = nn.Sequential(nn.Linear(4, 4), M.BatchNorm1d(4, channel_axis=-1))
    randomize_bn(ok).eval()
    with torch.no_grad():
        assert_close(fold_bn(ok, example_inputs=(x,))(x), ok(x), rtol=1e-5, atol=1e-5, what="channel_axis=-1")


class _TupleOut(nn.Module):
    """A pair that sequential search finds, whose conv output is also used outside the BN."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

    def forward(self, x):
        a = self.seq[0](x)
        return self.seq[1](a), a  # a tuple output (the comparison used to raise after folding)


class _FailsWhenFolded(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

    def forward(self, x):
        if not isinstance(self.seq[1], nn.BatchNorm2d):
            raise RuntimeError("this model insists on its BN layer")
        return self.seq(x)


def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], copy.deepcopy(model.state_dict())


def _unchanged(model, snap):
    mods, state = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == mods, "modules were replaced"
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state), "weights changed"


@pytest.mark.parametrize("make, err, match", [(_TupleOut, ValueError, r"differs .*output\[1\]"),
                                              (_FailsWhenFolded, RuntimeError, "insists")])
def test_any_error_after_replacing_rolls_an_inplace_fold_back(make, err, match):
    model = randomize_bn(make()).eval()
    snap = _snapshot(model)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(err, match=match):
        fold_bn(model, inplace=True, method="sequential", example_inputs=(x,))
    _unchanged(model, snap)


class _Untraceable(nn.Module):
    """transformers-style: attribute layers, data-dependent control flow, a dict output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = M.BatchNorm2d(4)
        self.proj = nn.Linear(4, 5)
        self.norm = nn.BatchNorm1d(5)
        self.act_bn = nn.BatchNorm2d(4)  # after a ReLU: no layer to fold into

    def forward(self, x):
        h = self.bn(self.conv(x))
        if h.mean() > -100:  # data-dependent: fx cannot trace
            h = torch.relu(h)
        h = self.act_bn(h)
        return {"logits": self.norm(self.proj(h.mean((2, 3)))), "hidden": (h,)}


def test_untraceable_model_is_folded_by_a_recorded_run_and_says_what_is_left():
    model = randomize_bn(_Untraceable()).eval()
    x = torch.randn(3, 3, 5, 5)
    with pytest.raises(ValueError, match="could not trace"):
        find_foldable(model, method="fx")
    with pytest.warns(FoldWarning, match=r"could not trace _Untraceable.*BN layers left: bn, norm, act_bn"):
        fold_bn(model)  # sequential finds nothing here: it must not pass for success
    assert find_foldable(model, example_inputs=(x,)) == [("conv", "bn"), ("proj", "norm")]
    snap = _snapshot(model)
    folded = fold_bn(model, example_inputs=(x,))
    _unchanged(model, snap)
    assert type(folded.bn) is nn.Identity and type(folded.norm) is nn.Identity
    assert type(folded.act_bn) is nn.BatchNorm2d
    with torch.no_grad():
        got, want = folded(x), model(x)
    assert_close(got["logits"], want["logits"], rtol=1e-5, atol=1e-5, what="logits")
    assert_close(got["hidden"][0], want["hidden"][0], rtol=1e-5, atol=1e-5, what="hidden")
    assert find_foldable(model, method="record", example_inputs=(x,)) == [("conv", "bn"), ("proj", "norm")]


def test_record_sees_a_second_user_and_double_calls():
    model = _Shared().eval()
    x = torch.randn(2, 3, 4, 4)
    assert find_foldable(model, method="record", example_inputs=(x,)) == [("conv3", "bn3")]


def test_fold_argument_errors_change_nothing():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))).eval()
    x = torch.randn(2, 3, 4, 4)
    snap = _snapshot(model)
    with pytest.raises(TypeError, match=r"example_inputs=\(x,\)"):
        fold_bn(model, inplace=True, example_inputs=x)
    with pytest.raises(ValueError, match="method='record' runs the model"):
        fold_bn(model, inplace=True, method="record")
    for bad in (-1.0, float("nan"), "1e-4", True):
        with pytest.raises(ValueError, match="atol a finite number"):
            fold_bn(model, inplace=True, atol=bad)
    model[1].train()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="training mode: running the model"):
        fold_bn(model, inplace=True, example_inputs=(x,))
    _unchanged(model, snap)


def test_error_paths():
    conv = nn.Conv2d(3, 4, 1)
    with pytest.raises(ValueError, match="training mode"):
        fold_conv_bn(conv, nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="no running statistics"):
        fold_conv_bn(conv, nn.BatchNorm2d(4, track_running_stats=False).eval())
    with pytest.raises(ValueError, match="4 output channels"):
        fold_conv_bn(conv, nn.BatchNorm2d(5).eval())
    with pytest.raises(TypeError, match="cannot fold BN into a _MyConv"):
        fold_conv_bn(_MyConv(3, 4, 1), nn.BatchNorm2d(4).eval())
    with pytest.raises(TypeError, match="cannot fold BN into a MaxPool2d"):
        fold_conv_bn(nn.MaxPool2d(2), nn.BatchNorm2d(4).eval())
    with pytest.raises(TypeError, match="expected a batch-norm layer"):
        fold_conv_bn(conv, nn.LayerNorm(4))
    with pytest.raises(ValueError, match="channel_axis=-1"):
        fold_conv_bn(conv, M.BatchNorm2d(4, channel_axis=-1).eval())
    with pytest.raises(ValueError, match="not initialised"):
        fold_conv_bn(nn.LazyConv2d(4, 1), nn.BatchNorm2d(4).eval())
    bad = nn.BatchNorm2d(4).eval()
    bad.running_mean[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fold_conv_bn(conv, bad)
    zero = nn.BatchNorm2d(4, eps=0.0).eval()
    zero.running_var[1] = 0.0
    with pytest.raises(ValueError, match="divide by zero"):
        fold_conv_bn(conv, zero)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4).eval(), nn.Conv2d(4, 4, 1), zero)
    with pytest.raises(ValueError, match="divide by zero"):
        fold_bn(model, inplace=True)
    assert type(model[1]) is nn.BatchNorm2d and type(model[3]) is nn.BatchNorm2d  # unchanged
    with pytest.raises(ValueError, match="method"):
        find_foldable(model, method="graph")
    with pytest.raises(TypeError, match="Module"):
        find_foldable("model")
