"""``batchnorm bench``: our fused BN+ReLU against native torch and against the memory-bandwidth bound.

For every shape × layout × pass the table gives our median time, native torch's median time
(``torch.relu(torch.nn.functional.batch_norm(...))``), the speed-up, and which fraction of the
bandwidth bound we reach — all measured **in the same run**, so the ratios hold on a noisy machine
even when the absolute times move.

Passes (all with ReLU, float32, running statistics updated in training as a module would):

* ``train fwd``  ``batch_norm_train(x, ..., activation="relu")`` vs ``relu(F.batch_norm(training=True))``,
  with autograd recording (x, γ, β require grad), as in a training step;
* ``bwd``        the backward alone: ``torch.autograd.grad`` of that output on a retained graph;
* ``fwd+bwd``    both (one training step of the layer);
* ``eval``       ``batch_norm_eval(...)`` vs ``relu(F.batch_norm(training=False))`` under ``no_grad``.

Bandwidth bound: the least bytes a pass must move over a same-size ``copy_``'s speed measured in
this run (``dst.copy_(x)`` reads x and writes dst), timed interleaved with that pass's two
contenders so that it meets the same cache state (back-to-back copies of a tensor that fits in
the last-level cache would run from cache and flatter the bound)::

    train fwd  read x + write y           = 2 tensors  ->  bound = t_copy
    bwd        read x, dy + write dx      = 3 tensors  ->  bound = 1.5 · t_copy
    fwd+bwd    the two                    = 5 tensors  ->  bound = 2.5 · t_copy
    eval       read x + write y           = 2 tensors  ->  bound = t_copy

``% bound`` = bound / ours (100 % = as fast as copying the minimal bytes). Every time is the
median of ``--reps`` (≥ 7 by default) runs after ``--warmup`` runs; the first call of each of our
passes (numba compile or cache load) is reported separately, never mixed into the medians.

Our kernels write outputs of at least ``BATCHNORM_STREAM_MIN_BYTES`` (8 MiB) with streaming stores,
which skip the read-for-ownership of plain stores, so ``% bound`` can pass 100 % (the reference
``copy_`` uses plain stores); ``--stream`` prints the measurement behind that threshold.

``--alloc`` prints the allocation measurement behind :mod:`batchnorm.kernels.cpu`'s choice (fresh
``torch.empty`` pages vs the reuse pool vs a preallocated buffer vs glibc ``mallopt`` tuning).

Usage::

    batchnorm bench                  # full table (one to two minutes on 2 cores)
    batchnorm bench --quick          # tiny shapes, 3 runs: a smoke test, no meaningful times
    batchnorm bench --json out.json  # also write every figure to a JSON file
    batchnorm bench --alloc          # the allocation measurement
    batchnorm bench --stream         # plain vs streaming output stores by size
    batchnorm bench --case 4096x1024 --case 128x64x56x56:nhwc   # only these shapes
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as TF

from . import compile_in_process

__all__ = ["FULL_CASES", "QUICK_CASES", "main", "run"]

# (name, shape, layout): layout "nchw" (contiguous), "nhwc" (channels-last memory), "nc" (2-D)
FULL_CASES: list[tuple[tuple[int, ...], str]] = [
    ((128, 64, 56, 56), "nchw"),
    ((128, 64, 56, 56), "nhwc"),
    ((32, 256, 28, 28), "nchw"),
    ((32, 256, 28, 28), "nhwc"),
    ((256, 64, 32, 32), "nchw"),
    ((4096, 1024), "nc"),
]
QUICK_CASES: list[tuple[tuple[int, ...], str]] = [
    ((4, 8, 6, 6), "nchw"),
    ((4, 8, 6, 6), "nhwc"),
    ((64, 16), "nc"),
]
PASSES = ("train fwd", "bwd", "fwd+bwd", "eval")
_BOUND_TENSORS = {"train fwd": 2.0, "bwd": 3.0, "fwd+bwd": 5.0, "eval": 2.0}
# goals of issue 3 (speed-up over native; fraction of the bound); "conv" = 4-D shapes
_GOAL_SPEEDUP = {"fwd+bwd": {"conv": 4.0, "nc": 1.5}, "eval": {"conv": 3.0}}
_GOAL_BOUND = {"train fwd": 0.5, "bwd": 0.5}


def _medians_ms(fns: Sequence[Callable[[], Any]], reps: int, warmup: int) -> list[float]:
    """Median wall time of each function; runs are interleaved (f0, f1, f0, f1, ...) so that a
    machine that slows down for a while slows every contender alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            for fn, ts in zip(fns, times):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
    finally:
        if gc_was:
            gc.enable()
    return [statistics.median(ts) * 1e3 for ts in times]


