"""The numba CPU kernels against the float64 oracle: every kernel × layout × activation × dtype.

The story: for each memory layout the backend accepts (contiguous NCHW / (N, C, L) / NCDHW /
(N, C), channels-last NHWC and NDHWC memory, logical channels-last with ``channel_axis=-1``) and
each activation, the four kernels — train forward, train backward, eval forward, eval backward —
must equal :mod:`batchnorm.reference` to float32 rounding (float32 input) or to 1e-10 (float64).
Then the numerics the kernels document: |mean| ≫ std, a far-out first value (the shift guard),
NaN propagation; and the path through the modules, the fallback, and the backend switch.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers.core_util import ref_eval_backward
from helpers.util import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

import batchnorm
from batchnorm import reference as R
from batchnorm.core import functional as F
from batchnorm.kernels import _cpu_common, _cpu_team, _omp, cpu

ACTS = [("identity", 0.01), ("relu", 0.0), ("leaky_relu", 0.1), ("elu", 0.7)]
DTYPES = [torch.float32, torch.float64]
# layout name -> (logical shape, channel axis, memory format or None)
LAYOUTS = {
    "nchw": ((5, 3, 4, 6), 1, None),
    "ncl": ((4, 5, 7), 1, None),
    "ncdhw": ((2, 3, 3, 4, 5), 1, None),
    "nc": ((37, 6), 1, None),
    "nhwc_memory": ((5, 3, 4, 6), 1, torch.channels_last),
    "ndhwc_memory": ((2, 3, 3, 4, 5), 1, torch.channels_last_3d),
    "nhwc_axis": ((4, 5, 6, 3), -1, None),
    "channels_first_axis0": ((6, 50), 0, None),
}


RUNNERS = ["team", "pool"]


@pytest.fixture(params=RUNNERS)
def runner(request, monkeypatch):
    """Run the kernels on torch's OpenMP team ("team") or on the Python thread pool ("pool")."""
    if request.param == "team" and not _omp.runtime():
        pytest.skip("torch here has no OpenMP team to run on")
    if request.param == "pool":
        monkeypatch.setattr(_omp, "_state", {"lib": ""})
    return request.param


def _tol(dtype):
    return (2e-6, 2e-6) if dtype == torch.float32 else (1e-10, 1e-10)


def _np(t):
    return t.detach().to(torch.float64).numpy()


def _input(layout, dtype, mean=0.5, std=2.0):
    shape, axis, fmt = LAYOUTS[layout]
    x = torch.randn(shape, dtype=torch.float64) * std + mean
    x = x.to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    return x, axis % x.ndim



_AUTO_TESTS = ("test_unsupported_inputs_fall_back", "test_forcing_numba_on_an_input", "test_supports_rejects")


@pytest.fixture(autouse=True)
def _numba_kernels(request):
    """These tests are about the numba kernels, so they force them: under ``auto`` the small inputs used
    here run torch's native kernel (``batchnorm.kernels.NATIVE_BELOW``). The dispatch tests keep auto."""
    if request.node.name.startswith(_AUTO_TESTS):
        yield
        return
    with batchnorm.use_backend("numba"):
        yield

def _affine(c, dtype):
    w = torch.linspace(0.5, 1.5, c, dtype=dtype) * torch.tensor([1.0, -1.0] * c, dtype=dtype)[:c]
    b = torch.linspace(-0.3, 0.4, c, dtype=dtype)
    return w, b


@pytest.mark.parametrize("act,slope", ACTS, ids=[a for a, _ in ACTS])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_every_kernel_matches_the_oracle(dtype, layout, act, slope, runner):
    x, axis = _input(layout, dtype)
    assert batchnorm.backend_for(x, axis, act) == "numba", "this layout must run on the numba kernels"
    c = x.shape[axis]
    w, b = _affine(c, dtype)
    rtol, atol = _tol(dtype)
    xn, wn, bn = _np(x), _np(w), _np(b)

    # train forward: y in x's dtype and memory layout; statistics float64
    y, mean, var = cpu.train_forward(x, w, b, 1e-5, axis, act, slope)
    ref_y, ref_m, ref_v = R.forward_train(xn, wn, bn, 1e-5, axis, act, slope)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
    assert mean.dtype == var.dtype == torch.float64
    # sums run in x's dtype over chunks, chunk totals in float64: float32 accuracy for float32 data
    stat_tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert_close(mean, ref_m, rtol=stat_tol, atol=stat_tol * np.sqrt(ref_v.max()), what="batch mean")
    assert_close(var, ref_v, rtol=10 * stat_tol, atol=0, what="batch var")
    assert_close(y, ref_y, rtol=rtol, atol=atol, what="train y")

    # train backward (dy in another layout on purpose: the kernel must adopt x's)
    dy = torch.randn(x.shape, dtype=dtype)
    dx, dw, db = cpu.backward(dy, x, y, w, b, mean, var, 1e-5, axis, act, slope)
    ref_dx, ref_dw, ref_db = R.backward(_np(dy), xn, wn, bn, 1e-5, axis, act, slope)
    assert dx.dtype == dtype and dx.stride() == x.stride() and dw.dtype == db.dtype == dtype
    scale = np.abs(ref_dx).max()
    assert_close(dx, ref_dx, rtol=rtol, atol=atol * scale, what="train dx")
    assert_close(dw, ref_dw, rtol=rtol, atol=atol * np.abs(ref_dw).max(), what="train dweight")
    assert_close(db, ref_db, rtol=rtol, atol=atol * np.abs(ref_db).max(), what="train dbias")

    # eval forward/backward with given (running) statistics
    rm = torch.linspace(-0.5, 0.5, c, dtype=dtype)
    rv = torch.linspace(0.5, 3.0, c, dtype=dtype)
    ye = cpu.eval_forward(x, rm, rv, w, b, 1e-3, axis, act, slope)
    ref_ye = R.forward_eval(xn, _np(rm), _np(rv), wn, bn, 1e-3, axis, act, slope)
    assert ye.stride() == x.stride()
    assert_close(ye, ref_ye, rtol=rtol, atol=atol, what="eval y")
    dxe, dwe, dbe = cpu.eval_backward(dy, x, ye, w, b, rm, rv, 1e-3, axis, act, slope)
    ref_dxe, ref_dwe, ref_dbe = ref_eval_backward(_np(dy), xn, _np(rm), _np(rv), wn, bn, 1e-3, axis, act,
                                                  slope)
    assert_close(dxe, ref_dxe, rtol=rtol, atol=atol * np.abs(ref_dxe).max(), what="eval dx")
    assert_close(dwe, ref_dwe, rtol=rtol, atol=atol * np.abs(ref_dwe).max(), what="eval dweight")
    assert_close(dbe, ref_dbe, rtol=rtol, atol=atol * np.abs(ref_dbe).max(), what="eval dbias")


