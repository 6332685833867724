"""Bad input: each rejected call names the op, what was expected, what came, and the fix; and changes nothing.

For modules, parameters and buffers (``num_batches_tracked`` included) are compared bit for bit
before and after the rejected call; for functions, every tensor argument is.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from helpers.core_util import assert_state_unchanged, bits, snapshot

import batchnorm
from batchnorm import kernels
from batchnorm.core import functional as F


def _trained(m: torch.nn.Module) -> torch.nn.Module:
    """A module whose state is not the initial one (so 'unchanged' means something)."""
    shape = {batchnorm.BatchNorm1d: (6, 3), batchnorm.BatchNormAct1d: (6, 3, 2),
             batchnorm.BatchNorm2d: (6, 3, 2, 2), batchnorm.BatchNormAct2d: (6, 3, 2, 2),
             batchnorm.BatchNorm3d: (4, 3, 2, 2, 2), batchnorm.BatchNormAct3d: (4, 3, 2, 2, 2)}[type(m)]
    if getattr(m, "channel_axis", 1) == -1:
        shape = (*shape[:1], *shape[2:], shape[1])
    m(torch.randn(shape) * 2 + 1)
    m(torch.randn(shape) - 1)
    if m.weight is not None:
        with torch.no_grad():
            m.weight.mul_(1.5)
            m.bias.add_(0.25)
    return m


def _rejects(module, x, exc, *parts, train=True):
    """``module(x)`` raises ``exc`` whose message holds every part; the module's state is unchanged."""
    module.train(train)
    before = snapshot(module)
    with pytest.raises(exc) as info:
        module(x)
    msg = str(info.value)
    for p in parts:
        assert p in msg, f"{p!r} not in message: {msg}"
    assert_state_unchanged(before, module, f"after rejected call ({msg[:60]}...)")
    return msg


# -- modules: rank, channels, batch size, dtype, type, empty ---------------------------------------------
RANK_CASES = [
    (batchnorm.BatchNorm1d, (4,), ["expected 2-D (N, C) or 3-D (N, C, L)", "got 1-D", "rank 2 to 5"]),
    (batchnorm.BatchNorm1d, (4, 3, 2, 2), ["got 4-D", "use BatchNorm2d for (N, C, H, W)"]),
    (batchnorm.BatchNorm2d, (4, 3, 5), ["expected 4-D (N, C, H, W)", "got 3-D", "use BatchNorm1d"]),
    (batchnorm.BatchNorm2d, (4, 3), ["got 2-D", "use BatchNorm1d for (N, C)"]),
    (batchnorm.BatchNorm2d, (2, 3, 2, 2, 2), ["got 5-D", "use BatchNorm3d"]),
    (batchnorm.BatchNorm3d, (4, 3, 2, 2), ["expected 5-D (N, C, D, H, W)", "got 4-D", "use BatchNorm2d"]),
    (batchnorm.BatchNorm3d, (2, 3, 2, 2, 2, 2), ["got 6-D", "rank 2 to 5"]),
    (batchnorm.BatchNormAct2d, (4, 3, 5), ["BatchNormAct2d", "got 3-D", "use BatchNorm1d"]),
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls,shape,parts", RANK_CASES,
                         ids=[f"{c.__name__}-{len(s)}d" for c, s, _ in RANK_CASES])
def test_wrong_rank_per_module(cls, shape, parts, train):
    m = _trained(cls(3))
    msg = _rejects(m, torch.randn(shape), ValueError, cls.__name__ + ":", *parts, train=train)
    assert str(tuple(shape)) in msg


@pytest.mark.parametrize("cls,shape", [(batchnorm.BatchNorm1d, (4, 5)), (batchnorm.BatchNorm2d, (4, 2, 3, 3)),
                                       (batchnorm.BatchNorm3d, (2, 4, 2, 2, 2))])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_channel_count_mismatch(cls, shape, train):
    m = _trained(cls(3))
    c = shape[1]
    _rejects(m, torch.randn(shape), ValueError, cls.__name__, "expected 3 channels on axis 1", f"got {c}",
             f"num_features={c}", train=train)


def test_channel_count_mismatch_channels_last_names_the_axis():
    m = _trained(batchnorm.BatchNorm2d(3, channel_axis=-1))
    _rejects(m, torch.randn(2, 4, 4, 5), ValueError, "expected 3 channels on axis 3", "got 5",
             "set channel_axis")


