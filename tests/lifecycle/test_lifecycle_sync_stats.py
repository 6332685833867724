"""sync_running_stats: plain BN layers' running statistics merged exactly over 3 gloo ranks.

Each rank's layers hold statistics of its own shard (shards of different sizes and means). After
the call every rank holds the statistics of the union: compared with the float64 NumPy moments of
the concatenated shards (``counts`` = values per channel, both variance conventions), and with the
law of total variance for the default weights (``num_batches_tracked``). One spawn runs all cases.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers.sync_harness import check, launch, run_cases
from helpers.util import assert_close
from torch import nn

import batchnorm
from batchnorm.lifecycle.sync_stats import sync_running_stats

F64 = torch.float64
WORLD = 3


def _shard(rank, c, tail=()):
    g = torch.Generator().manual_seed(rank)
    n = 2 + 3 * rank  # 2, 5, 8 samples: uneven
    return torch.randn(n, c, *tail, generator=g, dtype=F64) * (1 + rank) + 2 * rank  # means differ


def _values(x):
    """(values per channel, C) as NumPy: the layout the oracle reduces over."""
    return np.moveaxis(x.numpy(), 1, -1).reshape(-1, x.shape[1])


def _model():
    return nn.Sequential(nn.BatchNorm1d(3), batchnorm.BatchNorm1d(3, running_var_unbiased=False),
                         batchnorm.BatchNorm2d(2)).double()


_TAILS = {"0": (), "1": (), "2": (2, 2)}
_CHANNELS = {"0": 3, "1": 3, "2": 2}


def case_exact_with_counts(rank, world, out):
    """Buffers = exact moments of each rank's shard; counts = values per channel: the result is the
    exact mean and variance (unbiased or biased, per layer) of the concatenated shards."""
    model = _model()
    counts = {}
    for name, m in model.named_children():
        v = _values(_shard(rank, _CHANNELS[name], _TAILS[name]))
        with torch.no_grad():
            m.running_mean.copy_(torch.from_numpy(v.mean(0)))
            m.running_var.copy_(torch.from_numpy(v.var(0, ddof=0 if name == "1" else 1)))
            m.num_batches_tracked.fill_(rank + 1)
        counts[name] = v.shape[0]
    assert sync_running_stats(model, counts=counts) == ["0", "1", "2"]
    for name, m in model.named_children():
        allv = np.concatenate([_values(_shard(r, _CHANNELS[name], _TAILS[name])) for r in range(world)])
        ddof = 0 if name == "1" else 1
        assert_close(m.running_mean, allv.mean(0), rtol=1e-12, atol=1e-12, what=f"{name} mean")
        assert_close(m.running_var, allv.var(0, ddof=ddof), rtol=1e-12, atol=1e-12, what=f"{name} var")
        assert int(m.num_batches_tracked) == world
        # the check can fail: a mean of the ranks' variances misses the spread between their means
        naive = np.mean([_values(_shard(r, _CHANNELS[name], _TAILS[name])).var(0, ddof=ddof)
                         for r in range(world)], axis=0)
        assert np.max(np.abs(naive - allv.var(0, ddof=ddof))) > 0.5


def case_default_weights_are_batches(rank, world, out):
    """counts=None: weights num_batches_tracked, variance merged by the law of total variance; with
    momentum=None and equal batch sizes the mean is exactly one process's cumulative average."""
    g = torch.Generator().manual_seed(100)
    batches = {r: [torch.randn(4, 3, generator=g, dtype=F64) + r for _ in range(r + 1)] for r in range(world)}
    bn = nn.BatchNorm1d(3, momentum=None).double()
    for b in batches[rank]:
        bn(b)
    one = nn.BatchNorm1d(3, momentum=None).double()  # one process sees every rank's batches
    stats = []
    for r in range(world):
        mine = nn.BatchNorm1d(3, momentum=None).double()
        for b in batches[r]:
            one(b)
            mine(b)
        stats.append((len(batches[r]), mine.running_mean.numpy().copy(), mine.running_var.numpy().copy()))
    assert sync_running_stats(nn.Sequential(bn)) == ["0"]
    assert_close(bn.running_mean, one.running_mean, rtol=1e-12, atol=1e-12, what="cumulative mean")
    w = np.array([s[0] for s in stats], dtype=np.float64)
    w /= w.sum()
    mu = sum(wi * s[1] for wi, s in zip(w, stats))
    var = sum(wi * (s[2] + (s[1] - mu) ** 2) for wi, s in zip(w, stats))
    assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12, what="law of total variance")
    assert int(bn.num_batches_tracked) == world
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    sync_running_stats(nn.Sequential(bn))  # a second call changes nothing
    for k, v in bn.state_dict().items():
        assert_close(v, before[k], rtol=1e-14, atol=1e-14, what=f"second call, {k}")


