"""The backward of ``y = act(BN(x) + residual)``: two sweeps (fused) against three (act backward, then BN's).

The numba backend's residual backward (:func:`batchnorm.kernels.cpu.backward_residual`) writes
dz = dy·act'(z) — the residual's gradient — in the sweep that sums it, then reads it back with x to
write dx: BN + act's two sweeps. The path it replaced ran torch's activation backward first
(``threshold_backward``: reads dy and y, writes dz) and then the two-sweep BN backward on dz. This
script times both backward passes on the same saved graph, interleaved in ABBA order, and prints
the median of the rounds' ratios (three-sweep time / fused time: > 1 means the fused one is faster)
with the tensor passes each makes, for NCHW inputs of 6.4–25 MB (the fused kernel runs (N, C, L)
layouts; ``auto`` takes it from ``kernels.cpu.RESIDUAL_BACKWARD_MIN_BYTES`` on, set here to 0)::

    python benchmarks/residual_backward.py --reps 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import batchnorm
from batchnorm.core import residual as RS
from batchnorm.kernels import cpu

SHAPES = [(32, 64, 56, 56), (32, 128, 28, 28), (32, 256, 14, 14), (128, 64, 28, 28)]


def _backward_fn(x, r, w, b, g, fused: bool):
    y, _ = RS.batch_norm_add_act_train(x, r, None, None, w, b, activation="relu")

    def run():
        orig = RS._fused_backward
        if not fused:
            RS._fused_backward = lambda *a: False
        try:
            torch.autograd.grad(y, (x, r, w, b), g, retain_graph=True)
        finally:
            RS._fused_backward = orig
    return run


def _time(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=15, help="ABBA rounds (default 15)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cpu.RESIDUAL_BACKWARD_MIN_BYTES = 0  # (time the fused kernel at every size)
    print(f"{'shape':<18}{'layout':<8}{'3-sweep ms':>11}{'fused ms':>10}{'ratio':>8}   passes 3-sweep/fused")
    for shape in SHAPES:
        for cl in (False,):
            x, r, g = (torch.randn(shape) for _ in range(3))
            x.requires_grad_()
            r.requires_grad_()
            w = torch.rand(shape[1]).add_(0.5).requires_grad_()
            b = torch.randn(shape[1]).requires_grad_()
            with batchnorm.use_backend("numba"):
                fused, old = _backward_fn(x, r, w, b, g, True), _backward_fn(x, r, w, b, g, False)
                for f in (fused, old, fused, old):
                    f()
                ta, tb, ratios = [], [], []
                for i in range(args.reps):
                    pair = (fused, old) if i % 2 == 0 else (old, fused)
                    t = {f: _time(f, 3) for f in pair}
                    ta.append(t[fused])
                    tb.append(t[old])
                    ratios.append(t[old] / t[fused])
            # tensor passes (reads + writes, no write-allocate): three sweeps: dy, y → dz (3); x, dz (2);
            # x, dz → dx (3) = 8. Fused: x, dy, y → dz (4); x, dz → dx (3) = 7.
            print(f"{'×'.join(map(str, shape)):<18}{'nhwc' if cl else 'nchw':<8}"
                  f"{statistics.median(tb) * 1e3:>11.2f}{statistics.median(ta) * 1e3:>10.2f}"
                  f"{statistics.median(ratios):>7.2f}×   8/7 = 1.14× at the bandwidth bound")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
