"""Graph capture sees torch's standard ops, with the same numbers, and is never silently wrong.

The story: a small model with our layers (plain, fused activation, channels on the last axis) is
captured by every tool people use — ``torch.jit.trace`` (with and without grad), ``torch.jit.script``,
``torch.fx.symbolic_trace``, ``torch.export``, ``torch.onnx.export`` (TorchScript and dynamo
exporters) — and the captured graph (1) holds torch's ``batch_norm`` and no ``batchnorm.*`` op and
(2) computes, on *fresh* inputs, what the eager model computes (outputs, gradients, running
statistics). ONNX models run in onnxruntime. A training step that torch's ``batch_norm`` cannot
express (biased running variance, ``nonfinite='skip'``) refuses to be captured, loudly.
``torch.compile`` keeps our custom ops (tested in ``test_core_compile.py``).
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch
from helpers.util import assert_close
from torch import nn

import batchnorm

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning",
                                        "ignore:`torch.jit.script` is deprecated:DeprecationWarning",
                                        "ignore:.*torch.jit.*deprecated.*:DeprecationWarning")


class _NHWC(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.bn = batchnorm.BatchNorm2d(c, channel_axis=-1)

    def forward(self, x):
        return self.bn(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), batchnorm.BatchNormAct2d(4),
                      nn.Conv2d(4, 4, 1), batchnorm.BatchNormAct2d(4, activation="leaky_relu",
                                                                    negative_slope=0.2),
                      _NHWC(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), batchnorm.BatchNorm1d(5))
    m = m.to(dtype)
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        m.train()
        for _ in range(3):
            m(torch.randn(8, 3, 6, 6, dtype=dtype) * 2 + 1)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def _fresh(n=6, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g, dtype=dtype) * 1.5 - 0.5


def _jit_ops(graph) -> list[str]:
    return [n.kind() for n in graph.nodes()]


def _fx_ops(graph) -> list[str]:
    out = []
    for n in graph.nodes:
        if n.op == "call_function":
            t = n.target
            out.append(f"{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', str(t))}")
        elif n.op in ("call_method", "call_module"):
            out.append(f"{n.op}:{n.target}")
    return out


def _no_private_ops(ops: list[str]):
    """None of the recorded ops is one of ours (``batchnorm::*`` custom ops, ``batchnorm.*`` functions)."""
    bad = [o for o in ops if o.startswith(("batchnorm", "torch.ops.batchnorm")) or "batchnorm::" in o
           or o.startswith("batchnorm.")]
    assert not bad, bad


# -- jit.trace ------------------------------------------------------------------------------------
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_jit_trace_eval_records_batch_norm_and_matches_eager_on_fresh_inputs(grad):
    m = _model().eval()
    x = _fresh()
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        traced = torch.jit.trace(m, (x,), check_trace=True)
    ops = _jit_ops(traced.inlined_graph)
    assert ops.count("aten::batch_norm") == 4, ops
    _no_private_ops(ops)
    for seed in (2, 3):
        xf = _fresh(seed=seed, n=4).requires_grad_(grad)
        with ctx:
            yt, ye = traced(xf), m(xf)
        assert_close(yt, ye, rtol=1e-6, atol=1e-6, what=f"traced eval, seed {seed}")
        if grad:
            gt = torch.autograd.grad(yt.square().sum(), xf)[0]
            ge = torch.autograd.grad(ye.square().sum(), xf)[0]
            assert_close(gt, ge, rtol=1e-5, atol=1e-5, what="traced eval grad")
    buf = io.BytesIO()
    torch.jit.save(traced, buf)  # (it used to fail with grad)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    with torch.no_grad():
        assert_close(loaded(_fresh(seed=4)), m(_fresh(seed=4)), rtol=1e-6, atol=1e-6, what="jit.load")


def test_jit_trace_train_updates_the_buffers_as_eager_does():
    m = _model(torch.float64).train()
    eager = copy.deepcopy(m)
    traced = torch.jit.trace(m, (_fresh(dtype=torch.float64),), check_trace=False)
    m.load_state_dict(eager.state_dict())  # the trace ran one step: start both from the same state
    for seed in (5, 6):
        x = _fresh(dtype=torch.float64, seed=seed)
        assert_close(traced(x), eager(x), rtol=1e-10, atol=1e-10, what="traced train output")
    for (name, a), b in zip(m.state_dict().items(), eager.state_dict().values()):
        assert_close(a, b, rtol=1e-10, atol=1e-12, what=f"traced train buffer {name}")


# -- jit.script -----------------------------------------------------------------------------------
def test_jit_script_compiles_to_torch_layers_sharing_our_state():
    m = _model().eval()
    scripted = torch.jit.script(m)
    ops = _jit_ops(scripted.inlined_graph)
    assert ops.count("aten::batch_norm") == 4, ops
    _no_private_ops(ops)
    with torch.no_grad():
        for seed in (7, 8):
            assert_close(scripted(_fresh(seed=seed)), m(_fresh(seed=seed)), rtol=1e-6, atol=1e-6,
                         what="scripted eval")
    assert list(scripted.state_dict()) == list(m.state_dict())  # same keys: checkpoints interchange
    m.train()
    scripted.train()
    eager = copy.deepcopy(m)
    x = _fresh(seed=9)
    assert_close(scripted(x), eager(x), rtol=1e-5, atol=1e-5, what="scripted train")
    # the scripted model's running statistics are the very buffers of ours
    assert_close(m[1].running_mean, eager[1].running_mean, rtol=1e-6, atol=1e-7, what="shared stats")
    assert int(m[1].num_batches_tracked) == int(eager[1].num_batches_tracked)


def test_jit_script_refuses_what_torch_cannot_express():
    m = nn.Sequential(batchnorm.BatchNorm1d(3, running_var_unbiased=False))
    with pytest.raises(RuntimeError, match="running_var_unbiased=False"):
        torch.jit.script(m)


# -- fx -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_fx_symbolic_trace_emits_functional_batch_norm(train):
    m = _model(torch.float64).train(train)
    eager = copy.deepcopy(m)
    gm = torch.fx.symbolic_trace(m)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(nn.functional.batch_norm) == 4, gm.code
    _no_private_ops(_fx_ops(gm.graph))
    for seed in (10, 11):
        x = _fresh(dtype=torch.float64, seed=seed)
        assert_close(gm(x), eager(x), rtol=1e-10, atol=1e-10, what="fx output")
    for (name, a), b in zip(m.state_dict().items(), eager.state_dict().values()):
        assert_close(a, b, rtol=1e-10, atol=1e-12, what=f"fx buffer {name}")  # incl. the batch count


def test_fx_refuses_momentum_none_in_training():
    m = nn.Sequential(batchnorm.BatchNorm1d(3, momentum=None))
    with pytest.raises(RuntimeError, match="momentum=None"):
        torch.fx.symbolic_trace(m)
    torch.fx.symbolic_trace(m.eval())  # fine in eval


# -- export and ONNX ------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_torch_export_holds_aten_batch_norm_and_matches_eager(train):
    m = _model().train(train)
    eager = copy.deepcopy(m)
    ep = torch.export.export(m, (_fresh(),))
    ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("batch_norm" in o for o in ops) == 4, ops
    _no_private_ops(ops)
    m.load_state_dict(eager.state_dict())
    mod = ep.module()
    for seed in (12, 13):
        x = _fresh(seed=seed)
        assert_close(mod(x), eager(x), rtol=1e-5, atol=1e-5, what="exported output")


def _onnx_run(path_or_bytes, x: torch.Tensor) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: x.numpy()})[0]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_runs_in_onnxruntime_like_eager(dynamo, tmp_path):
    pytest.importorskip("onnx")
    m = _model().eval()
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' own deprecation/progress chatter
        torch.onnx.export(m, (_fresh(),), str(path), dynamo=dynamo, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}} if not dynamo else None)
    import onnx

    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" in ops, ops
    assert len(model.graph.input) == 1  # (the legacy exporter once produced a graph with no inputs)
    for seed in (14, 15):
        x = _fresh(seed=seed)
        with torch.no_grad():
            ye = m(x)
        assert_close(_onnx_run(str(path), x), ye, rtol=1e-5, atol=1e-5, what=f"onnxruntime seed {seed}")


# -- loud refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [{"running_var_unbiased": False}, {"nonfinite": "skip"}],
                         ids=["biased_var", "skip"])
def test_a_training_step_torch_cannot_express_refuses_capture(flags):
    m = nn.Sequential(batchnorm.BatchNorm2d(3, **flags))
    x = torch.randn(4, 3, 2, 2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match="cannot be captured"):
        torch.jit.trace(m, (x,))
    with pytest.raises(RuntimeError, match="cannot be captured"):
        torch.export.export(m, (x,))
    with pytest.raises(RuntimeError, match="cannot be captured"):
        torch.fx.symbolic_trace(m)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    m.eval()  # in eval mode the flags do not matter: capture works and matches
    traced = torch.jit.trace(m, (x,))
    assert_close(traced(x), m(x), rtol=1e-6, atol=1e-6, what="eval trace with non-torch flags")
