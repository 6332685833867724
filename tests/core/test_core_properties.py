"""Hypothesis properties of the exact core, over random shapes, layouts, flags and values.

The CI profile (tests/conftest.py) runs >= 200 examples per property; shapes are kept tiny so
every property runs in about a second. Properties run on whatever backend ``auto`` picks.

* normalised output has per-channel mean 0 and variance ``σ²/(σ² + ε)`` (≈ 1) with affine off;
* forward, dx, dγ, dβ equal the float64 oracle, for every activation and channel axis;
* the running statistics follow the EMA / cumulative formulas step by step;
* eval leaves every parameter and buffer bit-identical;
* ``channel_axis=-1`` equals permuting to channels-first and back;
* the functions never modify their tensor arguments;
* float32 parity with ``torch.nn.BatchNormNd``;
* ``moments`` equals NumPy's mean/var over any set of axes.
"""

from __future__ import annotations

import numpy as np
import torch
from helpers.core_util import assert_state_unchanged, bits, np64, ref_eval_backward, snapshot
from helpers.util import assert_close
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import batchnorm
from batchnorm import reference as R
from batchnorm.core import functional as F

MODULES = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d,
           5: batchnorm.BatchNorm3d}
TORCH = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
ACTS = st.sampled_from([("identity", 0.01), ("relu", 0.01), ("leaky_relu", 0.1), ("elu", 1.0), ("elu", 0.3)])


@st.composite
def shapes(draw, min_n=2, max_side=3):
    """A BN input shape (N, C, *spatial) of rank 2..5, at most a few hundred elements."""
    rank = draw(st.integers(2, 5))
    n = draw(st.integers(min_n, 4))
    c = draw(st.integers(1, 3))
    spatial = [draw(st.integers(1, max_side)) for _ in range(rank - 2)]
    return (n, c, *spatial)


@st.composite
def seeded_data(draw, min_n=2):
    """(x float64 channels-first, channel_axis) from a seeded generator: continuous values, drawn
    scale and offset (so ties, and activations' kinks at exactly 0, do not occur)."""
    shape = draw(shapes(min_n))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-2, 0.3, 1.0, 7.0, 1e3]))
    offset = draw(st.sampled_from([0.0, -2.5, 40.0, 1e4]))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * scale + offset
    return torch.from_numpy(x), rng


def _channels_last(x):
    return x.movedim(1, -1).contiguous()


@given(shape=shapes(), data=st.data(), channels_last=st.booleans(), eps=st.sampled_from([1e-5, 1e-3, 0.0]))
def test_normalised_output_has_zero_mean_and_unit_variance(shape, data, channels_last, eps):
    # hypothesis-chosen values (ties and constant channels included), not just a seed
    x = torch.from_numpy(data.draw(arrays(np.float64, shape, elements=st.floats(
        -100, 100, allow_nan=False, allow_subnormal=False))))
    bm, bv = R.moments(np64(x))
    if eps == 0.0 and (bv <= 1e-12 * (1 + np.abs(bm) ** 2)).any():
        eps = 1e-5  # ε = 0 is only defined for non-degenerate channels
    axis = -1 if channels_last else 1
    xin = _channels_last(x) if channels_last else x
    y, _ = F.batch_norm_train(xin, eps=eps, channel_axis=axis)
    if channels_last:
        y = y.movedim(-1, 1)
    ym, yv = R.moments(np64(y))
    assert_close(ym, np.zeros_like(ym), atol=1e-9, what="per-channel mean of y")
    # exact expectation σ²/(σ²+ε): 1 for non-degenerate channels, 0 for constant ones
    scale = np.maximum(np.abs(bm), 1.0)
    expect = np.where(bv > 1e-24 * scale**2, bv / (bv + eps), 0.0)
    assert_close(yv, expect, rtol=1e-8, atol=1e-8, what="per-channel variance of y")
    assert np.isfinite(np64(y)).all()


@given(data=seeded_data(), act=ACTS, channels_last=st.booleans(),
       affine=st.sampled_from(["both", "w", "none"]), eps=st.sampled_from([1e-5, 1e-3]))
