"""The native residual path (``batchnorm.kernels.native_residual``): ``act(BN(x) + res)`` on torch's kernel.

The story: under ``auto`` a small input of the fused op runs torch's ``native_batch_norm`` followed by
the add and the activation in place (``residual_backend_for`` says ``"native"``, and the native
functions are what run); forward, dx, d(residual), dweight, dbias and the running statistics equal
the float64 oracle to float32 rounding — every activation, channels on axis 1 / last / channels-last
memory, data with |mean| ≫ std — and equal ``act(torch BN(x) + r)`` by torch's own autograd; eval
mode too; the inputs are never written.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.util import assert_close
from torch import nn

import batchnorm
from batchnorm import reference as R
from batchnorm.core import residual as RS
from batchnorm.kernels import cpu, native_residual, torch_backend

ACTS = [("identity", 0.0), ("relu", 0.0), ("leaky_relu", 0.1), ("elu", 0.7), ("silu", 0.01),
        ("hardswish", 0.01), ("gelu", 0.01), ("tanh", 0.01)]
LAYOUTS = {"nchw": ((6, 4, 5, 3), 1, None), "nhwc_memory": ((6, 4, 5, 3), 1, torch.channels_last),
           "nhwc_axis": ((6, 5, 3, 4), -1, None), "nc": ((40, 7), 1, None)}


def _np(t):
    return t.detach().to(torch.float64).numpy()


def _inputs(layout, shift=0.0, seed=0, dtype=torch.float32):
    shape, axis, fmt = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5 + shift).to(dtype)
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if fmt is not None:
        x, r = x.contiguous(memory_format=fmt), r.contiguous(memory_format=fmt)
    axis %= x.ndim
    c = x.shape[axis]
    w = (torch.linspace(0.5, 1.5, c) * torch.tensor([1.0, -1.0] * c)[:c]).to(dtype)
    b = torch.linspace(-0.3, 0.4, c).to(dtype)
    return x, r, w, b, axis


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the native residual functions (so a test knows they are what ran)."""
    calls = {"train": 0, "eval": 0, "backward": 0, "eval_backward": 0}
    for fn, key in (("train_forward_residual", "train"), ("eval_forward_residual", "eval"),
                    ("backward", "backward"), ("eval_backward", "eval_backward")):
        orig = getattr(native_residual, fn)

        def wrapped(*a, _orig=orig, _key=key, **k):
            calls[_key] += 1
            return _orig(*a, **k)
        monkeypatch.setattr(native_residual, fn, wrapped)
    return calls


@pytest.mark.parametrize("shift", [0.0, 1e4], ids=["centred", "mean1e4"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("act,slope", ACTS, ids=[a for a, _ in ACTS])
def test_auto_runs_native_and_meets_the_oracle(act, slope, layout, shift, spy):
    x, r, w, b, axis = _inputs(layout, shift)
    assert RS.residual_backend_for(x, r, axis, act) == "native"
    c = x.shape[axis]
    rm, rv = torch.zeros(c), torch.ones(c)
    xs, rs, ws, bs = (t.clone().requires_grad_() for t in (x, r, w, b))
    y, _ = RS.batch_norm_add_act_train(xs, rs, rm, rv, ws, bs, channel_axis=axis, activation=act,
                                       negative_slope=slope, inplace_stats=True)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    y.backward(dy)
    assert spy["train"] == 1 and spy["backward"] == 1
    assert torch.equal(xs.detach(), x) and torch.equal(rs.detach(), r), "the inputs are never written"
    assert y.dtype == x.dtype and y.shape == x.shape
    ref_y, ref_m, ref_v = R.forward_train_residual(_np(x), _np(r), _np(w), _np(b), 1e-5, axis, act, slope)
    ref_dx, ref_dr, ref_dw, ref_db = R.backward_residual(_np(dy), _np(x), _np(r), _np(w), _np(b), 1e-5, axis,
                                                         act, slope)
    assert_close(y, ref_y, rtol=1e-5, atol=1e-5, what="y")
    for got, want, what in ((xs.grad, ref_dx, "dx"), (rs.grad, ref_dr, "d(residual)"),
                            (ws.grad, ref_dw, "dweight"), (bs.grad, ref_db, "dbias")):
        assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max()), what=what)
    n = x.numel() // c
    ref_rm, ref_rv, _ = R.update_running_stats(np.zeros(c), np.ones(c), ref_m, ref_v, n)
    assert_close(rm, ref_rm, rtol=1e-6, atol=1e-6 * max(1.0, shift), what="running mean")
    assert_close(rv, ref_rv, rtol=1e-4, atol=1e-6, what="running var")


@pytest.mark.parametrize("layout", ["nchw", "nhwc_memory"])
@pytest.mark.parametrize("act,slope", [("relu", 0.0), ("leaky_relu", 0.2), ("silu", 0.01)],
                         ids=["relu", "leaky_relu", "silu"])
def test_auto_equals_torch_bn_add_act(act, slope, layout):
    x, r, w, b, axis = _inputs(layout, seed=2)
    c = x.shape[axis]
    xa, ra, wa, ba = (t.clone().requires_grad_() for t in (x, r, w, b))
    xb, rb, wb, bb = (t.clone().requires_grad_() for t in (x, r, w, b))
    rma, rva, rmb, rvb = torch.zeros(c), torch.ones(c), torch.zeros(c), torch.ones(c)
    ya, _ = RS.batch_norm_add_act_train(xa, ra, rma, rva, wa, ba, activation=act, negative_slope=slope,
                                        inplace_stats=True)
    yb = torch_backend.act_forward(torch.nn.functional.batch_norm(xb, rmb, rvb, wb, bb, True) + rb, act,
                                   slope)
    assert_close(ya, yb, rtol=1e-5, atol=1e-5, what="y")
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    for got, want, what in ((xa.grad, xb.grad, "dx"), (ra.grad, rb.grad, "d(residual)"),
                            (wa.grad, wb.grad, "dweight"), (ba.grad, bb.grad, "dbias"),
                            (rma, rmb, "running mean"), (rva, rvb, "running var")):
        assert_close(got, want, rtol=1e-5, atol=1e-5, what=what)


