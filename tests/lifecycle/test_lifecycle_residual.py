"""Model conversions for the fused ops: ResNet blocks → BN + add + ReLU, and the new activations.

The story: :func:`batchnorm.fuse_residual_blocks` rewrites torchvision's BasicBlock and Bottleneck
(replicas under torchvision's qualified names, since torchvision itself may not import here) and,
through the documented hook, the user's own blocks; the converted model gives the original's
numbers in a training step (outputs, every gradient, running statistics) and in eval, keeps its
state_dict keys and shares its tensors; bad descriptions raise before anything changes. Then
``convert_to_batchnorm(fuse_activations=True)`` fuses SiLU/Hardswish/GELU/Sigmoid/Tanh,
``convert_to_torch`` and ``fold_bn`` give them back as torch modules.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.resnet_blocks import BasicBlock, Bottleneck, as_torchvision, tiny_resnet
from helpers.util import assert_close
from torch import nn

import batchnorm
from batchnorm.core.residual import BatchNormAddAct2d
from batchnorm.lifecycle import residual as LR

TV_BASIC = as_torchvision(BasicBlock)
TV_BOTTLENECK = as_torchvision(Bottleneck)


def _randomise_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _step(model, x):
    model.zero_grad()
    y = model(x)
    y.square().sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("block", [TV_BASIC, TV_BOTTLENECK], ids=["basic", "bottleneck"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_torchvision_blocks_are_fused_with_identical_numbers(block, fmt):
    torch.manual_seed(1)
    ref = tiny_resnet(block).to(memory_format=fmt)
    _randomise_bn(ref)
    keys = list(ref.state_dict())
    ours = batchnorm.convert_to_batchnorm(LR.fuse_residual_blocks(copy.deepcopy(ref)), fuse_activations=True)
    fused = [m for m in ours.modules() if isinstance(m, LR.FusedResidualBlock)]
    assert len(fused) == 2 and not any(isinstance(m, block) for m in ours.modules())
    assert all(isinstance(getattr(f, "bn3" if block is TV_BOTTLENECK else "bn2"), BatchNormAddAct2d)
               for f in fused)
    assert list(ours.state_dict()) == keys, "state_dict keys must stay the original block's"
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=fmt)
    y_ref, g_ref = _step(ref, x)
    y, g = _step(ours, x)
    assert_close(y, y_ref, rtol=1e-4, atol=1e-5, what="train output")
    for name in g_ref:
        assert_close(g[name], g_ref[name], rtol=1e-3, atol=1e-4, what=f"grad {name}")
    for (name, a), b in zip(ref.state_dict().items(), ours.state_dict().values(), strict=True):
        if a.is_floating_point():
            assert_close(b, a, rtol=1e-5, atol=1e-6, what=name)
        else:
            assert torch.equal(a, b), name
    ref.eval()
    ours.eval()
    with torch.no_grad():
        assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5, what="eval output")


def test_the_fused_block_shares_the_original_tensors():
    block = TV_BASIC(4, 4)
    fused = LR.fuse_residual_blocks(block)
    assert isinstance(fused, LR.FusedResidualBlock)
    assert fused.conv1 is block.conv1 and fused.bn2.weight is block.bn2.weight
    assert fused.bn2.running_mean is block.bn2.running_mean and fused.downsample is None


def test_subclasses_and_unregistered_blocks_are_left_alone():
    class Mine(TV_BASIC):
        pass

    model = nn.Sequential(Mine(4, 4), BasicBlock(4, 4))  # the plain replica is not torchvision's class
    out = LR.fuse_residual_blocks(model)
    assert type(out[0]) is Mine and type(out[1]) is BasicBlock


class PreActTail(nn.Module):
    """A user's block with other attribute names: body → norm → + x → act."""

    def __init__(self, c):
        super().__init__()
        self.body = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(c)
        self.act = nn.LeakyReLU(0.2)
        self.skip = None

    def forward(self, x):
        return self.act(self.norm(self.body(x)) + x)


