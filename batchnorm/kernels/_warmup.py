"""First use without waiting for numba: the kernels compile in a background process while torch serves.

numba compiles the kernels of one memory layout and dtype in 6–19 s on a loaded 2-core machine
(the first training step of ``BatchNorm2d(16)`` waited that long in a fresh process). Instead, the
first time :func:`batchnorm.kernels.cpu.supports` meets a layout × dtype whose compiled kernels are
not in numba's cache, it starts ``python -m batchnorm.kernels._warmup <layout> <dtype>`` in the
background and answers False: the op runs on the torch backend (same results to rounding) and
:func:`batchnorm.backend_for` says so. The background process compiles the kernels into numba's
cache (:mod:`batchnorm.kernels._numba_setup`) and then writes a **ready marker**; from the next
call on (checked at most every 50 ms, a ``stat`` each time, until it is there) the numba kernels
run, loaded from the cache in a fraction of a second.

The masked-BN kernels (:mod:`batchnorm.kernels.masked_cpu`) are a third kind, ``masked``, compiled
the first time a masked call would run them (meanwhile masked BN runs the torch composite).

The marker is written last and atomically (a temporary file renamed into place), and numba writes
each of its cache files the same way, so a process that exits or is killed early leaves either no
marker (the next process starts the compile again) or a complete cache. The marker's name carries
a stamp of the kernel sources (name, size, mtime), numba's and Python's versions and the runner
(OpenMP team or thread pool): an edited kernel or another numba compiles anew. The background
process outlives its parent if need be (it finishes filling the cache for the next run).

``BATCHNORM_WARMUP=0`` turns this off: the kernels then compile in the calling process at first
use, as before (the test suite does this, to test the kernels from the first call). Forcing the
numba backend (``set_backend("numba")``) also compiles in-process rather than refusing the input.
If the background compile fails, the kernels compile in-process at the next call.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time

__all__ = ["enabled", "marker_path", "ready"]

_ENV = "BATCHNORM_WARMUP"
_RECHECK_S = 0.05
_KINDS = ("ncl", "mc", "masked")  # (masked: the masked-BN kernels of kernels.masked_cpu, (N, C, L) only)
_DTYPES = ("f32", "f64")
_ready: set[tuple[str, str]] = set()
_children: dict[tuple[str, str], subprocess.Popen] = {}
_last_check: dict[tuple[str, str], float] = {}
_lock = threading.Lock()
_stamp_cache: dict[str, str] = {}


def enabled() -> bool:
    """Whether first use compiles in the background (``BATCHNORM_WARMUP`` unset or not 0/false/no/off)."""
    return os.environ.get(_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _runner() -> str:
    from . import _omp

    return "team" if _omp.runtime() else "pool"


def _stamp(runner: str) -> str:
    """A short hash of what numba's cache entries depend on (see the module docstring)."""
    s = _stamp_cache.get(runner)
    if s is None:
        import numba

        here = os.path.dirname(os.path.abspath(__file__))
        h = hashlib.sha256(f"{numba.__version__}|{sys.version}|{runner}".encode())
        for name in sorted(os.listdir(here)):
            if name.endswith(".py") and (name.startswith("_cpu_") or name in ("_omp.py", "_stream.py",
                                                                                 "masked_cpu.py")):
                st = os.stat(os.path.join(here, name))
                h.update(f"|{name}:{st.st_size}:{st.st_mtime_ns}".encode())
        s = _stamp_cache[runner] = h.hexdigest()[:16]
    return s


def marker_path(kind: str, dtype: str) -> str | None:
    """Where the ready marker of ``kind`` ("ncl" | "mc") × ``dtype`` ("f32" | "f64") lies (None: no cache
    folder, so there is nothing to fill and the kernels compile in-process)."""
    from ._numba_setup import configure

    d = configure()
    if not d:
        return None
    runner = _runner()
    return os.path.join(d, f"batchnorm-ready-{kind}-{dtype}-{runner}-{_stamp(runner)}")


