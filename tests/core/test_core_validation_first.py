"""Functional calls that write state validate everything first (issue 16, item 7, and the argument
checks of its gap list): a rejected call raises our message and leaves every buffer bit-identical."""

from __future__ import annotations

import pytest
import torch

from batchnorm.core.functional import batch_norm, batch_norm_train, moments, update_running_stats


def _state():
    return torch.zeros(3), torch.ones(3), torch.tensor(2)


def _same(a, b):
    return all(torch.equal(u, v) and u.dtype == v.dtype for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("kw, err, match", [
    (dict(num_batches_tracked=3), TypeError, r"or None, got int 3; pass torch.tensor\(3\)"),
    (dict(num_batches_tracked=torch.tensor(1.5)), ValueError, "dtype torch.float32"),
    (dict(num_batches_tracked=torch.tensor([1, 2])), ValueError, r"got shape \(2,\)"),
    (dict(num_batches_tracked=torch.tensor(True)), ValueError, "dtype torch.bool"),
    (dict(alias=True), ValueError, "running_mean and running_var share memory"),
    (dict(channel_axis=1.0), TypeError, r"channel_axis to be an int, got 1.0 \(float\)"),
    (dict(momentum=1.5), ValueError, r"momentum in \[0, 1\]"),
])
def test_batch_norm_train_in_place_rejects_before_writing(kw, err, match):
    rm, rv, nbt = _state()
    kept = [t.clone() for t in (rm, rv, nbt)]
    given_var = rm if kw.pop("alias", False) else rv
    kw.setdefault("num_batches_tracked", nbt)
    with pytest.raises(err, match=match):
        batch_norm_train(torch.randn(8, 3), rm, given_var, inplace_stats=True, **kw)
    assert _same((rm, rv, nbt), kept), "a rejected call changed the statistics"


def test_views_of_one_buffer_are_rejected_but_neighbours_are_not():
    buf = torch.zeros(6)
    with pytest.raises(ValueError, match="share memory"):
        batch_norm_train(torch.randn(8, 3), buf[:3], buf[2:5], inplace_stats=True)
    assert torch.equal(buf, torch.zeros(6))
    _, st = batch_norm_train(torch.randn(8, 3), buf[:3], buf[3:], inplace_stats=True)  # disjoint halves
    assert st.mean.data_ptr() == buf.data_ptr()


@pytest.mark.parametrize("args, kw, err, match", [
    ((torch.zeros(4), torch.ones(4), 8), {}, ValueError, r"batch_mean of shape \(3,\)"),
    ((torch.zeros(3), torch.ones(3), 0), {}, ValueError, "n .* int >= 1, got 0"),
    ((torch.zeros(3), torch.ones(3), 8.0), {}, ValueError, "n .* int >= 1"),
    ((torch.zeros(3), torch.ones(3), 8), dict(momentum=-0.1), ValueError, r"momentum in \[0, 1\]"),
    ((torch.zeros(3), torch.ones(3), 8), dict(num_batches_tracked=5), TypeError, "0-d integer tensor"),
    ((torch.zeros(3), torch.ones(3), 8), dict(unbiased="yes"), TypeError, "True or False"),
    ((None, torch.ones(3), 8), {}, TypeError, "batch_mean is required"),
    ((torch.zeros(3, dtype=torch.int64), torch.ones(3), 8), {}, TypeError, "floating-point batch_mean"),
])
def test_update_running_stats_in_place_rejects_before_writing(args, kw, err, match):
    rm, rv, nbt = _state()
    kept = [t.clone() for t in (rm, rv, nbt)]
    kw = {"num_batches_tracked": nbt, **kw}
    with pytest.raises(err, match=match):
        update_running_stats(rm, rv, *args, inplace=True, **kw)
    assert _same((rm, rv, nbt), kept), "a rejected call changed the statistics"
    with pytest.raises(ValueError, match="share memory"):
        update_running_stats(rm, rm, torch.zeros(3), torch.ones(3), 8, inplace=True)
    assert _same((rm, rv, nbt), kept)
    with pytest.raises(TypeError, match="running_mean to be a 1-D tensor"):
        update_running_stats([0.0] * 3, rv, torch.zeros(3), torch.ones(3), 8)


def test_argument_checks_of_the_tf_style_ops():
    x = torch.randn(8, 3)
    with pytest.raises(TypeError, match=r"list or tuple of ints, got 0; for one axis write axes=\[0\]"):
        moments(x, axes=0)
    with pytest.raises(ValueError, match="axis True is out of range"):
        moments(x, axes=[True])
    m, v = moments(x, axes=[0])
    with pytest.raises(ValueError, match="scale is on meta but the input is on cpu"):
        batch_norm(x, m, v, scale=torch.ones(3, device="meta"))


def test_documented_float32_overflow_range_and_the_policies_that_catch_it():
    """README, Conventions and numerics: |x| > ~1.8e19 overflows the float32 variance, as in torch;
    nonfinite='raise'/'skip' keep such a batch out of the buffers."""
    import batchnorm

    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ok = batchnorm.BatchNorm2d(3)
    ref = torch.nn.functional.batch_norm((x * 1e18).double(), None, None, training=True)
    assert (ok(x * 1e18).double() - ref).abs().max() < 1e-5, "1e18 is still inside the range"
    torch_bn, ours = torch.nn.BatchNorm2d(3), batchnorm.BatchNorm2d(3)
    torch_bn(x * 1e20)
    ours(x * 1e20)
    assert torch.isinf(torch_bn.running_var).all() and torch.isinf(ours.running_var).all()  # same as torch
    for policy in ("raise", "skip"):
        bn = batchnorm.BatchNorm2d(3, nonfinite=policy)
        if policy == "raise":
            with pytest.raises(FloatingPointError, match="NaN or Inf"):
                bn(x * 1e20)
        else:
            bn(x * 1e20)
        assert torch.equal(bn.running_var, torch.ones(3)) and int(bn.num_batches_tracked) == 0


def test_documented_torch_compile_fullgraph_error_carries_our_message():
    import torch._dynamo

    import batchnorm

    torch._dynamo.reset()
    bn = batchnorm.BatchNorm2d(4)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="expected 4 channels on axis 1, got 3"):
        torch.compile(bn, fullgraph=True, backend="eager")(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="expected 4 channels on axis 1, got 3"):
        torch.compile(bn, backend="eager")(torch.randn(2, 3, 5, 5))
    torch._dynamo.reset()
