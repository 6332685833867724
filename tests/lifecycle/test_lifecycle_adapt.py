"""Test-time adaptation: exact target statistics, Schneider et al.'s blend, the online switch, TENT."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from helpers.lifecycle_models import TinyResNet, randomize_bn
from helpers.util import assert_close
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import batchnorm
import batchnorm.core.modules as M
from batchnorm import reference
from batchnorm.lifecycle.adapt import (
    OnlineAdaptation,
    adapt,
    adapt_step,
    configure_tent,
    entropy,
    tent,
)
from batchnorm.lifecycle.freeze import FrozenBatchNorm, freeze
from batchnorm.lifecycle.recalibrate import recalibrate


def _data(sizes, shape, seed=0, shift=0.0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *shape, generator=g, dtype=torch.float64) * scale + shift for n in sizes]


def _chain(cls=M.BatchNorm2d):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), cls(4), nn.ReLU(), nn.Dropout(0.5),
                          nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5, momentum=0.3), nn.Flatten(),
                          nn.Linear(5 * 4 * 4, 3)).double()
    return randomize_bn(model)


def _state(model):
    """Everything adaptation may touch: tensors, modes, requires_grad, momenta."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [getattr(m, "momentum", None) for m in model.modules()])


def _assert_same_state(model, state):
    tensors, modes, grads, momenta = state
    now = model.state_dict()
    for k, v in tensors.items():
        assert torch.equal(now[k], v), k
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads
    assert [getattr(m, "momentum", None) for m in model.modules()] == momenta


# -- statistics adaptation (offline) -------------------------------------------------------------
@pytest.mark.parametrize("cls", [M.BatchNorm2d, nn.BatchNorm2d])
@pytest.mark.parametrize("prior", [None, 16.0])
def test_data_from_the_training_distribution_changes_nothing_beyond_rounding(cls, prior):
    data = _data([6, 3, 7], (3, 6, 6), seed=2)
    model = _chain(cls)
    recalibrate(model, data, progress=False)  # the source statistics *are* this data's
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = adapt(model, data, prior=prior)
    for k, v in model.state_dict().items():
        if k.endswith(("running_mean", "running_var")):
            assert_close(v, before[k], rtol=1e-12, atol=1e-14, what=k)
    for shift in report.layers.values():
        assert shift.max_mean_shift < 1e-10 and abs(shift.max_var_ratio - 1) < 1e-10
        assert abs(shift.min_var_ratio - 1) < 1e-10


@pytest.mark.parametrize("cls", [M.BatchNorm2d, nn.BatchNorm2d])
@pytest.mark.parametrize("mode", ["exact", "layerwise", "fast"])
def test_shifted_data_get_the_exact_target_moments(cls, mode):
    bn = cls(3, dtype=torch.float64).eval()
    randomize_bn(bn)
    old_m, old_v = bn.running_mean.clone(), bn.running_var.clone()
    data = _data([5, 2, 9], (3, 4, 4), shift=3.0, scale=0.5)  # unequal batches weigh by size
    report = adapt(bn, data, mode=mode)
    x = np.concatenate([b.numpy() for b in data])
    mean, var = reference.moments(x)
    n = x.size // 3
    assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12, what="mean")
    assert_close(bn.running_var, var * n / (n - 1), rtol=1e-12, atol=1e-12, what="unbiased var")
    s = report.layers[""]
    assert report.method == "replace" and s.values == n and s.samples == 16 and s.target_weight == 1.0
    eps = bn.eps
    shift = np.abs(mean - old_m.numpy()) / np.sqrt(old_v.numpy() + eps)
    ratio = (var * n / (n - 1) + eps) / (old_v.numpy() + eps)
    assert_close(s.mean_shift, shift, rtol=1e-10, atol=1e-12, what="shift")
    assert_close(s.var_ratio, ratio, rtol=1e-10, atol=1e-12, what="ratio")
    assert s.max_mean_shift == pytest.approx(shift.max()) and s.min_var_ratio == pytest.approx(ratio.min())
    assert not bn.training


