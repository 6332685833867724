"""The BatchNorm checks of PyTorch's ``test/test_nn.py``, adapted to our classes.

Written for this project after the behaviours those tests pin down (names kept so they can be looked
up: ``test_batchnorm_update_stats``, ``test_batchnorm_simple_average``,
``test_batchnorm_buffer_update_when_stats_are_not_tracked``, ``test_batchnorm_load_state_dict``,
``test_batchnorm_raises_error_if_less_than_one_value_per_channel``, ``test_batchnorm_eval``,
``test_batchnorm_affine``, ``test_batchnorm_non_contig``, ``test_batchnorm_nhwc_cpu``,
``test_batchnorm_grad``, ``test_batchnorm_empty``, ``test_batchnorm_raises_error_if_running_*``).
Each runs on our class and on torch's and asserts the same outcome for both.
Not applicable here: the CUDA/cuDNN/MIOpen and half-precision-overflow variants (no GPU; half
precision runs the torch fallback, covered by torch itself).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm as bn
from tests.helpers.util import assert_close

PAIRS = [(nn.BatchNorm1d, bn.BatchNorm1d, (4, 3, 5)), (nn.BatchNorm2d, bn.BatchNorm2d, (4, 3, 5, 5)),
         (nn.BatchNorm3d, bn.BatchNorm3d, (4, 3, 2, 3, 3))]
IDS = ["1d", "2d", "3d"]


@pytest.mark.parametrize("torch_cls,cls,shape", PAIRS, ids=IDS)
def test_batchnorm_update_stats(torch_cls, cls, shape):
    x = torch.rand(shape, dtype=torch.float64)
    ref, ours = torch_cls(3).double(), cls(3).double()
    for _ in range(2):
        ref(x)
        ours(x)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 2
    for name in ("running_mean", "running_var"):
        assert_close(getattr(ours, name), getattr(ref, name), rtol=1e-12, atol=1e-14, what=name)
    ours.eval()
    ours(x)  # eval changes nothing
    assert int(ours.num_batches_tracked) == 2


@pytest.mark.parametrize("torch_cls,cls,shape", PAIRS, ids=IDS)
def test_batchnorm_simple_average(torch_cls, cls, shape):
    # momentum=None: the running statistics are the plain average over the batches seen
    xs = [torch.rand(shape, dtype=torch.float64) for _ in range(3)]
    ours = cls(3, momentum=None).double()
    for x in xs:
        ours(x)
    dims = [d for d in range(len(shape)) if d != 1]
    mean = torch.stack([x.mean(dims) for x in xs]).mean(0)
    var = torch.stack([x.var(dims, unbiased=True) for x in xs]).mean(0)
    assert_close(ours.running_mean, mean, rtol=1e-12, atol=1e-14, what="running_mean")
    assert_close(ours.running_var, var, rtol=1e-12, atol=1e-14, what="running_var")
    ours.reset_running_stats()
    assert int(ours.num_batches_tracked) == 0 and bool((ours.running_var == 1).all())


@pytest.mark.parametrize("torch_cls,cls,shape", PAIRS, ids=IDS)
def test_batchnorm_buffer_update_when_stats_are_not_tracked(torch_cls, cls, shape):
    layer = cls(3, track_running_stats=True)
    layer.track_running_stats = False  # buffers exist but must not move
    before = [b.clone() for b in layer.buffers()]
    layer(torch.rand(shape))
    for a, b in zip(before, layer.buffers()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("torch_cls,cls,shape", PAIRS, ids=IDS)
def test_batchnorm_load_state_dict(torch_cls, cls, shape):
    ref = torch_cls(3)
    ref(torch.rand(shape))
    sd = ref.state_dict()
    ours = cls(3)
    ours.load_state_dict(sd)
    for k, v in sd.items():
        assert torch.equal(ours.state_dict()[k], v), k
    old = {k: v for k, v in sd.items() if k != "num_batches_tracked"}  # a version-1 checkpoint
    old = type(sd)(old)
    old._metadata = {"": {"version": 1}}
    fresh = cls(3)
    fresh.load_state_dict(old)
    assert int(fresh.num_batches_tracked) == 0
    new = type(sd)({k: v for k, v in sd.items() if k != "num_batches_tracked"})
    new._metadata = {"": {"version": 2}}
    for layer in (torch_cls(3), cls(3)):  # a version-2 checkpoint must have the key (strict)
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            layer.load_state_dict(new)


@pytest.mark.parametrize("torch_cls,cls", [(nn.BatchNorm1d, bn.BatchNorm1d)], ids=["1d"])
def test_batchnorm_raises_error_if_less_than_one_value_per_channel(torch_cls, cls):
    x = torch.rand(10)[None, :, None]
    with pytest.raises(ValueError):
        torch_cls(10)(x)
    with pytest.raises(ValueError):
        cls(10)(x)
    cls(10).eval()(x)  # eval uses the running statistics: fine, as in torch


@pytest.mark.parametrize("torch_cls,cls,shape", PAIRS, ids=IDS)
def test_batchnorm_raises_error_if_running_stats_wrong_size(torch_cls, cls, shape):
    for name in ("running_mean", "running_var"):
        for layer in (torch_cls(3).eval(), cls(3).eval()):
            setattr(layer, name, torch.rand(4))
            with pytest.raises((RuntimeError, ValueError)):
                layer(torch.rand(shape))


@pytest.mark.parametrize("torch_cls,cls,shape", PAIRS, ids=IDS)
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_eval_and_affine(torch_cls, cls, shape, affine):
    torch.manual_seed(2)
    ref, ours = torch_cls(3, affine=affine).double(), cls(3, affine=affine).double()
    x = torch.rand(shape, dtype=torch.float64) * 3 + 1
    ref(x)
    ours(x)
    ref.eval()
    ours.eval()
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    assert_close(yo, yr, rtol=1e-12, atol=1e-13, what="eval output")
    g = torch.rand_like(yr)
    yr.backward(g)
    yo.backward(g)
    assert_close(xo.grad, xr.grad, rtol=1e-12, atol=1e-13, what="eval input grad")
    # the same statistics used twice give the same output (eval has no side effects)
    assert_close(ours(x), yo, rtol=0, atol=0, what="eval repeat")


@pytest.mark.parametrize("torch_cls,cls,shape", PAIRS[1:], ids=IDS[1:])
def test_batchnorm_non_contig_and_nhwc(torch_cls, cls, shape):
    ref, ours = torch_cls(3).double(), cls(3).double()
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.rand(shape, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    yr, yo = ref(x), ours(x2)
    assert yo.is_contiguous(memory_format=fmt)
    assert_close(yo, yr, rtol=1e-12, atol=1e-13, what="channels_last")
    g = torch.rand_like(yr)
    yr.backward(g)
    yo.backward(g)
    assert_close(x2.grad, x.grad, rtol=1e-10, atol=1e-12, what="channels_last grad")
    xt = torch.rand(shape[1], shape[0], *shape[2:], dtype=torch.float64).transpose(0, 1)
    assert not xt.is_contiguous()
    assert_close(cls(3).double()(xt), torch_cls(3).double()(xt), rtol=1e-12, atol=1e-13, what="non-contig")


@pytest.mark.parametrize("torch_cls,cls,shape", PAIRS, ids=IDS)
def test_batchnorm_grad(torch_cls, cls, shape):
    small = (2, 3, *([2] * (len(shape) - 2)))
    x = torch.rand(small, dtype=torch.float64, requires_grad=True)
    layer = cls(3, momentum=0.0).double()
    assert torch.autograd.gradcheck(lambda inp: layer(inp), (x,))
    assert torch.autograd.gradgradcheck(lambda inp: layer(inp), (x,))


@pytest.mark.parametrize("torch_cls,cls,shape", PAIRS, ids=IDS)
def test_batchnorm_empty(torch_cls, cls, shape):
    x = torch.rand(0, *shape[1:], requires_grad=True)
    for mode in ("train", "eval"):
        layer = cls(3).train(mode == "train")
        before = [b.clone() for b in layer.buffers()]
        y = layer(x)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape
        for a, b in zip(before[:2], list(layer.buffers())[:2]):
            assert torch.equal(a, b)
