"""SyncBatchNorm in one process: the fallback path, the API, convert_sync_batchnorm, errors.

The multi-process behaviour (2 and 3 ranks) is tested in test_sync_dist.py.
"""

from __future__ import annotations

import copy
import datetime
import inspect

import pytest
import torch
import torch.distributed as dist
from helpers.sync_harness import free_port
from helpers.util import assert_close
from torch import nn

import batchnorm.family.sync as S
from batchnorm import reference
from batchnorm.core.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct2d, _BatchNorm
from batchnorm.family.sync import SyncBatchNorm, SyncBatchNormError, convert_sync_batchnorm

F64 = torch.float64
PLAIN = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}
SHAPES = {2: (6, 3), 3: (5, 3, 4), 4: (4, 3, 3, 2), 5: (3, 3, 2, 2, 2)}


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _assert_same_state(before, m):
    after = m.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


# -- fallback: exactly plain BN -------------------------------------------------------------------
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("kw", [{}, {"channel_axis": -1, "activation": "relu"},
                                {"momentum": None, "running_var_unbiased": False}])
def test_not_distributed_is_plain_batchnorm(rank, kw):
    assert not dist.is_initialized()
    shape = SHAPES[rank] if kw.get("channel_axis", 1) == 1 else (*SHAPES[rank][:1], *SHAPES[rank][2:], 3)
    sync, plain = SyncBatchNorm(3, dtype=F64, **kw), PLAIN[rank](3, dtype=F64, **kw)
    for step in range(3):
        x = torch.randn(shape, dtype=F64) * 2 + 1
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = sync(a), plain(b)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad), f"step {step}"
    assert torch.equal(sync.weight.grad, plain.weight.grad) and torch.equal(sync.bias.grad, plain.bias.grad)
    for k, v in plain.state_dict().items():
        assert torch.equal(sync.state_dict()[k], v), k
    sync.eval()
    plain.eval()
    x = torch.randn(shape, dtype=F64)
    assert torch.equal(sync(x), plain(x))
    # and both are BN: compare the train step with the oracle once
    y_ref, _, _ = reference.forward_train(x.numpy(), None, None, 1e-5, kw.get("channel_axis", 1),
                                          kw.get("activation", "identity"))
    fresh = SyncBatchNorm(3, affine=False, dtype=F64, **kw)
    assert_close(fresh(x), y_ref, what="fallback vs oracle")


