"""The smooth fused activations (SiLU, Hardswish, GELU erf/tanh, Sigmoid, Tanh) through every path.

The story: the oracle's activations are torch's own functions (checked first, so the oracle is
right); then the numba kernels (train forward, train backward, eval forward, eval backward) in
each memory layout, float32 and float64, on both runners, against the oracle; the torch composite
backend against the oracle; the modules against ``nn.BatchNorm2d`` followed by torch's activation
module; float64 gradcheck through the kernels; and the activations stay run-time codes (one compiled
kernel serves them all).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.core_util import ref_eval_backward
from helpers.util import assert_close

import batchnorm
from batchnorm import reference as R
from batchnorm._checks import ACTIVATIONS
from batchnorm.core import functional as F
from batchnorm.kernels import _omp, cpu, torch_backend

SMOOTH = ["silu", "hardswish", "gelu", "gelu_tanh", "sigmoid", "tanh"]
TORCH_FN = {
    "silu": torch.nn.functional.silu,
    "hardswish": torch.nn.functional.hardswish,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}
TORCH_MODULE = {"silu": torch.nn.SiLU, "hardswish": torch.nn.Hardswish, "gelu": torch.nn.GELU,
                "gelu_tanh": lambda: torch.nn.GELU(approximate="tanh"), "sigmoid": torch.nn.Sigmoid,
                "tanh": torch.nn.Tanh}
DTYPES = [torch.float32, torch.float64]
LAYOUTS = {
    "nchw": ((5, 3, 4, 6), 1, None),
    "ncl": ((4, 5, 7), 1, None),
    "nc": ((37, 6), 1, None),
    "nhwc_memory": ((5, 3, 4, 6), 1, torch.channels_last),
    "nhwc_axis": ((4, 5, 6, 3), -1, None),
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


def _tol(dtype):
    return (4e-6, 4e-6) if dtype == torch.float32 else (1e-10, 1e-10)


def test_every_smooth_activation_is_accepted_by_the_checks():
    assert set(SMOOTH) <= set(ACTIVATIONS)
    with pytest.raises(ValueError, match=r"unknown activation 'swish'.*silu.*hardswish.*gelu_tanh"):
        batchnorm.BatchNormAct2d(4, activation="swish")


@pytest.mark.parametrize("act", SMOOTH)
def test_the_oracle_activations_are_torchs(act):
    # dense z over the interesting range, with the kinks of hardswish (±3) and large |z| (no overflow)
    z = torch.cat([torch.linspace(-12, 12, 2001, dtype=torch.float64),
                   torch.tensor([-3.0, 3.0, 0.0, -800.0, 800.0], dtype=torch.float64)])
    zr = z.clone().requires_grad_()
    ref = TORCH_FN[act](zr)
    (grad,) = torch.autograd.grad(ref.sum(), zr)
    assert_close(R.activation(z.numpy(), act), ref, rtol=1e-14, atol=1e-15, what=f"{act}(z)")
    assert_close(R.activation_grad(z.numpy(), act), grad, rtol=1e-12, atol=1e-14, what=f"{act}'(z)")
    # the torch backend's derivative from z matches too (its backward for these activations)
    assert_close(torch_backend._act_grad_from_input(z, act, 0.01), grad, rtol=1e-12, atol=1e-14,
                 what=f"torch backend {act}'(z)")


@pytest.mark.parametrize("act", SMOOTH)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_numba_kernels_match_the_oracle(dtype, layout, act, runner):
    shape, axis, fmt = LAYOUTS[layout]
    torch.manual_seed(3)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    axis %= x.ndim
    assert batchnorm.backend_for(x, axis, act) == "numba"
    c = x.shape[axis]
    # γ of both signs and β spread so that z covers both sides of every kink (hardswish ±3)
    w = (torch.linspace(0.5, 2.5, c, dtype=torch.float64) * torch.tensor([1.0, -1.0] * c)[:c]).to(dtype)
    b = torch.linspace(-0.6, 0.8, c, dtype=dtype)
    rtol, atol = _tol(dtype)
    xn, wn, bn = _np(x), _np(w), _np(b)

    y, mean, var = cpu.train_forward(x, w, b, 1e-5, axis, act, 0.01)
    ref_y, _, _ = R.forward_train(xn, wn, bn, 1e-5, axis, act)
    assert y.dtype == dtype and y.stride() == x.stride()
    assert_close(y, ref_y, rtol=rtol, atol=atol, what="train y")

    dy = torch.randn(x.shape, dtype=dtype)
    dx, dw, db = cpu.backward(dy, x, y, w, b, mean, var, 1e-5, axis, act, 0.01)
    ref_dx, ref_dw, ref_db = R.backward(_np(dy), xn, wn, bn, 1e-5, axis, act)
    assert dx.stride() == x.stride()
    assert_close(dx, ref_dx, rtol=rtol, atol=atol * np.abs(ref_dx).max(), what="train dx")
    assert_close(dw, ref_dw, rtol=rtol, atol=atol * np.abs(ref_dw).max(), what="train dweight")
    assert_close(db, ref_db, rtol=rtol, atol=atol * np.abs(ref_db).max(), what="train dbias")

    rm = torch.linspace(-0.5, 0.5, c, dtype=dtype)
    rv = torch.linspace(0.5, 3.0, c, dtype=dtype)
    ye = cpu.eval_forward(x, rm, rv, w, b, 1e-3, axis, act, 0.01)
    assert_close(ye, R.forward_eval(xn, _np(rm), _np(rv), wn, bn, 1e-3, axis, act), rtol=rtol, atol=atol,
                 what="eval y")
    dxe, dwe, dbe = cpu.eval_backward(dy, x, ye, w, b, rm, rv, 1e-3, axis, act, 0.01)
    ref = ref_eval_backward(_np(dy), xn, _np(rm), _np(rv), wn, bn, 1e-3, axis, act)
    for got, want, what in zip((dxe, dwe, dbe), ref, ("eval dx", "eval dweight", "eval dbias"), strict=True):
        assert_close(got, want, rtol=rtol, atol=atol * np.abs(want).max(), what=what)


@pytest.mark.parametrize("act", SMOOTH)
def test_torch_backend_matches_the_oracle(act):
    torch.manual_seed(4)
    x = torch.randn(6, 4, 3, 5, dtype=torch.float64) * 2 + 0.3
    w = torch.linspace(0.5, 2.0, 4, dtype=torch.float64)
    b = torch.linspace(-0.5, 0.5, 4, dtype=torch.float64)
    dy = torch.randn_like(x)
    with batchnorm.use_backend("torch"):
        y, mean, var = torch_backend.train_forward(x, w, b, 1e-5, 1, act, 0.01)
        dx, dw, db = torch_backend.backward(dy, x, y, w, b, mean, var, 1e-5, 1, act, 0.01)
    ref_y, _, _ = R.forward_train(x.numpy(), w.numpy(), b.numpy(), 1e-5, 1, act)
    ref_dx, ref_dw, ref_db = R.backward(dy.numpy(), x.numpy(), w.numpy(), b.numpy(), 1e-5, 1, act)
    assert_close(y, ref_y, what="y")
    assert_close(dx, ref_dx, what="dx")
    assert_close(dw, ref_dw, what="dweight")
    assert_close(db, ref_db, what="dbias")
    ye = torch_backend.eval_forward(x, mean, var, w, b, 1e-5, 1, act, 0.01)
    dxe, _, _ = torch_backend.eval_backward(dy, x, ye, w, b, mean, var, 1e-5, 1, act, 0.01)
    ref_dxe = ref_eval_backward(dy.numpy(), x.numpy(), mean.numpy(), var.numpy(), w.numpy(), b.numpy(), 1e-5,
                                1, act)[0]
    assert_close(dxe, ref_dxe, what="eval dx")


@pytest.mark.parametrize("act", SMOOTH)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_module_matches_torch_batchnorm_followed_by_the_activation(act, fmt):
    torch.manual_seed(5)
    ours = batchnorm.BatchNormAct2d(6, activation=act)
    ref = torch.nn.Sequential(torch.nn.BatchNorm2d(6), TORCH_MODULE[act]())
    with torch.no_grad():
        for m in (ours, ref[0]):
            m.weight.copy_(torch.linspace(0.5, 2.0, 6))
            m.bias.copy_(torch.linspace(-0.5, 0.5, 6))
    x = (torch.randn(8, 6, 5, 5) * 2 + 1).contiguous(memory_format=fmt)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert batchnorm.backend_for(x, 1, act) == "numba"
    ya, yb = ours(xa), ref(xb)
    assert_close(ya, yb, rtol=1e-5, atol=1e-5, what="train y")
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5, what="dx")
    assert_close(ours.weight.grad, ref[0].weight.grad, rtol=1e-4, atol=1e-4, what="dweight")
    assert_close(ours.bias.grad, ref[0].bias.grad, rtol=1e-4, atol=1e-4, what="dbias")
    assert_close(ours.running_mean, ref[0].running_mean, rtol=1e-6, atol=1e-6, what="running mean")
    assert_close(ours.running_var, ref[0].running_var, rtol=1e-6, atol=1e-6, what="running var")
    ours.eval()
    ref.eval()
    with torch.no_grad():
        assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5, what="eval y")
    assert f"activation={act!r}" in repr(ours)


@pytest.mark.parametrize("act", SMOOTH)
def test_gradcheck_float64_through_the_kernels(act):
    for shape, fmt in [((4, 3, 2, 3), torch.channels_last), ((6, 3), None), ((3, 2, 4), None)]:
        torch.manual_seed(6)
        x = torch.randn(shape, dtype=torch.float64) * 2
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        x.requires_grad_()
        w = torch.linspace(0.6, 1.4, shape[1], dtype=torch.float64).requires_grad_()
        b = torch.linspace(-0.5, 0.5, shape[1], dtype=torch.float64).requires_grad_()
        assert batchnorm.backend_for(x, 1, act) == "numba"

        def train(x, w, b):
            return F.batch_norm_train(x, None, None, w, b, eps=1e-3, activation=act)[0]

        rm = torch.linspace(-0.2, 0.2, shape[1], dtype=torch.float64)
        rv = torch.linspace(0.5, 1.5, shape[1], dtype=torch.float64)

        def ev(x, w, b, rm=rm, rv=rv):
            return F.batch_norm_eval(x, rm, rv, w, b, eps=1e-3, activation=act)

        assert torch.autograd.gradcheck(train, (x, w, b))
        assert torch.autograd.gradcheck(ev, (x, w, b))


def test_smooth_activations_are_run_time_codes_of_one_compiled_kernel():
    """One compiled specialisation per kernel and dtype serves every activation (no new compile)."""
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    for act in ("relu", *SMOOTH):
        y, m, v = cpu.train_forward(x, None, None, 1e-5, 1, act, 0.01)
        cpu.backward(torch.randn_like(x), x, y, None, None, m, v, 1e-5, 1, act, 0.01)
    f64 = [s for s in cpu._forward_ncl.signatures if "float64" in str(s[0])]
    assert len(f64) <= 1, f"one float64 signature expected, got {f64}"


def test_output_based_derivative_refuses_activations_that_need_z():
    y = torch.rand(5)
    assert_close(torch_backend.act_grad_from_output(y, "sigmoid", 0.0), y * (1 - y), what="sigmoid")
    assert_close(torch_backend.act_grad_from_output(y, "tanh", 0.0), 1 - y * y, what="tanh")
    with pytest.raises(ValueError, match="'silu' is not a function of its output"):
        torch_backend.act_grad_from_output(y, "silu", 0.0)
