"""The modules as drop-ins: parity with torch.nn.BatchNormNd and the float64 oracle over every flag.

The story: a torch layer and ours are built with the same flags and fed the same sequence of
batches (varying sizes, training steps interleaved with eval steps, each with a backward). After
every step the outputs, the input/weight/bias gradients, the running statistics and the batch
count must agree — to float32 rounding with torch in float32, and to 1e-10 with torch *and* the
float64 oracle (:mod:`batchnorm.reference`) in float64. Layouts: NCHW, the channels_last memory
format (the same tensor for both), and logical NHWC (``channel_axis=-1``) compared with torch on
the permuted tensor. These tests run on whatever backend ``auto`` picks.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from helpers.core_util import (
    assert_state_unchanged,
    from_layout,
    np64,
    ref_eval_backward,
    snapshot,
    tensors_bit_equal,
    to_layout,
)
from helpers.util import assert_close
from torch import nn

import batchnorm
from batchnorm import kernels
from batchnorm import reference as R
from batchnorm.core import functional as F
from batchnorm.core.modules import CONVENTIONS

OURS = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d,
        5: batchnorm.BatchNorm3d}
TORCH = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
ACT_OURS = {2: batchnorm.BatchNormAct1d, 3: batchnorm.BatchNormAct1d, 4: batchnorm.BatchNormAct2d,
            5: batchnorm.BatchNormAct3d}
SPATIAL = {2: (), 3: (5,), 4: (3, 4), 5: (2, 3, 2)}
C = 3
# (batch size, training?) — consecutive steps with varying batch sizes, eval interleaved.
SCHEDULE = [(4, True), (7, True), (3, False), (2, True), (5, False), (6, True)]
RANK_LAYOUTS = [(2, "nchw"), (3, "nchw"), (3, "nhwc"), (4, "nchw"), (4, "channels_last"), (4, "nhwc"),
                (5, "nchw"), (5, "channels_last"), (5, "nhwc")]
FLAGS = list(itertools.product([True, False], [True, False], [0.1, None, 0.3]))


def _tol(dtype):
    """(rtol, atol factor): float64 to 1e-10; float32 to a few ulps of the largest value (rounding)."""
    return (1e-10, 1e-10) if dtype == torch.float64 else (2e-5, 2e-5)


def _close(actual, expected, dtype, what):
    rtol, atol = _tol(dtype)
    scale = max(1.0, float(np.abs(np64(expected)).max()))
    assert_close(actual, expected, rtol=rtol, atol=atol * scale, what=what)


def _pair(rank, affine, track, momentum, layout, dtype, cls_ours=None, **kw):
    tm = TORCH[rank](C, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype)
    om = (cls_ours or OURS[rank])(C, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype,
                                  channel_axis=-1 if layout == "nhwc" else 1, **kw)
    if affine:  # non-trivial γ, β (the same in both)
        with torch.no_grad():
            g = torch.linspace(0.5, 1.5, C, dtype=dtype)
            b = torch.linspace(-0.3, 0.4, C, dtype=dtype)
            tm.weight.copy_(g)
            tm.bias.copy_(b)
            om.weight.copy_(g)
            om.bias.copy_(b)
    return tm, om


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rank,layout", RANK_LAYOUTS, ids=[f"{r}d-{lay}" for r, lay in RANK_LAYOUTS])
@pytest.mark.parametrize("affine,track,momentum", FLAGS,
                         ids=[f"aff{int(a)}-trk{int(t)}-m{m}" for a, t, m in FLAGS])
def test_parity_with_torch_and_oracle_over_steps(rank, layout, affine, track, momentum, dtype):
    tm, om = _pair(rank, affine, track, momentum, layout, dtype)
    oracle = [np.zeros(C), np.ones(C), 0]  # the oracle's running mean, var, count, followed step by step
    for step, (n, train) in enumerate(SCHEDULE):
        tag = f"step {step} ({'train' if train else 'eval'}, N={n})"
        tm.train(train)
        om.train(train)
        x = (torch.randn(n, C, *SPATIAL[rank], dtype=torch.float64) * 2 + 0.7).to(dtype)
        dy = torch.randn_like(x)
        xt = x.clone().requires_grad_()
        yt = tm(xt)
        yt.backward(dy)
        xo = to_layout(x, layout).requires_grad_()
        yo = om(xo)
        yo.backward(to_layout(dy, layout))
        assert yo.dtype == dtype and yo.shape == xo.shape
        _close(from_layout(yo, layout), yt, dtype, f"{tag}: y vs torch")
        _close(from_layout(xo.grad, layout), xt.grad, dtype, f"{tag}: dx vs torch")
        if affine:
            _close(om.weight.grad, tm.weight.grad, dtype, f"{tag}: dweight vs torch")
            _close(om.bias.grad, tm.bias.grad, dtype, f"{tag}: dbias vs torch")
        if track:
            _close(om.running_mean, tm.running_mean, dtype, f"{tag}: running_mean vs torch")
            _close(om.running_var, tm.running_var, dtype, f"{tag}: running_var vs torch")
            assert om.num_batches_tracked.dtype == torch.long
            assert int(om.num_batches_tracked) == int(tm.num_batches_tracked), tag
        else:
            assert om.running_mean is None and om.running_var is None and om.num_batches_tracked is None
        if dtype == torch.float64:
            _check_oracle_step(om, x, dy, yo, xo.grad, layout, train, oracle, tag)
        tm.zero_grad()
        om.zero_grad()


def _check_oracle_step(om, x, dy, yo, dxo, layout, train, oracle, tag):
    """One step against the float64 oracle; ``oracle`` holds the oracle's running state."""
    w = np64(om.weight) if om.affine else None
    b = np64(om.bias) if om.affine else None
    track = om.track_running_stats
    xn, dyn = np64(x), np64(dy)
    if train or not track:
        y_ref, bm, bv = R.forward_train(xn, w, b, om.eps)
        dx_ref, dw_ref, db_ref = R.backward(dyn, xn, w, b, om.eps)
        if train and track:
            oracle[:] = R.update_running_stats(*oracle[:2], bm, bv, xn.size // C, om.momentum, oracle[2])
    else:
        y_ref = R.forward_eval(xn, oracle[0], oracle[1], w, b, om.eps)
        dx_ref, dw_ref, db_ref = ref_eval_backward(dyn, xn, oracle[0], oracle[1], w, b, om.eps)
    assert_close(from_layout(yo, layout), y_ref, what=f"{tag}: y vs oracle")
    assert_close(from_layout(dxo, layout), dx_ref, what=f"{tag}: dx vs oracle")
    if om.affine:
        assert_close(om.weight.grad, dw_ref, what=f"{tag}: dweight vs oracle")
        assert_close(om.bias.grad, db_ref, what=f"{tag}: dbias vs oracle")
    if track:
        assert_close(om.running_mean, oracle[0], what=f"{tag}: running_mean vs oracle")
        assert_close(om.running_var, oracle[1], what=f"{tag}: running_var vs oracle")
        assert int(om.num_batches_tracked) == oracle[2]


# -- fused activation ---------------------------------------------------------------------------------
ACTS = [("relu", 0.01), ("leaky_relu", 0.2), ("elu", 0.7), ("identity", 0.01)]


def _torch_act(z, act, slope):
    return {"relu": lambda: torch.relu(z), "leaky_relu": lambda: nn.functional.leaky_relu(z, slope),
            "elu": lambda: nn.functional.elu(z, slope), "identity": lambda: z}[act]()


ACT_LAYOUTS = [(2, "nchw"), (3, "nhwc"), (4, "nchw"), (4, "channels_last"), (5, "nhwc")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rank,layout", ACT_LAYOUTS)
@pytest.mark.parametrize("act,slope", ACTS, ids=[a for a, _ in ACTS])
def test_batchnorm_act_matches_torch_bn_then_activation(act, slope, rank, layout, dtype):
    tm, om = _pair(rank, True, True, 0.1, layout, dtype, cls_ours=ACT_OURS[rank], activation=act,
                   negative_slope=slope)
    for step, (n, train) in enumerate(SCHEDULE[:4]):
        tag = f"{act} step {step} train={train}"
        tm.train(train)
        om.train(train)
        x = (torch.randn(n, C, *SPATIAL[rank], dtype=torch.float64) * 2 + 0.3).to(dtype)
        dy = torch.randn_like(x)
        xt = x.clone().requires_grad_()
        yt = _torch_act(tm(xt), act, slope)
        yt.backward(dy)
        xo = to_layout(x, layout).requires_grad_()
        yo = om(xo)
        yo.backward(to_layout(dy, layout))
        _close(from_layout(yo, layout), yt, dtype, f"{tag}: y")
        _close(from_layout(xo.grad, layout), xt.grad, dtype, f"{tag}: dx")
        _close(om.weight.grad, tm.weight.grad, dtype, f"{tag}: dweight")
        _close(om.bias.grad, tm.bias.grad, dtype, f"{tag}: dbias")
        _close(om.running_mean, tm.running_mean, dtype, f"{tag}: running_mean")
        _close(om.running_var, tm.running_var, dtype, f"{tag}: running_var")
        if dtype == torch.float64 and train:
            w, b, xl = np64(om.weight), np64(om.bias), np64(to_layout(x, layout))
            y_ref, _, _ = R.forward_train(xl, w, b, om.eps, om.channel_axis, act, slope)
            dx_ref, dw_ref, db_ref = R.backward(np64(to_layout(dy, layout)), xl, w, b,
                                                om.eps, om.channel_axis, act, slope)
            assert_close(yo, y_ref, what=f"{tag}: y vs oracle")
            assert_close(xo.grad, dx_ref, what=f"{tag}: dx vs oracle")
            assert_close(om.weight.grad, dw_ref, what=f"{tag}: dweight vs oracle")
            assert_close(om.bias.grad, db_ref, what=f"{tag}: dbias vs oracle")
        tm.zero_grad()
        om.zero_grad()


def test_batchnorm_act_defaults_and_state_dict_compatible_with_plain_bn():
    a = batchnorm.BatchNormAct2d(4)
    assert a.activation == "relu"
    plain = batchnorm.BatchNorm2d(4)
    assert plain.activation == "identity"
    assert list(a.state_dict()) == list(plain.state_dict()) == list(nn.BatchNorm2d(4).state_dict())


# -- torch.nn flags that change after construction -----------------------------------------------------
def test_track_running_stats_switched_off_after_construction_behaves_like_torch():
    """torch: with buffers present but track_running_stats=False, training uses batch stats and updates
    nothing; eval still normalises with the (untouched) buffers."""
    tm, om = _pair(4, True, True, 0.1, "nchw", torch.float32)
    x0 = torch.randn(5, C, 3, 4) * 2 + 1
    tm(x0)
    om(x0)  # one tracked step, so the buffers hold something non-trivial
    tm.track_running_stats = False
    om.track_running_stats = False
    before = snapshot(om)
    x = torch.randn(6, C, 3, 4) * 3 - 1
    _close(om(x), tm(x), torch.float32, "train, tracking off")
    assert_state_unchanged(before, om, "training with track_running_stats=False")
    assert int(tm.num_batches_tracked) == int(om.num_batches_tracked) == 1
    tm.eval()
    om.eval()
    _close(om(x), tm(x), torch.float32, "eval, buffers present")


def test_eval_without_running_stats_uses_batch_statistics_like_torch():
    tm, om = _pair(4, True, False, 0.1, "nchw", torch.float64)
    tm.eval()
    om.eval()
    x = torch.randn(4, C, 3, 3, dtype=torch.float64) * 2 + 5
    y = om(x)
    assert_close(y, tm(x), what="eval, track_running_stats=False vs torch")
    y_ref, _, _ = R.forward_train(np64(x), np64(om.weight), np64(om.bias), om.eps)
    assert_close(y, y_ref, what="eval, track_running_stats=False vs oracle (batch statistics)")
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # batch stats need n > 1
        om(torch.randn(1, C, 1, 1, dtype=torch.float64))


def test_eval_leaves_buffers_and_parameters_bit_identical():
    om = batchnorm.BatchNorm2d(C, momentum=None)
    om(torch.randn(8, C, 2, 2) + 3)
    om.eval()
    before = snapshot(om)
    y = om(torch.randn(4, C, 2, 2))
    y.sum().backward()
    assert_state_unchanged(before, om, "eval forward+backward")


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_zero_keeps_and_one_replaces_running_stats(momentum):
    om = batchnorm.BatchNorm1d(C, momentum=momentum, dtype=torch.float64)
    tm = nn.BatchNorm1d(C, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        for m in (om, tm):
            m.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
            m.running_var.copy_(torch.tensor([2.0, 0.5, 3.0]))
    start_mean, start_var = om.running_mean.clone(), om.running_var.clone()
    for n in (5, 9):
        x = torch.randn(n, C, dtype=torch.float64) * 3 + 1
        om(x)
        tm(x)
        if momentum == 0.0:
            assert tensors_bit_equal(om.running_mean, start_mean)
            assert tensors_bit_equal(om.running_var, start_var)
        else:
            assert_close(om.running_mean, x.mean(0), what="momentum=1: running mean = batch mean")
            assert_close(om.running_var, x.var(0, unbiased=True), what="momentum=1: running var = unbiased")
        assert_close(om.running_mean, tm.running_mean, what="vs torch")
        assert_close(om.running_var, tm.running_var, what="vs torch")
    assert int(om.num_batches_tracked) == 2


# -- reprs, resets ----------------------------------------------------------------------------------
def test_extra_repr_matches_torch_and_names_our_extras():
    assert repr(batchnorm.BatchNorm2d(16)) == repr(nn.BatchNorm2d(16))
    assert repr(batchnorm.BatchNorm1d(3, momentum=None, affine=False, track_running_stats=False)) == repr(
        nn.BatchNorm1d(3, momentum=None, affine=False, track_running_stats=False))
    r = repr(batchnorm.BatchNormAct2d(8, activation="leaky_relu", negative_slope=0.2, channel_axis=-1,
                                      running_var_unbiased=False, nonfinite="skip"))
    for part in ("activation='leaky_relu'", "negative_slope=0.2", "channel_axis=-1",
                 "running_var_unbiased=False", "nonfinite='skip'"):
        assert part in r, r
    assert "negative_slope" not in repr(batchnorm.BatchNormAct2d(8))  # relu has no slope


def test_reset_parameters_and_running_stats():
    om = batchnorm.BatchNorm2d(C)
    om(torch.randn(4, C, 3, 3) * 2 + 1)
    with torch.no_grad():
        om.weight.mul_(3)
        om.bias.add_(2)
    om.reset_running_stats()
    assert torch.equal(om.running_mean, torch.zeros(C)) and torch.equal(om.running_var, torch.ones(C))
    assert int(om.num_batches_tracked) == 0
    assert torch.equal(om.weight, torch.full((C,), 3.0))  # parameters untouched by reset_running_stats
    om(torch.randn(4, C, 3, 3) + 1)
    om.reset_parameters()
    ref = nn.BatchNorm2d(C)
    for k, v in ref.state_dict().items():
        assert tensors_bit_equal(om.state_dict()[k], v), k
    bare = batchnorm.BatchNorm2d(C, affine=False, track_running_stats=False)
    bare.reset_parameters()  # nothing to reset, must not fail
    assert bare.weight is None and bare.running_mean is None


# -- state_dict compatibility ---------------------------------------------------------------------------
def _trained(m, steps=3):
    m.train()
    for i in range(steps):
        m(torch.randn(4 + i, C, 3, 3) * (1 + i) + i)
    with torch.no_grad():
        if m.weight is not None:
            m.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
            m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return m.eval()


@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch"])
def test_state_dict_round_trip_with_torch(direction):
    src, dst = (_trained(nn.BatchNorm2d(C)), batchnorm.BatchNorm2d(C))
    if direction == "ours->torch":
        src, dst = _trained(batchnorm.BatchNorm2d(C)), nn.BatchNorm2d(C)
    sd = src.state_dict()
    res = dst.load_state_dict(sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    for k, v in sd.items():
        assert tensors_bit_equal(dst.state_dict()[k], v), k
    dst.eval()
    x = torch.randn(5, C, 4, 4)
    assert_close(dst(x), src(x), rtol=1e-6, atol=1e-6, what=f"{direction}: eval outputs")
    # and back: the round trip reproduces the source bit for bit
    back = type(src)(C)
    back.load_state_dict(dst.state_dict())
    for k, v in sd.items():
        assert tensors_bit_equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("target", ["ours", "torch"])
def test_state_dict_without_num_batches_tracked_loads_like_torch(target):
    """A version < 2 checkpoint (no num_batches_tracked) loads strictly; the count keeps its current value,
    exactly as torch._NormBase does."""
    sd = _trained(nn.BatchNorm2d(C)).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    ours, theirs = batchnorm.BatchNorm2d(C), nn.BatchNorm2d(C)
    for m in (ours, theirs):
        m.num_batches_tracked.fill_(7)
        m.load_state_dict(sd, strict=True)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 7
    assert tensors_bit_equal(ours.running_var, sd["running_var"])
    # A version-2 state_dict lacking the key is an error in strict mode, in both.
    sd2 = _trained(nn.BatchNorm2d(C)).state_dict()
    del sd2["num_batches_tracked"]
    for m in (batchnorm.BatchNorm2d(C), nn.BatchNorm2d(C)):
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            m.load_state_dict(sd2, strict=True)
    # fresh module, no metadata at all -> count 0 (torch's default for pre-v2 checkpoints)
    plain = {k: v for k, v in sd.items()}
    fresh = batchnorm.BatchNorm2d(C)
    fresh.load_state_dict(plain, strict=True)
    assert int(fresh.num_batches_tracked) == 0
    del target


@pytest.mark.parametrize("where", ["bytesio", "tmp_path"])
def test_saved_and_reloaded_model_gives_bit_identical_eval_outputs(where, tmp_path):
    model = nn.Sequential(nn.Conv2d(2, C, 3, padding=1), batchnorm.BatchNormAct2d(C, activation="elu"),
                          nn.Conv2d(C, C, 1), batchnorm.BatchNorm2d(C, momentum=None))
    for i in range(3):
        model(torch.randn(4, 2, 5, 5) + i)
    model.eval()
    x = torch.randn(3, 2, 5, 5)
    y = model(x).detach()
    target = io.BytesIO() if where == "bytesio" else tmp_path / "bn.pt"
    torch.save(model.state_dict(), target)
    if isinstance(target, io.BytesIO):
        target.seek(0)
    clone = nn.Sequential(nn.Conv2d(2, C, 3, padding=1), batchnorm.BatchNormAct2d(C, activation="elu"),
                          nn.Conv2d(C, C, 1), batchnorm.BatchNorm2d(C, momentum=None))
    clone.load_state_dict(torch.load(target, weights_only=True))
    clone.eval()
    assert tensors_bit_equal(clone(x).detach(), y)


# -- conventions ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("convention,momentum,eps,unbiased", [
    ("torch", 0.1, 1e-5, True), ("keras", 0.01, 1e-3, False), ("flax", 0.01, 1e-5, False),
    ("darknet", 0.01, 1e-6, True)])
def test_from_convention_documented_values(convention, momentum, eps, unbiased):
    m = batchnorm.BatchNorm2d.from_convention(convention, 4)
    assert isinstance(m, batchnorm.BatchNorm2d)
    assert (m.momentum, m.eps, m.running_var_unbiased) == (momentum, eps, unbiased)
    assert CONVENTIONS[convention] == {"momentum": momentum, "eps": eps, "running_var_unbiased": unbiased}
    act = batchnorm.BatchNormAct1d.from_convention(convention, 4, activation="elu")
    assert isinstance(act, batchnorm.BatchNormAct1d) and act.activation == "elu" and act.eps == eps


def test_from_convention_decay_is_converted_and_overrides_apply():
    m = batchnorm.BatchNorm2d.from_convention("keras", 4, decay=0.9, eps=1e-4, affine=False)
    assert m.momentum == pytest.approx(0.1, abs=1e-15) and m.eps == 1e-4 and m.weight is None
    assert batchnorm.BatchNorm2d.from_convention("flax", 4, momentum=0.3).momentum == 0.3


@pytest.mark.parametrize("unbiased", [False, True])
def test_running_var_follows_biased_or_unbiased_variance(unbiased):
    m = batchnorm.BatchNorm2d.from_convention("keras", C, dtype=torch.float64, running_var_unbiased=unbiased)
    mean, var, nbt = np.zeros(C), np.ones(C), 0
    for n in (3, 6, 2):
        x = torch.randn(n, C, 2, 3, dtype=torch.float64) * 2 + 1
        m(x)
        bm, bv = R.moments(np64(x))
        mean, var, nbt = R.update_running_stats(mean, var, bm, bv, x.numel() // C, 0.01, nbt,
                                                unbiased=unbiased)
        assert_close(m.running_mean, mean, what="running mean")
        assert_close(m.running_var, var, what=f"running var (unbiased={unbiased})")
    if not unbiased:  # the biased store differs from torch's, by the Bessel factor of each step
        assert not np.allclose(np64(m.running_var), R.update_running_stats(
            np.zeros(C), np.ones(C), bm, bv, x.numel() // C, 1.0, 0, unbiased=True)[1])


# -- numerics -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_half_inputs_give_half_outputs_with_float32_statistics(dtype, layout):
    om = batchnorm.BatchNorm2d(C, channel_axis=-1 if layout == "nhwc" else 1)
    tm = nn.BatchNorm2d(C)
    tol = 1e-2 if dtype == torch.float16 else 2e-2  # a few ulps of the half output
    for n, train in SCHEDULE[:4]:
        om.train(train)
        tm.train(train)
        x = (torch.randn(n, C, 4, 4) * 3 + 2).to(dtype)
        dy = torch.randn_like(x)
        xo = to_layout(x, layout).requires_grad_()
        y = om(xo)
        y.backward(to_layout(dy, layout))
        assert y.dtype == dtype and xo.grad.dtype == dtype
        assert om.running_mean.dtype == torch.float32 and om.weight.grad.dtype == torch.float32
        xn = np64(x)  # the oracle sees exactly the half values, in float64
        if train:
            y_ref, _, _ = R.forward_train(xn, np64(om.weight), np64(om.bias), om.eps)
            dx_ref, dw_ref, _ = R.backward(np64(dy), xn, np64(om.weight), np64(om.bias), om.eps)
            assert_close(om.weight.grad, dw_ref, rtol=tol, atol=tol * np.abs(dw_ref).max(), what="dweight")
        else:
            y_ref = R.forward_eval(xn, np64(om.running_mean), np64(om.running_var), np64(om.weight),
                                   np64(om.bias), om.eps)
        assert_close(from_layout(y, layout), y_ref, rtol=tol, atol=tol, what=f"{dtype} y vs oracle")
        if train:
            assert_close(from_layout(xo.grad, layout), dx_ref, rtol=tol, atol=tol * np.abs(dx_ref).max(),
                         what=f"{dtype} dx vs oracle")
        tm(x)  # torch (float32 statistics on half input) for the running buffers
        assert_close(om.running_mean, tm.running_mean, rtol=1e-5, atol=1e-5, what="running mean vs torch")
        assert_close(om.running_var, tm.running_var, rtol=1e-5, atol=1e-5, what="running var vs torch")
        om.zero_grad()


def test_half_statistics_are_accumulated_in_float32():
    """4096 values of ~300 per channel: a float16 accumulator would overflow (sum ~1.2e6 > 65504)."""
    x = (torch.randn(64, 2, 8, 8) + 300).half()
    om = batchnorm.BatchNorm2d(2, momentum=1.0)
    y = om(x)
    assert torch.isfinite(y).all()
    bm, bv = R.moments(np64(x))
    n = x.numel() // 2
    assert_close(om.running_mean, bm, rtol=1e-6, atol=0, what="running mean (float32 accumulation)")
    assert_close(om.running_var, bv * n / (n - 1), rtol=1e-4, atol=0, what="running var")


def test_large_mean_float32_statistics_within_1e_5_of_oracle():
    x = torch.randn(32, 4, 8, 8, dtype=torch.float64).mul(1.0).add(1e4).float()
    om = batchnorm.BatchNorm2d(4, momentum=0.5)
    y = om(x)
    bm, bv = R.moments(np64(x))
    n = x.numel() // 4
    mean_ref, var_ref, _ = R.update_running_stats(np.zeros(4), np.ones(4), bm, bv, n, 0.5, 0)
    assert_close(om.running_mean, mean_ref, rtol=1e-5, atol=0, what="running mean")
    assert_close(om.running_var, var_ref, rtol=1e-5, atol=0, what="running var after one update")
    m_, v_, _ = batchnorm.stats.batch_moments(x)  # the batch statistics themselves
    assert m_.dtype == v_.dtype == torch.float32
    assert_close(m_, bm, rtol=1e-5, atol=0, what="batch mean")
    assert_close(v_, bv, rtol=1e-5, atol=0, what="batch variance")
    # y = (x - mean)/std: its error is the float32 error of the mean over std ~ 1, i.e. a few ulps of 1e4
    y_ref, _, _ = R.forward_train(np64(x), np64(om.weight), np64(om.bias), om.eps)
    ulp = float(np.spacing(np.float32(1e4)))
    assert_close(y, y_ref, rtol=0, atol=4 * ulp, what="normalised output of mean-1e4 data")


def test_constant_channels_give_zero_variance_and_no_nan():
    x = torch.randn(6, C, 3, 3, dtype=torch.float64)
    x[:, 1] = 4.25  # one constant channel
    om = batchnorm.BatchNorm2d(C, dtype=torch.float64, momentum=1.0)
    xg = x.clone().requires_grad_()
    y = om(xg)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert torch.isfinite(y).all() and torch.isfinite(xg.grad).all() and torch.isfinite(om.weight.grad).all()
    assert_close(y[:, 1], torch.zeros(6, 3, 3, dtype=torch.float64), what="constant channel -> β (0)")
    assert float(om.running_var[1]) == 0.0
    # the gradient is finite and still the closed form: x̂ = 0, dx = γ (dy − mean dy) / sqrt(ε)
    dx_ref, dw_ref, _ = R.backward(np64(dy), np64(x), np64(om.weight), np64(om.bias), om.eps)
    assert_close(xg.grad, dx_ref, rtol=1e-9, atol=1e-9, what="dx with a constant channel")
    assert_close(om.weight.grad, dw_ref, what="dweight with a constant channel")
    assert float(om.weight.grad[1]) == 0.0  # x̂ = 0 there


def _assert_same_incl_nan(a, b, what):
    an, bn = np64(a), np64(b)
    assert (np.isfinite(an) == np.isfinite(bn)).all(), f"{what}: non-finite pattern {an} vs {bn}"
    assert (an[np.isinf(an)] == bn[np.isinf(bn)]).all() and (np.isnan(an) == np.isnan(bn)).all(), what
    m = np.isfinite(an)
    assert_close(an[m], bn[m], rtol=1e-6, atol=1e-6, what=what)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_policies(bad):
    x = torch.randn(4, C, 2, 2)
    x[1, 0, 1, 1] = bad
    for policy in ("skip", "raise"):
        m = _trained(batchnorm.BatchNorm2d(C, nonfinite=policy)).train()
        before = snapshot(m)
        if policy == "raise":
            with pytest.raises(FloatingPointError, match=r"NaN or Inf.*nonfinite='skip'"):
                m(x)
        else:
            y = m(x)
            assert torch.isfinite(y[:, 1:]).all()  # other channels are normalised normally
        assert_state_unchanged(before, m, f"nonfinite={policy!r}")
    # "update": exactly what torch does with such a batch
    ours, theirs = _trained(batchnorm.BatchNorm2d(C)).train(), _trained(nn.BatchNorm2d(C)).train()
    theirs.load_state_dict(ours.state_dict())
    _assert_same_incl_nan(ours(x), theirs(x), "y")
    _assert_same_incl_nan(ours.running_mean, theirs.running_mean, "running_mean")
    _assert_same_incl_nan(ours.running_var, theirs.running_var, "running_var")
    assert not np.isfinite(np64(ours.running_mean[0])) or not np.isfinite(np64(ours.running_var[0]))
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 4


# -- gradcheck on the modules -----------------------------------------------------------------------------
@pytest.mark.parametrize("cls,shape,act", [
    (batchnorm.BatchNorm1d, (5, 3), "identity"), (batchnorm.BatchNorm2d, (3, 3, 2, 2), "identity"),
    (batchnorm.BatchNormAct2d, (3, 3, 2, 2), "elu"), (batchnorm.BatchNorm3d, (2, 3, 2, 1, 2), "identity"),
    (batchnorm.BatchNormAct1d, (4, 3, 2), "leaky_relu")])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_module_gradcheck_and_gradgradcheck(cls, shape, act, train):
    m = cls(3, dtype=torch.float64, activation=act, negative_slope=0.3)
    m(torch.randn(*shape, dtype=torch.float64) + 1)  # non-trivial running stats for eval
    m.train(train)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.7, 1.3, -0.9], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,), strict=False)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_bias_false_keyword_matches_torch():
    """torch >= 2.6 takes BatchNormNd(..., bias=False): γ without β."""
    tm, om = nn.BatchNorm2d(C, bias=False), batchnorm.BatchNorm2d(C, bias=False)
    assert om.bias is None and om.weight is not None and repr(om) == repr(tm)
    assert list(om.state_dict()) == list(tm.state_dict())
    with torch.no_grad():
        tm.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
    om.load_state_dict(tm.state_dict())
    x = torch.randn(4, C, 3, 3) * 2 + 1
    xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    tm(xt).backward(torch.ones_like(x) + x)
    om(xo).backward(torch.ones_like(x) + x)
    _close(xo.grad, xt.grad, torch.float32, "dx")
    _close(om.weight.grad, tm.weight.grad, torch.float32, "dweight")
    _close(om.running_var, tm.running_var, torch.float32, "running_var")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_module_keeps_its_dtype(dtype):
    """module.to(half): parameters, buffers and output stay half; statistics are still taken in float32."""
    om, tm = batchnorm.BatchNorm2d(C).to(dtype), nn.BatchNorm2d(C).to(dtype)
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    for n in (4, 6):
        x = (torch.randn(n, C, 3, 3) * 2 + 3).to(dtype)
        y = om(x)
        assert y.dtype == om.running_mean.dtype == om.running_var.dtype == dtype
        y_ref, _, _ = R.forward_train(np64(x), None, None, om.eps)
        assert_close(y, y_ref, rtol=tol, atol=tol, what=f"{dtype} y vs oracle")
        tm(x)
        assert_close(om.running_mean, tm.running_mean, rtol=tol, atol=tol, what="running mean vs torch")
        assert_close(om.running_var, tm.running_var, rtol=tol, atol=tol, what="running var vs torch")
    om.eval()
    tm.eval()
    x = (torch.randn(3, C, 3, 3) + 3).to(dtype)
    assert_close(om(x), tm(x), rtol=tol, atol=tol, what="eval vs torch")


@pytest.mark.parametrize("backend", ["torch", "numba"])  # (native: torch's own layer code, whose bits
@pytest.mark.parametrize("momentum", [0.1, None])         # are torch's: test_core_native.py)
def test_training_step_writes_the_running_statistics_into_the_same_buffer_tensors(backend, momentum):
    """The modules update their buffers in place (batch_norm_train(inplace_stats=True)): references
    to the buffers stay valid, and the numbers are the pure functional call's, bit for bit."""
    torch.manual_seed(0)
    m = batchnorm.BatchNormAct2d(3, activation="relu", momentum=momentum)
    held = (m.running_mean, m.running_var, m.num_batches_tracked)
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    for step in range(3):
        with kernels.use_backend(backend):
            _, want = F.batch_norm_train(x + step, m.running_mean, m.running_var, m.weight, m.bias,
                                         momentum=momentum, num_batches_tracked=m.num_batches_tracked,
                                         activation="relu")
            m(x + step)
        assert all(a is b for a, b in zip((m.running_mean, m.running_var, m.num_batches_tracked), held))
        for got, w in zip(held, want, strict=True):
            assert torch.equal(got, w)
    assert int(m.num_batches_tracked) == 3