@pytest.mark.parametrize("cls,shape", [(batchnorm.BatchNorm1d, (1, 3)), (batchnorm.BatchNorm2d, (1, 3, 1, 1)),
                                       (batchnorm.BatchNorm3d, (1, 3, 1, 1, 1)),
                                       (batchnorm.BatchNormAct1d, (1, 3, 1))])
def test_one_value_per_channel_in_training(cls, shape):
    m = _trained(cls(3))
    _rejects(m, torch.randn(shape), ValueError, cls.__name__, "more than 1 value per channel when training",
             str(shape), "use a batch of at least 2, or eval mode")
    m.eval()  # the same input is fine in eval mode (running statistics)
    before = snapshot(m)
    assert m(torch.randn(shape)).shape == shape
    assert_state_unchanged(before, m, "eval on a single value per channel")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_non_floating_input(dtype):
    m = _trained(batchnorm.BatchNorm2d(3))
    x = torch.ones(4, 3, 2, 2).to(dtype)
    _rejects(m, x, TypeError, "BatchNorm2d", "expected a floating-point input", str(dtype), ".float()")


@pytest.mark.parametrize("x", [[[1.0, 2.0, 3.0]] * 4, np.ones((4, 3, 2, 2)), 3.0, None],
                         ids=["list", "ndarray", "float", "None"])
def test_non_tensor_input(x):
    m = _trained(batchnorm.BatchNorm2d(3))
    _rejects(m, x, TypeError, "BatchNorm2d", "expected input to be a torch.Tensor", type(x).__name__,
             "torch.as_tensor")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_empty_input_with_the_wrong_channel_count(train):
    # (empty batches with the right channels work: tests/core/test_core_dropin.py)
    m = _trained(batchnorm.BatchNorm2d(3))
    _rejects(m, torch.randn(4, 0, 2, 2), ValueError, "BatchNorm2d", "expected 3 channels on axis 1, got 0",
             "(4, 0, 2, 2)", "num_features=0", train=train)
    _rejects(m, torch.randn(0, 3, 2), ValueError, "BatchNorm2d", "expected 4-D", "(0, 3, 2)", train=train)


def test_channel_axis_out_of_range_at_forward():
    m = _trained(batchnorm.BatchNorm2d(3))
    m.channel_axis = 4
    _rejects(m, torch.randn(2, 3, 2, 2), ValueError, "BatchNorm2d", "channel_axis=4 is out of range",
             "use 1 for channels-first or -1 for channels-last")


def test_nonfinite_raise_leaves_state_unchanged():
    m = _trained(batchnorm.BatchNormAct2d(3, nonfinite="raise"))
    x = torch.randn(4, 3, 2, 2)
    x[0, 2, 0, 0] = float("inf")
    _rejects(m, x, FloatingPointError, "NaN or Inf", "running statistics were left unchanged",
             "nonfinite='skip'")


# -- constructor arguments --------------------------------------------------------------------------------
CTOR_CASES = [  # (what torch accepts is accepted: tests/core/test_core_dropin.py::test_constructor_parity)
    ({"num_features": -3}, ValueError, ["num_features >= 0", "got -3", "number of channels"]),
    ({"num_features": 2.5}, TypeError, ["num_features to be an int", "got 2.5"]),
    ({"num_features": True}, TypeError, ["got the bool True"]),
    ({"eps": "1e-5"}, TypeError, ["eps to be a real number", "got '1e-5'"]),
    ({"eps": True}, TypeError, ["got True"]),
    ({"momentum": "0.1"}, TypeError, ["momentum to be a real number or None", "got '0.1'"]),
    ({"momentum": True}, TypeError, ["got True"]),
    ({"activation": "mish"}, ValueError, ["unknown activation 'mish'", "identity, relu, leaky_relu, elu"]),
    ({"activation": "ReLU"}, ValueError, ["unknown activation 'ReLU'"]),
    ({"negative_slope": "0.1"}, TypeError, ["negative_slope to be a number", "got '0.1'", "such as 0.01"]),
    ({"negative_slope": True}, TypeError, ["got True"]),
    ({"nonfinite": "ignore"}, ValueError, ["nonfinite to be one of", "'ignore'", "'skip' ignores"]),
    ({"nonfinite": None}, ValueError, ["got None"]),
    ({"channel_axis": 1.0}, TypeError, ["channel_axis to be an int (1 or -1)", "got 1.0"]),
    ({"channel_axis": "-1"}, TypeError, ["got '-1'"]),
    ({"channel_axis": True}, TypeError, ["got True"]),
]


