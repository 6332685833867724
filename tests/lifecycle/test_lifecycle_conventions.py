"""Loading/exporting BN parameters in Keras, Flax and Darknet conventions."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers.util import assert_close
from torch import nn

import batchnorm.core.modules as M
from batchnorm import reference
from batchnorm.lifecycle.conventions import KEY_NAMES, export_convention, load_convention
from batchnorm.lifecycle.freeze import FrozenBatchNorm


def _arrays(c=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"weight": rng.uniform(0.5, 1.5, c), "bias": rng.normal(0, 0.3, c),
            "running_mean": rng.normal(0, 1, c), "running_var": rng.uniform(0.2, 2.0, c)}


def _named(convention, arrays):
    return {KEY_NAMES[convention][k]: v for k, v in arrays.items()}


@pytest.mark.parametrize(("convention", "eps", "unbiased"),
                         [("keras", 1e-3, False), ("flax", 1e-5, False), ("darknet", 1e-6, True),
                          ("torch", 1e-5, True)])
def test_eval_output_matches_the_source_formula_and_conventions_are_adopted(convention, eps, unbiased):
    a = _arrays()
    bn = M.BatchNorm2d(4, dtype=torch.float64).eval()
    load_convention(bn, _named(convention, a), convention)
    assert bn.eps == eps and bn.running_var_unbiased is unbiased
    assert bn.momentum == pytest.approx(0.1 if convention == "torch" else 0.01)
    x = np.random.default_rng(1).normal(size=(3, 4, 5, 5))
    # every framework's inference formula: γ (x − mean) / sqrt(var + ε) + β with the stored numbers
    want = reference.forward_eval(x, a["running_mean"], a["running_var"], a["weight"], a["bias"], eps=eps)
    assert_close(bn(torch.from_numpy(x)), want, rtol=1e-12, atol=1e-12, what=convention)


def test_keras_training_continues_with_the_keras_ema():
    a = _arrays()
    bn = M.BatchNorm1d(4, dtype=torch.float64)
    load_convention(bn, _named("keras", a), "keras", decay=0.9, eps=1e-3)
    assert bn.momentum == pytest.approx(0.1)
    x = torch.randn(6, 4, dtype=torch.float64)
    bn.train()(x)
    mean, var = reference.moments(x.numpy())
    # Keras: moving = decay · moving + (1 − decay) · batch, with the *biased* batch variance
    assert_close(bn.running_mean, 0.9 * a["running_mean"] + 0.1 * mean, rtol=1e-12, atol=1e-12, what="mean")
    assert_close(bn.running_var, 0.9 * a["running_var"] + 0.1 * var, rtol=1e-12, atol=1e-12, what="var")


def test_flax_nested_and_list_orders():
    a = _arrays()
    flax = {"params": {"scale": a["weight"], "bias": a["bias"]},
            "batch_stats": {"mean": a["running_mean"], "var": a["running_var"]}}
    bn = load_convention(M.BatchNorm1d(4, dtype=torch.float64), flax, "flax")
    assert_close(bn.weight, a["weight"], what="flax scale")
    keras_list = [a["weight"], a["bias"], a["running_mean"], a["running_var"]]  # layer.get_weights()
    bn = load_convention(M.BatchNorm1d(4, dtype=torch.float64), keras_list, "keras")
    assert_close(bn.bias, a["bias"], what="keras beta")
    darknet_list = [a["bias"], a["weight"], a["running_mean"], a["running_var"]]  # .weights file order
    bn = load_convention(M.BatchNorm1d(4, dtype=torch.float64), darknet_list, "darknet")
    assert_close(bn.weight, a["weight"], what="darknet scales")
    assert_close(bn.bias, a["bias"], what="darknet biases")


def test_missing_gamma_beta_mean_one_and_zero_and_tensors_accepted():
    a = _arrays()
    bn = M.BatchNorm1d(4)
    with torch.no_grad():
        bn.weight.fill_(3.0)
        bn.bias.fill_(3.0)
    stats = {"moving_mean": torch.tensor(a["running_mean"]), "moving_variance": list(a["running_var"])}
    load_convention(bn, stats, "keras")
    assert torch.equal(bn.weight, torch.ones(4)) and torch.equal(bn.bias, torch.zeros(4))
    assert bn.running_mean.dtype == torch.float32


def test_darknet_eps_outside_sqrt_is_exact():
    a = _arrays()
    a["running_var"][1] = 1e-10  # where ε inside vs outside the root differ by orders of magnitude
    bn = M.BatchNorm2d(4, dtype=torch.float64).eval()
    load_convention(bn, _named("darknet", a), "darknet", eps_outside_sqrt=True)
    assert bn.eps == 0.0
    x = np.random.default_rng(2).normal(size=(2, 4, 3, 3))
    shp = (1, 4, 1, 1)
    want = (a["weight"].reshape(shp) * (x - a["running_mean"].reshape(shp))
            / (np.sqrt(a["running_var"].reshape(shp)) + 1e-6) + a["bias"].reshape(shp))  # pjreddie
    assert_close(bn(torch.from_numpy(x)), want, rtol=1e-9, atol=1e-9, what="darknet exact")


def test_torch_module_and_biased_source_needs_a_decision():
    a = _arrays()
    bn = nn.BatchNorm2d(4, dtype=torch.float64)
    before = copy.deepcopy(bn.state_dict())
    with pytest.raises(ValueError, match="batch_values=n"):
        load_convention(bn, _named("keras", a), "keras")
    assert all(torch.equal(v, before[k]) for k, v in bn.state_dict().items()) and bn.eps == 1e-5
    load_convention(bn, _named("keras", a), "keras", batch_values=32)
    assert_close(bn.running_var, a["running_var"] * 32 / 31, rtol=1e-12, what="n/(n-1)")
    assert bn.eps == 1e-3 and bn.momentum == pytest.approx(0.01)
    raw = nn.BatchNorm2d(4, dtype=torch.float64)
    load_convention(raw, _named("flax", a), "flax", set_conventions=False)
    assert_close(raw.running_var, a["running_var"], rtol=0, atol=0, what="copied as is")
    assert raw.eps == 1e-5 and raw.momentum == 0.1
    # darknet (unbiased) into torch needs nothing; into our biased layer with batch_values: n-1/n
    ours = M.BatchNorm2d(4, running_var_unbiased=False, dtype=torch.float64)
    load_convention(ours, _named("darknet", a), "darknet", batch_values=10)
    assert ours.running_var_unbiased is False
    assert_close(ours.running_var, a["running_var"] * 0.9, rtol=1e-12, what="(n-1)/n")
    frozen = FrozenBatchNorm(4, dtype=torch.float64)
    load_convention(frozen, _named("keras", a), "keras")  # never updates: no decision needed
    assert_close(frozen.running_var, a["running_var"], rtol=0, atol=0, what="frozen")


def test_export_round_trip():
    a = _arrays()
    for convention in ("keras", "flax", "darknet", "torch"):
        bn = load_convention(M.BatchNorm1d(4, dtype=torch.float64), _named(convention, a), convention)
        out = export_convention(bn, convention)
        assert set(out) == set(KEY_NAMES[convention].values())
        for k, v in _named(convention, a).items():
            assert_close(out[k], v, rtol=0, atol=0, what=f"{convention}:{k}")
    torch_bn = load_convention(nn.BatchNorm1d(4, dtype=torch.float64), _named("torch", a), "torch")
    with pytest.raises(ValueError, match="batch_values"):
        export_convention(torch_bn, "keras")
    out = export_convention(torch_bn, "keras", batch_values=5)
    assert_close(out["moving_variance"], a["running_var"] * 4 / 5, rtol=1e-12, what="export biased")
    plain = export_convention(M.BatchNorm1d(4, affine=False, running_var_unbiased=False), "flax")
    assert (plain["scale"] == 1).all() and (plain["bias"] == 0).all()


@pytest.mark.parametrize(
    ("params", "kwargs", "exc", "match"),
    [
        ({"gama": 1}, {}, ValueError, "unknown names"),
        ({"gamma": np.ones(4), "moving_mean": np.zeros(4)}, {}, ValueError, "'moving_variance' is missing"),
        ("gamma", {}, TypeError, "dict of arrays"),
        ([np.ones(4)] * 3, {}, ValueError, "4 entries"),
        ("ok", {"convention": "caffe"}, ValueError, "unknown convention"),
        ("ok", {"eps": -1.0}, ValueError, "eps"),
        ("ok", {"decay": 1.5}, ValueError, "decay"),
        ("ok", {"batch_values": 1}, ValueError, "batch_values"),
        ("shape", {}, ValueError, r"shape \(4,\)"),
        ("nan", {}, ValueError, "NaN"),
        ("negvar", {}, ValueError, "negative"),
        ("text", {}, TypeError, "not an array of numbers"),
        ({"params": {"gamma": np.ones(4)}, "batch_stats": {"gamma": np.ones(4)}}, {}, ValueError, "twice"),
    ],
)
def test_rejections_leave_the_layer_unchanged(params, kwargs, exc, match):
    a = _arrays()
    good = _named("keras", a)
    if params == "ok":
        params = good
    elif params == "shape":
        params = {**good, "gamma": np.ones(5)}
    elif params == "nan":
        params = {**good, "moving_mean": np.array([0, np.nan, 0, 0])}
    elif params == "negvar":
        params = {**good, "moving_variance": -np.ones(4)}
    elif params == "text":
        params = {**good, "beta": ["a", "b", "c", "d"]}
    bn = M.BatchNorm1d(4)
    before = copy.deepcopy(bn.state_dict())
    convention = kwargs.pop("convention", "keras")
    with pytest.raises(exc, match=match):
        load_convention(bn, params, convention, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())
    assert bn.eps == 1e-5 and bn.momentum == 0.1 and bn.running_var_unbiased


def test_layer_errors():
    a = _named("keras", _arrays())
    with pytest.raises(TypeError, match="batch-norm layer"):
        load_convention(nn.Linear(4, 4), a, "keras")
    with pytest.raises(ValueError, match="no running statistics"):
        load_convention(M.BatchNorm1d(4, track_running_stats=False), a, "keras")
    with pytest.raises(ValueError, match="affine=False"):
        load_convention(M.BatchNorm1d(4, affine=False), a, "keras")
    with pytest.raises(ValueError, match="unknown convention"):
        export_convention(M.BatchNorm1d(4), "caffe")


def test_complex_arrays_are_refused_not_silently_made_real():
    """Issue 16: NumPy would drop the imaginary part with only a ComplexWarning."""
    import numpy as np

    from batchnorm.lifecycle.conventions import load_convention

    bn = torch.nn.BatchNorm1d(2)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    params = {"gamma": np.array([1 + 2j, 1]), "beta": np.zeros(2), "moving_mean": np.zeros(2),
              "moving_variance": np.ones(2)}
    with pytest.raises(TypeError, match="'gamma' is complex"):
        load_convention(bn, params, "keras")
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())
