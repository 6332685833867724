"""The float64 oracle itself, checked against independent ground truths.

Everything else is tested against :mod:`batchnorm.reference`, so the oracle must be right on its
own: its forward against ``torch.nn.functional.batch_norm`` in float64, its closed-form backward
against central finite differences of its own forward *and* against torch autograd through a
naive composite formula, its activations against torch's, and its running-statistics step
against the formulas written out by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from helpers.util import assert_close

from batchnorm import reference as R

ACTS = [("identity", 0.01), ("relu", 0.01), ("leaky_relu", 0.2), ("elu", 0.7)]
CASES = [((7, 3), 1), ((5, 3, 4), 1), ((4, 3, 2, 5), 1), ((3, 2, 2, 3, 3), -1), ((4, 3, 5), 2)]


def _torch_act(z, act, slope):
    return {"identity": z, "relu": torch.relu(z), "leaky_relu": TF.leaky_relu(z, slope),
            "elu": TF.elu(z, slope)}[act]


def _naive_torch(x, w, b, eps, axis, act, slope):
    """BN written with plain differentiable torch ops (float64), for autograd to differentiate."""
    dims = [d for d in range(x.ndim) if d != axis % x.ndim]
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    z = (x - mean) / torch.sqrt(var + eps) * w.reshape(shape) + b.reshape(shape)
    return _torch_act(z, act, slope)


@pytest.mark.parametrize("shape,axis", CASES)
def test_moments_are_numpy_mean_and_biased_var(shape, axis):
    x = np.random.default_rng(1).normal(5.0, 3.0, shape)
    mean, var = R.moments(x, axis)
    axes = tuple(d for d in range(len(shape)) if d != axis % len(shape))
    assert_close(mean, x.mean(axis=axes), what="mean")
    assert_close(var, x.var(axis=axes), what="biased var")
    mean32, var32 = R.moments(x.astype(np.float32), axis)
    assert mean32.dtype == var32.dtype == np.float64  # the oracle always computes in float64


@pytest.mark.parametrize("shape,axis", CASES)
def test_forward_matches_torch_functional_in_float64(shape, axis):
    rng = np.random.default_rng(2)
    x = rng.normal(-1.0, 2.0, shape)
    c = shape[axis]
    w, b = rng.uniform(0.5, 2, c), rng.normal(size=c)
    xt = torch.from_numpy(np.moveaxis(x, axis, 1).copy())  # torch wants channels on axis 1
    y, _, var = R.forward_train(x, w, b, 1e-3, axis)
    yt = TF.batch_norm(xt, None, None, torch.from_numpy(w), torch.from_numpy(b), training=True, eps=1e-3)
    assert_close(y, np.moveaxis(yt.numpy(), 1, axis), what="forward_train vs torch")
    rm, rv = rng.normal(size=c), rng.uniform(0.2, 3, c)
    ye = R.forward_eval(x, rm, rv, w, b, 1e-3, axis)
    rmt, rvt, wt, bt = (torch.from_numpy(a) for a in (rm, rv, w, b))
    yte = TF.batch_norm(xt, rmt, rvt, wt, bt, training=False, eps=1e-3)
    assert_close(ye, np.moveaxis(yte.numpy(), 1, axis), what="forward_eval vs torch")
    # without affine it is exactly x̂, whose per-channel mean is 0 and variance var/(var+ε)
    yh, _, _ = R.forward_train(x, None, None, 1e-3, axis)
    m2, v2 = R.moments(yh, axis)
    assert_close(m2, np.zeros(c), atol=1e-12, what="mean of x̂")
    assert_close(v2, var / (var + 1e-3), what="variance of x̂")


@pytest.mark.parametrize("act,slope", ACTS, ids=[a for a, _ in ACTS])
@pytest.mark.parametrize("shape,axis", CASES)
def test_closed_form_backward_matches_torch_autograd_of_naive_formula(act, slope, shape, axis):
    rng = np.random.default_rng(3)
    x = rng.normal(0.5, 1.5, shape)
    c = shape[axis]
    w, b, dy = rng.uniform(-2, 2, c), rng.normal(size=c), rng.normal(size=shape)
    xt, wt, bt = (torch.from_numpy(a.copy()).requires_grad_() for a in (x, w, b))
    yt = _naive_torch(xt, wt, bt, 1e-5, axis, act, slope)
    yt.backward(torch.from_numpy(dy))
    y, _, _ = R.forward_train(x, w, b, 1e-5, axis, act, slope)
    dx, dw, db = R.backward(dy, x, w, b, 1e-5, axis, act, slope)
    assert_close(y, yt.detach(), what="forward vs naive torch")
    assert_close(dx, xt.grad, rtol=1e-9, atol=1e-11, what="dx vs autograd")
    assert_close(dw, wt.grad, rtol=1e-9, atol=1e-11, what="dweight vs autograd")
    assert_close(db, bt.grad, rtol=1e-9, atol=1e-11, what="dbias vs autograd")


@pytest.mark.parametrize("act,slope", ACTS, ids=[a for a, _ in ACTS])
def test_closed_form_backward_matches_finite_differences_of_the_oracle(act, slope):
    """Central differences of the oracle's own forward: ∂L/∂θ with L = Σ dy · y."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 2, 3))
    w, b, dy = np.array([1.3, -0.7]), np.array([0.2, -0.1]), rng.normal(size=(4, 2, 3))
    dx, dw, db = R.backward(dy, x, w, b, 1e-3, 1, act, slope)

    def loss(x_, w_, b_):
        return float((dy * R.forward_train(x_, w_, b_, 1e-3, 1, act, slope)[0]).sum())

    h = 1e-6
    for name, arr, grad in (("x", x, dx), ("w", w, dw), ("b", b, db)):
        num = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            plus, minus = arr.copy(), arr.copy()
            plus[i] += h
            minus[i] -= h
            args = {"x": (x, w, b), "w": (x, w, b), "b": (x, w, b)}[name]
            ap = [plus if a is arr else a for a in args]
            am = [minus if a is arr else a for a in args]
            num[i] = (loss(*ap) - loss(*am)) / (2 * h)
        assert_close(grad, num, rtol=1e-6, atol=1e-7, what=f"d{name} vs finite differences ({act})")


