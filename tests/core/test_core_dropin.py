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