def test_channels_last_biased_convention_and_frozen_layers():
    data = _data([4, 6], (5, 5, 3), shift=-1.0)  # NHWC
    bn = M.BatchNorm2d(3, channel_axis=-1, running_var_unbiased=False, dtype=torch.float64).eval()
    adapt(bn, data)
    mean, var = reference.moments(np.concatenate([b.numpy() for b in data]), channel_axis=-1)
    assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12, what="mean")
    assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12, what="biased var")
    frozen = freeze(nn.Sequential(nn.BatchNorm2d(3).double()))
    assert isinstance(frozen[0], FrozenBatchNorm)
    nchw = [b.permute(0, 3, 1, 2).contiguous() for b in data]
    adapt(frozen, nchw, prior=10)
    x = np.concatenate([b.numpy() for b in nchw])
    m, v = reference.moments(x)
    n = x.size // 3
    w = 10 / (10 + 10)  # 10 samples against a prior of 10
    assert_close(frozen[0].running_mean, w * m, rtol=1e-12, atol=1e-12, what="frozen blend mean")
    assert_close(frozen[0].running_var, (1 - w) + w * v * n / (n - 1), rtol=1e-12, atol=1e-12,
                 what="frozen blend var")


def test_blend_follows_schneider_and_the_dependency_order():
    data = _data([6, 3, 7], (3, 6, 6), seed=3, shift=1.0)
    model = _chain().eval()
    src = [(m.running_mean.clone(), m.running_var.clone()) for m in (model[1], model[5])]
    prior = 8.0
    report = adapt(model, data, prior=prior)
    n = 16.0  # samples; N counts source samples
    w = n / (prior + n)
    x = torch.cat(data)
    with torch.no_grad():
        z1 = model[0](x).numpy()
        m1, v1 = reference.moments(z1)
        k1 = z1.size // 4
        bm1 = (1 - w) * src[0][0].numpy() + w * m1
        bv1 = (1 - w) * src[0][1].numpy() + w * v1 * k1 / (k1 - 1)
        bn1 = model[1]
        y1 = reference.forward_eval(z1, bm1, bv1, bn1.weight.numpy(), bn1.bias.numpy(), eps=bn1.eps)
        z2 = model[4](torch.relu(torch.from_numpy(y1))).numpy()  # layer 2 sees layer 1's *blended* output
    m2, v2 = reference.moments(z2)
    k2 = z2.size // 5
    assert_close(model[1].running_mean, bm1, rtol=1e-12, atol=1e-12, what="bn1 mean")
    assert_close(model[1].running_var, bv1, rtol=1e-12, atol=1e-12, what="bn1 var")
    assert_close(model[5].running_mean, (1 - w) * src[1][0].numpy() + w * m2, rtol=1e-10, atol=1e-12,
                 what="bn2 mean")
    assert_close(model[5].running_var, (1 - w) * src[1][1].numpy() + w * v2 * k2 / (k2 - 1), rtol=1e-10,
                 atol=1e-12, what="bn2 var")
    assert report.method == "blend" and report.prior == prior
    assert [s.target_weight for s in report.layers.values()] == [w, w]
    assert list(report.layers) == ["1", "5"] and report.passes == 2
    assert not model.training and model[5].momentum == 0.3
    report.restore()
    for (m, v), bn in zip(src, (model[1], model[5])):
        assert torch.equal(bn.running_mean, m) and torch.equal(bn.running_var, v)
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert set(d) == {"method", "prior", "mode", "passes", "layers", "skipped"}
    assert d["layers"]["5"]["target_weight"] == w and len(d["layers"]["5"]["mean_shift"]) == 5


@given(c=st.integers(1, 4), sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4),
       length=st.integers(1, 4), prior=st.floats(0.0, 50.0), shift=st.floats(-3, 3),
       mode=st.sampled_from(["exact", "fast"]))  # one layer: both are exact
