"""Property (issue 16): for randomly generated bad inputs to modules, functional ops and tools, the call
raises one of our error types — from our own code, with our message — and every parameter, buffer and
``.grad`` the caller holds is bit-identical to before.

Each case draws a random layer size and input shape, builds its state, gives every parameter a
``.grad``, makes one bad call, and compares everything bit for bit (NaN-aware).
"""

from __future__ import annotations

import os
import tempfile
import traceback

import pytest
import torch
from helpers.core_util import tensors_bit_equal
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import batchnorm
from batchnorm.core.functional import batch_norm_eval, batch_norm_train, update_running_stats
from batchnorm.family.inplace import inplace_abn_train
from batchnorm.lifecycle.checkpoint import load_checkpoint, save_checkpoint
from batchnorm.lifecycle.conventions import load_convention
from batchnorm.lifecycle.fold import fold_bn
from batchnorm.lifecycle.freeze import freeze

# (the tools by their module paths: ``batchnorm.recalibrate``/``batchnorm.freeze`` are also the names of
# the 0.1 module aliases, and become those modules once an old-path import ran in the same process)
from batchnorm.lifecycle.recalibrate import recalibrate

OUR_ERRORS = (ValueError, TypeError, FloatingPointError)
_PKG = os.path.dirname(batchnorm.__file__)


def _layers(c: int) -> dict[str, nn.Module]:
    return {
        "BatchNorm2d": batchnorm.BatchNorm2d(c, nonfinite="raise"),
        "BatchNormAct2d": batchnorm.BatchNormAct2d(c, activation="leaky_relu"),
        "InPlaceABN2d": batchnorm.InPlaceABN2d(c, nonfinite="raise"),
        "BatchRenorm2d": batchnorm.BatchRenorm2d(c),
        "GhostBatchNorm2d": batchnorm.GhostBatchNorm2d(c, virtual_batch_size=2),
        "FrozenBatchNorm": batchnorm.FrozenBatchNorm(c),
    }


def _bad_module_input(kind: str, n: int, c: int, hw: int) -> object:
    return {
        "channels": torch.randn(n, c + 1, hw, hw),
        "rank": torch.randn(n * c),
        "int dtype": torch.ones(n, c, hw, hw, dtype=torch.int64),
        # every layer accepts an empty batch (an empty output, state unchanged); with the wrong channel
        # count it is still rejected, by the empty-batch path's own shape checks
        "empty, wrong channels": torch.randn(0, c + 1, hw, hw),
        "not a tensor": [[1.0] * c] * n,
        "nan batch": torch.full((n, c, hw, hw), float("nan")),
        "one value per channel": torch.randn(1, c, 1, 1),
    }[kind]


def _state(*objs) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, o in enumerate(objs):
        if isinstance(o, nn.Module):
            for k, v in o.state_dict(keep_vars=True).items():
                if isinstance(v, torch.Tensor):
                    out[f"{i}.{k}"] = v.detach().clone()
            for k, p in o.named_parameters():
                if p.grad is not None:
                    out[f"{i}.{k}.grad"] = p.grad.clone()
        elif isinstance(o, torch.Tensor):
            out[str(i)] = o.detach().clone()
    return out


def _give_grads(m: nn.Module, g: torch.Generator) -> None:
    for p in m.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def _check(call, *held) -> None:
    before = _state(*held)
    with pytest.raises(OUR_ERRORS) as info:
        call()
    frames = traceback.extract_tb(info.value.__traceback__)
    assert frames and frames[-1].filename.startswith(_PKG), (
        f"raised outside batchnorm ({frames[-1].filename}): {info.value!r}")
    after = _state(*held)
    assert before.keys() == after.keys()
    for k in before:
        assert tensors_bit_equal(before[k], after[k]), f"{k} changed by a rejected call ({info.value})"


# -- the cases: each draws its own sizes ------------------------------------------------------------
def _module_case(data, g):
    c, n, hw = data.draw(st.integers(2, 5)), data.draw(st.integers(2, 4)), data.draw(st.integers(1, 3))
    name = data.draw(st.sampled_from(sorted(_layers(c))))
    kind = data.draw(st.sampled_from(["channels", "rank", "int dtype", "empty, wrong channels",
                                      "not a tensor", "nan batch",
                                      "one value per channel"]))
    m = _layers(c)[name]
    training = data.draw(st.booleans()) and name != "FrozenBatchNorm"
    m.train(training)
    if kind in ("nan batch", "one value per channel") and not (training and name in (
            "BatchNorm2d", "InPlaceABN2d")):
        kind = "channels"  # only these policies/paths reject those inputs
    _give_grads(m, g)
    x = _bad_module_input(kind, n, c, hw)
    _check(lambda: m(x), m, x)


