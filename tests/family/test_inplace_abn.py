"""InPlace-ABN maths: the gradient recomputed from the output equals BN + activation's.

The story: for every invertible activation, layout and backend (numba kernels and the torch
fallback), the forward matches the float64 oracle (:mod:`batchnorm.reference`) and the backward —
computed from ``y`` alone by inverting the activation — matches the oracle's closed form, torch's
``nn.BatchNorm2d`` + activation and :class:`batchnorm.BatchNormAct2d` (float32 rounding); float64
gradcheck in training and eval; γ near zero follows the documented ``γ_eff`` rule; the modules
keep BatchNorm2d's running statistics and state_dict.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.core_util import (
    assert_empty_batch_changes_nothing,
    assert_state_unchanged,
    np64,
    ref_eval_backward,
    snapshot,
)
from helpers.util import assert_close
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import batchnorm
from batchnorm import reference as R
from batchnorm.family.inplace import (
    InPlaceABN1d,
    InPlaceABN2d,
    InPlaceABN3d,
    effective_weight,
    inplace_abn_eval,
    inplace_abn_train,
    inplace_backend_for,
)

BACKENDS = ["auto", "torch", "native"]  # "native": the in-place torch path stands in (see module doc)
ACTS = [("identity", 0.01), ("leaky_relu", 0.1), ("leaky_relu", 0.01), ("elu", 1.0), ("elu", 0.5)]
TORCH_ACT = {"identity": lambda s: nn.Identity(), "leaky_relu": lambda s: nn.LeakyReLU(s),
             "elu": lambda s: nn.ELU(s)}


def _params(c: int, dtype=torch.float64):
    w = (torch.rand(c, dtype=dtype) + 0.5) * torch.where(torch.arange(c) % 3 == 1, -1.0, 1.0).to(dtype)
    b = torch.randn(c, dtype=dtype)
    return w.requires_grad_(), b.requires_grad_()


def _run_train(x, w, b, axis, act, slope, inplace=True, **kw):
    """Forward + backward through inplace_abn_train on a non-leaf copy of x; returns (y, dx, dw, db, dy)."""
    xl = x.clone().requires_grad_()
    xin = xl * 1  # a non-leaf that may be overwritten
    y, _ = inplace_abn_train(xin, weight=w, bias=b, channel_axis=axis, activation=act, negative_slope=slope,
                             inplace=inplace, **kw)
    assert (y is xin) == inplace
    dy = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (xl, w, b), dy)
    return y.detach(), dx, dw, db, dy


LAYOUTS = [  # (shape, channel_axis, memory format) - covers both numba layouts and the fallback
    ((4, 3, 5, 6), 1, None),                      # NCHW contiguous -> (N, C, L)
    ((4, 3, 5, 6), 1, torch.channels_last),       # channels-last memory -> (M, C)
    ((9, 4), 1, None),                            # (N, C) -> (M, C)
    ((5, 3, 7), 1, None),                         # (N, C, L)
    ((3, 4, 5, 3), -1, None),                     # logically NHWC -> (M, C)
    ((2, 3, 4, 3, 2), 1, None),                   # 5-D
    ((2, 3, 4, 3, 2), 1, torch.channels_last_3d),
    ((40, 3), 1, None),                           # several row blocks in the (M, C) kernels
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act,slope", ACTS)
@pytest.mark.parametrize("shape,axis,fmt", LAYOUTS)
def test_train_matches_oracle_float64(backend, act, slope, shape, axis, fmt):
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 0.7
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    w, b = _params(shape[axis])
    with batchnorm.use_backend(backend):
        want = "numba" if backend == "auto" else "torch"
        assert inplace_backend_for(x, axis) == want
        y, dx, dw, db, dy = _run_train(x, w, b, axis, act, slope)
    yr, _, _ = R.forward_train(np64(x), np64(w), np64(b), 1e-5, axis, act, slope)
    dxr, dwr, dbr = R.backward(np64(dy), np64(x), np64(w), np64(b), 1e-5, axis, act, slope)
    assert_close(y, yr, rtol=1e-12, atol=1e-12, what="y")
    # z = y / slope amplifies y's rounding by 1/slope; x̂ = (z - β)/γ by 1/|γ|
    assert_close(dx, dxr, rtol=1e-9, atol=1e-11, what="dx")
    assert_close(dw, dwr, rtol=1e-9, atol=1e-10, what="dweight")
    assert_close(db, dbr, rtol=1e-9, atol=1e-10, what="dbias")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act,slope", [("identity", 0.01), ("leaky_relu", 0.01), ("elu", 1.0)])
@pytest.mark.parametrize("inplace", [True, False])
def test_float32_matches_torch_bn_plus_activation(backend, act, slope, inplace):
    """Against torch.nn.BatchNorm2d + activation (float32), the standard the issue names."""
    x = torch.randn(8, 6, 7, 9) * 3 + 1
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(-1.5, 2.0, 6))
        bn.bias.copy_(torch.linspace(-0.5, 0.5, 6))
    ours = InPlaceABN2d(6, activation=act, negative_slope=slope, inplace=inplace)
    ours.load_state_dict(bn.state_dict())
    xt = x.clone().requires_grad_()
    yt = TORCH_ACT[act](slope)(bn(xt))
    dy = torch.randn_like(yt)
    yt.backward(dy)
    xo = x.clone().requires_grad_()
    with batchnorm.use_backend(backend):
        yo = ours(xo * 1)
        yo.backward(dy)
    assert_close(yo, yt, rtol=1e-5, atol=1e-5, what="y")
    assert_close(xo.grad, xt.grad, rtol=1e-4, atol=2e-5, what="dx")
    assert_close(ours.weight.grad, bn.weight.grad, rtol=1e-4, atol=1e-3, what="dweight")
    assert_close(ours.bias.grad, bn.bias.grad, rtol=1e-4, atol=1e-3, what="dbias")
    for k in ("running_mean", "running_var"):
        assert_close(getattr(ours, k), getattr(bn, k), rtol=1e-6, atol=1e-6, what=k)
    assert int(ours.num_batches_tracked) == int(bn.num_batches_tracked) == 1


def test_matches_batchnormact2d():
    """Same layer, same data: InPlace-ABN's gradients equal the project's BatchNormAct2d (saves x)."""
    x = torch.randn(6, 5, 8, 8)
    ref = batchnorm.BatchNormAct2d(5, activation="leaky_relu", negative_slope=0.05)
    ours = InPlaceABN2d(5, activation="leaky_relu", negative_slope=0.05)
    with torch.no_grad():
        ref.weight.uniform_(-2, 2)
        ref.bias.uniform_(-1, 1)
    ours.load_state_dict(ref.state_dict())
    dy = torch.randn_like(x)
    xr = x.clone().requires_grad_()
    ref(xr).backward(dy)
    xo = x.clone().requires_grad_()
    ours(xo * 1).backward(dy)
    assert_close(xo.grad, xr.grad, rtol=1e-4, atol=2e-5, what="dx")
    assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4, what="dweight")
    assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4, what="dbias")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act,slope,inplace", [("identity", 0.01, True), ("leaky_relu", 0.2, True),
                                               ("elu", 0.8, True), ("leaky_relu", 0.2, False)])
def test_gradcheck_train_and_eval(backend, act, slope, inplace):
    x = torch.randn(3, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.3, -0.7], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.2, -0.4], dtype=torch.float64, requires_grad=True)
    m, v = torch.tensor([0.1, -0.3], dtype=torch.float64), torch.tensor([0.8, 1.7], dtype=torch.float64)

    def train(x, w, b):
        return inplace_abn_train(x * 1, weight=w, bias=b, activation=act, negative_slope=slope,
                                 inplace=inplace)[0]

    def evaluate(x, w, b):
        return inplace_abn_eval(x * 1, m, v, w, b, activation=act, negative_slope=slope, inplace=inplace)

    with batchnorm.use_backend(backend):
        assert torch.autograd.gradcheck(train, (x, w, b))
        assert torch.autograd.gradcheck(evaluate, (x, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,axis,fmt", [((4, 3, 5, 6), 1, None), ((4, 3, 5, 6), 1, torch.channels_last),
                                            ((10, 3), 1, None)])
def test_eval_matches_oracle(backend, shape, axis, fmt):
    x = torch.randn(*shape, dtype=torch.float64)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    c = shape[axis]
    m, v = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    w, b = _params(c)
    xl = x.clone().requires_grad_()
    with batchnorm.use_backend(backend):
        y = inplace_abn_eval(xl * 1, m, v, w, b, activation="elu", negative_slope=0.7)
        dy = torch.randn_like(y)
        dx, dw, db = torch.autograd.grad(y, (xl, w, b), dy)
    yr = R.forward_eval(np64(x), np64(m), np64(v), np64(w), np64(b), 1e-5, axis, "elu", 0.7)
    dxr, dwr, dbr = ref_eval_backward(np64(dy), np64(x), np64(m), np64(v), np64(w), np64(b), 1e-5, axis,
                                      "elu", 0.7)
    assert_close(y, yr, rtol=1e-12, atol=1e-12, what="y")
    assert_close(dx, dxr, rtol=1e-10, atol=1e-11, what="dx")
    assert_close(dw, dwr, rtol=1e-9, atol=1e-10, what="dweight")
    assert_close(db, dbr, rtol=1e-9, atol=1e-10, what="dbias")


# ------------------------------------------------------------------------------------------ γ ≈ 0
def test_effective_weight_rule():
    w = torch.tensor([0.0, 1e-9, -1e-9, -0.5, 2e-5, -2e-5, 1e-5, -0.0], dtype=torch.float64)
    got = effective_weight(w, 1e-5, 8, torch.float64, w.device)
    want = torch.tensor([1e-5, 1e-5, -1e-5, -0.5, 2e-5, -2e-5, 1e-5, 1e-5], dtype=torch.float64)
    assert torch.equal(got, want)
    assert torch.equal(effective_weight(None, 1e-5, 3, torch.float32, w.device), torch.ones(3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act,slope", [("leaky_relu", 0.1), ("elu", 1.0), ("identity", 0.01)])
def test_gamma_near_zero_uses_clamped_gamma(backend, act, slope):
    """|γ| < eps_gamma: forward and gradients are BN's with γ_eff = sign(γ)·eps_gamma; dγ passes straight."""
    eps_g = 1e-5
    w = torch.tensor([0.0, 1e-9, -1e-9, -0.5, 3e-5], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.3, -0.2, 0.1, 0.4, 0.0], dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 5, 4, 3, dtype=torch.float64)
    with batchnorm.use_backend(backend):
        y, dx, dw, db, dy = _run_train(x, w, b, 1, act, slope, eps_gamma=eps_g)
    w_eff = np.array([1e-5, 1e-5, -1e-5, -0.5, 3e-5])
    yr, _, _ = R.forward_train(np64(x), w_eff, np64(b), 1e-5, 1, act, slope)
    dxr, dwr, dbr = R.backward(np64(dy), np64(x), w_eff, np64(b), 1e-5, 1, act, slope)
    assert_close(y, yr, rtol=1e-12, atol=1e-12, what="y")
    # recovering x̂ = (z − β)/γ_eff costs ~ulp(|z|)/|γ_eff| ≈ 1e-11 absolute in float64 here
    assert_close(dx, dxr, rtol=1e-6, atol=1e-9, what="dx")
    assert_close(dw, dwr, rtol=1e-6, atol=1e-8, what="dweight")
    assert_close(db, dbr, rtol=1e-9, atol=1e-10, what="dbias")
    assert torch.all(dw[:3] != 0), "a γ at (or near) zero must still receive a gradient"