@pytest.mark.parametrize("act,slope", [("relu", 0.0), ("elu", 0.7), ("gelu", 0.01)],
                         ids=["relu", "elu", "gelu"])
def test_eval_runs_native_and_meets_the_oracle(act, slope, spy):
    x, r, w, b, axis = _inputs("nchw", seed=3)
    c = x.shape[axis]
    mean, var = torch.linspace(-0.5, 0.5, c), torch.linspace(0.5, 2.0, c)
    xs, rs, ws, bs = (t.clone().requires_grad_() for t in (x, r, w, b))
    y = RS.batch_norm_add_act_eval(xs, rs, mean, var, ws, bs, eps=1e-3, activation=act, negative_slope=slope)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert spy["eval"] == 1 and spy["eval_backward"] == 1
    xd, rd, wd, bd = (t.double().requires_grad_() for t in (x, r, w, b))
    shape = (1, c, 1, 1)
    z = (xd - mean.double().view(shape)) / torch.sqrt(var.double().view(shape) + 1e-3) * wd.view(shape)
    yd = torch_backend.act_forward(z + bd.view(shape) + rd, act, slope)
    grads = torch.autograd.grad(yd, (xd, rd, wd, bd), dy.double())
    assert_close(y, yd, rtol=1e-5, atol=1e-5, what="eval y")
    for got, want, what in zip((xs.grad, rs.grad, ws.grad, bs.grad), grads, ("dx", "d(residual)", "dweight",
                                                                              "dbias"), strict=True):
        assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(want.abs().max())), what=what)


def test_backend_selection_reports_the_native_path():
    x, r, _, _, _ = _inputs("nchw")
    assert RS._backend(x, r, 1, "relu") is native_residual
    assert RS.residual_backend_for(x, r) == "native"
    assert RS.residual_backend_for(x, r, activation="silu") == "native"  # every activation
    with batchnorm.use_backend("native"):
        assert RS.residual_backend_for(x, r) == "native"
    with batchnorm.use_backend("torch"):
        assert RS.residual_backend_for(x, r) == "torch"
    with batchnorm.use_backend("numba"):
        assert RS.residual_backend_for(x, r) == "numba"
        assert RS.residual_backend_for(x, r, activation="silu") == "torch"  # forced: no native fallback
    big = torch.randn(128, 16, 16, 16)  # at least the ncl train crossover (2^19 values): the numba kernels
    assert RS._backend(big, torch.randn_like(big), 1, "relu") is cpu
    assert RS.residual_backend_for(big, torch.randn_like(big), activation="silu") == "native"
    assert RS.residual_backend_for(x.double(), r.double(), -1) == "native"
    assert not native_residual.supports_residual(x, r.double(), 1, "relu")
    assert not native_residual.supports_residual(x, r[:1], 1, "relu")


@pytest.mark.parametrize("act,torch_act", [("relu", torch.relu_), ("identity", lambda y: y),
                                            ("leaky_relu", lambda y: nn.functional.leaky_relu_(y, 0.01))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_fast_path_is_torchs_bn_add_act_bit_for_bit(act, torch_act, momentum, spy):
    # small inputs under auto: the module runs torch's batch_norm, add_ and activation op itself (no
    # custom Function), exactly as torch's own block: same outputs, gradients and running statistics
    m = batchnorm.BatchNormAddAct2d(4, activation=act, momentum=momentum)
    ref = nn.BatchNorm2d(4, momentum=momentum)
    with torch.no_grad():
        for t in (m.weight, ref.weight):
            t.copy_(torch.linspace(0.5, 1.5, 4))
    g = torch.Generator().manual_seed(5)
    x0, r0 = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    for step in range(2):
        xs, rs = x0.clone().requires_grad_(), r0.clone().requires_grad_()
        xt, rt = x0.clone().requires_grad_(), r0.clone().requires_grad_()
        y = m(xs, rs)
        yt = ref(xt)
        yt += rt
        yt = torch_act(yt)
        assert torch.equal(y, yt), f"train y, step {step}"
        dy = torch.randn(y.shape, generator=g)
        y.backward(dy)
        yt.backward(dy)
        for a, b, what in ((xs.grad, xt.grad, "dx"), (rs.grad, rt.grad, "d(residual)"),
                           (m.weight.grad, ref.weight.grad, "dweight"),
                           (m.bias.grad, ref.bias.grad, "dbias")):
            assert torch.equal(a, b), what
    for k, v in ref.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    m.eval()
    ref.eval()
    with torch.no_grad():
        ye = ref(x0)
        ye += r0
        assert torch.equal(m(x0, r0), torch_act(ye)), "eval"
    assert spy == {"train": 0, "eval": 0, "backward": 0, "eval_backward": 0}, "the custom Function ran"
    # bad residuals still get the general path's errors, with nothing written
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    with pytest.raises(ValueError, match="residual of the input's shape"):
        m(x0, r0[:2])
    with pytest.raises(ValueError, match="cast or move it"):
        m(x0, r0.double())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