def test_forward_and_backward_equal_the_oracle(data, act, channels_last, affine, eps):
    x, rng = data
    act, slope = act
    c = x.shape[1]
    axis = -1 if channels_last else 1
    xin = _channels_last(x) if channels_last else x
    dy = torch.from_numpy(rng.standard_normal(tuple(xin.shape)))
    w0 = torch.from_numpy(rng.uniform(0.2, 2.0, c) * rng.choice([-1, 1], c)) if affine != "none" else None
    b0 = torch.from_numpy(rng.standard_normal(c)) if affine == "both" else None
    xg = xin.clone().requires_grad_()
    w = None if w0 is None else w0.clone().requires_grad_()
    b = None if b0 is None else b0.clone().requires_grad_()
    y, _ = F.batch_norm_train(xg, weight=w, bias=b, eps=eps, channel_axis=axis, activation=act,
                              negative_slope=slope)
    y.backward(dy)
    wn, bn = (None if w0 is None else np64(w0)), (None if b0 is None else np64(b0))
    y_ref, _, _ = R.forward_train(np64(xin), wn, bn, eps, axis, act, slope)
    dx_ref, dw_ref, db_ref = R.backward(np64(dy), np64(xin), wn, bn, eps, axis, act, slope)
    assert_close(y, y_ref, rtol=1e-9, atol=1e-9, what="y")
    tol = 1e-9 * max(1.0, float(np.abs(dx_ref).max()))
    assert_close(xg.grad, dx_ref, rtol=1e-8, atol=tol, what="dx")
    if w is not None:
        assert_close(w.grad, dw_ref, rtol=1e-8, atol=1e-8 * max(1.0, float(np.abs(dw_ref).max())), what="dw")
    if b is not None:
        assert_close(b.grad, db_ref, rtol=1e-8, atol=1e-8 * max(1.0, float(np.abs(db_ref).max())), what="db")


@given(shape=shapes(), seed=st.integers(0, 2**32 - 1),
       sizes=st.lists(st.integers(2, 5), min_size=1, max_size=3),
       momentum=st.one_of(st.none(), st.sampled_from([0.0, 1.0]), st.floats(0.001, 0.999)),
       unbiased=st.booleans(), scale=st.sampled_from([0.1, 1.0, 30.0]), offset=st.sampled_from([0.0, -50.0]))