def test_gamma_zero_float32_gradients_finite_and_within_conditioning_bound():
    """ResNet-style zero-initialised γ in float32: finite gradients, BN's up to the documented bounds.

    x̂ = (z − β)/γ_eff is recovered from a float32 y, so each x̂ is off by up to ulp(|z|)/|γ_eff|
    (≈ 6e-8 · 1 / 1e-5 = 6e-3 here): dγ = Σ dz·x̂ inherits that, and nothing better is possible
    without storing x. dβ = Σ dz needs no x̂ and stays exact; dx is O(eps_gamma) (BN's is 0).
    """
    x = torch.randn(8, 4, 6, 6)
    m = InPlaceABN2d(4)
    with torch.no_grad():
        m.weight.zero_()
        m.bias.copy_(torch.tensor([0.5, -0.5, 1.0, 0.2]))
    ref = nn.Sequential(nn.BatchNorm2d(4), nn.LeakyReLU(0.01))
    ref[0].load_state_dict(m.state_dict())
    dy = torch.randn_like(x)
    xo = x.clone().requires_grad_()
    y = m(xo * 1)
    y.backward(dy)
    xr = x.clone().requires_grad_()
    ref(xr).backward(dy)
    for t in (xo.grad, m.weight.grad, m.bias.grad):
        assert torch.isfinite(t).all()
    assert_close(xo.grad, xr.grad, rtol=0, atol=1e-4, what="dx")
    assert_close(m.bias.grad, ref[0].bias.grad, rtol=1e-5, atol=1e-5, what="dbias")
    dz = dy * torch.where(y > 0, 1.0, 0.01)
    zmax = torch.where(y > 0, y, y / 0.01).abs().amax(dim=(0, 2, 3))
    bound = 2 * torch.finfo(torch.float32).eps * zmax / m.eps_gamma * dz.abs().sum(dim=(0, 2, 3))
    err = (m.weight.grad - ref[0].weight.grad).abs()
    assert torch.all(err <= bound + 1e-5), f"dweight error {err} above the conditioning bound {bound}"
    assert torch.all(m.weight.grad != 0)


