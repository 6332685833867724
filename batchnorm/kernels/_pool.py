"""A reuse pool for the kernels' large outputs (y, dx): recycled pages instead of fresh ones.

Why: a new tensor bigger than glibc's mmap threshold (at most 32 MiB) is a fresh ``mmap``; the
first write to each 4 KiB page then faults and the kernel zero-fills it. For a 103 MB float32
activation (128×64×56×56) that costs more than the BN kernel itself (see the measurements in
:mod:`batchnorm.kernels.cpu`). Storage that has been written before costs nothing extra.

The safety argument (why no tensor anyone holds can change under it): the pool owns blocks of
memory (NumPy byte arrays). A handed-out output is a tensor whose storage was made by
``torch.from_numpy`` from a *lease* of one block, so torch itself owns the lease: the storage's
deleter drops it exactly when torch frees the storage's memory, and only then does the lease's
``__del__`` put the block back. The pool therefore reuses memory precisely when torch would have
freed it, whatever keeps the storage alive — tensors, views, autograd-saved tensors, Python
``UntypedStorage`` objects, NumPy arrays from ``.numpy()``, DLPack capsules, a pickler in
flight. The cases the issue list names:

* shared memory (``share_memory_``, a ``torch.multiprocessing`` queue, a ``DataLoader`` worker's
  result): torch *moves* the storage into a new shared mapping and frees the old memory, so the
  block comes back once nothing refers to it, and the shared mapping the other process reads is
  never the pool's; the same holds for ``resize_`` to a larger size (a new allocation).
* ``set_``: a tensor re-pointed elsewhere drops its reference; one re-pointed *at* our storage
  holds one. ``torch.save``/pickling copy the bytes.
* fork: a child gets copy-on-write copies of the blocks, private to it; the lock is renewed in
  the child (a thread may have held it at the fork).
* pinned memory: ``pin_memory()`` returns a copy. Raw addresses (``data_ptr()``, ctypes, an
  in-place ``cudaHostRegister``) are no references to anyone, pooled or not: memory freed by
  torch's allocator is reused the same way.

What differs from ``torch.empty_like``: the storage is not resizable in place, so growing an
output with ``resize_`` (or an ``out=`` of a different size) raises torch's "Trying to resize
storage that is not resizable" (shrinking, views, ``set_``, ``share_memory_`` are unaffected).
Every reused output is a brand-new tensor (new version counter, no autograd history).

Cost (measured interleaved on the shared, loaded 2-core machine, so ratios only): handing out a
recycled 1 MiB output takes ~22 µs against ~10 µs for the earlier reference-count pool (which was
unsafe, see above) — small beside the kernel for such an output; a 128×64×56×56 BatchNormAct2d
training step (fwd + bwd) measured 244 ms with this pool, 264 ms with the old one, 296 ms for the
allocation + copy alone with plain ``torch.empty_like`` (fresh pages), i.e. the speed is kept.

Scope: only outputs of at least :data:`MIN_BYTES` with dense standard strides (contiguous or
channels-last) go through the pool; the pool owns at most :func:`limit` bytes in total (default:
1/8 of physical memory; env ``BATCHNORM_POOL_MB``; 0 disables it), beyond that outputs are plain
``torch.empty_like``. :func:`clear` drops every idle block (memory goes back to the OS);
:func:`stats` says what is held.
"""

from __future__ import annotations

import collections
import os
import threading

import numpy as np
import torch

__all__ = ["MIN_BYTES", "clear", "empty_like", "limit", "set_limit", "stats"]

MIN_BYTES = 1 << 20

_lock = threading.Lock()
_Block = tuple[np.ndarray, dict]  # a block and its __array_interface__ (computed once: 5 us a call)
_idle: dict[int, list[_Block]] = {}  # nbytes -> blocks nobody uses
# Blocks whose lease died: appended from a deleter (any thread, maybe inside a GC run while this
# module holds _lock), so without a lock: deque.append/popleft are atomic under the GIL.
_returned: collections.deque[_Block] = collections.deque()
_held = 0  # bytes of every block the pool owns, idle or leased
_leased = 0  # blocks handed out and not yet returned
_CL = {4: torch.channels_last, 5: torch.channels_last_3d}


