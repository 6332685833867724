"""The ``torch.compile`` (inductor) contender of ``batchnorm bench``'s table: what a user would try instead.

``relu(F.batch_norm(...))`` compiled with ``torch.compile(backend="inductor", dynamic=False)``, which
fuses BN and ReLU into generated C++ loops (forward and, through AOTAutograd, backward). The first
call of each compiled function (the compilation, tens of seconds) is timed apart and never mixed
into the medians; where inductor cannot run (no C++ compiler) the column says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as TF

__all__ = ["contenders"]


def _bn_relu_train(x, rm, rv, w, b):
    return torch.relu(TF.batch_norm(x, rm, rv, w, b, training=True))


def _bn_relu_eval(x, rm, rv, w, b):
    return torch.relu(TF.batch_norm(x, rm, rv, w, b, training=False))


def contenders(x: torch.Tensor, x0: torch.Tensor, w: torch.Tensor, b: torch.Tensor, rm: torch.Tensor,
               rv: torch.Tensor, dy: torch.Tensor,
               ) -> tuple[dict[str, Callable[[], Any]] | None, dict[str, Any]]:
    """``({pass: fn}, info)``: the compiled BN+ReLU for each pass of the table (train fwd, bwd, fwd+bwd,
    eval) on the same tensors as the other contenders; ``info`` has the compile times or the error
    (then the functions are None)."""
    # no donated buffers (for this benchmark process): the table's "bwd" pass runs the backward of one
    # graph again and again (retain_graph=True), which a backward compiled with donated buffers refuses
    import torch._functorch.config as aot_config

    aot_config.donated_buffer = False
    train = torch.compile(_bn_relu_train, backend="inductor", dynamic=False)
    ev = torch.compile(_bn_relu_eval, backend="inductor", dynamic=False)
    info: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        out = train(x, rm.clone(), rv.clone(), w, b)
        torch.autograd.grad(out, (x, w, b), dy)
        info["compile_train_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.no_grad():
            ev(x0, rm, rv, w, b)
        info["compile_eval_s"] = time.perf_counter() - t0
    except Exception as e:  # no C++ toolchain, an inductor limitation: report, do not fail the table
        info["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        return None, info

    def fwd():
        return train(x, rm.clone(), rv.clone(), w, b)

    def bwd_only():
        out = fwd()
        return lambda: torch.autograd.grad(out, (x, w, b), dy, retain_graph=True)

    def evaluate():
        with torch.no_grad():
            return ev(x0, rm, rv, w, b)

    return {"train fwd": fwd, "bwd": bwd_only(), "fwd+bwd": lambda: torch.autograd.grad(fwd(), (x, w, b), dy),
            "eval": evaluate}, info
