"""Diagnostics: train/eval gap of the running statistics, activation percentiles and saturation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.util import assert_close
from torch import nn

from batchnorm import BatchNorm1d, BatchNorm2d, BatchNormAct2d, reference
from batchnorm.lifecycle.diagnostics import BNDiagnostics, Watch, diagnose


def _batches(sizes, c=3, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, c, 4, 4, generator=g, dtype=torch.float64) * scale + shift for n in sizes]


def _set_running_to(bn, data, unbiased=True):
    x = np.concatenate([b.numpy() for b in data])
    mean, var = reference.moments(x)
    n = x.size // x.shape[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.from_numpy(mean))
        bn.running_var.copy_(torch.from_numpy(var * n / (n - 1) if unbiased else var))
    return mean, var, n


@pytest.mark.parametrize("cls", [BatchNorm2d, nn.BatchNorm2d])
def test_running_stats_equal_to_data_are_not_flagged_and_merge_is_exact(cls):
    data = _batches([5, 2, 9])  # unequal sizes: the merge must weigh by count
    bn = cls(3, dtype=torch.float64).eval()
    mean, var, n = _set_running_to(bn, data)
    rep = diagnose(bn, data)
    layer = rep.layer("")
    assert rep.flagged == [] and not layer.flagged and layer.reasons == []
    assert layer.calls == 3 and layer.count == n
    assert_close(np.array(layer.data_mean), mean, rtol=1e-12, atol=1e-12, what="merged mean")
    assert_close(np.array(layer.data_var), var * n / (n - 1), rtol=1e-12, atol=1e-12, what="merged var")
    assert_close(np.array(layer.mean_shift), np.zeros(3), atol=1e-12, what="shift")
    assert_close(np.array(layer.var_ratio), np.ones(3), rtol=1e-12, what="ratio")


def test_biased_convention_layer_compares_biased_variance():
    data = _batches([4, 6])
    bn = BatchNorm2d(3, dtype=torch.float64, running_var_unbiased=False).eval()
    _, var, _ = _set_running_to(bn, data, unbiased=False)
    layer = diagnose(bn, data).layer("")
    assert layer.running_var_unbiased is False
    assert_close(np.array(layer.data_var), var, rtol=1e-12, what="biased data var")
    assert not layer.flagged


def test_mean_shift_and_variance_ratio_are_measured_and_flagged():
    data = _batches([8, 8])
    bn = BatchNorm2d(3, dtype=torch.float64, eps=1e-3).eval()
    mean, var, n = _set_running_to(bn, data)
    with torch.no_grad():
        bn.running_mean[1] -= 0.8 * torch.sqrt(bn.running_var[1] + 1e-3)  # data now sits 0.8 std above
        bn.running_var[2] = (bn.running_var[2] + 1e-3) / 3 - 1e-3           # data spread 3x the running one
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    layer = diagnose(bn, data).layer("")
    assert_close(np.array(layer.mean_shift)[[0, 2]], np.zeros(2), atol=1e-12, what="untouched channels")
    assert_close([layer.mean_shift[1]], [0.8], rtol=1e-12, what="shift of channel 1")
    assert_close([layer.var_ratio[2]], [3.0], rtol=1e-12, what="ratio of channel 2")
    assert layer.flagged
    assert any("channel 1" in r and "mean shift" in r for r in layer.reasons)
    assert any("channel 2" in r and "variance ratio" in r for r in layer.reasons)
    # diagnostics never change the layer
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    # thresholds are configurable: wide enough, nothing is flagged
    assert not diagnose(bn, data, shift_threshold=1.0, var_ratio_threshold=4.0).layer("").flagged
    # and a variance that is too small is flagged from below
    with torch.no_grad():
        bn.running_mean.copy_(torch.from_numpy(mean))
        bn.running_var.copy_(torch.from_numpy(var * n / (n - 1) * 5))
    low = diagnose(bn, data).layer("")
    assert low.flagged and all("< 0.5" in r for r in low.reasons)


def test_train_mode_history_compares_each_batch_with_pre_update_running_stats():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    data = [torch.randn(6, 3, 6, 6) for _ in range(3)]
    with BNDiagnostics(model) as diag:
        for step, x in enumerate(data):
            diag.step = step
            model(x)
    rep = diag.report()
    assert [r.name for r in rep.bn] == ["1", "4"]
    hist = rep.layer("1").history
    assert [h.step for h in hist] == [0, 1, 2] and all(h.training for h in hist)
    # first batch is compared with the initial running stats (mean 0, var 1)
    with torch.no_grad():
        z = model[0](data[0]).double()
    m = z.mean(dim=(0, 2, 3))
    shift0 = (m.abs() / torch.sqrt(torch.tensor(1.0 + 1e-5, dtype=torch.float64))).max()
    assert_close([hist[0].max_mean_shift], [float(shift0)], rtol=1e-5, what="first-batch shift")
    assert hist[0].count == 6 * 4 * 4


def test_watch_percentiles_and_saturation_match_numpy():
    model = nn.Sequential(nn.Linear(5, 7), nn.Sigmoid(), nn.Linear(7, 6), nn.Tanh(),
                          nn.Linear(6, 4), nn.ReLU())
    with torch.no_grad():
        model[0].weight.mul_(4)
    x = torch.randn(50, 5)
    watch = {"1": "sigmoid", "3": Watch("tanh", threshold=0.5), "5": Watch("relu", where="output")}
    with BNDiagnostics(model, watch=watch, percentiles=(15, 50, 85, 99.5)) as diag:
        model(x)
    rep = diag.report()
    with torch.no_grad():
        z1 = model[0](x)
        z3 = model[2](model[1](z1))
        y5 = model[5](model[4](model[3](z3)))
    for name, z, thr, kind in (("1", z1, 4.0, "sigmoid"), ("3", z3, 0.5, "tanh")):
        w = rep.watch(name)
        assert w.where == "input" and w.saturation_kind == kind and w.threshold == thr
        (rec,) = w.records
        zn = z.double().numpy().ravel()
        for p in (15, 50, 85):
            assert_close([rec.percentiles[f"p{p}"]], [np.percentile(zn, p)], rtol=1e-12, atol=1e-12,
                         what=name)
        assert_close([rec.percentiles["p99.5"]], [np.percentile(zn, 99.5)], rtol=1e-12, atol=1e-12)
        assert rec.saturation == pytest.approx(np.mean(np.abs(zn) > thr), abs=0)
        assert rec.numel == zn.size
    rec5 = rep.watch("5").records[0]
    assert rep.watch("5").where == "output"
    assert rec5.saturation == pytest.approx(float((y5 == 0).double().mean()), abs=0)
    assert 0 < rec5.saturation < 1


def test_watch_auto_uses_output_of_non_activation_modules_and_fused_bn_act():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), BatchNormAct2d(4))
    x = torch.randn(4, 2, 6, 6)
    with BNDiagnostics(model, watch={"0": None, "1": "relu"}) as diag:
        model.eval()
        y = model(x)
    rep = diag.report()
    assert rep.watch("0").where == "output" and rep.watch("0").records[0].saturation is None
    assert rep.watch("1").records[0].saturation == pytest.approx(float((y == 0).double().mean()), abs=0)


def test_subsampling_is_deterministic_and_leaves_global_rng_alone():
    model = nn.Sequential(nn.Identity())
    x = torch.randn(20000)
    state = torch.random.get_rng_state()
    recs = []
    for _ in range(2):
        with BNDiagnostics(model, watch=["0"], max_values=5000) as diag:
            model(x)
        recs.append(diag.report().watch("0").records[0])
    assert torch.equal(torch.random.get_rng_state(), state)
    assert recs[0].percentiles == recs[1].percentiles
    exact = np.percentile(x.double().numpy(), [15, 50, 85])
    got = [recs[0].percentiles[k] for k in ("p15", "p50", "p85")]
    assert_close(np.array(got), exact, atol=0.06, what="subsampled percentiles")


def test_hooks_removed_on_exit_and_on_exception_and_outputs_unchanged():
    model = nn.Sequential(nn.Linear(3, 4), BatchNorm1d(4), nn.Sigmoid())
    x = torch.randn(8, 3)
    ref_model = nn.Sequential(nn.Linear(3, 4), BatchNorm1d(4), nn.Sigmoid())
    ref_model.load_state_dict(model.state_dict())
    with BNDiagnostics(model, watch=["2"]):
        assert model[1]._forward_pre_hooks and model[2]._forward_pre_hooks
        y = model(x)
    assert_close(y, ref_model(x), rtol=0, atol=0, what="outputs with hooks")
    assert_close(model[1].running_mean, ref_model[1].running_mean, rtol=0, atol=0, what="buffers")
    assert not model[1]._forward_pre_hooks and not model[2]._forward_pre_hooks
    with pytest.raises(RuntimeError, match="boom"), BNDiagnostics(model, watch=["2"]):
        raise RuntimeError("boom")
    assert not model[1]._forward_pre_hooks and not model[2]._forward_pre_hooks


def test_report_is_json_ready_and_nonfinite_becomes_none():
    bn = BatchNorm1d(2).eval()
    x = torch.tensor([[1.0, float("nan")], [2.0, 1.0], [3.0, 0.0]])
    with BNDiagnostics(bn, watch=[""]) as diag:
        bn(x)
    rep = diag.report()
    assert rep.layer("").flagged and "non-finite" in rep.layer("").reasons[0]
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert d["bn"][0]["data_mean"][1] is None and d["bn"][0]["data_mean"][0] == pytest.approx(2.0)
    assert d["watched"][0]["records"][0]["percentiles"]["p50"] is None


def test_channels_last_and_untracked_layers():
    bn = BatchNorm2d(3, channel_axis=-1, dtype=torch.float64).eval()
    x = torch.randn(4, 5, 5, 3, dtype=torch.float64) + torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    layer = diagnose(bn, [x]).layer("")
    assert_close(np.array(layer.data_mean), reference.moments(x.numpy(), channel_axis=-1)[0], rtol=1e-12)
    untracked = diagnose(nn.BatchNorm1d(2, track_running_stats=False), [torch.randn(6, 2)]).layer("")
    assert untracked.mean_shift is None and not untracked.flagged and untracked.running_mean is None


def test_sync_batchnorm_and_reset_and_batch_tuples():
    model = nn.Sequential(nn.SyncBatchNorm(3)).eval()
    x = torch.randn(5, 3, 2)
    with BNDiagnostics(model) as diag:
        model(x)
        diag.reset()
        model(x)
        model(x)
    assert diag.report().layer("0").calls == 2
    assert diagnose(model, [(x, torch.zeros(5))]).layer("0").count == 10


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"shift_threshold": 0}, ValueError, "shift_threshold"),
        ({"shift_threshold": float("nan")}, ValueError, "shift_threshold"),
        ({"var_ratio_threshold": 0.5}, ValueError, ">= 1"),
        ({"percentiles": (50, 101)}, ValueError, r"\[0, 100\]"),
        ({"max_values": 1}, ValueError, "max_values"),
        ({"watch": "1"}, TypeError, "write watch=\\['1'\\]"),
        ({"watch": ["nope"]}, ValueError, "not in the model"),
        ({"watch": {"1": "softmax"}}, ValueError, "unknown saturation kind"),
        ({"watch": {"1": Watch(where="middle")}}, ValueError, "where="),
        ({"watch": {"1": Watch("tanh", threshold=-1)}}, ValueError, "threshold"),
        ({"watch": {"1": 3}}, TypeError, "Watch"),
        ({"layers": ["0"]}, ValueError, "not BN layers"),
        ({"layers": "1"}, TypeError, "list of names"),
    ],
)
def test_bad_arguments_raise_clear_errors_and_attach_nothing(kwargs, exc, match):
    model = nn.Sequential(nn.Linear(2, 3), BatchNorm1d(3))
    with pytest.raises(exc, match=match):
        BNDiagnostics(model, **kwargs)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_misuse_errors():
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        BNDiagnostics("model")
    model = nn.Sequential(nn.Linear(2, 3), BatchNorm1d(3))
    diag = BNDiagnostics(model)
    with diag, pytest.raises(RuntimeError, match="already attached"):
        diag.attach()
    assert not model[1]._forward_pre_hooks
    rep = diag.report()
    with pytest.raises(KeyError, match="no BN layer named"):
        rep.layer("1")
    with pytest.raises(KeyError, match="no watched module"):
        rep.watch("0")


def test_per_unit_percentiles_and_saturation_match_numpy():
    model = nn.Sequential(nn.Linear(3, 5), nn.Sigmoid(), nn.Conv2d(2, 3, 1), nn.Tanh())
    x = torch.randn(40, 3) * 3
    with BNDiagnostics(model[:2], watch={"1": Watch("sigmoid", threshold=1.0, per_unit=True)}) as diag:
        model[:2](x)
    rec = diag.report().watch("1").records[0]
    with torch.no_grad():
        z = model[0](x).double().numpy()
    for p in (15, 50, 85):
        assert_close(rec.unit_percentiles[f"p{p}"], np.percentile(z, p, axis=0), rtol=1e-12, atol=1e-12)
    assert_close(rec.unit_saturation, (np.abs(z) > 1.0).mean(axis=0), rtol=0, atol=0, what="per unit")
    conv = model[2:]
    xc = torch.randn(4, 6, 6, 2)  # channels-last data, units on the last axis after permute
    watch = {"3": Watch("tanh", per_unit=True, channel_axis=1)}  # slicing keeps the names "2", "3"
    with BNDiagnostics(conv, watch=watch) as diag:
        conv(xc.permute(0, 3, 1, 2))
    rec = diag.report().watch("3").records[0]
    with torch.no_grad():
        zc = conv[0](xc.permute(0, 3, 1, 2)).double()
    want = np.percentile(zc.transpose(0, 1).reshape(3, -1).numpy(), 50, axis=1)
    assert_close(rec.unit_percentiles["p50"], want, rtol=1e-12, atol=1e-12, what="conv units")
    bad = {"1": Watch(per_unit=True, channel_axis=4)}
    with pytest.raises(ValueError, match="per_unit=True"), BNDiagnostics(model[:2], watch=bad):
        model[:2](x)
    with pytest.raises(TypeError, match="channel_axis"):
        BNDiagnostics(model[:2], watch={"1": Watch(per_unit=True, channel_axis=1.0)})
