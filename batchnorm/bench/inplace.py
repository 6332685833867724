"""InPlace-ABN vs conv → BatchNorm2d → LeakyReLU: bytes saved for the backward, and step time.

The network is ``blocks`` × (``Conv2d(C, C, 3, padding=1, bias=False)`` → norm → activation) on an
``N × C × H × W`` float32 input (default 4 blocks at 32 × 64 × 56 × 56), built three ways with
the same conv weights:

* ``torch``         ``nn.BatchNorm2d`` → ``nn.LeakyReLU(0.01)`` (the baseline);
* ``iabn``          :class:`batchnorm.family.inplace.InPlaceABN2d` (leaky_relu 0.01, ``inplace=True``);
* ``iabn_copy``     the same with ``inplace=False`` (saves as little; allocates a new output);
* ``bnact``         :class:`batchnorm.BatchNormAct2d` (leaky_relu), only with ``--bnact``.

Saved bytes: one forward under :func:`torch.autograd.graph.saved_tensors_hooks`, counting the
bytes of every *unique storage* packed for the backward, parameters excluded (they are not
activations; the script prints them separately). This is deterministic. Step time: forward +
backward of ``out.backward(grad)``, interleaved between the stacks, median of ``--repeats``
(≥ 7) after ``--warmup`` runs. Goal (issue 8): ``iabn`` ≤ 0.6× the saved bytes at ≤ 1.1× the
step time of ``torch``.

    python benchmarks/inplace_bench.py             # full size
    python benchmarks/inplace_bench.py --quick     # CI smoke: tiny shape, 2 runs

``main(argv)`` returns the figures as a dict (and ``--json PATH`` writes them).

Measured (float32, default shape, median of 9, ``--repeats 9``):

    machine                                   saved bytes   step time (iabn / torch)
    2-core dev VM, shared (load avg 4)        0.417         0.84   (1.37 s vs 1.63 s)
    2-core dev VM, shared (load avg 13)       0.417         0.81   (2.55 s vs 3.16 s)
    16-core host, --threads 2                 0.417         0.87   (566 ms vs 650 ms)
    16-core host, --threads 16                0.417         1.01   (125 ms vs 124 ms)

The saved-bytes ratio is exactly (1 + B) / (1 + 3B - 1) + per-channel vectors for B blocks: the
torch stack keeps conv output, BN output and activation output per block, InPlace-ABN only the
activation output, which the next conv saves anyway. On the same host's H100 (the torch path,
see the module docs of :mod:`batchnorm.family.inplace`) the step's peak memory was 0.85× (4 blocks) and
0.61× (8 blocks) of torch's, at 2.5× its step time (no fused CUDA kernel yet).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from . import compile_in_process


def _build(kind: str, blocks: int, c: int, convs: list[nn.Conv2d]) -> nn.Sequential:
    from batchnorm import BatchNormAct2d
    from batchnorm.family.inplace import InPlaceABN2d

    layers: list[nn.Module] = []
    for i in range(blocks):
        conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        conv.load_state_dict(convs[i].state_dict())
        layers.append(conv)
        if kind == "torch":
            layers += [nn.BatchNorm2d(c), nn.LeakyReLU(0.01)]
        elif kind == "iabn":
            layers.append(InPlaceABN2d(c, activation="leaky_relu", negative_slope=0.01, inplace=True))
        elif kind == "iabn_copy":
            layers.append(InPlaceABN2d(c, activation="leaky_relu", negative_slope=0.01, inplace=False))
        elif kind == "bnact":
            layers.append(BatchNormAct2d(c, activation="leaky_relu", negative_slope=0.01))
        else:
            raise ValueError(f"inplace_bench: unknown stack {kind!r}")
    return nn.Sequential(*layers)


def saved_bytes(model: nn.Module, inp: torch.Tensor) -> tuple[int, int]:
    """``(activation_bytes, parameter_bytes)`` packed for the backward by one forward (unique storages)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(inp)
    act = sum(n for p, n in seen.items() if p not in params)
    par = sum(n for p, n in seen.items() if p in params)
    out.sum().backward()  # free the graph (and exercise the backward once)
    model.zero_grad(set_to_none=True)
    return act, par


