"""Running statistics that follow gradient accumulation (issue 17): k micro-batches, one update.

With :func:`batchnorm.accumulate_stats` open, k micro-batches of a BN layer's input must leave the
running statistics one forward of the concatenated batch would leave (float64: to the last few
bits), with ``momentum`` a number or None, masked or not, on our layers, torch's, and SyncBN across
real processes (merged across ranks and micro-batches); the forward and gradients of every
micro-batch stay as without it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.sync_harness import check, launch, run_cases
from helpers.util import assert_close
from hypothesis import given
from hypothesis import strategies as st

import batchnorm
from batchnorm import reference as R
from batchnorm.family.accumulate import accumulate_stats
from batchnorm.family.ghost import GhostBatchNorm1d

F64 = torch.float64


def _buffers(m):
    return m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()


def _assert_same_stats(a, b, what=""):
    assert_close(a.running_mean, b.running_mean, rtol=1e-13, atol=1e-14, what=f"{what} running_mean")
    assert_close(a.running_var, b.running_var, rtol=1e-13, atol=1e-14, what=f"{what} running_var")
    assert int(a.num_batches_tracked) == int(b.num_batches_tracked)


LAYERS = {
    "ours": lambda c, mom: batchnorm.BatchNorm1d(c, momentum=mom),
    "act": lambda c, mom: batchnorm.BatchNormAct1d(c, momentum=mom, running_var_unbiased=False),
    "torch": lambda c, mom: torch.nn.BatchNorm1d(c, momentum=mom),
    "sync-1-process": lambda c, mom: batchnorm.SyncBatchNorm(c, momentum=mom),
}


@given(kind=st.sampled_from(sorted(LAYERS)), sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4),
       steps=st.integers(1, 3), momentum=st.sampled_from([0.1, 0.5, None]), c=st.integers(1, 3))
def test_k_micro_batches_equal_one_large_batch(kind, sizes, steps, momentum, c):
    if sum(sizes) * 3 < 2:
        return
    acc_layer = LAYERS[kind](c, momentum).double()
    big = copy.deepcopy(acc_layer)
    g = torch.Generator().manual_seed(len(sizes) * 10 + steps)
    with accumulate_stats(acc_layer) as acc:
        for _ in range(steps):
            parts = [torch.randn(s, c, 3, generator=g, dtype=F64) * 2 + 3 for s in sizes]
            for p in parts:
                if p.shape[0] * 3 > 1:
                    acc_layer(p)
            parts = [p for p in parts if p.shape[0] * 3 > 1]
            if parts:
                big(torch.cat(parts))
            acc.step()
    _assert_same_stats(acc_layer, big, kind)
    # and both follow the float64 oracle of one update per step (first step checked by hand here)


def test_against_the_oracle_and_outputs_unchanged():
    torch.manual_seed(0)
    layer = batchnorm.BatchNormAct2d(3, momentum=0.3).double()
    plain = copy.deepcopy(layer)
    xs = [torch.randn(n, 3, 4, 4, dtype=F64, requires_grad=True) for n in (2, 5, 1)]
    with accumulate_stats(layer):
        ys = [layer(x) for x in xs]
    for x, y in zip(xs, ys):
        x2 = x.detach().clone().requires_grad_()
        y2 = plain(x2)
        assert torch.equal(y, y2)  # each micro-batch normalised by its own statistics, as before
        y.sum().backward()
        y2.sum().backward()
        assert torch.equal(x.grad, x2.grad)
    whole = torch.cat([x.detach() for x in xs]).movedim(1, -1).reshape(-1, 3).numpy()
    mean, var = R.moments(whole)
    rm, rv, nbt = R.update_running_stats(np.zeros(3), np.ones(3), mean, var, whole.shape[0], 0.3, 0)
    assert_close(layer.running_mean, rm, rtol=1e-13, atol=1e-14)
    assert_close(layer.running_var, rv, rtol=1e-13, atol=1e-14)
    assert int(layer.num_batches_tracked) == nbt == 1


def test_gradient_accumulation_loop_with_cumulative_average():
    """A training loop: k micro-batches, optimizer step, acc.step(); momentum=None counts steps."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(batchnorm.BatchNorm1d(4, momentum=None), torch.nn.Linear(4, 2),
                                torch.nn.BatchNorm1d(2, momentum=None)).double()
    big = copy.deepcopy(model[0])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [torch.randn(12, 4, dtype=F64) * 3 - 1 for _ in range(5)]
    with accumulate_stats(model) as acc:
        for batch in data:
            for xb in batch.chunk(3):
                model(xb).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            assert acc.step() == ["0", "2"]
            big(batch)
    _assert_same_stats(model[0], big, "first BN")  # its input does not depend on the weights
    assert int(model[2].num_batches_tracked) == 5  # one per optimizer step, not 15
    # cumulative average of 5 equal-size steps: mean of the step means
    step_means = np.mean([d.mean(0).numpy() for d in data], 0)
    assert_close(model[0].running_mean, step_means, rtol=1e-12, atol=1e-13)