# ------------------------------------------------------------------------------------------ modules
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_follow_torch_over_steps(momentum):
    torch_bn = nn.BatchNorm2d(3, momentum=momentum)
    ours = InPlaceABN2d(3, momentum=momentum, activation="identity")
    for step in range(4):
        x = torch.randn(5 + step, 3, 4, 4) * (step + 1) + step
        torch_bn(x.clone())
        ours(x.clone())
        for k in ("running_mean", "running_var"):
            assert_close(getattr(ours, k), getattr(torch_bn, k), rtol=1e-5, atol=1e-6, what=k)
        assert int(ours.num_batches_tracked) == int(torch_bn.num_batches_tracked) == step + 1
    torch_bn.eval()
    ours.eval()
    x = torch.randn(2, 3, 4, 4)
    before = snapshot(ours)
    assert_close(ours(x.clone()), torch_bn(x), rtol=1e-5, atol=1e-6, what="eval y")
    assert_state_unchanged(before, ours, "eval forward")


def test_state_dict_roundtrip_with_torch_batchnorm2d():
    t = nn.BatchNorm2d(6)
    t(torch.randn(4, 6, 3, 3))
    ours = InPlaceABN2d(6)
    ours.load_state_dict(t.state_dict())  # strict
    assert set(ours.state_dict()) == set(t.state_dict())
    back = nn.BatchNorm2d(6)
    back.load_state_dict(ours.state_dict())
    for k, v in t.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