class _Lease:
    """A NumPy-visible handle of one block, owned by the storage made from it; its death returns the block."""

    __slots__ = ("__array_interface__", "block")

    def __init__(self, block: _Block) -> None:
        self.block = block
        self.__array_interface__ = block[1]

    def __del__(self) -> None:
        returned = globals().get("_returned")  # (None at interpreter shutdown)
        if returned is not None:
            returned.append(self.block)


def env_amount(name: str, parse: type[int] | type[float], what: str, hint: str) -> int | float | None:
    """The amount in environment variable ``name`` read by ``parse`` (int or float), or None when it
    is unset or empty. A value that does not parse, or is negative, NaN or infinite, raises a
    ValueError naming the variable, ``what`` it must be and ``hint`` (the kernels' settings share it)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = parse(raw)
    except ValueError:
        value = -1
    if not 0 <= value < float("inf"):  # (also NaN)
        raise ValueError(f"batchnorm: {name}={raw!r} is not {what} >= 0; {hint}")
    return value


def _default_limit() -> int:
    mb = env_amount("BATCHNORM_POOL_MB", float, "a number of MiB",
                    "unset it (default: 1/8 of the memory), or give e.g. 512, or 0 to turn the pool off")
    if mb is not None:
        return int(mb * (1 << 20))
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8
    except (ValueError, OSError, AttributeError):
        return 1 << 30


_limit = _default_limit()


def limit() -> int:
    """Most bytes the pool may hold."""
    return _limit


def set_limit(nbytes: int) -> None:
    """Set the pool's size limit in bytes (0 disables pooling); idle blocks above it are dropped."""
    global _limit
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"batchnorm.kernels._pool.set_limit: expected a byte count >= 0, got {nbytes!r}")
    _limit = nbytes
    _trim(nbytes)


def _drain() -> None:
    """Move returned blocks to the idle lists (call with _lock held); over the limit, let them go."""
    global _held, _leased
    while _returned:
        block = _returned.popleft()
        _leased -= 1
        nbytes = block[0].nbytes
        if _held > _limit:
            _held -= nbytes
        else:
            _idle.setdefault(nbytes, []).append(block)


_ALIGN = 64  # torch's CPU allocator aligns to 64 bytes; the kernels' streaming stores need whole lines


def _aligned_block(nbytes: int) -> _Block:
    raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % _ALIGN
    block = raw[start:start + nbytes]  # (a view: keeps raw alive)
    return block, block.__array_interface__


def _standard_strides(x: torch.Tensor) -> bool:
    return x.is_contiguous() or (x.ndim in _CL and x.is_contiguous(memory_format=_CL[x.ndim]))


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(x)`` (same strides) in a recycled block when an idle one fits exactly."""
    global _held, _leased
    nbytes = x.numel() * x.element_size()
    if nbytes < MIN_BYTES or _limit == 0 or x.device.type != "cpu" or not _standard_strides(x):
        return torch.empty_like(x)
    with _lock:
        _drain()
        blocks = _idle.get(nbytes)
        if blocks:
            block = blocks.pop()
        elif _held + nbytes <= _limit:
            block = _aligned_block(nbytes)
            _held += nbytes
        else:
            return torch.empty_like(x)
        _leased += 1
    # torch.from_numpy keeps the array (and so the lease) until it frees the storage's memory.
    storage = torch.from_numpy(np.asarray(_Lease(block))).untyped_storage()
    return torch.empty(0, dtype=x.dtype).set_(storage, 0, x.shape, x.stride())


def _trim(keep: int) -> None:
    global _held
    with _lock:
        _drain()
        for nbytes in list(_idle):
            blocks = _idle[nbytes]
            while blocks and _held > keep:
                blocks.pop()
                _held -= nbytes
            if not blocks:
                del _idle[nbytes]


def clear() -> None:
    """Drop every idle block (blocks still in use come back when freed; a later clear drops them)."""
    _trim(0)


def stats() -> dict[str, int]:
    """``{"buffers", "idle", "bytes", "limit"}`` of the pool now (buffers = idle + in use)."""
    with _lock:
        _drain()
        idle = sum(len(v) for v in _idle.values())
        return {"buffers": idle + _leased, "idle": idle, "bytes": _held, "limit": _limit}


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # a thread of the parent may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
