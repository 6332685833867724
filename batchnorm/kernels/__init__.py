"""Backend dispatch: which implementation runs a BN op, and a switch to see and force it.

Every backend is a module with the same functions (see :mod:`batchnorm.kernels.torch_backend`)::

    supports(x, channel_axis, act) -> bool
    train_forward(x, weight, bias, eps, channel_axis, act, slope) -> (y, mean, biased_var)
    backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope) -> (dx, dweight, dbias)
    eval_forward(x, mean, var, weight, bias, eps, channel_axis, act, slope) -> y
    eval_backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope) -> (dx, dweight, dbias)

``"torch"`` (composite torch ops) runs everywhere and is the reference fallback. Fast backends
register themselves with :func:`register_backend`; under the default ``"auto"`` choice the first
registered fast backend that ``supports`` an input runs it, and anything else falls back to torch.

Backends here:

* ``"numba"`` (:mod:`batchnorm.kernels.cpu`) — fused CPU kernels for float32/float64 tensors that
  are contiguous (NCHW, NCDHW, (N, C), (N, C, L), channels on any axis) or channels-last
  (NHWC/NDHWC memory), every activation. Imported (with numba) and compiled on first use only.
  Its threads are torch's own OpenMP team where torch has one (``batchnorm.kernels._omp.runtime()``
  names the runtime library; ``""`` means a small Python thread pool, as on macOS/Windows builds,
  in a forked child, or with ``BATCHNORM_OMP=0``).
* ``"torch"`` — everything else: CUDA and other devices, float16/bfloat16, non-contiguous inputs
  (e.g. a strided slice), tensor subclasses; also where numba is not installed.

Both give the same results up to rounding (the tests hold every backend to the float64 oracle).

    >>> import torch, batchnorm.kernels as K
    >>> K.get_backend()              # the choice in force: "auto", or a forced name
    'auto'
    >>> K.backend_for(torch.randn(8, 16, 4, 4))              # what would run this input now
    'numba'
    >>> K.backend_for(torch.randn(8, 16, 4, 4)[:, :, ::2])   # non-contiguous: fallback
    'torch'
    >>> with K.use_backend("torch"):  # force the fallback for a block
    ...     pass

The environment variable ``BATCHNORM_BACKEND`` (``auto``, ``torch`` or ``numba``) sets the initial
choice. Forcing a backend that cannot run an input raises instead of silently falling back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch

from . import torch_backend

__all__ = ["available_backends", "backend_for", "get_backend", "register_backend", "set_backend",
           "use_backend"]

_BACKENDS: dict[str, ModuleType] = {"torch": torch_backend}
_LAZY: dict[str, str] = {}  # name -> module path, imported on first use (keeps `import batchnorm` cheap)
_FAST_ORDER: list[str] = []
_choice = os.environ.get("BATCHNORM_BACKEND", "auto")


def register_backend(name: str, module_path: str, *, fast: bool = True) -> None:
    """Register a backend module by import path; it is imported only when first needed."""
    _LAZY[name] = module_path
    if fast and name not in _FAST_ORDER:
        _FAST_ORDER.append(name)


def _load(name: str) -> ModuleType | None:
    if name in _BACKENDS:
        return _BACKENDS[name]
    path = _LAZY.get(name)
    if path is None:
        return None
    import importlib

    try:
        mod = importlib.import_module(path)
    except ImportError:  # e.g. numba missing on this machine: fall back, never fail the op
        _LAZY.pop(name)
        return None
    _BACKENDS[name] = mod
    return mod


def available_backends() -> list[str]:
    """Names of the backends that can be selected here."""
    return ["torch", *[n for n in _FAST_ORDER if _load(n) is not None]]


def get_backend() -> str:
    """The current choice: ``"auto"`` or the name of a forced backend."""
    return _choice


def set_backend(name: str) -> None:
    """Force a backend for every op (``"auto"`` restores automatic dispatch)."""
    global _choice
    if name != "auto" and name not in _BACKENDS and name not in _LAZY:
        raise ValueError(f"batchnorm.kernels.set_backend: unknown backend {name!r}; "
                         f"expected 'auto' or one of {available_backends()}")
    _choice = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    old = _choice
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def select(x: torch.Tensor, channel_axis: int, act: str) -> ModuleType:
    """The backend module that will run an op on ``x``.

    A forced backend that cannot run this input raises rather than silently falling back, so
    that a benchmark or test that forces a backend measures what it says.
    """
    if _choice != "auto":
        mod = _load(_choice)
        if mod is None:
            raise RuntimeError(f"batchnorm: backend {_choice!r} is not available here; "
                               f"use one of {available_backends()}")
        if not mod.supports(x, channel_axis, act):
            raise RuntimeError(f"batchnorm: forced backend {_choice!r} cannot run a {x.dtype} input of shape "
                               f"{tuple(x.shape)} on {x.device} (channel_axis={channel_axis}, "
                               f"activation={act!r}); use set_backend('auto') to fall back to torch")
        return mod
    for n in _FAST_ORDER:
        mod = _load(n)
        if mod is not None and mod.supports(x, channel_axis, act):
            return mod
    return torch_backend


def backend_for(x: torch.Tensor, channel_axis: int = 1, activation: str = "identity") -> str:
    """Name of the backend that would run a BN op on ``x`` now."""
    return select(x, channel_axis % x.ndim, activation).name


register_backend("numba", "batchnorm.kernels.cpu")  # lazily: numba is imported on first use only
