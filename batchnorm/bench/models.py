"""``batchnorm bench --model NAME``: whole training steps and eval throughput of real networks.

For each model and memory layout (NCHW, channels-last) it times, **interleaved in one run** (the
variants take turns, rep after rep, so a noisy machine moves them alike):

* ``train step``: forward + cross-entropy + backward + ``SGD.step`` (random weights and data);
* ``eval``: images per second under ``no_grad`` in eval mode (three times as many reps);

for three variants of the same model (same weights). Speed-ups are the medians of each rep's own
ratio (torch time / variant time: > 1 is faster than torch), the order of the variants reversing
from one rep to the next;

* ``torch``   the model as built, torch's ``nn.BatchNorm2d`` (the baseline);
* ``ours``    :func:`batchnorm.fuse_residual_blocks` (BN + add + ReLU fused in every residual block),
  then :func:`batchnorm.convert_to_batchnorm` with ``fuse_activations=True`` and
  :func:`batchnorm.lifecycle.residual.fuse_sequential_activations` (BN + activation pairs inside
  Sequentials, e.g. torchvision's ``Conv2dNormActivation``);
* ``folded``  (eval only) :func:`batchnorm.fold_bn` of the torch model: BN folded into the convs.

Beside the result, the profiler's share of torch's own training step spent in batch norm, in the
activations and in the adds (the residual adds and the gradient sums autograd makes for them): the
most that fusing those can save, so the table shows the limit next to what was reached.

Models: ``resnet18``, ``resnet50`` (defined here with torchvision's layer shapes — BasicBlock/
Bottleneck, V1.5 stride placement — when torchvision cannot be imported; torchvision's own when it
can), ``efficientnet_b0`` and ``mobilenet_v3_small`` (torchvision's; skipped with a message where
torchvision does not import). Random weights, nothing is downloaded.

Usage::

    batchnorm bench --model resnet18                       # 32×3×64×64, 7 reps
    batchnorm bench --model resnet18 --model resnet50 --batch 16 --size 64
    batchnorm bench --model resnet18 --quick                # tiny, 1 rep: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import batchnorm

from . import compile_in_process

__all__ = ["MODELS", "build", "main", "run"]

MODELS = ("resnet18", "resnet50", "efficientnet_b0", "mobilenet_v3_small")


# -- ResNet with torchvision's layer shapes (used where torchvision does not import) ------------------
def _conv3x3(i: int, o: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(i, o, 3, stride, 1, bias=False)


def _conv1x1(i: int, o: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(i, o, 1, stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock`` (conv3x3 → BN → ReLU → conv3x3 → BN, + identity, ReLU)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (1x1 → 3x3 (stride, V1.5) → 1x1 ×4, + identity, ReLU)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ``ResNet`` layout: 7×7/2 stem, max-pool, four stages (64, 128, 256, 512), head."""

    def __init__(self, block: type, layers: Sequence[int], num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._stage(block, 64, layers[0], 1)
        self.layer2 = self._stage(block, 128, layers[1], 2)
        self.layer3 = self._stage(block, 256, layers[2], 2)
        self.layer4 = self._stage(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _stage(self, block: type, planes: int, blocks: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                 nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, down)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _register_local_blocks() -> None:
    register_residual_block = batchnorm.register_residual_block
    residual_block_spec = batchnorm.residual_block_spec
    register_residual_block(BasicBlock, lambda b: residual_block_spec(
        b, main=["conv1", ("bn1", "relu"), "conv2"], tail=("bn2", "relu")))
    register_residual_block(Bottleneck, lambda b: residual_block_spec(
        b, main=["conv1", ("bn1", "relu"), "conv2", ("bn2", "relu"), "conv3"], tail=("bn3", "relu")))


def _torchvision_models():
    try:
        from ._torchvision import import_torchvision

        tvm = import_torchvision().models
    except Exception as e:  # not installed, or built for another torch (its C ops fail to register)
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return tvm, ""


def build(name: str, num_classes: int = 1000) -> tuple[nn.Module, str]:
    """``(model, source)`` with random weights; source says whose definition it is. Raises LookupError
    (with the reason) where the model needs torchvision and torchvision does not import."""
    if name not in MODELS:
        raise ValueError(f"batchnorm bench: unknown model {name!r}; expected one of {', '.join(MODELS)}")
    tvm, why = _torchvision_models()
    if tvm is not None:
        return getattr(tvm, name)(weights=None, num_classes=num_classes), "torchvision"
    if name == "resnet18":
        return ResNet(BasicBlock, (2, 2, 2, 2), num_classes), "local (torchvision's shapes)"
    if name == "resnet50":
        return ResNet(Bottleneck, (3, 4, 6, 3), num_classes), "local (torchvision's shapes)"
    raise LookupError(f"{name} needs torchvision, which does not import here ({why})")


def convert(model: nn.Module) -> nn.Module:
    """The ``ours`` variant: residual blocks fused, every BN ours, BN + activation pairs fused."""
    _register_local_blocks()
    m = batchnorm.fuse_residual_blocks(copy.deepcopy(model))
    m = batchnorm.convert_to_batchnorm(m, fuse_activations=True)
    return batchnorm.fuse_sequential_activations(m)


# -- timing ------------------------------------------------------------------------------------
def _interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """``(medians, ratios)``: each function's median seconds, and the median over reps of the first
    function's time in that rep divided by each one's (> 1: faster than the first). The functions
    take turns within every rep, in an order rotated by one from rep to rep, so that each runs in
    each position equally often (a model that runs right after itself finds its weights in cache;
    with three variants a reversed order gave the outer two that edge and the middle one none:
    ours measured 0.96x in eval against 1.00x rotated); a per-rep ratio cancels a slow spell of a
    shared machine, which hits every function of the rep alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(reps):
        for k in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    first = times[names[0]]
    ratios = {k: statistics.median(a / b for a, b in zip(first, v)) for k, v in times.items()}
    return {k: statistics.median(v) for k, v in times.items()}, ratios


_BN_OPS = ("batch_norm",)
_ACT_OPS = ("relu", "threshold_backward", "silu", "hardswish", "sigmoid", "gelu", "tanh", "elu", "clamp_min")
_ADD_OPS = ("aten::add", "aten::add_")


def _profile_shares(step: Callable[[], Any]) -> dict[str, float]:
    """Shares of torch's training step (forward + backward, self CPU time) in BN, activations, adds."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    total = bn = act = add = 0.0
    for e in prof.key_averages():
        t = e.self_cpu_time_total
        total += t
        name = e.key
        if any(s in name for s in _BN_OPS):
            bn += t
        elif any(s in name for s in _ACT_OPS):
            act += t
        elif name in _ADD_OPS:
            add += t
    total = max(total, 1e-9)
    return {"bn": bn / total, "act": act / total, "add": add / total}


def _case(name: str, fmt: str, batch: int, size: int, reps: int, warmup: int) -> dict[str, Any]:
    torch.manual_seed(0)
    ref, source = build(name)
    mf = torch.channels_last if fmt == "nhwc" else torch.contiguous_format
    ref = ref.to(memory_format=mf)
    ours = convert(ref).to(memory_format=mf)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=mf)
    target = torch.randint(0, 1000, (batch,))
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in (("torch", ref),
                                                                                      ("ours", ours))}
    models = {"torch": ref, "ours": ours}
    with torch.no_grad():  # same weights and statistics now: the converted model must give the same numbers
        out_ref, out_ours = ref.eval()(x), ours.eval()(x)
        err = float((out_ours - out_ref).abs().max() / out_ref.abs().max().clamp_min(1e-12))

    def train_step(k: str) -> Callable[[], None]:
        m, opt = models[k], opts[k]

        def f() -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(x), target).backward()
            opt.step()
        return f

    def fwd_bwd() -> None:
        ref.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(ref(x), target).backward()

    for m in models.values():
        m.train()
    t0 = time.perf_counter()
    train_step("ours")()  # first use (kernel compile or cache load), reported apart
    first = time.perf_counter() - t0
    train, train_ratio = _interleaved({k: train_step(k) for k in models}, reps, warmup)
    shares = _profile_shares(fwd_bwd)
    for m in models.values():
        m.eval()
    folded = batchnorm.fold_bn(ref)
    evals = {"torch": ref, "ours": ours, "folded": folded}
    with torch.no_grad():
        # (an eval pass costs a fraction of a step, and its ratios scatter more: three times the reps)
        ev, ev_ratio = _interleaved({k: (lambda m=m: m(x)) for k, m in evals.items()}, 3 * reps, warmup)
    return {"model": name, "source": source, "layout": fmt, "batch": batch, "size": size,
            "train_ms": {k: 1e3 * v for k, v in train.items()},
            "train_speedup": train_ratio["ours"],
            "eval_img_s": {k: batch / v for k, v in ev.items()},
            "eval_speedup": {k: ev_ratio[k] for k in ("ours", "folded")},
            "torch_shares": shares, "first_step_s": first, "eval_rel_err": err}


