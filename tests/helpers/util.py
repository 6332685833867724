"""Shared test helpers: one assert_close whose failure says how far off and where."""

from __future__ import annotations

import numpy as np
import torch


def to_np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().to(torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


def assert_close(actual, expected, *, rtol: float = 1e-10, atol: float = 1e-10, what: str = "") -> None:
    """Elementwise |actual - expected| <= atol + rtol*|expected|; failures give max abs/rel error, where."""
    a, e = to_np(actual), to_np(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {a.shape} != expected {e.shape}")
    a, e = np.atleast_1d(a), np.atleast_1d(e)
    if not (np.isfinite(a) == np.isfinite(e)).all() or not (a[~np.isfinite(a)] == e[~np.isfinite(e)]).all():
        raise AssertionError(f"{what}: non-finite values differ")
    fin = np.isfinite(e)
    err = np.abs(np.where(fin, a, 0.0) - np.where(fin, e, 0.0))
    bound = atol + rtol * np.abs(np.where(fin, e, 0))
    bad = err > bound
    if bad.any():
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        rel = err / np.maximum(np.abs(e), 1e-300)
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{err.size} elements off; max abs err {err.max():.3e}, "
            f"max rel err {np.max(np.where(fin, rel, 0)):.3e}; worst at {tuple(int(k) for k in i)}: "
            f"got {a[i]!r}, expected {e[i]!r} (atol={atol}, rtol={rtol})"
        )
