"""SyncBatchNorm across 2 and 3 real processes (gloo on 127.0.0.1) against one process with the whole batch.

Every rank builds the same global batch from a seed, runs SyncBatchNorm on its shard and compares
its slice of the output and input gradient, the summed γ/β gradients and the running statistics
with the float64 oracle (:mod:`batchnorm.reference`) and with ``torch.nn.functional.batch_norm``
on the concatenated batch. One spawn per world size runs all cases (see ``helpers.sync_harness``).
"""

from __future__ import annotations

import copy
import datetime
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers.sync_harness import check, launch, run_cases
from helpers.util import assert_close

from batchnorm import reference
from batchnorm.family.sync import SyncBatchNorm, SyncBatchNormError, convert_sync_batchnorm

F64 = torch.float64


# -- helpers run inside the workers -----------------------------------------------------------
def _data(sizes, tail, c, axis, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (sum(sizes), c, *tail) if axis == 1 else (sum(sizes), *tail, c)
    x = torch.randn(shape, generator=g, dtype=F64) * 3 + 2
    dy = torch.randn(shape, generator=g, dtype=F64)
    return x.to(dtype), dy.to(dtype)


def _shard(t, sizes, rank):
    s = sum(sizes[:rank])
    return t[s:s + sizes[rank]]


def _allsum(t):
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def _identical_on_all_ranks(t, what):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    for r, p in enumerate(parts):
        if not torch.equal(p, parts[0]):
            raise AssertionError(f"{what} differs between rank 0 and rank {r}")


def _compare_to_oracle(rank, sizes, tail, c, *, axis=1, dtype=F64, steps=1, act="identity", slope=0.01,
                       tol=1e-10, group=None, members=None, seed=0, **kw):
    """SyncBN on this rank's shard vs the oracle on the batch of ``members`` (default: all ranks)."""
    members = list(range(len(sizes))) if members is None else members
    bn = SyncBatchNorm(c, process_group=group, channel_axis=axis, activation=act, negative_slope=slope,
                       dtype=dtype, **kw)
    gw = torch.Generator().manual_seed(123)
    if bn.affine:
        with torch.no_grad():
            bn.weight.copy_(torch.rand(c, generator=gw, dtype=F64) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=gw, dtype=F64))
    w = None if not bn.affine else bn.weight.detach().to(F64).numpy()
    b = None if not bn.affine else bn.bias.detach().to(F64).numpy()
    rm, rv, nbt = np.zeros(c), np.ones(c), 0
    for step in range(steps):
        x, dy = _data(sizes, tail, c, axis, dtype, seed + step)
        keep = torch.cat([_shard(x, sizes, r) for r in members])
        keep_dy = torch.cat([_shard(dy, sizes, r) for r in members])
        xs = _shard(x, sizes, rank).clone().requires_grad_()
        if bn.affine:
            bn.weight.grad = bn.bias.grad = None
        y = bn(xs)
        y.backward(_shard(dy, sizes, rank))
        y_ref, mean, var = reference.forward_train(keep.numpy(), w, b, bn.eps, axis, act, slope)
        dx_ref, dw_ref, db_ref = reference.backward(keep_dy.numpy(), keep.numpy(), w, b, bn.eps, axis, act,
                                                    slope)
        local = members.index(rank)
        lsizes = [sizes[r] for r in members]
        assert y.shape == xs.shape and xs.grad.shape == xs.shape
        assert_close(y, _shard(torch.from_numpy(y_ref), lsizes, local), rtol=tol, atol=tol,
                     what=f"y step {step}")
        assert_close(xs.grad, _shard(torch.from_numpy(dx_ref), lsizes, local), rtol=tol, atol=tol,
                     what=f"dx step {step}")
        if bn.affine:
            # γ/β gradients are rank-local (DDP sums them); their sum over the group is the global one.
            dw, db = bn.weight.grad.detach().clone(), bn.bias.grad.detach().clone()
            if group is None:
                dw, db = _allsum(dw), _allsum(db)
            else:
                dist.all_reduce(dw, group=group)
                dist.all_reduce(db, group=group)
            assert_close(dw, dw_ref, rtol=tol, atol=tol, what="summed dgamma")
            assert_close(db, db_ref, rtol=tol, atol=tol, what="summed dbeta")
        if bn.track_running_stats:
            n = keep.numel() // c
            rm, rv, nbt = reference.update_running_stats(rm, rv, mean, var, n, bn.momentum, nbt,
                                                         bn.running_var_unbiased)
            assert_close(bn.running_mean, rm, rtol=tol, atol=tol, what="running_mean")
            assert_close(bn.running_var, rv, rtol=tol, atol=tol, what="running_var")
            assert int(bn.num_batches_tracked) == nbt
        if axis == 1 and act == "identity" and dtype == F64:  # parity with torch on the whole batch
            xt = keep.clone().requires_grad_()
            wt = None if w is None else torch.from_numpy(w)
            bt = None if b is None else torch.from_numpy(b)
            yt = torch.nn.functional.batch_norm(xt, None, None, wt, bt, True, 0.0, bn.eps)
            yt.backward(keep_dy)
            assert_close(y, _shard(yt.detach(), lsizes, local), rtol=tol, atol=tol, what="y vs torch")
            assert_close(xs.grad, _shard(xt.grad, lsizes, local), rtol=tol, atol=tol, what="dx vs torch")
    if bn.track_running_stats and group is None:
        _identical_on_all_ranks(bn.running_mean, "running_mean")
        _identical_on_all_ranks(bn.running_var, "running_var")
    return bn


