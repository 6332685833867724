"""Where our numba kernels start to beat torch's native kernel, per pass, memory layout and activation.

``"auto"`` dispatch (:func:`batchnorm.kernels.select`) sends an input to torch's native kernel
below :data:`batchnorm.kernels.NATIVE_BELOW` values and, above it, below the fast backend's own
crossover for the input's layout (:data:`batchnorm.kernels.cpu.CROSSOVER`). This script measures
those crossovers: the same module of ours on the forced ``numba`` and the forced ``native`` backend,
interleaved, medians of ``--reps`` rounds, for sizes 2^15 … 2^23 values and

* ``ncl``: NCHW contiguous, 64 channels, 16×16 planes (a small CNN's activations);
* ``mc``: (N, 256) 2-D input (an MLP / head) and NHWC channels-last (64 channels, 16×16);
* passes ``fwd`` (training forward), ``step`` (training forward + backward) and ``eval``;
* activation identity (``BatchNorm*``) and relu (``BatchNormAct*``).

It prints each measurement (native time / numba time: > 1 means ours is faster) and, per
(pass, layout, activation), the smallest measured size from which ours is at least as fast at
that size and every larger one: the value to put in ``CROSSOVER`` (train uses ``step`` and
``fwd`` together: the larger of the two). Run it on a quiet machine::

    python benchmarks/crossover.py --reps 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import batchnorm
import batchnorm.kernels as K

LAYOUTS = ("ncl", "nc", "nhwc")


def _shape(layout: str, n: int) -> tuple[int, ...]:
    return (n // 256, 256) if layout == "nc" else (n // (64 * 256), 64, 16, 16)


def _pass(layer, x, kind):
    if kind == "eval":
        layer.eval()

        def run():
            with torch.no_grad():
                layer(x)
        return run
    layer.train()
    xg = x.detach().requires_grad_(True)
    g = torch.ones_like(x)
    if kind == "fwd":
        return lambda: layer(xg)
    return lambda: layer(xg).backward(g)


def _loop(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def _on(name, fn):
    def run():
        with K.use_backend(name):
            fn()
    return run


def measure(layout: str, n: int, kind: str, act: str, reps: int) -> float:
    shape = _shape(layout, n)
    x = torch.randn(shape)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    cls = batchnorm.BatchNormAct2d if x.ndim == 4 else batchnorm.BatchNormAct1d
    layer = cls(shape[1], activation=act)
    f = _pass(layer, x, kind)
    fn, fm = _on("numba", f), _on("native", f)
    for g in (fn, fm, fn, fm):
        g()
    once = min(_loop(fn, 1), _loop(fm, 1))
    calls = max(1, min(1000, int(3e-3 / max(once, 1e-7))))
    a, b = [], []
    for _ in range(reps):
        a.append(_loop(fn, calls))
        b.append(_loop(fm, calls))
    return statistics.median(b) / statistics.median(a)


def crossover(sizes: list[int], ratios: list[float]) -> int | None:
    """The smallest size from which every ratio (native/numba) is ≥ 1; None: ours never wins."""
    best = None
    for n, r in reversed(list(zip(sizes, ratios, strict=True))):
        if r < 1.0:
            break
        best = n
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--min-log2", type=int, default=15)
    p.add_argument("--max-log2", type=int, default=23)
    p.add_argument("--acts", default="identity,relu")
    args = p.parse_args()
    sizes = [1 << k for k in range(args.min_log2, args.max_log2 + 1)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ratio = native time / numba time")
    found = {}
    for act in args.acts.split(","):
        for layout in LAYOUTS:
            for kind in ("fwd", "step", "eval"):
                ratios = []
                for n in sizes:
                    r = measure(layout, n, kind, act, args.reps)
                    ratios.append(r)
                    print(f"{act:9s} {layout:5s} {kind:5s} {n:>9d}  {r:5.2f}", flush=True)
                found[act, layout, kind] = crossover(sizes, ratios)
    print("\ncrossover (smallest size from which ours is at least as fast; None: never in range)")
    for (act, layout, kind), n in found.items():
        print(f"  {act:9s} {layout:5s} {kind:5s} {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