def test_masked_micro_batches_equal_the_masked_large_batch():
    torch.manual_seed(2)
    layer = batchnorm.BatchNorm1d(3).double()
    big = copy.deepcopy(layer)
    xs = [torch.randn(3, 3, 6, dtype=F64) for _ in range(3)]
    lengths = [[6, 0, 2], [1, 1, 5], [3, 6, 6]]
    masks = [torch.arange(6)[None] < torch.tensor(L)[:, None] for L in lengths]
    with accumulate_stats(layer):
        for x, m in zip(xs, masks):
            layer(x, mask=m)
    big(torch.cat(xs), mask=torch.cat(masks))
    _assert_same_stats(layer, big, "masked")
    layer2 = batchnorm.BatchNorm1d(3).double()
    with accumulate_stats(layer2):  # the mask passed positionally is seen too
        for x, m in zip(xs, masks):
            layer2(x, m)
    _assert_same_stats(layer2, big, "positional mask")


def test_eval_forwards_discard_and_pending():
    layer = batchnorm.BatchNorm1d(2).double()
    before = _buffers(layer)
    with accumulate_stats(layer) as acc:
        layer(torch.randn(4, 2, dtype=F64))
        layer.eval()
        layer(torch.randn(4, 2, dtype=F64))  # eval: nothing recorded
        layer.train()
        assert acc.pending == {"": 1}
        assert set(acc.merged()) == {""} and float(acc.merged()[""].count) == 4
        acc.discard()
        assert acc.pending == {"": 0}
        assert acc.step() == []
    assert all(torch.equal(a, b) for a, b in zip(before, _buffers(layer)))
    assert layer.track_running_stats


def test_an_error_in_the_block_drops_the_pending_update_and_restores_the_layers():
    layer = batchnorm.BatchNorm1d(2)
    before = _buffers(layer)
    with pytest.raises(RuntimeError, match="boom"), accumulate_stats(layer):
        layer(torch.randn(4, 2))
        raise RuntimeError("boom")
    assert all(torch.equal(a, b) for a, b in zip(before, _buffers(layer)))
    assert layer.track_running_stats and not layer._forward_hooks and not layer._forward_pre_hooks
    # a forward that raises inside the block records nothing and leaves tracking on
    with accumulate_stats(layer) as acc:
        with pytest.raises(ValueError, match="expected 2 channels"):
            layer(torch.randn(4, 3))
        assert layer.track_running_stats and acc.pending == {"": 0}
        layer(torch.randn(4, 2))
        assert acc.pending == {"": 1}
    assert layer.track_running_stats and int(layer.num_batches_tracked) == 1


def test_nonfinite_policy_applies_to_the_merged_statistics():
    layer = batchnorm.BatchNorm1d(2, nonfinite="skip")
    before = _buffers(layer)
    with accumulate_stats(layer):
        layer(torch.randn(4, 2))
        layer(torch.tensor([[float("nan"), 1.0], [2.0, 3.0]]))
    assert all(torch.equal(a, b) for a, b in zip(before, _buffers(layer)))
    raising = batchnorm.BatchNorm1d(2, nonfinite="raise")
    with pytest.raises(FloatingPointError, match="merged micro-batch statistics"), accumulate_stats(raising):
        raising(torch.tensor([[float("inf"), 1.0], [2.0, 3.0]]))


def test_bad_arguments():
    with pytest.raises(TypeError, match="expected an nn\\.Module"):
        accumulate_stats([1, 2])
    model = torch.nn.Sequential(batchnorm.BatchNorm1d(2), GhostBatchNorm1d(2, virtual_batch_size=2))
    with pytest.raises(ValueError, match=r"\['1 \(GhostBatchNorm1d\)'\] keep running statistics other"):
        accumulate_stats(model)
    with pytest.raises(ValueError, match=r"\['nope'\] are not BN layers"):
        accumulate_stats(model, layers=["nope"])
    acc = accumulate_stats(model, layers=["0"])
    with acc:
        model(torch.randn(4, 2))
        with pytest.raises(RuntimeError, match="already open"), acc:
            pass
    assert int(model[0].num_batches_tracked) == 1 and int(model[1].num_batches_tracked) == 1
    layer = batchnorm.BatchNorm1d(2)
    with accumulate_stats(layer), pytest.raises(ValueError, match="expected a mask of shape"):
        layer(torch.randn(3, 2, 4), mask=torch.ones(3, dtype=torch.bool))
    assert int(layer.num_batches_tracked) == 0 and layer.track_running_stats


# -- SyncBN: 2 real processes (gloo), merged across ranks and micro-batches -----------------------
def _global_data(seed=5):
    g = torch.Generator().manual_seed(seed)
    # rank 0: micro-batches of 3 and 2 samples; rank 1: 4 and 0 (an empty micro-batch)
    return [[torch.randn(n, 3, 5, generator=g, dtype=F64) * 2 + 1 for n in sizes]
            for sizes in ([3, 2], [4, 0])]


def case_sync_micro_batches_equal_global_large_batch(rank, world, out):
    data = _global_data()
    for momentum in (0.2, None):
        layer = batchnorm.SyncBatchNorm(3, momentum=momentum).double()
        with accumulate_stats(layer) as acc:
            for _ in range(2):
                for xb in data[rank]:
                    layer(xb).sum().backward()  # (every rank joins the backward's all_reduce)
                acc.step()
        ref = batchnorm.BatchNorm1d(3, momentum=momentum).double()
        whole = torch.cat([xb for r in data for xb in r])
        ref(whole)
        ref(whole)
        _assert_same_stats(layer, ref, f"rank {rank} momentum={momentum}")


def worker(rank: int, world: int, out: Path) -> dict:
    return run_cases([case_sync_micro_batches_equal_global_large_batch], rank, world, out)


def test_sync_bn_across_two_processes():
    results = launch("test_family_accumulate:worker", 2, deadline_s=120)
    check(results, "case_sync_micro_batches_equal_global_large_batch")
