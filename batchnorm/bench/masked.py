"""Masked BN's cost: masked training (forward + backward) against plain BN on the same padded tensor.

Issue 17's goal: on ``(64, 256, 400)`` float32 with 30 % padding (random lengths, so 70 % of the
positions valid on average), masked training at most 1.5× plain training of the same layer on the
same (padded) tensor. Both run in one process, interleaved, after warm-up; medians of ``--repeat``
runs; the machine's load moves both alike, so the ratio is the number to read::

    python -m batchnorm.bench.masked            # (64, 256, 400), 15 repeats
    python -m batchnorm.bench.masked --quick    # a small shape, a smoke test

Measured on the shared 2-core machine (``--repeat 25``, load average 0.6–1.4): with the masked
kernels on torch's OpenMP team and dx streamed, 1.14× at 2 threads on a quiet moment (2.07× before,
on the Python thread pool), 1.0× while another process held a core (plain BN's team slows down
too), 1.19–1.28× at 1 thread (1.41–1.45× before).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import batchnorm

from . import compile_in_process


def _case(shape, padding: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, _, L = shape
    x = torch.randn(shape, generator=g).requires_grad_()
    # lengths uniform in [L·(1 − 2p), L] average L·(1 − p): `padding` of the positions are padding
    lo = max(0, round(L * (1 - 2 * padding)))
    lengths = torch.randint(lo, L + 1, (n,), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    dy = torch.randn(shape, generator=g)
    return x, mask, dy


def _time(fn, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run(shape=(64, 256, 400), padding: float = 0.3, repeat: int = 15, warmup: int = 3) -> dict:
    """``{"plain_ms", "masked_ms", "ratio", "backend", "valid_fraction"}`` (medians, interleaved)."""
    x, mask, dy = _case(shape, padding)
    layer = batchnorm.BatchNorm1d(shape[1])

    def plain():
        x.grad = None
        layer(x).backward(dy)

    def masked():
        x.grad = None
        layer(x, mask=mask).backward(dy)

    for _ in range(warmup):
        plain()
        masked()
    p, m = [], []
    for _ in range(repeat):  # interleaved: both see the same load
        p.append(_time(plain, 1))
        m.append(_time(masked, 1))
    plain_s, masked_s = statistics.median(p), statistics.median(m)
    return {"shape": list(shape), "padding": padding, "valid_fraction": float(mask.float().mean()),
            "backend": batchnorm.backend_for(x), "threads": torch.get_num_threads(),
            "plain_ms": plain_s * 1e3, "masked_ms": masked_s * 1e3, "ratio": masked_s / plain_s}


def main(argv=None) -> dict:
    compile_in_process()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small shape and 3 repeats (smoke test)")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run((8, 16, 50), repeat=3, warmup=1) if args.quick else run(repeat=args.repeat)
    print(f"masked BN, shape {tuple(res['shape'])}, {res['padding']:.0%} padding "
          f"(valid {res['valid_fraction']:.1%}), backend {res['backend']}, {res['threads']} threads")
    print(f"  plain BN fwd+bwd   {res['plain_ms']:8.2f} ms (median)")
    print(f"  masked BN fwd+bwd  {res['masked_ms']:8.2f} ms (median)")
    print(f"  ratio              {res['ratio']:8.2f}x   (goal <= 1.5x)")
    return res


if __name__ == "__main__":
    main()
