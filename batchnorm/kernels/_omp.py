"""Run the numba kernels on torch's own OpenMP thread team.

Why: torch's CPU ops run on an OpenMP team (libgomp in the Linux wheels). When an op ends, its
worker threads keep **spinning** for a while (libgomp spins ``GOMP_SPINCOUNT`` = 300 000 rounds by
default, several milliseconds on recent x86) waiting for the next region. Kernels run on threads
of our own meet those spinning workers on the same cores: measured on the 2-core machine, our eval
of 32×256×28×28 took 1.3 ms alone but 2.2–4.6 ms right after a torch op, while a torch ``copy_``
(run on the team) stayed at 0.95 ms either way. So in a model — a convolution right before every
BN — a private thread pool loses half its speed to the framework's idle workers.

How: libgomp's entry point ``GOMP_parallel(fn, data, num_threads, flags)`` runs ``fn(data)`` on
every thread of the calling thread's team — the very team ``at::parallel_for`` uses, whose workers
are already spinning and start at once. ``fn`` is a numba ``cfunc`` (compiled C callback, no GIL);
it learns its part from ``omp_get_thread_num``/``omp_get_num_threads`` and can wait for the team
at ``GOMP_barrier``, so a whole operation (statistics, barrier, normalise) is one parallel region.
ctypes releases the GIL around the call. Measured, same case: 0.95 ms alone, 0.95 ms after a torch
copy, 1.7 ms after torch's BN (copy: 1.9 ms).

The three OpenMP functions are registered with LLVM under private names
(``batchnorm_omp_thread_num`` …) bound to the addresses in the runtime torch loaded — never a
second OpenMP runtime, and no clash with other users of LLVM's symbol table.

Availability (:func:`runtime`): Linux, torch built with the OpenMP parallel backend, exactly the
runtime found in ``/proc/self/maps`` (``libgomp*``; Intel's ``libiomp5`` and LLVM's ``libomp`` export
the same ``GOMP_*`` entry points), not in a forked child (an OpenMP team does not survive ``fork``),
and not switched off with ``BATCHNORM_OMP=0``. Elsewhere :mod:`batchnorm.kernels.cpu` runs the same
kernels on a small Python thread pool with the same split of the work: for the same thread count
the sums are identical and elementwise outputs agree to the last bit (or within one rounding, where
the compiler fused a multiply-add differently).
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch

from ._numba_setup import configure

configure()

import llvmlite.binding as llvm  # noqa: E402
from numba import types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

__all__ = ["barrier", "num_threads", "run", "runtime", "thread_num", "voidptr"]

# Calls from compiled code (resolved through the symbols registered in runtime()).
thread_num = types.ExternalFunction("batchnorm_omp_thread_num", types.intc())
num_threads = types.ExternalFunction("batchnorm_omp_num_threads", types.intc())
barrier = types.ExternalFunction("batchnorm_omp_barrier", types.void())


@intrinsic
def voidptr(typingctx, addr):
    """``(void *) addr`` for an int64 address (to view a tensor's memory with ``numba.carray``)."""
    sig = types.voidptr(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return sig, codegen


_NAMES = ("libgomp", "libiomp5", "libomp")
_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": path or "", "parallel": the ctypes GOMP_parallel


def _forked_child() -> None:
    _state.clear()
    _state["lib"] = ""  # the parent's team is gone: never use OpenMP in this process


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked_child)


def _find() -> str:
    """The OpenMP runtime torch runs on, as a loaded file's path, or "" if there is none to use."""
    if os.environ.get("BATCHNORM_OMP", "1").strip().lower() in ("0", "false", "no", "off"):
        return ""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return ""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[-1].strip() for line in f if "/" in line}
    except OSError:  # not Linux
        return ""
    return _pick(paths, os.path.dirname(torch.__file__))


def _pick(paths, torch_dir: str) -> str:
    """Among loaded files, the one OpenMP runtime to use: torch's own if it ships one, else the only
    one loaded; "" when there is none or several and none of them torch's (do not guess)."""
    found = sorted(p for p in paths if os.path.basename(p).startswith(_NAMES) and ".so" in p)
    own = [p for p in found if p.startswith(torch_dir + os.sep)]
    if len(own) == 1:
        return own[0]
    return found[0] if len(found) == 1 else ""


def runtime() -> str:
    """Path of the OpenMP runtime the kernels run on, or "" when they use the Python thread pool."""
    lib = _state.get("lib")
    if lib is not None:
        return lib  # type: ignore[return-value]
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[return-value]
        path = _find()
        if path:
            try:
                handle = ctypes.CDLL(path)
                for ours, theirs in (("batchnorm_omp_thread_num", "omp_get_thread_num"),
                                     ("batchnorm_omp_num_threads", "omp_get_num_threads"),
                                     ("batchnorm_omp_barrier", "GOMP_barrier")):
                    llvm.add_symbol(ours, ctypes.cast(getattr(handle, theirs), ctypes.c_void_p).value)
                parallel = handle.GOMP_parallel
                parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
                parallel.restype = None
                _state["parallel"] = parallel
            except (OSError, AttributeError):
                path = ""
        _state["lib"] = path
        return path


def run(cfunc_address: int, block_address: int, threads: int) -> None:
    """``fn(block)`` on a team of ``threads`` (the calling thread is member 0); GIL released."""
    _state["parallel"](cfunc_address, block_address, threads, 0)  # type: ignore[operator]