def test_module_family_ranks_and_flags():
    y1 = InPlaceABN1d(4)(torch.randn(6, 4))
    y1b = InPlaceABN1d(4, activation="elu", negative_slope=1.0)(torch.randn(6, 4, 5))
    y3 = InPlaceABN3d(4, inplace=False)(torch.randn(2, 4, 3, 3, 3))
    assert y1.shape == (6, 4) and y1b.shape == (6, 4, 5) and y3.shape == (2, 4, 3, 3, 3)
    with pytest.raises(ValueError, match="InPlaceABN2d: expected 4-D"):
        InPlaceABN2d(4)(torch.randn(6, 4))
    m = InPlaceABN2d(4, affine=False, track_running_stats=False, activation="identity")
    assert m.weight is None and m.running_mean is None
    x = torch.randn(5, 4, 3, 3)
    y = m(x.clone())
    yr, _, _ = R.forward_train(np64(x), None, None, 1e-5, 1)
    assert_close(y, yr, rtol=1e-5, atol=1e-5, what="affine=False")
    r = repr(InPlaceABN2d(4, inplace=False, eps_gamma=1e-3))
    assert "inplace=False" in r and "eps_gamma=0.001" in r and "leaky_relu" in r
    k = InPlaceABN2d.from_convention("keras", 4)
    assert (k.momentum, k.eps, k.running_var_unbiased, k.activation) == (0.01, 1e-3, False, "leaky_relu")


