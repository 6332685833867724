"""Real model definitions (torchvision, timm, transformers ResNet) through convert_to_batchnorm.

Random weights, no downloads. Each model is built twice from one seed: the torch copy stays as built,
the other is converted; both then see the same data. Parity runs in float64 so that a deep network's
rounding does not hide a real difference (our float64 kernels against torch's float64 BN). Inputs are
small (2 x 3 x 32 x 32) to keep the module fast on 2 cores; the expensive checks (compile, export,
ONNX) run on one model each.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import batchnorm as bn
from batchnorm.core.modules import _BatchNorm
from tests.helpers.ecosystem import import_timm, import_torchvision, import_transformers
from tests.helpers.util import assert_close

_TORCH_BN = nn.modules.batchnorm._BatchNorm


def _tv(name):
    def build():
        tv = import_torchvision()
        return getattr(tv.models, name)(num_classes=10)
    return build


def _timm(name):
    def build():
        timm = import_timm()
        return timm.create_model(name, pretrained=False, num_classes=10)
    return build


def _hf_resnet():
    transformers = import_transformers()
    cfg = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 24, 32, 48], depths=[1, 1, 1, 1],
                                    layer_type="basic", num_labels=10)
    return transformers.ResNetForImageClassification(cfg)


MODELS = {
    "tv_resnet18": _tv("resnet18"),
    "tv_mobilenet_v3_small": _tv("mobilenet_v3_small"),
    "tv_efficientnet_b0": _tv("efficientnet_b0"),
    "tv_regnet_y_400mf": _tv("regnet_y_400mf"),
    "tv_densenet121": _tv("densenet121"),
    "timm_resnet18": _timm("resnet18"),
    "timm_efficientnet_b0": _timm("efficientnet_b0"),
    "timm_mobilenetv3_small_100": _timm("mobilenetv3_small_100"),
    "hf_resnet": _hf_resnet,
}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _pair(name, dtype=torch.float64):
    torch.manual_seed(0)
    ref = MODELS[name]().to(dtype)
    ours = bn.convert_to_batchnorm(copy.deepcopy(ref))
    return ref, ours


class _Logits(nn.Module):
    """A transformers model as a tensor -> tensor module (what fold_bn can verify on example inputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _logits(self.model(x))


def _n_bn(model):
    return sum(isinstance(m, _TORCH_BN) for m in model.modules())


def _n_ours(model):
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def _n_torch_only(model):
    return sum(isinstance(m, _TORCH_BN) and not isinstance(m, _BatchNorm) for m in model.modules())


# Train parity on the cheaper models (the whole zoo takes minutes on 2 cores); every model is converted
# and checked in eval by test_zoo_converts_every_bn_layer.
PARITY = ["tv_resnet18", "hf_resnet"]


def _close_scaled(a, b, rel, what):
    # random-init networks reach logits of 1e10 and more in eval: compare relative to the largest
    assert_close(a, b, rtol=rel, atol=rel * float(b.abs().max()), what=what)


@pytest.mark.parametrize("name", list(MODELS))
def test_zoo_converts_every_bn_layer(name):
    ref, ours = _pair(name, torch.float32)
    n = _n_bn(ref)
    assert n > 0 and _n_ours(ours) == n and _n_torch_only(ours) == 0, f"{name}: not every BN was converted"
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    ref.eval()
    ours.eval()
    with torch.no_grad():
        _close_scaled(_logits(ours(x)), _logits(ref(x)), 1e-4, f"{name} eval")


@pytest.mark.parametrize("name", PARITY)
def test_zoo_train_eval_parity_and_state_dict(name):
    ref, ours = _pair(name)
    n = _n_bn(ref)
    assert n > 0 and _n_ours(ours) == n and _n_torch_only(ours) == 0, f"{name}: not every BN was converted"
    assert list(ours.state_dict()) == list(ref.state_dict())
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.01)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    fresh = copy.deepcopy(ref).eval()
    for step in range(2):
        x = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64)
        target = torch.randint(0, 10, (4,), generator=g)
        losses = []
        for model, opt in ((ref, opt_r), (ours, opt_o)):
            model.train()
            torch.manual_seed(step)  # the same dropout / stochastic-depth masks for both models
            opt.zero_grad()
            loss = nn.functional.cross_entropy(_logits(model(x)), target)
            loss.backward()
            opt.step()
            losses.append(loss)
        assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-9, what=f"{name} loss at step {step}")
    for (k, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        # batch-2 statistics of 1x1 feature maps amplify float64 rounding: compare at 1e-6, not 1e-9
        assert_close(b, a, rtol=1e-3, atol=1e-5, what=f"{name} {k} after 2 SGD steps")
    ref.eval()
    ours.eval()
    x = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    with torch.no_grad():
        _close_scaled(_logits(ours(x)), _logits(ref(x)), 1e-7, f"{name} eval")
    # state_dict both ways: a torch model's into ours, ours into a fresh torch model
    ours2 = bn.convert_to_batchnorm(copy.deepcopy(fresh)).eval()
    fresh.load_state_dict(ours.state_dict())
    ours2.load_state_dict(ref.state_dict())
    with torch.no_grad():
        _close_scaled(_logits(fresh(x)), _logits(ref(x)), 1e-7, f"{name} ours -> torch")
        _close_scaled(_logits(ours2(x)), _logits(ref(x)), 1e-7, f"{name} torch -> ours")


@pytest.mark.parametrize("name", ["tv_mobilenet_v3_small", "timm_mobilenetv3_small_100", "hf_resnet"])
def test_zoo_deepcopy_pickle_channels_last(name):
    ref, ours = _pair(name, torch.float32)
    ref.eval()
    ours.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = _logits(ref(x))
        for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
            assert_close(_logits(clone(x)), want, rtol=1e-4, atol=1e-5, what=f"{name} copy")
        buf = io.BytesIO()
        torch.save(ours, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert _n_ours(loaded) == _n_bn(ref)
        assert_close(_logits(loaded(x)), want, rtol=1e-4, atol=1e-5, what=f"{name} torch.save/load")
        cl = copy.deepcopy(ours).to(memory_format=torch.channels_last)
        xc = x.to(memory_format=torch.channels_last)
        assert_close(_logits(cl(xc)), want, rtol=1e-4, atol=1e-5, what=f"{name} channels_last")


def test_zoo_train_parity_channels_last():
    ref, ours = _pair("tv_resnet18")
    ref = ref.to(memory_format=torch.channels_last).train()
    ours = ours.to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64).to(memory_format=torch.channels_last)
    yr, yo = ref(x), ours(x)
    assert_close(yo, yr, rtol=1e-9, atol=1e-9, what="channels_last train forward")
    yr.square().sum().backward()
    yo.square().sum().backward()
    for (k, p), q in zip(ref.named_parameters(), ours.parameters()):
        _close_scaled(q.grad, p.grad, 1e-6, f"channels_last grad {k}")


def test_zoo_autocast_bf16():
    ref, ours = _pair("timm_resnet18", torch.float32)
    x = torch.randn(4, 3, 32, 32)
    for mode in ("train", "eval"):
        getattr(ref, mode)()
        getattr(ours, mode)()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            yr, yo = ref(x), ours(x)
        assert yo.dtype == yr.dtype
        # bf16 convolutions: the two runs differ only by where BN rounds (bf16 has 8 bits of mantissa)
        err = (yo.float() - yr.float()).abs().max() / yr.float().abs().max()
        assert err < 0.05, f"autocast bf16 {mode}: relative max error {err:.3g}"


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_zoo_compile_fullgraph():
    ref, ours = _pair("hf_resnet", torch.float32)
    ours.train()
    ref.train()
    # aot_eager: the whole graph captured with our custom ops, without inductor's minutes of codegen on 2
    # cores (tests/core/test_core_compile.py covers inductor)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    assert_close(_logits(compiled(x)), _logits(ref(x)), rtol=1e-4, atol=1e-4, what="compile train")
    for a, b in zip(ref.buffers(), ours.buffers()):
        assert_close(b, a, rtol=1e-5, atol=1e-6, what="compile running stats")


# transformers' ResNet: fx cannot trace it, fold_bn finds the pairs from a recorded run;
# timm's MobileNetV3: BN + act layers whose Hardswish must survive the fold
@pytest.mark.parametrize("name", ["tv_resnet18", "timm_resnet18", "hf_resnet", "timm_mobilenetv3_small_100"])
def test_zoo_fold(name):
    _, ours = _pair(name, torch.float64)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    ours.train()
    ours(x)  # non-trivial running statistics
    ours.eval()
    with torch.no_grad():
        want = _logits(ours(x))
        # transformers' ResNet: torch.fx cannot trace it, so fold_bn must find the pairs from a run
        folded = bn.fold_bn(_Logits(copy.deepcopy(ours)), example_inputs=(x,)) if "hf" in name else \
            bn.fold_bn(copy.deepcopy(ours))
        assert_close(_logits(folded(x)), want, rtol=1e-9, atol=1e-9, what=f"{name} folded")
    left = sum(isinstance(m, _TORCH_BN | _BatchNorm) for m in folded.modules())
    assert left == 0, f"{name}: {left} BN layers left after fold_bn"


# export + ONNX Runtime on real models: torchvision's ResNet-18 (BN -> ReLU, residual adds) and timm's
# MobileNetV3 (its BatchNormAct2d layers, converted to ours, with Hardswish). Both ONNX exporters must
# emit standard ONNX ops only, and the runtime must reproduce eager on a fresh input.
@pytest.mark.filterwarnings("ignore")  # the exporters' deprecation and progress chatter
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", ["tv_resnet18", "timm_mobilenetv3_small_100"])
def test_zoo_export_runs_in_onnxruntime_like_eager(name, dynamo):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    _, ours = _pair(name, torch.float32)
    g = torch.Generator().manual_seed(3)
    ours.train()
    with torch.no_grad():
        ours(torch.randn(4, 3, 32, 32, generator=g))  # non-trivial running statistics
    ours.eval()
    x = torch.randn(2, 3, 32, 32, generator=g)
    if dynamo:
        ep = torch.export.export(ours, (x,))
        targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
        assert not [t for t in targets if "batchnorm" in t.split(".")[0]], targets
        assert any("batch_norm" in t for t in targets), targets
        proto = torch.onnx.export(ours, (x,), dynamo=True).model_proto
    else:
        buf = io.BytesIO()
        torch.onnx.export(ours, (x,), buf, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}})
        proto = onnx.load_from_string(buf.getvalue())
    domains = {n.domain for n in proto.graph.node}
    assert domains <= {"", "ai.onnx"}, f"{name}: non-standard ONNX domains {domains}"
    assert len(proto.graph.input) == 1
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    fresh = torch.randn(2, 3, 32, 32, generator=g)
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: fresh.numpy()})[0])
    with torch.no_grad():
        want = ours(fresh)
    _close_scaled(got, want, 1e-5, f"{name} onnxruntime ({'dynamo' if dynamo else 'torchscript'})")