@pytest.mark.parametrize("affine,track", [(True, True), (False, False)])
def test_gradcheck_fallback_float64(affine, track):
    bn = SyncBatchNorm(3, affine=affine, track_running_stats=track, dtype=F64, activation="elu",
                       negative_slope=0.5)
    x = torch.randn(4, 3, 2, dtype=F64, requires_grad=True)
    if not affine:
        assert torch.autograd.gradcheck(bn, (x,))
        assert torch.autograd.gradgradcheck(bn, (x,))
        return
    w = (torch.rand(3, dtype=F64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=F64, requires_grad=True)

    def f(x, w, b):
        return torch.func.functional_call(bn, {"weight": w, "bias": b}, (x,), strict=False)

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_world_of_one_runs_no_collective(monkeypatch):
    """A process group of one rank is the single-process case: plain BN, no collective at all."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=20))
    try:
        def forbidden(*a, **k):
            raise AssertionError("collective in a world of one")

        monkeypatch.setattr(dist, "all_gather", forbidden)
        monkeypatch.setattr(dist, "all_reduce", forbidden)
        sync, plain = SyncBatchNorm(4, dtype=F64), BatchNorm2d(4, dtype=F64)
        x = torch.randn(3, 4, 2, 2, dtype=F64, requires_grad=True)
        y = sync(x)
        y.sum().backward()
        assert torch.equal(y, plain(x.detach()))
        assert torch.equal(sync.running_var, plain.running_var)
    finally:
        dist.destroy_process_group()


# -- API ------------------------------------------------------------------------------------------
def test_constructor_matches_torch_syncbatchnorm():
    ours = list(inspect.signature(SyncBatchNorm.__init__).parameters)[1:9]
    theirs = list(inspect.signature(nn.SyncBatchNorm.__init__).parameters)[1:9]
    assert ours == theirs
    bn = SyncBatchNorm(5, 1e-3, 0.2, False, True, None, "cpu", F64, timeout=2.5)
    got = (bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    assert got == (5, 1e-3, 0.2, False, True)
    assert bn.running_mean.dtype == F64 and bn.weight is None and bn.process_group is None
    assert "timeout=2.5" in repr(bn)
    assert SyncBatchNorm(5, timeout=datetime.timedelta(seconds=3)).timeout == 3.0
    assert set(SyncBatchNorm(5).state_dict()) == set(nn.SyncBatchNorm(5).state_dict())


def test_state_dict_round_trip_with_torch():
    t = nn.SyncBatchNorm(4)
    with torch.no_grad():
        t.weight.uniform_()
        t.bias.normal_()
        t.running_mean.normal_()
        t.running_var.uniform_(0.5, 2)
        t.num_batches_tracked.fill_(7)
    ours = SyncBatchNorm(4)
    ours.load_state_dict(t.state_dict())
    back = nn.SyncBatchNorm(4)
    back.load_state_dict(ours.state_dict())
    for k, v in t.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "3", True])
def test_bad_timeout_is_rejected(bad):
    with pytest.raises(ValueError, match=r"SyncBatchNorm: expected timeout to be a positive number"):
        SyncBatchNorm(3, timeout=bad)


def test_rejected_inputs_leave_state_unchanged():
    bn = SyncBatchNorm(3)
    bn(torch.randn(4, 3))
    before = _state(bn)
    assert bn(torch.randn(0, 3)).shape == (0, 3)  # one process: an empty batch is an empty output
    _assert_same_state(before, bn)  # ...and changes nothing
    with pytest.raises(ValueError, match=r"SyncBatchNorm: expected 3 channels"):
        bn(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"SyncBatchNorm: expected 2-D .* got 1-D"):
        bn(torch.randn(4))
    with pytest.raises(TypeError, match=r"SyncBatchNorm: expected a floating-point input"):
        bn(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        bn(torch.randn(1, 3))
    _assert_same_state(before, bn)


def test_nccl_group_with_cpu_input_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(ValueError, match=r"SyncBatchNorm: the input is on the CPU .*'nccl'.*gloo"):
        S._check_device("SyncBatchNorm", torch.randn(2, 3), None)
    S._check_device("SyncBatchNorm", torch.randn(2, 3, device="meta"), None)  # non-CPU: passes


def test_collective_failure_is_wrapped():
    """Any failure of a collective (here a fake one) becomes SyncBatchNormError with the fix in it."""
    class FakeWork:
        def wait(self, timeout=None):
            return False  # "not completed in time"

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=20))
    try:
        with pytest.raises(SyncBatchNormError, match=r"SyncBatchNorm: the forward all_gather .* rank 0 of 1 "
                                                     r"\(gloo process group\).*timeout=1.5 s.*same number of "
                                                     r"times.*destroy it"):
            S._run_collective(FakeWork, "forward all_gather of the batch statistics", None, 1.5)
    finally:
        dist.destroy_process_group()


# -- convert_sync_batchnorm -----------------------------------------------------------------------
def _torch_model():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Sequential(nn.Flatten(), nn.Linear(4 * 3 * 3, 5), nn.BatchNorm1d(5, momentum=None, eps=1e-3)),
        nn.SyncBatchNorm(5, affine=False),
        nn.Unflatten(1, (5, 1, 1, 1)),
        nn.BatchNorm3d(5, track_running_stats=False),
    )


def test_convert_torch_model_keeps_everything():
    torch.manual_seed(0)
    model = _torch_model().double()
    model(torch.randn(6, 3, 5, 5, dtype=F64))  # non-trivial running stats
    model[2][2].eval()  # a per-layer mode that must survive
    old = {n: m for n, m in model.named_modules()}
    x = torch.randn(6, 3, 5, 5, dtype=F64)
    ref = copy.deepcopy(model)
    y_ref = ref(x)
    params = list(model.parameters())
    out = convert_sync_batchnorm(model)
    assert out is model
    for name in ("1", "2.2", "3", "5"):
        new = dict(model.named_modules())[name]
        o = old[name]
        assert type(new) is SyncBatchNorm, name
        assert (new.eps, new.momentum, new.affine, new.track_running_stats, new.training) == \
               (o.eps, o.momentum, o.affine, o.track_running_stats, o.training), name
        for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert getattr(new, k) is getattr(o, k), f"{name}.{k} not shared"
    assert [p is q for p, q in zip(model.parameters(), params)] == [True] * len(params)
    assert set(model.state_dict()) == set(ref.state_dict())
    assert model[1].weight.dtype == F64 and model[1].running_mean.dtype == F64
    assert_close(model(x), y_ref, what="output after conversion (one process = plain BN)")
    for k, v in ref.state_dict().items():  # torch's and our EMA round differently: not bit-equal
        if v.is_floating_point():
            assert_close(model.state_dict()[k], v, rtol=1e-12, atol=1e-15, what=k)
        else:
            assert torch.equal(model.state_dict()[k], v), k


def test_convert_our_layers_keeps_extras_and_group():
    act = BatchNormAct2d(3, activation="leaky_relu", negative_slope=0.2, channel_axis=-1,
                         running_var_unbiased=False, nonfinite="skip", dtype=F64)
    new = convert_sync_batchnorm(act)
    assert type(new) is SyncBatchNorm and new is not act
    got = (new.activation, new.negative_slope, new.channel_axis, new.running_var_unbiased, new.nonfinite)
    assert got == ("leaky_relu", 0.2, -1, False, "skip")
    x = torch.randn(2, 4, 4, 3, dtype=F64)
    assert torch.equal(new(x), act(x))
    marker = object()  # any object stands in for a process group in one process
    s = SyncBatchNorm(3, timeout=4.0)
    s2 = SyncBatchNorm.convert_sync_batchnorm(s, process_group=marker)
    assert s2.process_group is marker and s2.timeout == 4.0 and s2.weight is s.weight


def test_convert_leaves_variants_alone():
    class Variant(_BatchNorm):
        def forward(self, input):
            return input * 2

    class TorchVariant(nn.BatchNorm2d):
        def forward(self, input):
            return input

    model = nn.Sequential(Variant(3), TorchVariant(3), nn.InstanceNorm2d(3), nn.GroupNorm(1, 3))
    types = [type(m) for m in model]
    assert convert_sync_batchnorm(model) is model
    assert [type(m) for m in model] == types


def test_convert_rejects_unmaterialised_lazy_layer_without_changes():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.LazyBatchNorm1d())
    first = model[0]
    with pytest.raises(ValueError, match=r"convert_sync_batchnorm: LazyBatchNorm1d is a lazy layer.*forward"):
        convert_sync_batchnorm(model)
    assert model[0] is first  # validated before anything was replaced
    model(torch.randn(4, 3))
    convert_sync_batchnorm(model)
    assert type(model[1]) is SyncBatchNorm and model[1].num_features == 3


def test_convert_rejects_non_module():
    with pytest.raises(TypeError, match=r"convert_sync_batchnorm: expected an nn.Module, got list"):
        convert_sync_batchnorm([nn.BatchNorm1d(2)])