def test_blend_of_one_layer_matches_the_oracle_for_random_shapes(c, sizes, length, prior, shift, mode):
    if sum(sizes) * length < 2:
        sizes = [2]
    if min(sizes) * length < 2:
        mode = "exact"  # fast mode normalises each batch with its own statistics: 2 values per channel
    bn = nn.BatchNorm1d(c, dtype=torch.float64).eval()
    randomize_bn(bn)
    src = bn.running_mean.clone().numpy(), bn.running_var.clone().numpy()
    data = _data(sizes, (c, length), shift=shift)
    adapt(bn, data, prior=prior, mode=mode)
    x = np.concatenate([b.numpy() for b in data])
    m, v = reference.moments(x)
    k = x.size // c
    w = sum(sizes) / (prior + sum(sizes))
    assert_close(bn.running_mean, (1 - w) * src[0] + w * m, rtol=1e-11, atol=1e-12, what="mean")
    assert_close(bn.running_var, (1 - w) * src[1] + w * v * k / (k - 1), rtol=1e-11, atol=1e-12, what="var")


def test_resnet_blend_and_layer_subset():
    model = randomize_bn(TinyResNet()).double().eval()
    data = _data([4, 4], (3, 8, 8), shift=0.5)
    untouched = model.layer1[1].bn2.running_mean.clone()
    report = adapt(model, data, prior=4, layers=["bn1", "layer1.0.bn1", "bn_fc"])
    assert list(report.layers) == ["bn1", "layer1.0.bn1", "bn_fc"]
    assert torch.equal(model.layer1[1].bn2.running_mean, untouched)
    assert report.layers["bn_fc"].samples == 8 and report.layers["bn1"].values == 8 * 64


def test_errors_leave_the_model_unchanged():
    model = _chain().train()
    data = _data([4, 4], (3, 6, 6))
    state = _state(model)
    one = [torch.randn(1, 3, 3, 3, dtype=torch.float64)]

    def head(m, b):
        return m[:6](b)

    bad = [
        (TypeError, dict(model="nope", batches=data)),
        (ValueError, dict(prior=-1.0)), (ValueError, dict(prior=float("inf"))),
        (ValueError, dict(prior=True)), (ValueError, dict(prior="16")), (ValueError, dict(mode="slow")),
        (ValueError, dict(layers=["nope"])),
        (TypeError, dict(layers="1")), (TypeError, dict(batches=torch.randn(4, 3, 6, 6))),
        (TypeError, dict(batches=iter(data), prior=4)), (TypeError, dict(batches=iter(data))),
        (ValueError, dict(batches=[])), (ValueError, dict(batches=[], prior=4)),
        (TypeError, dict(prior=4, forward=3)), (ValueError, dict(num_batches=0)),
        (ValueError, dict(batches=one, forward=head)),  # 1 value per channel
        (ValueError, dict(batches=one, forward=head, prior=4)),
    ]
    for exc, kw in bad:
        args = {"model": model, "batches": data, **kw}
        with pytest.raises(exc, match="batchnorm"):
            adapt(args.pop("model"), args.pop("batches"), **args)
        _assert_same_state(model, state)
    with pytest.raises(ValueError, match="no BN layer"):
        adapt(nn.Linear(2, 2), [torch.randn(3, 2)])


def test_exception_during_blend_restores_earlier_layers():
    model = _chain().train()
    data = _data([4, 4], (3, 6, 6))
    state = _state(model)
    calls = []

    def forward(m, batch):  # fails once the second layer's pass begins: the first is already blended
        calls.append(1)
        if len(calls) > 6:
            raise RuntimeError("boom")
        return m(batch)

    with pytest.raises(RuntimeError, match="boom"):
        adapt(model, data, prior=4, forward=forward)
    _assert_same_state(model, state)
    assert not model[1]._forward_pre_hooks and not model[5]._forward_pre_hooks


# -- online adaptation ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [M.BatchNorm2d, nn.BatchNorm2d, M.BatchNormAct2d])
def test_online_own_statistics_equal_training_mode_and_leave_buffers_alone(cls):
    model = _chain(cls).eval()
    x = _data([6], (3, 6, 6), shift=2.0)[0]
    with torch.no_grad():
        source = model(x)
    state = _state(model)
    online = OnlineAdaptation(model)
    with online, torch.no_grad():
        assert online.enabled
        y = model(x)
    assert not online.enabled
    _assert_same_state(model, state)
    ref = copy.deepcopy(model)
    for m in (ref[1], ref[5]):
        m.train()
    with torch.no_grad():
        expected = ref(x)
    assert_close(y, expected, rtol=1e-10, atol=1e-12, what="online prior=0 vs train mode")
    with torch.no_grad():
        assert torch.equal(model(x), source)  # switched off: the source statistics again


