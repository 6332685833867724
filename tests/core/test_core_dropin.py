"""Our classes are torch's classes: isinstance, torch's helpers, state_dict versions, input checks.

The story: code written for ``torch.nn.BatchNorm*`` finds our layers (``isinstance``), torch's own
helpers that look for BN layers act on them (``swa_utils.update_bn``,
``torch.func.replace_all_batch_norm_modules_``, weight-decay parameter groups), a version-1
checkpoint without ``num_batches_tracked`` loads as it does into torch's layer, and torch's
``_check_input_dim`` raises torch's message.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from helpers.util import assert_close
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as TorchBN

import batchnorm

RANKED = [
    (batchnorm.BatchNorm1d, nn.BatchNorm1d, (8, 4)),
    (batchnorm.BatchNorm2d, nn.BatchNorm2d, (8, 4, 3, 3)),
    (batchnorm.BatchNorm3d, nn.BatchNorm3d, (8, 4, 2, 3, 2)),
    (batchnorm.BatchNormAct1d, nn.BatchNorm1d, (8, 4, 5)),
    (batchnorm.BatchNormAct2d, nn.BatchNorm2d, (8, 4, 3, 3)),
    (batchnorm.BatchNormAct3d, nn.BatchNorm3d, (8, 4, 2, 3, 2)),
    (batchnorm.BatchRenorm1d, nn.BatchNorm1d, (8, 4)),
    (batchnorm.BatchRenorm2d, nn.BatchNorm2d, (8, 4, 3, 3)),
    (batchnorm.BatchRenorm3d, nn.BatchNorm3d, (8, 4, 2, 3, 2)),
    (batchnorm.InPlaceABN1d, nn.BatchNorm1d, (8, 4)),
    (batchnorm.InPlaceABN2d, nn.BatchNorm2d, (8, 4, 3, 3)),
    (batchnorm.InPlaceABN3d, nn.BatchNorm3d, (8, 4, 2, 3, 2)),
    (batchnorm.GhostBatchNorm1d, nn.BatchNorm1d, (8, 4)),
    (batchnorm.GhostBatchNorm2d, nn.BatchNorm2d, (8, 4, 3, 3)),
    (batchnorm.GhostBatchNorm3d, nn.BatchNorm3d, (8, 4, 2, 3, 2)),
]


def _make(cls, c=4):
    if cls.__name__.startswith("Ghost"):
        return cls(c, virtual_batch_size=4)
    return cls(c)


@pytest.mark.parametrize("ours, theirs, shape", RANKED, ids=[c[0].__name__ for c in RANKED])
def test_every_variant_is_an_instance_of_torchs_class(ours, theirs, shape):
    m = _make(ours)
    assert isinstance(m, theirs) and isinstance(m, TorchBN)
    # torch's _check_input_dim is there, with torch's message for the wrong rank
    wrong = torch.randn(2, 4, 3, 3, 3, 3)
    with pytest.raises(ValueError, match=r"expected .*D input \(got 6D input\)"):
        m._check_input_dim(wrong)
    m._check_input_dim(torch.randn(shape))  # the right rank passes
    y = m(torch.randn(shape))
    assert y.shape == shape


def test_check_input_dim_messages_match_torch():
    for ours, theirs, x in [(batchnorm.BatchNorm1d(3), nn.BatchNorm1d(3), torch.randn(2, 3, 4, 4)),
                            (batchnorm.BatchNorm2d(3), nn.BatchNorm2d(3), torch.randn(2, 3)),
                            (batchnorm.BatchNorm3d(3), nn.BatchNorm3d(3), torch.randn(2, 3, 4))]:
        with pytest.raises(ValueError) as a:
            ours._check_input_dim(x)
        with pytest.raises(ValueError) as b:
            theirs._check_input_dim(x)
        assert str(a.value) == str(b.value)


def test_sync_batchnorm_is_a_torch_batchnorm_but_not_nn_syncbatchnorm():
    # DDP raises "SyncBatchNorm layers only work with GPU modules" for any nn.SyncBatchNorm on a CPU
    # model, while ours runs data-parallel on gloo: so ours is a _BatchNorm, deliberately not that.
    m = batchnorm.SyncBatchNorm(4)
    assert isinstance(m, TorchBN) and not isinstance(m, nn.SyncBatchNorm)
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        m._check_input_dim(torch.randn(4))


def test_attribute_names_and_version_are_torchs():
    ours, theirs = batchnorm.BatchNorm2d(5, momentum=None, affine=False), nn.BatchNorm2d(5, momentum=None,
                                                                                     affine=False)
    for name in ("num_features", "eps", "momentum", "affine", "track_running_stats", "weight", "bias",
                 "running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert type(a) is type(b), name
    assert ours._version == theirs._version == 2
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.state_dict()._metadata[""]["version"] == 2


def test_version_1_checkpoint_keeps_the_count_like_torch():
    src = nn.BatchNorm2d(3)
    sd = src.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    for layer in (batchnorm.BatchNorm2d(3), nn.BatchNorm2d(3)):
        layer.num_batches_tracked.fill_(7)
        layer.load_state_dict(copy.deepcopy(sd))
        assert int(layer.num_batches_tracked) == 7  # kept, as torch's _NormBase does
    # a version-2 checkpoint without the key is an error (strict), as in torch
    sd2 = nn.BatchNorm2d(3).state_dict()
    del sd2["num_batches_tracked"]
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        batchnorm.BatchNorm2d(3).load_state_dict(sd2)


def test_pickle_and_deepcopy_keep_the_class():
    m = batchnorm.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.2)
    m(torch.randn(6, 4, 3, 3))
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert type(other) is type(m) and isinstance(other, nn.BatchNorm2d)
        assert other.activation == "leaky_relu" and other.negative_slope == 0.2
        assert torch.equal(other.running_mean, m.running_mean)


def test_weight_decay_param_groups_find_our_layers():
    # The common recipe: no weight decay for BN parameters, found by isinstance(_BatchNorm).
    model = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4, 2), batchnorm.BatchNormAct1d(2))
    no_decay = [p for m in model.modules() if isinstance(m, TorchBN) for p in m.parameters(recurse=False)]
    assert len(no_decay) == 4


def test_swa_update_bn_recomputes_our_statistics():
    torch.manual_seed(0)
    data = [torch.randn(16, 3, 4, 4) * 2 + 1 for _ in range(3)]
    ours = batchnorm.BatchNorm2d(3)
    theirs = nn.BatchNorm2d(3)
    torch.optim.swa_utils.update_bn(data, ours)
    torch.optim.swa_utils.update_bn(data, theirs)
    assert int(ours.num_batches_tracked) == 3  # it ran: update_bn resets and re-accumulates
    assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6, what="update_bn mean")
    assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6, what="update_bn var")
    assert ours.momentum == 0.1  # restored by update_bn


def test_replace_all_batch_norm_modules_reaches_our_layers():
    model = nn.Sequential(batchnorm.BatchNorm1d(4), batchnorm.BatchNormAct1d(4))
    torch.func.replace_all_batch_norm_modules_(model)
    for m in model:
        assert m.running_mean is None and m.running_var is None and not m.track_running_stats
    x = torch.randn(8, 4, dtype=torch.float64)
    ref = nn.functional.batch_norm(x, None, None, training=True)
    assert_close(model[0](x), ref, rtol=1e-10, atol=1e-10, what="batch statistics after replace_all")


# -- empty batches ----------------------------------------------------------------------------------
EMPTY = [(batchnorm.BatchNorm2d, (0, 4, 3, 3), {}), (batchnorm.BatchNorm1d, (0, 4), {}),
         (batchnorm.BatchNormAct1d, (0, 4, 5), {"activation": "elu"}),
         (batchnorm.BatchNorm2d, (0, 3, 3, 4), {"channel_axis": -1}),
         (batchnorm.BatchNorm3d, (2, 4, 0, 2, 2), {"momentum": None})]


@pytest.mark.parametrize("cls, shape, kw", EMPTY, ids=[f"{c.__name__}{s}" for c, s, _ in EMPTY])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_empty_batch_gives_an_empty_output_and_changes_no_state(cls, shape, kw, train):
    m = cls(4, **kw)
    m.train()
    m(torch.randn([d or 2 for d in shape]) * 3 + 1)  # some statistics first
    m.train(train)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(shape, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(m.weight.grad, torch.zeros(4)) and torch.equal(m.bias.grad, torch.zeros(4))
    for k, v in m.state_dict().items():  # num_batches_tracked included: no batch was seen
        assert torch.equal(v, before[k]), k
    # torch: same empty output, same zero gradients, running statistics unchanged too
    t = nn.BatchNorm2d(4) if x.ndim == 4 else nn.BatchNorm1d(4) if x.ndim < 4 else nn.BatchNorm3d(4)
    if kw.get("channel_axis", 1) == 1:
        t.train(train)
        xt = x.detach().requires_grad_()
        t(xt).sum().backward()
        assert torch.equal(t.running_mean, torch.zeros(4)) and torch.equal(t.weight.grad, m.weight.grad)


def test_empty_batch_keeps_the_cumulative_average_exact():
    # momentum=None: the count is not bumped by an empty batch, so the average stays equal-weight
    ours = batchnorm.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    batches = [torch.randn(5, 3, dtype=torch.float64) + i for i in range(3)]
    ours(batches[0])
    ours(torch.randn(0, 3, dtype=torch.float64))
    ours(batches[1])
    ours(batches[2])
    want = torch.stack([b.mean(0) for b in batches]).mean(0)
    assert int(ours.num_batches_tracked) == 3
    assert_close(ours.running_mean, want, rtol=1e-12, atol=1e-12, what="cumulative mean")


def test_empty_batch_with_bad_shape_is_rejected_with_the_real_shape():
    m = batchnorm.BatchNorm2d(3)
    with pytest.raises(ValueError, match=r"expected 3 channels on axis 1, got 5 \(input shape \(0, 5, 2"):
        m(torch.randn(0, 5, 2, 2))
    with pytest.raises(ValueError, match=r"expected 4-D .* got 3-D input of shape \(0, 3, 2\)"):
        m(torch.randn(0, 3, 2))


# -- constructor parity -----------------------------------------------------------------------------
PARITY = [{"eps": 0}, {"eps": 0.0}, {"eps": -1e-3}, {"momentum": 1.5}, {"momentum": -0.5}, {"momentum": None},
          {"num_features": np.int64(4)}, {"num_features": np.int32(4)}, {"num_features": 0},
          {"eps": np.float32(1e-3)}, {"momentum": np.float64(0.3)}, {"affine": 0},
          {"track_running_stats": 0}, {"num_features": 4.0}, {"num_features": True}, {"num_features": -1}]


@pytest.mark.parametrize("kw", PARITY, ids=[repr(k) for k in PARITY])
def test_constructor_accepts_what_torch_accepts(kw):
    args = {"num_features": 4, **kw}
    try:
        theirs = nn.BatchNorm2d(**args)
    except (TypeError, RuntimeError, ValueError):
        theirs = None
    if theirs is None:  # torch rejects: so do we (TypeError/ValueError, documented in modules.py)
        with pytest.raises((TypeError, ValueError)):
            batchnorm.BatchNorm2d(**args)
        return
    ours = batchnorm.BatchNorm2d(**args)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    c = int(args["num_features"])
    x = torch.randn(6, c, 3, 3, dtype=torch.float64)
    ours, theirs = ours.double(), theirs.double()
    for mode in ("train", "eval", "train"):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        try:
            want = theirs(x)
        except IndexError:  # torch's kernel indexes γ[0] of a 0-feature layer; ours returns the empty output
            assert c == 0 and ours(x).shape == x.shape
            continue
        except ValueError as e:  # torch: "eps must be positive" (training) / "non-negative" (eval)
            assert "eps must be" in str(e)
            before = {k: v.clone() for k, v in ours.state_dict().items()}
            with pytest.raises(ValueError, match="eps must be positive"):
                ours(x)
            for k, v in ours.state_dict().items():  # deliberate: a rejected call changes nothing here,
                assert torch.equal(v, before[k]), k  # while torch has bumped num_batches_tracked already
            if theirs.training:
                theirs.num_batches_tracked.sub_(1)
            continue
        assert_close(ours(x), want, rtol=1e-10, atol=1e-10, what=f"{kw} {mode}")
        for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert_close(a, b, rtol=1e-10, atol=1e-12, what=f"{kw} {mode} {k}")
