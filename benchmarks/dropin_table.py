"""Issue 21's table, measured: what the PyTorch ecosystem does to a BN layer, on ours.

    python benchmarks/dropin_table.py            # every row (about a minute; builds timm models)
    python benchmarks/dropin_table.py --quick    # skip the timm/torchvision rows

Each row runs the user's habit on a small model converted with ``convert_to_batchnorm`` and prints
what happened: the numbers against eager/torch where there are numbers, else the error. Nothing here
is hard-coded: a row says "ok" only when its check ran and passed.
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers for the torchvision import

import batchnorm as bn

_TORCH_BN = nn.modules.batchnorm._BatchNorm


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    ours = bn.convert_to_batchnorm(net)
    ours.train()
    ours(torch.randn(8, 3, 8, 8))
    return ours.eval()


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8)


def row_isinstance() -> str:
    m = _model()
    layers = [l for l in m.modules() if isinstance(l, bn.BatchNorm2d)]
    ok = all(isinstance(l, nn.BatchNorm2d) and isinstance(l, _TORCH_BN) for l in layers)
    from torch.optim.swa_utils import update_bn

    update_bn([_x()], m)
    nbt = int(layers[0].num_batches_tracked)
    return f"{'True' if ok else 'False'} for {len(layers)} layers; update_bn ran (nbt={nbt})"


def row_empty() -> str:
    out = []
    for mode in ("train", "eval"):
        layer = bn.BatchNorm2d(4).train(mode == "train")
        before = layer.running_mean.clone()
        x = torch.randn(0, 4, 3, 3, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        same = "same" if torch.equal(before, layer.running_mean) else "changed"
        out.append(f"{mode}: out {tuple(y.shape)}, stats {same}")
    return "; ".join(out)


def row_jit_trace() -> str:
    m = _model()
    with torch.no_grad():
        traced = torch.jit.trace(m, _x(), check_trace=False)
        fresh = _x()
        e = _err(traced(fresh), m(fresh))
    ops = {n.kind() for n in traced.inlined_graph.nodes()}
    return f"max err on fresh input {e:.1e}; aten::batch_norm in graph: {'aten::batch_norm' in ops}"


def row_onnx_legacy() -> str:
    import onnx
    import onnxruntime as ort

    m = _model()
    buf = io.BytesIO()
    torch.onnx.export(m, (_x(),), buf, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    fresh = _x()
    (y,) = sess.run(None, {sess.get_inputs()[0].name: fresh.numpy()})
    with torch.no_grad():
        e = _err(torch.from_numpy(y), m(fresh))
    ops = sorted({n.op_type for n in proto.graph.node})
    has_bn = "BatchNormalization" in ops
    return f"{len(proto.graph.input)} input(s), BatchNormalization: {has_bn}, ort err {e:.1e}"


def row_jit_script() -> str:
    m = _model()
    s = torch.jit.script(m)
    fresh = _x()
    with torch.no_grad():
        return f"scripted, max err {_err(s(fresh), m(fresh)):.1e}"


def row_timm() -> str:
    from tests.helpers.ecosystem import import_timm

    timm = import_timm()
    parts = []
    for name in ("efficientnet_b0", "mobilenetv3_small_100", "regnety_002", "densenet121"):
        model = timm.create_model(name, pretrained=False)
        total = sum(isinstance(l, _TORCH_BN) for l in model.modules())
        bn.convert_to_batchnorm(model)
        ours = sum(isinstance(l, bn.TimmBatchNormAct2d) for l in model.modules())
        parts.append(f"{ours}/{total}")
    model = timm.create_model("efficientnet_b0", pretrained=False, norm_layer=bn.timm_norm_layer())
    built = sum(isinstance(l, bn.TimmBatchNormAct2d) for l in model.modules())
    return f"converted {' / '.join(parts)}; create_model(norm_layer=timm_norm_layer()) builds {built} of ours"


def row_fx() -> str:
    m = _model()
    gm = torch.fx.symbolic_trace(m)
    fresh = _x()
    with torch.no_grad():
        return f"traced, max err {_err(gm(fresh), m(fresh)):.1e}"


def row_fuse_modules() -> str:
    from torch.ao.quantization import fuse_modules

    m = _model()
    fused = fuse_modules(copy.deepcopy(m), [["0", "1", "2"], ["3", "4", "5"]])
    fresh = _x()
    with torch.no_grad():
        e = _err(fused(fresh), m(fresh))
    return f"{type(fused[0]).__name__}, max err {e:.1e}"


def row_export() -> str:
    m = _model()
    ep = torch.export.export(m, (_x(),))
    targets = sorted({str(n.target) for n in ep.graph.nodes if n.op == "call_function"})
    ours = [t for t in targets if "batchnorm." in t]
    bnops = [t for t in targets if "batch_norm" in t and "batchnorm." not in t]
    return f"our ops in graph: {ours or 'none'}; torch BN ops: {bnops}"


def row_onnx_dynamo() -> str:
    import onnxruntime as ort

    m = _model()
    prog = torch.onnx.export(m, (_x(),), dynamo=True)
    sess = ort.InferenceSession(prog.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    fresh = _x()
    (y,) = sess.run(None, {sess.get_inputs()[0].name: fresh.numpy()})
    with torch.no_grad():
        return f"exported, ort max err {_err(torch.from_numpy(y), m(fresh)):.1e}"


def row_func() -> str:
    from torch.func import functional_call, jvp, replace_all_batch_norm_modules_, vmap

    m = copy.deepcopy(_model()).double()
    replace_all_batch_norm_modules_(m)
    xs = torch.randn(3, 2, 3, 8, 8, dtype=torch.float64)
    params = dict(m.named_parameters())
    out = vmap(lambda x: functional_call(m, params, (x,)))(xs)
    e = _err(out, torch.stack([m(x) for x in xs]))
    layer = bn.BatchNorm2d(3).double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    _, t = jvp(layer, (x,), (torch.ones_like(x),))
    return f"vmap max err {e:.1e}; jvp ran (tangent {tuple(t.shape)})"


def row_ctor() -> str:
    import numpy as np

    res = []
    for kw in ({"eps": 0}, {"momentum": 1.5}, {"num_features": np.int64(4)}):
        args = {"num_features": 4, **kw}
        ours, theirs = "ok", "ok"
        try:
            layer = bn.BatchNorm2d(**args)
            layer(torch.randn(2, 4, 2, 2))
        except Exception as e:
            ours = type(e).__name__
        try:
            layer = nn.BatchNorm2d(**args)
            layer(torch.randn(2, 4, 2, 2))
        except Exception as e:
            theirs = type(e).__name__
        k, v = next(iter(kw.items()))
        res.append(f"{k}={v!r}: ours {ours} / torch {theirs}")
    return "; ".join(res)


def row_fold_hf() -> str:
    from tests.helpers.ecosystem import import_transformers

    transformers = import_transformers()
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1],
                                    layer_type="basic", num_labels=3)

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = transformers.ResNetForImageClassification(cfg)

        def forward(self, x):
            return self.m(x).logits

    model = bn.convert_to_batchnorm(Logits()).eval()
    total = sum(isinstance(l, _TORCH_BN | bn.core.modules._BatchNorm) for l in model.modules())
    x = torch.randn(2, 3, 32, 32)
    folded = bn.fold_bn(model, example_inputs=(x,))
    left = sum(isinstance(l, _TORCH_BN | bn.core.modules._BatchNorm) for l in folded.modules())
    with torch.no_grad():
        e = _err(folded(x), model(x))
    return f"{total - left} of {total} folded, max err {e:.1e}"


ROWS: list[tuple[str, Callable[[], str], bool]] = [
    ("isinstance(m, nn.BatchNorm2d) / _BatchNorm (update_bn ...)", row_isinstance, False),
    ("an empty batch (0, C, H, W), train or eval", row_empty, False),
    ("torch.jit.trace(model) under no_grad", row_jit_trace, False),
    ("torch.onnx.export(model, dynamo=False)", row_onnx_legacy, False),
    ("torch.jit.script(model)", row_jit_script, False),
    ("timm models through convert_to_batchnorm / create_model(norm_layer=)", row_timm, True),
    ("torch.fx.symbolic_trace(model)", row_fx, False),
    ("torch.ao.quantization.fuse_modules(model, [[conv, bn, relu]])", row_fuse_modules, False),
    ("torch.export.export(model.eval(), ...)", row_export, False),
    ("torch.onnx.export(model, ...) (dynamo)", row_onnx_dynamo, False),
    ("torch.func.vmap after replace_all_batch_norm_modules_, jvp", row_func, False),
    ("constructor arguments", row_ctor, False),
    ("fold_bn on a transformers ResNet (not fx-traceable)", row_fold_hf, True),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the rows that build timm/transformers models")
    args = ap.parse_args(argv)
    print("| what the user does | now |\n|---|---|")
    for what, fn, heavy in ROWS:
        if heavy and args.quick:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = fn()
        except BaseException as e:  # a row that fails reports the failure; the table goes on
            if isinstance(e, KeyboardInterrupt):
                raise
            last = traceback.format_exception_only(type(e), e)[-1].strip().replace("\n", " ")
            result = f"FAILS: {last[:160]}"
        print(f"| {what} | {result.replace('|', '/')} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