def test_channel_axis_last_module_matches_torch_on_permuted():
    x = torch.randn(3, 5, 4, 6)  # NHWC, C = 6
    ours = InPlaceABN2d(6, channel_axis=-1, activation="leaky_relu", negative_slope=0.1)
    ref = nn.BatchNorm2d(6)
    xo = x.clone().requires_grad_()
    yo = ours(xo * 1)
    xr = x.clone().requires_grad_()
    yr = nn.functional.leaky_relu(ref(xr.permute(0, 3, 1, 2)), 0.1).permute(0, 2, 3, 1)
    dy = torch.randn_like(yo)
    yo.backward(dy)
    yr.backward(dy)
    assert_close(yo, yr, rtol=1e-5, atol=1e-5, what="y")
    assert_close(xo.grad, xr.grad, rtol=1e-4, atol=2e-5, what="dx")
    assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6, what="running_var")


def test_nonfinite_skip_leaves_running_stats():
    m = InPlaceABN2d(2, nonfinite="skip")
    x = torch.randn(4, 2, 3, 3)
    x[0, 1, 0, 0] = float("nan")
    before = snapshot(m)
    m(x)
    assert_state_unchanged(before, m, "nonfinite='skip'")
    m2 = InPlaceABN2d(2, nonfinite="raise")
    before = snapshot(m2)
    with pytest.raises(FloatingPointError, match="running statistics were left unchanged"):
        m2(torch.full((4, 2, 3, 3), float("inf")))
    assert_state_unchanged(before, m2, "nonfinite='raise'")


def test_forced_native_runs_the_inplace_torch_path_for_any_input():
    # torch's native batch-norm ops allocate their output, so "native" is served by the in-place torch
    # path, for inputs numba cannot run too (a forced "numba" refuses those loudly)
    xh = torch.randn(4, 3, 5, 5, dtype=torch.float16)
    m = InPlaceABN2d(3, activation="leaky_relu", negative_slope=0.1).half()
    ref = InPlaceABN2d(3, activation="leaky_relu", negative_slope=0.1).half()
    with batchnorm.use_backend("torch"):
        want = ref(xh.clone())
    with batchnorm.use_backend("native"):
        assert inplace_backend_for(xh) == "torch"
        x = xh.clone()
        y = m(x)
    assert y.data_ptr() == x.data_ptr(), "native: not in place"
    assert torch.equal(y, want)
    assert torch.equal(m.running_mean, ref.running_mean) and torch.equal(m.running_var, ref.running_var)
    with batchnorm.use_backend("numba"), pytest.raises(RuntimeError, match="'numba' cannot run"):
        m(xh.clone())


