"""Precise recalibration of BN statistics: exact count-weighted over the data, layer by layer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers.lifecycle_models import TinyResNet, randomize_bn
from helpers.util import assert_close
from torch import nn

import batchnorm.core.modules as M
from batchnorm import reference
from batchnorm.lifecycle.freeze import FrozenBatchNorm, freeze
from batchnorm.lifecycle.recalibrate import recalibrate


def _data(sizes, shape, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *shape, generator=g, dtype=torch.float64) * 2 + shift for n in sizes]


@pytest.mark.parametrize("cls", [M.BatchNorm2d, nn.BatchNorm2d])
@pytest.mark.parametrize("mode", ["exact", "layerwise", "fast"])
def test_single_layer_exact_count_weighted_statistics(cls, mode):
    batches = _data([5, 2, 9], (3, 4, 4), shift=3.0)  # unequal sizes: weighted by size, not per batch
    bn = cls(3, momentum=None, dtype=torch.float64)
    bn.train()
    report = recalibrate(bn, batches, mode=mode, progress=False)
    x = np.concatenate([b.numpy() for b in batches])
    mean, var = reference.moments(x)
    n = x.size // 3
    assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12, what="mean")
    assert_close(bn.running_var, var * n / (n - 1), rtol=1e-12, atol=1e-12, what="unbiased var")
    assert int(bn.num_batches_tracked) == 3 and report.counts[""] == n and report.passes == 1
    assert bn.training and bn.momentum is None  # mode and momentum restored


def test_biased_convention_and_channels_last_and_num_batches():
    batches = _data([4, 6, 8], (5, 5, 3))  # NHWC
    bn = M.BatchNorm2d(3, channel_axis=-1, running_var_unbiased=False, dtype=torch.float64).eval()
    recalibrate(bn, batches, num_batches=2, progress=False)
    x = np.concatenate([b.numpy() for b in batches[:2]])
    mean, var = reference.moments(x, channel_axis=-1)
    assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12, what="mean")
    assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12, what="biased var")
    assert not bn.training


def _chain():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), M.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                          nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5, momentum=0.3)).double()
    return randomize_bn(model)


def test_exact_uses_final_statistics_of_earlier_layers():
    batches = _data([6, 3, 7], (3, 6, 6), seed=2)
    model = _chain().train()  # dropout is switched off while recalibrating, as at inference
    report = recalibrate(model, batches, progress=False)
    assert report.levels == {"1": 1, "5": 2} and report.passes == 2
    x = torch.cat(batches)
    with torch.no_grad():
        z1 = model[0](x).numpy()
        m1, v1 = reference.moments(z1)
        n1 = z1.size // 4
        bn1 = model[1]
        y1 = reference.forward_eval(z1, m1, v1 * n1 / (n1 - 1), bn1.weight.numpy(), bn1.bias.numpy(),
                                    eps=bn1.eps, act="relu")
        z2 = model[4](torch.from_numpy(y1)).numpy()
    m2, v2 = reference.moments(z2)
    n2 = z2.size // 5
    assert_close(model[1].running_mean, m1, rtol=1e-12, atol=1e-12, what="bn1 mean")
    assert_close(model[5].running_mean, m2, rtol=1e-10, atol=1e-12, what="bn2 mean")
    assert_close(model[5].running_var, v2 * n2 / (n2 - 1), rtol=1e-10, atol=1e-12, what="bn2 var")
    assert model.training and model[3].training and model[5].momentum == 0.3


def test_fast_mode_is_the_batch_statistics_approximation():
    batches = _data([6, 3, 7], (3, 6, 6), seed=2)
    model = _chain().eval()
    before = model[1].running_mean.clone()
    report = recalibrate(model, batches, mode="fast", progress=False)
    assert report.passes == 1
    # expected: earlier layer normalised with each batch's own statistics, later inputs pooled exactly
    bn1 = _chain()[1]
    z2s = []
    with torch.no_grad():
        for b in batches:
            z1 = model[0](b).numpy()
            y1, _, _ = reference.forward_train(z1, bn1.weight.numpy(), bn1.bias.numpy(), eps=bn1.eps,
                                               act="relu")
            z2s.append(model[4](torch.from_numpy(y1)).numpy())
    m2, v2 = reference.moments(np.concatenate(z2s))
    n2 = sum(z.size for z in z2s) // 5
    assert_close(model[5].running_mean, m2, rtol=1e-10, atol=1e-12, what="fast bn2 mean")
    assert_close(model[5].running_var, v2 * n2 / (n2 - 1), rtol=1e-10, atol=1e-12, what="fast bn2 var")
    assert not torch.equal(model[1].running_mean, before)
    assert not model.training and not model[1].training and model[1].momentum == 0.1


def test_levels_of_a_branching_network_and_early_stopped_passes():
    model = randomize_bn(TinyResNet())  # float32: float64 convolutions are slow on CPU
    calls = []
    model.head.register_forward_pre_hook(lambda *_: calls.append(1))
    batches = [b.float() for b in _data([4, 4], (3, 8, 8), seed=5)]
    twin = copy.deepcopy(model)
    report = recalibrate(model, batches, progress=False)
    assert report.levels == {"bn1": 1, "layer1.0.bn1": 2, "layer1.0.bn2": 3, "layer1.1.bn1": 4,
                             "layer1.1.bn2": 5, "layer1.1.downsample.1": 4, "bn_fc": 6}
    assert report.passes == 6 and report.batches == 2
    assert len(calls) == 1  # only the probe reached the head: every pass stopped at its last layer
    twin_report = recalibrate(twin, batches, mode="layerwise", progress=False)
    assert twin_report.passes == 7
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert_close(a.reshape(-1), b.reshape(-1), rtol=1e-6, atol=1e-7, what=k)


def test_frozen_sync_and_layer_subset_with_custom_forward():
    model = nn.Sequential(nn.Linear(3, 4), nn.SyncBatchNorm(4), nn.Linear(4, 2), nn.BatchNorm1d(2)).double()
    freeze(model, layers=["3"])
    assert isinstance(model[3], FrozenBatchNorm)
    batches = [(torch.randn(8, 3, dtype=torch.float64), None) for _ in range(3)]
    seen = []

    def fwd(m, batch):
        seen.append(batch[1])
        return m(batch[0])

    report = recalibrate(model, batches, layers=["3"], forward=fwd, progress=False)
    assert set(report.counts) == {"3"} and report.counts["3"] == 24
    assert torch.equal(model[1].running_mean, torch.zeros(4, dtype=torch.float64))  # not in layers
    assert model.training  # restored; the data went through the eval-mode model
    with torch.no_grad():
        z = model.eval()[:3](torch.cat([b[0] for b in batches]))
    assert_close(model[3].running_mean, z.mean(0), rtol=1e-10, atol=1e-12, what="frozen layer mean")
    assert len(seen) == 4  # probe + one pass


def test_progress_bar_runs():
    bn = M.BatchNorm1d(2)
    report = recalibrate(bn, [torch.randn(4, 2), torch.randn(3, 2)], progress=True)
    assert report.counts[""] == 7


def test_skipped_layers_are_reported_and_unchanged():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.BatchNorm1d(2)
            self.b = nn.BatchNorm1d(2)

        def forward(self, x):
            return self.a(x)

    model = Branchy()
    report = recalibrate(model, [torch.randn(4, 2)], progress=False)
    assert report.skipped == ["b"] and torch.equal(model.b.running_var, torch.ones(2))


def test_exception_restores_modes_momenta_statistics_and_hooks():
    model = _chain().train()
    state = copy.deepcopy(model.state_dict())
    batches = _data([4, 4, 4], (3, 6, 6))
    n = {"calls": 0}

    def fwd(m, batch):
        n["calls"] += 1
        if n["calls"] == 4:  # probe, pass 1 (3 batches) fine; fail in pass 2 after bn1 was written
            raise RuntimeError("disk on fire")
        return m(batch)

    with pytest.raises(RuntimeError, match="disk on fire"):
        recalibrate(model, batches, forward=fwd, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert model.training and all(m.training for m in model.modules()) and model[5].momentum == 0.3
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    n["calls"] = 1  # fast mode has no probe: fail in its third batch
    with pytest.raises(RuntimeError, match="disk on fire"):
        recalibrate(model, batches, forward=fwd, mode="fast", progress=False)
    assert model[1].momentum == 0.1 and model[5].momentum == 0.3 and model[1].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_error_paths_leave_model_unchanged():
    model = _chain().eval()
    state = copy.deepcopy(model.state_dict())
    x = _data([4], (3, 6, 6))
    cases = [
        (dict(batches=[]), ValueError, "empty"),
        (dict(batches=iter(x)), TypeError, "one-shot iterator"),
        (dict(batches=x[0]), TypeError, "wrap a single tensor"),
        (dict(batches=x, mode="ema"), ValueError, "mode"),
        (dict(batches=x, num_batches=0), ValueError, "num_batches"),
        (dict(batches=x, forward=3), TypeError, "callable"),
        (dict(batches=x, layers=["0"]), ValueError, "not BN layers"),
        (dict(batches=x, layers="1"), TypeError, "list of names"),
        (dict(batches=[x[0][:1, :, :3, :3]]), ValueError, "at least 2"),  # 1 value per channel at bn1
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            recalibrate(model, progress=False, **kwargs)
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), (kwargs, k)
        assert not model.training
    with pytest.raises(ValueError, match="empty"):
        recalibrate(model, iter([]), mode="fast", progress=False)
    with pytest.raises(ValueError, match="no BN layer"):
        recalibrate(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False)), x,
                    progress=False)
    with pytest.raises(TypeError, match="Module"):
        recalibrate("model", x)