def _functional_case(data, g):
    c, n = data.draw(st.integers(2, 6)), data.draw(st.integers(2, 5))
    x = torch.randn(n, c, generator=g)
    rm, rv, nbt = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5, torch.tensor(3)
    w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
    bad = data.draw(st.sampled_from(["momentum", "eps", "nbt int", "alias", "weight length", "activation",
                                     "channel_axis float", "update length", "update n", "eval no var",
                                     "eps_gamma", "nonfinite"]))
    inplace = data.draw(st.booleans())
    kw: dict = {"num_batches_tracked": nbt, "inplace_stats": inplace}
    call = None
    if bad == "momentum":
        kw["momentum"] = data.draw(st.sampled_from([-0.5, 1.5, float("nan"), "0.1"]))
    elif bad == "eps":
        kw["eps"] = data.draw(st.sampled_from([-1e-5, float("nan"), None]))
    elif bad == "nbt int":
        kw["num_batches_tracked"] = 3
    elif bad == "alias":
        call = lambda: batch_norm_train(x, rm, rm, w, b, **kw)  # noqa: E731
    elif bad == "weight length":
        call = lambda: batch_norm_train(x, rm, rv, torch.ones(c + 1), b, **kw)  # noqa: E731
    elif bad == "activation":
        kw["activation"] = "mish"  # (gelu is a fused activation now)
    elif bad == "channel_axis float":
        kw["channel_axis"] = 1.0
    elif bad == "nonfinite":
        kw["nonfinite"] = "ignore"
    elif bad == "update length":
        call = lambda: update_running_stats(rm, rv, torch.zeros(c + 1), torch.ones(c + 1), n,  # noqa: E731
                                            num_batches_tracked=nbt, inplace=inplace)
    elif bad == "update n":
        call = lambda: update_running_stats(rm, rv, torch.zeros(c), torch.ones(c), 0,  # noqa: E731
                                            num_batches_tracked=nbt, inplace=inplace)
    elif bad == "eval no var":
        call = lambda: batch_norm_eval(x, rm, None, w, b)  # noqa: E731
    elif bad == "eps_gamma":
        kw.pop("inplace_stats")
        call = lambda: inplace_abn_train(x.clone(), rm, rv, w, b, eps_gamma=0.0, inplace=False, **kw)  # noqa: E731
    if call is None:
        call = lambda: batch_norm_train(x, rm, rv, w, b, **kw)  # noqa: E731
    _check(call, x, rm, rv, nbt, w, b)


def _tool_case(data, g):
    c = data.draw(st.integers(2, 4))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    model = nn.Sequential(nn.Conv2d(3, c, 1), batchnorm.BatchNorm2d(c), nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
    model.eval()
    _give_grads(model, g)
    tool = data.draw(st.sampled_from(["fold training", "fold inputs tensor", "recalibrate nan batch",
                                      "recalibrate empty", "freeze bad layer", "freeze train_affine",
                                      "load mismatched", "save bad metadata", "convention bad shape"]))
    x = torch.randn(2, 3, 3, 3, generator=g)
    if tool == "fold training":
        model[1].train()
        call = lambda: fold_bn(model, inplace=True)  # noqa: E731
    elif tool == "fold inputs tensor":
        call = lambda: fold_bn(model, inplace=True, example_inputs=x)  # noqa: E731
    elif tool == "recalibrate nan batch":  # non-finite statistics are never written (a layer's policy)
        call = lambda: recalibrate(model, [x, torch.full_like(x, float("nan"))],  # noqa: E731
                                             mode=data.draw(st.sampled_from(["exact", "layerwise", "fast"])),
                                             progress=False)
    elif tool == "recalibrate empty":
        call = lambda: recalibrate(model, [], progress=False)  # noqa: E731
    elif tool == "freeze bad layer":
        call = lambda: freeze(model, layers=["1", "nope"])  # noqa: E731
    elif tool == "freeze train_affine":
        call = lambda: freeze(model, train_affine="yes")  # noqa: E731
    elif tool == "load mismatched":
        other = nn.Sequential(nn.Conv2d(3, c + 1, 1), nn.BatchNorm2d(c + 1))
        fd, path = tempfile.mkstemp(suffix=".safetensors")
        os.close(fd)
        save_checkpoint(other, path)

        def call():
            try:
                load_checkpoint(model, path)
            finally:
                os.unlink(path)
    elif tool == "save bad metadata":
        call = lambda: save_checkpoint(model, os.devnull + ".x", metadata={"epoch": 3})  # noqa: E731
    else:
        call = lambda: load_convention(model[1], {"gamma": [1.0] * (c + 1), "beta": [0.0] * c,  # noqa: E731
                                                           "moving_mean": [0.0] * c,
                                                           "moving_variance": [1.0] * c}, "keras")
    modes = [m.training for m in model.modules()]
    _check(call, model, x)
    assert [m.training for m in model.modules()] == modes, "a rejected tool call changed train/eval modes"
    assert [type(m) for m in model] == [nn.Conv2d, batchnorm.BatchNorm2d, nn.Conv2d, nn.BatchNorm2d]


@given(data=st.data(), which=st.sampled_from(["module", "functional", "tool"]),
       seed=st.integers(0, 2**31 - 1))
def test_bad_inputs_raise_our_errors_and_change_nothing(data, which, seed):
    g = torch.Generator().manual_seed(seed)
    {"module": _module_case, "functional": _functional_case, "tool": _tool_case}[which](data, g)