def test_online_blend_uses_the_biased_batch_variance_and_the_batch_size():
    bn = M.BatchNorm2d(3, dtype=torch.float64).eval()
    randomize_bn(bn)
    x = _data([5], (3, 4, 4), shift=1.0)[0]
    prior = 3.0
    with OnlineAdaptation(bn, prior=prior), torch.no_grad():
        y = bn(x)
    m, v = reference.moments(x.numpy())
    w = 5 / (prior + 5)
    bm = (1 - w) * bn.running_mean.numpy() + w * m
    bv = (1 - w) * bn.running_var.numpy() + w * v
    expected = reference.forward_eval(x.numpy(), bm, bv, bn.weight.detach().numpy(), bn.bias.detach().numpy(),
                                      eps=bn.eps)
    assert_close(y, expected, rtol=1e-10, atol=1e-12, what="online blend")


def test_online_switch_frozen_layers_training_layers_and_errors():
    model = freeze(_chain())
    x = _data([4], (3, 6, 6))[0]
    model.train()  # FrozenBatchNorm uses its buffers in train mode too: adapted
    model[3].eval()  # (dropout off, so that outputs compare)
    state = _state(model)
    online = OnlineAdaptation(model).enable()
    online.enable()  # idempotent
    with torch.no_grad():
        y = model(x)
    online.disable()
    online.disable()
    _assert_same_state(model, state)
    with torch.no_grad():
        assert not torch.equal(y, model(x))
    bn = nn.BatchNorm1d(3, dtype=torch.float64).train()  # training mode: batch statistics already
    before = copy.deepcopy(bn)
    with OnlineAdaptation(bn, prior=100.0), torch.no_grad():
        y = bn(x[:, :3, 0, 0])
    with torch.no_grad():
        assert torch.equal(y, before(x[:, :3, 0, 0]))
    assert torch.equal(bn.running_mean, before.running_mean)
    bn.eval()
    with OnlineAdaptation(bn), pytest.raises(ValueError, match="at least 2"):
        bn(torch.randn(1, 3, dtype=torch.float64))
    assert torch.equal(bn.running_mean, before.running_mean)
    for kw in ({"prior": -1}, {"prior": None}, {"layers": ["x"]}):
        with pytest.raises(ValueError, match="OnlineAdaptation"):
            OnlineAdaptation(bn, **kw)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        OnlineAdaptation(3)


def test_online_restores_the_buffers_when_a_layer_raises():
    class Boom(M.BatchNorm1d):
        def forward(self, x):
            raise RuntimeError("boom")

    bn = randomize_bn(Boom(3, dtype=torch.float64)).eval()
    before = bn.running_mean.clone(), bn.running_var.clone()
    online = OnlineAdaptation(bn, prior=2.0)
    with online, pytest.raises(RuntimeError, match="boom"):
        bn(torch.randn(4, 3, dtype=torch.float64))  # the pre-hook wrote the blend, then the layer raised
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert not bn._forward_pre_hooks and not bn._forward_hooks and not online._pending


# -- TENT ----------------------------------------------------------------------------------------
def _classifier(cls=M.BatchNorm2d):
    return _chain(cls).train()


def test_configure_tent_freezes_everything_but_gamma_beta_and_restores():
    model = _classifier()
    state = _state(model)
    session = configure_tent(model)
    assert set(session.layers) == {"1", "5"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"1.weight", "1.bias", "5.weight", "5.bias"}
    assert [id(p) for p in session.parameters()] == [id(model[1].weight), id(model[1].bias),
                                                      id(model[5].weight), id(model[5].bias)]
    assert model[1].training and model[5].training and not model[3].training and not model.training
    assert model[1].momentum == 0.0 and model[5].momentum == 0.0
    session.restore()
    session.restore()
    _assert_same_state(model, state)


