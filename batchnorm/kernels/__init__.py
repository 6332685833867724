"""Backend dispatch: which implementation runs a BN op, and a switch to see and force it.

Every backend is a module with the same functions (see :mod:`batchnorm.kernels.torch_backend`)::

    supports(x, channel_axis, act) -> bool
    train_forward(x, weight, bias, eps, channel_axis, act, slope) -> (y, mean, biased_var)
    backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope) -> (dx, dweight, dbias)
    eval_forward(x, mean, var, weight, bias, eps, channel_axis, act, slope) -> y
    eval_backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope) -> (dx, dweight, dbias)

``"torch"`` (composite torch ops) runs everywhere and is the reference. ``"native"``
(:mod:`batchnorm.kernels.native_backend`, torch's fused aten ``native_batch_norm`` forward and
backward) runs every device and dtype torch has kernels for. Fast backends register themselves
with :func:`register_backend`; under the default ``"auto"`` choice the first registered fast backend
that ``supports`` an input runs it **if the input is large enough for it to beat the native op**
(per pass: see :data:`NATIVE_BELOW`), and anything else runs on the native backend.

Backends here:

* ``"numba"`` (:mod:`batchnorm.kernels.cpu`) — fused CPU kernels for float32/float64 tensors that
  are contiguous (NCHW, NCDHW, (N, C), (N, C, L), channels on any axis) or channels-last
  (NHWC/NDHWC memory), every activation. Imported (with numba) and compiled on first use only.
  Its threads are torch's own OpenMP team where torch has one (``batchnorm.kernels._omp.runtime()``
  names the runtime library; ``""`` means a small Python thread pool, as on macOS/Windows builds,
  in a forked child, or with ``BATCHNORM_OMP=0``).
* ``"native"`` — small inputs (where a call's fixed cost, not the arithmetic, is the time) and
  everything numba does not cover: CUDA/MPS/XPU, float16/bfloat16, strided views, tensor
  subclasses; also where numba is not installed. The modules call torch's ``batch_norm`` directly
  for it (torch's own layer code, so the same microseconds as ``torch.nn``).
* ``"torch"`` — the composite reference, only when forced (``use_backend("torch")``).

Every backend gives the same results up to rounding (the tests hold each to the float64 oracle).

    >>> import torch, batchnorm.kernels as K
    >>> K.get_backend()              # the choice in force: "auto", or a forced name
    'auto'
    >>> K.backend_for(torch.randn(128, 64, 56, 56))          # a large contiguous CPU input
    'numba'
    >>> K.backend_for(torch.randn(8, 16, 4, 4))              # small: torch's native kernel is faster
    'native'
    >>> K.backend_for(torch.randn(128, 64, 56, 56)[:, :, ::2])   # non-contiguous: native
    'native'
    >>> with K.use_backend("torch"):  # force the composite reference for a block
    ...     pass

The environment variable ``BATCHNORM_BACKEND`` (``auto``, ``native``, ``torch`` or ``numba``) sets the initial
choice. Forcing a backend that cannot run an input raises instead of silently falling back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch

from . import native_backend, torch_backend

__all__ = ["NATIVE_BELOW", "available_backends", "backend_for", "get_backend", "register_backend",
           "set_backend", "use_backend"]

_BACKENDS: dict[str, ModuleType] = {"torch": torch_backend, "native": native_backend}
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
    return ["torch", "native", *[n for n in _FAST_ORDER if _load(n) is not None]]


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


#: Below this many values per call (per pass: ``"train"`` = training forward and its backward,
#: ``"eval"`` = inference forward), ``"auto"`` runs torch's native kernel for every input rather
#: than a fast backend: there the call's fixed cost dominates and torch's is smaller. Above it a
#: fast backend may still hand an input back where torch's kernel is faster for its memory layout
#: (its ``native_below(x, channel_axis, act, mode)``: :data:`batchnorm.kernels.cpu.CROSSOVER`).
#: Measured through the modules (``python benchmarks/crossover.py``: our module on each backend,
#: interleaved medians on a 2-core machine); the native kernel meets the same float64-oracle
#: tolerance as ours below these sizes (``tests/core/test_core_native.py`` checks each size class,
#: |mean| ≫ std included).
NATIVE_BELOW: dict[str, int] = {"train": 1 << 19, "eval": 1 << 21}


def select(x: torch.Tensor, channel_axis: int, act: str, mode: str = "train") -> ModuleType:
    """The backend module that will run an op on ``x`` (``mode``: ``"train"`` or ``"eval"``).

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
    native = native_backend.supports(x, channel_axis, act)
    if native and (not x.is_cpu or x.numel() < NATIVE_BELOW[mode]):
        return native_backend
    for n in _FAST_ORDER:
        mod = _load(n)
        if mod is None:
            continue
        # (the crossover first: it is cheaper than ``supports``, which may stat a warm-up marker, and
        # below it the native kernel runs whether or not the fast one could)
        below = getattr(mod, "native_below", None)
        if native and below is not None and x.numel() < below(x, channel_axis, act, mode):
            return native_backend
        if mod.supports(x, channel_axis, act):
            return mod
    return native_backend if native else torch_backend


def backend_for(x: torch.Tensor, channel_axis: int = 1, activation: str = "identity", *,
                training: bool = True) -> str:
    """Name of the backend that would run a BN op on ``x`` now (``training=False``: an eval pass)."""
    return select(x, channel_axis % x.ndim, activation, "train" if training else "eval").name


register_backend("numba", "batchnorm.kernels.cpu")  # lazily: numba is imported on first use only
