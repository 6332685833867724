"""Run a function in W local processes joined by a gloo process group (loopback), collect results.

One spawn per world size: the target runs many cases in one process group and returns
``{case: "ok" | traceback}``; each rank writes it to a JSON file that the parent reads. A deadline
bounds the whole run (processes still alive then are killed), so a hang fails a test instead of
blocking CI.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, outdir: str, target: str, args: tuple,
           pg_timeout: float) -> None:
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    out = Path(outdir)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        mod_name, fn_name = target.split(":")
        fn = getattr(importlib.import_module(mod_name), fn_name)
        results = fn(rank, world, out, *args)
    except BaseException:
        results = {"<setup>": traceback.format_exc()}
    tmp = out / f"rank{rank}.json.tmp"
    tmp.write_text(json.dumps(results))
    tmp.rename(out / f"rank{rank}.json")
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip process-group teardown: a case that timed out on purpose leaves a gloo thread blocked in a
    # collective, and destroy_process_group would wait for it.
    os._exit(0)


def launch(target: str, world: int, *args, deadline_s: float = 240.0, pg_timeout: float = 60.0) -> dict:
    """Run ``target`` ("module:function", called as ``fn(rank, world, outdir, *args)``) in ``world``
    spawned processes; return ``{rank: {case: "ok" | error text}}``."""
    with tempfile.TemporaryDirectory(prefix="bn_sync_") as outdir:
        ctx = mp.start_processes(_child, args=(world, free_port(), outdir, target, args, pg_timeout),
                                 nprocs=world, join=False, start_method="spawn")
        end = time.monotonic() + deadline_s
        crashed = ""
        while True:
            try:
                if ctx.join(timeout=0.5):
                    break
            except Exception as e:  # a process died badly (signal, non-zero exit)
                crashed = f"{type(e).__name__}: {e}"
                break
            if time.monotonic() > end:
                crashed = f"deadline of {deadline_s:g} s passed; killed the processes"
                break
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
        results = {}
        for r in range(world):
            f = Path(outdir) / f"rank{r}.json"
            results[r] = json.loads(f.read_text()) if f.exists() else {"<missing>": crashed or "no result"}
        return results


_LAUNCHED: dict = {}


def launch_once(target: str, world: int, **kw) -> dict:
    """:func:`launch`, once per session for each ``(target, world)``: test modules that share one
    spawn (its cases) each ask for it, and only the first pays the start-up."""
    key = (target, world)
    if key not in _LAUNCHED:
        _LAUNCHED[key] = launch(target, world, **kw)
    return _LAUNCHED[key]


def run_cases(cases: list, rank: int, world: int, *args) -> dict:
    """Run each ``case(rank, world, *args)`` in order; a barrier after each keeps ranks in step."""
    results = {}
    for case in cases:
        try:
            case(rank, world, *args)
            results[case.__name__] = "ok"
        except BaseException:
            results[case.__name__] = traceback.format_exc()
        try:
            dist.barrier()
        except BaseException:
            results[case.__name__ + ":barrier"] = traceback.format_exc()
            break
    return results


def check(results: dict, case: str) -> None:
    """Fail with every rank's error text unless ``case`` passed on every rank that ran it."""
    bad = []
    for rank, res in results.items():
        for k in ("<setup>", "<missing>", case + ":barrier"):
            if k in res:
                bad.append(f"rank {rank} {k}:\n{res[k]}")
        if case in res and res[case] != "ok":
            bad.append(f"rank {rank}:\n{res[case]}")
    if not any(case in res for res in results.values()):
        bad.append(f"case {case!r} did not run on any rank")
    if bad:
        raise AssertionError(f"{case} failed:\n" + "\n".join(bad))
