"""InPlace-ABN and autograd: what is saved, what is overwritten, and every misuse caught.

The story: with ``inplace=True`` the output *is* the input tensor (same storage, version bumped),
only the output and per-channel vectors are saved for the backward, and the input is never
saved. Overwriting a tensor that autograd still needs is refused before anything is written
(leaf, view of a leaf, expanded memory, a producer that saved its output) or caught by the
version counter at backward time (another consumer saved it; the output was modified later).
Every rejected call leaves the input and the module's state bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from helpers.core_util import assert_state_unchanged, snapshot, tensors_bit_equal
from helpers.util import assert_close
from torch import nn

import batchnorm
import batchnorm.family.inplace
from batchnorm.family.inplace import InPlaceABN2d, inplace_abn_eval, inplace_abn_train

BACKENDS = ["auto", "torch"]


def _saved(fn):
    """Run ``fn()`` under saved_tensors_hooks; return (result, list of saved tensors)."""
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


# ------------------------------------------------------------------------------------------ semantics
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_inplace_writes_into_input_and_saves_only_output(backend, fmt):
    a = torch.randn(4, 3, 5, 5, requires_grad=True)
    x = (a * 2).contiguous(memory_format=fmt)
    ptr, version = x.data_ptr(), x._version
    m = InPlaceABN2d(3)
    with batchnorm.use_backend(backend):
        y, saved = _saved(lambda: m(x))
    assert y is x and y.data_ptr() == ptr and x._version > version
    big = [t for t in saved if t.numel() > 3]
    assert big and all(t.untyped_storage().data_ptr() == ptr for t in big), "only y may be saved full-size"
    small_bytes = sum(t.untyped_storage().nbytes() for t in saved if t.numel() <= 3)
    assert small_bytes <= 8 * 8 * 3  # per-channel vectors only (γ_eff, β, invstd, γ)
    y.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_place_leaves_input_and_does_not_save_it(backend):
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    keep = x.detach().clone()
    with batchnorm.use_backend(backend):
        (y, _), saved = _saved(lambda: inplace_abn_train(x, weight=torch.ones(3, requires_grad=True),
                                                         inplace=False))
    assert y is not x and tensors_bit_equal(x.detach(), keep)
    xs = x.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() != xs for t in saved), "x must not be saved"
    assert any(t.untyped_storage().data_ptr() == y.untyped_storage().data_ptr() for t in saved)


def test_later_use_of_input_reads_output_with_correct_gradients():
    """x = conv(a); y = iabn(x); z = x.sum() + y.sum(): x now holds y, so z = 2·y.sum() — grads agree."""
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    a = torch.randn(2, 3, 6, 6, requires_grad=True)
    iabn = InPlaceABN2d(4)
    x = conv(a)
    y = iabn(x)
    z = x.sum() + y.sum()
    z.backward()
    ga, gw = a.grad.clone(), conv.weight.grad.clone()
    a.grad = None
    conv.weight.grad = None
    ref = InPlaceABN2d(4, inplace=False)
    (2 * ref(conv(a)).sum()).backward()
    assert_close(ga, a.grad, rtol=1e-5, atol=1e-6, what="da")
    assert_close(gw, conv.weight.grad, rtol=1e-5, atol=1e-6, what="dconv")


@pytest.mark.parametrize("backend", BACKENDS)
def test_view_of_non_leaf_is_written_through(backend):
    """A strided view of an intermediate is overwritten in place; the base sees it, gradients stay right."""
    a = torch.randn(3, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    with batchnorm.use_backend(backend):
        base = a * 1.5
        v = base[:, 1:3, :, ::2]
        y, _ = inplace_abn_train(v, weight=torch.tensor([1.2, -0.8], dtype=torch.float64), inplace=True)
        assert y is v
        assert torch.equal(base[:, 1:3, :, ::2], y)
        (base * base).sum().backward()
    g_inplace = a.grad.clone()
    a.grad = None
    base = a * 1.5
    y2, _ = inplace_abn_train(base[:, 1:3, :, ::2], weight=torch.tensor([1.2, -0.8], dtype=torch.float64),
                              inplace=False)
    merged = base.clone()
    merged[:, 1:3, :, ::2] = y2
    (merged * merged).sum().backward()
    assert_close(g_inplace, a.grad, rtol=1e-10, atol=1e-12, what="da through the view")


def test_gradient_tensor_shared_by_two_branches_is_not_overwritten():
    """autograd hands one gradient tensor to both inputs of an add: dx must not be written into dy."""
    x1 = torch.randn(4, 3, 5, 5, requires_grad=True)
    other = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = InPlaceABN2d(3)(x1 * 1)
    dy = torch.randn(4, 3, 5, 5)
    (y + other).backward(dy)
    assert torch.equal(other.grad, dy)


def test_inference_mode_and_no_grad():
    m = InPlaceABN2d(3).eval()
    with torch.inference_mode():
        x = torch.randn(2, 3, 4, 4)
        ref = x.clone()
        y = m(x)
    assert y is x
    w, b = m.weight.detach(), m.bias.detach()
    bn = nn.functional.batch_norm(ref, m.running_mean, m.running_var, w, b, False)
    ref_y = nn.functional.leaky_relu(bn, 0.01)
    assert_close(y, ref_y, rtol=1e-6, atol=1e-6, what="inference")
    leaf = torch.randn(2, 3, 4, 4, requires_grad=True)
    with torch.no_grad():  # no graph: overwriting even a leaf is the user's explicit choice, as torch allows
        out = inplace_abn_eval(leaf, torch.zeros(3), torch.ones(3))
    assert out.data_ptr() == leaf.data_ptr() and torch.equal(out, leaf.detach())  # an alias of the leaf


# ------------------------------------------------------------------------------------------ errors
def _assert_rejected(call, x, module=None, match=""):
    before_x = x.detach().clone()
    before = snapshot(module) if module is not None else None
    with pytest.raises(ValueError, match=match):
        call()
    assert tensors_bit_equal(x.detach(), before_x), "a rejected call must not write into the input"
    if module is not None:
        assert_state_unchanged(before, module, "rejected call")


def test_leaf_requiring_grad_is_refused():
    m = InPlaceABN2d(3)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    _assert_rejected(lambda: m(x), x, m, match=r"InPlaceABN2d: inplace=True would overwrite a leaf")
    _assert_rejected(lambda: inplace_abn_train(x), x, match=r"inplace_abn_train: .*leaf .*inplace=False")
    y = InPlaceABN2d(3, inplace=False)(x)  # the fix the message names works
    assert y is not x


def test_view_of_leaf_is_refused():
    m = InPlaceABN2d(2)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    _assert_rejected(lambda: m(x[:, :2]), x, m, match="view of a leaf")


def test_expanded_input_is_refused():
    m = InPlaceABN2d(3)
    x = torch.randn(1, 3, 4, 4).expand(5, 3, 4, 4)
    _assert_rejected(lambda: m(x), x, m, match="share memory")
    assert InPlaceABN2d(3, inplace=False)(x).shape == (5, 3, 4, 4)


@pytest.mark.parametrize("producer", ["exp", "sigmoid", "relu", "iabn", "bnact"])
def test_producer_that_saved_its_output_is_refused_in_forward(producer):
    """exp/sigmoid/relu (fused BN+act, another InPlace-ABN) save their output: refuse to overwrite it."""
    a = torch.randn(2, 3, 4, 4, requires_grad=True)
    make = {
        "exp": lambda: a.exp(),
        "sigmoid": lambda: torch.sigmoid(a),
        "relu": lambda: torch.relu(a),
        "iabn": lambda: InPlaceABN2d(3)(a * 1),
        "bnact": lambda: batchnorm.BatchNormAct2d(3, activation="leaky_relu")(a),
    }
    x = make[producer]()
    m = InPlaceABN2d(3)
    _assert_rejected(lambda: m(x), x, m, match=r"saved it for its own backward.*inplace=False")
    y = InPlaceABN2d(3, inplace=False)(x)
    y.sum().backward()  # the named fix works
    assert a.grad is not None


def test_other_consumer_that_saved_input_is_caught_by_version_counter():
    a = torch.randn(2, 3, 4, 4, requires_grad=True)
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    x = a * 1
    w = x * s  # mul saves x (to give s its gradient)
    y = InPlaceABN2d(3)(x)  # overwrites x: not detectable from x itself
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (w.sum() + y.sum()).backward()


def test_modifying_output_afterwards_is_caught():
    a = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = InPlaceABN2d(3)(a * 1)
    y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_double_backward_is_refused_clearly():
    a = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = InPlaceABN2d(3, dtype=torch.float64)(a * 1)
    with pytest.raises(RuntimeError, match=r"double backward .*BatchNormAct2d"):
        torch.autograd.grad(y.square().sum(), a, create_graph=True)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"activation": "relu"}, ValueError, "'relu' is not invertible"),
    ({"activation": "leaky_relu", "negative_slope": 0.0}, ValueError, "negative_slope > 0"),
    ({"activation": "leaky_relu", "negative_slope": -0.1}, ValueError, "negative_slope > 0"),
    ({"activation": "leaky_relu", "negative_slope": float("nan")}, ValueError, "finite negative_slope"),
    ({"activation": "elu", "negative_slope": 0.0}, ValueError, r"alpha\) > 0"),
    ({"activation": "gelu"}, ValueError, "unknown activation 'gelu'"),
    ({"negative_slope": True}, TypeError, "negative_slope to be a number"),
    ({"eps_gamma": 0.0}, ValueError, "eps_gamma to be a finite number > 0"),
    ({"eps_gamma": -1e-5}, ValueError, "eps_gamma"),
    ({"eps_gamma": float("inf")}, ValueError, "eps_gamma"),
])
def test_bad_configuration_is_refused(kwargs, exc, match):
    with pytest.raises(exc, match=r"InPlaceABN2d: .*" + match):
        InPlaceABN2d(3, **kwargs)
    x = torch.randn(2, 3, 4, 4)
    before = x.clone()
    with pytest.raises(exc, match=r"batchnorm.inplace_abn_train: .*" + match):
        inplace_abn_train(x, **kwargs)
    with pytest.raises(exc, match=r"batchnorm.inplace_abn_eval: .*" + match):
        inplace_abn_eval(x, torch.zeros(3), torch.ones(3), **kwargs)
    assert tensors_bit_equal(x, before)


def test_activation_changed_after_construction_is_refused_at_forward():
    m = InPlaceABN2d(3)
    m.activation = "relu"
    x = torch.randn(2, 3, 4, 4)
    _assert_rejected(lambda: m(x), x, m, match="not invertible")


def test_bad_inputs_use_the_shared_checks():
    m = InPlaceABN2d(3)
    x = torch.randn(2, 4, 4, 4)
    _assert_rejected(lambda: m(x), x, m, match="expected 3 channels")
    one = torch.randn(1, 3, 1, 1)
    _assert_rejected(lambda: m(one), one, m, match="more than 1 value per channel")
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(2, 3, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="running_mean and running_var, or neither"):
        inplace_abn_train(torch.randn(2, 3, 4, 4), torch.zeros(3))
    with pytest.raises(TypeError, match="mean and var are required"):
        inplace_abn_eval(torch.randn(2, 3, 4, 4), None, None)


# ------------------------------------------------------------------------------------------ dispatch
def test_backend_choice_and_fallbacks(monkeypatch):
    x = torch.randn(4, 3, 5, 5)
    assert batchnorm.family.inplace.inplace_backend_for(x) == "numba"
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert batchnorm.family.inplace.inplace_backend_for(x_cl) == "numba"
    assert batchnorm.family.inplace.inplace_backend_for(x[:, :, ::2]) == "torch"  # odd strides
    assert batchnorm.family.inplace.inplace_backend_for(x.half()) == "torch"
    with batchnorm.use_backend("torch"):
        assert batchnorm.family.inplace.inplace_backend_for(x) == "torch"
    # a forced fast backend that cannot run an input raises instead of silently measuring torch
    monkeypatch.setattr(batchnorm.kernels, "get_backend", lambda: "numba")
    keep = x.half().clone()
    xh = keep.clone()
    with pytest.raises(RuntimeError, match=r"forced backend 'numba' cannot run a torch\.float16"):
        inplace_abn_train(xh)
    assert tensors_bit_equal(xh, keep)


def test_calls_leave_torch_thread_count_alone():
    """numba's OpenMP layer shares torch's runtime: a call must not change torch.get_num_threads()."""
    import numba

    before = torch.get_num_threads()
    try:
        for n in sorted({1, max(1, min(2, numba.config.NUMBA_NUM_THREADS))}):
            torch.set_num_threads(n)
            for shape in ((4, 3, 5, 5), (16, 8, 32, 32)):  # one thread / parallel
                x = torch.randn(*shape, requires_grad=True)
                InPlaceABN2d(shape[1])(x * 1).sum().backward()
                assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)