def case_skips_sync_and_untracked(rank, world, out):
    sync = batchnorm.SyncBatchNorm(2).double()
    with torch.no_grad():
        sync.running_mean.fill_(rank)  # would never differ in real use; here it shows it is skipped
    plain, fresh = nn.BatchNorm1d(2).double(), nn.BatchNorm1d(2)
    with torch.no_grad():
        plain.running_mean.fill_(rank)
        plain.num_batches_tracked.fill_(1)
        fresh.running_mean.fill_(rank)  # num_batches_tracked 0 everywhere: nothing seen, left alone
    model = nn.Sequential(sync, nn.BatchNorm1d(2, track_running_stats=False), plain, fresh)
    assert sync_running_stats(model) == ["2"]
    assert torch.equal(sync.running_mean, torch.full((2,), float(rank), dtype=F64))
    assert torch.equal(fresh.running_mean, torch.full((2,), float(rank)))
    assert_close(plain.running_mean, np.full(2, (world - 1) / 2), what="merged plain BN")


def case_models_differ(rank, world, out):
    model = nn.Sequential(*[nn.BatchNorm1d(2) for _ in range(1 + (rank == 1))])
    with torch.no_grad():
        model[0].running_mean.fill_(rank)
    try:
        sync_running_stats(model)
    except ValueError as e:
        assert "differ in their BN layers" in str(e) and "rank 1: 2 layers" in str(e), e
    else:
        raise AssertionError("different models were not detected")
    assert torch.equal(model[0].running_mean, torch.full((2,), float(rank)))


def case_bad_counts_change_nothing(rank, world, out):
    model = nn.Sequential(nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].running_mean.fill_(rank)
    for bad, msg in ((-1, "finite number >= 0"), (float("nan"), "finite number >= 0"),
                     (True, "finite number"), ({"1": 3}, "unknown"), ({}, "missing")):
        with pytest.raises(ValueError, match=msg):
            sync_running_stats(model, counts=bad)
    assert torch.equal(model[0].running_mean, torch.full((2,), float(rank)))


_CASES = [case_exact_with_counts, case_default_weights_are_batches, case_skips_sync_and_untracked,
          case_models_differ, case_bad_counts_change_nothing]


def worker(rank, world, out):
    return run_cases(_CASES, rank, world, out)


@pytest.fixture(scope="module")
def world3():
    return launch("test_lifecycle_sync_stats:worker", WORLD, deadline_s=120, pg_timeout=30)


@pytest.mark.parametrize("case", [c.__name__ for c in _CASES])
def test_three_ranks(world3, case):
    check(world3, case)


def test_without_a_process_group_nothing_happens():
    assert not dist.is_initialized()
    model = nn.Sequential(nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].running_mean.fill_(3.0)
    assert sync_running_stats(model) == []
    assert torch.equal(model[0].running_mean, torch.full((2,), 3.0))
    with pytest.raises(TypeError, match=r"sync_running_stats: expected an nn\.Module"):
        sync_running_stats("model")
    with pytest.raises(ValueError, match="finite number"):
        sync_running_stats(model, counts=-2)
