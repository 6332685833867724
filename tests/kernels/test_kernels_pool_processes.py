"""BN outputs that cross a process boundary arrive intact (the pool never reuses shared memory).

The story (issue 16, item 1): a ``DataLoader`` worker or a ``torch.multiprocessing`` queue moves a
tensor's storage into shared memory that the receiving process maps; the sender's local tensor
dies right after. A pool that then hands the storage to the next output overwrites what the
receiver holds (four of six items ended up as the last one). Each item here is a pooled size
(>= 1 MiB) and different from the others, and is compared with torch's own BatchNorm2d.
"""

from __future__ import annotations

import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset

import batchnorm
from batchnorm import kernels
from batchnorm.kernels import _pool

SHAPE = (1, 32, 96, 96)  # 1.2 MB of float32: every output goes through the pool
ITEMS = 6


def _layers() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    ours = batchnorm.BatchNorm2d(32)
    with torch.no_grad():
        ours.running_mean.uniform_(-1, 1)
        ours.running_var.uniform_(0.5, 2)
        ours.weight.uniform_(0.5, 2)
        ours.bias.uniform_(-1, 1)
    theirs = torch.nn.BatchNorm2d(32)
    theirs.load_state_dict(ours.state_dict())
    return ours.eval(), theirs.eval()


def _input(i: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i))


class _BNOutputs(Dataset):
    def __init__(self) -> None:
        self.bn = _layers()[0]

    def __len__(self) -> int:
        return ITEMS

    def __getitem__(self, i: int) -> torch.Tensor:
        # (forced: under auto an input this size runs torch's native kernel, which has no pool)
        with torch.no_grad(), kernels.use_backend("numba"):
            return self.bn(_input(i))


def _expected() -> list[torch.Tensor]:
    theirs = _layers()[1]
    with torch.no_grad():
        return [theirs(_input(i)) for i in range(ITEMS)]


def _check(items: list[torch.Tensor]) -> None:
    assert len(items) == ITEMS
    for i, (got, want) in enumerate(zip(items, _expected(), strict=True)):
        err = (got - want).abs().max().item()
        assert err < 1e-5, f"item {i} changed after it was sent: max |error| {err:.3g}"


def test_outputs_from_a_dataloader_worker_arrive_intact():
    assert _pool.limit() > 0, "the pool must be on for this test to mean anything"
    _BNOutputs()[0]  # compile in the parent: the forked worker inherits it
    loader = DataLoader(_BNOutputs(), batch_size=None, num_workers=1, multiprocessing_context="fork")
    items = list(loader)  # all six are held at once, as in the report
    _check(items)


def _producer(q, done) -> None:
    ds = _BNOutputs()
    for i in range(ITEMS):
        q.put(ds[i])  # the local reference dies at once; the queue's feeder shares the storage
    done.wait(60)  # keep the shared memory's sender alive until everything has been received


def test_outputs_through_a_multiprocessing_queue_arrive_intact():
    ctx = mp.get_context("fork")
    q, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_producer, args=(q, done))
    proc.start()
    try:
        items = [q.get(timeout=60) for _ in range(ITEMS)]
        _check(items)
    finally:
        done.set()
        proc.join(30)
    assert proc.exitcode == 0
