"""The functional core vs the float64 oracle: batch_norm_train/eval, moments, batch_norm, running stats.

Every differentiable function is gradchecked (and gradgradchecked) in float64; every result is
compared with :mod:`batchnorm.reference` to 1e-10; the "state in, state out" functions are checked
to leave their tensor arguments bit-identical. Tests about the torch composite path force it with
``use_backend("torch")``; the parity tests loop over every backend available here (forced), so a
fast backend that appears is held to the same oracle.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.core_util import bits, np64, ref_eval_backward, tensors_bit_equal
from helpers.util import assert_close

import batchnorm
from batchnorm import kernels
from batchnorm import reference as R
from batchnorm.core import functional as F
from batchnorm.core.autograd import BatchNormEvalFn, BatchNormTrainFn
from batchnorm.kernels import torch_backend

ACTS = [("identity", 0.01), ("relu", 0.01), ("leaky_relu", 0.25), ("elu", 0.8)]
# (shape, channel_axis): ranks 2..5, channels first, last, and in the middle
CASES = [((6, 3), 1), ((6, 3), -1), ((4, 3, 5), 1), ((4, 5, 3), -1), ((3, 2, 4, 5), 1), ((3, 4, 5, 2), -1),
         ((3, 4, 2, 5), 2), ((2, 3, 2, 3, 2), 1), ((2, 2, 3, 2, 3), -1)]


def _backends_for(x, axis, act):
    """Every backend available here that can run this input (torch always can)."""
    names = [n for n in kernels.available_backends()
             if kernels._load(n).supports(x, axis % x.ndim, act)]
    assert "torch" in names
    return names


def _affine(c, which, dtype=torch.float64):
    w = torch.linspace(0.5, 1.5, c, dtype=dtype) if which in ("both", "weight") else None
    b = torch.linspace(-0.4, 0.3, c, dtype=dtype) if which in ("both", "bias") else None
    return w, b


@pytest.mark.parametrize("shape,axis", CASES, ids=[f"{s}-ax{a}" for s, a in CASES])
@pytest.mark.parametrize("act,slope", ACTS, ids=[a for a, _ in ACTS])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_train_forward_backward_and_running_stats_match_oracle(shape, axis, act, slope, affine):
    c = shape[axis]
    x = torch.randn(shape, dtype=torch.float64) * 1.7 + 0.4
    dy = torch.randn(shape, dtype=torch.float64)
    w0, b0 = _affine(c, affine)
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    nbt = torch.tensor(3)
    ref_y, bm, bv = R.forward_train(np64(x), np64(w0) if w0 is not None else None,
                                    np64(b0) if b0 is not None else None, 1e-5, axis, act, slope)
    ref_dx, ref_dw, ref_db = R.backward(np64(dy), np64(x), None if w0 is None else np64(w0),
                                        None if b0 is None else np64(b0), 1e-5, axis, act, slope)
    ref_m, ref_v, ref_n = R.update_running_stats(np64(rm), np64(rv), bm, bv, x.numel() // c, 0.2, 3)
    for name in _backends_for(x, axis, act):
        with batchnorm.use_backend(name):
            xg = x.clone().requires_grad_()
            w = None if w0 is None else w0.clone().requires_grad_()
            b = None if b0 is None else b0.clone().requires_grad_()
            y, st = F.batch_norm_train(xg, rm, rv, w, b, momentum=0.2, num_batches_tracked=nbt,
                                       channel_axis=axis, activation=act, negative_slope=slope)
            y.backward(dy)
        tag = f"[{name}]"
        assert_close(y, ref_y, what=f"{tag} y")
        assert_close(xg.grad, ref_dx, what=f"{tag} dx")
        if w is not None:
            assert_close(w.grad, ref_dw, what=f"{tag} dweight")
        if b is not None:
            assert_close(b.grad, ref_db, what=f"{tag} dbias")
        assert_close(st.mean, ref_m, what=f"{tag} running mean")
        assert_close(st.var, ref_v, what=f"{tag} running var")
        assert int(st.num_batches_tracked) == ref_n == 4


@pytest.mark.parametrize("shape,axis", CASES[::2], ids=[f"{s}-ax{a}" for s, a in CASES[::2]])
@pytest.mark.parametrize("act,slope", ACTS, ids=[a for a, _ in ACTS])
def test_eval_forward_backward_match_oracle(shape, axis, act, slope):
    c = shape[axis]
    x = torch.randn(shape, dtype=torch.float64) * 2 - 0.3
    dy = torch.randn(shape, dtype=torch.float64)
    mean, var = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.2
    w0, b0 = _affine(c, "both")
    ref_y = R.forward_eval(np64(x), np64(mean), np64(var), np64(w0), np64(b0), 1e-3, axis, act, slope)
    ref_dx, ref_dw, ref_db = ref_eval_backward(np64(dy), np64(x), np64(mean), np64(var), np64(w0), np64(b0),
                                               1e-3, axis, act, slope)
    for name in _backends_for(x, axis, act):
        with batchnorm.use_backend(name):
            xg, w, b = x.clone().requires_grad_(), w0.clone().requires_grad_(), b0.clone().requires_grad_()
            y = F.batch_norm_eval(xg, mean, var, w, b, eps=1e-3, channel_axis=axis, activation=act,
                                  negative_slope=slope)
            y.backward(dy)
        assert_close(y, ref_y, what=f"[{name}] eval y")
        assert_close(xg.grad, ref_dx, what=f"[{name}] eval dx")
        assert_close(w.grad, ref_dw, what=f"[{name}] eval dweight")
        assert_close(b.grad, ref_db, what=f"[{name}] eval dbias")


def test_eval_statistics_are_constants_even_if_they_require_grad():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    mean = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    var = torch.ones(3, dtype=torch.float64, requires_grad=True)
    F.batch_norm_eval(x, mean, var).sum().backward()
    assert mean.grad is None and var.grad is None
    assert_close(x.grad, torch.full((5, 3), 1 / np.sqrt(1 + 1e-5), dtype=torch.float64), what="dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_backend_half_and_float_match_oracle_at_their_precision(dtype):
    """The torch path: statistics in float32, outputs in the input dtype, oracle tolerance of that dtype."""
    tol = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    x = (torch.randn(8, 3, 4, 4) * 3 + 1).to(dtype)
    dy = torch.randn_like(x)
    w, b = _affine(3, "both", torch.float32)
    with batchnorm.use_backend("torch"):
        y, mean, var = BatchNormTrainFn.apply(x, w, b, 1e-5, 1, "relu", 0.01)
        dx, dw, db = torch_backend.backward(dy, x, y, w, b, mean, var, 1e-5, 1, "relu", 0.01)
    assert y.dtype == dx.dtype == dtype and mean.dtype == var.dtype == dw.dtype == torch.float32
    ref_y, bm, bv = R.forward_train(np64(x), np64(w), np64(b), 1e-5, 1, "relu")
    ref_dx, ref_dw, ref_db = R.backward(np64(dy), np64(x), np64(w), np64(b), 1e-5, 1, "relu")
    assert_close(mean, bm, rtol=1e-6, atol=1e-6, what="batch mean (float32 accumulation)")
    assert_close(var, bv, rtol=1e-5, atol=1e-6, what="batch var (float32 accumulation)")
    assert_close(y, ref_y, rtol=tol, atol=tol * 2, what=f"{dtype} y")
    scale = np.abs(ref_dx).max()
    assert_close(dx, ref_dx, rtol=tol, atol=tol * scale, what=f"{dtype} dx")
    assert_close(dw, ref_dw, rtol=1e-4, atol=1e-4 * np.abs(ref_dw).max(), what="dweight (float32)")
    assert_close(db, ref_db, rtol=1e-4, atol=1e-4 * np.abs(ref_db).max(), what="dbias (float32)")


# -- gradcheck / gradgradcheck (float64) -----------------------------------------------------------
@pytest.mark.parametrize("act,slope", ACTS, ids=[a for a, _ in ACTS])
@pytest.mark.parametrize("shape,axis", [((4, 3), 1), ((3, 2, 3), -1), ((2, 3, 2, 2), 1)])
def test_gradcheck_train_function_every_activation(act, slope, shape, axis):
    c = shape[axis]
    x = (torch.randn(shape, dtype=torch.float64) * 1.5).requires_grad_()
    w = torch.linspace(0.6, 1.4, c, dtype=torch.float64).requires_grad_()
    b = torch.linspace(-0.5, 0.5, c, dtype=torch.float64).requires_grad_()

    def f(x, w, b):
        return BatchNormTrainFn.apply(x, w, b, 1e-3, axis % x.ndim, act, slope)[0]

    with batchnorm.use_backend("torch"):
        assert torch.autograd.gradcheck(f, (x, w, b))
        assert torch.autograd.gradgradcheck(f, (x, w, b))
    # whatever "auto" picks (a fast backend's first-order backward included)
    assert torch.autograd.gradcheck(f, (x, w, b))


def test_gradcheck_train_function_without_affine():
    x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)

    def f(x):
        return BatchNormTrainFn.apply(x, None, None, 1e-5, 1, "identity", 0.01)[0]

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("act,slope", ACTS, ids=[a for a, _ in ACTS])
def test_gradcheck_eval_path_every_activation(act, slope):
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.7, -1.2, 1.5], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, 0.3, -0.2], dtype=torch.float64, requires_grad=True)
    mean, var = torch.tensor([0.2, -0.1, 0.0], dtype=torch.float64), torch.tensor([0.5, 1.5, 2.0],
                                                                                    dtype=torch.float64)

    def f(x, w, b):
        return F.batch_norm_eval(x, mean, var, w, b, eps=1e-3, activation=act, negative_slope=slope)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))
    g = lambda x, w, b: BatchNormEvalFn.apply(x, mean, var, w, b, 1e-3, 1, act, slope)  # noqa: E731
    with batchnorm.use_backend("torch"):
        assert torch.autograd.gradgradcheck(g, (x, w, b))


def test_gradcheck_tf_style_batch_norm_and_moments():
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    mean = torch.randn(2, 1, dtype=torch.float64, requires_grad=True)
    var = (torch.rand(2, 1, dtype=torch.float64) + 0.5).requires_grad_()
    off = torch.randn(4, dtype=torch.float64, requires_grad=True)
    sc = torch.randn(2, 1, dtype=torch.float64, requires_grad=True)
    args = (x, mean, var, off, sc)
    assert torch.autograd.gradcheck(lambda *a: F.batch_norm(*a, variance_epsilon=1e-3), args)
    assert torch.autograd.gradgradcheck(lambda *a: F.batch_norm(*a, variance_epsilon=1e-3), args)
    for axes, keepdim in ([0, 2], False), ([1], True), ([0, 1, 2], False), ([-1], False):
        assert torch.autograd.gradcheck(lambda x: F.moments(x, axes, keepdim), (x,)), axes  # noqa: B023
        assert torch.autograd.gradgradcheck(lambda x: F.moments(x, axes, keepdim), (x,)), axes  # noqa: B023
    # tf's composition: moments feed batch_norm, differentiated end to end
    def composed(x, off, sc):
        m, v = F.moments(x, [0, 2], keepdim=True)
        return F.batch_norm(x, m, v, off, sc, 1e-3)

    sc2 = torch.randn(1, 2, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(composed, (x, off, sc2))
    assert torch.autograd.gradgradcheck(composed, (x, off, sc2))


# -- moments and the tf-style batch_norm ---------------------------------------------------------------
@pytest.mark.parametrize("axes", [None, [0], [0, 2, 3], [-1], [1, 3], [0, 1, 2, 3], [3, 0], []])
@pytest.mark.parametrize("keepdim", [False, True])
def test_moments_match_numpy(axes, keepdim):
    x = torch.randn(3, 4, 2, 5, dtype=torch.float64) * 3 + 2
    m, v = F.moments(x, axes, keepdim)
    ax = tuple(d for d in range(4) if d != 1) if axes is None else tuple(axes)
    xn = np64(x)
    em, ev = np.mean(xn, axis=ax, keepdims=keepdim), np.var(xn, axis=ax, keepdims=keepdim)
    assert tuple(m.shape) == tuple(v.shape) == em.shape
    assert_close(m.reshape(-1), em.reshape(-1), what="mean")  # (0-d results flattened for assert_close)
    assert_close(v.reshape(-1), ev.reshape(-1), what="variance (biased, as tf.nn.moments)")
    assert m.dtype == v.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_moments_return_input_dtype_with_float32_accumulation(dtype):
    x = (torch.randn(128, 4, 8) + 300).to(dtype)  # a float16 accumulator overflows (sum ~3e5 > 65504)
    m, v = F.moments(x)
    assert m.dtype == v.dtype == dtype
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6}[dtype]
    assert_close(m, np64(x).mean(axis=(0, 2)), rtol=tol, atol=0, what="mean")
    assert_close(v, np64(x).var(axis=(0, 2)), rtol=max(tol, 1e-4), atol=1e-3, what="var")


def test_batch_norm_matches_numpy_formula_with_broadcasting():
    eps = 1e-3
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64) * 2 + 1
    m, v = F.moments(x, [0, 2, 3], keepdim=True)  # (1, C, 1, 1)
    gamma = torch.randn(3, 1, 1, dtype=torch.float64)
    beta = torch.randn(3, 1, 1, dtype=torch.float64)
    y = F.batch_norm(x, m.reshape(3, 1, 1), v.reshape(3, 1, 1), beta, gamma, eps)  # NCHW: (C, 1, 1)
    xn, mn, vn = np64(x), np64(m), np64(v)
    expect = np64(gamma) * (xn - mn) / np.sqrt(vn + eps) + np64(beta)
    assert_close(y, expect, what="NCHW with (C,1,1) parameters")
    xh = x.permute(0, 2, 3, 1).contiguous()  # NHWC: (C,)
    mh, vh = F.moments(xh, [0, 1, 2])
    yh = F.batch_norm(xh, mh, vh, beta.reshape(3), gamma.reshape(3), eps)
    assert_close(yh, np.transpose(expect, (0, 2, 3, 1)), what="NHWC with (C,) parameters")
    # offset/scale optional; per-example (non-channel) statistics broadcast too
    y0 = F.batch_norm(x, m, v, variance_epsilon=eps)
    assert_close(y0, (xn - mn) / np.sqrt(vn + eps), what="no offset/scale")
    # and it is the same normalisation as the training op (with its eps)
    yt, _ = F.batch_norm_train(x, eps=eps)
    assert_close(y0, yt, what="tf-style == batch_norm_train")


# -- running statistics: formulas and purity --------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0, 0.37])
@pytest.mark.parametrize("unbiased", [True, False])
def test_update_running_stats_formula_and_purity(momentum, unbiased):
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 1
    bm, bv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    nbt = torch.tensor(5)
    args = (rm, rv, bm, bv, nbt)
    saved = [bits(t) for t in args]
    st = F.update_running_stats(rm, rv, bm, bv, 12, momentum, nbt, unbiased)
    assert all(torch.equal(bits(t), s) for t, s in zip(args, saved, strict=True)), "an input was mutated"
    em, ev, en = R.update_running_stats(np64(rm), np64(rv), np64(bm), np64(bv), 12, momentum, 5, unbiased)
    assert_close(st.mean, em, what="mean")
    assert_close(st.var, ev, what="var")
    assert int(st.num_batches_tracked) == en == 6 and int(nbt) == 5
    f = 1 / 6 if momentum is None else momentum  # the formula spelled out once more
    v_in = np64(bv) * (12 / 11 if unbiased else 1)
    assert_close(st.var, (1 - f) * np64(rv) + f * v_in, what="EMA/cumulative formula")


@pytest.mark.parametrize("path", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0, 0.37])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("n", [1, 2, 12])
def test_update_running_stats_inplace_writes_the_same_bits_into_the_buffers(
        path, dtype, momentum, unbiased, n, monkeypatch):
    """In place (NumPy ufuncs on the buffers where they apply, else the pure result copied in) = the
    pure call's bits."""
    used = []
    real = F._update_with_numpy

    def spy(*args):
        used.append(path == "numpy" and real(*args))
        return used[-1]

    monkeypatch.setattr(F, "_update_with_numpy", spy)
    torch.manual_seed(n)
    rm, rv = torch.randn(37).to(dtype), (torch.rand(37) + 1).to(dtype)
    for stats_dtype in (torch.float64, dtype):  # the kernels' float64 statistics, and the torch path's
        bm, bv = torch.randn(37, dtype=torch.float64).to(stats_dtype), torch.rand(37).to(stats_dtype) * 3
        nbt = torch.tensor(5)
        pure = F.update_running_stats(rm, rv, bm, bv, n, momentum, nbt, unbiased)
        saved = [bits(t) for t in (bm, bv)]
        brm, brv, bnbt = rm.clone(), rv.clone(), nbt.clone()
        out = F.update_running_stats(brm, brv, bm, bv, n, momentum, bnbt, unbiased, inplace=True)
        assert out.mean is brm and out.var is brv and out.num_batches_tracked is bnbt
        assert tensors_bit_equal(brm, pure.mean) and tensors_bit_equal(brv, pure.var)
        assert int(bnbt) == 6 and int(nbt) == 5
        assert all(torch.equal(bits(t), b) for t, b in zip((bm, bv), saved, strict=True)), \
            "the batch statistics were written"
    if dtype in (torch.float32, torch.float64):  # (narrower buffers compute in float32, then store)
        assert used == [path == "numpy"] * 2