@pytest.mark.parametrize("cls", [M.BatchNorm2d, nn.BatchNorm2d])
def test_adapt_step_updates_only_gamma_beta_and_keeps_running_statistics(cls):
    model = _classifier(cls)
    x = _data([8], (3, 6, 6), shift=1.0)[0]
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    session = configure_tent(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)  # over *all* parameters
    ents = [adapt_step(model, x, opt).entropy for _ in range(5)]
    assert ents[-1] < ents[0]  # entropy minimisation minimises the entropy
    session.restore()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert changed == {"1.weight", "1.bias", "5.weight", "5.bias"}
    step = adapt_step  # predictions come from the batch-statistics forward before the update
    session = configure_tent(model)
    with torch.no_grad():
        expected = model(x)
    out = step(model, x, torch.optim.SGD(session.parameters(), lr=0.1))
    assert torch.equal(out.logits, expected)
    assert out.entropy == pytest.approx(float(entropy(expected).mean()))
    session.restore()


def test_entropy_gradient_through_the_bn_layers_passes_gradcheck():
    model = _classifier()
    x = _data([6], (3, 6, 6))[0]
    configure_tent(model)
    bn1, bn2 = model[1], model[5]

    def f(w, b):  # the same network, functional, with layer 1's γ/β as plain inputs
        y = batchnorm.batch_norm_train(model[0](x), None, None, w, b, eps=bn1.eps)[0]
        h = nn.functional.batch_norm(model[4](torch.relu(y)), None, None, bn2.weight, bn2.bias, training=True)
        return entropy(model[7](torch.flatten(h, 1))).mean()

    w = bn1.weight.detach().clone().requires_grad_(True)
    b = bn1.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (w, b))
    loss = entropy(model(x)).mean()
    assert_close(loss, f(w, b), rtol=1e-12, atol=1e-14, what="module vs functional entropy")
    gw, gb = torch.autograd.grad(loss, (bn1.weight, bn1.bias))
    ew, eb = torch.autograd.grad(f(w, b), (w, b))
    assert_close(gw, ew, rtol=1e-10, atol=1e-12, what="dL/dγ")
    assert_close(gb, eb, rtol=1e-10, atol=1e-12, what="dL/dβ")


def test_tent_loop_keeps_adapted_weights_and_restores_modes():
    model = _classifier()
    data = _data([8, 8, 8], (3, 6, 6), shift=1.0)
    tensors, modes, grads, momenta = _state(model)
    seen = []
    result = tent(model, data, lr=1e-2, epochs=2, on_step=lambda i, s: seen.append((i, s.logits.shape)))
    assert result.steps == 6 and len(result.entropies) == 6 and seen[-1] == (6, torch.Size([8, 3]))
    assert result.layers == ["1", "5"] and result.weight_change["1"]["max_abs_dgamma"] > 0
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads
    assert [getattr(m, "momentum", None) for m in model.modules()] == momenta
    now = model.state_dict()
    for k, v in tensors.items():
        assert torch.equal(now[k], v) == (k not in {"1.weight", "1.bias", "5.weight", "5.bias"}), k
    json.dumps(result.to_dict(), allow_nan=False)
    made = []
    tent(model, data[:1], optimizer=lambda ps: made.append(len(ps)) or torch.optim.SGD(ps, lr=0.1))
    assert made == [4]


