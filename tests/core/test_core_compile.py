"""torch.compile(fullgraph=True) of a model built from our modules: no graph breaks, eager results.

The story: a small conv net with BatchNormAct2d (relu) and BatchNorm2d compiles in one graph
(``fullgraph=True`` raises on any graph break), the graph holds our custom ops, and the compiled
forward, backward (AOTAutograd through ``register_autograd``) and running-statistics update equal
the eager model's; eval mode compiles to the eval op. The ops themselves pass
``torch.library.opcheck`` (schema, fake tensors, autograd registration).

Compilation uses the ``aot_eager`` backend (Dynamo + AOTAutograd, no C++ code generation) so the
test stays within a few seconds; inductor compiles the same graph.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.util import assert_close
from torch import nn

import batchnorm
import batchnorm.core.ops  # (registers torch.ops.batchnorm.*)


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _recording_backend(graphs: list[str]):
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return aot_eager(gm, example_inputs)

    return backend


def test_fullgraph_compile_forward_backward_and_eval_match_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), batchnorm.BatchNormAct2d(8),
                          nn.Conv2d(8, 4, 1), batchnorm.BatchNorm2d(4, momentum=0.2))
    eager = copy.deepcopy(model)
    graphs: list[str] = []
    compiled = torch.compile(model, fullgraph=True, backend=_recording_backend(graphs))
    x = torch.randn(4, 3, 6, 6)
    with batchnorm.use_backend("numba"):  # (small: auto would run torch's native kernel in the ops)
        _compiled_steps(model, eager, compiled, graphs, x)


def _compiled_steps(model, eager, compiled, graphs, x):
    assert batchnorm.backend_for(x) == "numba"
    for step in range(2):  # the second step reuses the compiled graph
        xs = x + step
        yc = compiled(xs)
        ye = eager(xs)
        assert_close(yc, ye, rtol=1e-5, atol=1e-5, what=f"train y, step {step}")
        yc.square().sum().backward()
        ye.square().sum().backward()
    assert any("torch.ops.batchnorm.train_forward" in g for g in graphs), graphs
    for (name, p), pe in zip(model.named_parameters(), eager.parameters()):
        assert_close(p.grad, pe.grad, rtol=1e-4, atol=1e-4, what=f"grad {name}")
    for (name, b), be in zip(model.named_buffers(), eager.buffers()):
        if b.ndim == 0:  # num_batches_tracked
            assert torch.equal(b, be), name
        else:
            assert_close(b, be, rtol=1e-5, atol=1e-6, what=f"buffer {name}")
    assert int(model[1].num_batches_tracked) == 2

    model.eval()
    eager.eval()
    with torch.no_grad():
        assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5, what="eval y")
    assert any("torch.ops.batchnorm.eval_forward" in g for g in graphs)


def test_compiled_channels_last_functional_with_leaky_relu():
    graphs: list[str] = []

    def f(x, w, b):
        y, _ = batchnorm.batch_norm_train(x, None, None, w, b, activation="leaky_relu", negative_slope=0.2)
        return y

    x = torch.randn(4, 5, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.rand(5, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    yc = torch.compile(f, fullgraph=True, backend=_recording_backend(graphs))(x, w, b)
    assert yc.is_contiguous(memory_format=torch.channels_last)
    gc = torch.autograd.grad(yc.sum(), (x, w, b))
    ye = f(x, w, b)
    ge = torch.autograd.grad(ye.sum(), (x, w, b))
    assert_close(yc, ye, rtol=1e-6, atol=1e-6, what="y")
    for a, e, what in zip(gc, ge, ("dx", "dw", "db")):
        assert_close(a, e, rtol=1e-5, atol=1e-5, what=what)


@pytest.mark.parametrize("act,slope", [("relu", 0.0), ("elu", 0.5), ("identity", 0.01)])
def test_custom_ops_pass_opcheck(act, slope):
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    mean, var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.batchnorm.train_forward.default, (x, w, b, 1e-5, 1, act, slope),
                          test_utils=tests)
    torch.library.opcheck(torch.ops.batchnorm.train_forward.default, (x, None, None, 1e-5, 1, act, slope),
                          test_utils=tests)
    torch.library.opcheck(torch.ops.batchnorm.eval_forward.default, (x, mean, var, w, b, 1e-5, 1, act, slope),
                          test_utils=tests)
    y, m, v = torch.ops.batchnorm.train_forward(x.detach(), w.detach(), b.detach(), 1e-5, 1, act, slope)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.batchnorm.train_backward.default,
                          (dy, x.detach(), y, w.detach(), b.detach(), m, v, 1e-5, 1, act, slope),
                          test_utils=("test_schema", "test_faketensor"))


def test_custom_op_gradients_are_exact_in_float64():
    x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.linspace(0.5, 1.5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.linspace(-0.2, 0.2, 3, dtype=torch.float64, requires_grad=True)
    mean, var = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64), torch.tensor([0.5, 1.0, 2.0],
                                                                                   dtype=torch.float64)

    def train(x, w, b):
        return torch.ops.batchnorm.train_forward(x, w, b, 1e-3, 1, "leaky_relu", 0.1)[0]

    def evaluate(x, w, b):
        return torch.ops.batchnorm.eval_forward(x, mean, var, w, b, 1e-3, 1, "elu", 0.8)

    for f in (train, evaluate):
        assert torch.autograd.gradcheck(f, (x, w, b))
        assert torch.autograd.gradgradcheck(f, (x, w, b))
