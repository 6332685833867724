"""``batchnorm bench --small``: small and medium layers through the modules, ours vs ``torch.nn``.

Where users live (MLPs, heads, small CNNs, inference), a BN call costs microseconds and the fixed
cost of a call — Python glue, argument checks, the autograd node — matters as much as the
arithmetic. This benchmark times whole module calls, as a user makes them, for the layer sizes of
issue 20's table::

    layer                   input             passes
    BatchNorm1d             60×300 … 1024×256 train forward, train forward+backward, eval
    BatchNorm2d             8×16×8×8 … 64×128×16×16
    BatchNormAct2d(relu)    64×128×16×16      (torch: nn.BatchNorm2d → nn.ReLU)

Each time is the median over ``reps`` rounds of the per-call time of a loop of calls sized to ~2 ms;
ours and torch's loops alternate inside each round, in ABBA order (interleaved: load on a shared
machine hits both alike). The ratio column is **torch time / ours** (> 1: ours is faster), as in the
issue: the median of the rounds' own ratios;
``backend`` is what :func:`batchnorm.backend_for` says runs the pass (``native``: torch's own
kernel through our module; ``numba``: our fused kernels). ``--reps`` and ``--quick`` work as for
the other modes (default 21 rounds); ``--json PATH`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

import batchnorm

from . import compile_in_process

#: (label, ours factory, torch factory, input shape): issue 20's table.
ROWS: list[tuple[str, tuple[int, ...]]] = [
    ("BatchNorm1d", (60, 300)),
    ("BatchNorm1d", (128, 64)),
    ("BatchNorm1d", (256, 512)),
    ("BatchNorm1d", (1024, 256)),
    ("BatchNorm2d", (8, 16, 8, 8)),
    ("BatchNorm2d", (32, 64, 8, 8)),
    ("BatchNorm2d", (32, 64, 16, 16)),
    ("BatchNorm2d", (64, 128, 16, 16)),
    ("BatchNorm2d", (16, 256, 14, 14)),
    ("BatchNormAct2d", (64, 128, 16, 16)),
]
QUICK_ROWS = [ROWS[1], ROWS[4], ROWS[9]]
PASSES = ("train_fwd", "train_step", "eval")


def _layers(label: str, c: int) -> tuple[nn.Module, nn.Module]:
    if label == "BatchNormAct2d":
        return batchnorm.BatchNormAct2d(c), nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())
    return getattr(batchnorm, label)(c), getattr(nn, label)(c)


def _pass_fn(layer: nn.Module, x: torch.Tensor, kind: str) -> Callable[[], None]:
    if kind == "eval":
        layer.eval()

        def run() -> None:
            with torch.no_grad():
                layer(x)
        return run
    layer.train()
    xg = x.detach().requires_grad_(True)
    if kind == "train_fwd":
        def run() -> None:
            layer(xg)
        return run
    g = torch.ones_like(x)

    def run() -> None:
        layer(xg).backward(g)
    return run


def _loop_time(fn: Callable[[], None], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def measure(label: str, shape: tuple[int, ...], kind: str, reps: int) -> dict:
    """One row × pass: interleaved medians (seconds per call) of ours and torch's."""
    ours, theirs = _layers(label, shape[1])
    x = torch.randn(shape)
    fo, ft = _pass_fn(ours, x, kind), _pass_fn(theirs, x, kind)
    for f in (fo, ft, fo, ft):  # warm-up (first use compiles numba kernels where they run)
        f()
    once = min(_loop_time(fo, 1), _loop_time(ft, 1))
    n = max(1, min(2000, int(2e-3 / max(once, 1e-7))))
    to, tt, ratios = [], [], []
    for i in range(reps):
        # ABBA: ours first in even rounds, torch first in odd ones (whoever runs second finds the
        # other's memory freed and the caches warm); the ratio is the median of the rounds' own ratios,
        # so that a slow spell of the machine, which hits both loops of a round, cancels out
        if i % 2 == 0:
            a = _loop_time(fo, n)
            b = _loop_time(ft, n)
        else:
            b = _loop_time(ft, n)
            a = _loop_time(fo, n)
        to.append(a)
        tt.append(b)
        ratios.append(b / a)
    mo, mt = statistics.median(to), statistics.median(tt)
    act = "relu" if label == "BatchNormAct2d" else "identity"
    return {"layer": label, "shape": list(shape), "pass": kind, "ours_us": mo * 1e6, "torch_us": mt * 1e6,
            "ratio": statistics.median(ratios),
            "backend": batchnorm.backend_for(x, activation=act, training=kind != "eval")}


def run_small(rows: Sequence[tuple[str, tuple[int, ...]]] = ROWS, reps: int = 21) -> list[dict]:
    return [measure(label, shape, kind, reps) for label, shape in rows for kind in PASSES]


def _print(results: list[dict]) -> None:
    print(f"{'layer':<16}{'input':<16}{'pass':<12}{'ours µs':>10}{'torch µs':>10}{'torch/ours':>12}  backend")
    for r in results:
        shape = "×".join(map(str, r["shape"]))
        print(f"{r['layer']:<16}{shape:<16}{r['pass']:<12}{r['ours_us']:>10.1f}{r['torch_us']:>10.1f}"
              f"{r['ratio']:>11.2f}×  {r['backend']}")


def main(argv: Sequence[str] | None = None) -> int:
    compile_in_process()
    p = argparse.ArgumentParser(prog="batchnorm bench --small", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="three rows, 3 rounds (CI smoke test)")
    p.add_argument("--reps", type=int, default=None, help="interleaved rounds per figure (default 21)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(list(argv or []))
    reps = args.reps if args.reps is not None else (3 if args.quick else 21)
    if reps < 1:
        p.error(f"--reps must be >= 1, got {reps}")
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    results = run_small(QUICK_ROWS if args.quick else ROWS, reps)
    _print(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0
