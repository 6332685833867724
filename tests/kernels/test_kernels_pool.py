"""The output reuse pool: recycles a buffer only when nothing else can still see it.

The story: a buffer comes back only after every tensor, view, autograd-saved tensor and numpy
array that refers to it is gone; a training step whose graph is still alive never has its saved
output overwritten by the next forward; the limit and ``clear`` behave; bad limits are rejected
without changing the pool.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from helpers.util import assert_close

import batchnorm
from batchnorm import reference as R
from batchnorm.kernels import _pool

BIG = (4, 16, 64, 64)  # 1 MiB of float32: the pool's smallest size


@pytest.fixture(autouse=True)
def _fresh_pool():
    old = _pool.limit()
    _pool.set_limit(1 << 30)
    _pool.clear()
    yield
    _pool.set_limit(old)
    _pool.clear()


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_reuses_only_idle_buffers():
    x = torch.randn(BIG)
    a = _pool.empty_like(x)
    assert a.shape == x.shape and a.stride() == x.stride() and a.dtype == x.dtype
    b = _pool.empty_like(x)
    assert _ptr(b) != _ptr(a), "a buffer still referenced was handed out again"
    pa = _ptr(a)
    view = a[1:]
    del a
    c = _pool.empty_like(x)
    assert _ptr(c) not in (pa, _ptr(b)), "a buffer kept alive by a view was reused"
    pc = _ptr(c)
    del view, c
    d = _pool.empty_like(x)
    assert _ptr(d) in (pa, pc), "an idle buffer was not reused"
    assert _pool.stats()["buffers"] == 3 and _pool.stats()["idle"] == 1


def test_numpy_views_and_channels_last_strides():
    x = torch.randn(BIG).contiguous(memory_format=torch.channels_last)
    a = _pool.empty_like(x)
    assert a.stride() == x.stride()
    arr = a.numpy()
    pa = _ptr(a)
    del a
    gc.collect()
    b = _pool.empty_like(x)
    assert _ptr(b) != pa, "a numpy view of the buffer did not keep it out of the pool"
    arr[...] = 1.0  # still valid memory
    del arr, b
    c = _pool.empty_like(x)
    assert c.stride() == x.stride()


def test_saved_outputs_survive_the_next_forward():
    """Two forwards before one backward: the first graph's saved y must not be recycled by the second."""
    bn = batchnorm.BatchNormAct2d(16, activation="elu", negative_slope=1.0)  # ELU's backward reads y
    x1 = torch.randn(BIG, requires_grad=True)
    y1 = bn(x1)
    y1_ptr = _ptr(y1)
    loss1 = y1.sum()
    del y1  # only the autograd graph (its saved output) refers to the buffer now ...
    y2 = bn(torch.randn(BIG))
    assert _ptr(y2) != y1_ptr, "... so the pool must not hand it to the next forward"
    y2.fill_(1e30)  # scribble over the new output
    loss1.backward()
    xn = x1.detach().double().numpy()
    ref_dx = R.backward(np.ones(BIG), xn, np.ones(16), np.zeros(16), 1e-5, 1, "elu", 1.0)[0]
    assert_close(x1.grad, ref_dx, rtol=1e-4, atol=1e-5, what="dx of the first graph")


def test_limit_and_clear():
    x = torch.randn(BIG)
    _pool.set_limit(0)
    a = _pool.empty_like(x)
    assert _pool.stats()["buffers"] == 0 and a.shape == x.shape
    _pool.set_limit(1 << 30)
    a = _pool.empty_like(x)
    b = _pool.empty_like(x)
    assert _pool.stats()["buffers"] == 2
    del a
    _pool.clear()
    st = _pool.stats()
    assert st["buffers"] == 1 and st["idle"] == 0, "clear() dropped a buffer still in use or kept an idle one"
    del b
    _pool.clear()
    assert _pool.stats()["bytes"] == 0


def test_small_outputs_bypass_the_pool():
    small = torch.randn(8, 8)
    _pool.empty_like(small)
    assert _pool.stats()["buffers"] == 0


def test_growing_an_output_in_place_is_refused_and_shrinking_works():
    """The documented difference from torch.empty_like: a pooled storage is not resizable."""
    x = torch.randn(BIG)
    a = _pool.empty_like(x)
    with pytest.raises(RuntimeError, match="not resizable"):
        a.resize_(2 * x.numel())
    a.resize_(10).fill_(3.0)  # shrinking keeps the storage
    assert a.shape == (10,) and a.untyped_storage().nbytes() == x.numel() * 4


def _fill_and_drop(x: torch.Tensor, value: float) -> None:
    _pool.empty_like(x).fill_(value)


