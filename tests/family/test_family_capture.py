"""The family's layers under graph capture: loud refusal where a tracer cannot see the step, never a
graph that computes something else; eval-mode Batch Renorm / Ghost BN capture as torch's batch_norm."""

from __future__ import annotations

import warnings

import pytest
import torch

import batchnorm


def _trace(m, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated in torch 2.13
        return torch.jit.trace(m, x, check_trace=False)


@pytest.mark.parametrize("make", [lambda: batchnorm.BatchRenorm2d(3),
                                  lambda: batchnorm.GhostBatchNorm2d(3, virtual_batch_size=4),
                                  lambda: batchnorm.InPlaceABN2d(3)])
def test_training_steps_the_tracer_cannot_see_refuse_to_be_captured(make):
    m = make().train()
    x = torch.randn(8, 3, 4, 4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match="cannot be captured"):
        _trace(m, x)
    with pytest.raises(RuntimeError, match="cannot be captured"):
        torch.fx.symbolic_trace(m)
    with pytest.raises(RuntimeError, match="cannot be captured"):
        torch.func.vmap(m, in_dims=0)(x.unsqueeze(0).expand(2, *x.shape).contiguous())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_inplace_abn_refuses_capture_in_eval_too():
    m = batchnorm.InPlaceABN2d(3).eval()
    with pytest.raises(RuntimeError, match="prepare_for_export"):
        _trace(m, torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize("make", [lambda: batchnorm.BatchRenorm2d(3),
                                  lambda: batchnorm.GhostBatchNorm2d(3, virtual_batch_size=4)])
def test_eval_mode_renorm_and_ghost_capture_as_torch_batch_norm(make):
    m = make()
    m.train()(torch.randn(16, 3, 4, 4) * 2 + 1)  # some running statistics
    m.eval()
    traced = _trace(m, torch.randn(4, 3, 4, 4))
    assert "aten::batch_norm" in str(traced.graph)
    x = torch.randn(5, 3, 4, 4)  # a fresh input: the graph computes, it did not bake the result in
    torch.testing.assert_close(traced(x), m(x))