@pytest.mark.parametrize("act,slope", ACTS, ids=[a for a, _ in ACTS])
def test_activations_and_their_derivatives_match_torch(act, slope):
    z = np.concatenate([np.linspace(-3, 3, 41), [0.0, -0.0, 1e-300, -1e-300]])
    zt = torch.from_numpy(z).requires_grad_()
    yt = _torch_act(zt, act, slope)
    yt.sum().backward()
    assert_close(R.activation(z, act, slope), yt.detach(), rtol=1e-15, atol=1e-300, what=f"{act}(z)")
    # at z = 0 torch's convention: relu' = 0, leaky_relu' = slope, elu' = alpha (from the left)
    assert_close(R.activation_grad(z, act, slope), zt.grad, rtol=1e-15, atol=1e-300, what=f"{act}'(z)")


def test_unknown_activation_is_rejected_by_name():
    with pytest.raises(ValueError, match=r"reference\.activation: unknown activation 'mish'"):
        R.activation(np.zeros(3), "mish")
    with pytest.raises(ValueError, match=r"reference\.activation_grad: unknown activation 'softplus'"):
        R.activation_grad(np.zeros(3), "softplus")


@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, None])
@pytest.mark.parametrize("unbiased", [True, False])
def test_update_running_stats_written_out(momentum, unbiased):
    rm, rv = np.array([1.0, -2.0]), np.array([0.5, 4.0])
    bm, bv = np.array([0.25, 3.0]), np.array([2.0, 0.125])
    m, v, t = R.update_running_stats(rm, rv, bm, bv, 10, momentum, 4, unbiased)
    f = 1 / 5 if momentum is None else momentum
    s = bv * (10 / 9) if unbiased else bv
    assert t == 5
    assert_close(m, (1 - f) * rm + f * bm, rtol=1e-15, atol=0, what="mean")
    assert_close(v, (1 - f) * rv + f * s, rtol=1e-15, atol=0, what="var")


def test_cumulative_average_from_zero_is_the_plain_average():
    rng = np.random.default_rng(5)
    m, v, t = np.zeros(3), np.ones(3), 0
    means, variances = [], []
    for n in (4, 7, 2, 9):
        bm, bv = rng.normal(size=3), rng.uniform(size=3)
        means.append(bm)
        variances.append(bv * n / (n - 1))
        m, v, t = R.update_running_stats(m, v, bm, bv, n, None, t)
    assert t == 4
    assert_close(m, np.mean(means, 0), rtol=1e-14, atol=1e-15, what="cumulative mean")
    assert_close(v, np.mean(variances, 0), rtol=1e-14, atol=1e-15, what="cumulative unbiased var")


def test_oracle_never_mutates_its_inputs():
    rng = np.random.default_rng(6)
    x, dy = rng.normal(size=(5, 3, 2)), rng.normal(size=(5, 3, 2))
    w, b, rm, rv = rng.normal(size=3), rng.normal(size=3), rng.normal(size=3), rng.uniform(1, 2, 3)
    arrays = (x, dy, w, b, rm, rv)
    copies = [a.copy() for a in arrays]
    R.moments(x)
    R.forward_train(x, w, b, 1e-5, 1, "elu", 0.5)
    R.forward_eval(x, rm, rv, w, b)
    R.backward(dy, x, w, b, 1e-5, 1, "leaky_relu", 0.1)
    R.update_running_stats(rm, rv, rm, rv, 10, 0.1, 0)
    R.activation(x, "relu")
    for a, c in zip(arrays, copies, strict=True):
        assert np.array_equal(a, c)
