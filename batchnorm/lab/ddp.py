"""Data-parallel training of the lab's models with SyncBatchNorm: ``torchrun -m batchnorm.lab.ddp``.

Run it on one machine with N processes (gloo on CPU, nccl on GPUs)::

    torchrun --standalone --nproc-per-node 2 -m batchnorm.lab.ddp --model cnn_bn --steps 300 \\
        --batch-size 64 --out ddp.json

across machines with one torchrun per machine (gloo over TCP; ``GLOO_SOCKET_IFNAME`` picks the
network interface), every one naming the node-rank-0 machine::

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 2 --master-addr 10.0.0.1 --master-port 29500 \\
        -m batchnorm.lab.ddp --model cnn_bn --steps 300     # and --node-rank 1 on the other machine

or, without torchrun, as one ordinary process (``python -m batchnorm.lab.ddp ...``): same code,
world size 1. Both print the same curve: with SyncBN the global batch's statistics are identical
whichever way the batch is split, so N processes follow the one-process run up to float rounding
(``--no-sync`` keeps per-process BN statistics and shows the difference).

How a step works (every rank runs the same loop):

* the **global** batch order is :func:`batchnorm.lab.train.batch_indices` with the run's seed —
  the same sequence on every rank and in a one-process run;
* each rank takes its shard of the global batch, ``batch[rank::world]`` (DistributedSampler's
  deterministic strided split; shards may differ by one sample, or be empty);
* BN layers are :class:`batchnorm.SyncBatchNorm` (``convert_sync_batchnorm``), the model is wrapped
  in ``DistributedDataParallel`` (which averages gradients over ranks), and each rank's loss is
  ``Σ_shard CE · world / global_batch`` so that the averaged gradient is exactly the gradient of
  the global mean cross-entropy, for even and uneven shards alike;
* the reported batch loss is the global mean (one all-reduce per evaluation interval), and the test
  set is evaluated data-parallel too (each rank a strided shard, sums all-reduced), so the history
  is the same on every rank; rank 0 prints it and writes ``--out``.

A rank that dies or falls out of step makes the others fail with
:class:`batchnorm.family.sync.SyncBatchNormError`
after ``--timeout`` seconds instead of hanging.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from batchnorm.family.sync import convert_sync_batchnorm

from .data import Dataset, load_dataset
from .models import MODEL_KINDS, build
from .train import TrainConfig, batch_indices, make_optimizer, set_threads

__all__ = ["main", "shard", "train_data_parallel"]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's part of a global index batch: ``batch[rank::world]`` (DistributedSampler's split).

    Example:
        >>> shard(torch.arange(7), 1, 3)
        tensor([1, 4])
    """
    if not 0 <= rank < world:
        raise ValueError(f"shard: expected 0 <= rank < world, got rank={rank}, world={world}")
    return batch[rank::world]


def _allreduce(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
    return t


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int, world: int,
              device: torch.device, chunk: int = 4096) -> tuple[float | None, float]:
    """Test loss and accuracy in eval mode (running statistics), data-parallel over ranks."""
    was = model.training
    model.eval()
    idx = shard(torch.arange(x.shape[0]), rank, world)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for i in range(0, idx.numel(), chunk):
            j = idx[i:i + chunk]
            logits = model(x[j].to(device))
            t = y[j].to(device)
            sums[0] += F.cross_entropy(logits, t, reduction="sum").double()
            sums[1] += (logits.argmax(1) == t).sum().double()
    model.train(was)
    sums = _allreduce(sums, world)
    n = max(int(x.shape[0]), 1)
    loss = float(sums[0]) / n
    return (loss if math.isfinite(loss) else None), float(sums[1]) / n