def test_update_running_stats_inplace_bumps_the_version_so_autograd_notices():
    """A graph that saved the running statistics (an eval-mode forward) must not silently use
    statistics that a training step changed afterwards: the NumPy writes bump the buffers' version
    counters as torch's in-place ops do, and backward raises."""
    m = batchnorm.BatchNorm1d(3)
    m.eval()
    x = torch.randn(8, 3, requires_grad=True)
    y = m(x)
    versions = (m.running_mean._version, m.running_var._version)
    m.train()
    with batchnorm.use_backend("numba"):  # (the native path is torch's layer code, which does not bump
        m(torch.randn(8, 3))              # them: torch's kernel writes the buffers behind autograd)
    assert m.running_mean._version > versions[0] and m.running_var._version > versions[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_update_running_stats_inplace_falls_back_where_numpy_cannot_write():
    """Buffers that require grad (NumPy cannot view them): the torch ops, with the same bits."""
    rm, rv = torch.randn(5), torch.rand(5) + 1
    bm, bv = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    pure = F.update_running_stats(rm, rv, bm, bv, 7, 0.3)
    grm, grv = rm.clone().requires_grad_(), rv.clone().requires_grad_()
    assert not F._update_with_numpy(grm, grv, bm, bv, 0.3, 7 / 6)
    assert torch.equal(grm, rm) and torch.equal(grv, rv), "a declined update must write nothing"
    F.update_running_stats(grm, grv, bm, bv, 7, 0.3, inplace=True)
    assert tensors_bit_equal(grm.detach(), pure.mean) and tensors_bit_equal(grv.detach(), pure.var)


def test_update_running_stats_inplace_with_infinite_statistics_warns_nothing():
    """Inf/NaN batch statistics propagate into the buffers quietly (torch's behaviour; the test suite
    turns warnings into errors)."""
    rm, rv = torch.zeros(3), torch.ones(3)
    bm = torch.tensor([float("inf"), float("nan"), 1.0], dtype=torch.float64)
    bv = torch.tensor([float("inf"), 1.0, 1e300], dtype=torch.float64)
    pure = F.update_running_stats(rm, rv, bm, bv, 4, 1.0)
    F.update_running_stats(rm, rv, bm, bv, 4, 1.0, inplace=True)
    assert tensors_bit_equal(rm, pure.mean) and tensors_bit_equal(rv, pure.var)


def test_update_running_stats_inplace_without_a_count():
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    bm, bv = torch.arange(3.0, dtype=torch.float64), torch.full((3,), 2.0, dtype=torch.float64)
    out = F.update_running_stats(rm, rv, bm, bv, 4, 0.5, None, inplace=True)
    assert out.num_batches_tracked is None and out.mean is rm
    assert_close(rm, [0.0, 0.5, 1.0], what="mean")
    assert_close(rv, [0.5 + 0.5 * 2.0 * 4 / 3] * 3, what="var")


def test_batch_norm_train_inplace_stats_updates_the_buffers_like_the_pure_call():
    x = torch.randn(6, 3, 2, 2) * 2 + 1
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm, rv, nbt = torch.randn(3), torch.rand(3) + 1, torch.tensor(2)
    for momentum in (0.1, None):
        y0, pure = F.batch_norm_train(x, rm, rv, w, b, momentum=momentum, num_batches_tracked=nbt)
        brm, brv, bnbt = rm.clone(), rv.clone(), nbt.clone()
        y1, st = F.batch_norm_train(x, brm, brv, w, b, momentum=momentum, num_batches_tracked=bnbt,
                                    inplace_stats=True)
        assert st.mean is brm and st.var is brv and st.num_batches_tracked is bnbt
        assert tensors_bit_equal(y0, y1)
        for got, want in zip(st, pure, strict=True):
            assert tensors_bit_equal(got, want)


def test_batch_norm_train_inplace_stats_changes_nothing_on_a_rejected_call():
    x = torch.randn(6, 3)
    rm, rv, nbt = torch.randn(3), torch.rand(3) + 1, torch.tensor(2)
    saved = [bits(t) for t in (rm, rv, nbt)]
    with pytest.raises(ValueError, match="eps"):
        F.batch_norm_train(x, rm, rv, num_batches_tracked=nbt, eps=-1.0, inplace_stats=True)
    xn = x.clone()
    xn[0, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="left unchanged"):
        F.batch_norm_train(xn, rm, rv, num_batches_tracked=nbt, nonfinite="raise", inplace_stats=True)
    _, st = F.batch_norm_train(xn, rm, rv, num_batches_tracked=nbt, nonfinite="skip", inplace_stats=True)
    assert st.mean is rm
    assert all(torch.equal(bits(t), s) for t, s in zip((rm, rv, nbt), saved, strict=True))


def test_cumulative_average_equals_plain_average_of_batch_statistics():
    rm, rv, nbt = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), torch.tensor(0)
    means, vars_ = [], []
    for n in (4, 9, 2, 7):
        x = torch.randn(n, 3, dtype=torch.float64) * 2 + 1
        _, (rm, rv, nbt) = F.batch_norm_train(x, rm, rv, momentum=None, num_batches_tracked=nbt)
        means.append(np64(x).mean(0))
        vars_.append(np64(x).var(0, ddof=1))
    assert_close(rm, np.mean(means, 0), what="cumulative running mean")
    assert_close(rv, np.mean(vars_, 0), what="cumulative running var (unbiased)")
    assert int(nbt) == 4


