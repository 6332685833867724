"""BN + residual add + activation (``batchnorm.core.residual``): the fused op against the oracle and torch.

The story: the numba kernels' residual forward (both memory layouts, float32/float64, both runners)
and the op's backward (dx and d(residual)) equal ``reference.forward_train_residual`` /
``backward_residual``; the torch composite (other activations, forced torch backend) too; the
module equals ``relu(nn.BatchNorm2d(x) + r)`` including running statistics and eval mode;
float64 gradcheck (and gradgradcheck) through the op; bad residuals raise and change nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.core_util import assert_state_unchanged, snapshot
from helpers.util import assert_close

import batchnorm
from batchnorm import reference as R
from batchnorm.core import residual as RS
from batchnorm.kernels import _omp, cpu, native_residual, torch_backend

ACTS = [("identity", 0.01), ("relu", 0.0), ("leaky_relu", 0.1), ("elu", 0.7), ("silu", 0.01)]
LAYOUTS = {
    "nchw": ((5, 3, 4, 6), 1, None),
    "nc": ((37, 6), 1, None),
    "nhwc_memory": ((5, 3, 4, 6), 1, torch.channels_last),
    "nhwc_axis": ((4, 5, 6, 3), -1, None),
    "ncl": ((3, 5, 17), 1, None),
    # (M, C) with enough rows for the lane-grouped sums (R = 1024 // C rows a group, four groups at a
    # time) and a remainder done row by row
    "nc_grouped": ((200, 64), 1, None),
    "nhwc_grouped": ((4, 64, 6, 6), 1, torch.channels_last),
}


@pytest.fixture(params=["team", "pool"])
def runner(request, monkeypatch):
    if request.param == "team" and not _omp.runtime():
        pytest.skip("torch here has no OpenMP team to run on")
    if request.param == "pool":
        monkeypatch.setattr(_omp, "_state", {"lib": ""})
    return request.param


def _np(t):
    return t.detach().to(torch.float64).numpy()


def _inputs(layout, dtype, seed=0):
    shape, axis, fmt = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if fmt is not None:
        x, r = x.contiguous(memory_format=fmt), r.contiguous(memory_format=fmt)
    axis %= x.ndim
    c = x.shape[axis]
    w = torch.linspace(0.5, 1.5, c, dtype=dtype) * torch.tensor([1.0, -1.0] * c, dtype=dtype)[:c]
    b = torch.linspace(-0.3, 0.4, c, dtype=dtype)
    return x, r, w, b, axis


@pytest.mark.parametrize("act,slope", ACTS[:3], ids=[a for a, _ in ACTS[:3]])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fused_kernels_match_the_oracle(dtype, layout, act, slope, runner):
    x, r, w, b, axis = _inputs(layout, dtype)
    assert cpu.supports_residual(x, r, axis, act)
    rtol, atol = (3e-6, 3e-6) if dtype == torch.float32 else (1e-10, 1e-10)
    y, mean, _ = cpu.train_forward_residual(x, r, w, b, 1e-5, axis, act, slope)
    ref_y, ref_m, _ = R.forward_train_residual(_np(x), _np(r), _np(w), _np(b), 1e-5, axis, act, slope)
    assert y.dtype == dtype and y.stride() == x.stride()
    assert_close(y, ref_y, rtol=rtol, atol=atol, what="train y")
    assert_close(mean, ref_m, rtol=1e-6, atol=1e-6, what="batch mean")
    rm, rv = torch.linspace(-0.5, 0.5, x.shape[axis], dtype=dtype), torch.linspace(0.5, 2, x.shape[axis],
                                                                                    dtype=dtype)
    ye = cpu.eval_forward_residual(x, r, rm, rv, w, b, 1e-3, axis, act, slope)
    ref_e = R.activation(R.forward_eval(_np(x), _np(rm), _np(rv), _np(w), _np(b), 1e-3, axis) + _np(r), act,
                         slope)
    assert_close(ye, ref_e, rtol=rtol, atol=atol, what="eval y")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed_dx"])
@pytest.mark.parametrize("act,slope", [*ACTS[:3], ("leaky_relu", 0.0)],
                         ids=["identity", "relu", "leaky", "leaky0"])
@pytest.mark.parametrize("layout", ["nchw", "ncl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_two_sweep_residual_backward_matches_the_oracle(dtype, layout, act, slope, runner, stream,
                                                        monkeypatch):
    # cpu.backward_residual: dz (= d(residual)) written by the sums sweep, dx by the second sweep;
    # train against the oracle, eval (given statistics) against torch's activation backward + our
    # eval backward (the three-sweep path it replaces)
    if stream:
        monkeypatch.setattr(cpu, "STREAM_MIN_BYTES", 0)  # (every 64-byte-aligned dx streams)
    x, r, w, b, axis = _inputs(layout, dtype, seed=2)
    if stream and layout == "nchw":
        g = torch.Generator().manual_seed(2)
        x = (torch.randn(3, 4, 4, 16, generator=g, dtype=torch.float64) + 0.3).to(dtype)  # rows of 64 B
        r = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
        w, b = w[:1].repeat(4), b[:1].repeat(4)
    rtol, atol = (2e-5, 2e-5) if dtype == torch.float32 else (1e-10, 1e-10)
    y, mean, var = cpu.train_forward_residual(x, r, w, b, 1e-5, axis, act, slope)
    dy = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(dtype)
    if x.ndim == 4 and not x.is_contiguous():
        dy = dy.contiguous(memory_format=torch.channels_last)
    dx, dres, dw, db = cpu.backward_residual(dy, x, y, w, b, mean, var, 1e-5, axis, act, slope)
    ref = R.backward_residual(_np(dy), _np(x), _np(r), _np(w), _np(b), 1e-5, axis, act, slope)
    for got, want, what in zip((dx, dres, dw, db), ref, ("dx", "d(residual)", "dweight", "dbias")):
        assert_close(got, want, rtol=rtol, atol=atol * max(1.0, np.abs(want).max()), what=f"train {what}")
    assert dx.stride() == x.stride() and dres.stride() == x.stride()
    rm, rv = mean.to(dtype) + 0.1, var.to(dtype) + 0.5
    ye = cpu.eval_forward_residual(x, r, rm, rv, w, b, 1e-3, axis, act, slope)
    dx, dres, dw, db = cpu.backward_residual(dy, x, ye, w, b, rm, rv, 1e-3, axis, act, slope, train=False)
    want_dres = torch_backend.residual_grad(dy, x, r, ye, w, b, rm, rv, 1e-3, axis, act, slope)
    want = cpu.eval_backward(want_dres, x, None, w, b, rm, rv, 1e-3, axis, "identity", slope)
    assert torch.equal(dres, want_dres), "eval d(residual)"
    for got, exp, what in zip((dx, dw, db), want, ("dx", "dweight", "dbias")):
        assert_close(got, exp, rtol=rtol, atol=atol, what=f"eval {what}")


def test_the_op_runs_the_two_sweep_backward_on_the_numba_backend(monkeypatch):
    calls = []
    real = cpu.backward_residual

    def spy(*args, **kwargs):
        calls.append(kwargs.get("train", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu, "backward_residual", spy)
    monkeypatch.setattr(cpu, "RESIDUAL_BACKWARD_MIN_BYTES", 0)  # (the test's input is small)
    x, r, w, b, _ = _inputs("nchw", torch.float32, seed=4)
    xs, rs, ws, bs = (t.clone().requires_grad_() for t in (x, r, w, b))
    with batchnorm.use_backend("numba"):
        y, _ = RS.batch_norm_add_act_train(xs, rs, None, None, ws, bs, activation="relu")
        y.backward(torch.ones_like(y))
        ye = RS.batch_norm_add_act_eval(xs, rs, torch.zeros(3), torch.ones(3), ws, bs, activation="relu")
        ye.sum().backward()
    assert calls == [True, False]
    # leaky_relu with a negative slope: act' cannot be read from y; the three-sweep path runs
    with batchnorm.use_backend("numba"):
        y, _ = RS.batch_norm_add_act_train(xs, rs, None, None, ws, bs, activation="leaky_relu",
                                           negative_slope=-0.5)
        y.sum().backward()
    assert calls == [True, False]


def test_which_residual_backward_runs():
    big = torch.empty(32, 64, 32, 32)  # 8 MiB of float32
    assert cpu.supports_backward_residual(big, 1, "relu", 0.0)
    assert cpu.supports_backward_residual(big, 1, "leaky_relu", 0.0)
    assert not cpu.supports_backward_residual(big, 1, "leaky_relu", -0.5)  # act' not readable from y
    assert not cpu.supports_backward_residual(big, 1, "elu", 1.0)
    assert not cpu.supports_backward_residual(torch.empty(32, 64, 32, 31), 1, "relu", 0.0)  # below 8 MiB
    nhwc = big.contiguous(memory_format=torch.channels_last)
    assert not cpu.supports_backward_residual(nhwc, 1, "relu", 0.0)
    x, r, w, b, axis = _inputs("nc", torch.float32)
    y, mean, var = cpu.train_forward_residual(x, r, w, b, 1e-5, axis, "relu", 0.0)
    with pytest.raises(RuntimeError, match=r"\(N, C, L\) layouts only"):
        cpu.backward_residual(torch.ones_like(x), x, y, w, b, mean, var, 1e-5, axis, "relu", 0.0)


@pytest.mark.parametrize("act,slope", ACTS, ids=[a for a, _ in ACTS])
@pytest.mark.parametrize("layout", ["nchw", "nhwc_memory"])
@pytest.mark.parametrize("backend", ["auto", "torch", "numba"])
def test_op_forward_and_backward_match_the_oracle(act, slope, layout, backend):
    x, r, w, b, axis = _inputs(layout, torch.float32, seed=1)
    xs, rs, ws, bs = (t.clone().requires_grad_() for t in (x, r, w, b))
    with batchnorm.use_backend(backend):
        y, _ = RS.batch_norm_add_act_train(xs, rs, None, None, ws, bs, channel_axis=axis, activation=act,
                                           negative_slope=slope)
        dy = torch.randn_like(y)
        y.backward(dy)
    ref_y, _, _ = R.forward_train_residual(_np(x), _np(r), _np(w), _np(b), 1e-5, axis, act, slope)
    ref_dx, ref_dr, ref_dw, ref_db = R.backward_residual(_np(dy), _np(x), _np(r), _np(w), _np(b), 1e-5, axis,
                                                         act, slope)
    assert_close(y, ref_y, rtol=3e-6, atol=3e-6, what="y")
    for got, want, what in ((xs.grad, ref_dx, "dx"), (rs.grad, ref_dr, "d(residual)"),
                            (ws.grad, ref_dw, "dweight"), (bs.grad, ref_db, "dbias")):
        assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max()), what=what)


def test_which_backend_runs_the_fused_op():
    x, r, _, _, _ = _inputs("nchw", torch.float32)
    with batchnorm.use_backend("numba"):  # (auto sends an input this small to torch's native kernel)
        assert RS._backend(x, r, 1, "relu") is cpu
        assert RS._backend(x, r, 1, "silu") is torch_backend  # (no residual kernel for smooth activations)
        assert RS._backend(x, r.double(), 1, "relu") is torch_backend
    assert RS._backend(x, r, 1, "relu") is native_residual  # auto, small: torch's kernel + add + act
    with batchnorm.use_backend("torch"):
        assert RS._backend(x, r, 1, "relu") is torch_backend


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_module_matches_torch_bn_add_relu(fmt):
    torch.manual_seed(2)
    ours = RS.BatchNormAddAct2d(6)
    ref = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 2.0, 6))
            m.bias.copy_(torch.linspace(-0.5, 0.5, 6))
    x = torch.randn(8, 6, 5, 5).contiguous(memory_format=fmt)
    r = torch.randn(8, 6, 5, 5).contiguous(memory_format=fmt)
    xa, ra = x.clone().requires_grad_(), r.clone().requires_grad_()
    xb, rb = x.clone().requires_grad_(), r.clone().requires_grad_()
    for _ in range(2):  # two steps: running statistics follow torch's
        ya = ours(xa, ra)
        yb = torch.relu(ref(xb) + rb)
    assert_close(ya, yb, rtol=1e-5, atol=1e-5, what="y")
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5, what="dx")
    assert_close(ra.grad, rb.grad, rtol=0, atol=0, what="d(residual)")
    assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4, what="dweight")
    assert_close(ours.running_mean, ref.running_mean, rtol=1e-6, atol=1e-7, what="running mean")
    assert_close(ours.running_var, ref.running_var, rtol=1e-6, atol=1e-7, what="running var")
    assert int(ours.num_batches_tracked) == 2
    ours.eval()
    ref.eval()
    xe, re_ = x.clone().requires_grad_(), r.clone().requires_grad_()
    ye = ours(xe, re_)
    assert_close(ye, torch.relu(ref(x) + r), rtol=1e-5, atol=1e-5, what="eval y")
    ye.sum().backward()
    assert_close(re_.grad, (ye > 0).float(), rtol=0, atol=0, what="eval d(residual)")
    assert set(ours.state_dict()) == set(ref.state_dict())


def test_gradcheck_float64():
    for layout in ("nchw", "nhwc_memory", "nc"):
        x, r, w, b, axis = _inputs(layout, torch.float64, seed=3)
        args = tuple(t.clone().requires_grad_() for t in (x, r, w, b))
        for act, slope in (("relu", 0.0), ("leaky_relu", 0.2), ("silu", 0.01)):
            def train(x, r, w, b, act=act, slope=slope, axis=axis):
                return RS.batch_norm_add_act_train(x, r, None, None, w, b, eps=1e-3, channel_axis=axis,
                                                   activation=act, negative_slope=slope)[0]

            assert torch.autograd.gradcheck(train, args)
            rm, rv = torch.zeros(x.shape[axis], dtype=torch.float64), torch.ones(x.shape[axis],
                                                                                   dtype=torch.float64)

            def ev(x, r, w, b, act=act, slope=slope, axis=axis, rm=rm, rv=rv):
                return RS.batch_norm_add_act_eval(x, r, rm, rv, w, b, eps=1e-3, channel_axis=axis,
                                                  activation=act, negative_slope=slope)

            assert torch.autograd.gradcheck(ev, args)
    x, r, w, b, _ = _inputs("nchw", torch.float64, seed=4)

    def smooth(x, r, w, b):
        return RS.batch_norm_add_act_train(x, r, None, None, w, b, eps=1e-3, activation="silu")[0]

    assert torch.autograd.gradgradcheck(smooth, tuple(t.clone().requires_grad_() for t in (x, r, w, b)))


def test_no_grad_and_compiled_paths_give_the_same_output():
    x, r, w, b, _ = _inputs("nchw", torch.float32, seed=5)
    with torch.no_grad():
        y0, _ = RS.batch_norm_add_act_train(x, r, None, None, w, b)
    y1, _ = RS.batch_norm_add_act_train(x.requires_grad_(), r, None, None, w, b)
    assert torch.equal(y0, y1.detach())

    def f(x, r):
        return RS.batch_norm_add_act_train(x, r, None, None, w, b)[0]

    y2 = torch.compile(f, backend="eager", fullgraph=True)(x.detach(), r)
    assert_close(y2, y0, rtol=1e-5, atol=1e-5, what="compiled")


@pytest.mark.parametrize("bad,exc,msg", [
    ("list", TypeError, "expected residual to be a torch.Tensor"),
    ("shape", ValueError, r"expected a residual of the input's shape \(4, 3, 2, 2\)"),
    ("dtype", ValueError, "the residual is torch.float64"),
])
def test_bad_residual_raises_and_changes_nothing(bad, exc, msg):
    m = RS.BatchNormAddAct2d(3)
    x = torch.randn(4, 3, 2, 2)
    res = {"list": [1.0], "shape": torch.randn(4, 3, 2, 1), "dtype": torch.randn(4, 3, 2, 2,
                                                                                  dtype=torch.float64)}[bad]
    before = snapshot(m)
    with pytest.raises(exc, match=msg):
        m(x, res)
    assert_state_unchanged(before, m)
    with pytest.raises(exc, match=msg):
        RS.batch_norm_add_act_eval(x, res, torch.zeros(3), torch.ones(3))


def test_add_act_is_the_folded_remainder():
    a = RS.AddAct("leaky_relu", 0.2)
    x, r = torch.randn(5, 3), torch.randn(5, 3)
    assert torch.equal(a(x, r), torch.nn.functional.leaky_relu(x + r, 0.2))
    with pytest.raises(ValueError, match="unknown activation 'mish'"):
        RS.AddAct("mish")