def _spawn(kind: str, dtype: str) -> subprocess.Popen:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env[_ENV] = "0"  # (the child compiles in-process)
    module = "batchnorm.kernels._warmup_masked" if kind == "masked" else "batchnorm.kernels._warmup"
    return subprocess.Popen([sys.executable, "-m", module, kind, dtype], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def ready(kind: str, dtype: str) -> bool:
    """Whether the numba kernels of ``kind`` × ``dtype`` may run now; starts their background compile
    the first time the answer is no (see the module docstring). Cheap once True (a set lookup)."""
    key = (kind, dtype)
    if key in _ready:
        return True
    with _lock:
        if key in _ready:
            return True
        now = time.monotonic()
        last = _last_check.get(key)
        if last is not None and now - last < _RECHECK_S:  # (not a default of -1: the monotonic clock
            return False                                  # may start near 0, e.g. just after boot)
        _last_check[key] = now
        path = marker_path(kind, dtype) if enabled() else None
        if path is None or os.path.exists(path):
            _ready.add(key)
            return True
        child = _children.get(key)
        if child is None:
            _children[key] = _spawn(kind, dtype)
            return False
        if child.poll() is not None:  # finished without a marker (failed): compile in-process instead
            _ready.add(key)
            return True
        return False


def _write_marker(path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write("compiled\n")
    os.replace(tmp, path)  # atomic: a reader sees no marker or a whole one


def compile_now(kind: str, dtype: str) -> None:
    """Compile (or load) every kernel of ``kind`` × ``dtype`` in this process, on tiny inputs: train
    forward (with and without a residual), backward, eval forward and backward. (The ``"masked"``
    kind compiles in :mod:`batchnorm.kernels._warmup_masked`, which imports the masked kernels: this
    module must not, as they import it.)"""
    import torch

    from . import select, use_backend

    dt = torch.float64 if dtype == "f64" else torch.float32
    x = torch.randn((4, 3, 5) if kind == "ncl" else (16, 3), dtype=dt)
    with use_backend("numba"):  # (the numba backend module, found by the dispatcher: no import cycle)
        cpu = select(x, 1, "relu")
    w, b = torch.ones(3, dtype=dt), torch.zeros(3, dtype=dt)
    y, m, v = cpu.train_forward(x, w, b, 1e-5, 1, "relu", 0.0)
    cpu.train_forward_residual(x, x, w, b, 1e-5, 1, "relu", 0.0)
    cpu.backward(torch.ones_like(x), x, y, w, b, m, v, 1e-5, 1, "relu", 0.0)
    ye = cpu.eval_forward(x, m, v, w, b, 1e-5, 1, "relu", 0.0)
    cpu.eval_backward(torch.ones_like(x), x, ye, w, b, m, v, 1e-5, 1, "relu", 0.0)


def main(argv: list[str], compile_fn=None) -> int:
    """The background process: compile ``argv = [kind, dtype]`` (with ``compile_fn(dtype)`` for the
    kinds whose kernels live elsewhere: ``_warmup_masked``), then write the ready marker."""
    kinds = _KINDS if compile_fn is not None else tuple(k for k in _KINDS if k != "masked")
    if len(argv) != 2 or argv[0] not in kinds or argv[1] not in _DTYPES:
        print(f"usage: python -m batchnorm.kernels._warmup {{{'|'.join(kinds)}}} {{{'|'.join(_DTYPES)}}} "
              f"(masked: python -m batchnorm.kernels._warmup_masked masked {{f32|f64}})", file=sys.stderr)
        return 2
    kind, dtype = argv
    os.environ[_ENV] = "0"
    path = marker_path(kind, dtype)
    if compile_fn is not None:
        compile_fn(dtype)
    else:
        compile_now(kind, dtype)
    if path is not None:
        _write_marker(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