def test_batch_norm_train_is_pure_and_returns_new_tensors():
    x = torch.randn(6, 3, 2, 2)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm, rv, nbt = torch.randn(3), torch.rand(3) + 1, torch.tensor(2)
    args = (x, rm, rv, w, b, nbt)
    saved = [bits(t) for t in args]
    versions = [t._version for t in args]
    _, st = F.batch_norm_train(x, rm, rv, w, b, momentum=None, num_batches_tracked=nbt, activation="relu")
    assert all(torch.equal(bits(t), s) for t, s in zip(args, saved, strict=True)), "an argument was modified"
    assert [t._version for t in args] == versions, "an argument was written in place"
    for new, old in ((st.mean, rm), (st.var, rv), (st.num_batches_tracked, nbt)):
        assert new.data_ptr() != old.data_ptr()
    assert int(st.num_batches_tracked) == 3
    # nothing tracked: the (None) state is handed back as it came
    y2, st2 = F.batch_norm_train(x, None, None, w, b)
    assert st2 == (None, None, None) and tensors_bit_equal(y2, F.batch_norm_train(x, weight=w, bias=b)[0])


@pytest.mark.parametrize("policy", ["update", "skip", "raise"])
def test_batch_norm_train_nonfinite_policies(policy):
    x = torch.randn(5, 3, 2)
    x[2, 1, 0] = float("nan")
    rm, rv, nbt = torch.randn(3), torch.rand(3) + 1, torch.tensor(4)
    saved = [bits(t) for t in (rm, rv, nbt)]
    if policy == "raise":
        with pytest.raises(FloatingPointError, match=r"batchnorm\.batch_norm_train: .*NaN or Inf"):
            F.batch_norm_train(x, rm, rv, num_batches_tracked=nbt, nonfinite=policy)
    else:
        y, st = F.batch_norm_train(x, rm, rv, num_batches_tracked=nbt, nonfinite=policy)
        assert torch.isfinite(y[:, [0, 2]]).all() and torch.isnan(y[:, 1]).all()
        if policy == "skip":
            assert st.mean is rm and st.var is rv and st.num_batches_tracked is nbt
        else:  # torch's behaviour: the NaN is folded in, the count goes up
            tm = torch.nn.BatchNorm1d(3)
            with torch.no_grad():
                tm.running_mean.copy_(rm)
                tm.running_var.copy_(rv)
            tm(x)
            assert torch.equal(torch.isnan(st.mean), torch.isnan(tm.running_mean))
            assert bool(torch.isnan(st.mean[1])) and int(st.num_batches_tracked) == 5
            keep = ~torch.isnan(tm.running_mean)
            assert_close(st.mean[keep], tm.running_mean[keep], rtol=1e-6, atol=1e-6, what="finite channels")
    assert all(torch.equal(bits(t), s) for t, s in zip((rm, rv, nbt), saved, strict=True))