def test_the_hook_fuses_a_users_block():
    LR.register_residual_block(PreActTail, lambda b: LR.residual_block_spec(
        b, main=["body"], tail=("norm", "act"), shortcut="skip"))
    try:
        torch.manual_seed(2)
        ref = nn.Sequential(PreActTail(3), PreActTail(3))
        ours = LR.fuse_residual_blocks(copy.deepcopy(ref))
        assert all(isinstance(m, LR.FusedResidualBlock) for m in ours)
        assert ours[0].norm.activation == "leaky_relu" and ours[0].norm.negative_slope == 0.2
        x = torch.randn(4, 3, 6, 6)
        y_ref, g_ref = _step(ref, x)
        y, g = _step(ours, x)
        assert_close(y, y_ref, rtol=1e-4, atol=1e-5, what="output")
        for name in g_ref:
            assert_close(g[name], g_ref[name], rtol=1e-3, atol=1e-4, what=name)
    finally:
        LR._REGISTRY.pop(PreActTail, None)


def test_bad_descriptions_raise_before_anything_changes():
    model = nn.Sequential(TV_BASIC(4, 4), PreActTail(4))
    LR.register_residual_block(PreActTail, lambda b: LR.residual_block_spec(
        b, main=["body"], tail=("norm", "missing"), shortcut="skip"))
    try:
        with pytest.raises(ValueError, match="PreActTail has no submodule 'missing'"):
            LR.fuse_residual_blocks(model)
        assert type(model[0]) is TV_BASIC, "the first block must not have been replaced"
        LR.register_residual_block(PreActTail, lambda b: LR.residual_block_spec(
            b, main=["body"], tail=("norm", "body"), shortcut="skip"))
        with pytest.raises(TypeError, match="cannot fuse a Conv2d"):
            LR.fuse_residual_blocks(model)
    finally:
        LR._REGISTRY.pop(PreActTail, None)
    with pytest.raises(TypeError, match=r"expected an nn\.Module subclass"):
        LR.register_residual_block(int, lambda b: None)
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module"):
        LR.fuse_residual_blocks("resnet")


ACT_MODULES = [(nn.SiLU(), "silu"), (nn.Hardswish(), "hardswish"), (nn.GELU(), "gelu"),
               (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.Sigmoid(), "sigmoid"), (nn.Tanh(), "tanh")]


@pytest.mark.parametrize("act_module,name", ACT_MODULES, ids=[n for _, n in ACT_MODULES])
def test_convert_fuses_and_unfuses_the_new_activations(act_module, name):
    torch.manual_seed(3)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.BatchNorm2d(4), act_module))
    _randomise_bn(ref)
    ours = batchnorm.convert_to_batchnorm(copy.deepcopy(ref), fuse_activations=True)
    assert isinstance(ours[1], batchnorm.BatchNormAct2d) and ours[1].activation == name
    x = torch.randn(4, 3, 7, 7)
    assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5, what="train output")
    back = batchnorm.convert_to_torch(copy.deepcopy(ours))
    assert type(back[1][1]) is type(act_module)
    assert getattr(back[1][1], "approximate", None) == getattr(act_module, "approximate", None)
    ours.eval()
    ref.eval()
    folded = batchnorm.fold_bn(ours, method="sequential")
    with torch.no_grad():
        assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5, what="eval output")
    assert type(folded[1]) is type(act_module)


class ConvNormAct(nn.Sequential):
    """Like torchvision's Conv2dNormActivation: a Sequential subclass that keeps Sequential's forward."""

    def __init__(self, c, act):
        super().__init__(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), act)


def test_fuse_sequential_activations_keeps_the_keys_and_the_numbers():
    torch.manual_seed(4)
    ref = nn.Sequential(ConvNormAct(3, nn.SiLU()), ConvNormAct(3, nn.Hardswish()), nn.BatchNorm2d(3))
    _randomise_bn(ref)
    ours = batchnorm.fuse_sequential_activations(copy.deepcopy(ref))
    assert isinstance(ours[0][1], batchnorm.BatchNormAct2d) and ours[0][1].activation == "silu"
    assert ours[1][1].activation == "hardswish" and isinstance(ours[1][2], nn.Identity)
    assert type(ours[2]) is nn.BatchNorm2d, "a BN with no activation after it stays as it is"
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(4, 3, 6, 6)
    y_ref, g_ref = _step(ref, x)
    y, g = _step(ours, x)
    assert_close(y, y_ref, rtol=1e-4, atol=1e-5, what="output")
    for name in g_ref:
        assert_close(g[name], g_ref[name], rtol=1e-3, atol=1e-4, what=name)
    with pytest.raises(TypeError, match="expected a torch"):
        batchnorm.fuse_sequential_activations(None)