_UNEVEN = {2: [1, 6], 3: [3, 1, 6]}
_EMPTY = {2: [0, 6], 3: [4, 0, 3]}


def case_even_nchw(rank, world, out):
    _compare_to_oracle(rank, [3] * world, (4, 5), 3, steps=2)


def case_uneven_ncl(rank, world, out):
    _compare_to_oracle(rank, _UNEVEN[world], (7,), 4, steps=2)


def case_empty_rank_nc(rank, world, out):
    bn = _compare_to_oracle(rank, _EMPTY[world], (), 5, steps=2)
    if _EMPTY[world][rank] == 0:
        assert bn.weight.grad is not None and torch.count_nonzero(bn.weight.grad) == 0


def case_channels_last_leaky_relu(rank, world, out):
    _compare_to_oracle(rank, _UNEVEN[world], (3, 2), 4, axis=-1, act="leaky_relu", slope=0.1)


def case_elu_5d_cumulative_biased(rank, world, out):
    _compare_to_oracle(rank, _UNEVEN[world], (2, 2, 3), 2, act="elu", slope=0.7, steps=3, momentum=None,
                       running_var_unbiased=False)


def case_smooth_activations(rank, world, out):
    # silu/hardswish/gelu's derivative is a function of z, not of y: the backward recomputes z
    for act in ("silu", "hardswish", "gelu", "gelu_tanh", "sigmoid", "tanh"):
        _compare_to_oracle(rank, _UNEVEN[world], (3,), 3, act=act)


def case_no_affine_no_tracking(rank, world, out):
    _compare_to_oracle(rank, _EMPTY[world], (5,), 3, affine=False, track_running_stats=False)


def case_float32(rank, world, out):
    _compare_to_oracle(rank, _UNEVEN[world], (4, 4), 3, dtype=torch.float32, tol=2e-5, steps=2)


def case_global_batch_of_one_value_is_rejected(rank, world, out):
    sizes = [1] + [0] * (world - 1)
    bn = SyncBatchNorm(3, dtype=F64)
    x, _ = _data(sizes, (), 3, 1, F64, 0)
    try:
        bn(_shard(x, sizes, rank))
    except ValueError as e:
        assert "SyncBatchNorm" in str(e) and "global batch" in str(e), e
    else:
        raise AssertionError("expected ValueError for a global batch with 1 value per channel")
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.zeros(3, dtype=F64))


def case_nonfinite_raise_and_skip(rank, world, out):
    sizes = [4] * world
    x, _ = _data(sizes, (3,), 2, 1, F64, 5)
    x[0, 1, 0] = float("nan")  # on rank 0 only: every rank must see non-finite global stats
    for mode in ("raise", "skip"):
        bn = SyncBatchNorm(2, dtype=F64, nonfinite=mode)
        before = {k: v.clone() for k, v in bn.state_dict().items()}
        try:
            y = bn(_shard(x, sizes, rank))
        except FloatingPointError as e:
            assert mode == "raise" and "SyncBatchNorm" in str(e), e
        else:
            assert mode == "skip", "nonfinite='raise' did not raise"
            assert torch.isfinite(y[:, 0]).all()  # channel 0 is clean everywhere
        for k, v in bn.state_dict().items():
            assert torch.equal(v, before[k]), f"{mode}: {k} changed"


def case_num_features_differ_between_ranks(rank, world, out):
    """Layers of different widths on different ranks: the same clear ValueError on every rank (gloo
    would abort one rank on the mismatched all_gather and let the others return); nothing changes,
    and the group still works afterwards."""
    c = 3 + rank
    bn = SyncBatchNorm(c, dtype=F64)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    try:
        bn(torch.randn(4, c, dtype=F64))
    except ValueError as e:
        msg = str(e)
        for word in ("SyncBatchNorm", "different num_features", "rank 0: 3", f"rank {world - 1}: {2 + world}",
                     "same model"):
            assert word in msg, f"{word!r} missing from: {msg}"
    else:
        raise AssertionError("different num_features on different ranks were not detected")
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by the rejected call"
    _compare_to_oracle(rank, [3] * world, (2,), 3)  # the next layer synchronises normally


