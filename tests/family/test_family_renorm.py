"""Batch Renormalization: forward/backward against the paper's formulas in float64, gradcheck, the BN
special case, the warm-up schedule, state_dict compatibility with torch, and argument errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from helpers.core_util import assert_empty_batch_changes_nothing
from helpers.family_ref import renorm_backward, renorm_forward, renorm_rd
from helpers.util import assert_close
from hypothesis import given
from hypothesis import strategies as st

from batchnorm import reference as ref
from batchnorm.core import functional as F
from batchnorm.core.modules import BatchNorm2d
from batchnorm.family.renorm import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    RenormSchedule,
    _effective_affine,
    batch_renorm_train,
    renorm_factors,
)
from batchnorm.kernels import available_backends, use_backend

D = torch.float64


def _case(shape, axis=1, dtype=D, affine=True, shift=1.5, scale=2.0):
    x = torch.randn(*shape, dtype=dtype) * scale + shift
    c = shape[axis]
    rm = torch.randn(c, dtype=dtype) * 0.5
    rv = torch.rand(c, dtype=dtype) * 3 + 0.2
    w = torch.randn(c, dtype=dtype) if affine else None
    b = torch.randn(c, dtype=dtype) if affine else None
    return x, rm, rv, w, b


def _np(t):
    return None if t is None else t.detach().to(D).numpy()


# -- forward / running statistics against the paper ----------------------------------------------

@pytest.mark.parametrize("shape,axis", [((7, 3), 1), ((5, 4, 6), 1), ((4, 3, 5, 5), 1), ((3, 5, 5, 4), -1),
                                        ((2, 3, 3, 4, 4), 1)])
@pytest.mark.parametrize("r_max,d_max", [(1.5, 0.3), (3.0, 5.0), (math.inf, math.inf), (1.0, 0.0)])
@pytest.mark.parametrize("affine", [True, False])
def test_forward_and_running_stats_match_paper(shape, axis, r_max, d_max, affine):
    x, rm, rv, w, b = _case(shape, axis, affine=affine)
    nbt = torch.tensor(7)
    y, new = batch_renorm_train(x, rm, rv, w, b, r_max=r_max, d_max=d_max, momentum=0.2, eps=1e-3,
                                num_batches_tracked=nbt, channel_axis=axis)
    ey, _, _ = renorm_forward(_np(x), _np(rm), _np(rv), _np(w), _np(b), 1e-3, r_max, d_max, axis)
    assert_close(y, ey, rtol=1e-12, atol=1e-12, what="renorm forward")
    mu_b, var_b = ref.moments(_np(x), axis)
    em, ev, enbt = ref.update_running_stats(_np(rm), _np(rv), mu_b, var_b, x.numel() // x.shape[axis], 0.2, 7)
    assert_close(new.mean, em, what="running_mean (updated as BN)")
    assert_close(new.var, ev, what="running_var (updated as BN)")
    assert int(new.num_batches_tracked) == enbt == 8


def test_clipping_is_active_in_the_cases_above():
    # The forward test is only meaningful if some cases really clip: check that they do.
    x, rm, rv, _, _ = _case((4, 3, 5, 5))
    r, d = renorm_rd(_np(x), _np(rm), _np(rv), 1e-3, math.inf, math.inf)
    rc, dc = renorm_rd(_np(x), _np(rm), _np(rv), 1e-3, 1.5, 0.3)
    assert (np.abs(r - rc) > 1e-3).any() and (np.abs(d - dc) > 1e-3).any()
    tr, td = renorm_factors(*(torch.from_numpy(v) for v in ref.moments(_np(x))), rm, rv, eps=1e-3,
                            r_max=1.5, d_max=0.3)
    assert_close(tr, rc, what="r")
    assert_close(td, dc, what="d")
    assert not tr.requires_grad and not td.requires_grad


def test_unclipped_training_output_equals_inference_output():
    # The point of Batch Renorm: with r and d unclipped, x̂ r + d = (x − μ)/σ, i.e. train == eval.
    layer = BatchRenorm2d(4, r_max=math.inf, d_max=math.inf, momentum=0.3).double()
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(4, dtype=D))
        layer.running_var.copy_(torch.rand(4, dtype=D) + 0.5)
        layer.weight.copy_(torch.randn(4, dtype=D))
        layer.bias.copy_(torch.randn(4, dtype=D))
    x = torch.randn(6, 4, 3, 3, dtype=D) * 3 + 1
    y_eval = layer.eval()(x)
    y_train = layer.train()(x)
    assert_close(y_train, y_eval, rtol=1e-12, atol=1e-12, what="unclipped renorm train vs eval")


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "elu"])
def test_fused_activation_forward_and_backward(act):
    x, rm, rv, w, b = _case((6, 3, 4, 4))
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    y, _ = batch_renorm_train(x, rm, rv, w, b, r_max=2.0, d_max=0.5, eps=1e-4, activation=act,
                              negative_slope=0.2)
    ey, _, _ = renorm_forward(_np(x), _np(rm), _np(rv), _np(w), _np(b), 1e-4, 2.0, 0.5, 1, act, 0.2)
    assert_close(y, ey, rtol=1e-12, atol=1e-12, what=f"renorm+{act} forward")
    dy = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    edx, edw, edb = renorm_backward(_np(dy), _np(x), _np(rm), _np(rv), _np(w), _np(b), 1e-4, 2.0, 0.5, 1,
                                    act, 0.2)
    assert_close(dx, edx, rtol=1e-9, atol=1e-11, what="dx")
    assert_close(dw, edw, rtol=1e-9, atol=1e-11, what="dgamma")
    assert_close(db, edb, rtol=1e-9, atol=1e-11, what="dbeta")


# -- gradients -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((6, 3), 1), ((4, 3, 5), 1), ((3, 4, 4, 3), -1)])
@pytest.mark.parametrize("r_max,d_max", [(math.inf, math.inf), (2.0, 0.5), (1.2, 0.1)])
def test_backward_matches_paper_formulas(shape, axis, r_max, d_max):
    # Includes the unclipped regime, where stopping the gradient through r and d makes the gradient
    # differ from the derivative of the forward: only the paper's formulas can check it there.
    x, rm, rv, w, b = _case(shape, axis)
    for t in (x, w, b):
        t.requires_grad_(True)
    y, _ = batch_renorm_train(x, rm, rv, w, b, r_max=r_max, d_max=d_max, eps=1e-3, channel_axis=axis)
    dy = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    edx, edw, edb = renorm_backward(_np(dy), _np(x), _np(rm), _np(rv), _np(w), _np(b), 1e-3, r_max, d_max,
                                    axis)
    assert_close(dx, edx, rtol=1e-9, atol=1e-11, what="dx")
    assert_close(dw, edw, rtol=1e-9, atol=1e-11, what="dgamma = Σ dy (x̂ r + d)")
    assert_close(db, edb, rtol=1e-9, atol=1e-11, what="dbeta")


def test_backward_is_not_the_derivative_when_unclipped():
    # Sanity for the test above: with r, d unclipped the stop-gradient really changes dx (else the
    # paper's formulas and plain autograd could not be told apart).
    x, rm, rv, w, b = _case((6, 3))
    x.requires_grad_(True)
    y, _ = batch_renorm_train(x, rm, rv, w, b, r_max=math.inf, d_max=math.inf)
    dx = torch.autograd.grad(y.pow(2).sum(), x)[0]
    sigma = torch.sqrt(rv + 1e-5)
    y_true = w * (x - rm) / sigma + b  # what the forward equals, as a function of x
    dx_true = torch.autograd.grad(y_true.pow(2).sum(), x)[0]
    assert (dx - dx_true).abs().max() > 1e-3


@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_with_constant_r_d(affine):
    # The implementation (BN op with weight γr and bias γd + β) for arbitrary constant r, d.
    x, _, _, w, b = _case((5, 2, 3), affine=affine)
    r = torch.rand(2, dtype=D) + 0.5
    d = torch.randn(2, dtype=D)
    inputs = [x.requires_grad_(True)]
    if affine:
        inputs += [w.requires_grad_(True), b.requires_grad_(True)]

    def fn(x, *wb):
        we, be = _effective_affine(wb[0] if wb else None, wb[1] if wb else None, r, d)
        return F.batch_norm_train(x, None, None, we, be, eps=1e-3)[0]

    assert torch.autograd.gradcheck(fn, tuple(inputs))
    assert torch.autograd.gradgradcheck(fn, tuple(inputs), fast_mode=True)


def test_gradcheck_of_public_function_when_clipped():
    # With every r and d saturated they are locally constant, so the stop-gradient is the true
    # derivative and gradcheck applies to the public function as is.
    x = torch.randn(6, 3, 2, 2, dtype=D) * 0.1 + 4.0       # σ_B ≈ 0.1, μ_B ≈ 4
    rm, rv = torch.zeros(3, dtype=D), torch.full((3,), 4.0, dtype=D)  # σ = 2
    w, b = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    r, d = renorm_factors(*F.moments(x, axes=[0, 2, 3]), rm, rv, r_max=3.0, d_max=0.5)
    assert_close(r, torch.full((3,), 1 / 3, dtype=D), what="r saturated at 1/r_max")
    assert_close(d, torch.full((3,), 0.5, dtype=D), what="d saturated at d_max")

    def fn(x, w, b):
        return batch_renorm_train(x, rm, rv, w, b, r_max=3.0, d_max=0.5)[0]

    inputs = (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True))
    assert torch.autograd.gradcheck(fn, inputs)


# -- the BN special case, eval, float32 --------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None])
def test_r_max_1_d_max_0_is_plain_bn_exactly(momentum):
    # (bit for bit on one backend: under auto the plain layer would run torch's own layer code here)
    with use_backend("numba"):
        _r_max_1_d_max_0_is_plain_bn_exactly(momentum)


def _r_max_1_d_max_0_is_plain_bn_exactly(momentum):
    x = torch.randn(5, 4, 3, 3) * 2 + 1
    bn = BatchNorm2d(4, momentum=momentum)
    rn = BatchRenorm2d(4, momentum=momentum, r_max=1.0, d_max=0.0)
    with torch.no_grad():
        for layer in (bn, rn):
            layer.weight.copy_(torch.linspace(-1.5, 2.0, 4))
            layer.bias.copy_(torch.linspace(0.5, -0.5, 4))
            layer.running_mean.copy_(torch.tensor([3.0, -2.0, 0.5, 0.0]))
    for step in range(3):
        xb = (x * (step + 1)).requires_grad_(True)
        xr = xb.detach().clone().requires_grad_(True)
        yb, yr = bn(xb), rn(xr)
        assert torch.equal(yb, yr), f"step {step}: output differs"
        dy = torch.randn_like(yb)
        yb.backward(dy)
        yr.backward(dy)
        assert torch.equal(xb.grad, xr.grad)
    assert torch.equal(bn.weight.grad, rn.weight.grad) and torch.equal(bn.bias.grad, rn.bias.grad)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, rn.state_dict()[k]), k


def test_warmup_schedule_is_plain_bn_then_relaxes():
    sched = RenormSchedule(warmup_steps=2, r_max=3.0, d_max=5.0, r_max_steps=6, d_max_steps=4)
    bn, rn = BatchNorm2d(3), BatchRenorm2d(3, schedule=sched)
    seen = []
    for _step in range(6):
        x = torch.randn(4, 3, 2, 2) * 3 + 5
        seen.append(rn.current_limits())
        yb, yr = bn(x), rn(x)
        if len(seen) <= 3:  # steps 0, 1, 2: r_max = 1, d_max = 0
            assert torch.equal(yb, yr)
    assert seen == [(1.0, 0.0), (1.0, 0.0), (1.0, 0.0), (1.5, 2.5), (2.0, 5.0), (2.5, 5.0)]
    assert not torch.allclose(yb, yr, atol=1e-3)  # relaxed: the correction is active
    assert int(rn.num_batches_tracked) == 6


def test_schedule_shape():
    s = RenormSchedule()  # the paper's numbers
    assert s(0) == (1.0, 0.0) and s(5000) == (1.0, 0.0)
    assert s(40000) == (3.0, 5.0) and s(10**6) == (3.0, 5.0)
    assert s(25000)[1] == 5.0 and s(25000)[0] == pytest.approx(1 + 2 * 20000 / 35000)
    assert s(15000) == pytest.approx((1 + 2 * 10000 / 35000, 5 * 10000 / 20000))
    r = [s(t)[0] for t in range(0, 45000, 500)]
    assert all(a <= b for a, b in itertools.pairwise(r))
    assert RenormSchedule(warmup_steps=3, r_max_steps=3, d_max_steps=3)(3) == (1.0, 0.0)
    assert RenormSchedule(warmup_steps=3, r_max_steps=3, d_max_steps=3)(4) == (3.0, 5.0)


def test_schedule_step_comes_from_checkpoint_num_batches_tracked():
    src = torch.nn.BatchNorm2d(3)
    src.num_batches_tracked.fill_(30000)
    rn = BatchRenorm2d(3)  # paper schedule
    rn.load_state_dict(src.state_dict())
    assert rn.current_limits() == RenormSchedule()(30000)
    assert BatchRenorm2d(3, r_max=2.0).current_limits() == (2.0, 0.0)  # d_max follows the schedule


def test_eval_is_bn_with_running_stats():
    rn = BatchRenorm2d(3, r_max=2.0, d_max=1.0)
    for _ in range(3):
        rn(torch.randn(4, 3, 5, 5) * 2 + 1)
    bn = BatchNorm2d(3)
    bn.load_state_dict(rn.state_dict())
    x = torch.randn(2, 3, 5, 5)
    before = {k: v.clone() for k, v in rn.state_dict().items()}
    assert torch.equal(rn.eval()(x), bn.eval()(x))
    for k, v in rn.state_dict().items():
        assert torch.equal(v, before[k]), f"eval changed {k}"


def test_without_running_stats_is_plain_bn():
    x = torch.randn(6, 3, 4)
    rn = BatchRenorm1d(3, track_running_stats=False, r_max=2.0, d_max=1.0)
    bn = torch.nn.BatchNorm1d(3, track_running_stats=False)
    assert_close(rn(x), bn(x), rtol=1e-5, atol=1e-6, what="train, untracked")
    assert_close(rn.eval()(x), bn.eval()(x), rtol=1e-5, atol=1e-6, what="eval, untracked")


@pytest.mark.parametrize("cls,shape", [(BatchRenorm1d, (16, 5)), (BatchRenorm2d, (4, 5, 6, 6)),
                                       (BatchRenorm3d, (2, 5, 3, 4, 4))])
def test_float32_module_matches_float64_reference(cls, shape):
    layer = cls(5, r_max=1.7, d_max=0.4, momentum=0.25)
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(5))
        layer.running_var.copy_(torch.rand(5) + 0.5)
        layer.weight.copy_(torch.randn(5))
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(*shape) * 3 + 2
    y = layer(x)
    ey, _, _ = renorm_forward(_np(x), _np(rm), _np(rv), _np(layer.weight), _np(layer.bias), 1e-5, 1.7, 0.4)
    assert_close(y, ey, rtol=1e-4, atol=1e-5, what="float32 forward")
    mu_b, var_b = ref.moments(_np(x))
    em, ev, _ = ref.update_running_stats(_np(rm), _np(rv), mu_b, var_b, x.numel() // 5, 0.25, 0)
    assert_close(layer.running_mean, em, rtol=1e-5, atol=1e-6, what="running_mean")
    assert_close(layer.running_var, ev, rtol=1e-5, atol=1e-6, what="running_var")


@given(n=st.integers(2, 6), c=st.integers(1, 4), l=st.integers(1, 4),
       r_max=st.floats(1.0, 4.0), d_max=st.floats(0.0, 3.0), seed=st.integers(0, 2**16))
def test_property_forward_and_grad_vs_paper(n, c, l, r_max, d_max, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, l, generator=g, dtype=D) * 2 + 1).requires_grad_(True)
    rm, rv = torch.randn(c, generator=g, dtype=D), torch.rand(c, generator=g, dtype=D) + 0.1
    w = torch.randn(c, generator=g, dtype=D).requires_grad_(True)
    b = torch.randn(c, generator=g, dtype=D).requires_grad_(True)
    y, _ = batch_renorm_train(x, rm, rv, w, b, r_max=r_max, d_max=d_max, eps=1e-3)
    ey, _, _ = renorm_forward(_np(x), _np(rm), _np(rv), _np(w), _np(b), 1e-3, r_max, d_max)
    assert_close(y, ey, rtol=1e-10, atol=1e-10, what="forward")
    dy = torch.randn(y.shape, generator=g, dtype=D)
    got = torch.autograd.grad(y, (x, w, b), dy)
    exp = renorm_backward(_np(dy), _np(x), _np(rm), _np(rv), _np(w), _np(b), 1e-3, r_max, d_max)
    for a, e, name in zip(got, exp, ("dx", "dgamma", "dbeta")):
        assert_close(a, e, rtol=1e-8, atol=1e-9, what=name)


# -- checkpoints ---------------------------------------------------------------------------------

def test_state_dict_round_trip_with_torch_batchnorm2d():
    src = torch.nn.BatchNorm2d(4)
    src(torch.randn(8, 4, 3, 3) * 2 + 1)
    with torch.no_grad():
        src.weight.mul_(1.5)
        src.bias.add_(0.3)
    rn = BatchRenorm2d(4, r_max=3.0, d_max=5.0)
    assert set(rn.state_dict()) == set(src.state_dict())
    rn.load_state_dict(src.state_dict())
    x = torch.randn(2, 4, 3, 3)
    assert_close(rn.eval()(x), src.eval()(x), rtol=1e-5, atol=1e-6, what="eval after load")
    rn.train()(torch.randn(8, 4, 3, 3))  # train a step, then load back into torch
    back = torch.nn.BatchNorm2d(4)
    back.load_state_dict(rn.state_dict())
    for k, v in rn.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert int(back.num_batches_tracked) == 2


# -- bad arguments ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    ({"r_max": 0.5}, "r_max to be a number >= 1"),
    ({"r_max": float("nan")}, "r_max"),
    ({"r_max": True}, "r_max"),
    ({"r_max": "3"}, "r_max"),
    ({"d_max": -0.1}, "d_max to be a number >= 0"),
    ({"d_max": float("nan")}, "d_max"),
    ({"d_max": None}, "d_max"),
])
def test_functional_rejects_bad_limits_and_changes_nothing(kw, match):
    x, rm, rv, w, b = _case((4, 3))
    nbt = torch.tensor(3)
    saved = [t.clone() for t in (x, rm, rv, w, b, nbt)]
    args = {"r_max": 2.0, "d_max": 1.0, **kw}
    with pytest.raises(ValueError, match=match) as e:
        batch_renorm_train(x, rm, rv, w, b, num_batches_tracked=nbt, **args)
    assert "batchnorm.batch_renorm_train" in str(e.value) and "got" in str(e.value)
    for t, s in zip((x, rm, rv, w, b, nbt), saved):
        assert torch.equal(t, s)


def test_functional_requires_running_stats():
    with pytest.raises(TypeError, match="running_mean and running_var are required"):
        batch_renorm_train(torch.randn(4, 3), None, None)


@pytest.mark.parametrize("kw,err,match", [
    ({"r_max": 0.9}, ValueError, "r_max"),
    ({"d_max": -1}, ValueError, "d_max"),
    ({"schedule": (1, 2)}, TypeError, "RenormSchedule"),
    ({"r_max": 2.0, "d_max": 1.0, "schedule": RenormSchedule()}, ValueError, "not both"),
    ({"momentum": 2.0}, ValueError, "momentum"),
])
def test_module_rejects_bad_arguments(kw, err, match):
    with pytest.raises(err, match=match) as e:
        BatchRenorm2d(3, **kw)
    assert "BatchRenorm2d" in str(e.value)


@pytest.mark.parametrize("kw,match", [
    ({"warmup_steps": -1}, "warmup_steps"), ({"warmup_steps": 1.5}, "warmup_steps"),
    ({"r_max": 0.5}, "r_max"), ({"d_max": -2.0}, "d_max"), ({"r_max": math.inf}, "finite"),
    ({"warmup_steps": 100, "r_max_steps": 50}, "r_max_steps >= warmup_steps"),
    ({"d_max_steps": True}, "d_max_steps"),
])
def test_schedule_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        RenormSchedule(**kw)


def test_module_rejects_bad_input_and_keeps_state():
    rn = BatchRenorm2d(3, r_max=2.0, d_max=1.0)
    rn(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in rn.state_dict().items()}
    bads = ((torch.randn(4, 3, 2), ValueError), (torch.randn(4, 5, 2, 2), ValueError),
            (torch.randn(1, 3, 1, 1), ValueError), (torch.ones(4, 3, 2, 2, dtype=torch.long), TypeError))
    for bad, err in bads:
        with pytest.raises(err, match="BatchRenorm2d"):
            rn(bad)
    for k, v in rn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_nonfinite_skip_and_raise_leave_state():
    rn = BatchRenorm1d(3, r_max=2.0, d_max=1.0, nonfinite="skip")
    x = torch.randn(5, 3)
    x[0, 1] = float("nan")
    before = {k: v.clone() for k, v in rn.state_dict().items()}
    rn(x)
    for k, v in rn.state_dict().items():
        assert torch.equal(v, before[k]), k
    rn.nonfinite = "raise"
    with pytest.raises(FloatingPointError):
        rn(x)
    for k, v in rn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_repr_names_the_limits():
    assert "r_max=2.0, d_max=1.0" in repr(BatchRenorm2d(3, r_max=2.0, d_max=1.0))
    assert "schedule=RenormSchedule(" in repr(BatchRenorm2d(3))


def test_tracking_switched_off_after_construction_is_bn_without_update():
    # torch's rule: buffers kept, track_running_stats=False -> batch statistics, no update in training.
    rn = BatchRenorm2d(3, r_max=2.0, d_max=1.0)
    with torch.no_grad():
        rn.running_mean.fill_(5.0)
    rn.track_running_stats = False
    before = {k: v.clone() for k, v in rn.state_dict().items()}
    x = torch.randn(4, 3, 2, 2)
    assert_close(rn(x), torch.nn.functional.batch_norm(x, None, None, rn.weight, rn.bias, training=True),
                 rtol=1e-5, atol=1e-6, what="plain BN")
    for k, v in rn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_limits_changed_after_construction_are_checked_at_call_time():
    rn = BatchRenorm2d(3, r_max=2.0, d_max=1.0)
    rn(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in rn.state_dict().items()}
    for attr, value in (("r_max", 0.5), ("d_max", -1.0)):
        good = getattr(rn, attr)
        setattr(rn, attr, value)
        with pytest.raises(ValueError, match=attr):
            rn(torch.randn(4, 3, 2, 2))
        setattr(rn, attr, good)
    for k, v in rn.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("backend", available_backends())
def test_every_backend_matches_paper(backend):
    # r and d come from the selected backend's own statistics pass; every backend must agree.
    x, rm, rv, w, b = _case((6, 3, 4, 4))
    for t in (x, w, b):
        t.requires_grad_(True)
    with use_backend(backend):
        y, new = batch_renorm_train(x, rm, rv, w, b, r_max=1.5, d_max=0.3, eps=1e-3, activation="relu")
        dy = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, w, b), dy)
    ey, _, _ = renorm_forward(_np(x), _np(rm), _np(rv), _np(w), _np(b), 1e-3, 1.5, 0.3, 1, "relu")
    assert_close(y, ey, rtol=1e-11, atol=1e-11, what=f"{backend} forward")
    exp = renorm_backward(_np(dy), _np(x), _np(rm), _np(rv), _np(w), _np(b), 1e-3, 1.5, 0.3, 1, "relu")
    for a, e, name in zip(got, exp, ("dx", "dgamma", "dbeta")):
        assert_close(a, e, rtol=1e-9, atol=1e-10, what=f"{backend} {name}")
    mu_b, var_b = ref.moments(_np(x))
    em, ev, _ = ref.update_running_stats(_np(rm), _np(rv), mu_b, var_b, x.numel() // 3, 0.1, 0)
    assert_close(new.mean, em, rtol=1e-12, atol=1e-12, what="running_mean")
    assert_close(new.var, ev, rtol=1e-12, atol=1e-12, what="running_var")


# ---------------------------------------------------------------- empty batch (N = 0), as BatchNorm*
# (assert_empty_batch_changes_nothing: tests/helpers/core_util.py)


@pytest.mark.parametrize("cls,shape", [(BatchRenorm1d, (0, 3)), (BatchRenorm1d, (0, 3, 5)),
                                       (BatchRenorm2d, (0, 3, 4, 4)), (BatchRenorm3d, (0, 3, 2, 2, 2))])
@pytest.mark.parametrize("training", [True, False])
def test_renorm_empty_batch_changes_nothing(cls, shape, training):
    layer = cls(3, r_max=2.0, d_max=1.0, activation="relu")
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        layer.num_batches_tracked.fill_(7)
    layer.train(training)
    assert_empty_batch_changes_nothing(layer, shape)


def test_renorm_empty_batch_keeps_schedule_step():
    layer = BatchRenorm2d(3)  # the default schedule reads num_batches_tracked
    before = layer.current_limits()
    layer(torch.randn(0, 3, 2, 2))
    assert int(layer.num_batches_tracked) == 0 and layer.current_limits() == before


def test_renorm_empty_batch_still_checks_the_shape():
    with pytest.raises(ValueError, match="channels"):
        BatchRenorm2d(3)(torch.randn(0, 4, 2, 2))