def _step(model: nn.Module, inp: torch.Tensor, grad: torch.Tensor) -> Callable[[], float]:
    def run() -> float:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = model(inp)
        out.backward(grad)
        return time.perf_counter() - t0

    return run


def _max_diff(a: nn.Module, b: nn.Module, inp: torch.Tensor, grad: torch.Tensor) -> tuple[float, float]:
    """Max |Δ| of the outputs and relative max |Δ| of the conv weight gradients (a sanity check)."""
    outs, grads = [], []
    for m in (a, b):
        m.zero_grad(set_to_none=True)
        out = m(inp)
        out.backward(grad)
        outs.append(out.detach().clone())
        grads.append(torch.cat([p.grad.reshape(-1) for p in m.parameters() if p.ndim == 4]))
    dg = (grads[0] - grads[1]).abs().max() / grads[0].abs().max().clamp_min(1e-30)
    return float((outs[0] - outs[1]).abs().max()), float(dg)


def main(argv: Sequence[str] | None = None) -> dict:
    compile_in_process()
    ap = argparse.ArgumentParser(prog="batchnorm bench --inplace", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shape, 2 timed runs (CI smoke test)")
    ap.add_argument("--shape", type=int, nargs=4, metavar=("N", "C", "H", "W"), default=None)
    ap.add_argument("--blocks", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per stack (median; default 7)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--bnact", action="store_true", help="also run batchnorm.BatchNormAct2d")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args(argv)
    shape = args.shape or ([2, 8, 8, 8] if args.quick else [32, 64, 56, 56])
    blocks = args.blocks or (2 if args.quick else 4)
    repeats = args.repeats or (2 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    n, c, h, w = shape
    convs = [nn.Conv2d(c, c, 3, padding=1, bias=False) for _ in range(blocks)]
    kinds = ["torch", "iabn", "iabn_copy"] + (["bnact"] if args.bnact else [])
    models = {k: _build(k, blocks, c, convs) for k in kinds}
    inp = torch.randn(n, c, h, w)
    grad = torch.randn(n, c, h, w)

    from batchnorm.family.inplace import inplace_backend_for

    print(f"inplace_bench: {blocks} x (conv3x3 -> norm -> leaky_relu(0.01)), input {n}x{c}x{h}x{w} float32, "
          f"torch threads {torch.get_num_threads()}, InPlace-ABN backend {inplace_backend_for(inp)}")
    out_diff, grad_diff = _max_diff(models["torch"], models["iabn"], inp, grad)
    print(f"check iabn vs torch: max |out diff| {out_diff:.2e}, conv-grad max rel diff {grad_diff:.2e}")

    res: dict = {"shape": shape, "blocks": blocks, "repeats": repeats, "stacks": {}}
    for k, m in models.items():
        a, p = saved_bytes(m, inp)
        res["stacks"][k] = {"saved_activation_bytes": a, "saved_param_bytes": p}
    runs = {k: _step(m, inp, grad) for k, m in models.items()}
    for _ in range(warmup):
        for f in runs.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):  # interleaved, so drift and neighbours hit every stack alike
        for k, f in runs.items():
            times[k].append(f())
    for k in runs:
        res["stacks"][k]["step_ms_median"] = 1000 * statistics.median(times[k])
        res["stacks"][k]["step_ms_all"] = [1000 * t for t in times[k]]

    base = res["stacks"]["torch"]
    print(f"{'stack':<10} {'saved act MiB':>14} {'x torch':>8} {'step ms':>9} {'x torch':>8}")
    for k, r in res["stacks"].items():
        r["bytes_ratio"] = r["saved_activation_bytes"] / base["saved_activation_bytes"]
        r["time_ratio"] = r["step_ms_median"] / base["step_ms_median"]
        print(f"{k:<10} {r['saved_activation_bytes'] / 2**20:>14.2f} {r['bytes_ratio']:>8.3f} "
              f"{r['step_ms_median']:>9.1f} {r['time_ratio']:>8.3f}")
    ours = res["stacks"]["iabn"]
    print(f"saved-activation bytes ratio (iabn / torch): {ours['bytes_ratio']:.3f}  (goal <= 0.6)")
    print(f"step time ratio (iabn / torch): {ours['time_ratio']:.3f}  (goal <= 1.1; median of {repeats})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