def train_data_parallel(
    data: Dataset,
    kind: str = "cnn_bn",
    cfg: TrainConfig | None = None,
    *,
    sync: bool = True,
    device: torch.device | str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train ``build(kind)`` on ``data`` over all ranks of the default process group (or alone).

    Call it in every rank after ``init_process_group`` (torchrun does that in :func:`main`), or in a
    plain process for the one-process reference. ``cfg.batch_size`` is the **global** batch.

    Args:
        data: the lab's :class:`~batchnorm.lab.data.Dataset` (every rank loads the same one).
        kind: a model of :data:`batchnorm.lab.models.MODEL_KINDS`, built under ``cfg.seed``.
        cfg: steps, global batch size, lr, optimizer, evaluation interval, seed.
        sync: convert BN layers to :class:`batchnorm.SyncBatchNorm` (global statistics); False keeps
            per-rank statistics (what plain DDP does).
        device: where this rank computes (default: the CPU).
        model_kwargs: extra arguments for the model builder.
        on_step: ``on_step(step, global_batch_loss)`` after each update.

    Returns:
        JSON-ready history, identical on every rank: ``batch_loss`` (global mean cross-entropy of
        each step), ``steps``/``test_loss``/``test_acc`` at the evaluation points (step 0 included),
        ``train_loss`` (mean batch loss since the previous point), ``world_size``, ``sync``,
        ``model``, ``config``, ``wall_s``.
    """
    cfg = cfg or TrainConfig()
    if kind not in MODEL_KINDS:
        raise ValueError(f"train_data_parallel: unknown model {kind!r}; expected one of {MODEL_KINDS}")
    rank, world = _world()
    device = torch.device(device or "cpu")
    t0 = time.perf_counter()
    model = build(kind, data.image_shape, data.num_classes, seed=cfg.seed, **(model_kwargs or {})).to(device)
    if sync and world > 1:
        model = convert_sync_batchnorm(model)
    net: nn.Module = model
    if world > 1:
        ids = [device] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    opt = make_optimizer(net, cfg)
    x, y = data.x_train, data.y_train
    hist: dict[str, Any] = {"steps": [], "test_loss": [], "test_acc": [], "train_loss": [], "batch_loss": []}
    pending: list[torch.Tensor] = []  # local loss sums since the last evaluation

    def record(step: int) -> None:
        if pending:
            losses = _allreduce(torch.stack(pending).double(), world) / cfg.batch_size
            hist["batch_loss"].extend(float(v) for v in losses)
            hist["train_loss"].append(float(losses.mean()))
            pending.clear()
        else:
            hist["train_loss"].append(None)
        loss, acc = _evaluate(model, data.x_test, data.y_test, rank, world, device)
        hist["steps"].append(step)
        hist["test_loss"].append(loss)
        hist["test_acc"].append(acc)

    net.train()
    record(0)
    for step, idx in enumerate(batch_indices(x.shape[0], cfg.batch_size, cfg.steps, cfg.seed), start=1):
        mine = shard(idx, rank, world)
        xb, yb = x[mine].to(device), y[mine].to(device)
        loss_sum = F.cross_entropy(net(xb), yb, reduction="sum")
        # DDP averages gradients over ranks: scale so the average is d(global mean CE)/dθ.
        opt.zero_grad(set_to_none=True)
        (loss_sum * (world / cfg.batch_size)).backward()
        opt.step()
        pending.append(loss_sum.detach())
        if on_step is not None:
            on_step(step, float(loss_sum.detach()) / cfg.batch_size * world)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record(step)
    hist.update(world_size=world, sync=bool(sync), model=kind, config=asdict(cfg),
                final_test_acc=hist["test_acc"][-1], final_test_loss=hist["test_loss"][-1],
                wall_s=time.perf_counter() - t0)
    return hist


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchrun --standalone --nproc-per-node N -m batchnorm.lab.ddp",
        description="Data-parallel training of a lab model with SyncBatchNorm (gloo on CPU, nccl on GPUs). "
                    "Without torchrun it runs as one process: the reference curve.")
    p.add_argument("--model", default="cnn_bn", choices=MODEL_KINDS)
    p.add_argument("--data", default=None, help="'digits' (default), an MNIST-style IDX directory, or files")
    p.add_argument("--max-train", type=int, default=None, help="random subset of the training set")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64, help="GLOBAL batch size (split over processes)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "momentum", "adam"])
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-sync", action="store_true", help="per-process BN statistics (plain DDP)")
    p.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"],
                   help="auto: nccl when CUDA is available, else gloo")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a collective may wait for the other ranks before failing (default 300)")
    p.add_argument("--out", default=None, help="write the history as JSON here (rank 0)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``python -m batchnorm.lab.ddp`` / ``torchrun ... -m batchnorm.lab.ddp``."""
    args = _parser().parse_args(argv)
    set_threads(1)
    launched = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    device = torch.device("cpu")
    if launched:
        backend = args.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
    elif args.backend == "nccl" or (args.backend == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda")
    try:
        rank, world = _world()
        data = load_dataset(args.data, max_train=args.max_train, seed=args.seed)
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                          eval_every=args.eval_every, seed=args.seed)
        if rank == 0:
            print(f"batchnorm.lab.ddp: {args.model} on {data.name} ({data.x_train.shape[0]} train images), "
                  f"{world} process(es) on {device}, global batch {cfg.batch_size}, "
                  f"{'SyncBatchNorm' if not args.no_sync else 'per-process BN'}", flush=True)
        hist = train_data_parallel(data, args.model, cfg, sync=not args.no_sync, device=device)
        if rank == 0:
            for s, tl, acc in zip(hist["steps"], hist["train_loss"], hist["test_acc"]):
                tls = "     -" if tl is None else f"{tl:.4f}"
                print(f"step {s:5d}  train loss {tls}  test acc {acc:.4f}", flush=True)
            print(f"done in {hist['wall_s']:.1f} s", flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(hist, indent=1))
        if launched:
            # Tear gloo down together: a rank that destroys its group while a peer is still
            # running can abort in gloo's threads ("terminate called without an active exception").
            dist.barrier()
        return hist
    finally:
        if launched:
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
