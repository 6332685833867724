"""A reuse pool for the kernels' large outputs (y, dx): recycled pages instead of fresh ones.

Why: a new tensor bigger than glibc's mmap threshold (at most 32 MiB) is a fresh ``mmap``; the
first write to each 4 KiB page then faults and the kernel zero-fills it. For a 103 MB float32
activation (128×64×56×56) that costs more than the BN kernel itself (see the measurements in
:mod:`batchnorm.kernels.cpu`). Storage that has been written before costs nothing extra.

How it stays safe with autograd: the pool keeps a reference to every storage it handed out and
reuses one only when the pool's reference is the **only** one left
(``torch._C._storage_Use_Count == 1``): every tensor, view, autograd-saved tensor, numpy array
or DLPack capsule that still refers to the memory holds a strong reference, so a buffer is never
handed out while anything can still read or write it. A reused buffer is wrapped in a brand-new
tensor (new version counter, no autograd history).

Scope: only storages of at least :data:`MIN_BYTES` go through the pool (smaller ones come from
glibc's heap without page faults); the pool holds at most :func:`limit` bytes in total (default:
1/8 of physical memory; env ``BATCHNORM_POOL_MB``; 0 disables it), beyond that outputs are plain
``torch.empty``. :func:`clear` drops every idle buffer (memory goes back to the OS);
:func:`stats` says what is held.
"""

from __future__ import annotations

import os
import threading

import torch

__all__ = ["MIN_BYTES", "clear", "empty_like", "limit", "set_limit", "stats"]

MIN_BYTES = 1 << 20

_lock = threading.Lock()
_free: dict[int, list[torch.UntypedStorage]] = {}  # nbytes -> storages (in use or idle)
_held = 0
_use_count = getattr(torch._C, "_storage_Use_Count", None)


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
    """Set the pool's size limit in bytes (0 disables pooling); idle buffers above it are dropped."""
    global _limit
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"batchnorm.kernels._pool.set_limit: expected a byte count >= 0, got {nbytes!r}")
    _limit = nbytes
    _trim(nbytes)


def _idle(s: torch.UntypedStorage) -> bool:
    return _use_count(s._cdata) == 1


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(x)`` (same strides) with recycled memory when an idle buffer fits exactly."""
    global _held
    nbytes = x.numel() * x.element_size()
    if _use_count is None or nbytes < MIN_BYTES or _limit == 0:
        return torch.empty_like(x)
    with _lock:
        for s in _free.get(nbytes, ()):
            if _idle(s) and s.nbytes() == nbytes:  # (a user may have resized a storage we handed out)
                return torch.empty(0, dtype=x.dtype).set_(s, 0, x.shape, x.stride())
        y = torch.empty_like(x)
        if _held + nbytes <= _limit:
            _free.setdefault(nbytes, []).append(y.untyped_storage())
            _held += nbytes
        return y


def _trim(keep: int) -> None:
    global _held
    with _lock:
        for nbytes in list(_free):
            kept = []
            for s in _free[nbytes]:
                if _held > keep and (_idle(s) or s.nbytes() != nbytes):
                    _held -= nbytes
                else:
                    kept.append(s)
            _free[nbytes] = kept
            if not kept:
                del _free[nbytes]


def clear() -> None:
    """Drop every idle buffer (buffers still in use are kept until :func:`clear` runs after them)."""
    _trim(0)


def stats() -> dict[str, int]:
    """``{"buffers", "idle", "bytes", "limit"}`` of the pool now."""
    with _lock:
        bufs = [s for v in _free.values() for s in v]
        return {"buffers": len(bufs), "idle": sum(_idle(s) for s in bufs), "bytes": _held, "limit": _limit}
