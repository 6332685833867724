"""Uneven inputs: SyncBatchNorm under DDP's join context (``sync_join``), 2 and 3 gloo ranks.

Ranks hold 3, 5 and 0 batches (of different sizes). Inside ``with sync_join(ddp):`` the ranks that
run out answer SyncBN's collectives with zero counts, so every iteration equals one process on the
batches that exist in that iteration: per-step outputs, the trained parameters and the running
statistics (on every rank, joined ones included) are compared in float64 with a plain-BN copy of
the model trained on the concatenated present shards. A hang would fail the harness's deadline,
not stall CI. One spawn per world size runs every case (see ``helpers.sync_harness``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from helpers.sync_harness import check, launch_once, run_cases
from helpers.util import assert_close
from torch import nn

from batchnorm.family.sync import (
    SyncBatchNorm,
    SyncBatchNormError,
    SyncBatchNormJoinable,
    convert_sync_batchnorm,
    sync_join,
)

F64 = torch.float64
TOL = 1e-10


def _net():
    torch.manual_seed(0)
    # two SyncBN widths (6 and 3): the narrower layer's rows are padded to the wider one's
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3),
                         nn.BatchNorm1d(3)).double()


class _Pair(nn.Module):
    """Two passes through one network in one forward (a Siamese / contrastive pair)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, a, b):
        return self.net(a), self.net(b)


def _batch(rank, k, forward):
    """Rank ``rank``'s k-th batch (sizes 2..4, different per rank and step) and its target."""
    g = torch.Generator().manual_seed(1000 * rank + 10 * k + forward)
    n = 2 + (rank + k + forward) % 3
    return torch.randn(n, 4, generator=g, dtype=F64) * 2 + 1, torch.randn(n, 3, generator=g, dtype=F64)


def _train_uneven(rank, world, counts, *, forwards=1, sync_buffers=False, lr=0.1):
    """Train under sync_join with ``counts[r]`` batches on rank r; compare with one process.

    ``forwards=2``: the DDP model runs the network twice per forward (one DDP forward per
    iteration is DDP's own rule under join), so SyncBN runs twice as many collectives.
    """
    net = _net()
    ref = copy.deepcopy(net)  # torch's plain BN on the concatenated batch: the one-process run
    model = convert_sync_batchnorm(net) if forwards == 1 else _Pair(convert_sync_batchnorm(net))
    ddp = nn.parallel.DistributedDataParallel(model, forward_sync_buffers=sync_buffers)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr)
    steps = max(counts)
    with sync_join(ddp):
        for k in range(counts[rank]):
            present = [r for r in range(world) if counts[r] > k]
            loss = 0.0
            batches = [_batch(rank, k, f) for f in range(forwards)]
            res = ddp(*(x for x, _ in batches))
            outs = [res] if forwards == 1 else list(res)
            for f, (out, (_, t)) in enumerate(zip(outs, batches)):
                n_all = sum(_batch(r, k, f)[0].shape[0] for r in present)
                # DDP divides the summed gradients by the initial world size: scale to the mean
                # over the samples that exist in this iteration
                loss = loss + ((out - t) ** 2).sum() * (world / n_all)
            opt.zero_grad()
            loss.backward()
            opt.step()
            # the one-process reference on the same iteration (every rank computes it locally)
            ref_opt.zero_grad()
            ref_loss = 0.0
            for f in range(forwards):
                xs = [_batch(r, k, f) for r in present]
                xa, ta = torch.cat([a for a, _ in xs]), torch.cat([b for _, b in xs])
                out_ref = ref(xa)
                ref_loss = ref_loss + ((out_ref - ta) ** 2).sum() / xa.shape[0]
                me = present.index(rank)
                start = sum(xs[i][0].shape[0] for i in range(me))
                mine = out_ref[start:start + xs[me][0].shape[0]].detach()
                assert_close(outs[f].detach(), mine, rtol=TOL, atol=TOL, what=f"output, step {k}, pass {f}")
            ref_loss.backward()
            ref_opt.step()
    # ranks that ran out still train the reference through the remaining iterations
    for k in range(counts[rank], steps):
        present = [r for r in range(world) if counts[r] > k]
        ref_opt.zero_grad()
        ref_loss = 0.0
        for f in range(forwards):
            xs = [_batch(r, k, f) for r in present]
            xa, ta = torch.cat([a for a, _ in xs]), torch.cat([b for _, b in xs])
            ref_loss = ref_loss + ((ref(xa) - ta) ** 2).sum() / xa.shape[0]
        ref_loss.backward()
        ref_opt.step()
    trained = ddp.module if forwards == 1 else ddp.module.net
    for (name, p), q in zip(trained.named_parameters(), ref.parameters()):
        assert_close(p, q, rtol=TOL, atol=TOL, what=f"parameter {name} after training")
    for name, v in ref.state_dict().items():
        got = trained.state_dict()[name]
        if name.endswith("num_batches_tracked"):
            assert int(got) == int(v) == steps * forwards, (name, int(got), int(v))
        else:
            assert_close(got, v, rtol=TOL, atol=TOL, what=f"buffer {name}")
    for m in trained.modules():  # the context is closed: the layers are back to plain collectives
        assert "_join" not in m.__dict__