# (M, C) inputs long enough for the lane path of the sums (R rows at a time as R·C lanes, four groups
# per update, blocks of 16 groups): on two threads each thread's rows make whole blocks, a few groups
# outside the four-group unroll, and a tail of rows after the last whole group.
LANE_CASES = {"nc": ((1776, 40), None), "nhwc_memory": ((12, 40, 12, 12), torch.channels_last)}


def _lane_input(case, dtype, mean=0.5, std=2.0):
    shape, fmt = LANE_CASES[case]
    x = (torch.randn(shape, dtype=torch.float64) * std + mean).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    c = shape[1]
    rows = x.numel() // c
    r = max(1, _cpu_common._LANES // c)
    per_thread = rows // 2
    groups = per_thread // r
    assert groups > 32 and groups % 16 % 4 and per_thread % r, "the case must reach every lane-sum branch"
    return x


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("act,slope", ACTS, ids=[a for a, _ in ACTS])
@pytest.mark.parametrize("case", list(LANE_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_lane_sums_of_long_channels_last_inputs_match_the_oracle(dtype, case, act, slope, runner,
                                                                 two_threads):
    x = _lane_input(case, dtype)
    c = x.shape[1]
    assert cpu._threads(x.numel(), x.numel() // c) == 2, "the case must run on two threads"
    w, b = _affine(c, dtype)
    rtol, atol = _tol(dtype)
    stat_tol = 1e-6 if dtype == torch.float32 else 1e-12
    y, mean, var = cpu.train_forward(x, w, b, 1e-5, 1, act, slope)
    ref_y, ref_m, ref_v = R.forward_train(_np(x), _np(w), _np(b), 1e-5, 1, act, slope)
    assert_close(mean, ref_m, rtol=stat_tol, atol=stat_tol * np.sqrt(ref_v.max()), what="batch mean")
    assert_close(var, ref_v, rtol=10 * stat_tol, atol=0, what="batch var")
    assert_close(y, ref_y, rtol=rtol, atol=atol, what="train y")
    dy = torch.randn(x.shape, dtype=dtype).contiguous(memory_format=torch.channels_last) if x.ndim == 4 else \
        torch.randn(x.shape, dtype=dtype)
    dx, dw, db = cpu.backward(dy, x, y, w, b, mean, var, 1e-5, 1, act, slope)
    ref_dx, ref_dw, ref_db = R.backward(_np(dy), _np(x), _np(w), _np(b), 1e-5, 1, act, slope)
    assert_close(dx, ref_dx, rtol=rtol, atol=atol * np.abs(ref_dx).max(), what="train dx")
    assert_close(dw, ref_dw, rtol=rtol, atol=atol * np.abs(ref_dw).max(), what="train dweight")
    assert_close(db, ref_db, rtol=rtol, atol=atol * np.abs(ref_db).max(), what="train dbias")


@pytest.mark.parametrize("case", list(LANE_CASES))
def test_lane_sums_keep_float32_accuracy_and_nan_stays_in_its_channel(case, two_threads):
    x = _lane_input(case, torch.float32, mean=1e4, std=1.0)
    c = x.shape[1]
    y, mean, var = cpu.train_forward(x, None, None, 1e-5, 1, "identity", 0.0)
    ref_y, _, ref_v = R.forward_train(_np(x), None, None, 1e-5, 1)
    assert_close(var, ref_v, rtol=1e-5, atol=0, what="var at mean 1e4, std 1")
    assert_close(y, ref_y, rtol=1e-5, atol=1e-5, what="y at mean 1e4, std 1")
    rows = x.movedim(1, -1).reshape(-1, c)  # a view in memory order: row i, channel j
    rows[700, 3] = float("nan")  # inside a whole group of the first thread's rows
    y, mean, var = cpu.train_forward(x, None, None, 1e-5, 1, "relu", 0.0)
    assert torch.isnan(mean[3]) and torch.isnan(var[3]) and torch.isnan(y.select(1, 3)).all()
    others = [i for i in range(c) if i != 3]
    assert torch.isfinite(mean[others]).all() and torch.isfinite(var[others]).all()
    assert torch.isfinite(y.index_select(1, torch.tensor(others))).all()


@pytest.mark.parametrize("layout", ["nchw", "nhwc_memory", "nc"])
def test_without_affine_parameters(layout):
    x, axis = _input(layout, torch.float64)
    y, mean, var = cpu.train_forward(x, None, None, 1e-5, axis, "relu", 0.0)
    assert_close(y, R.forward_train(_np(x), None, None, 1e-5, axis, "relu")[0], what="y")
    dy = torch.randn_like(x)
    dx, dw, db = cpu.backward(dy, x, y, None, None, mean, var, 1e-5, axis, "relu", 0.0)
    assert dw is None and db is None
    assert_close(dx, R.backward(_np(dy), _np(x), None, None, 1e-5, axis, "relu")[0], what="dx")
    dxe, dwe, dbe = cpu.eval_backward(dy, x, y, None, None, mean, var, 1e-5, axis, "identity", 0.0)
    assert dwe is None and dbe is None
    ref = ref_eval_backward(_np(dy), _np(x), _np(mean), _np(var), None, None, 1e-5, axis)[0]
    assert_close(dxe, ref, what="eval dx")


@pytest.mark.parametrize("layout", ["nchw", "nhwc_memory", "nc"])
def test_float32_with_mean_far_above_std_keeps_float32_accuracy(layout):
    """mean 1e4, std 1 in float32: a one-pass E[x²]−E[x]² would lose every digit; the shifted sums do not."""
    x, axis = _input(layout, torch.float32, mean=1e4, std=1.0)
    c = x.shape[axis]
    w, b = _affine(c, torch.float32)
    y, mean, var = cpu.train_forward(x, w, b, 1e-5, axis, "identity", 0.0)
    ref_y, _, ref_v = R.forward_train(_np(x), _np(w), _np(b), 1e-5, axis)
    assert_close(var, ref_v, rtol=1e-5, atol=0, what="var")
    assert_close(y, ref_y, rtol=1e-5, atol=1e-5, what="y")
    dy = torch.randn_like(x)
    dx, dw, _ = cpu.backward(dy, x, y, w, b, mean, var, 1e-5, axis, "identity", 0.0)
    ref_dx, ref_dw, _ = R.backward(_np(dy), _np(x), _np(w), _np(b), 1e-5, axis)
    assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5 * np.abs(ref_dx).max(), what="dx")
    assert_close(dw, ref_dw, rtol=1e-5, atol=1e-5 * np.abs(ref_dw).max(), what="dweight")


@pytest.mark.parametrize("layout", ["nchw", "nc"])
def test_far_out_first_value_triggers_the_exact_two_pass_variance(layout):
    """The shift is the channel's first value; an outlier there would cancel, so the guard recomputes."""
    x, axis = _input(layout, torch.float64, mean=0.0, std=1e-3)
    idx = [0] * x.ndim
    x[tuple(idx)] = 1e6  # channel 0's first value is an outlier ~1e9 std away
    y, mean, var = cpu.train_forward(x, None, None, 0.0, axis, "identity", 0.0)
    ref_y, ref_m, ref_v = R.forward_train(_np(x), None, None, 0.0, axis)
    assert_close(mean, ref_m, rtol=1e-13, atol=0, what="mean")
    assert_close(var, ref_v, rtol=1e-10, atol=0, what="var (two-pass fallback)")
    assert_close(y, ref_y, rtol=1e-8, atol=1e-8, what="y")


@pytest.mark.parametrize("layout", ["nchw", "nhwc_memory", "nc"])
def test_nan_propagates_to_its_channel_only(layout):
    x, axis = _input(layout, torch.float32)
    idx = [0] * x.ndim
    idx[axis] = 1
    idx[(axis + 1) % x.ndim] = 1  # not the channel's first value (the shift)
    x[tuple(idx)] = float("nan")
    y, mean, var = cpu.train_forward(x, None, None, 1e-5, axis, "relu", 0.0)
    assert torch.isnan(mean[1]) and torch.isnan(var[1])
    assert torch.isnan(y.select(axis, 1)).all(), "relu must not turn NaN into 0 (torch.relu keeps NaN)"
    others = [i for i in range(x.shape[axis]) if i != 1]
    assert torch.isfinite(mean[others]).all()
    assert torch.isfinite(y.index_select(axis, torch.tensor(others))).all()


def test_modules_use_the_kernels_and_match_torch_nn():
    """BatchNormAct2d / BatchNorm1d, NCHW and channels-last: one training step and one eval step."""
    def bn_relu():
        return torch.nn.Sequential(torch.nn.BatchNorm2d(6), torch.nn.ReLU())

    for layout, ours, ref, shape in [
        (None, batchnorm.BatchNormAct2d(6), bn_relu(), (8, 6, 5, 5)),
        (torch.channels_last, batchnorm.BatchNormAct2d(6), bn_relu(), (8, 6, 5, 5)),
        (None, batchnorm.BatchNorm1d(10), torch.nn.BatchNorm1d(10), (32, 10)),
    ]:
        x = torch.randn(shape) * 3 + 1
        if layout is not None:
            x = x.contiguous(memory_format=layout)
        assert batchnorm.backend_for(x, 1, ours.activation) == "numba"
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yr = ours(xo), ref(xr)
        dy = torch.randn_like(yo)
        yo.backward(dy)
        yr.backward(dy)
        bn_ref = ref[0] if isinstance(ref, torch.nn.Sequential) else ref
        assert_close(yo, yr, rtol=1e-5, atol=1e-5, what="y")
        assert_close(xo.grad, xr.grad, rtol=1e-4, atol=1e-5, what="dx")
        assert_close(ours.weight.grad, bn_ref.weight.grad, rtol=1e-4, atol=1e-4, what="dweight")
        assert_close(ours.bias.grad, bn_ref.bias.grad, rtol=1e-4, atol=1e-4, what="dbias")
        assert_close(ours.running_mean, bn_ref.running_mean, rtol=1e-6, atol=1e-6, what="running_mean")
        assert_close(ours.running_var, bn_ref.running_var, rtol=1e-5, atol=1e-6, what="running_var")
        ours.eval()
        ref.eval()
        assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5, what="eval y")


@pytest.mark.parametrize("act,slope", ACTS, ids=[a for a, _ in ACTS])
def test_functional_auto_equals_forced_torch_fallback(act, slope):
    """The same call on both backends: same outputs, gradients and running statistics (float32 rounding)."""
    x0 = torch.randn(6, 4, 3, 5).contiguous(memory_format=torch.channels_last) * 2 + 1
    w0, b0 = _affine(4, torch.float32)
    res = {}
    for name in ("auto", "torch"):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        with batchnorm.use_backend(name):
            y, st = F.batch_norm_train(x, torch.zeros(4), torch.ones(4), w, b, activation=act,
                                       negative_slope=slope, num_batches_tracked=torch.tensor(0))
            torch.autograd.backward(y, torch.ones_like(y) * torch.arange(5.0))
            ye = F.batch_norm_eval(x0, st.mean, st.var, w0, b0, activation=act, negative_slope=slope)
        res[name] = (y, x.grad, w.grad, b.grad, st.mean, st.var, ye)
    for what, a, t in zip(("y", "dx", "dw", "db", "running_mean", "running_var", "eval y"), res["auto"],
                          res["torch"]):
        assert_close(a, t, rtol=2e-5, atol=2e-5 * float(t.detach().abs().max()), what=what)


@pytest.mark.parametrize("make", [
    lambda: torch.randn(4, 3, 6, 5)[:, :, ::2],                   # non-contiguous slice
    lambda: torch.randn(4, 3, 6, 5).half(),                        # float16
    lambda: torch.randn(4, 3, 6, 5).bfloat16(),                    # bfloat16
    lambda: torch.randn(4, 3, 6, 5).permute(0, 2, 1, 3),           # permuted, neither layout
], ids=["strided", "float16", "bfloat16", "permuted"])
def test_unsupported_inputs_fall_back_to_torch_with_the_same_results(make):
    x = make()
    assert batchnorm.backend_for(x) == "native"  # torch's own fused kernel (the composite only if forced)
    y, _ = F.batch_norm_train(x, torch.zeros(x.shape[1]), torch.ones(x.shape[1]), activation="relu")
    ref_y = R.forward_train(_np(x), None, None, 1e-5, 1, "relu")[0]
    tol = 2e-6 if x.dtype == torch.float32 else 2e-2
    assert_close(y, ref_y, rtol=tol, atol=tol, what="fallback y")


def test_supports_rejects_other_devices_and_tensor_subclasses():
    assert not cpu.supports(torch.empty(2, 3, device="meta"), 1, "relu")

    class Sub(torch.Tensor):
        pass

    assert not cpu.supports(torch.randn(4, 3).as_subclass(Sub), 1, "relu")
    assert cpu.supports(torch.nn.Parameter(torch.randn(4, 3)), 1, "relu")
    assert not cpu.supports(torch.randn(4, 3), 1, "mish")
    if torch.cuda.is_available():  # exercised on machines with a GPU
        assert batchnorm.backend_for(torch.randn(4, 3, device="cuda")) == "native"


def test_forcing_numba_on_an_input_it_cannot_run_raises_and_keeps_the_choice():
    x = torch.randn(4, 3, 5).half()
    with batchnorm.use_backend("numba"):
        with pytest.raises(RuntimeError, match="forced backend 'numba' cannot run"):
            F.batch_norm_train(x)
        assert batchnorm.get_backend() == "numba"
        y, _ = F.batch_norm_train(x.float())  # what it can run, it runs
        assert y.dtype == torch.float32
    assert batchnorm.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown backend 'numbaa'"):
        batchnorm.set_backend("numbaa")
    assert batchnorm.get_backend() == "auto"


def test_gradcheck_float64_through_the_kernels():
    for shape, axis, fmt in [((4, 3, 2, 3), 1, torch.channels_last), ((6, 3), 1, None), ((3, 2, 4), 1, None)]:
        x = torch.randn(shape, dtype=torch.float64)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        x.requires_grad_()
        w = torch.linspace(0.6, 1.4, shape[axis], dtype=torch.float64).requires_grad_()
        b = torch.linspace(-0.5, 0.5, shape[axis], dtype=torch.float64).requires_grad_()
        assert batchnorm.backend_for(x) == "numba"
        for act, slope in ACTS:
            def f(x, w, b, act=act, slope=slope):
                return F.batch_norm_train(x, None, None, w, b, eps=1e-3, activation=act,
                                          negative_slope=slope)[0]

            assert torch.autograd.gradcheck(f, (x, w, b))


def test_threads_follow_torch_and_give_the_same_results():
    """The kernels split work over torch.get_num_threads() threads: channels-first results are bit-identical
    (a channel is never split); channels-last partial sums are merged in float64 (equal to rounding)."""
    old = torch.get_num_threads()
    x = torch.randn(16, 8, 32, 32)  # big enough for two threads
    xl = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    out = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert cpu._threads(x.numel(), 8) == n
            res = []
            for xx in (x, xl):
                y, m, v = cpu.train_forward(xx, None, None, 1e-5, 1, "relu", 0.0)
                res += [y, m, v, *cpu.backward(dy, xx, y, None, None, m, v, 1e-5, 1, "relu", 0.0)[:1]]
            out[n] = res
    finally:
        torch.set_num_threads(old)
    assert cpu._threads(100, 8) == 1, "a tiny input must not pay for a thread hand-off"
    for a, b in zip(out[1][:4], out[2][:4]):
        assert torch.equal(a, b)
    for a, b in zip(out[1][4:], out[2][4:]):
        assert_close(a, b, rtol=1e-6, atol=1e-6, what="channels-last, 1 vs 2 threads")


def test_import_is_light_and_env_var_forces_the_backend(tmp_path):
    """``import batchnorm`` loads no numba; BATCHNORM_BACKEND sets the initial choice."""
    code = ("import sys, torch, batchnorm; assert 'numba' not in sys.modules, 'numba imported eagerly';"
            "print(batchnorm.get_backend(), batchnorm.backend_for(torch.randn(4, 3)))")
    env = {**os.environ, "BATCHNORM_BACKEND": "torch"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["torch", "torch"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_thread_pool_works_in_a_forked_child():
    """A DataLoader-style fork after the pool started must not hang the child's next kernel call."""
    import time

    x = torch.randn(16, 8, 32, 32)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref = cpu.train_forward(x, None, None, 1e-5, 1, "relu", 0.0)[0]  # starts the pool here
        pid = os.fork()
        if pid == 0:  # child: same call, must finish with the same result (compared with numpy: torch's
            # own OpenMP pool is not usable after a fork, which is why DataLoader workers use 1 thread)
            y = cpu.train_forward(x, None, None, 1e-5, 1, "relu", 0.0)[0]
            # (the parent's OpenMP team does not exist here: the child must use the Python pool)
            os._exit(0 if np.array_equal(y.numpy(), ref.numpy()) and not _omp.runtime() else 1)
        deadline = time.monotonic() + 20
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise AssertionError("the forked child hung in a kernel call")
            time.sleep(0.05)
        assert os.waitstatus_to_exitcode(status) == 0, "the forked child computed a different result"
    finally:
        torch.set_num_threads(old)


def test_expanded_and_foreign_layout_gradients_are_made_dense_first():
    """dy from y.sum() has zero strides; dy in the other memory format: both give the oracle's dx."""
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(4, 3, 5, 5).contiguous(memory_format=fmt)
        y, mean, var = cpu.train_forward(x, None, None, 1e-5, 1, "relu", 0.0)
        other = torch.channels_last if fmt == torch.contiguous_format else torch.contiguous_format
        for dy in (torch.ones(()).expand(x.shape), torch.randn(x.shape).contiguous(memory_format=other)):
            dx = cpu.backward(dy, x, y, None, None, mean, var, 1e-5, 1, "relu", 0.0)[0]
            ref = R.backward(_np(dy), _np(x), None, None, 1e-5, 1, "relu")[0]
            assert_close(dx, ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max(), what="dx")
    sigs = cpu._backward_ncl.signatures + cpu._dx_mc.signatures
    assert all(a.layout == "C" for sig in sigs for a in sig if hasattr(a, "layout")), "a strided compile"


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc_memory", "nc"])
@pytest.mark.parametrize("act", ["relu", "elu"])
def test_openmp_team_and_python_pool_give_identical_results(dtype, layout, act, monkeypatch):
    """Both runners split the work the same way: for the same thread count the statistics and the
    parameter gradients agree bit for bit, elementwise outputs to the last bit or within one rounding
    (the compiler may contract a multiply-add into an FMA differently in the two builds)."""
    if not _omp.runtime():
        pytest.skip("torch here has no OpenMP team to run on")
    shape = {"nchw": (16, 8, 24, 24), "nhwc_memory": (16, 8, 24, 24), "nc": (4096, 24)}[layout]
    x = torch.randn(shape, dtype=dtype) * 3 + 1
    if layout == "nhwc_memory":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = _affine(shape[1], dtype)
    dy = torch.randn_like(x)
    rm, rv = torch.rand(shape[1], dtype=dtype), torch.rand(shape[1], dtype=dtype) + 0.5
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert cpu._threads(x.numel(), 8) == 2, "the case must run on two threads"
        out = {}
        for who in RUNNERS:
            if who == "pool":
                monkeypatch.setattr(_omp, "_state", {"lib": ""})
            y, m, v = cpu.train_forward(x, w, b, 1e-5, 1, act, 1.0)
            ye = cpu.eval_forward(x, rm, rv, w, b, 1e-3, 1, act, 1.0)
            out[who] = [y.clone(), m, v, *cpu.backward(dy, x, y, w, b, m, v, 1e-5, 1, act, 1.0), ye.clone(),
                        *cpu.eval_backward(dy, x, ye, w, b, rm, rv, 1e-3, 1, act, 1.0)]
    finally:
        torch.set_num_threads(old)
    ulp = torch.finfo(dtype).eps
    for name, a, b_ in zip(["y", "mean", "var", "dx", "dw", "db", "eval y", "eval dx", "eval dw", "eval db"],
                           out["team"], out["pool"]):
        if name in ("mean", "var", "dw", "db", "eval dw", "eval db"):
            assert torch.equal(a, b_), f"{name}: OpenMP team and Python pool differ"
        else:
            torch.testing.assert_close(a, b_, rtol=ulp, atol=ulp * b_.abs().max().item(), msg=name)


def test_openmp_runtime_is_torchs_own_and_can_be_switched_off():
    """The team is torch's OpenMP runtime (the library torch loaded, never a second one);
    BATCHNORM_OMP=0 selects the Python pool, with the same results."""
    code = ("import torch, numpy as np; from batchnorm.kernels import cpu, _omp; torch.manual_seed(0);"
            "x = torch.randn(16, 8, 24, 24); y = cpu.train_forward(x, None, None, 1e-5, 1, 'relu', 0.)[0];"
            "np.save('OUT', y.numpy()); print(repr(_omp.runtime()))")
    outs = {}
    for flag in ("1", "0"):
        out_file = f"{os.getpid()}-{flag}.npy"
        env = {**os.environ, "BATCHNORM_OMP": flag}
        try:
            res = subprocess.run([sys.executable, "-c", code.replace("OUT", out_file)], env=env,
                                 capture_output=True, text=True, check=True)
            outs[flag] = (eval(res.stdout.strip()), np.load(out_file))
        finally:
            if os.path.exists(out_file):
                os.remove(out_file)
    assert outs["0"][0] == "", "BATCHNORM_OMP=0 must select the Python thread pool"
    if "ATen parallel backend: OpenMP" in torch.__config__.parallel_info() and sys.platform == "linux":
        lib = outs["1"][0]
        assert lib and os.path.basename(lib).startswith(("libgomp", "libiomp5", "libomp")), lib
    assert np.array_equal(outs["0"][1], outs["1"][1])


@pytest.mark.parametrize("layout", ["nchw", "nc"])
def test_relu_outputs_are_positive_zero_like_torch(layout, runner):
    """max(z, 0) is +0 where z < 0 (torch.relu's convention), never -0 (which prints as "-0.")."""
    x = torch.randn((16, 8, 24, 24) if layout == "nchw" else (4096, 24))
    for y in (cpu.train_forward(x, None, None, 1e-5, 1, "relu", 0.0)[0],
              cpu.eval_forward(x, None, None, None, None, 1e-5, 1, "relu", 0.0)):
        zeros = y == 0
        assert zeros.any() and not torch.signbit(y[zeros]).any()


def test_non_contiguous_parameters_and_statistics_are_read_correctly(runner):
    """γ, β and running statistics given as strided views (every other element of a longer tensor)."""
    x = torch.randn(16, 8, 24, 24, dtype=torch.float64)
    base = torch.linspace(0.5, 2.0, 16, dtype=torch.float64)
    w, b, rm, rv = base[::2], base[1::2] - 1, base[::2] - 1, base[1::2]
    assert not w.is_contiguous()
    y = cpu.train_forward(x, w, b, 1e-5, 1, "relu", 0.0)[0]
    ref_y = R.forward_train(_np(x), _np(w), _np(b), 1e-5, 1, "relu", 0.0)[0]
    assert_close(y, ref_y, rtol=1e-10, atol=1e-10, what="train y")
    ye = cpu.eval_forward(x, rm, rv, w, b, 1e-5, 1, "relu", 0.0)
    assert_close(ye, R.forward_eval(_np(x), _np(rm), _np(rv), _np(w), _np(b), 1e-5, 1, "relu", 0.0),
                 rtol=1e-10, atol=1e-10, what="eval y")


@pytest.mark.parametrize("paths,expected", [
    (["/t/lib/libgomp.so.1", "/usr/lib/libgomp.so.1.0.0"], "/t/lib/libgomp.so.1"),  # torch's own wins
    (["/usr/lib/libgomp.so.1.0.0", "/usr/lib/libc.so.6"], "/usr/lib/libgomp.so.1.0.0"),  # the only one
    (["/usr/lib/libgomp.so.1", "/opt/intel/libiomp5.so"], ""),  # several, none torch's: do not guess
    (["/usr/lib/libc.so.6", "/t/lib/libtorch_cpu.so"], ""),  # no OpenMP runtime loaded
    (["/t/library/libomp.dylib.txt"], ""),  # not a shared object
])
def test_openmp_runtime_choice(paths, expected):
    assert _omp._pick(paths, "/t") == expected


_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CACHED_USE = """
import sys, torch, numpy as np
import batchnorm
from batchnorm.kernels import cpu, _omp
torch.manual_seed(0)
out = []
for fmt in (torch.contiguous_format, torch.channels_last):
    for dtype in (torch.float32, torch.float64):
        for act in ("relu", "elu"):
            x = torch.randn(4, 3, 5, 5, dtype=dtype).contiguous(memory_format=fmt)
            y, m, v = cpu.train_forward(x, None, None, 1e-5, 1, act, 1.0)
            dy = torch.randn_like(x)
            dx = cpu.backward(dy, x, y, None, None, m, v, 1e-5, 1, act, 1.0)[0]
            ye = cpu.eval_forward(x, m, v, None, None, 1e-5, 1, act, 1.0)
            out += [t.double().numpy().ravel() for t in (y, dx, ye)]
np.save(sys.argv[1], np.concatenate(out))
print(repr((bool(_omp.runtime()), "numba.np.arraymath" in sys.modules)))
"""


def test_a_cached_callback_loads_without_numbas_full_refresh_and_computes_the_same(tmp_path):
    """Second process, warm cache: the callbacks come from numba's cache without numba importing its
    NumPy support (and SciPy) — the shortcut that brings a cached first use from 0.6 s to 0.26 s —
    and compute what the first process (compiled or loaded the standard way) computed."""
    if not _omp.runtime():
        pytest.skip("the callbacks run on torch's OpenMP team, which torch here lacks")
    script = tmp_path / "use.py"
    script.write_text(_CACHED_USE)
    results = []
    for run in range(2):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([_ROOT, os.environ.get("PYTHONPATH", "")])}
        res = subprocess.run([sys.executable, str(script), str(tmp_path / f"{run}.npy")], capture_output=True,
                             text=True, check=True, env=env)
        results.append((eval(res.stdout.strip().splitlines()[-1]), np.load(tmp_path / f"{run}.npy")))
    (team, numpy_support), second = results[1]
    assert team and not numpy_support, "a cache hit must not go through numba's full target refresh"
    assert np.array_equal(results[0][1], second)


def test_callback_shortcut_falls_back_to_numba_cfunc(monkeypatch):
    """If the shortcut fails (another numba's internals), numba.cfunc compiles or loads as usual."""
    if not _omp.runtime():
        pytest.skip("the callbacks run on torch's OpenMP team, which torch here lacks")
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    expected = cpu.train_forward(x, None, None, 1e-5, 1, "relu", 0.0)

    def broken(pyfunc):
        raise AttributeError("no such internals")

    monkeypatch.setattr(_cpu_team, "_load_cached_callback", broken)
    monkeypatch.setattr(_cpu_team, "_team_cfuncs", {})
    got = cpu.train_forward(x, None, None, 1e-5, 1, "relu", 0.0)
    assert _cpu_team._team_cfuncs, "the callback must have been (re)made"
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- streaming stores
STREAM_CASES = {  # name -> (shape, memory format); every streamed run starts on a 64-byte line
    "nchw_L16": ((6, 5, 4, 4), None),          # runs of 16 values
    "ncl_L48": ((3, 4, 48), None),
    "nc_C32": ((301, 32), None),               # odd row count: uneven thread split
    "nhwc_C16": ((7, 16, 3, 5), torch.channels_last),
    "nchw_L13": ((6, 5, 13, 1), None),         # runs that are not whole lines: never streamed
    "nc_C7": ((50, 7), None),
}


def _all_passes(x, w, b, dy, act, slope):
    y, m, v = cpu.train_forward(x, w, b, 1e-5, 1, act, slope)
    dx, dw, db = cpu.backward(dy, x, y, w, b, m, v, 1e-5, 1, act, slope)
    ye = cpu.eval_forward(x, m, v, w, b, 1e-3, 1, act, slope)
    dxe, dwe, dbe = cpu.eval_backward(dy, x, ye, w, b, m, v, 1e-3, 1, act, slope)
    return [t.clone() for t in (y, m, v, dx, dw, db, ye, dxe, dwe, dbe)]


@pytest.mark.parametrize("act,slope", ACTS, ids=[a for a, _ in ACTS])
@pytest.mark.parametrize("case", list(STREAM_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_streaming_stores_give_the_same_bits_as_plain_stores(dtype, case, act, slope, runner, monkeypatch):
    """Streaming changes only how outputs reach memory: every output equals the plain-store run to the
    last bit (and so the oracle, which the plain path is held to above), on both runners."""
    shape, fmt = STREAM_CASES[case]
    torch.manual_seed(3)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    w, b = _affine(shape[1], dtype)
    dy = torch.randn_like(x)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(_cpu_team, "_MIN_PER_THREAD", 16)  # tiny inputs still split over two threads
        monkeypatch.setattr(cpu, "STREAM_MIN_BYTES", 1 << 62)
        plain = _all_passes(x, w, b, dy, act, slope)
        monkeypatch.setattr(cpu, "STREAM_MIN_BYTES", 0)
        streamed = _all_passes(x, w, b, dy, act, slope)
    finally:
        torch.set_num_threads(old)
    names = ["y", "mean", "var", "dx", "dw", "db", "eval y", "eval dx", "eval dw", "eval db"]
    for name, a, b_ in zip(names, plain, streamed):
        assert torch.equal(a, b_), f"{name}: streaming and plain stores differ"
    ref_y, _, _ = R.forward_train(_np(x), _np(w), _np(b), 1e-5, 1, act, slope)
    ref_dx, _, _ = R.backward(_np(dy), _np(x), _np(w), _np(b), 1e-5, 1, act, slope)
    rtol, atol = _tol(dtype)
    assert_close(streamed[0], ref_y, rtol=rtol, atol=atol, what="streamed y vs oracle")
    assert_close(streamed[3], ref_dx, rtol=rtol, atol=atol * np.abs(ref_dx).max(),
                 what="streamed dx vs oracle")


def test_which_outputs_are_streamed(monkeypatch):
    monkeypatch.setattr(cpu, "STREAM_MIN_BYTES", 1024)
    big = torch.empty(16, 16)  # 1024 bytes, rows of 64 bytes
    assert big.data_ptr() % 64 == 0
    assert cpu._streams(big, "relu", 16)
    assert not cpu._streams(big, "elu", 16), "ELU's loops keep plain stores"
    assert not cpu._streams(big, "relu", 8), "runs of 32 bytes are not whole lines"
    assert not cpu._streams(torch.empty(15, 16), "relu", 16), "below the threshold"
    off = torch.empty(16 * 16 + 1)[1:].view(16, 16)  # 4 bytes past a line start
    assert not cpu._streams(off, "relu", 16), "a misaligned start is never streamed"
    assert cpu._streams(torch.empty(8, 8, dtype=torch.float64).repeat(2, 1), "identity", 8)


@pytest.mark.parametrize("raw,expected", [("", 8 << 20), ("0", 0), (" 1048576 ", 1 << 20)])
def test_stream_threshold_from_the_environment(raw, expected, monkeypatch):
    monkeypatch.setenv("BATCHNORM_STREAM_MIN_BYTES", raw)
    assert cpu._env_bytes("BATCHNORM_STREAM_MIN_BYTES", 8 << 20) == expected


@pytest.mark.parametrize("raw", ["8MB", "-1", "1e6"])
def test_a_bad_stream_threshold_is_a_clear_error(raw, monkeypatch):
    monkeypatch.setenv("BATCHNORM_STREAM_MIN_BYTES", raw)
    with pytest.raises(ValueError, match=r"BATCHNORM_STREAM_MIN_BYTES.*whole number of bytes"):
        cpu._env_bytes("BATCHNORM_STREAM_MIN_BYTES", 8 << 20)


def test_large_outputs_are_streamed_by_default_and_match_torch():
    """A default-threshold case that really streams (8 MiB output) still matches native torch."""
    x = torch.randn(2048, 1024) * 2 + 1
    w, b = _affine(1024, torch.float32)
    y, _, _ = cpu.train_forward(x, w, b, 1e-5, 1, "relu", 0.0)
    assert cpu._streams(y, "relu", 1024), "the case must take the streaming path"
    ref = torch.relu(torch.nn.functional.batch_norm(x.double(), None, None, w.double(), b.double(), True))
    torch.testing.assert_close(y.double(), ref, rtol=2e-6, atol=2e-6 * ref.abs().max().item())


@settings(deadline=None)
@given(m=st.integers(1, 70), c=st.sampled_from([1, 3, 8, 16, 24, 32, 40]), spatial=st.booleans(),
       dtype=st.sampled_from(DTYPES), act=st.sampled_from(["identity", "relu", "leaky_relu"]),
       seed=st.integers(0, 2**31 - 1))
def test_streaming_equals_plain_stores_for_random_shapes(m, c, spatial, dtype, act, seed):
    """Random (M, C) and (N, C, L) inputs on two threads: streamed outputs equal plain ones bit for bit,
    whatever the row length and the split (rows on whole lines stream, the rest fall back per call)."""
    g = torch.Generator().manual_seed(seed)
    shape = (m, c, 16) if spatial else (m, c)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 - 1).to(dtype)
    w, b = _affine(c, dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    saved = cpu.STREAM_MIN_BYTES, _cpu_team._MIN_PER_THREAD, torch.get_num_threads()
    torch.set_num_threads(2)
    _cpu_team._MIN_PER_THREAD = 8
    try:
        cpu.STREAM_MIN_BYTES = 1 << 62
        plain = _all_passes(x, w, b, dy, act, 0.1)
        cpu.STREAM_MIN_BYTES = 0
        streamed = _all_passes(x, w, b, dy, act, 0.1)
    finally:
        cpu.STREAM_MIN_BYTES, _cpu_team._MIN_PER_THREAD = saved[:2]
        torch.set_num_threads(saved[2])
    for a, b_ in zip(plain, streamed):
        assert torch.equal(a, b_)


@pytest.mark.skipif(__import__("platform").machine().lower() not in ("x86_64", "amd64"), reason="x86 code")
def test_compiled_callbacks_contain_streaming_vector_stores():
    """What the alignment contract of batchnorm.kernels._stream is for: a fresh compilation (no cache)
    turns the streaming loops into vector non-temporal stores (movntps/vmovntpd), not scalar ones."""
    import re

    import numba as nb

    if not _omp.runtime():
        pytest.skip("the callbacks link against torch's OpenMP runtime")
    fn = _cpu_team._TEAM_FNS[("forward_mc", "f32")]
    options = {**_cpu_common._STRICT, "cache": False}
    asm = nb.cfunc(_cpu_team._CALLBACK_SIG, **options)(fn)._library.get_asm_str()
    assert re.search(r"\bv?movntps\s+%[xyz]mm", asm), "no vector streaming store in the compiled forward"


@pytest.mark.parametrize("act,slope", [("relu", 0.0), ("elu", 0.7)], ids=["relu", "elu"])
def test_channel_blocks_with_a_short_last_block_match_the_oracle(act, slope, runner):
    """(N, C, L) channels go in blocks of about 2 MiB: 256 KiB a channel here gives blocks of 8 channels
    (forward) and 4 (backward), and each thread's 21 or 22 channels end with a shorter block."""
    x = torch.randn(64, 43, 1000, dtype=torch.float64) * 2 + 0.5
    x32 = x.float()
    w, b = _affine(43, torch.float32)
    dy = torch.randn_like(x32)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y, m, v = cpu.train_forward(x32, w, b, 1e-5, 1, act, slope)
        dx, dw, db = cpu.backward(dy, x32, y, w, b, m, v, 1e-5, 1, act, slope)
    finally:
        torch.set_num_threads(old)
    ref_y, ref_m, ref_v = R.forward_train(_np(x32), _np(w), _np(b), 1e-5, 1, act, slope)
    ref_dx, ref_dw, ref_db = R.backward(_np(dy), _np(x32), _np(w), _np(b), 1e-5, 1, act, slope)
    assert_close(m, ref_m, rtol=1e-6, atol=1e-6 * np.sqrt(ref_v.max()), what="mean")
    assert_close(v, ref_v, rtol=1e-5, atol=0, what="var")
    assert_close(y, ref_y, rtol=2e-6, atol=2e-6, what="y")
    assert_close(dx, ref_dx, rtol=2e-6, atol=2e-6 * np.abs(ref_dx).max(), what="dx")
    assert_close(dw, ref_dw, rtol=2e-6, atol=2e-6 * np.abs(ref_dw).max(), what="dweight")
    assert_close(db, ref_db, rtol=2e-6, atol=2e-6 * np.abs(ref_db).max(), what="dbias")


def test_stream_store_accepts_only_contiguous_one_dimensional_rows():
    """The intrinsic indexes from the data pointer: a strided or 2-D array is a compile-time error, not
    a silent write to the wrong place."""
    import numba as nb
    from numba.core.errors import TypingError

    from batchnorm.kernels import _stream

    @nb.njit
    def put(a, v):
        for j in range(a.shape[0]):
            _stream.store(a, j, v)
        _stream.fence()

    row = torch.zeros(64).numpy()  # (the contract: the row starts on a 64-byte line; numpy's own
    assert row.ctypes.data % 64 == 0  # allocations are only 16-byte aligned, and would fault)
    put(row, 2.5)
    assert (row == 2.5).all()
    with pytest.raises(TypingError):
        put(np.zeros(128, dtype=np.float32)[::2], 1.0)
    with pytest.raises(TypingError):
        put(np.zeros((4, 16), dtype=np.float32), 1.0)