def run(names: Sequence[str], batch: int, size: int, reps: int, warmup: int) -> dict[str, Any]:
    rows, skipped = [], {}
    for name in names:
        for fmt in ("nchw", "nhwc"):
            try:
                rows.append(_case(name, fmt, batch, size, reps, warmup))
            except LookupError as e:
                skipped[name] = str(e)
                break
    return {"rows": rows, "skipped": skipped,
            "meta": {"reps": reps, "warmup": warmup, "threads": torch.get_num_threads(),
                     "torch": torch.__version__}}


def _print(result: dict[str, Any]) -> None:
    m = result["meta"]
    print(f"Whole training steps (fwd + cross-entropy + bwd + SGD) and eval, medians of {m['reps']} "
          f"interleaved runs (speed-ups: medians of the runs' own torch/variant ratios), {m['threads']} "
          f"threads, torch {m['torch']}")
    head = (f"{'model':<20}{'layout':<7}{'torch ms':>9}{'ours ms':>9}{'speed-up':>9}  "
            f"{'BN%':>5}{'act%':>6}{'add%':>6}  {'eval img/s torch':>17}{'ours':>8}{'folded':>8}"
            f"{'ours×':>7}{'fold×':>7}  first s")
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        s, t, e = r["torch_shares"], r["train_ms"], r["eval_img_s"]
        print(f"{r['model']:<20}{r['layout']:<7}{t['torch']:>9.1f}{t['ours']:>9.1f}"
              f"{r['train_speedup']:>8.2f}x  "
              f"{100 * s['bn']:>5.1f}{100 * s['act']:>6.1f}{100 * s['add']:>6.1f}  {e['torch']:>17.0f}"
              f"{e['ours']:>8.0f}{e['folded']:>8.0f}{r['eval_speedup']['ours']:>7.2f}"
              f"{r['eval_speedup']['folded']:>7.2f}  {r['first_step_s']:.1f}")
    for r in result["rows"][:1]:
        print(f"(input {r['batch']}x3x{r['size']}x{r['size']}; model definition: {r['source']}; "
              f"BN%/act%/add%: share of torch's fwd+bwd self CPU time in those ops, the most fusing saves)")
    for name, why in result["skipped"].items():
        print(f"skipped {name}: {why}")


def main(argv: Sequence[str] | None = None) -> int:
    """``batchnorm bench --model NAME [--model NAME ...] [--batch B] [--size S] [--quick] [--json PATH]``."""
    compile_in_process()
    p = argparse.ArgumentParser(prog="batchnorm bench --model", description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", required=True, choices=MODELS)
    p.add_argument("--batch", type=int, default=None, help="images per step (default 32; quick 2)")
    p.add_argument("--size", type=int, default=None, help="image side (default 64; quick 32)")
    p.add_argument("--reps", type=int, default=None, help="timed runs (default 7; quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 2; quick 0)")
    p.add_argument("--quick", action="store_true", help="tiny input, one run: a smoke test")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", metavar="PATH", default=None)
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    batch = args.batch or (2 if args.quick else 32)
    size = args.size or (32 if args.quick else 64)
    reps = args.reps if args.reps is not None else (1 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 2)
    if batch < 2 or size < 32 or reps < 1 or warmup < 0:
        p.error(f"need --batch >= 2, --size >= 32, --reps >= 1, --warmup >= 0; got {batch}, {size}, {reps}, "
                f"{warmup}")
    result = run(args.model, batch, size, reps, warmup)
    _print(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
