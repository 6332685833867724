"""Functional transforms over our layers: functional_call, vmap, grad, jacrev, jvp, batched gradcheck.

The story: ``torch.func`` code written for torch's BN runs unchanged on ours, with torch's numbers
(float64, to 1e-10), on every backend: where our kernels cannot run under a transform the layer
takes torch's path (``F.batch_norm``, or the composite ops for flags torch lacks), and the
backward of our autograd Function switches to the composite formulas when a transform batches it
(batched gradcheck, jacobians of a backward).
"""

from __future__ import annotations

import pytest
import torch
from helpers.util import assert_close
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

import batchnorm

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

D = torch.float64
BACKENDS = ["auto", "numba"]  # (under a transform every forced backend takes the same torch path)


def _pair(act="identity", slope=0.01, **kw):
    ours = (batchnorm.BatchNormAct1d(3, dtype=D, activation=act, negative_slope=slope, **kw)
            if act != "identity" else batchnorm.BatchNorm1d(3, dtype=D, **kw))
    theirs = nn.BatchNorm1d(3, dtype=D, **kw)
    with torch.no_grad():
        for m in (ours, theirs):
            if m.weight is not None:
                m.weight.copy_(torch.tensor([0.5, 1.5, -1.0], dtype=D))
                m.bias.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=D))
    post = {"identity": lambda y: y, "relu": torch.relu, "elu": lambda y: nn.functional.elu(y, slope)}[act]
    return ours, lambda x: post(theirs(x)), theirs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["identity", "relu", "elu"])
def test_vmap_after_replace_all_batch_norm_modules(backend, act):
    ours, ref, theirs = _pair(act, 0.7)
    torch.func.replace_all_batch_norm_modules_(ours)
    torch.func.replace_all_batch_norm_modules_(theirs)
    x = torch.randn(4, 6, 3, dtype=D)
    with batchnorm.use_backend(backend):
        got = vmap(ours)(x)
    assert_close(got, vmap(ref)(x), rtol=1e-10, atol=1e-10, what="vmap")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_with_track_running_stats_false_and_in_eval(backend):
    ours, ref, _ = _pair(track_running_stats=False)
    x = torch.randn(4, 6, 3, dtype=D)
    with batchnorm.use_backend(backend):
        assert_close(vmap(ours)(x), vmap(ref)(x), rtol=1e-10, atol=1e-10, what="vmap, no running stats")
    ours, ref, theirs = _pair("relu")
    ours.eval()
    theirs.eval()
    with batchnorm.use_backend(backend):
        assert_close(vmap(ours)(x), vmap(ref)(x), rtol=1e-10, atol=1e-10, what="vmap, eval")


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_call_grad_jacrev_and_vmap_of_grad(backend):
    ours, _, theirs = _pair("relu")
    torch.func.replace_all_batch_norm_modules_(ours)
    torch.func.replace_all_batch_norm_modules_(theirs)
    x = torch.randn(5, 8, 3, dtype=D)
    params_o = {k: v.detach() for k, v in ours.named_parameters()}
    params_t = {k: v.detach() for k, v in theirs.named_parameters()}

    def loss(m, post):
        return lambda p, v: post(functional_call(m, p, (v,))).square().sum()

    with batchnorm.use_backend(backend):
        go = grad(loss(ours, lambda y: y))(params_o, x[0])
        jo = jacrev(lambda v: functional_call(ours, params_o, (v,)))(x[0])
        vo = vmap(grad(loss(ours, lambda y: y)), in_dims=(None, 0))(params_o, x)
    gt = grad(loss(theirs, torch.relu))(params_t, x[0])
    jt = jacrev(lambda v: torch.relu(functional_call(theirs, params_t, (v,))))(x[0])
    vt = vmap(grad(loss(theirs, torch.relu)), in_dims=(None, 0))(params_t, x)
    for k in go:
        assert_close(go[k], gt[k], rtol=1e-10, atol=1e-10, what=f"grad {k}")
        assert_close(vo[k], vt[k], rtol=1e-10, atol=1e-10, what=f"vmap(grad) {k}")
    assert_close(jo, jt, rtol=1e-10, atol=1e-10, what="jacrev")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_jvp_and_forward_mode_ad(backend, train):
    ours, ref, theirs = _pair("elu", 0.5)
    ours.train(train)
    theirs.train(train)
    if train:  # (as for torch's layer: a transform cannot write the running statistics it captured)
        torch.func.replace_all_batch_norm_modules_(ours)
        torch.func.replace_all_batch_norm_modules_(theirs)
    x, t = torch.randn(6, 3, dtype=D), torch.randn(6, 3, dtype=D)
    with batchnorm.use_backend(backend):
        yo, to = jvp(ours, (x,), (t,))
    yt, tt = jvp(ref, (x,), (t,))
    assert_close(yo, yt, rtol=1e-10, atol=1e-10, what="jvp primal")
    assert_close(to, tt, rtol=1e-10, atol=1e-10, what="jvp tangent")
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level(), batchnorm.use_backend(backend):
        out = ours(fwad.make_dual(x, t))
        assert_close(fwad.unpack_dual(out).tangent, tt, rtol=1e-10, atol=1e-10, what="dual tangent")


@pytest.mark.parametrize("backend", ["numba", "torch", "native"])
@pytest.mark.parametrize("flags", [{}, {"running_var_unbiased": False}], ids=["torch_flags", "our_flags"])
def test_batched_gradcheck_forward_ad_and_gradgradcheck(backend, flags):
    # our_flags: running_var_unbiased=False is not torch's layer, so this runs our autograd Function
    torch.manual_seed(3)
    m = batchnorm.BatchNormAct1d(3, dtype=D, activation="elu", negative_slope=0.8, **flags)
    x = torch.randn(6, 3, dtype=D, requires_grad=True)
    with batchnorm.use_backend(backend):
        for train in (True, False):
            m.train(train)
            assert torch.autograd.gradcheck(m, (x,), check_batched_grad=True, check_forward_ad=True)
        m.train()
        assert torch.autograd.gradgradcheck(m, (x,), check_batched_grad=True)
