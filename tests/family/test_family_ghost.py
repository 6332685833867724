"""Ghost Batch Normalization: per-ghost forward/backward against float64 references, both running-
statistics rules, the remainder rule, the BN special case, state_dict compatibility, argument errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.core_util import assert_empty_batch_changes_nothing
from helpers.family_ref import (
    ghost_backward,
    ghost_forward,
    ghost_update_average,
    ghost_update_sequential,
    split_sizes,
)
from helpers.util import assert_close
from hypothesis import given
from hypothesis import strategies as st

import batchnorm.family.ghost as ghost_mod
from batchnorm import reference as ref
from batchnorm.core.modules import BatchNorm2d
from batchnorm.family.ghost import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    ghost_batch_norm_train,
    ghost_batch_sizes,
)
from batchnorm.kernels import available_backends, use_backend

D = torch.float64


def _np(t):
    return None if t is None else t.detach().to(D).numpy()


def _case(shape, axis=1, dtype=D, affine=True):
    # Each sample gets its own offset and scale so that ghost statistics differ clearly from
    # whole-batch ones (a test that cannot tell ghost from plain BN would prove nothing).
    n = shape[0]
    x = torch.randn(*shape, dtype=dtype)
    off = torch.linspace(-3, 3, n, dtype=dtype).reshape(n, *[1] * (len(shape) - 1))
    x = x * (1 + off.abs()) + off
    c = shape[axis]
    w = torch.randn(c, dtype=dtype) if affine else None
    b = torch.randn(c, dtype=dtype) if affine else None
    return x, torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5, w, b


def _counts(sizes, x, axis):
    per = x.numel() // (x.shape[0] * x.shape[axis])
    return [s * per for s in sizes]


# -- forward / backward / running statistics against the references ------------------------------

CASES = [((12, 3), 1, 4, "error"), ((12, 3, 5), 1, 3, "error"), ((8, 3, 4, 4), 1, 2, "error"),
         ((8, 4, 4, 3), -1, 4, "error"), ((6, 2, 3, 3, 3), 1, 2, "error"), ((10, 3), 1, 4, "merge_last"),
         ((10, 3, 2, 2), 1, 4, "allow_smaller"), ((11, 2, 3), 1, 4, "allow_smaller"),
         ((7, 3, 2, 2), -1, 3, "merge_last"), ((5, 3), 1, 8, "merge_last")]


@pytest.mark.parametrize("shape,axis,g,remainder", CASES)
@pytest.mark.parametrize("stats_update", ["average", "sequential"])
def test_forward_and_running_stats_match_reference(shape, axis, g, remainder, stats_update):
    x, rm, rv, w, b = _case(shape, axis)
    nbt = torch.tensor(4)
    y, new = ghost_batch_norm_train(x, rm, rv, w, b, virtual_batch_size=g, remainder=remainder,
                                    stats_update=stats_update, momentum=0.3, eps=1e-3,
                                    num_batches_tracked=nbt, channel_axis=axis)
    sizes = split_sizes(shape[0], g, remainder)
    assert ghost_batch_sizes(shape[0], g, remainder) == sizes
    ey, means, vars_ = ghost_forward(_np(x), sizes, _np(w), _np(b), 1e-3, axis)
    assert_close(y, ey, rtol=1e-12, atol=1e-12, what="ghost forward")
    upd = ghost_update_average if stats_update == "average" else ghost_update_sequential
    em, ev, enbt = upd(_np(rm), _np(rv), means, vars_, _counts(sizes, x, axis), 0.3, 4)
    assert_close(new.mean, em, what="running_mean")
    assert_close(new.var, ev, what="running_var")
    assert int(new.num_batches_tracked) == enbt == 4 + (1 if stats_update == "average" else len(sizes))


@pytest.mark.parametrize("shape,axis,g,remainder", CASES)
def test_backward_matches_reference(shape, axis, g, remainder):
    x, _, _, w, b = _case(shape, axis)
    for t in (x, w, b):
        t.requires_grad_(True)
    y, _ = ghost_batch_norm_train(x, None, None, w, b, virtual_batch_size=g, remainder=remainder,
                                  eps=1e-3, channel_axis=axis)
    dy = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    sizes = split_sizes(shape[0], g, remainder)
    edx, edw, edb = ghost_backward(_np(dy), _np(x), sizes, _np(w), _np(b), 1e-3, axis)
    assert_close(dx, edx, rtol=1e-9, atol=1e-11, what="dx")
    assert_close(dw, edw, rtol=1e-9, atol=1e-11, what="dgamma")
    assert_close(db, edb, rtol=1e-9, atol=1e-11, what="dbeta")


def test_ghost_statistics_differ_from_whole_batch():
    # Guards the tests above: on these inputs Ghost BN is clearly not BN.
    x, _, _, w, b = _case((8, 3, 2, 2))
    y, _ = ghost_batch_norm_train(x, None, None, w, b, virtual_batch_size=2)
    yb, _, _ = ref.forward_train(_np(x), _np(w), _np(b))
    assert np.abs(_np(y) - yb).max() > 0.1


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "elu"])
def test_fused_activation(act):
    x, _, _, w, b = _case((8, 3, 3, 3))
    for t in (x, w, b):
        t.requires_grad_(True)
    y, _ = ghost_batch_norm_train(x, None, None, w, b, virtual_batch_size=4, activation=act,
                                  negative_slope=0.2)
    sizes = [4, 4]
    ey, _, _ = ghost_forward(_np(x), sizes, _np(w), _np(b), 1e-5, 1, act, 0.2)
    assert_close(y, ey, rtol=1e-12, atol=1e-12, what=f"ghost+{act}")
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), dy)
    exp = ghost_backward(_np(dy), _np(x), sizes, _np(w), _np(b), 1e-5, 1, act, 0.2)
    for a, e, name in zip(got, exp, ("dx", "dgamma", "dbeta")):
        assert_close(a, e, rtol=1e-9, atol=1e-11, what=name)


@pytest.mark.parametrize("remainder,n", [("error", 8), ("allow_smaller", 10), ("merge_last", 11)])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck(remainder, n, affine):
    x, _, _, w, b = _case((n, 2, 2), affine=affine)
    inputs = (x.requires_grad_(True),) + ((w.requires_grad_(True), b.requires_grad_(True)) if affine else ())

    def fn(x, *wb):
        return ghost_batch_norm_train(x, None, None, *wb, virtual_batch_size=4, remainder=remainder,
                                      eps=1e-3, activation="elu")[0]

    assert torch.autograd.gradcheck(fn, inputs)
    if affine:  # second derivatives (double backward recomputes the statistics with grad)
        assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@given(n=st.integers(2, 12), g=st.integers(1, 12), c=st.integers(1, 3), l=st.integers(1, 3),
       remainder=st.sampled_from(["merge_last", "allow_smaller"]), seed=st.integers(0, 2**16))
def test_property_forward_vs_reference(n, g, c, l, remainder, seed):
    sizes = split_sizes(n, g, remainder)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, l, generator=gen, dtype=D) * 2 + 1
    w, b = torch.randn(c, generator=gen, dtype=D), torch.randn(c, generator=gen, dtype=D)
    if min(sizes) * l < 2:
        with pytest.raises(ValueError, match="ghost batch of"):
            ghost_batch_norm_train(x, None, None, w, b, virtual_batch_size=g, remainder=remainder)
        return
    y, _ = ghost_batch_norm_train(x, None, None, w, b, virtual_batch_size=g, remainder=remainder, eps=1e-3)
    ey, _, _ = ghost_forward(_np(x), sizes, _np(w), _np(b), 1e-3)
    assert_close(y, ey, rtol=1e-10, atol=1e-10, what="forward")


# -- special cases ------------------------------------------------------------------------------

@pytest.mark.parametrize("stats_update", ["average", "sequential"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_size_n_is_plain_bn_exactly(stats_update, momentum):
    # (bit for bit on one backend: under auto the plain layer would run torch's own layer code here)
    with use_backend("numba"):
        _ghost_size_n_is_plain_bn_exactly(stats_update, momentum)


def _ghost_size_n_is_plain_bn_exactly(stats_update, momentum):
    bn = BatchNorm2d(4, momentum=momentum)
    gb = GhostBatchNorm2d(4, momentum=momentum, virtual_batch_size=6, stats_update=stats_update)
    with torch.no_grad():
        for layer in (bn, gb):
            layer.weight.copy_(torch.linspace(-1, 2, 4))
            layer.bias.copy_(torch.linspace(1, -1, 4))
    for step in range(3):
        xb = (torch.randn(6, 4, 3, 3) * (step + 1) + step).requires_grad_(True)
        xg = xb.detach().clone().requires_grad_(True)
        yb, yg = bn(xb), gb(xg)
        assert torch.equal(yb, yg)
        dy = torch.randn_like(yb)
        yb.backward(dy)
        yg.backward(dy)
        assert torch.equal(xb.grad, xg.grad)
    assert torch.equal(bn.weight.grad, gb.weight.grad) and torch.equal(bn.bias.grad, gb.bias.grad)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, gb.state_dict()[k]), k


def test_ghost_larger_than_batch_with_merge_last_is_bn():
    x = torch.randn(5, 3, 4)
    bn, gb = BatchNorm2d(3), GhostBatchNorm1d(3, virtual_batch_size=64, remainder="merge_last")
    y = gb(x)
    assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-6,
                 what="one ghost batch")
    del bn


def test_sequential_equals_bn_called_on_each_chunk():
    # The paper's update rule is literally "BN on X¹, then X², ...": compare with our BatchNorm2d.
    x = torch.randn(12, 3, 2, 2) * 2 + 1
    bn = BatchNorm2d(3, momentum=0.2)
    gb = GhostBatchNorm2d(3, momentum=0.2, virtual_batch_size=4, stats_update="sequential")
    y = gb(x)
    ys = [bn(chunk) for chunk in x.split(4)]
    assert_close(y, torch.cat(ys), rtol=1e-6, atol=1e-6, what="output")
    for k in ("running_mean", "running_var"):
        assert_close(getattr(gb, k), getattr(bn, k), rtol=1e-6, atol=1e-7, what=k)
    assert int(gb.num_batches_tracked) == int(bn.num_batches_tracked) == 3


def test_average_update_keeps_bn_momentum_semantics():
    # One EMA step per forward; the variance is the pooled within-ghost one (smaller than the
    # whole-batch variance when ghost means differ).
    gb = GhostBatchNorm1d(2, momentum=1.0, virtual_batch_size=3)
    x = torch.tensor([[0.0, 0], [1, 1], [2, 2], [10, 0], [11, 2], [12, 4]])
    gb(x)
    # ghost M2: channel 0: 2 + 2, channel 1: 2 + 8; pooled dof 6 - 2 (the whole-batch variance of
    # channel 0 would be 30.8)
    assert_close(gb.running_mean, [6.0, 1.5], rtol=1e-6, what="mean")
    assert_close(gb.running_var, [1.0, 2.5], rtol=1e-6, what="pooled unbiased variance")
    assert int(gb.num_batches_tracked) == 1
    gb2 = GhostBatchNorm1d(2, momentum=1.0, virtual_batch_size=3, running_var_unbiased=False)
    gb2(x)
    assert_close(gb2.running_var, [4 / 6, 10 / 6], rtol=1e-6, what="pooled biased variance")


@pytest.mark.parametrize("cls,shape,axis", [(GhostBatchNorm1d, (16, 5), 1),
                                            (GhostBatchNorm2d, (8, 5, 4, 4), 1),
                                            (GhostBatchNorm2d, (8, 4, 4, 5), -1),
                                            (GhostBatchNorm3d, (4, 5, 2, 3, 3), 1)])
def test_float32_module_vs_reference(cls, shape, axis):
    layer = cls(5, virtual_batch_size=2, channel_axis=axis, momentum=0.2)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(5))
    x, *_ = _case(shape, axis, dtype=torch.float32)
    y = layer(x)
    sizes = split_sizes(shape[0], 2, "error")
    ey, means, vars_ = ghost_forward(_np(x), sizes, _np(layer.weight), _np(layer.bias), 1e-5, axis)
    assert_close(y, ey, rtol=1e-4, atol=2e-5, what="float32 forward")
    em, ev, _ = ghost_update_average(np.zeros(5), np.ones(5), means, vars_, _counts(sizes, x, axis), 0.2, 0)
    assert_close(layer.running_mean, em, rtol=1e-5, atol=1e-6, what="running_mean")
    assert_close(layer.running_var, ev, rtol=1e-5, atol=1e-6, what="running_var")


def test_one_op_call_per_run_of_equal_ghost_batches(monkeypatch):
    calls = []
    real = ghost_mod.train_apply

    def spy(x, *args):
        calls.append(tuple(x.shape))
        return real(x, *args)

    monkeypatch.setattr(ghost_mod, "train_apply", spy)
    ghost_batch_norm_train(torch.randn(16, 3, 2, 2), virtual_batch_size=4)
    assert calls == [(4, 12, 2, 2)]  # 4 ghost batches of 4 as one op on (g, k·C, H, W)
    calls.clear()
    ghost_batch_norm_train(torch.randn(10, 2, 3, 3), virtual_batch_size=4, remainder="allow_smaller")
    assert calls == [(4, 4, 3, 3), (2, 2, 3, 3)]


def test_eval_is_bn_with_running_stats_and_keeps_state():
    gb = GhostBatchNorm2d(3, virtual_batch_size=2)
    for _ in range(3):
        gb(torch.randn(8, 3, 2, 2) * 2 + 1)
    bn = torch.nn.BatchNorm2d(3)
    bn.load_state_dict(gb.state_dict())
    before = {k: v.clone() for k, v in gb.state_dict().items()}
    x = torch.randn(3, 3, 2, 2)  # any batch size in eval
    assert_close(gb.eval()(x), bn.eval()(x), rtol=1e-5, atol=1e-6, what="eval")
    for k, v in gb.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_untracked_uses_ghost_stats_in_eval_too():
    gb = GhostBatchNorm1d(3, virtual_batch_size=4, track_running_stats=False, affine=False)
    x = torch.randn(8, 3) * 2
    ey, _, _ = ghost_forward(_np(x), [4, 4], None, None, 1e-5)
    assert_close(gb.eval()(x), ey, rtol=1e-5, atol=1e-6, what="eval without running stats")


def test_nonfinite_skip_and_raise():
    gb = GhostBatchNorm1d(3, virtual_batch_size=2, nonfinite="skip")
    x = torch.randn(6, 3)
    x[5, 0] = float("inf")
    before = {k: v.clone() for k, v in gb.state_dict().items()}
    gb(x)
    for k, v in gb.state_dict().items():
        assert torch.equal(v, before[k]), k
    gb.nonfinite = "raise"
    with pytest.raises(FloatingPointError, match="ghost batch"):
        gb(x)
    for k, v in gb.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_state_dict_round_trip_with_torch_batchnorm2d():
    src = torch.nn.BatchNorm2d(4)
    src(torch.randn(8, 4, 3, 3) * 2 + 1)
    gb = GhostBatchNorm2d(4, virtual_batch_size=4)
    assert set(gb.state_dict()) == set(src.state_dict())
    gb.load_state_dict(src.state_dict())
    x = torch.randn(2, 4, 3, 3)
    assert_close(gb.eval()(x), src.eval()(x), rtol=1e-5, atol=1e-6, what="eval after load")
    gb.train()(torch.randn(8, 4, 3, 3))
    back = torch.nn.BatchNorm2d(4)
    back.load_state_dict(gb.state_dict())
    for k, v in gb.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


# -- bad arguments ---------------------------------------------------------------------------------

@pytest.mark.parametrize("g,err", [(0, ValueError), (-4, ValueError), (2.5, TypeError), (True, TypeError),
                                   ("4", TypeError), (None, TypeError)])
def test_bad_virtual_batch_size(g, err):
    with pytest.raises(err, match="virtual_batch_size") as e:
        GhostBatchNorm2d(3, virtual_batch_size=g)
    assert "GhostBatchNorm2d" in str(e.value) and "got" in str(e.value)
    x, rm, rv, w, b = _case((8, 3))
    nbt = torch.tensor(2)
    saved = [t.clone() for t in (x, rm, rv, nbt)]
    with pytest.raises(err, match="virtual_batch_size"):
        ghost_batch_norm_train(x, rm, rv, w, b, virtual_batch_size=g, num_batches_tracked=nbt)
    for t, s in zip((x, rm, rv, nbt), saved):
        assert torch.equal(t, s)


@pytest.mark.parametrize("kw,match", [({"remainder": "drop"}, "remainder"),
                                      ({"stats_update": "merged"}, "stats_update"),
                                      ({"channel_axis": 0}, "batch axis")])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        GhostBatchNorm2d(3, virtual_batch_size=2, **kw)
    with pytest.raises(ValueError, match=match):
        ghost_batch_norm_train(torch.randn(4, 3, 2), virtual_batch_size=2, **kw)


def test_non_dividing_batch_is_rejected_by_default_and_state_kept():
    gb = GhostBatchNorm2d(3, virtual_batch_size=4)
    gb(torch.randn(8, 3, 2, 2))
    before = {k: v.clone() for k, v in gb.state_dict().items()}
    with pytest.raises(ValueError, match=r"10 % 4 = 2.*remainder='merge_last'"):
        gb(torch.randn(10, 3, 2, 2))
    with pytest.raises(ValueError, match="does not split"):
        gb(torch.randn(3, 3, 2, 2))  # smaller than one ghost batch
    for k, v in gb.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_too_few_values_per_ghost_batch_and_state_kept():
    gb = GhostBatchNorm1d(3, virtual_batch_size=1)  # (N, C): one value per channel per ghost
    before = {k: v.clone() for k, v in gb.state_dict().items()}
    with pytest.raises(ValueError, match="at least 2"):
        gb(torch.randn(8, 3))
    small = GhostBatchNorm1d(3, virtual_batch_size=4, remainder="allow_smaller")
    with pytest.raises(ValueError, match="merge_last"):
        small(torch.randn(9, 3))  # last ghost batch of 1 sample
    for k, v in gb.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert int(small.num_batches_tracked) == 0
    # virtual_batch_size=1 is fine where each sample has several values per channel (per-sample stats)
    y = GhostBatchNorm1d(3, virtual_batch_size=1, affine=False)(torch.randn(4, 3, 5))
    assert_close(y.mean(dim=2), np.zeros((4, 3)), atol=1e-6, what="per-sample normalisation")


def test_repr():
    s = repr(GhostBatchNorm2d(3, virtual_batch_size=8, remainder="merge_last", stats_update="sequential"))
    assert "virtual_batch_size=8" in s and "remainder='merge_last'" in s and "stats_update='sequential'" in s


def test_tracking_switched_off_after_construction_uses_ghost_stats_without_update():
    gb = GhostBatchNorm1d(3, virtual_batch_size=4, affine=False)
    gb.track_running_stats = False
    before = {k: v.clone() for k, v in gb.state_dict().items()}
    x = torch.randn(8, 3) * 2 + 1
    ey, _, _ = ghost_forward(_np(x), [4, 4], None, None, 1e-5)
    assert_close(gb(x), ey, rtol=1e-5, atol=1e-6, what="ghost stats")
    for k, v in gb.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_attributes_changed_after_construction_are_checked_at_call_time():
    gb = GhostBatchNorm2d(3, virtual_batch_size=2)
    gb(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in gb.state_dict().items()}
    for attr, value, err in (("virtual_batch_size", 0, ValueError), ("virtual_batch_size", 2.0, TypeError),
                             ("remainder", "pad", ValueError), ("stats_update", None, ValueError)):
        good = getattr(gb, attr)
        setattr(gb, attr, value)
        with pytest.raises(err, match=attr):
            gb(torch.randn(4, 3, 2, 2))
        setattr(gb, attr, good)
    for k, v in gb.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("n", [0, -3, 2.0, True])
def test_ghost_batch_sizes_rejects_bad_n(n):
    with pytest.raises(ValueError, match="positive int"):
        ghost_batch_sizes(n, 2)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("axis", [1, -1])
def test_every_backend_matches_reference(backend, axis):
    x, rm, rv, w, b = _case((12, 3, 4, 4) if axis == 1 else (12, 4, 4, 3), axis)
    for t in (x, w, b):
        t.requires_grad_(True)
    with use_backend(backend):
        y, new = ghost_batch_norm_train(x, rm, rv, w, b, virtual_batch_size=4, eps=1e-3, channel_axis=axis,
                                        activation="leaky_relu", negative_slope=0.1)
        dy = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, w, b), dy)
    sizes = [4, 4, 4]
    ey, means, vars_ = ghost_forward(_np(x), sizes, _np(w), _np(b), 1e-3, axis, "leaky_relu", 0.1)
    assert_close(y, ey, rtol=1e-11, atol=1e-11, what=f"{backend} forward")
    exp = ghost_backward(_np(dy), _np(x), sizes, _np(w), _np(b), 1e-3, axis, "leaky_relu", 0.1)
    for a, e, name in zip(got, exp, ("dx", "dgamma", "dbeta")):
        assert_close(a, e, rtol=1e-9, atol=1e-10, what=f"{backend} {name}")
    em, ev, _ = ghost_update_average(_np(rm), _np(rv), means, vars_, _counts(sizes, x, axis), 0.1, 0)
    assert_close(new.mean, em, rtol=1e-12, atol=1e-12, what="running_mean")
    assert_close(new.var, ev, rtol=1e-12, atol=1e-12, what="running_var")


# ---------------------------------------------------------------- empty batch (N = 0), as BatchNorm*
# (assert_empty_batch_changes_nothing: tests/helpers/core_util.py)


@pytest.mark.parametrize("cls,shape", [(GhostBatchNorm1d, (0, 3)), (GhostBatchNorm1d, (0, 3, 5)),
                                       (GhostBatchNorm2d, (0, 3, 4, 4)), (GhostBatchNorm3d, (0, 3, 2, 2, 2))])
@pytest.mark.parametrize("remainder", ["error", "merge_last", "allow_smaller"])
@pytest.mark.parametrize("stats_update", ["average", "sequential"])
def test_ghost_empty_batch_changes_nothing(cls, shape, remainder, stats_update):
    layer = cls(3, virtual_batch_size=4, remainder=remainder, stats_update=stats_update, momentum=None)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        layer.num_batches_tracked.fill_(3)
    assert_empty_batch_changes_nothing(layer, shape)
    layer.eval()
    assert_empty_batch_changes_nothing(layer, shape)


def test_ghost_empty_batch_still_checks_the_shape():
    with pytest.raises(ValueError, match="channels"):
        GhostBatchNorm2d(3, virtual_batch_size=2)(torch.randn(0, 4, 2, 2))