@pytest.mark.parametrize("cls", [batchnorm.BatchNorm1d, batchnorm.BatchNorm2d, batchnorm.BatchNormAct3d])
@pytest.mark.parametrize("kwargs,exc,parts", CTOR_CASES, ids=[f"{next(iter(k))}={next(iter(k.values()))!r}"
                                                              for k, _, _ in CTOR_CASES])
def test_bad_constructor_arguments(cls, kwargs, exc, parts):
    args = {"num_features": 3, **kwargs}
    with pytest.raises(exc) as info:
        cls(**args)
    msg = str(info.value)
    assert msg.startswith(cls.__name__ + ":"), msg
    for p in parts:
        assert p in msg, f"{p!r} not in {msg}"


CONV_CASES = [
    (("tensorflow",), {}, ["unknown convention 'tensorflow'", "['darknet', 'flax', 'keras', 'torch']"]),
    (("keras",), {"decay": 0.99, "momentum": 0.01}, ["give decay or momentum, not both"]),
    (("flax",), {"decay": 1.5}, ["expected decay in [0, 1]", "got 1.5"]),
    (("flax",), {"decay": "0.9"}, ["got '0.9'"]),
    (("flax",), {"decay": -0.5}, ["expected decay in [0, 1]", "got -0.5"]),
]


@pytest.mark.parametrize("args,kwargs,parts", CONV_CASES)
def test_bad_convention_arguments(args, kwargs, parts):
    # (overrides are validated like any constructor argument: from_convention("keras", 4, eps="x")
    # raises the constructor's TypeError)
    with pytest.raises(ValueError) as info:
        batchnorm.BatchNorm2d.from_convention(*args, 4, **kwargs)
    msg = str(info.value)
    assert msg.startswith("BatchNorm2d"), msg
    for p in parts:
        assert p in msg, f"{p!r} not in {msg}"