def test_running_statistics_follow_ema_or_cumulative_formula(shape, seed, sizes, momentum, unbiased, scale,
                                                             offset):
    rng = np.random.default_rng(seed)
    c = shape[1]
    m = MODULES[len(shape)](c, momentum=momentum, running_var_unbiased=unbiased, dtype=torch.float64)
    mean, var, nbt = np.zeros(c), np.ones(c), 0
    batch_means = []
    for n in sizes:  # consecutive batches of varying size
        x = torch.from_numpy(rng.standard_normal((n, *shape[1:])) * scale + offset)
        m(x)
        bm, bv = R.moments(np64(x))
        batch_means.append(bm)
        mean, var, nbt = R.update_running_stats(mean, var, bm, bv, x.numel() // c, momentum, nbt, unbiased)
        assert_close(m.running_mean, mean, rtol=1e-10, atol=1e-10 * abs(offset) + 1e-12, what="running mean")
        assert_close(m.running_var, var, rtol=1e-10, atol=1e-12, what="running var")
        assert int(m.num_batches_tracked) == nbt
    if momentum is None:  # cumulative: the plain average of the batch means
        assert_close(m.running_mean, np.mean(batch_means, 0), rtol=1e-9, atol=1e-9 * (1 + abs(offset)),
                     what="cumulative mean")
    elif momentum == 0.0:
        assert_close(m.running_mean, np.zeros(c), rtol=0, atol=0, what="momentum 0 keeps the initial mean")


@given(data=seeded_data(min_n=1), act=ACTS, channels_last=st.booleans(), track=st.booleans())
def test_eval_leaves_state_bit_identical_and_equals_oracle(data, act, channels_last, track):
    x, rng = data
    act, slope = act
    c, rank = x.shape[1], x.ndim
    m = MODULES[rank](c, dtype=torch.float64, channel_axis=-1 if channels_last else 1, activation=act,
                      negative_slope=slope, track_running_stats=track)
    if track:
        with torch.no_grad():
            m.running_mean.copy_(torch.from_numpy(rng.standard_normal(c)) * x.abs().mean())
            m.running_var.copy_(torch.from_numpy(rng.uniform(0.1, 3.0, c)) * (1 + x.abs().max()))
            m.num_batches_tracked.fill_(int(rng.integers(0, 100)))
            m.weight.copy_(torch.from_numpy(rng.uniform(-2, 2, c)))
    elif x.numel() // c < 2:
        x = torch.cat([x, x + 1])  # batch statistics need two values per channel
    m.eval()
    before = snapshot(m)
    xin = (_channels_last(x) if channels_last else x).requires_grad_()
    y = m(xin)
    dy = torch.from_numpy(rng.standard_normal(tuple(xin.shape)))
    y.backward(dy)
    assert_state_unchanged(before, m, "eval")
    if not track:
        return
    axis = -1 if channels_last else 1
    args = (np64(m.running_mean), np64(m.running_var), np64(m.weight), np64(m.bias), m.eps, axis, act, slope)
    y_ref = R.forward_eval(np64(xin), *args)
    dx_ref, dw_ref, _ = ref_eval_backward(np64(dy), np64(xin), *args)
    assert_close(y, y_ref, rtol=1e-9, atol=1e-9, what="eval y")
    assert_close(xin.grad, dx_ref, rtol=1e-9, atol=1e-9, what="eval dx")
    assert_close(m.weight.grad, dw_ref, rtol=1e-9, atol=1e-9 * max(1.0, float(np.abs(dw_ref).max())),
                 what="dw")


@given(data=seeded_data(), act=ACTS, momentum=st.sampled_from([0.1, None]))
def test_channel_axis_last_equals_permuting(data, act, momentum):
    x, rng = data
    act, slope = act
    c, rank = x.shape[1], x.ndim
    first = MODULES[rank](c, dtype=torch.float64, momentum=momentum, activation=act, negative_slope=slope)
    last = MODULES[rank](c, dtype=torch.float64, momentum=momentum, activation=act, negative_slope=slope,
                         channel_axis=-1)
    dy = torch.from_numpy(rng.standard_normal(tuple(x.shape)))
    xf = x.clone().requires_grad_()
    xl = _channels_last(x).requires_grad_()
    yf = first(xf)
    yf.backward(dy)
    yl = last(xl)
    yl.backward(_channels_last(dy))
    tol = 1e-10 * max(1.0, float(x.abs().max()))
    assert_close(yl.movedim(-1, 1), yf, rtol=1e-9, atol=1e-9, what="y")
    assert_close(xl.grad.movedim(-1, 1), xf.grad, rtol=1e-9, atol=1e-9 * max(1.0, float(xf.grad.abs().max())),
                 what="dx")
    assert_close(last.weight.grad, first.weight.grad, rtol=1e-9,
                 atol=1e-9 * max(1.0, float(first.weight.grad.abs().max())), what="dweight")
    assert_close(last.running_mean, first.running_mean, rtol=1e-10, atol=tol, what="running mean")
    assert_close(last.running_var, first.running_var, rtol=1e-9, atol=1e-12, what="running var")
    assert int(last.num_batches_tracked) == int(first.num_batches_tracked) == 1


@given(data=seeded_data(), act=ACTS, momentum=st.sampled_from([0.1, None, 0.5]),
       with_stats=st.booleans())
def test_functions_never_modify_their_arguments(data, act, momentum, with_stats):
    x, rng = data
    c = x.shape[1]
    args = {"x": x, "weight": torch.from_numpy(rng.uniform(0.5, 2, c)),
            "bias": torch.from_numpy(rng.normal(size=c))}
    if with_stats:
        args.update(running_mean=torch.from_numpy(rng.normal(size=c)), running_var=torch.from_numpy(
            rng.uniform(0.5, 2, c)), num_batches_tracked=torch.tensor(int(rng.integers(0, 9))))
    saved = {k: bits(v) for k, v in args.items()}
    versions = {k: v._version for k, v in args.items()}
    y, stt = F.batch_norm_train(**args, momentum=momentum if with_stats else 0.1, activation=act[0],
                                negative_slope=act[1])
    F.batch_norm_eval(x, args["bias"], args["weight"].abs() + 0.1, args["weight"], args["bias"])
    F.moments(x)
    if with_stats:
        F.update_running_stats(args["running_mean"], args["running_var"], args["bias"], args["weight"], 4,
                               momentum, args["num_batches_tracked"])
    for k, v in args.items():
        assert torch.equal(bits(v), saved[k]) and v._version == versions[k], f"{k} was modified"
    assert y.data_ptr() != x.data_ptr()
    if with_stats:
        assert int(stt.num_batches_tracked) == int(args["num_batches_tracked"]) + 1


@given(data=seeded_data(), affine=st.booleans(), momentum=st.sampled_from([0.1, None, 0.7]),
       memory_format=st.booleans())
def test_float32_parity_with_torch_nn(data, affine, momentum, memory_format):
    x, rng = data
    x = (x - x.mean()) / x.std().clamp_min(1e-3) * 3 + 1  # float32-sized problem: O(1) values
    x = x.float()
    c, rank = x.shape[1], x.ndim
    if memory_format and rank >= 4:
        x = x.contiguous(memory_format=torch.channels_last if rank == 4 else torch.channels_last_3d)
    ours, theirs = MODULES[rank](c, momentum=momentum, affine=affine), TORCH[rank](c, momentum=momentum,
                                                                                  affine=affine)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.from_numpy(rng.standard_normal(tuple(x.shape))).float()
    yo, yt = ours(xo), theirs(xt)
    yo.backward(dy)
    yt.backward(dy)
    # float32 conditioning: x̂ carries ~ε₃₂·|x|/σ relative error, and dx is a cancelling sum of terms of
    # size invstd·|dy| (for n = 2 it is exactly 0 up to ε/σ²). Both implementations are within that of
    # the exact result, so they are within twice that of each other.
    _, bv = R.moments(np64(x))
    invstd = 1.0 / np.sqrt(bv + ours.eps)
    cond = 1.0 + float(np.abs(np64(x)).max()) * invstd.max()
    e32 = float(np.finfo(np.float32).eps)
    extra = {"y": 8 * e32 * cond, "dx": 8 * e32 * cond * invstd.max() * float(dy.abs().max())}
    for what, a, b in (("y", yo, yt), ("dx", xo.grad, xt.grad), ("running_mean", ours.running_mean,
                                                                   theirs.running_mean),
                       ("running_var", ours.running_var, theirs.running_var)):
        b = b.detach()
        scale = max(1.0, float(b.abs().max()))
        assert_close(a, b, rtol=1e-4, atol=5e-5 * scale + extra.get(what, 0.0), what=what)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data(), keepdim=st.booleans())
def test_moments_equal_numpy_over_any_axes(shape, data, keepdim):
    nd = len(shape)
    axes = data.draw(st.lists(st.integers(-nd, nd - 1), unique_by=lambda a: a % nd, max_size=nd))
    x = torch.from_numpy(np.random.default_rng(data.draw(st.integers(0, 2**16))).normal(3, 2, shape))
    m, v = F.moments(x, axes, keepdim)
    em = np.mean(np64(x), axis=tuple(axes), keepdims=keepdim)
    ev = np.var(np64(x), axis=tuple(axes), keepdims=keepdim)
    assert tuple(m.shape) == tuple(v.shape) == em.shape
    assert_close(m.reshape(-1), em.reshape(-1), what="mean")
    assert_close(v.reshape(-1), ev.reshape(-1), what="var")
