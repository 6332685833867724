"""The lab's data-parallel training: 2 gloo processes follow the one-process curve.

``train_data_parallel`` runs in 2 spawned processes (SyncBatchNorm + DDP, global batch split
``batch[rank::2]``) and in this process alone; with SyncBN the per-step global losses agree to
float32 rounding, and they also agree with the lab's ordinary single-process loop
(:func:`batchnorm.lab.train.train`). Without SyncBN (per-process statistics) the curves differ
visibly — the check that the comparison can fail. The torchrun command of the README runs too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.sync_harness import launch

from batchnorm.lab import ddp
from batchnorm.lab.data import load_dataset
from batchnorm.lab.models import build
from batchnorm.lab.train import TrainConfig, train

# batch 33 over 2 ranks: shards of 17 and 16 (uneven on purpose)
CFG = {"cnn_bn": TrainConfig(steps=8, batch_size=33, lr=0.1, eval_every=4, seed=0),
       "mlp_bn_before": TrainConfig(steps=8, batch_size=32, lr=0.1, optimizer="momentum", eval_every=4,
                                    seed=1)}
MAX_TRAIN = 400


def worker(rank, world, out):
    torch.set_num_threads(1)
    data = load_dataset(max_train=MAX_TRAIN)
    res = {}
    for kind, cfg in CFG.items():
        for sync in (True, False) if kind == "cnn_bn" else (True,):
            key = f"{kind}:{'sync' if sync else 'nosync'}"
            try:
                res[key] = ddp.train_data_parallel(data, kind, cfg, sync=sync)
            except BaseException:
                res[key] = traceback.format_exc()
    return res


@pytest.fixture(scope="module")
def two_procs():
    return launch("test_sync_ddp:worker", 2, deadline_s=240)


@pytest.fixture(scope="module")
def data():
    return load_dataset(max_train=MAX_TRAIN)


_ONE: dict = {}


def _one_process(data, kind):
    if kind not in _ONE:
        _ONE[kind] = ddp.train_data_parallel(data, kind, CFG[kind])
    return _ONE[kind]


def _hist(results, rank, key):
    h = results[rank].get(key)
    if not isinstance(h, dict):
        raise AssertionError(f"rank {rank} {key} failed:\n{h}\n{results[rank].get('<setup>', '')}")
    return h


@pytest.mark.parametrize("kind", list(CFG))
def test_two_processes_follow_one_process(two_procs, data, kind):
    cfg = CFG[kind]
    one = _one_process(data, kind)
    assert one["world_size"] == 1
    h0, h1 = _hist(two_procs, 0, f"{kind}:sync"), _hist(two_procs, 1, f"{kind}:sync")
    assert h0["world_size"] == 2 and h0["sync"]
    # the same history on every rank
    assert h0["batch_loss"] == h1["batch_loss"] and h0["test_acc"] == h1["test_acc"]
    assert len(h0["batch_loss"]) == cfg.steps == len(one["batch_loss"])
    a, b = np.array(h0["batch_loss"]), np.array(one["batch_loss"])
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=0, err_msg="2-process vs 1-process batch losses")
    np.testing.assert_allclose(h0["test_loss"], one["test_loss"], rtol=2e-5, err_msg="test loss")
    assert np.max(np.abs(np.array(h0["test_acc"]) - one["test_acc"])) <= 1.0 / data.x_test.shape[0]
    assert b[-1] < b[0], "the run did not train"
    # ...and the one-process run is the lab's ordinary loop
    steps = []
    train(build(kind, data.image_shape, data.num_classes, seed=cfg.seed), data, cfg,
          on_step=lambda s, m, loss: steps.append(loss))
    np.testing.assert_allclose(b, steps, rtol=2e-5, err_msg="train_data_parallel(world 1) vs lab.train.train")


def test_without_sync_the_curves_differ(two_procs, data):
    """Per-process BN statistics (plain DDP) change the model's function: the check above can fail."""
    one = _one_process(data, "cnn_bn")
    sync = np.array(_hist(two_procs, 0, "cnn_bn:sync")["batch_loss"])
    nosync = np.array(_hist(two_procs, 0, "cnn_bn:nosync")["batch_loss"])
    ref = np.array(one["batch_loss"])
    gap_sync = np.max(np.abs(sync - ref) / ref)
    gap_nosync = np.max(np.abs(nosync - ref) / ref)
    assert gap_nosync > 1e-3 and gap_nosync > 100 * gap_sync, (gap_sync, gap_nosync)


def test_shard_is_distributed_sampler_split():
    b = torch.arange(10, 21)
    parts = [ddp.shard(b, r, 3) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == b.tolist()
    assert [len(p) for p in parts] == [4, 4, 3]
    assert ddp.shard(torch.arange(2), 2, 3).numel() == 0
    with pytest.raises(ValueError, match=r"shard: expected 0 <= rank < world"):
        ddp.shard(b, 3, 3)


def test_train_data_parallel_rejects_unknown_model(data):
    with pytest.raises(ValueError, match=r"train_data_parallel: unknown model 'resnet'"):
        ddp.train_data_parallel(data, "resnet", TrainConfig(steps=1))


def test_torchrun_command_matches_plain_run(tmp_path):
    """The README command: ``torchrun --standalone --nproc-per-node 2 -m batchnorm.lab.ddp ...``."""
    args = ["--model", "mlp_bn_after", "--steps", "4", "--eval-every", "2", "--batch-size", "24",
            "--max-train", "200", "--timeout", "60"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "batchnorm.lab.ddp", *args, "--out", str(out)]
    proc = subprocess.run(cmd,
                          capture_output=True, text=True, timeout=240, env=env,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "SyncBatchNorm" in proc.stdout
    two = json.loads(out.read_text())
    one = ddp.main([*args, "--out", str(tmp_path / "one.json")])
    assert json.loads((tmp_path / "one.json").read_text())["batch_loss"] == one["batch_loss"]
    assert two["world_size"] == 2 and one["world_size"] == 1
    np.testing.assert_allclose(two["batch_loss"], one["batch_loss"], rtol=2e-5)


def test_torchrun_two_nodes_match_plain_run(tmp_path):
    """Multi-machine: two torchrun launches with ``--nnodes 2 --node-rank 0/1`` (one process each,
    gloo over TCP to the rank-0 node's address), here both on 127.0.0.1, follow the one-process run."""
    from helpers.sync_harness import free_port

    args = ["--model", "mlp_bn_after", "--steps", "4", "--eval-every", "2", "--batch-size", "24",
            "--max-train", "200", "--timeout", "60"]  # as the one-node test above
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    port = free_port()
    out = tmp_path / "nodes.json"
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "batchnorm.lab.ddp", *args, "--out", str(out)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      cwd=Path(__file__).resolve().parents[2]))
    logs = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=240)
            logs.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for node, (rc, o, e) in enumerate(logs):
        assert rc == 0, f"node {node}:\n{o[-2000:]}\n{e[-2000:]}"
    assert "2 process(es)" in logs[0][1] and "SyncBatchNorm" in logs[0][1]
    two = json.loads(out.read_text())
    one = ddp.main(args)
    assert two["world_size"] == 2 and one["world_size"] == 1
    np.testing.assert_allclose(two["batch_loss"], one["batch_loss"], rtol=2e-5)
