"""recalibrate honours each layer's nonfinite policy and never writes into the user's batches
(issue 16, item 6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.core_util import assert_state_unchanged, snapshot
from helpers.util import assert_close
from torch import nn

import batchnorm
from batchnorm.lifecycle.recalibrate import recalibrate


def _data(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 5, 5, generator=g) * 2 + 1 for _ in range(n)]


def _model(policy: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 3, 1), batchnorm.BatchNorm2d(3, nonfinite=policy))


def test_an_inplace_first_layer_never_alters_the_calibration_data():
    torch.manual_seed(0)
    model = nn.Sequential(batchnorm.InPlaceABN2d(3), nn.Conv2d(3, 3, 1), batchnorm.BatchNorm2d(3))
    data = _data()
    kept = [d.clone() for d in data]
    report = recalibrate(model, data, progress=False)
    assert report.passes == 2
    assert all(torch.equal(a, b) for a, b in zip(data, kept, strict=True)), "recalibrate wrote into the data"
    # the first layer's statistics are exactly those of the untouched data (float64 oracle)
    x = np.concatenate([d.double().numpy() for d in kept])
    assert_close(model[0].running_mean, x.mean((0, 2, 3)), rtol=1e-6, atol=1e-6, what="running_mean")
    assert_close(model[0].running_var, x.var((0, 2, 3), ddof=1), rtol=1e-5, atol=1e-6, what="running_var")


def _with_nan_batch():
    data = _data(3)
    data[1] = torch.full_like(data[1], float("nan"))
    return data


def test_skip_leaves_the_nan_batch_out_and_reports_it():
    model = _model("skip")
    report = recalibrate(model, _with_nan_batch(), progress=False)
    assert report.nonfinite_batches == {"1": 1}
    good = [d for i, d in enumerate(_with_nan_batch()) if i != 1]
    ref = _model("skip")
    recalibrate(ref, good, progress=False)
    assert torch.equal(model[1].running_mean, ref[1].running_mean)
    assert torch.equal(model[1].running_var, ref[1].running_var)
    assert int(model[1].num_batches_tracked) == 2


@pytest.mark.parametrize("policy, err, match", [
    ("raise", FloatingPointError, "holds NaN or Inf .*nonfinite='raise'"),
    ("update", ValueError, "are not finite .*nothing was changed"),
])
def test_raise_and_update_never_write_nan_statistics(policy, err, match):
    model = _model(policy)
    before = snapshot(model)
    with pytest.raises(err, match=match):
        recalibrate(model, _with_nan_batch(), progress=False)
    assert_state_unchanged(before, model, policy)


def test_torch_layers_refuse_nan_statistics_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    before = snapshot(model)
    with pytest.raises(ValueError, match="not finite"):
        recalibrate(model, _with_nan_batch(), mode="fast", progress=False)
    assert_state_unchanged(before, model, "torch BN")
