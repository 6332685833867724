"""SyncBatchNorm's overhead per step vs plain BN, at 2 gloo ranks on this machine (a script, not a test).

    python benchmarks/sync_bench.py            # full: 3 shapes, 9 repeats
    python benchmarks/sync_bench.py --quick    # 1 shape, 3 repeats

Each rank runs one BN layer's forward + backward per step on its shard (float32, NCHW), and, for
the whole-model figure, one SGD step of a small conv net under DDP. Per repeat the variants run
interleaved (plain BN = ``batchnorm.BatchNorm2d``, per-rank statistics; SyncBN; SyncBN under
``sync_join`` with even inputs, i.e. the fixed-size join collectives), each for ``--steps`` steps
after a barrier; rank 0 reports the median over repeats of the time per step and the ratio to
plain BN measured in the same repeat. The machine is shared: compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

SHAPES = [(16, 32, 8, 8), (32, 64, 16, 16), (16, 128, 28, 28)]  # per-rank shard (N, C, H, W)


def _layer_step(bn, x, dy):
    y = bn(x)
    y.backward(dy)


def _time(fn, steps):
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    dist.barrier()
    return (time.perf_counter() - t0) / steps


def _net(c):
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def _worker(rank, world, port, args, q):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    import batchnorm

    rows = []
    shapes = SHAPES[:1] if args.quick else SHAPES
    repeats = 3 if args.quick else args.repeats
    for shape in shapes:
        c = shape[1]
        x = torch.randn(shape, requires_grad=True)
        dy = torch.randn(shape)
        plain, sync = batchnorm.BatchNorm2d(c), batchnorm.SyncBatchNorm(c)
        holder = nn.parallel.DistributedDataParallel(
            nn.Sequential(nn.Linear(1, 1), batchnorm.SyncBatchNorm(c)))
        joined = holder.module[1]
        variants = {"plain BN": functools.partial(_layer_step, plain, x, dy),
                    "SyncBN": functools.partial(_layer_step, sync, x, dy)}
        in_join = functools.partial(_layer_step, joined, x, dy)
        times = {k: [] for k in (*variants, "SyncBN in sync_join")}
        for fn in variants.values():  # warm-up (numba compile, first collectives)
            for _ in range(3):
                fn()
        with batchnorm.sync_join(holder):
            for _ in range(3):
                _layer_step(joined, x, dy)
            for _ in range(repeats):
                for k, fn in variants.items():
                    times[k].append(_time(fn, args.steps))
                times["SyncBN in sync_join"].append(_time(in_join, args.steps))
        base = times["plain BN"]
        for k, ts in times.items():
            rows.append((f"layer {tuple(shape)}", k, statistics.median(ts) * 1e3,
                         statistics.median(t / b for t, b in zip(ts, base))))
    # whole model: one SGD step of a conv net under DDP, plain BN vs SyncBN
    n, c = (16, 32) if args.quick else (32, 32)
    xb, yb = torch.randn(n, 3, 16, 16), torch.randint(0, 10, (n,))
    models = {}
    for name, conv in (("plain BN", False), ("SyncBN", True)):
        torch.manual_seed(0)
        net = (batchnorm.convert_sync_batchnorm if conv else batchnorm.convert_to_batchnorm)(_net(c))
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)

        def step(ddp=ddp, opt=opt):
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(xb), yb).backward()
            opt.step()
        for _ in range(3):
            step()
        models[name] = step
    times = {k: [] for k in models}
    for _ in range(repeats):
        for k, fn in models.items():
            times[k].append(_time(fn, max(args.steps // 4, 3)))
    for k, ts in times.items():
        rows.append((f"DDP step, conv net C={c}, N={n}/rank", k, statistics.median(ts) * 1e3,
                     statistics.median(t / b for t, b in zip(ts, times["plain BN"]))))
    if rank == 0:
        q.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=40, help="steps per timing block")
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args(argv)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(2, port, args, q), nprocs=2, start_method="spawn")
    rows = q.get()
    print(f"SyncBatchNorm vs plain BN, 2 gloo ranks on 127.0.0.1, 1 thread each, float32, "
          f"{os.cpu_count()} CPUs; medians of {3 if args.quick else args.repeats} interleaved repeats")
    print(f"{'case':42s} {'variant':22s} {'ms/step':>9s} {'vs plain':>9s}")
    for case, variant, ms, ratio in rows:
        print(f"{case:42s} {variant:22s} {ms:9.3f} {ratio:8.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
