"""``batchnorm demo`` and ``batchnorm run``: run lab experiments, print a summary, write the report.

``batchnorm.cli`` dispatches here with ``argv = ["demo", ...]`` or ``["run", ...]``;
:func:`main` returns the exit code (0 ok, 1 an experiment failed, 2 bad usage or unreadable data).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from . import registry

_COMMON_EPILOG = """
data:
  --data digits                      scikit-learn's bundled handwritten digits (default, offline)
  --data DIR                         MNIST or Fashion-MNIST: a directory holding train-images-idx3-ubyte,
                                     train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte
                                     (each raw or .gz)
  --data IMGS,LABELS[,TIMGS,TLABELS] explicit IDX files (with 2 files a stratified 25%% test split is made)

output (in --out, default ./bn-report): report.html (self-contained), one PNG per figure, results.json
(every number; `--from-results bn-report/results.json` rebuilds the report without training).
"""


def _experiment_lines(exps: list[registry.Experiment], with_options: bool) -> str:
    lines = []
    for e in exps:
        lines.append(f"  {e.name:<16} {e.help}")
        if with_options:
            opts = ", ".join(f"{k}={_fmt(v)}" for k, v in e.defaults.items())
            lines.append(f"  {'':<16}   options: {opts}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, list | tuple):
        return ",".join(_fmt(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _parser(cmd: str) -> argparse.ArgumentParser:
    exps = registry.registered()
    if cmd == "demo":
        desc = (
            "Train small networks on real data and write a report of what Batch Normalization does: one "
            "section per experiment, each claim with what this run measured and a computed verdict."
        )
        epilog = (
            "experiments in the demo (default selection):\n"
            + _experiment_lines([e for e in exps if e.demo], False)
            + "\n\nother experiments (batchnorm run NAME):\n"
            + (_experiment_lines([e for e in exps if not e.demo], False) or "  (none)")
            + "\n"
            + _COMMON_EPILOG
        )
        p = argparse.ArgumentParser(
            prog="batchnorm demo",
            description=desc,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--only", metavar="NAMES", help="comma-separated subset of experiments to run")
    else:
        desc = "Run one or more named lab experiments and write their report."
        epilog = (
            "experiments (--set KEY=VALUE overrides an option; lists are comma-separated):\n"
            + _experiment_lines(exps, True)
            + "\n"
            + _COMMON_EPILOG
        )
        p = argparse.ArgumentParser(
            prog="batchnorm run",
            description=desc,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("names", nargs="*", metavar="NAME", help="experiment(s) to run (see the list below)")
    p.add_argument("--data", default="digits", metavar="PATH", help="data set (default: digits; see below)")
    p.add_argument(
        "--out", default="bn-report", metavar="DIR", help="output directory (default: ./bn-report)"
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="seeds per configuration, 0..N-1 (default 3; 2 with --quick)",
    )
    p.add_argument("--quick", action="store_true", help="tiny configurations (a smoke run in seconds)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[NAME.]KEY=VALUE",
        dest="sets",
        help="override an experiment option, e.g. --set convergence.steps=1000 (repeatable)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        metavar="N",
        help="experiments run in parallel, one process each (default: 2 with >= 2 cores, else 1)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="torch intra-op threads (default 1: fastest for these small models)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "native", "torch", "numba"],
        help="BN kernel backend (default auto: the lab's small layers run torch's native kernel "
        "through our modules, as fast as torch.nn and with no numba compile in each worker; large "
        "ones the numba kernels; 'torch' is the composite reference; results agree to float32 rounding)",
    )
    p.add_argument(
        "--preprocessing",
        default="zscore",
        choices=["zscore", "minmax", "mean", "none"],
        help="input preprocessing with per-channel training-set statistics (default zscore)",
    )
    p.add_argument(
        "--max-train",
        type=int,
        default=None,
        metavar="N",
        help="use a random subset of N training images (e.g. to keep MNIST runs short)",
    )
    p.add_argument(
        "--max-test", type=int, default=None, metavar="N", help="use a random subset of N test images"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--from-results",
        metavar="FILE",
        help="do not train: rebuild the report from an existing results.json",
    )
    return p


def _options(sets: list[str], selected: list[registry.Experiment]) -> dict[str, dict[str, str]]:
    """``--set`` values per experiment name; a bare KEY applies to every selected experiment that has it."""
    out: dict[str, dict[str, str]] = {e.name: {} for e in selected}
    for item in sets:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE or NAME.KEY=VALUE")
        key, value = item.split("=", 1)
        if "." in key:
            name, key = key.split(".", 1)
            if name not in out:
                raise ValueError(
                    f"--set {item!r}: experiment {name!r} is not selected (selected: {', '.join(out)})"
                )
            targets = [name]
        else:
            targets = [e.name for e in selected if key in e.defaults]
            if not targets:
                raise ValueError(f"--set {item!r}: no selected experiment has an option {key!r}")
        for t in targets:
            out[t][key] = value
    return out


class _RichProgress:
    """The :class:`batchnorm.lab.registry.ProgressLike` handle, drawn with rich."""

    def __init__(self, progress: Any) -> None:
        self.p = progress

    def task(self, description: str, total: int) -> Any:
        tid = self.p.add_task(description, total=total)
        p = self.p

        class _T:
            def advance(self, n: int = 1) -> None:
                p.update(tid, advance=n)

        return _T()


def _summary_table(
    console: Any, claims: list[tuple[str, registry.Claim]], timings: dict[str, float], errors: dict[str, str]
) -> None:
    from rich.table import Table

    colour = {registry.AGREES: "green", registry.PARTLY: "yellow", registry.DISAGREES: "red"}
    table = Table(title="What the run shows", show_lines=True, expand=True)
    table.add_column("experiment", style="bold", no_wrap=True)
    table.add_column("claim", ratio=3)
    table.add_column("measured (details in report.html)", ratio=3)
    table.add_column("verdict", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    seen = set()
    for name, c in claims:
        t = f"{timings.get(name, 0):.0f} s" if name not in seen else ""
        seen.add(name)
        verdict_cell = f"[{colour.get(c.verdict, 'white')}]{c.verdict}[/]"
        table.add_row(name, c.claim, c.headline or c.measured, verdict_cell, t)
    for name, err in errors.items():
        table.add_row(name, "-", f"[red]{err}[/]", "[red]error[/]", f"{timings.get(name, 0):.0f} s")
    console.print(table)


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the --jobs workers)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``argv = ["demo", ...]`` or ``["run", ...]``."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if not args_in or args_in[0] not in ("demo", "run"):
        print("batchnorm.lab.cli: expected 'demo' or 'run' as the first argument", file=sys.stderr)
        return 2
    cmd = args_in[0]
    parser = _parser(cmd)
    try:
        args = parser.parse_args(args_in[1:])
    except SystemExit as e:  # --help (0) or a usage error (2)
        return int(e.code or 0)

    from rich.console import Console

    console = Console(stderr=False)
    for mod, err in registry.discovery_errors().items():
        console.print(f"[yellow]warning: experiment module batchnorm.lab.{mod} failed to import and is "
                      f"skipped: {err}[/]")
    out = Path(args.out)
    if args.from_results:
        from .report import regenerate

        try:
            info = regenerate(args.from_results, args.out if args.out != "bn-report" else None)
        except (FileNotFoundError, ValueError) as e:
            print(f"batchnorm {cmd}: {e}", file=sys.stderr)
            return 2
        from .report import load_results

        done = load_results(args.from_results)["experiments"]
        _summary_table(console, info["claims"], {k: v.get("wall_s") or 0.0 for k, v in done.items()},
                       info["errors"])
        console.print(f"report: {info['html']}")
        return 0

    # which experiments
    try:
        if cmd == "demo":
            selected = registry.demo_selection()
            if args.only:
                selected = [registry.get(n.strip()) for n in args.only.split(",") if n.strip()]
        else:
            if not args.names:
                parser.print_help()
                print("\nbatchnorm run: name at least one experiment", file=sys.stderr)
                return 2
            selected = [registry.get(n) for n in args.names]
        options = _options(args.sets, selected)
        for e in selected:
            e.config(args.quick, options[e.name])  # validate options before any training
    except (KeyError, ValueError) as e:
        print(f"batchnorm {cmd}: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"batchnorm {cmd}: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    if args.seeds is not None and args.seeds < 1:
        print(f"batchnorm {cmd}: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
        return 2
    seeds = list(range(args.seeds if args.seeds is not None else (2 if args.quick else 3)))

    import torch

    from .data import IdxFormatError, load_dataset
    from .report import write_report, write_results
    from .runner import run_experiment, run_in_workers
    from .train import set_threads

    threads = set_threads(args.threads)
    import batchnorm.kernels as kernels

    try:
        kernels.set_backend(args.backend)
    except (ValueError, KeyError) as e:
        print(f"batchnorm {cmd}: --backend {args.backend}: {e}", file=sys.stderr)
        return 2
    t_start, c_start = time.perf_counter(), _cpu_seconds()
    try:
        ds = load_dataset(
            None if args.data == "digits" else args.data,
            preprocessing=args.preprocessing,
            max_train=args.max_train,
            max_test=args.max_test,
        )
    except (IdxFormatError, FileNotFoundError, ValueError) as e:
        print(f"batchnorm {cmd}: cannot load --data {args.data!r}: {e}", file=sys.stderr)
        return 2
    console.print(
        f"[bold]batchnorm {cmd}[/]: {len(selected)} experiment(s) on {ds.name} "
        f"({ds.x_train.shape[0]} train / {ds.x_test.shape[0]} test, {args.preprocessing}), "
        f"seeds {seeds}{', quick' if args.quick else ''}, {min(args.jobs, len(selected))} job(s) x {threads} "
        f"thread(s) -> {out}/"
    )
    results: dict[str, Any] = {
        "meta": {
            "tool": "batchnorm lab",
            "command": " ".join(["batchnorm", *args_in]),
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "data": ds.info(),
            "seeds": seeds,
            "quick": bool(args.quick),
            "threads": threads,
            "backend": args.backend,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
        },
        "experiments": {},
    }
    timings: dict[str, float] = {}
    failed = False
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("{task.description:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=args.no_progress,
    )
    jobs = max(1, min(args.jobs, len(selected)))
    results["meta"]["jobs"] = jobs
    with progress:
        if jobs == 1:
            handle = _RichProgress(progress)
            stream = ((e.name, run_experiment(e, ds, seeds, args.quick, out, handle, options[e.name]))
                      for e in selected)
        else:
            stream = run_in_workers(
                selected, jobs=jobs, threads=threads, backend=args.backend, seeds=seeds, quick=args.quick,
                out=out, options=options, new_task=lambda d, t: progress.add_task(d, total=t),
                advance=lambda tid, n: progress.update(tid, advance=n),
                data_kwargs={"spec": None if args.data == "digits" else args.data,
                             "preprocessing": args.preprocessing, "max_train": args.max_train,
                             "max_test": args.max_test})
        for name, entry in stream:
            if entry.get("error"):
                failed = True
                console.print(f"[red]{name} failed: {entry['error']}[/]")
            timings[name] = entry.get("wall_s") or 0.0
            results["experiments"][name] = entry
            results["meta"]["wall_s"] = time.perf_counter() - t_start
            write_results(results, out)  # partial results survive an interrupted run
    # report order = registry order, whatever order the workers finished in
    results["experiments"] = {e.name: results["experiments"][e.name] for e in selected
                              if e.name in results["experiments"]}
    info = write_report(results, out)
    results["meta"]["wall_s"] = time.perf_counter() - t_start
    results["meta"]["cpu_s"] = _cpu_seconds() - c_start
    write_results(results, out)
    _summary_table(console, info["claims"], timings, info["errors"])
    console.print(
        f"wall time {results['meta']['wall_s']:.1f} s (CPU {results['meta']['cpu_s']:.1f} s). "
        f"Report: [bold]{info['html']}[/], {len(info['figures'])} PNG figure(s), "
        f"numbers in {out / 'results.json'}"
    )
    return 1 if failed or info["errors"] else 0
