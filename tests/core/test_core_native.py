"""The native backend (torch's fused aten batch norm) and the automatic dispatch to it.

The story: forced on the CPU, the native backend gives the float64 oracle's numbers to float32
rounding — forward, backward, eval, every activation, channels on any axis — including data with
|mean| ≫ std (where torch's folded normalisation would lose digits, the backend recomputes);
it runs fewer ops per step than the composite reference (counted with the profiler); ``auto``
sends it the small inputs (:data:`batchnorm.kernels.NATIVE_BELOW`), ``backend_for`` says so, and the
modules then compute exactly what ``torch.nn`` computes.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers.util import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import batchnorm
from batchnorm import kernels
from batchnorm.kernels import native_backend as N

ACTS = [("identity", 0.0), ("relu", 0.0), ("leaky_relu", 0.2), ("elu", 0.7)]


def _oracle(x, w, b, eps, axis, act, slope, dy):
    """float64 y, mean, biased var, dx, dw, db (BN then activation) by autograd in float64."""
    xd = x.detach().double().requires_grad_()
    wd, bd = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    dims = [d for d in range(x.ndim) if d != axis]
    shape = [1] * x.ndim
    shape[axis] = -1
    mean = xd.mean(dims)
    var = ((xd - mean.view(shape)) ** 2).mean(dims)
    z = (xd - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * wd.view(shape) + bd.view(shape)
    y = {"identity": z, "relu": torch.relu(z), "leaky_relu": nn.functional.leaky_relu(z, slope),
         "elu": nn.functional.elu(z, slope)}[act]
    dx, dw, db = torch.autograd.grad(y, (xd, wd, bd), dy.double())
    return y.detach(), mean.detach(), var.detach(), dx, dw, db


# (up to the largest inputs `auto` sends to native: kernels.cpu.CROSSOVER, 2^22 values in (M, C) memory)
SIZE_CLASSES = [(16, 4), (64, 8, 5), (32, 16, 6, 6), (8, 4, 3, 5, 5), (256, 32, 8, 8), (16384, 256)]


@pytest.mark.parametrize("shape", SIZE_CLASSES, ids=["x".join(map(str, s)) for s in SIZE_CLASSES])
@pytest.mark.parametrize("shift", [0.0, 1e3, 1e4], ids=["centred", "mean1e3", "mean1e4"])
@pytest.mark.parametrize("act,slope", ACTS, ids=[a for a, _ in ACTS])
def test_native_backend_meets_the_oracle_per_size_class(shape, shift, act, slope):
    torch.manual_seed(0)
    axis = 1
    c = shape[axis]
    x = (torch.randn(shape, dtype=torch.float64) + shift).float()
    w, b = torch.rand(c) + 0.5, torch.randn(c) * 0.1
    dy = torch.randn(shape)
    y, mean, var = N.train_forward(x, w, b, 1e-5, axis, act, slope)
    ry, rm, rv, rdx, rdw, rdb = _oracle(x, w, b, 1e-5, axis, act, slope, dy)
    assert_close(mean, rm, rtol=1e-6, atol=1e-6 * max(1.0, shift), what="mean")
    assert_close(var, rv, rtol=1e-4, atol=1e-6, what="biased var")
    assert_close(y, ry, rtol=1e-5, atol=1e-5, what=f"y (shift {shift})")  # the numba kernels' tolerance
    dx, dw, db = N.backward(dy, x, y, w, b, mean, var, 1e-5, axis, act, slope)
    n = x.numel() // c
    assert_close(dx, rdx, rtol=1e-4, atol=1e-5, what="dx")
    assert_close(dw, rdw, rtol=1e-4, atol=1e-5 * n ** 0.5, what="dweight")
    assert_close(db, rdb, rtol=1e-4, atol=1e-5 * n ** 0.5, what="dbias")
    # eval with the same statistics as running statistics
    ye = N.eval_forward(x, rm, rv, w, b, 1e-5, axis, act, slope)
    assert_close(ye, ry, rtol=1e-5, atol=1e-5, what="eval y")
    edx, edw, edb = N.eval_backward(dy, x, ye, w, b, rm, rv, 1e-5, axis, act, slope)
    tdx, tdw, tdb = kernels.torch_backend.eval_backward(  # (the composite in float64: the oracle)
        *(t.double() for t in (dy, x, ye, w, b, rm, rv)), 1e-5, axis, act, slope)
    assert_close(edx, tdx, rtol=1e-5, atol=1e-6, what="eval dx")
    assert_close(edw, tdw, rtol=1e-4, atol=1e-5 * n ** 0.5, what="eval dweight")
    assert_close(edb, tdb, rtol=1e-4, atol=1e-5 * n ** 0.5, what="eval dbias")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nhwc_axis", "strided"])
def test_native_backend_runs_every_dtype_and_layout_like_the_composite(dtype, layout):
    torch.manual_seed(1)
    x = torch.randn(6, 5, 4, 3, dtype=torch.float64) * 2 + 0.5
    axis = 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "nhwc_axis":
        x, axis = x.permute(0, 2, 3, 1).contiguous(), 3
    elif layout == "strided":
        x = torch.randn(6, 5, 8, 3, dtype=torch.float64)[:, :, ::2]
    x = x.to(dtype)
    c = x.shape[axis]
    w, b = torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 8e-2}[dtype]
    y, m, v = N.train_forward(x, w, b, 1e-5, axis, "relu", 0.0)
    ry, rm, rv = kernels.torch_backend.train_forward(x, w, b, 1e-5, axis, "relu", 0.0)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ry, rtol=tol, atol=tol, what=f"{dtype} {layout} y")
    assert_close(v, rv, rtol=max(tol, 1e-6), atol=tol, what="var")
    dy = torch.randn_like(x)
    got = N.backward(dy, x, y, w, b, m, v, 1e-5, axis, "relu", 0.0)
    want = kernels.torch_backend.backward(dy, x, ry, w, b, rm, rv, 1e-5, axis, "relu", 0.0)
    for g, r, name in zip(got, want, ("dx", "dw", "db")):
        assert g.dtype == r.dtype
        if dtype in (torch.float64, torch.float32):  # (half: relu masks may differ at rounding ties)
            assert_close(g, r, rtol=tol * 10, atol=tol * 10, what=f"{dtype} {layout} {name}")


def _ops_in_a_step(backend: str, x: torch.Tensor) -> int:
    m = batchnorm.BatchNormAct2d(x.shape[1], running_var_unbiased=False)  # the functional path
    xg = x.clone().requires_grad_()
    acts = [torch.profiler.ProfilerActivity.CPU]
    with kernels.use_backend(backend), torch.profiler.profile(activities=acts) as prof:
        m(xg).sum().backward()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def test_native_backend_runs_fewer_ops_per_step_than_the_composite():
    x = torch.randn(8, 4, 5, 5)
    native, composite = _ops_in_a_step("native", x), _ops_in_a_step("torch", x)
    assert native < composite, (native, composite)


def test_auto_sends_small_inputs_to_native_and_backend_for_says_so():
    small = torch.randn(8, 16, 4, 4)
    assert small.numel() < kernels.NATIVE_BELOW["train"]
    assert batchnorm.backend_for(small) == "native"
    assert batchnorm.backend_for(small, training=False) == "native"
    assert batchnorm.backend_for(torch.randn(4, 3).to(torch.bfloat16)) == "native"
    with batchnorm.use_backend("torch"):
        assert batchnorm.backend_for(small) == "torch"
    with batchnorm.use_backend("native"):
        assert batchnorm.backend_for(torch.randn(64, 64, 64, 64)[:, :, ::2]) == "native"
    assert "native" in kernels.available_backends()


def test_auto_hands_an_input_back_to_native_below_its_layouts_crossover():
    pytest.importorskip("numba")
    from batchnorm.kernels import cpu

    assert set(cpu.CROSSOVER) == {(m, k, a) for m in ("train", "eval") for k in ("ncl", "mc")
                                  for a in (False, True)}
    for mode in ("train", "eval"):  # the global floor is below every layout's crossover
        assert kernels.NATIVE_BELOW[mode] <= min(v for (m, _, _), v in cpu.CROSSOVER.items() if m == mode)
    n = cpu.CROSSOVER["train", "ncl", False]
    nchw = torch.randn(n // (64 * 256), 64, 16, 16)
    with kernels.use_backend("numba"):  # compiles the kernels here if this process has not yet
        batchnorm.BatchNorm2d(64)(nchw)
    assert batchnorm.backend_for(nchw) == "numba"
    assert batchnorm.backend_for(nchw[: nchw.shape[0] // 2]) == "native"  # below the crossover
    nhwc = nchw.contiguous(memory_format=torch.channels_last)
    assert nhwc.numel() < cpu.CROSSOVER["train", "mc", False]
    with kernels.use_backend("numba"):
        batchnorm.BatchNorm2d(64)(nhwc)
    assert batchnorm.backend_for(nhwc) == "native"  # the same size in (M, C) memory: torch's wins
    big = torch.randn(cpu.CROSSOVER["train", "mc", False] // 256, 256)
    with kernels.use_backend("numba"):
        batchnorm.BatchNorm1d(256)(big)
    assert batchnorm.backend_for(big) == "numba"
    assert batchnorm.backend_for(big, training=False) == "numba"
    assert batchnorm.backend_for(big[: big.shape[0] // 2], training=False) == "native"
    # with a fused activation torch needs a second pass: ours wins earlier in eval (ncl)
    ev = torch.randn(cpu.CROSSOVER["eval", "ncl", True] // (64 * 256), 64, 16, 16)
    assert batchnorm.backend_for(ev, activation="relu", training=False) == "numba"
    assert batchnorm.backend_for(ev, training=False) == "native"


@pytest.mark.parametrize("cls,shape,act", [(batchnorm.BatchNorm1d, (60, 30), None),
                                           (batchnorm.BatchNorm2d, (8, 16, 8, 8), None),
                                           (batchnorm.BatchNormAct2d, (8, 16, 4, 4), nn.ReLU)])
def test_modules_on_the_native_path_are_torch_bit_for_bit(cls, shape, act):
    torch.manual_seed(2)
    ours = cls(shape[1], momentum=None)
    theirs = getattr(nn, cls.__name__.replace("Act", ""))(shape[1], momentum=None)
    assert batchnorm.backend_for(torch.randn(shape)) == "native"
    for step in range(3):
        train = step != 1
        ours.train(train)
        theirs.train(train)
        x = torch.randn(shape) * 2 + 1
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo = ours(xo)
        yt = theirs(xt)
        if act is not None:
            yt = act()(yt)
        assert torch.equal(yo, yt)
        dy = torch.randn(shape)
        yo.backward(dy)
        yt.backward(dy)
        assert torch.equal(xo.grad, xt.grad) and torch.equal(ours.weight.grad, theirs.weight.grad)
        for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), k


def test_eval_with_ill_conditioned_running_statistics_keeps_our_accuracy():
    # running mean 1e4 with std 1: torch's folded eval normalisation would be 6e-4 off; ours is not
    m = batchnorm.BatchNorm2d(4).eval()
    with torch.no_grad():
        m.running_mean.fill_(1e4)
        m.running_var.fill_(1.0)
    x = (torch.randn(8, 4, 3, 3, dtype=torch.float64) + 1e4).float()
    want = (x.double() - 1e4) / np.sqrt(1.0 + 1e-5)
    assert_close(m(x), want, rtol=1e-5, atol=1e-5, what="eval at running mean 1e4")
    with torch.no_grad():  # well conditioned again: the cached check follows the buffers' versions
        m.running_mean.zero_()
    assert_close(m(x - 1e4), (x.double() - 1e4) / np.sqrt(1.0 + 1e-5), rtol=1e-5, atol=1e-5, what="after")


@pytest.mark.parametrize("act", ["silu", "hardswish", "gelu", "gelu_tanh", "sigmoid", "tanh"])
def test_smooth_activations_on_small_inputs_are_applied_not_left_to_the_native_kernel(act):
    # torch's native kernel only has the activations it can apply in place and differentiate from y;
    # a small input with a smooth activation must not go there and come back without its activation
    from batchnorm.kernels import native_backend, select, torch_backend

    x = torch.randn(8, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert select(x, 1, act) is not native_backend
    layer = batchnorm.BatchNormAct2d(4, activation=act).double()
    y = layer(x)
    z = torch.nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.1, layer.eps)
    ref = torch_backend.act_forward(z, act, 0.0)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gx, = torch.autograd.grad(y.sum(), x)
    gref, = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(gx, gref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("act,torch_act", [("silu", nn.SiLU), ("hardswish", nn.Hardswish)])
def test_smooth_activations_run_torchs_ops_through_the_modules_at_every_size(act, torch_act):
    """Our numba kernels for the smooth activations are slower than torch's batch_norm + its activation
    op (benchmarks/crossover.py --acts silu), so under auto the modules take torch's ops for them, even
    above the crossovers: the same bits as torch.nn, forward and backward."""
    torch.manual_seed(5)
    x = torch.randn(32, 64, 16, 16)  # numba's crossover for relu lies at this size
    ours, theirs = batchnorm.BatchNormAct2d(64, activation=act), nn.BatchNorm2d(64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), torch_act()(theirs(xb))
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(xa.grad, xb.grad) and torch.equal(ours.weight.grad, theirs.weight.grad)
    assert torch.equal(ours.running_var, theirs.running_var)
    with kernels.use_backend("numba"):  # forced: our kernels, to the same numbers up to rounding
        yn = ours(x)
    assert (yn - torch_act()(theirs(x))).abs().max() < 1e-4


# -- the modules' fast path -------------------------------------------------------------------
# ``_BatchNorm._forward_fast`` accepts the common small call after a few checks; for anything else it
# must return None (having written nothing) and leave the general path to check and dispatch. The
# property: whatever it accepts, the general path would have accepted and sent to the native kernel,
# with the same output and state.

_FAST_CLASSES = {1: batchnorm.BatchNorm1d, 2: batchnorm.BatchNorm2d, 3: batchnorm.BatchNorm3d}


def _mostly(common, *rare):
    """``common`` four times in five (so that most cases reach the fast path), else one of ``rare``."""
    return st.sampled_from([common] * (4 * len(rare)) + list(rare))


@st.composite
def _fast_cases(draw):
    dim = draw(st.sampled_from([1, 2, 3]))
    c = draw(st.integers(1, 5))
    rank = draw(_mostly({1: 2, 2: 4, 3: 5}[dim], 3))  # 3-D: right for BatchNorm1d only
    shape = [draw(_mostly(4, 0, 1, 2))] + [draw(_mostly(c, c + 1))] + [
        draw(st.integers(1, 3)) for _ in range(rank - 2)]
    kw = dict(
        momentum=draw(_mostly(0.1, None, 1.0, 1.5)),
        eps=draw(_mostly(1e-5, 0.0)),
        affine=draw(st.booleans()),
        track_running_stats=draw(_mostly(True, False)),
        channel_axis=draw(_mostly(1, -1)),
        running_var_unbiased=draw(_mostly(True, False)),
        nonfinite=draw(_mostly("update", "skip")),
        activation=draw(_mostly("identity", "relu", "leaky_relu", "elu", "silu")),
    )
    return dict(cls=_FAST_CLASSES[dim], c=c, shape=shape, kw=kw, training=draw(st.booleans()),
                dtype=draw(_mostly(torch.float32, torch.float64, torch.float16)),
                param_dtype=draw(_mostly(None, torch.float64)),
                channels_last=draw(st.booleans()), backend=draw(_mostly("auto", "native", "torch")))


def _outcome(m, x):
    try:
        with torch.no_grad():
            return m(x.clone())
    except (ValueError, TypeError, RuntimeError) as e:
        return type(e)


@settings(max_examples=400)  # (cheap examples; the rarer flag combinations need many)
@given(_fast_cases())
def test_the_fast_path_accepts_only_what_the_general_path_sends_to_native(case):
    m = case["cls"](case["c"], **case["kw"]).train(case["training"])
    if case["param_dtype"] is not None:
        m = m.to(case["param_dtype"])
    with torch.no_grad():
        for t in m.state_dict().values():
            if t.is_floating_point():
                t.uniform_(0.5, 1.5)
    x = torch.randn(case["shape"]).to(case["dtype"])
    if case["channels_last"] and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    general = copy.deepcopy(m)
    general._forward_fast = lambda x: None  # (an instance attribute: this copy runs the general path only)
    with kernels.use_backend(case["backend"]), torch.no_grad():
        y = m._forward_fast(x.clone())
        if y is None:
            for k, v in m.state_dict().items():
                assert torch.equal(v, before[k]), f"the fast path declined but wrote {k}"
            return
        m.load_state_dict(before)
        axis = m.channel_axis % x.ndim
        batch_stats = m.training or m.running_mean is None
        assert axis == 1 and general._runs_native(x, axis, batch_stats), "accepted what native does not run"
        ours, theirs = _outcome(m, x), _outcome(general, x)
        assert isinstance(ours, torch.Tensor) and isinstance(theirs, torch.Tensor), (ours, theirs)
        assert torch.equal(ours, theirs)
    for (k, a), b in zip(m.state_dict().items(), general.state_dict().values()):
        assert torch.equal(a, b), k


# -- the conditioning check ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mean,var,eps", [
    ([1.0, 2.0], [1.0, 1.0], 1e-5), ([100.0, 0.0], [1.0, 1.0], 1e-5), ([1.0, float("nan")], [1.0, 1.0], 1e-5),
    ([1.0, 1.0], [0.0, -1.0], 0.0), ([1e3, 0.0], [0.0, 0.0], 0.0), ([0.0, 0.0], [0.0, 0.0], 0.0)])
def test_ill_conditioned_answers_as_the_torch_formula(dtype, mean, var, eps):
    m, v = torch.tensor(mean, dtype=dtype), torch.tensor(var, dtype=dtype)
    want = bool((m.abs() * torch.rsqrt(v + eps)).max() > N.MAX_SHIFT)
    with np.errstate(all="raise"):  # (and no NumPy warning on the way)
        assert N.ill_conditioned(m, v, eps) == want
        assert N.ill_conditioned(m, v, eps) == want  # cached


def test_ill_conditioned_cache_follows_writes_and_never_answers_for_another_tensor():
    m, v = torch.zeros(3), torch.ones(3)
    assert not N.ill_conditioned(m, v, 1e-5)
    m.fill_(1e3)  # an in-place write bumps the version: asked again
    assert N.ill_conditioned(m, v, 1e-5)
    v.fill_(1e6)
    assert not N.ill_conditioned(m, v, 1e-5)
    v.zero_()
    assert N.ill_conditioned(m, v, 1.0) and not N.ill_conditioned(m, v, 1e6)  # the eps is part of the key
    for i in range(200):  # freed tensors' ids get reused: a new tensor must not inherit an old answer
        a = torch.full((3,), 1e3 if i % 2 else 0.0)
        assert N.ill_conditioned(a, torch.ones(3), 1e-5) == bool(i % 2)
        del a
    with torch.inference_mode():  # no version counter: computed each time
        mi, vi = torch.full((3,), 1e3), torch.ones(3)
        assert N.ill_conditioned(mi, vi, 1e-5)