def test_tent_on_an_exception_leaves_the_model_as_it_was():
    model = _classifier()
    data = _data([8, 8, 8], (3, 6, 6))
    state = _state(model)
    calls = []

    def forward(m, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return m(batch)

    with pytest.raises(RuntimeError, match="boom"):
        tent(model, data, lr=0.1, forward=forward)
    _assert_same_state(model, state)
    with pytest.raises(ValueError, match="boom"), configure_tent(model):
        raise ValueError("boom")
    _assert_same_state(model, state)


def test_tent_errors_leave_the_model_unchanged():
    model = _classifier()
    data = _data([4], (3, 6, 6))
    state = _state(model)
    for exc, call in [
        (TypeError, lambda: tent("m", data)),
        (ValueError, lambda: tent(model, data, lr=0)), (ValueError, lambda: tent(model, data, lr=True)),
        (ValueError, lambda: tent(model, data, epochs=0)), (TypeError, lambda: tent(model, data[0])),
        (TypeError, lambda: tent(model, iter(data), epochs=2)), (ValueError, lambda: tent(model, [])),
        (TypeError, lambda: tent(model, data, optimizer=3)),
        (TypeError, lambda: tent(model, data, forward=1)),
        (TypeError, lambda: tent(model, data, optimizer=lambda ps: None)),
        (ValueError, lambda: tent(model, data, layers=["0"])),
        (TypeError, lambda: tent(model, data, layers="1")),
        (TypeError, lambda: tent(model, data, forward=lambda m, b: m(b).sum())),
        (ValueError, lambda: configure_tent(nn.Sequential(nn.BatchNorm1d(3, affine=False)))),
        (ValueError, lambda: configure_tent(freeze(copy.deepcopy(model)))),
        (TypeError, lambda: configure_tent(None)),
    ]:
        with pytest.raises(exc, match="batchnorm"):
            call()
        _assert_same_state(model, state)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.requires_grad_(False)
    with pytest.raises(RuntimeError, match="configure_tent"):  # nothing requires grad: checked first
        adapt_step(model, data[0], opt)
    model.requires_grad_(True)
    _assert_same_state(model, state)
    session = configure_tent(model)
    for exc, kw, match in [(TypeError, {"optimizer": "sgd"}, "Optimizer"),
                           (TypeError, {"forward": lambda m, b: (m(b),)}, "logits"),
                           (TypeError, {"forward": 2}, "forward"), (TypeError, {"model": 2}, r"nn\.Module")]:
        args = {"model": model, "batch": data[0], "optimizer": opt, **kw}
        with pytest.raises(exc, match=match):
            adapt_step(args.pop("model"), args.pop("batch"), args.pop("optimizer"), **args)
    with torch.no_grad(), pytest.raises(RuntimeError, match="no_grad"):
        adapt_step(model, data[0], opt)
    session.restore()
    _assert_same_state(model, state)


def test_public_names():
    for name in ("adapt", "OnlineAdaptation", "configure_tent", "adapt_step", "tent", "TentSession",
                 "AdaptationReport", "LayerShift", "TentResult"):
        assert name in batchnorm.__all__ and getattr(batchnorm, name) is not None
    assert batchnorm.adapt is adapt


def test_fast_mode_blends_after_one_batch_statistics_pass():
    model = _chain().eval()
    data = _data([5, 7], (3, 6, 6), seed=4, shift=-0.5)
    src = [(m.running_mean.clone(), m.running_var.clone()) for m in (model[1], model[5])]
    exact_targets = copy.deepcopy(model)
    recalibrate(exact_targets, data, mode="fast", progress=False)  # the targets the fast mode measures
    report = adapt(model, data, prior=6.0, mode="fast")
    w = 12 / (6 + 12)
    for (m, v), bn, t in zip(src, (model[1], model[5]), (exact_targets[1], exact_targets[5])):
        assert_close(bn.running_mean, (1 - w) * m + w * t.running_mean, rtol=1e-12, atol=1e-12, what="mean")
        assert_close(bn.running_var, (1 - w) * v + w * t.running_var, rtol=1e-12, atol=1e-12, what="var")
    assert report.passes == 1 and report.mode == "fast" and not model.training


def test_online_channels_last_and_a_family_layer():
    from batchnorm.family.renorm import BatchRenorm2d

    bn = M.BatchNorm2d(3, channel_axis=-1, dtype=torch.float64).eval()
    randomize_bn(bn)
    x = _data([4], (5, 5, 3), shift=1.5)[0]  # NHWC
    with OnlineAdaptation(bn), torch.no_grad():
        y = bn(x)
    m, v = reference.moments(x.numpy(), channel_axis=-1)
    expected = reference.forward_eval(x.numpy(), m, v, bn.weight.detach().numpy(), bn.bias.detach().numpy(),
                                      eps=bn.eps, channel_axis=-1)
    assert_close(y, expected, rtol=1e-10, atol=1e-12, what="channels-last online")
    renorm = randomize_bn(BatchRenorm2d(3, dtype=torch.float64)).eval()
    xc = x.permute(0, 3, 1, 2).contiguous()
    report = adapt(renorm, [xc])
    m, v = reference.moments(xc.numpy())
    k = xc.numel() // 3
    assert_close(renorm.running_mean, m, rtol=1e-12, atol=1e-12, what="renorm mean")
    assert_close(renorm.running_var, v * k / (k - 1), rtol=1e-12, atol=1e-12, what="renorm var")
    assert list(report.layers) == [""]
