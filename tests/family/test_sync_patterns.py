"""Our BN and SyncBN under DDP in the patterns that used to break BN: two forwards before one
backward (GANs, contrastive pairs), ``torch.utils.checkpoint`` (reentrant and not), each with DDP's
buffer broadcast on and off (``forward_sync_buffers``), 2 gloo ranks, float64.

* SyncBN + DDP equals one process running torch's plain BN on the concatenated batch, without
  checkpointing (outputs of every step, trained parameters, running statistics: a checkpoint's
  recomputation does not update SyncBN's running statistics a second time).
* Our BN + DDP (per-rank statistics) equals torch's BN + DDP in the same pattern up to float64
  rounding; the running statistics too, except under non-reentrant checkpointing (see below).

pytorch#22095 (an in-place error when DDP broadcasts buffers between two forwards) does not
occur with torch 2.13 for either module: DDP now broadcasts buffers under
``torch.autograd._unsafe_preserve_version_counter``, and our layers never hand the running
statistics to autograd (they are updated under ``no_grad`` and not saved for backward). Both
checks run here, so a regression in either would show.

Running statistics under checkpointing: torch's BN updates them twice per step (once more in the
recomputation). Our plain BN (``batchnorm.core``) does too with reentrant checkpointing; with
non-reentrant checkpointing torch stops the recomputation early once every saved tensor is back,
so our last BN layer (which saves nothing the recomputation needs) is not rerun and counts the batch
once while torch's counts it twice: there the buffers are not compared. SyncBN skips the update in
any recomputation (``_in_backward``), which is what a model without checkpointing computes.
"""

from __future__ import annotations

import pytest
import torch
from helpers.sync_harness import check
from helpers.util import assert_close
from torch import nn
from torch.utils.checkpoint import checkpoint

import batchnorm
from batchnorm.family.sync import convert_sync_batchnorm

F64 = torch.float64
TOL = 1e-10
PATTERNS = ["two_forwards", "checkpoint_reentrant", "checkpoint"]


class _Checkpointed(nn.Module):
    def __init__(self, net, reentrant):
        super().__init__()
        self.net, self.reentrant = net, reentrant

    def forward(self, x):
        return checkpoint(self.net, x, use_reentrant=self.reentrant)


def _net(bn):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), bn(6), nn.ReLU(), nn.Linear(6, 3), bn(3)).double()


def _wrap(net, pattern):
    return net if pattern == "two_forwards" else _Checkpointed(net, pattern == "checkpoint_reentrant")


def _data(step, world):
    g = torch.Generator().manual_seed(step)
    sizes = [3 + r for r in range(world)]  # uneven shards
    return [torch.randn(n, 4, generator=g, dtype=F64) * 2 + 1 for n in sizes]


def _loss(model, x, n_all, scale, pattern):
    """One or two forwards of ``model`` then one loss (the pattern's forward part)."""
    out = model(x)
    outs = [out]
    loss = (out ** 2).sum()
    if pattern == "two_forwards":  # a second forward before the backward
        out2 = model(x * 0.5 - 1)
        outs.append(out2)
        loss = loss + (out2 ** 3).sum()
    return loss * scale / n_all, outs


def _run(rank, world, pattern, sync_buffers, ours, reference, one_process):
    """Train ``ours`` (a BN class) under DDP for 2 steps; compare with ``reference`` (torch's BN)
    under DDP, or, with ``one_process``, with the reference on the whole batch in this process."""
    model = _net(ours)
    if ours is batchnorm.SyncBatchNorm:
        model = convert_sync_batchnorm(_net(nn.BatchNorm1d))
    ref_model = _net(reference)
    ddp = nn.parallel.DistributedDataParallel(_wrap(model, pattern), forward_sync_buffers=sync_buffers)
    if one_process:  # the plain model: checkpointing must change nothing
        ref = ref_model
    else:
        ref = nn.parallel.DistributedDataParallel(_wrap(ref_model, pattern),
                                                  forward_sync_buffers=sync_buffers)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for step in range(2):
        shards = _data(step, world)
        n_all = sum(s.shape[0] for s in shards)
        x = shards[rank].clone().requires_grad_(pattern == "checkpoint_reentrant")
        opt.zero_grad()
        loss, outs = _loss(ddp, x, n_all, world, pattern)  # DDP averages: scale to the global mean
        loss.backward()
        opt.step()
        ref_opt.zero_grad()
        if one_process:
            xa = torch.cat(shards).requires_grad_(pattern == "checkpoint_reentrant")
            ref_loss, ref_outs = _loss(ref, xa, n_all, 1, pattern)
            start = sum(s.shape[0] for s in shards[:rank])
            ref_outs = [o[start:start + x.shape[0]] for o in ref_outs]
        else:
            ref_loss, ref_outs = _loss(ref, x, n_all, world, pattern)
        ref_loss.backward()
        ref_opt.step()
        for i, (a, b) in enumerate(zip(outs, ref_outs)):
            assert_close(a.detach(), b.detach(), rtol=TOL, atol=TOL, what=f"output {i} of step {step}")
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert_close(p, q, rtol=TOL, atol=TOL, what=f"parameter {name}")
    if not one_process and pattern == "checkpoint":
        return  # early-stopped recomputation: see the module docstring
    for (name, b), c in zip(model.named_buffers(), ref_model.buffers()):
        assert_close(b, c, rtol=TOL, atol=TOL, what=f"buffer {name}")
    # two steps; a second forward counts, a recomputation counts for torch's BN and not for SyncBN
    updates = 4 if pattern == "two_forwards" or not one_process else 2
    assert int(model[1].num_batches_tracked) == int(model[4].num_batches_tracked) == updates


def cases():
    """The cases, run by test_sync_join's world-2 spawn."""
    found = []
    for pattern in PATTERNS:
        for fsb in (True, False):
            def case_sync(rank, world, out, pattern=pattern, fsb=fsb):
                _run(rank, world, pattern, fsb, batchnorm.SyncBatchNorm, nn.BatchNorm1d, one_process=True)

            def case_ours(rank, world, out, pattern=pattern, fsb=fsb):
                _run(rank, world, pattern, fsb, batchnorm.BatchNorm1d, nn.BatchNorm1d, one_process=False)

            case_sync.__name__ = f"syncbn:{pattern}:buffers={fsb}"
            case_ours.__name__ = f"ours:{pattern}:buffers={fsb}"
            found += [case_sync, case_ours]
    return found


@pytest.mark.parametrize("case", [c.__name__ for c in cases()])
def test_patterns_under_ddp(case):
    from test_sync_join import world

    check(world(2), case)


def test_every_pattern_is_covered():
    names = [c.__name__ for c in cases()]
    assert len(names) == len(set(names)) == 2 * len(PATTERNS) * 2


def test_reference_is_sensitive():
    """The one-process comparison can fail: per-rank statistics (plain BN) differ from it."""
    shards = _data(0, 2)
    whole = _net(nn.BatchNorm1d)(torch.cat(shards))
    per_rank = torch.cat([_net(nn.BatchNorm1d)(s) for s in shards])
    assert (whole - per_rank).abs().max() > 1e-3