# -- functions: arguments unchanged after every rejected call --------------------------------------------
def _fn_rejects(fn, args: dict, exc, *parts):
    tensors = {k: v for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    saved = {k: bits(v) for k, v in tensors.items()}
    with pytest.raises(exc) as info:
        fn(**args)
    msg = str(info.value)
    for p in parts:
        assert p in msg, f"{p!r} not in message: {msg}"
    for k, v in tensors.items():
        assert torch.equal(bits(v), saved[k]), f"argument {k} was modified by a rejected call"
    return msg


def _train_args(**over):
    args = {"x": torch.randn(4, 3, 2, 2), "running_mean": torch.randn(3), "running_var": torch.rand(3) + 1,
            "weight": torch.rand(3) + 0.5, "bias": torch.randn(3), "num_batches_tracked": torch.tensor(5)}
    args.update(over)
    return args


TRAIN_CASES = [
    ({"x": torch.randn(4)}, ValueError, ["got 1-D", "rank 2 to 5"]),
    ({"x": torch.randn(1, 3, 1, 1, 1, 2)}, ValueError, ["got 6-D", "rank 2 to 5"]),
    ({"x": torch.randn(1, 3)}, ValueError, ["more than 1 value per channel", "eval mode"]),
    ({"x": torch.randn(0, 3, 2, 2)}, ValueError, ["empty input"]),
    ({"x": torch.ones(4, 3, 2, 2, dtype=torch.int32)}, TypeError, ["floating-point input", ".float()"]),
    ({"x": [1.0, 2.0]}, TypeError, ["torch.Tensor", "torch.as_tensor"]),
    ({"weight": torch.ones(4)}, ValueError, ["expected weight of shape (3,) for 3 channels", "got shape (4,)",
                                             "one value per channel"]),
    ({"bias": torch.ones(3, 1)}, ValueError, ["expected bias of shape (3,)", "got shape (3, 1)"]),
    ({"running_mean": torch.zeros(2)}, ValueError, ["expected running_mean of shape (3,)"]),
    ({"running_var": torch.ones(1, 3)}, ValueError, ["expected running_var of shape (3,)"]),
    ({"running_var": torch.ones(3, dtype=torch.long)}, TypeError, ["floating-point running_var", ".float()"]),
    ({"weight": [1.0, 1.0, 1.0]}, TypeError, ["weight to be a torch.Tensor or None", "torch.as_tensor"]),
    ({"weight": torch.ones(3, device="meta")}, ValueError, ["weight is on meta", "module.to(x.device)"]),
    ({"running_var": None}, ValueError, ["give both running_mean and running_var, or neither"]),
    ({"momentum": None, "num_batches_tracked": None}, ValueError,
     ["momentum=None", "needs num_batches_tracked", "torch.tensor(0)"]),
    ({"momentum": 2.0}, ValueError, ["momentum in [0, 1] or None"]),
    ({"eps": -1.0}, ValueError, ["eps to be a number >= 0"]),
    ({"activation": "mish"}, ValueError, ["unknown activation 'mish'", "expected one of"]),
    ({"negative_slope": None}, TypeError, ["negative_slope to be a number"]),
    ({"nonfinite": "warn"}, ValueError, ["nonfinite to be one of"]),
    ({"channel_axis": 4}, ValueError, ["channel_axis=4 is out of range", "use 1 for channels-first"]),
    ({"channel_axis": -5}, ValueError, ["channel_axis=-5 is out of range"]),
]


@pytest.mark.parametrize("over,exc,parts", TRAIN_CASES, ids=[",".join(o) for o, _, _ in TRAIN_CASES])
def test_batch_norm_train_rejects(over, exc, parts):
    args = _train_args(**over)
    msg = _fn_rejects(F.batch_norm_train, args, exc, *parts)
    assert msg.startswith("batchnorm.batch_norm_train:"), msg


EVAL_CASES = [
    ({"mean": None}, TypeError, ["mean and var are required", "batch_norm_train"]),
    ({"var": torch.ones(4)}, ValueError, ["expected var of shape (3,)"]),
    ({"mean": torch.zeros(3, dtype=torch.int64)}, TypeError, ["floating-point mean"]),
    ({"x": torch.randn(2, 3, 1, 1, 1, 1)}, ValueError, ["got 6-D", "rank 2 to 5"]),
    ({"x": torch.randn(2, 3, 0)}, ValueError, ["empty input"]),
    ({"weight": torch.ones(2)}, ValueError, ["expected weight of shape (3,)"]),
    ({"eps": "small"}, ValueError, ["eps to be a number >= 0"]),
    ({"activation": "swish"}, ValueError, ["unknown activation 'swish'"]),
]


@pytest.mark.parametrize("over,exc,parts", EVAL_CASES, ids=[",".join(o) for o, _, _ in EVAL_CASES])
def test_batch_norm_eval_rejects(over, exc, parts):
    args = {"x": torch.randn(4, 3, 2), "mean": torch.zeros(3), "var": torch.ones(3), "weight": torch.ones(3),
            "bias": torch.zeros(3), **over}
    msg = _fn_rejects(F.batch_norm_eval, args, exc, *parts)
    assert msg.startswith("batchnorm.batch_norm_eval:"), msg


TF_CASES = [
    ({"mean": None}, TypeError, ["mean is required", "broadcastable to the input"]),
    ({"variance": None}, TypeError, ["variance is required"]),
    ({"offset": torch.zeros(3)}, ValueError,
     ["offset of shape (3,) does not broadcast against the input of shape (2, 3, 4, 5)", "(C, 1, 1)"]),
    ({"scale": torch.ones(2, 3, 4, 6)}, ValueError, ["scale of shape (2, 3, 4, 6) does not broadcast"]),
    ({"variance_epsilon": -1e-3}, ValueError, ["eps to be a number >= 0"]),
    ({"x": torch.ones(2, 3, 4, 5, dtype=torch.int64)}, TypeError, ["floating-point input"]),
    ({"mean": np.zeros((3, 1, 1))}, TypeError, ["mean to be a torch.Tensor", "torch.as_tensor"]),
]


@pytest.mark.parametrize("over,exc,parts", TF_CASES, ids=[",".join(o) for o, _, _ in TF_CASES])
def test_tf_style_batch_norm_rejects(over, exc, parts):
    args = {"x": torch.randn(2, 3, 4, 5), "mean": torch.zeros(3, 1, 1), "variance": torch.ones(3, 1, 1),
            "offset": torch.zeros(3, 1, 1), "scale": torch.ones(3, 1, 1), **over}
    msg = _fn_rejects(F.batch_norm, args, exc, *parts)
    assert msg.startswith("batchnorm.batch_norm:"), msg


MOMENTS_CASES = [
    ({"axes": [4]}, ValueError, ["axis 4 is out of range for a 3-D input", "[-3, 2]"]),
    ({"axes": [-4]}, ValueError, ["axis -4 is out of range"]),
    ({"axes": [0, -3]}, ValueError, ["repeated axis in axes=[0, -3]", "list each axis once"]),
    ({"axes": [1.0]}, ValueError, ["axis 1.0 is out of range"]),
    ({"x": torch.randn(0, 3)}, ValueError, ["empty input", "undefined"]),
    ({"x": torch.randn(5), "axes": None}, ValueError,
     ["default axes need an input of rank >= 2", "pass axes="]),
    ({"x": torch.arange(6)}, TypeError, ["floating-point input", ".float()"]),
    ({"x": (1.0, 2.0)}, TypeError, ["torch.as_tensor"]),
]


@pytest.mark.parametrize("over,exc,parts", MOMENTS_CASES, ids=[",".join(o) for o, _, _ in MOMENTS_CASES])
def test_moments_rejects(over, exc, parts):
    args = {"x": torch.randn(2, 3, 4), "axes": [0, 2], **over}
    msg = _fn_rejects(F.moments, args, exc, *parts)
    assert msg.startswith("batchnorm.moments:"), msg


def test_update_running_stats_cumulative_needs_a_count():
    args = {"running_mean": torch.zeros(3), "running_var": torch.ones(3), "batch_mean": torch.randn(3),
            "batch_var": torch.rand(3), "n": 8, "momentum": None, "num_batches_tracked": None}
    _fn_rejects(F.update_running_stats, args, ValueError, "batchnorm.update_running_stats",
                "momentum=None", "pass the count of batches seen so far")


# -- the backend switch -----------------------------------------------------------------------------------
def test_set_backend_unknown_name_keeps_the_choice():
    start = batchnorm.get_backend()
    with pytest.raises(ValueError) as info:
        batchnorm.set_backend("cuda-magic")
    msg = str(info.value)
    assert "set_backend" in msg and "'cuda-magic'" in msg and "'auto'" in msg and "'torch'" in msg
    assert batchnorm.get_backend() == start
    with pytest.raises(ValueError, match="unknown backend 'nope'"), batchnorm.use_backend("nope"):
        pass
    assert batchnorm.get_backend() == start
    with batchnorm.use_backend("torch"):
        with pytest.raises(ValueError), batchnorm.use_backend("nope"):
            pass
        assert batchnorm.get_backend() == "torch"  # a failed nested switch leaves the outer one
    assert batchnorm.get_backend() == start


def test_forced_backend_that_cannot_load_raises_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(kernels, "_LAZY", dict(kernels._LAZY))
    monkeypatch.setattr(kernels, "_FAST_ORDER", list(kernels._FAST_ORDER))
    kernels.register_backend("ghost", "batchnorm_tests_no_such_module_xyz")
    x = torch.randn(4, 3)
    with batchnorm.use_backend("ghost"), pytest.raises(RuntimeError) as info:
        batchnorm.backend_for(x)
    msg = str(info.value)
    assert "backend 'ghost' is not available here" in msg and "'torch'" in msg
    assert "ghost" not in kernels.available_backends()
    with batchnorm.use_backend("auto"):  # a registered fast backend that fails to import: auto never fails
        assert batchnorm.backend_for(x) in kernels.available_backends()
        y, _ = F.batch_norm_train(x)
    assert torch.isfinite(y).all()


def test_forced_backend_that_does_not_support_the_input_raises_instead_of_falling_back(monkeypatch):
    fake = types.ModuleType("batchnorm_tests_fake_backend")
    fake.name = "fake"
    fake.supports = lambda x, channel_axis, act: x.dtype == torch.float64
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setattr(kernels, "_LAZY", dict(kernels._LAZY))
    monkeypatch.setattr(kernels, "_FAST_ORDER", list(kernels._FAST_ORDER))
    monkeypatch.setattr(kernels, "_BACKENDS", dict(kernels._BACKENDS))
    kernels.register_backend("fake", fake.__name__, fast=False)
    m = _trained(batchnorm.BatchNorm2d(3))
    start = batchnorm.get_backend()
    with batchnorm.use_backend("fake"):
        assert batchnorm.backend_for(torch.randn(2, 3, dtype=torch.float64)) == "fake"
        msg = _rejects(m, torch.randn(4, 3, 2, 2), RuntimeError, "forced backend 'fake' cannot run",
                       "torch.float32", "(4, 3, 2, 2)", "set_backend('auto')")
        assert "activation='identity'" in msg
    assert batchnorm.get_backend() == start
    with batchnorm.use_backend("auto"):
        assert batchnorm.backend_for(torch.randn(2, 3, dtype=torch.float64)) != "fake"  # not fast: never auto