# -- the backend switch ----------------------------------------------------------------------------------
def test_backend_switch_reports_and_restores():
    x = torch.randn(4, 3, 2, 2)
    start = batchnorm.get_backend()  # "auto", unless BATCHNORM_BACKEND says otherwise
    assert batchnorm.backend_for(x) in kernels.available_backends()
    with batchnorm.use_backend("torch"):
        assert batchnorm.get_backend() == "torch"
        assert batchnorm.backend_for(x, channel_axis=-1, activation="elu") == "torch"
    assert batchnorm.get_backend() == start
    with pytest.raises(KeyError), batchnorm.use_backend("torch"):  # restored even when the block raises
        raise KeyError("boom")
    assert batchnorm.get_backend() == start
    batchnorm.set_backend("torch")
    try:
        assert batchnorm.get_backend() == "torch"
    finally:
        batchnorm.set_backend(start)
    with batchnorm.use_backend("auto"):
        assert batchnorm.get_backend() == "auto" and batchnorm.backend_for(x) in kernels.available_backends()
        assert batchnorm.backend_for(x.half()) in kernels.available_backends()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_auto_and_torch_backends_agree_in_float32(layout):
    x = torch.randn(8, 4, 5, 5) * 2 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    outs = []
    for name in ("torch", "auto"):
        with batchnorm.use_backend(name):
            xg = x.clone().requires_grad_()
            w = torch.ones(4, requires_grad=True)
            y, st = F.batch_norm_train(xg, torch.zeros(4), torch.ones(4), w, None, activation="relu")
            y.backward(torch.ones_like(y))
            outs.append((y, xg.grad, w.grad, st.mean, st.var))
    for name, u, v in zip(("y", "dx", "dw", "mean", "var"), *outs, strict=True):
        assert_close(u, v, rtol=1e-5, atol=1e-5 * max(1.0, float(v.detach().abs().max())), what=name)