def test_a_storage_object_keeps_the_buffer_out_of_the_pool():
    """The hole of the reference-count design: ``y.untyped_storage()`` was the pool's own object."""
    x = torch.randn(BIG)
    y = _pool.empty_like(x).fill_(1.0)
    st = y.untyped_storage()
    del y
    for v in (2.0, 3.0):
        _fill_and_drop(x, v)
    kept = torch.empty(0).set_(st, 0, x.shape, x.stride())
    assert torch.equal(kept, torch.ones(BIG)), "a buffer still held as a storage object was reused"
    del st, kept
    assert _pool.stats()["idle"] == 2, "the buffer did not come back once the storage object died"


@pytest.mark.parametrize("export", ["numpy", "dlpack", "tensor.storage"])
def test_exports_keep_the_buffer_out_of_the_pool(export):
    x = torch.randn(BIG)
    y = _pool.empty_like(x).fill_(1.0)
    if export == "numpy":
        held = y.numpy()
        read = lambda: torch.from_numpy(held)  # noqa: E731
    elif export == "dlpack":
        held = torch.utils.dlpack.to_dlpack(y)
        read = lambda: torch.utils.dlpack.from_dlpack(held)  # noqa: E731
    else:
        held = y.untyped_storage()
        read = lambda: torch.empty(0).set_(held, 0, x.shape, x.stride())  # noqa: E731
    del y
    gc.collect()
    for v in (2.0, 3.0):
        _fill_and_drop(x, v)
    assert torch.equal(read(), torch.ones(BIG)), f"an output exported through {export} was overwritten"


def test_shared_memory_is_never_the_pools():
    """share_memory_ (what a multiprocessing queue does) moves the data out of the pool's block."""
    x = torch.randn(BIG)
    y = _pool.empty_like(x).fill_(1.0)
    y.share_memory_()
    assert y.is_shared()
    shared_ptr = y.data_ptr()
    view = torch.empty(0).set_(y.untyped_storage(), 0, x.shape, x.stride())
    del y
    outs = [_pool.empty_like(x).fill_(2.0) for _ in range(2)]
    assert all(o.data_ptr() != shared_ptr for o in outs)
    assert torch.equal(view, torch.ones(BIG))


def test_a_reused_buffer_is_a_fresh_tensor():
    x = torch.randn(BIG)
    a = _pool.empty_like(x)
    a.add_(1.0).add_(1.0)
    pa = a.data_ptr()
    del a
    b = _pool.empty_like(x)
    assert b.data_ptr() == pa and b._version <= 1 and b.grad_fn is None and not b.requires_grad
    assert b._base is None and b.untyped_storage().nbytes() == x.numel() * 4
    assert b.data_ptr() % 64 == 0, "outputs must be 64-byte aligned like torch's (the kernels stream lines)"


def test_non_standard_strides_are_not_pooled():
    x = torch.randn(64, 64, 64).permute(2, 0, 1)  # dense, but neither contiguous nor channels-last
    y = _pool.empty_like(x)
    assert y.stride() == torch.empty_like(x).stride() and _pool.stats()["buffers"] == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_limit_is_rejected_and_the_limit_kept(bad):
    before = _pool.limit()
    with pytest.raises(ValueError, match="expected a byte count >= 0"):
        _pool.set_limit(bad)
    assert _pool.limit() == before


@pytest.mark.parametrize("raw,expected", [("0", 0), ("512", 512 << 20), ("0.5", 1 << 19), (" 64 ", 64 << 20)])
def test_pool_limit_from_the_environment(raw, expected, monkeypatch):
    monkeypatch.setenv("BATCHNORM_POOL_MB", raw)
    assert _pool._default_limit() == expected


def test_pool_limit_default_when_unset_or_empty(monkeypatch):
    monkeypatch.delenv("BATCHNORM_POOL_MB", raising=False)
    default = _pool._default_limit()
    assert default > 0
    monkeypatch.setenv("BATCHNORM_POOL_MB", "")
    assert _pool._default_limit() == default


@pytest.mark.parametrize("raw", ["512MB", "-1", "nan", "inf", "lots"])
def test_a_bad_pool_limit_in_the_environment_is_a_clear_error(raw, monkeypatch):
    monkeypatch.setenv("BATCHNORM_POOL_MB", raw)
    with pytest.raises(ValueError, match=r"BATCHNORM_POOL_MB=.* is not a number of MiB >= 0; unset it"):
        _pool._default_limit()


def test_pickling_saving_and_deepcopy_of_a_pooled_output(tmp_path):
    import copy
    import pickle

    x = torch.randn(BIG)
    y = _pool.empty_like(x).copy_(x)
    torch.save(y, tmp_path / "y.pt")
    clones = [pickle.loads(pickle.dumps(y)), copy.deepcopy(y), torch.load(tmp_path / "y.pt")]
    del y
    for v in (2.0, 3.0):
        _fill_and_drop(x, v)
    assert all(torch.equal(c, x) for c in clones), "a copy shares the pooled memory"
