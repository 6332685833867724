"""The background compile of masked BN's kernels (:mod:`batchnorm.kernels.masked_cpu`): the ``"masked"``
kind of :mod:`batchnorm.kernels._warmup`, run as ``python -m batchnorm.kernels._warmup_masked masked f32``.

A module of its own because the masked kernels import the dispatcher, which imports ``_warmup``: the
warm-up module names this one only in the command line it starts.
"""

from __future__ import annotations

import sys

import torch

from . import _warmup, masked_cpu, use_backend


def compile_masked(dtype: str) -> None:
    """Compile (or load) the masked forward and backward for ``dtype`` ("f32" | "f64") on tiny inputs."""
    dt = torch.float64 if dtype == "f64" else torch.float32
    x = torch.randn(4, 3, 5, dtype=dt)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[0, 3:] = False
    w, b = torch.ones(3, dtype=dt), torch.zeros(3, dtype=dt)
    with use_backend("numba"):
        y, m, v, n = masked_cpu.masked_forward(x, mask, w, b, 1e-5, 1, "relu", 0.0)
        masked_cpu.masked_backward(torch.ones_like(x), x, y, mask, n, w, b, m, v, 1e-5, 1, "relu", 0.0)


if __name__ == "__main__":
    raise SystemExit(_warmup.main(sys.argv[1:], compile_masked))