# -- the variance clamp -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("value", [0.1, 4.25, -1e4])
def test_constant_channels_have_zero_variance_and_finite_output(dtype, value):
    x = torch.randn(7, 3, 5).to(dtype)
    x[:, 2] = value  # not exactly summable for 0.1: the two-pass variance is a tiny square, never < 0
    _, var, n = batchnorm.stats.batch_moments(x)
    assert n == 35 and float(var[2]) >= 0.0 and float(var[2]) <= 1e-12 * max(1.0, value * value)
    y, st = F.batch_norm_train(x, torch.zeros(3), torch.ones(3), momentum=1.0,
                               num_batches_tracked=torch.tensor(0))
    assert torch.isfinite(y).all() and float(y[:, 2].abs().max()) <= 1e-2
    assert torch.isfinite(st.var).all() and float(st.var[2]) >= 0.0


def test_moments_variance_is_clamped_at_zero():
    """Variances that arrive from elsewhere (merged or user-supplied M2) may be a rounding error below 0."""
    m = batchnorm.stats.Moments(torch.tensor(4.0), torch.zeros(2), torch.tensor([-1e-20, 2.0]))
    assert torch.equal(m.var, torch.tensor([0.0, 0.5]))
    assert torch.equal(m.unbiased_var(), torch.tensor([0.0, 2.0 / 3.0]))
    merged = batchnorm.stats.merge_moments(torch.tensor([3.0, 0.0]), torch.tensor([[1.0], [5.0]]),
                                           torch.tensor([[-1e-30], [0.0]]))
    assert float(merged.m2[0]) == 0.0 and float(merged.mean[0]) == 1.0 and float(merged.count) == 3.0


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_with_nothing_to_record_the_ops_skip_the_autograd_function_with_the_same_bits(backend, monkeypatch):
    """no_grad (or inputs that need no grad): the backend runs directly, not through the autograd
    Function (~10 µs less a call on small layers), and gives the recorded path's numbers."""
    import batchnorm.core.autograd as A

    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4) * 2 + 1
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    ctx = kernels.use_backend(backend) if backend != "auto" else torch.enable_grad()
    with ctx:
        xg = x.clone().requires_grad_()
        y_rec, st_rec = F.batch_norm_train(xg, torch.zeros(3), torch.ones(3), w, b, activation="relu")
        e_rec = F.batch_norm_eval(xg, st_rec.mean, st_rec.var, w, b, activation="relu")
        assert y_rec.grad_fn is not None and e_rec.grad_fn is not None
        calls = []

        class Spy:
            @staticmethod
            def apply(*args):
                calls.append(args)
                raise AssertionError("the autograd Function ran with nothing to record")

        monkeypatch.setattr(A, "BatchNormTrainFn", Spy)
        monkeypatch.setattr(A, "BatchNormEvalFn", Spy)
        with torch.no_grad():
            y, st = F.batch_norm_train(x, torch.zeros(3), torch.ones(3), w, b, activation="relu")
            e = F.batch_norm_eval(x, st.mean, st.var, w, b, activation="relu")
        y2, _ = F.batch_norm_train(x, None, None, w, b, activation="relu")  # grad mode on, nothing needs grad
    assert not calls and y.grad_fn is None and e.grad_fn is None and y2.grad_fn is None
    for got, want in ((y, y_rec), (e, e_rec), (y2, y_rec), (st.mean, st_rec.mean), (st.var, st_rec.var)):
        assert tensors_bit_equal(got, want.detach())
