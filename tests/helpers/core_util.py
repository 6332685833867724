"""Helpers shared by the tests of the exact core (tests/test_core_*.py).

* :func:`snapshot` / :func:`assert_state_unchanged` — bit-for-bit comparison of a module's
  parameters and buffers (``num_batches_tracked`` included) before and after a call;
* :func:`ref_eval_backward` — the float64 oracle of the eval-mode backward (statistics constant),
  which :mod:`batchnorm.reference` does not spell out because it is one line of the chain rule;
* :func:`to_layout` / :func:`from_layout` — move a channels-first tensor to a test layout and back.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from batchnorm import reference as R


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` (NaN-safe, sign-of-zero-safe bitwise comparison)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def tensors_bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer (as in ``state_dict``), to compare bit for bit later."""
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}


def assert_state_unchanged(before: dict[str, torch.Tensor], module: torch.nn.Module, what: str = "") -> None:
    after = module.state_dict(keep_vars=True)
    assert set(after) == set(before), f"{what}: state keys changed {set(before)} -> {set(after)}"
    for k, v in before.items():
        assert tensors_bit_equal(v, after[k]), f"{what}: {k} changed: {v} -> {after[k]}"


def ref_eval_backward(dy, x, mean, var, weight, bias, eps, channel_axis=1, act="identity", slope=0.01):
    """float64 oracle of the eval backward: ``dz = dy·act'(z)``, ``dx = dz·γ/sqrt(var+ε)``,
    ``dγ = Σ dz·x̂``, ``dβ = Σ dz`` (statistics are constants). Returns ``(dx, dweight, dbias)``."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    nd = x.ndim
    ax = channel_axis % nd
    c = np.size(mean)
    shp = [1] * nd
    shp[ax] = c
    axes = tuple(a for a in range(nd) if a != ax)
    invstd = 1.0 / np.sqrt(np.asarray(var, np.float64) + eps)
    xhat = (x - np.reshape(mean, shp)) * invstd.reshape(shp)
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    b = np.zeros(c) if bias is None else np.asarray(bias, np.float64)
    z = xhat * w.reshape(shp) + b.reshape(shp)
    dz = dy * R.activation_grad(z, act, slope)
    return dz * (w * invstd).reshape(shp), (dz * xhat).sum(axis=axes), dz.sum(axis=axes)


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``"nchw"``: as is; ``"channels_last"``: same logical tensor in channels-last memory format;
    ``"nhwc"``: channels moved to the last axis (a logically channels-last tensor)."""
    if layout == "nchw":
        return x.contiguous()
    if layout == "channels_last":
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[x.ndim]
        return x.contiguous(memory_format=fmt)
    if layout == "nhwc":
        return x.movedim(1, -1).contiguous()
    raise ValueError(layout)


def from_layout(y: torch.Tensor, layout: str) -> torch.Tensor:
    return y.movedim(-1, 1) if layout == "nhwc" else y


def np64(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().to(torch.float64).numpy()
    return np.asarray(t, np.float64)


def assert_empty_batch_changes_nothing(layer: torch.nn.Module, shape: tuple[int, ...]) -> None:
    """An empty batch: an empty output, an empty dx, zero dγ/dβ, every buffer and parameter unchanged
    (num_batches_tracked included)."""
    state = copy.deepcopy(layer.state_dict())
    params = [p.detach().clone() for p in layer.parameters()]
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for p in layer.parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
    after = layer.state_dict()
    assert state.keys() == after.keys()
    for k, v in state.items():
        assert torch.equal(v, after[k]), k
    for p0, p in zip(params, layer.parameters()):
        assert torch.equal(p0, p)
