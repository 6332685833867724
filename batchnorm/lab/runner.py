"""Run experiments in this process or in worker processes, feeding one set of progress bars.

The lab's models are small: one training run keeps one core busy and gains nothing from a second
intra-op thread. So ``--jobs 2`` (the default on a machine with 2 or more cores) runs two
*experiments* at a time, each in its own process with one torch thread, longest first
(``Experiment.cost``). Workers are started with ``spawn`` (no fork of a process that already runs
torch threads), load the data set themselves from the same arguments, and send progress over a
queue (batched every 0.2 s); the parent draws the bars and collects the JSON results.
"""

from __future__ import annotations

import contextlib
import queue as _queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import registry

__all__ = ["run_experiment", "run_in_workers"]


def run_experiment(exp: registry.Experiment, data: Any, seeds: list[int], quick: bool, out: Path,
                   progress: registry.ProgressLike, options: dict[str, str]) -> dict[str, Any]:
    """Run one experiment; returns its results.json entry (errors are caught and recorded)."""
    ctx = registry.Context(data=data, seeds=seeds, quick=quick, out=out, progress=progress, options=options)
    t0, c0 = time.perf_counter(), time.process_time()
    entry: dict[str, Any] = {"help": exp.help, "config": exp.config(quick, options)}
    try:
        entry["result"] = exp(ctx)
        entry["error"] = None
    except Exception as e:  # one failed experiment must not lose the others
        entry["result"] = None
        entry["error"] = f"{type(e).__name__}: {e}"
    entry["wall_s"] = time.perf_counter() - t0
    entry["cpu_s"] = time.process_time() - c0
    return entry


# -- worker side ----------------------------------------------------------------------------------
_W: dict[str, Any] = {}


class _QueueTask:
    def __init__(self, q: Any, tid: str) -> None:
        self.q, self.tid, self.pending, self.last = q, tid, 0, time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.pending += n
        now = time.monotonic()
        if now - self.last > 0.2:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        if self.pending:
            self.q.put(("advance", self.tid, self.pending))
            self.pending = 0
        self.last = time.monotonic() if now is None else now


class _QueueProgress:
    def __init__(self, q: Any, name: str) -> None:
        self.q, self.name, self.tasks = q, name, []

    def task(self, description: str, total: int) -> _QueueTask:
        tid = f"{self.name}:{len(self.tasks)}"
        self.q.put(("new", tid, description, int(total)))
        t = _QueueTask(self.q, tid)
        self.tasks.append(t)
        return t

    def flush(self) -> None:
        for t in self.tasks:
            t.flush()


def _init_worker(data_kwargs: dict[str, Any], threads: int, backend: str, q: Any) -> None:
    import batchnorm.kernels as kernels

    from .data import load_dataset
    from .train import set_threads

    set_threads(threads)
    kernels.set_backend(backend)
    _W["data"] = load_dataset(**data_kwargs)
    _W["queue"] = q


def _work(name: str, seeds: list[int], quick: bool, out: str, options: dict[str, str]) -> tuple[str, dict]:
    progress = _QueueProgress(_W["queue"], name)
    entry = run_experiment(registry.get(name), _W["data"], seeds, quick, Path(out), progress, options)
    progress.flush()
    return name, entry


# -- parent side ----------------------------------------------------------------------------------
def run_in_workers(selected: list[registry.Experiment], *, jobs: int, data_kwargs: dict[str, Any],
                   threads: int, backend: str, seeds: list[int], quick: bool, out: Path,
                   options: dict[str, dict[str, str]], new_task: Callable[[str, int], Any],
                   advance: Callable[[Any, int], None]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Run ``selected`` in ``jobs`` spawned processes (longest first); yield ``(name, entry)`` as each ends.

    ``new_task(description, total) -> handle`` and ``advance(handle, n)`` draw the progress.
    """
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        q = manager.Queue()
        handles: dict[str, Any] = {}

        def drain() -> None:
            while True:
                try:
                    msg = q.get_nowait()
                except (_queue.Empty, EOFError, OSError):
                    return
                if msg[0] == "new":
                    handles[msg[1]] = new_task(msg[2], msg[3])
                elif msg[0] == "advance" and msg[1] in handles:
                    advance(handles[msg[1]], msg[2])

        order = sorted(selected, key=lambda e: -e.cost)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(data_kwargs, threads, backend, q)) as pool:
            pending = {pool.submit(_work, e.name, seeds, quick, str(out), options[e.name]): e.name
                       for e in order}
            try:
                while pending:
                    done, _ = wait(list(pending), timeout=0.1, return_when=FIRST_COMPLETED)
                    drain()
                    for fut in done:
                        name = pending.pop(fut)
                        try:
                            yield fut.result()
                        except Exception as e:  # the worker died (killed, out of memory, unpicklable result)
                            yield name, {"help": registry.get(name).help, "config": {}, "result": None,
                                         "error": f"worker failed: {type(e).__name__}: {e}", "wall_s": None,
                                         "cpu_s": None}
            finally:
                for fut in pending:
                    fut.cancel()
        with contextlib.suppress(Exception):
            drain()
