"""Masked SyncBatchNorm (``bn(x, mask=m)``) across 2 gloo ranks against one process with plain BN.

Every rank builds every rank's padded shard and mask from a seed, runs SyncBatchNorm on its own, and
compares with the float64 oracle (:mod:`batchnorm.reference`) run on the valid positions of both
ranks packed together: outputs at the valid positions (padded ones: normalised with the same
statistics), dx, the summed dγ/dβ and the running statistics. Shards include a rank whose mask is all
False and an empty one; the join path (``sync_join``) runs the same comparison. One spawn runs all
cases (see ``helpers.sync_harness``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers.sync_harness import check, launch_once, run_cases
from helpers.util import assert_close
from torch import nn

import batchnorm
from batchnorm import reference
from batchnorm.family.sync import SyncBatchNorm, sync_join

F64 = torch.float64
TOL = 1e-10


# -- helpers run inside the workers -----------------------------------------------------------
def _shard(seed, rank, shape, mask_shape, valid):
    """Rank ``rank``'s padded input, upstream gradient (0 at the padding: a masked loss) and mask.

    ``valid``: "lengths" (a random prefix of the last mask axis per sample), "none" (all padding),
    "all", or an int k (exactly the first k mask positions, in flattened order, are valid).
    """
    g = torch.Generator().manual_seed(100 * seed + rank)
    x = torch.randn(shape, generator=g, dtype=F64) * 3 + 2
    if valid == "lengths":
        lengths = torch.randint(0, mask_shape[-1] + 1, mask_shape[:-1], generator=g)
        mask = torch.arange(mask_shape[-1]) < lengths[..., None]
    elif valid == "none":
        mask = torch.zeros(mask_shape, dtype=torch.bool)
    elif valid == "all":
        mask = torch.ones(mask_shape, dtype=torch.bool)
    else:
        mask = (torch.arange(torch.Size(mask_shape).numel()) < valid).reshape(mask_shape)
    return x, mask


def _full_mask(mask, x, axis):
    return mask.unsqueeze(axis).expand(x.shape)


def _packed(t, mask, axis):
    """The valid positions of ``t``, channels last: ``(K, C)``."""
    full = [s for d, s in enumerate(t.shape) if d != axis]
    return t.movedim(axis, -1)[mask.expand(full)]


def _dy(seed, x, mask, axis):
    g = torch.Generator().manual_seed(7 + seed)
    dy = torch.randn(x.shape, generator=g, dtype=F64)
    return torch.where(_full_mask(mask, x, axis), dy, torch.zeros((), dtype=F64))


def _run_case(rank, cfg, *, steps=2, join=False):
    """One configuration: SyncBN on this rank's shard vs the oracle on both ranks' packed valid values."""
    c, axis, act = cfg["c"], cfg.get("axis", 1), cfg.get("act", "identity")
    bn = SyncBatchNorm(c, channel_axis=axis, activation=act, momentum=cfg.get("momentum", 0.1),
                       dtype=F64, timeout=20.0)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, c, dtype=F64))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, c, dtype=F64))
    w, b = bn.weight.detach().numpy().copy(), bn.bias.detach().numpy().copy()
    rm, rv, nbt = torch.zeros(c, dtype=F64).numpy(), torch.ones(c, dtype=F64).numpy(), 0
    for step in range(steps):
        shards = [_shard(10 * step + cfg["seed"], r, *spec) for r, spec in enumerate(cfg["ranks"])]
        axis %= shards[0][0].ndim
        dys = [_dy(10 * step + cfg["seed"] + r, x, m, axis) for r, (x, m) in enumerate(shards)]
        x, mask = shards[rank]
        xs = x.clone().requires_grad_()
        bn.weight.grad = bn.bias.grad = None
        y = bn(xs, mask=mask)
        y.backward(dys[rank])
        # the one-process reference: plain BN on the valid values of both ranks, packed (K, C)
        xp = torch.cat([_packed(xr, mr, axis) for xr, mr in shards]).numpy()
        dyp = torch.cat([_packed(dr, mr, axis) for (_, mr), dr in zip(shards, dys)]).numpy()
        y_ref, mean, var = reference.forward_train(xp, w, b, bn.eps, 1, act, cfg.get("slope", 0.01))
        dx_ref, dw_ref, db_ref = reference.backward(dyp, xp, w, b, bn.eps, 1, act, 0.01)
        start = sum(_packed(xr, mr, axis).shape[0] for xr, mr in shards[:rank])
        k = _packed(x, mask, axis).shape[0]
        what = f"{cfg['name']} step {step}"
        assert y.shape == x.shape and xs.grad.shape == x.shape
        assert_close(_packed(y.detach(), mask, axis), y_ref[start:start + k], what=f"y (valid) {what}")
        # padded positions: normalised with the same (global, valid-only) statistics
        y_all = reference.forward_eval(x.numpy(), mean, var, w, b, bn.eps, axis, act, 0.01)
        assert_close(y, y_all, what=f"y (every position) {what}")
        assert_close(_packed(xs.grad, mask, axis), dx_ref[start:start + k], what=f"dx (valid) {what}")
        pad = ~_full_mask(mask, x, axis)
        assert bool((xs.grad[pad] == 0).all()), f"dx at the padding (dy = 0 there) {what}"
        dw, db = bn.weight.grad.detach().clone(), bn.bias.grad.detach().clone()
        dist.all_reduce(dw)
        dist.all_reduce(db)
        assert_close(dw, dw_ref, what=f"summed dgamma {what}")
        assert_close(db, db_ref, what=f"summed dbeta {what}")
        rm, rv, nbt = reference.update_running_stats(rm, rv, mean, var, xp.shape[0], bn.momentum, nbt)
        assert_close(bn.running_mean, rm, what=f"running_mean {what}")
        assert_close(bn.running_var, rv, what=f"running_var {what}")
        assert int(bn.num_batches_tracked) == nbt, what


_CONFIGS = [
    # (N, C, L) padded sequences on both ranks, lengths 0..L per sample
    {"name": "ncl lengths", "c": 3, "seed": 1, "ranks": [((4, 3, 6), (4, 6), "lengths"),
                                                          ((3, 3, 5), (3, 5), "lengths")]},
    # rank 1's samples are all padding (count 0), a fused activation
    {"name": "ncl rank 1 all padding, leaky_relu", "c": 3, "seed": 2, "act": "leaky_relu",
     "ranks": [((5, 3, 4), (5, 4), "lengths"), ((2, 3, 4), (2, 4), "none")]},
    # rank 0 all padding, (N, C) input with an (N,) mask, cumulative average
    {"name": "nc rank 0 all padding", "c": 4, "seed": 3, "momentum": None,
     "ranks": [((3, 4), (3,), "none"), ((6, 4), (6,), "lengths")]},
    # an empty shard on rank 0 (with its (0, L) mask)
    {"name": "ncl empty shard", "c": 2, "seed": 4, "ranks": [((0, 2, 5), (0, 5), "lengths"),
                                                              ((4, 2, 5), (4, 5), "lengths")]},
    # images, whole samples masked (N, 1, 1), channels last; one rank fully valid
    {"name": "nhwc sample mask", "c": 3, "seed": 5, "axis": -1,
     "ranks": [((3, 2, 2, 3), (3, 1, 1), 2), ((2, 2, 2, 3), (2, 2, 2), "all")]},
    # exactly one valid value on each rank: 2 globally is enough
    {"name": "one valid value per rank", "c": 2, "seed": 6, "ranks": [((2, 2, 3), (2, 3), 1),
                                                                       ((1, 2, 3), (1, 3), 1)]},
]


def case_masked_equals_plain_bn_on_packed_valid_values(rank, world, out):
    for cfg in _CONFIGS:
        _run_case(rank, cfg)


def case_masked_under_sync_join(rank, world, out):
    """Uneven inputs under sync_join: rank 0 has 2 masked batches, rank 1 one (then answers the
    others' collectives); every step equals plain BN on the packed valid values that exist."""
    c = 3
    bn = SyncBatchNorm(c, dtype=F64, timeout=20.0)
    ddp = nn.parallel.DistributedDataParallel(bn, forward_sync_buffers=False)
    specs = [((3, 3, 4), (3, 4), "lengths"), ((2, 3, 5), (2, 5), "lengths")]
    counts = [2, 1]
    rm, rv, nbt = torch.zeros(c, dtype=F64).numpy(), torch.ones(c, dtype=F64).numpy(), 0
    with sync_join(ddp):
        for step in range(counts[rank]):
            x, mask = _shard(20 + step, rank, *specs[rank])
            xs = x.clone().requires_grad_()
            y = ddp(xs, mask=mask)
            dy = _dy(step, x, mask, 1)
            y.backward(dy)
            present = [r for r in range(world) if counts[r] > step]
            shards = [_shard(20 + step, r, *specs[r]) for r in present]
            xp = torch.cat([_packed(xr, mr, 1) for xr, mr in shards]).numpy()
            _, mean, var = reference.forward_train(xp, None, None, bn.eps, 1)
            w, b = bn.weight.detach().numpy(), bn.bias.detach().numpy()
            assert_close(y, reference.forward_eval(x.numpy(), mean, var, w, b, bn.eps, 1),
                         what=f"y under sync_join step {step}")
            me = present.index(rank)
            start = sum(_packed(xr, mr, 1).shape[0] for xr, mr in shards[:me])
            k = _packed(x, mask, 1).shape[0]
            dyp = torch.cat([_packed(_dy(step, xr, mr, 1), mr, 1) for xr, mr in shards]).numpy()
            dx_ref, _, _ = reference.backward(dyp, xp, w, b, bn.eps, 1)
            assert_close(_packed(xs.grad, mask, 1), dx_ref[start:start + k],
                         what=f"dx under sync_join, step {step}")
    for step in range(max(counts)):  # every rank, the joined one too (replayed), has both updates
        present = [r for r in range(world) if counts[r] > step]
        xp = torch.cat([_packed(*_shard(20 + step, r, *specs[r]), 1) for r in present]).numpy()
        _, mean, var = reference.forward_train(xp, None, None, bn.eps, 1)
        rm, rv, nbt = reference.update_running_stats(rm, rv, mean, var, xp.shape[0], bn.momentum, nbt)
    assert_close(bn.running_mean, rm, what="running_mean after sync_join")
    assert_close(bn.running_var, rv, what="running_var after sync_join")
    assert int(bn.num_batches_tracked) == nbt == 2


def _state(bn):
    return [t.detach().clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]


def _unchanged(bn, before, what):
    for a, b in zip(_state(bn), before):
        assert torch.equal(a, b), f"{what}: the running statistics changed"


def _expect(fn, exc, match):
    try:
        fn()
    except exc as e:
        assert match in str(e), f"wrong message: {e}"
        return
    raise AssertionError(f"expected {exc.__name__} matching {match!r}")


def case_fewer_than_two_valid_values_globally(rank, world, out):
    bn = SyncBatchNorm(3, dtype=F64, timeout=20.0)
    x = torch.randn(2, 3, 4, dtype=F64)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    if rank == 0:
        mask[1, 2] = True  # one valid value in the whole global batch
    before = _state(bn)
    _expect(lambda: bn(x, mask=mask), ValueError, "expected more than 1 valid value per channel over the "
                                                  "global batch when training, got 1")
    _unchanged(bn, before, "after the error")
    # no valid value anywhere (rank 0 empty, rank 1 all padding): the same error, count 0
    x0 = torch.randn(0, 3, 4, dtype=F64) if rank == 0 else x
    m0 = torch.zeros(x0.shape[0], 4, dtype=torch.bool)
    _expect(lambda: bn(x0, mask=m0), ValueError, "got 0")
    _unchanged(bn, before, "after the second error")


def case_bad_mask_is_an_error_on_every_rank(rank, world, out):
    bn = SyncBatchNorm(3, dtype=F64, timeout=20.0)
    x = torch.randn(4, 3, 5, dtype=F64)
    good = torch.ones(4, 5, dtype=torch.bool)
    before = _state(bn)
    # rank 0's mask has the wrong dtype, rank 1's is fine: rank 0 gets the mask check's error, rank 1
    # ours naming rank 0 (instead of hanging in the collective), nothing updated on either
    mask = good.float() if rank == 0 else good
    if rank == 0:
        _expect(lambda: bn(x, mask=mask), TypeError, "expected a bool mask")
    else:
        _expect(lambda: bn(x, mask=mask), ValueError, "the mask of rank 0")
    _unchanged(bn, before, "after a bad mask on rank 0")
    # both ranks' masks have the wrong shape: each gets the mask check's error
    _expect(lambda: bn(x, mask=torch.ones(4, dtype=torch.bool)), ValueError,
            "expected a mask of shape (4, 5)")
    _unchanged(bn, before, "after bad masks on both ranks")
    # the group is still usable: a good forward and backward run in step
    xs = x.clone().requires_grad_()
    bn(xs, mask=good).sum().backward()
    assert int(bn.num_batches_tracked) == 1


def case_no_update_without_track_running_stats(rank, world, out):
    """As torch's SyncBN: buffers present but track_running_stats off in training = batch statistics,
    buffers untouched (masked or not)."""
    bn = SyncBatchNorm(3, dtype=F64, timeout=20.0)
    bn.track_running_stats = False
    before = _state(bn)
    x = torch.randn(3 + rank, 3, 4, dtype=F64) * 2 + 1
    for mask in (None, torch.arange(4) < torch.tensor([4, 2, 0, 1])[:3 + rank, None]):
        xs = x.clone().requires_grad_()
        y = bn(xs, mask=mask)
        y.sum().backward()
        _unchanged(bn, before, f"track_running_stats=False, mask={mask is not None}")
        parts = [torch.empty(0)] * world
        dist.all_gather_object(parts, (x, mask))
        xp = torch.cat([_packed(xr, torch.ones(xr.shape[0], 4, dtype=torch.bool) if mr is None else mr, 1)
                        for xr, mr in parts]).numpy()
        _, mean, var = reference.forward_train(xp, None, None, bn.eps, 1)
        assert_close(y, reference.forward_eval(x.numpy(), mean, var, bn.weight.detach().numpy(),
                                               bn.bias.detach().numpy(), bn.eps, 1), what="y, not tracked")


_CASES = [case_masked_equals_plain_bn_on_packed_valid_values, case_masked_under_sync_join,
          case_fewer_than_two_valid_values_globally, case_bad_mask_is_an_error_on_every_rank,
          case_no_update_without_track_running_stats]


def worker(rank: int, world: int, out: Path) -> dict:
    return run_cases(_CASES, rank, world, out)


# -- the tests (parent side) --------------------------------------------------------------------
@pytest.mark.parametrize("case", [c.__name__ for c in _CASES])
def test_masked_sync_two_ranks(case):
    check(launch_once("test_sync_masked:worker", 2, deadline_s=120, pg_timeout=30), case)


def test_without_peers_masked_sync_bn_is_masked_bn():
    """One process (no process group): SyncBatchNorm(x, mask=) is BatchNorm1d(x, mask=), eval included."""
    assert not dist.is_initialized()
    x = torch.randn(4, 3, 6, dtype=F64)
    mask = torch.arange(6) < torch.tensor([6, 3, 0, 2])[:, None]
    sync, plain = SyncBatchNorm(3, dtype=F64), batchnorm.BatchNorm1d(3, dtype=F64)
    for mode in ("train", "eval"):
        sync.train(mode == "train")
        plain.train(mode == "train")
        assert torch.equal(sync(x, mask=mask), plain(x, mask=mask)), mode
    assert torch.equal(sync.running_mean, plain.running_mean)
    assert torch.equal(sync.running_var, plain.running_var)
    with pytest.raises(TypeError, match="expected a bool mask"):
        sync.train()(x, mask=mask.int())