def test_half_precision_runs_on_torch_path():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    w, b = _params(3)
    xh = x.to(torch.float16)
    assert inplace_backend_for(xh) == "torch"
    xl = xh.clone().requires_grad_()
    y, _ = inplace_abn_train(xl * 1, weight=w, bias=b, activation="leaky_relu", negative_slope=0.1)
    assert y.dtype == torch.float16
    dy = torch.randn(y.shape, dtype=torch.float64)
    dx, dw = torch.autograd.grad(y, (xl, w), dy.to(torch.float16))
    yr, _, _ = R.forward_train(np64(xh), np64(w), np64(b), 1e-5, 1, "leaky_relu", 0.1)
    dxr, dwr, _ = R.backward(np64(dy.half()), np64(xh), np64(w), np64(b), 1e-5, 1, "leaky_relu", 0.1)
    assert_close(y, yr, rtol=2e-3, atol=2e-3, what="y fp16")
    assert_close(dx, dxr, rtol=2e-2, atol=2e-2, what="dx fp16")
    assert_close(dw, dwr, rtol=2e-2, atol=5e-2, what="dweight fp16")


@given(
    rank=st.integers(2, 5),
    c=st.integers(1, 5),
    n=st.integers(2, 6),
    last=st.booleans(),
    act=st.sampled_from(["identity", "leaky_relu", "elu"]),
    slope=st.floats(0.01, 3.0),
    inplace=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_shapes_match_oracle(rank, c, n, last, act, slope, inplace, seed):
    g = torch.Generator().manual_seed(seed)
    shape = [n, c] + [int(s) for s in torch.randint(1, 4, (rank - 2,), generator=g)]
    axis = 1
    if last:
        shape = [shape[0], *shape[2:], c]
        axis = -1
    x = torch.randn(*shape, dtype=torch.float64, generator=g) * 3
    w = torch.rand(c, dtype=torch.float64, generator=g) * 2 - 1
    w = (w + torch.sign(w) * 0.1).requires_grad_()
    b = torch.randn(c, dtype=torch.float64, generator=g).requires_grad_()
    y, dx, dw, db, dy = _run_train(x, w, b, axis, act, slope, inplace=inplace)
    yr, _, _ = R.forward_train(np64(x), np64(w), np64(b), 1e-5, axis, act, slope)
    dxr, dwr, dbr = R.backward(np64(dy), np64(x), np64(w), np64(b), 1e-5, axis, act, slope)
    assert_close(y, yr, rtol=1e-11, atol=1e-11, what="y")
    assert_close(dx, dxr, rtol=1e-8, atol=1e-9, what="dx")
    assert_close(dw, dwr, rtol=1e-8, atol=1e-9, what="dweight")
    assert_close(db, dbr, rtol=1e-8, atol=1e-9, what="dbias")


# ---------------------------------------------------------------- empty batch (N = 0), as BatchNorm*
# (assert_empty_batch_changes_nothing: tests/helpers/core_util.py)


@pytest.mark.parametrize("cls,shape", [(InPlaceABN1d, (0, 3)), (InPlaceABN1d, (0, 3, 5)),
                                       (InPlaceABN2d, (0, 3, 4, 4)), (InPlaceABN3d, (0, 3, 2, 2, 2))])
@pytest.mark.parametrize("activation", ["leaky_relu", "elu", "identity"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("inplace", [True, False])
def test_inplace_abn_empty_batch_changes_nothing(cls, shape, activation, training, inplace):
    layer = cls(3, activation=activation, inplace=inplace, momentum=None)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        layer.num_batches_tracked.fill_(5)
    layer.train(training)
    assert_empty_batch_changes_nothing(layer, shape)


def test_inplace_abn_empty_batch_still_checks_the_shape():
    with pytest.raises(ValueError, match="channels"):
        InPlaceABN2d(3)(torch.randn(0, 4, 2, 2))