_COUNTS = {2: [[3, 5], [0, 3]], 3: [[3, 5, 0]]}


def case_join_uneven(rank, world, out):
    for counts in _COUNTS[world]:
        _train_uneven(rank, world, counts)


def case_join_uneven_forward_sync_buffers(rank, world, out):
    """DDP broadcasts buffers (the default): its last-joiner sync and our rows agree."""
    _train_uneven(rank, world, _COUNTS[world][0], sync_buffers=True)


def case_join_two_forwards_per_step(rank, world, out):
    """Twice as many SyncBN collectives per iteration: the joined rank needs no count of them."""
    _train_uneven(rank, world, _COUNTS[world][-1], forwards=2)


def case_join_even_inputs_are_unchanged(rank, world, out):
    """Without uneven inputs the join context changes nothing (same bits as without it)."""
    results = []
    for use_join in (False, True):
        ddp = nn.parallel.DistributedDataParallel(convert_sync_batchnorm(_net()))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        ctx = sync_join(ddp) if use_join else None
        if ctx:
            ctx.__enter__()
        for k in range(2):
            x, t = _batch(rank, k, 0)
            opt.zero_grad()
            ((ddp(x) - t) ** 2).sum().backward()
            opt.step()
        if ctx:
            ctx.__exit__(None, None, None)
        results.append([p.detach().clone() for p in ddp.parameters()])
    for a, b in zip(*results):
        assert_close(a, b, rtol=1e-13, atol=1e-14, what="with and without sync_join")


def case_join_ranks_out_of_step(rank, world, out):
    """Ranks with data that run different SyncBN layers get a clear error, not a silent mix."""
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(2, 3), SyncBatchNorm(3), SyncBatchNorm(3)).double())
    x = torch.randn(4, 3, dtype=F64)
    try:
        with sync_join(model):
            model.module[1 + rank % 2](x)
    except SyncBatchNormError as e:
        assert "out of step" in str(e) and "layer 0" in str(e) and "layer 1" in str(e), e
    else:
        raise AssertionError("different layers on different ranks were not detected")
    assert all("_join" not in m.__dict__ for m in model.modules())


def case_join_models_differ(rank, world, out):
    extra = [SyncBatchNorm(3, affine=False, track_running_stats=False)] if rank == 1 else []
    layers = [nn.Linear(2, 3), SyncBatchNorm(3), *extra]  # DDP sees the same parameters
    model = nn.parallel.DistributedDataParallel(nn.Sequential(*layers))
    try:
        sync_join(model)
    except ValueError as e:
        assert "differ in their SyncBN layers" in str(e) and "rank 1: 2 layers" in str(e), e
    else:
        raise AssertionError("different models were not detected")


def case_join_other_group_rejected(rank, world, out):
    group = dist.new_group(list(range(world)))
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(2, 3), SyncBatchNorm(3,
                                                                                              process_group=group)))
    with pytest.raises(ValueError, match="another process group"):
        SyncBatchNormJoinable(model)


_CASES_2 = [case_join_uneven, case_join_uneven_forward_sync_buffers, case_join_two_forwards_per_step,
            case_join_even_inputs_are_unchanged, case_join_ranks_out_of_step, case_join_models_differ,
            case_join_other_group_rejected]
_CASES_3 = [case_join_uneven, case_join_ranks_out_of_step, case_join_models_differ]  # 3, 5 and 0 batches


def worker(rank, world, out):
    """The world-2 spawn also runs test_sync_patterns' cases (one start-up for both files)."""
    import test_sync_patterns

    cases = _CASES_2 + test_sync_patterns.cases() if world == 2 else _CASES_3
    return run_cases(cases, rank, world, out)


def world(n):
    return launch_once("test_sync_join:worker", n, deadline_s=200, pg_timeout=30)


@pytest.mark.parametrize("case", [c.__name__ for c in _CASES_2])
def test_join_two_ranks(case):
    check(world(2), case)


@pytest.mark.parametrize("case", [c.__name__ for c in _CASES_3])
def test_join_three_ranks(case):
    check(world(3), case)


def test_sync_join_needs_ddp():
    with pytest.raises(TypeError, match="sync_join: expected a DistributedDataParallel model"):
        sync_join(nn.Sequential(SyncBatchNorm(3)))


def test_joinable_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"torch\.distributed is not initialised"):
        SyncBatchNormJoinable(nn.Sequential(SyncBatchNorm(3)))