def case_eval_and_no_grad_paths(rank, world, out):
    """Eval mode runs no collective (ranks may call it any number of times); stats are the running ones."""
    bn = SyncBatchNorm(3, dtype=F64)
    x, _ = _data([4] * world, (2,), 3, 1, F64, 9)
    with torch.no_grad():  # a training forward without grad still synchronises
        bn(_shard(x, [4] * world, rank))
    bn.eval()
    orig = dist.all_gather
    def _forbidden(*a, **k):
        raise AssertionError("eval-mode SyncBatchNorm ran a collective")
    dist.all_gather = _forbidden
    try:
        for _ in range(rank + 1):  # different call counts per rank: would hang if it synchronised
            y = bn(x)
    finally:
        dist.all_gather = orig
    w = bn.weight.detach().numpy()
    y_ref = reference.forward_eval(x.numpy(), bn.running_mean.numpy(), bn.running_var.numpy(), w,
                                   bn.bias.detach().numpy(), bn.eps)
    assert_close(y, y_ref, what="eval output")


def case_convert_torch_model_under_ddp(rank, world, out):
    """torch model -> convert_sync_batchnorm -> DDP: one SGD step equals one process on the whole batch."""
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 5 * 5, 3), nn.BatchNorm1d(3)).double()
    single = [p.detach().clone() for p in net.parameters()]
    ref = copy.deepcopy(net)
    sync = convert_sync_batchnorm(net)
    assert type(sync[1]) is SyncBatchNorm and type(sync[5]) is SyncBatchNorm
    ddp = torch.nn.parallel.DistributedDataParallel(sync)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    sizes = [4] * world
    x, _ = _data(sizes, (5, 5), 2, 1, F64, 3)
    target = torch.randn(sum(sizes), 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    for _ in range(2):
        opt.zero_grad()
        loss = ((ddp(_shard(x, sizes, rank)) - _shard(target, sizes, rank)) ** 2).mean()
        loss.backward()
        opt.step()
        ref_opt.zero_grad()
        ((ref(x) - target) ** 2).mean().backward()
        ref_opt.step()
    for (name, p), p0 in zip(sync.named_parameters(), single):
        assert not torch.equal(p, p0), f"{name} did not train"
    for (name, p), q in zip(sync.named_parameters(), ref.parameters()):
        assert_close(p, q, rtol=1e-10, atol=1e-12, what=f"parameter {name} after 2 DDP steps")
    for name in ("1.running_mean", "1.running_var", "5.running_mean", "5.running_var"):
        assert_close(sync.state_dict()[name], ref.state_dict()[name], rtol=1e-10, atol=1e-12, what=name)


_SHARED = [
    case_even_nchw,
    case_uneven_ncl,
    case_empty_rank_nc,
    case_channels_last_leaky_relu,
    case_elu_5d_cumulative_biased,
    case_smooth_activations,
    case_no_affine_no_tracking,
    case_float32,
    case_global_batch_of_one_value_is_rejected,
    case_nonfinite_raise_and_skip,
    case_eval_and_no_grad_paths,
    case_convert_torch_model_under_ddp,
    case_num_features_differ_between_ranks,
]


# -- world 3 only: a sub-group ------------------------------------------------------------------
def _subgroup_cases(group):
    def case_subgroup_0_2(rank, world, out):
        sizes = [3, 4, 5]
        if rank == 1:  # not a member: the layer refuses to run rather than hang
            bn = SyncBatchNorm(2, process_group=group)
            try:
                bn(torch.randn(3, 2))
            except ValueError as e:
                assert "not a member" in str(e), e
            else:
                raise AssertionError("a non-member rank ran a SyncBatchNorm of the group")
            return
        _compare_to_oracle(rank, sizes, (3,), 2, group=group, members=[0, 2], steps=2)
    return [case_subgroup_0_2]


# -- world 2 only: hangs become errors ----------------------------------------------------------
def _timeout_cases(groups):
    def _expect_error(fn, limit, must):
        t0 = time.monotonic()
        try:
            fn()
        except SyncBatchNormError as e:
            took = time.monotonic() - t0
            msg = str(e)
            for word in ("SyncBatchNorm", "rank 0 of 2", "same number of times", *must):
                assert word in msg, f"{word!r} missing from: {msg}"
            assert took < limit, f"error came after {took:.1f} s, limit {limit} s"
            return took
        raise AssertionError("expected SyncBatchNormError")

    def case_timeout_forward_layer_timeout(rank, world, out):
        """Rank 1 skips the forward; rank 0 gets our error after SyncBatchNorm(timeout=2)."""
        if rank == 1:
            return
        bn = SyncBatchNorm(3, process_group=groups["fwd"], timeout=2.0)
        before = {k: v.clone() for k, v in bn.state_dict().items()}
        took = _expect_error(lambda: bn(torch.randn(4, 3)), 8.0, ["timeout=2 s", "forward all_gather"])
        assert took > 1.5, f"raised after {took:.2f} s, before the 2 s timeout"
        for k, v in bn.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed by the failed call"

    def case_timeout_forward_group_timeout(rank, world, out):
        """No layer timeout: the process group's timeout (3 s here) bounds the wait, same error."""
        if rank == 1:
            return
        bn = SyncBatchNorm(3, process_group=groups["pg3s"])
        _expect_error(lambda: bn(torch.randn(4, 3)), 12.0, ["init_process_group(timeout"])

    def case_timeout_backward(rank, world, out):
        """Both ranks run the forward, rank 1 skips the backward: rank 0's backward raises."""
        # rank 1 reaches this forward seconds before rank 0 (which is busy with the cases above)
        bn = SyncBatchNorm(3, process_group=groups["bwd"], timeout=2.0 if rank == 0 else 30.0)
        x = torch.randn(4, 3, requires_grad=True)
        y = bn(x)
        if rank == 1:
            return
        _expect_error(lambda: y.sum().backward(), 8.0, ["backward all_reduce"])

    def case_dead_peer(rank, world, out):
        """Rank 1 has exited (it writes its results and leaves); rank 0's next forward raises."""
        if rank == 1:
            return
        while not (out / "rank1.json").exists():
            time.sleep(0.05)
        bn = SyncBatchNorm(3, process_group=groups["dead"], timeout=5.0)
        _expect_error(lambda: bn(torch.randn(4, 3)), 11.0, [])

    return [case_timeout_forward_layer_timeout, case_timeout_forward_group_timeout, case_timeout_backward,
            case_dead_peer]


def case_fails_on_rank_1(rank, world, out):
    if rank == 1:
        raise ValueError("deliberate failure")


def case_after_a_failure(rank, world, out):
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == world


def worker(rank: int, world: int, out: Path) -> dict:
    extra = [case_fails_on_rank_1, case_after_a_failure]  # the harness's own check
    if world == 3:
        extra = _subgroup_cases(dist.new_group([0, 2]))
    results = run_cases(_SHARED + extra, rank, world, out)
    if world == 2:
        long = datetime.timedelta(seconds=60)
        groups = {"fwd": dist.new_group(timeout=long), "bwd": dist.new_group(timeout=long),
                  "dead": dist.new_group(timeout=long),
                  "pg3s": dist.new_group(timeout=datetime.timedelta(seconds=3))}
        dist.barrier()
        # No barrier between these cases: they break their groups on purpose.
        for case in _timeout_cases(groups):
            try:
                case(rank, world, out)
                results[case.__name__] = "ok"
            except BaseException:
                results[case.__name__] = traceback.format_exc()
    return results


# -- the tests (parent side) --------------------------------------------------------------------
@pytest.fixture(scope="module")
def world2():
    return launch("test_sync_dist:worker", 2)


@pytest.fixture(scope="module")
def world3():
    return launch("test_sync_dist:worker", 3)


_NAMES = [c.__name__ for c in _SHARED]
_TIMEOUT_NAMES = ["case_timeout_forward_layer_timeout", "case_timeout_forward_group_timeout",
                  "case_timeout_backward", "case_dead_peer"]


@pytest.mark.parametrize("case", _NAMES)
def test_two_ranks(world2, case):
    check(world2, case)


@pytest.mark.parametrize("case", [*_NAMES, "case_subgroup_0_2"])
def test_three_ranks(world3, case):
    check(world3, case)


@pytest.mark.parametrize("case", _TIMEOUT_NAMES)
def test_hangs_become_clear_errors(world2, case):
    check(world2, case)


def test_harness_reports_failures(world2):
    """The harness must not pass a failing case: the deliberately failing one shows up as a failure,
    and the cases after it still ran in step."""
    with pytest.raises(AssertionError, match="deliberate failure"):
        check(world2, "case_fails_on_rank_1")
    check(world2, "case_after_a_failure")
    with pytest.raises(AssertionError, match="did not run"):
        check(world2, "case_that_does_not_exist")

