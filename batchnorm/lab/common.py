"""Small helpers shared by the experiments: seed aggregation, threshold crossing, plotting style.

Everything here reads plain JSON data (lists of numbers), so the report can call it on results
loaded back from ``results.json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "COLORS",
    "band",
    "final_value",
    "fmt_pm",
    "mean_spread",
    "new_figure",
    "reach_ratio",
    "steps_to_reach",
    "summary",
]

# one colour per role, used by every figure so the report reads consistently
COLORS = {
    "none": "#7f7f7f",
    "no BN": "#7f7f7f",
    "mlp": "#7f7f7f",
    "sigmoid": "#7f7f7f",
    "cnn": "#7f7f7f",
    "after": "#1f77b4",
    "mlp_bn_after": "#1f77b4",
    "before": "#d62728",
    "mlp_bn_before": "#d62728",
    "BN": "#d62728",
    "sigmoid_bn": "#d62728",
    "cnn_bn": "#9467bd",
}


def _arr(runs: Sequence[Sequence[float | None]]) -> np.ndarray:
    """Runs of possibly different length / with None -> float array padded with NaN."""
    n = max((len(r) for r in runs), default=0)
    out = np.full((len(runs), n), np.nan)
    for i, r in enumerate(runs):
        out[i, : len(r)] = [np.nan if v is None else float(v) for v in r]
    return out


def mean_spread(runs: Sequence[Sequence[float | None]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-position mean and standard deviation over seeds (NaN-aware; std 0 for one seed)."""
    a = _arr(runs)
    with np.errstate(all="ignore"):
        valid = np.isfinite(a).sum(0)
        mean = np.where(valid > 0, np.nansum(a, 0) / np.maximum(valid, 1), np.nan)
        dev = np.where(np.isfinite(a), a - mean, 0.0)
        std = np.sqrt((dev**2).sum(0) / np.maximum(valid - 1, 1))
    return mean, np.where(valid > 1, std, 0.0)


def summary(values: Sequence[float | None]) -> dict[str, float | None]:
    """``{"mean", "std", "min", "max", "n"}`` of the finite values (None where there are none)."""
    v = np.array([float(x) for x in values if x is not None and math.isfinite(float(x))])
    if v.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "n": int(v.size),
    }


def fmt_pm(values: Sequence[float | None], digits: int = 3, scale: float = 1.0, unit: str = "") -> str:
    """``"0.954 ± 0.006"`` (mean ± std over seeds) or ``"n/a"``."""
    s = summary(values)
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}{unit}"


def steps_to_reach(steps: Sequence[int], values: Sequence[float | None], target: float) -> int | None:
    """First step at which ``values`` reaches ``target`` (>=), or None if it never does."""
    for s, v in zip(steps, values):
        if v is not None and v >= target:
            return int(s)
    return None


def final_value(values: Sequence[float | None], last: int = 3) -> float | None:
    """Mean of the last ``last`` finite values (a final accuracy that one lucky evaluation cannot make)."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))][-last:]
    return sum(v) / len(v) if v else None


def reach_ratio(baseline: dict[str, Any], other: dict[str, Any], last: int = 3) -> dict[str, Any]:
    """How fast ``other`` reaches ``baseline``'s final test accuracy, from two training histories.

    ``target`` = the baseline's final accuracy (mean of its last ``last`` evaluations);
    ``steps`` = the first evaluation step at which ``other`` reaches it (None: never);
    ``ratio`` = ``steps`` / the baseline's number of training steps (None: never reached);
    ``baseline_steps_to_target`` = when the baseline itself first reached it.
    """
    target = final_value(baseline["test_acc"], last)
    total = int(baseline["steps"][-1])
    if target is None:
        return {
            "target": None,
            "steps": None,
            "ratio": None,
            "baseline_steps": total,
            "baseline_steps_to_target": None,
        }
    s = steps_to_reach(other["steps"], other["test_acc"], target)
    return {
        "target": target,
        "steps": s,
        "ratio": None if s is None else s / max(total, 1),
        "baseline_steps": total,
        "baseline_steps_to_target": steps_to_reach(baseline["steps"], baseline["test_acc"], target),
    }


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 5.2, height: float = 3.6) -> tuple[Any, Any]:
    """A matplotlib figure on the Agg backend (no display needed) with a light grid style."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    return fig, axes


def band(
    ax: Any,
    x: Sequence[float],
    runs: Sequence[Sequence[float | None]],
    label: str,
    color: str | None = None,
    style: str = "-",
) -> None:
    """Plot mean over seeds with a ± std band."""
    mean, std = mean_spread(runs)
    x = np.asarray(x[: len(mean)], dtype=float)
    mean, std = mean[: len(x)], std[: len(x)]
    n = len(runs)
    ax.plot(x, mean, style, color=color, label=f"{label}" + (f" (n={n})" if n > 1 else ""), lw=1.6)
    if n > 1:
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.18, lw=0)
