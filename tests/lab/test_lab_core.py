"""The lab's building blocks: registry, models, training loop, exact BN statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.lab import registry
from batchnorm.lab.models import MODEL_KINDS, Shift, bn_layers, build, cnn, mlp, sigmoid_layers, sigmoid_mlp
from batchnorm.lab.registry import Context, Experiment, experiment, merge_config, verdict
from batchnorm.lab.train import (
    TrainConfig,
    batch_indices,
    evaluate,
    recompute_bn_stats,
    train,
)
from batchnorm.stats import batch_moments

pytestmark = pytest.mark.usefixtures("lab_runtime")  # (fixtures in conftest.py)


# -- registry -----------------------------------------------------------------------------------
MINE = ["convergence", "figure1", "lr_sweep", "saturation", "inference_stats", "batch_size"]


def test_discovery_finds_every_exp_module():
    names = [e.name for e in registry.registered()]
    assert set(MINE) <= set(names)
    assert [n for n in names if n in MINE] == MINE  # report order
    for e in registry.registered():
        assert e.help and "\n" not in e.help and e.report is not None
        assert set(e.quick) <= set(e.defaults)
    assert set(MINE) <= {e.name for e in registry.demo_selection()}
    with pytest.raises(KeyError, match="no experiment named 'nope'; known: convergence"):
        registry.get("nope")


def test_merge_config_coerces_to_default_types():
    d = {"steps": 10, "lr": 0.1, "flag": True, "lrs": [0.1, 1.0], "kinds": ["a"], "m": None}
    cfg = merge_config(d, {"steps": 2}, True, {"lr": "0.5", "flag": "no", "lrs": "1,2.5", "kinds": "x,y",
                                               "m": "none"})
    assert cfg == {"steps": 2, "lr": 0.5, "flag": False, "lrs": [1.0, 2.5], "kinds": ["x", "y"], "m": None}
    assert merge_config(d, {"steps": 2}, False, {}) == d
    with pytest.raises(ValueError, match="unknown option 'stepz'; known options: flag, kinds, lr"):
        merge_config(d, None, False, {"stepz": "1"}, "exp")
    with pytest.raises(ValueError, match=r"option steps: cannot read 'ten' as int \(default 10\)"):
        merge_config(d, None, False, {"steps": "ten"})


def test_decorator_contract_and_errors():
    with pytest.raises(ValueError, match="name must be letters"):
        experiment("bad name!", help="x")
    with pytest.raises(ValueError, match=r"quick overrides \['b'\] have no default"):
        experiment("x_quick_err", help="x", defaults={"a": 1}, quick={"b": 2})

    before = dict(registry._REGISTRY)
    try:
        @experiment("_tmp_test_exp", help="tmp", demo=False, defaults={"n": 3}, quick={"n": 1})
        def tmp(ctx: Context) -> dict:
            return {"n": ctx.config["n"], "seeds": ctx.seeds}

        assert isinstance(tmp, Experiment) and registry.get("_tmp_test_exp") is tmp
        assert tmp(Context(data=None, seeds=[5], quick=True, options={})) == {"n": 1, "seeds": [5]}
        assert tmp(Context(data=None, quick=True, options={"n": "7"}))["n"] == 7
        assert "_tmp_test_exp" not in [e.name for e in registry.demo_selection()]
        fake = type(tmp.run)(tmp.run.__code__, {"__name__": "elsewhere"}, "tmp")
        fake.__module__ = "elsewhere"
        with pytest.raises(ValueError, match="registered twice"):
            experiment("_tmp_test_exp", help="again")(fake)
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(before)


def test_verdict():
    assert verdict(True) == "agrees"
    assert verdict(False, partly=True) == "partly"
    assert verdict(False) == "does not agree"


# -- models -------------------------------------------------------------------------------------
def test_mlp_variants_follow_article_001():
    none, after, before = (mlp(64, 10, v) for v in ("none", "after", "before"))
    assert bn_layers(none) == []
    assert [m.num_features for m in bn_layers(after)] == [64, 300, 100]
    assert [m.num_features for m in bn_layers(before)] == [64, 300, 100]
    assert all(isinstance(m, batchnorm.BatchNorm1d) for m in bn_layers(before))
    lin_b = [m for m in before if isinstance(m, nn.Linear)]
    assert [m.bias is None for m in lin_b] == [True, True, False]  # bias off before BN, on in the classifier
    kinds_b = [type(m).__name__ for m in before]
    assert kinds_b[1:6] == ["BatchNorm1d", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    kinds_a = [type(m).__name__ for m in after]
    assert kinds_a[1:6] == ["BatchNorm1d", "Linear", "ReLU", "BatchNorm1d", "Linear"]
    with pytest.raises(ValueError, match="bn to be 'none', 'after' or 'before'"):
        mlp(64, 10, "middle")


def test_cnn_and_sigmoid_shapes():
    net = cnn((1, 28, 28), 10, bn=True)
    assert net(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    assert [type(m).__name__ for m in net[:4]] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    assert net[0].bias is None and cnn((1, 8, 8), bn=False)[0].bias is not None
    with pytest.raises(ValueError, match="need images of at least 8 pixels"):
        cnn((1, 4, 4), channels=(4, 4, 4))
    s = sigmoid_mlp(64, 10, bn=True, shift=-6.0)
    assert len(sigmoid_layers(s)) == 3 and len(bn_layers(s)) == 3
    assert [type(m).__name__ for m in s[1:5]] == ["Linear", "Shift", "BatchNorm1d", "Sigmoid"]
    x = torch.randn(32, 64)
    assert float(Shift(-6.0)(x).mean() - x.mean()) == pytest.approx(-6.0)
    for kind in MODEL_KINDS:
        assert build(kind, (1, 8, 8), 10, seed=0)(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    a, b = build("mlp", (1, 8, 8), seed=3), build("mlp", (1, 8, 8), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="unknown model kind"):
        build("resnet", (1, 8, 8))


def test_norm_factory_swaps_the_normalisation():
    net = mlp(64, 10, "before", norm=lambda c: nn.LayerNorm(c))
    assert bn_layers(net) == [] and sum(isinstance(m, nn.LayerNorm) for m in net) == 3


# -- training loop -------------------------------------------------------------------------------
def test_batch_indices_are_epoch_permutations():
    batches = list(batch_indices(10, 3, 7, seed=0))
    assert len(batches) == 7 and all(len(b) == 3 for b in batches)
    for e in range(2):  # 3 batches per epoch, the 10th sample dropped
        ep = torch.cat(batches[3 * e:3 * e + 3])
        assert len(set(ep.tolist())) == 9
    assert [b.tolist() for b in batch_indices(10, 3, 7, seed=0)] == [b.tolist() for b in batches]
    with pytest.raises(ValueError, match="batch_size <= 10"):
        next(batch_indices(10, 11, 1, 0))


def test_train_is_deterministic_and_records(digits):
    cfg = TrainConfig(steps=30, lr=0.1, eval_every=10, seed=1, eval_train=True)
    h1 = train(build("mlp_bn_before", digits.image_shape, seed=1), digits, cfg)
    h2 = train(build("mlp_bn_before", digits.image_shape, seed=1), digits, cfg)
    assert h1["steps"] == [0, 10, 20, 30] and h1["train_loss"][0] is None
    assert h1["test_acc"] == h2["test_acc"] and h1["train_loss"] == h2["train_loss"]
    assert len(h1["train_acc"]) == 4 and not h1["diverged"]
    assert h1["test_acc"][-1] > h1["test_acc"][0] + 0.3


def test_divergence_is_detected(digits):
    seen = []
    h = train(build("mlp", digits.image_shape, seed=0), digits, TrainConfig(steps=50, lr=1e4, seed=0),
              advance=seen.append)
    assert h["diverged"] and h["diverged_at"] is not None and h["diverged_at"] < 50
    assert sum(seen) == 50  # progress still completes


def test_evaluate_with_batch_stats_leaves_buffers(digits):
    net = build("mlp_bn_before", digits.image_shape, seed=0)
    train(net, digits, TrainConfig(steps=20, seed=0))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.eval()
    # 450 rows in chunks of 449: the last chunk of 1 joins the one before (BN needs > 1 value)
    loss, acc = evaluate(net, digits.x_test, digits.y_test, batch_stats=True, chunk=449)
    assert 0 <= acc <= 1 and loss > 0 and not net.training
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_recompute_bn_stats_is_exact_layer_by_layer(digits):
    net = build("mlp_bn_before", digits.image_shape, seed=0)
    train(net, digits, TrainConfig(steps=20, seed=0))
    stats = recompute_bn_stats(net, digits.x_train, chunk=100)
    layers = bn_layers(net)
    assert len(stats) == len(layers) == 3
    # reference: the input of each BN layer over the whole training set, in eval mode with the new stats
    net.eval()
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().double())) for m in layers]
    with torch.no_grad():
        net(digits.x_train)
    for h in hooks:
        h.remove()
    for s, x, layer in zip(stats, inputs, layers):
        mean, var, n = batch_moments(x)
        torch.testing.assert_close(s["mean"], mean, rtol=0, atol=2e-6)
        torch.testing.assert_close(s["var"], var * n / (n - 1), rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(layer.running_mean.double(), mean, rtol=0, atol=2e-6)


def test_a_broken_experiment_module_is_skipped_and_reported(monkeypatch):
    import importlib
    import pkgutil

    real_iter, real_import = pkgutil.iter_modules, importlib.import_module

    def fake_iter(path):
        yield from real_iter(path)
        yield pkgutil.ModuleInfo(None, "exp_zz_broken", False)

    def fake_import(name, *a, **k):
        if name.endswith("exp_zz_broken"):
            raise SyntaxError("invalid syntax (exp_zz_broken.py, line 3)")
        return real_import(name, *a, **k)

    monkeypatch.setattr(pkgutil, "iter_modules", fake_iter)
    monkeypatch.setattr(importlib, "import_module", fake_import)
    monkeypatch.setattr(registry, "_DISCOVERED", False)
    monkeypatch.setattr(registry, "_ERRORS", {})
    errors = registry.discovery_errors()
    assert errors == {"exp_zz_broken": "SyntaxError: invalid syntax (exp_zz_broken.py, line 3)"}
    assert set(MINE) <= {e.name for e in registry.registered()}