def _median_ms(fn: Callable[[], Any], reps: int, warmup: int) -> float:
    return _medians_ms([fn], reps, warmup)[0]


def _make_input(shape: Sequence[int], layout: str) -> torch.Tensor:
    x = torch.randn(*shape) * 2 + 0.5
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "ndhwc":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


def _case(shape: Sequence[int], layout: str, reps: int, warmup: int,
          with_compile: bool = False) -> list[dict[str, Any]]:
    from ..core import functional as F
    from ..kernels import backend_for

    torch.manual_seed(0)
    c = shape[1]
    x0 = _make_input(shape, layout)
    x = x0.clone().requires_grad_()
    w = (torch.rand(c) + 0.5).requires_grad_()
    b = (torch.randn(c) * 0.1).requires_grad_()
    rm, rv = torch.zeros(c), torch.ones(c)
    dy = torch.randn_like(x0)
    dst = torch.empty_like(x0)

    def ours_fwd():
        return F.batch_norm_train(x, rm, rv, w, b, activation="relu")[0]

    def torch_fwd():
        return torch.relu(TF.batch_norm(x, rm.clone(), rv.clone(), w, b, training=True))

    def ours_eval():
        with torch.no_grad():
            return F.batch_norm_eval(x0, rm, rv, w, b, activation="relu")

    def torch_eval():
        with torch.no_grad():
            return torch.relu(TF.batch_norm(x0, rm, rv, w, b, training=False))

    def step(fwd):
        return lambda: torch.autograd.grad(fwd(), (x, w, b), dy)

    def bwd_only(fwd):
        out = fwd()
        return lambda: torch.autograd.grad(out, (x, w, b), dy, retain_graph=True)

    first_call = {}  # numba compile or cache load happens here, outside the medians
    t0 = time.perf_counter()
    out = ours_fwd()
    first_call["train fwd"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.autograd.grad(out, (x, w, b), dy)
    first_call["bwd"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours_eval()
    first_call["eval"] = time.perf_counter() - t0
    del out

    # accuracy of both against a float64 computation (reported, not asserted)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x0, w, b))
    y64 = torch.relu(TF.batch_norm(x64, None, None, w64, b64, training=True))
    dx64 = torch.autograd.grad(y64, x64, dy.double())[0]
    y64, ymax, dxmax = y64.detach(), y64.detach().abs().max().item(), dx64.abs().max().item()
    err = {}
    for who, fwd in (("ours", ours_fwd), ("torch", torch_fwd)):
        yv = fwd()
        dxv = torch.autograd.grad(yv, x, dy)[0]
        err[who] = ((yv.detach().double() - y64).abs().max().item() / ymax,
                    (dxv.double() - dx64).abs().max().item() / dxmax)
    del x64, w64, b64, y64, dx64

    fns = {
        "train fwd": (ours_fwd, torch_fwd),
        "bwd": (bwd_only(ours_fwd), bwd_only(torch_fwd)),
        "fwd+bwd": (step(ours_fwd), step(torch_fwd)),
        "eval": (ours_eval, torch_eval),
    }
    kind = "nc" if len(shape) == 2 else "conv"
    compiled, compile_info = (None, {})
    if with_compile:  # the torch.compile (inductor) column: batchnorm.bench.compiled
        from .compiled import contenders

        compiled, compile_info = contenders(x, x0, w, b, rm, rv, dy)
    rows = []
    for p in PASSES:
        ours_fn, torch_fn = fns[p]
        # The copy that sets the bound runs in the same interleaving as both contenders, so it
        # meets the same (cold) cache; a back-to-back copy would flatter the bound on shapes
        # that fit in the last-level cache.
        copy_fn = lambda: dst.copy_(x0)  # noqa: E731
        contenders = [ours_fn, torch_fn, copy_fn] + ([compiled[p]] if compiled else [])
        t_ours, t_torch, t_copy, *t_comp = _medians_ms(contenders, reps, warmup)
        bound = _BOUND_TENSORS[p] / 2.0 * t_copy
        rows.append({
            "shape": list(shape), "layout": layout, "pass": p, "backend": backend_for(x0),
            "ours_ms": t_ours, "torch_ms": t_torch, "speedup": t_torch / t_ours,
            "copy_ms": t_copy, "bound_ms": bound, "bound_frac": bound / t_ours,
            "first_call_s": first_call.get(p),
            "err_y_ours": err["ours"][0], "err_dx_ours": err["ours"][1],
            "err_y_torch": err["torch"][0], "err_dx_torch": err["torch"][1],
            "goal_speedup": _GOAL_SPEEDUP.get(p, {}).get(kind, 1.0),
            "goal_bound": _GOAL_BOUND.get(p) if kind == "conv" else None,
            "compiled_ms": t_comp[0] if t_comp else None,
            "vs_compiled": t_comp[0] / t_ours if t_comp else None, **compile_info,
        })
    return rows


def run(cases: Sequence[tuple[tuple[int, ...], str]], reps: int = 9, warmup: int = 3,
        with_compile: bool = False) -> dict[str, Any]:
    """Measure every case; returns ``{"meta": {...}, "rows": [...]}`` (the table's figures)."""
    import numpy as np

    from ..kernels import _pool

    meta: dict[str, Any] = {
        "torch": torch.__version__, "numpy": np.__version__, "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "reps": reps, "warmup": warmup, "python": sys.version.split()[0],
    }
    try:
        import numba

        from ..kernels import _omp

        meta["numba"] = numba.__version__
        # where the kernels' threads come from: torch's OpenMP team (its runtime library) or our pool
        meta["kernel_threads"] = _omp.runtime() or "Python thread pool"
        meta["numba_cache_dir"] = os.environ.get("NUMBA_CACHE_DIR", "")
        from ..kernels import cpu

        meta["stream_min_bytes"] = cpu.STREAM_MIN_BYTES
    except ImportError:
        meta["numba"] = None
    rows: list[dict[str, Any]] = []
    for shape, layout in cases:
        rows += _case(shape, layout, reps, warmup, with_compile)
    meta["pool"] = _pool.stats()
    return {"meta": meta, "rows": rows}


def _ok(flag: bool | None) -> str:
    return "" if flag is None else ("[green]✓[/]" if flag else "[red]✗[/]")


def _print_table(result: dict[str, Any], quick: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    meta = result["meta"]
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # files and pipes: one row per line
    title = (f"BN+ReLU float32: ours vs torch {meta['torch']}, {meta['threads']} thread(s), "
             f"median of {meta['reps']} after {meta['warmup']} warm-up")
    t = Table(title=title, show_lines=False)
    for col, just in (("shape", "left"), ("layout", "left"), ("pass", "left"), ("ours ms", "right"),
                      ("torch ms", "right"), ("speed-up", "right"), ("bound ms", "right"),
                      ("% bound", "right"), ("goals", "left")):
        t.add_column(col, justify=just, no_wrap=True)
    with_compile = any(r.get("compiled_ms") is not None for r in result["rows"])
    if with_compile:
        t.add_column("compile ms", justify="right", no_wrap=True)
        t.add_column("vs compile", justify="right", no_wrap=True)
    last = None
    for r in result["rows"]:
        key = (tuple(r["shape"]), r["layout"])
        if last is not None and key != last:
            t.add_section()
        last = key
        goals = [f"{r['goal_speedup']:g}× {_ok(r['speedup'] >= r['goal_speedup'])}"]
        if r["goal_bound"] is not None:
            goals.append(f"{r['goal_bound']:.0%} {_ok(r['bound_frac'] >= r['goal_bound'])}")
        layout = r["layout"] + ("" if r["backend"] == "numba" else f" ({r['backend']})")
        extra = [f"{r['compiled_ms']:.2f}", f"{r['vs_compiled']:.2f}×"] if with_compile else []
        t.add_row("×".join(map(str, r["shape"])), layout, r["pass"],
                  f"{r['ours_ms']:.2f}", f"{r['torch_ms']:.2f}", f"{r['speedup']:.2f}×",
                  f"{r['bound_ms']:.2f}", f"{r['bound_frac']:.0%}", "  ".join(goals), *extra)
    console.print(t)
    console.print("goals: speed-up over native (≥1× everywhere; fwd+bwd ≥4× conv, ≥1.5× (N, C); eval ≥3× "
                  "conv) and, for conv shapes, train fwd and bwd ≥ 50 % of the bandwidth bound")
    firsts = [r["first_call_s"] for r in result["rows"] if r["first_call_s"] is not None]
    console.print(f"numba {meta.get('numba')}, threads from {meta.get('kernel_threads')}, "
                  f"cache {meta.get('numba_cache_dir') or '(default)'}; first call of each of our passes "
                  f"(compile or cache load) max {max(firsts, default=0):.2f} s, total {sum(firsts):.2f} s")
    console.print(f"output pool: {meta['pool']}")
    if meta.get("stream_min_bytes") is not None:
        console.print(f"outputs of ≥ {meta['stream_min_bytes'] / 2**20:g} MiB are written with streaming "
                      "stores (% bound can pass 100 %: the reference copy_ uses plain stores; see "
                      "batchnorm bench --stream)")
    rows = result["rows"]
    worst = {k: max(r[k] for r in rows) for k in ("err_y_ours", "err_dx_ours", "err_y_torch", "err_dx_torch")}
    console.print("error vs a float64 computation, max |Δ| / max |ref| over all cases: "
                  f"ours y {worst['err_y_ours']:.1e}, dx {worst['err_dx_ours']:.1e}; "
                  f"torch y {worst['err_y_torch']:.1e}, dx {worst['err_dx_torch']:.1e} (a dx error near 1 is "
                  "an element whose pre-activation rounded to the other side of ReLU's kink: it gets the "
                  "whole gradient or none)")
    if with_compile:
        secs = [r.get("compile_train_s", 0) + r.get("compile_eval_s", 0) for r in rows if r["pass"] == "eval"]
        console.print(f"compile ms: relu(F.batch_norm) under torch.compile(backend='inductor'), same "
                      f"tensors and interleaving; vs compile = its time / ours; compiling took "
                      f"{sum(secs):.0f} s")
    errors = {r["error"] for r in rows if r.get("error")}
    if errors:
        console.print(f"torch.compile column left out: {'; '.join(sorted(errors))}")
    if quick:
        console.print("[yellow]--quick: tiny shapes and few runs; the times say nothing about speed[/]")


# ---------------------------------------------------------------------------------- streaming
def _stream(reps: int, quick: bool) -> int:
    """Plain vs streaming stores for outputs of growing size, each pass followed by a read of its output
    (as the next layer would), to place ``BATCHNORM_STREAM_MIN_BYTES`` on this machine."""
    from rich.console import Console
    from rich.table import Table

    from ..kernels import cpu

    rows_m = (64, 256) if quick else (256, 1024, 2048, 3072, 4096, 8192, 16384)
    c = 1024
    old = cpu.STREAM_MIN_BYTES
    t = Table(title=f"Streaming stores: (M, {c}) float32 BN+ReLU, {torch.get_num_threads()} thread(s), "
                    f"each pass followed by output.sum(); median of {reps}")
    for col in ("output MB", "eval plain ms", "eval stream ms", "speed-up", "step plain ms",
                "step stream ms", "speed-up", "default"):
        t.add_column(col, justify="right")
    try:
        for m in rows_m:
            x = torch.randn(m, c)
            w, b, dy = torch.rand(c) + 0.5, torch.randn(c), torch.randn(m, c)
            _, mean, var = cpu.train_forward(x, w, b, 1e-5, 1, "relu", 0.0)

            def ev(limit, x=x, w=w, b=b, mean=mean, var=var):
                def f():
                    cpu.STREAM_MIN_BYTES = limit
                    cpu.eval_forward(x, mean, var, w, b, 1e-5, 1, "relu", 0.0).sum()
                return f

            def step(limit, x=x, w=w, b=b, dy=dy):
                def f():
                    cpu.STREAM_MIN_BYTES = limit
                    y, mm, vv = cpu.train_forward(x, w, b, 1e-5, 1, "relu", 0.0)
                    y.sum()
                    cpu.backward(dy, x, None, w, b, mm, vv, 1e-5, 1, "relu", 0.0)[0].sum()
                return f

            never, always = 1 << 62, 0
            e0, e1, s0, s1 = _medians_ms([ev(never), ev(always), step(never), step(always)], reps, 3)
            nbytes = x.numel() * x.element_size()
            t.add_row(f"{nbytes / 1e6:.1f}", f"{e0:.3f}", f"{e1:.3f}", f"{e0 / e1:.2f}×", f"{s0:.3f}",
                      f"{s1:.3f}", f"{s0 / s1:.2f}×", "stream" if nbytes >= old else "plain")
    finally:
        cpu.STREAM_MIN_BYTES = old
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)
    console.print(t)
    console.print(f"now streaming outputs of ≥ {old / 2**20:g} MiB (BATCHNORM_STREAM_MIN_BYTES={old}); "
                  "set it near the smallest size from which both speed-ups stay above 1×")
    if quick:
        console.print("[yellow]--quick: tiny sizes and few runs; the times say nothing about speed[/]")
    return 0


# ---------------------------------------------------------------------------------- allocation
_ALLOC_SNIPPET = r"""
import ctypes, json, statistics, sys, time, torch
mode = sys.argv[1]
if mode == "mallopt":
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-4, 0)          # M_MMAP_MAX = 0: no mmap for large blocks, reuse the heap
    libc.mallopt(-1, 1 << 30)    # M_TRIM_THRESHOLD = 1 GiB: keep freed memory
shape = tuple(int(s) for s in sys.argv[2].split("x"))
reps = int(sys.argv[3])
x = torch.randn(*shape)
def med(f):
    for _ in range(3): f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3
out = torch.empty_like(x)
res = {"copy_prealloc": med(lambda: out.copy_(x)), "empty_copy": med(lambda: torch.empty_like(x).copy_(x))}
if mode == "mallopt":
    w, b = torch.ones(shape[1]), torch.zeros(shape[1])
    bn = torch.nn.functional.batch_norm
    res["native_bn_relu_fwd"] = med(lambda: torch.relu(bn(x, None, None, w, b, True)))
print(json.dumps(res))
"""


def _alloc(shape: tuple[int, ...], reps: int) -> int:
    """Measure what a fresh output costs and what each allocation strategy saves."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from ..kernels import _pool, cpu

    x = torch.randn(*shape)
    c = shape[1]
    w, b = torch.ones(c), torch.zeros(c)
    pre = torch.empty_like(x)
    rows = []
    rows.append(("copy_ into a preallocated tensor (bandwidth reference)",
                 _median_ms(lambda: pre.copy_(x), reps, 3)))
    rows.append(("torch.empty_like + copy_ (fresh pages: page faults)",
                 _median_ms(lambda: torch.empty_like(x).copy_(x), reps, 3)))
    rows.append(("pool.empty_like + copy_ (recycled pages)",
                 _median_ms(lambda: _pool.empty_like(x).copy_(x), reps, 3)))
    old = cpu._empty_like
    try:
        cpu._empty_like = torch.empty_like
        rows.append(("our train fwd+relu, outputs from torch.empty_like",
                     _median_ms(lambda: cpu.train_forward(x, w, b, 1e-5, 1, "relu", 0.0), reps, 3)))
        cpu._empty_like = _pool.empty_like
        rows.append(("our train fwd+relu, outputs from the pool (default)",
                     _median_ms(lambda: cpu.train_forward(x, w, b, 1e-5, 1, "relu", 0.0), reps, 3)))
        cpu._empty_like = lambda t: pre
        rows.append(("our train fwd+relu, writing into one preallocated buffer",
                     _median_ms(lambda: cpu.train_forward(x, w, b, 1e-5, 1, "relu", 0.0), reps, 3)))
    finally:
        cpu._empty_like = old
    rows.append(("native relu(F.batch_norm) train fwd (default glibc)",
                 _median_ms(lambda: torch.relu(TF.batch_norm(x, None, None, w, b, True)), reps, 3)))
    shape_s = "x".join(map(str, shape))
    for mode in ("default", "mallopt"):
        out = subprocess.run([sys.executable, "-c", _ALLOC_SNIPPET, mode, shape_s, str(reps)],
                             capture_output=True, text=True, check=False)
        try:
            res = json.loads(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            rows.append((f"{mode} glibc, fresh process: failed: {out.stderr.strip()[-200:]}", float("nan")))
            continue
        rows.append((f"{mode} glibc, fresh process: torch.empty_like + copy_", res["empty_copy"]))
        if "native_bn_relu_fwd" in res:
            rows.append((f"{mode} glibc, fresh process: native relu(F.batch_norm) train fwd",
                         res["native_bn_relu_fwd"]))
    t = Table(title=f"Allocation of a {shape_s} float32 output ({x.numel() * 4 / 1e6:.0f} MB), "
                    f"median of {reps}")
    t.add_column("what")
    t.add_column("ms", justify="right")
    for what, ms in rows:
        t.add_row(escape(what), f"{ms:.2f}")
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)
    console.print(t)
    return 0


def _parse_case(text: str) -> tuple[tuple[int, ...], str]:
    """``"128x64x56x56:nhwc"`` -> ``((128, 64, 56, 56), "nhwc")``; default layout "nc" (2-D) or "nchw"."""
    shape_text, _, layout = text.strip().lower().partition(":")
    try:
        shape = tuple(int(v) for v in shape_text.replace("×", "x").split("x"))
    except ValueError:
        shape = ()
    if not 2 <= len(shape) <= 5 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"expected a shape of 2 to 5 positive sizes joined by 'x' (e.g. 4096x1024 or "
            f"32x256x28x28:nhwc), got {text!r}")
    layout = layout or ("nc" if len(shape) == 2 else "nchw")
    allowed = {2: ("nc",), 3: ("nchw",), 4: ("nchw", "nhwc"), 5: ("nchw", "ndhwc")}[len(shape)]
    if layout not in allowed:
        raise argparse.ArgumentTypeError(
            f"layout {layout!r} does not fit a {len(shape)}-D shape; use one of {', '.join(allowed)}")
    return shape, layout


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``batchnorm bench``; returns the process exit code."""
    compile_in_process()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--model" in argv:  # whole networks: batchnorm.bench.models
        from .models import main as models_main

        return models_main(argv)
    if "--small" in argv:  # small/medium layers through the modules: batchnorm.bench.small
        from .small import main as small_main

        return small_main([a for a in argv if a != "--small"])
    if "--inplace" in argv:
        from .inplace import main as inplace_main

        inplace_main([a for a in argv if a != "--inplace"])
        return 0
    p = argparse.ArgumentParser(prog="batchnorm bench", description=__doc__.split("\n")[0],
                                epilog="batchnorm bench --inplace [--quick ...]: the InPlace-ABN memory/time "
                                       "benchmark (see batchnorm.bench.inplace)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few runs (CI smoke test)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per measurement (default 9; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 3; quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch (and numba) threads (default: torch's)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write all figures to this JSON file")
    p.add_argument("--alloc", action="store_true", help="measure output allocation strategies instead")
    p.add_argument("--stream", action="store_true",
                   help="measure plain vs streaming output stores by size instead "
                        "(sets BATCHNORM_STREAM_MIN_BYTES)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="the torch.compile (inductor) column (default: on, off with --quick)")
    p.add_argument("--case", type=_parse_case, action="append", default=None, metavar="SHAPE[:LAYOUT]",
                   help="measure only this shape (repeatable), e.g. 4096x1024 or 128x64x56x56:nhwc; layout "
                        "nc (2-D), nchw (contiguous, default for 3- to 5-D), nhwc (4-D) or ndhwc (5-D)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    reps = args.reps if args.reps is not None else (3 if args.quick else 9)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if reps < 1 or warmup < 0:
        p.error(f"--reps must be >= 1 and --warmup >= 0, got {reps} and {warmup}")
    if args.alloc:
        return _alloc((16, 64, 32, 32) if args.quick else (128, 64, 56, 56), reps)
    if args.stream:
        return _stream(reps, args.quick)
    cases = args.case or (QUICK_CASES if args.quick else FULL_CASES)
    with_compile = (not args.quick) if args.compile is None else args.compile
    from ..kernels import available_backends, use_backend  # the table is about our kernels: force them

    with use_backend("numba" if "numba" in available_backends() else "auto"):  # (auto: small -> native)
        result = run(cases, reps=reps, warmup=warmup, with_compile=with_compile)
    _print_table(result, args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
