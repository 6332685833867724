"""PyTorch's own BatchNorm module tests, with our classes substituted for torch's.

The inputs come from ``torch.testing._internal.common_modules.module_db`` (installed with torch): its
``nn.BatchNorm1d/2d/3d`` entries give the constructor arguments and forward inputs that PyTorch's
``test/test_modules.py`` runs every module through (default, cumulative average ``momentum=None``,
``momentum=0.8``, not affine, not tracking statistics, a zero batch, ``bias=False``). The checks are
ours, written after what ``test_modules.py`` checks (forward against the reference module, factory
kwargs, gradients with float64 gradcheck, non-contiguous inputs, pickling, state_dict), with
``torch.nn.BatchNormNd`` as the reference: ours must give the same outputs, gradients and buffers.

Not applicable, and why: ``test_modules.py``'s CUDA/MPS/meta-device tests (no such device here; our
kernels fall back to the torch composite there), ``test_cpu_gpu_parity`` (no GPU), and its
``test_repr`` (our ``extra_repr`` adds ``bias=...`` and our extras by design).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import batchnorm as bn
from tests.helpers.util import assert_close

common_modules = pytest.importorskip("torch.testing._internal.common_modules",
                                     reason="torch's test helpers need expecttest (pip install expecttest)")

_OURS = {nn.BatchNorm1d: bn.BatchNorm1d, nn.BatchNorm2d: bn.BatchNorm2d, nn.BatchNorm3d: bn.BatchNorm3d}
_INFOS = {m.name: m for m in common_modules.module_db if m.module_cls in _OURS}


def _cases(dtype: torch.dtype, training: bool, requires_grad: bool = False):
    out = []
    for name, info in _INFOS.items():
        inputs = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=requires_grad,
                                         training=training)
        for i, mi in enumerate(inputs):
            if mi.forward_input is None:
                continue
            mode = "train" if training else "eval"
            out.append(pytest.param(info, mi, id=f"{name[3:]}-{mi.desc or i}-{mode}"))
    return out


def _build(info, mi, dtype, training):
    args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
    torch.manual_seed(0)
    ref = info.module_cls(*args, **kwargs).to(dtype).train(training)
    ours = _OURS[info.module_cls](*args, **kwargs).to(dtype).train(training)
    ours.load_state_dict(ref.state_dict())
    if ref.affine:  # non-trivial γ/β, identical in both
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ours.weight.copy_(ref.weight)
            if ref.bias is not None:
                ref.bias.uniform_(-0.5, 0.5)
                ours.bias.copy_(ref.bias)
    return ref, ours


def _input(mi):
    (x,) = mi.forward_input.args
    return x


_F32_TRAIN = _cases(torch.float32, True)
_F64_TRAIN = _cases(torch.float64, True)
_F64_EVAL = _cases(torch.float64, False)
_FORWARD = [pytest.param(*c.values, dt, tr, id=f"{c.id}-{str(dt)[6:]}", marks=c.marks)
            for dt in (torch.float32, torch.float64) for tr in (True, False) for c in _cases(dt, tr)]


def test_module_db_entries_exist():
    assert set(_INFOS) == {"nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d"}
    assert len(_F64_TRAIN) >= 15 and len(_FORWARD) == 2 * (len(_F64_TRAIN) + len(_F64_EVAL))


@pytest.mark.parametrize("info,mi,dtype,training", _FORWARD)
def test_forward_matches_torch(info, mi, dtype, training):
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    ref, ours = _build(info, mi, dtype, training)
    x = _input(mi)
    for step in range(2):  # twice: the running statistics of the first call feed the second
        assert_close(ours(x), ref(x), **tol, what=f"forward {step}")
    for (k, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        if k == "num_batches_tracked" and x.numel() == 0 and training:
            # a documented difference (core/modules.py, README): an empty batch is no batch seen, so our
            # count stays (torch bumps it, which shifts momentum=None's cumulative average)
            assert int(b) == 0 and int(a) > 0, (int(b), int(a))
            continue
        assert_close(b, a, **tol, what=k)


@pytest.mark.parametrize("info,mi", _F64_TRAIN + _F64_EVAL)
def test_backward_matches_torch(info, mi):
    training = mi in [c.values[1] for c in _F64_TRAIN]
    ref, ours = _build(info, mi, torch.float64, training)
    x = _input(mi).detach()
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    g = torch.randn_like(yr)
    yr.backward(g)
    yo.backward(g)
    assert_close(xo.grad, xr.grad, rtol=1e-9, atol=1e-11, what="input grad")
    for (k, a), b in zip(ref.named_parameters(), ours.parameters()):
        assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-11, what=f"{k} grad")


@pytest.mark.parametrize("info,mi", _F64_TRAIN + _F64_EVAL)
def test_gradcheck(info, mi):
    training = mi in [c.values[1] for c in _F64_TRAIN]
    _, ours = _build(info, mi, torch.float64, training)
    x = _input(mi).detach()
    for d in range(2, x.dim()):  # small spatial extent: gradcheck is O(numel^2)
        x = x.narrow(d, 0, min(2, x.shape[d]))
    x = x.clone().requires_grad_()
    if ours.track_running_stats and training:
        ours.momentum = 0.0  # gradcheck calls forward many times: keep the statistics fixed
    params = list(ours.parameters())
    assert torch.autograd.gradcheck(lambda inp, *ps, layer=ours: layer(inp), (x, *params), eps=1e-6,
                                    atol=1e-5)


@pytest.mark.parametrize("info,mi", [pytest.param(*c.values, id=c.id) for c in _F32_TRAIN])  # no forward
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_factory_kwargs(info, mi, dtype):
    layer = _OURS[info.module_cls](*mi.constructor_input.args, **mi.constructor_input.kwargs,
                                   device="cpu", dtype=dtype)
    for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
        assert t.device.type == "cpu", name
        if t.dtype.is_floating_point:
            assert t.dtype == dtype, (name, t.dtype)
        else:
            assert name == "num_batches_tracked" and t.dtype == torch.long


@pytest.mark.parametrize("info,mi", _F64_TRAIN)
def test_non_contiguous_input(info, mi):
    ref, ours = _build(info, mi, torch.float64, True)
    x = _input(mi)
    nc = torch.repeat_interleave(x, 2, dim=-1)[..., ::2]
    assert torch.equal(nc, x) and (nc.numel() == 0 or not nc.is_contiguous())
    assert_close(ours(nc), ref(x), rtol=1e-10, atol=1e-12, what="non-contiguous")


@pytest.mark.parametrize("info,mi", _F32_TRAIN)
def test_pickle_and_deepcopy(info, mi):
    _, ours = _build(info, mi, torch.float32, False)
    x = _input(mi)
    want = ours(x)
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(clone) is type(ours)
        assert_close(clone(x), want, rtol=0, atol=0, what="copy")


@pytest.mark.parametrize("info,mi", _F32_TRAIN)
def test_state_dict_both_ways(info, mi):
    ref, ours = _build(info, mi, torch.float32, True)
    ours(_input(mi))
    fresh = info.module_cls(*mi.constructor_input.args, **mi.constructor_input.kwargs)
    fresh.load_state_dict(ours.state_dict())
    assert list(fresh.state_dict()) == list(ours.state_dict()) == list(ref.state_dict())
    for a, b in zip(fresh.state_dict().values(), ours.state_dict().values()):
        assert torch.equal(a, b)
