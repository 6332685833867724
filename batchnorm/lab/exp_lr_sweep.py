"""Experiment 3 — learning-rate sweep: which learning rates train, with and without BN.

Claim (Ioffe & Szegedy 2015, §3.3 and §4.2.1: "Batch Normalization enables higher learning rates",
their BN-x5 / BN-x30 models): a BN network trains at learning rates far above those its
un-normalised version tolerates. We train article 001's MLP without BN and with both BN
placements over a grid of learning rates (plain SGD, same steps, batch and seeds) and call a
learning rate *trainable* when no seed diverged (non-finite or exploding loss) and the mean final
test accuracy is at least ``trains_at``. The measured number is the ratio of the largest trainable
learning rate with BN to the largest without.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import COLORS, mean_spread, new_figure
from .models import build
from .registry import Claim, Context, Section, experiment, verdict
from .train import TrainConfig, train

LABELS = {"mlp": "no BN", "mlp_bn_after": "BN after ReLU", "mlp_bn_before": "BN before ReLU"}


@experiment(
    "lr_sweep",
    help="learning-rate sweep 0.02..50 (SGD): which rates train (no divergence, accuracy >= 0.8), MLP with "
    "and without BN",
    order=30,
    cost=26,
    defaults={
        "lrs": [0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0],
        "steps": 200,
        "batch_size": 60,
        "eval_every": 50,
        "trains_at": 0.8,
        "factor": 10.0,
        "kinds": ["mlp", "mlp_bn_before", "mlp_bn_after"],
    },
    quick={"lrs": [0.1, 1.0, 10.0], "steps": 20, "eval_every": 10},
)
def lr_sweep(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    ds = ctx.data
    kinds = list(cfg["kinds"])
    if "mlp" not in kinds:
        raise ValueError("lr_sweep: kinds must include the baseline 'mlp'")
    task = ctx.progress.task("lr_sweep", total=len(kinds) * len(cfg["lrs"]) * len(ctx.seeds) * cfg["steps"])
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for kind in kinds:
        runs[kind] = {}
        for lr in cfg["lrs"]:
            out = []
            for seed in ctx.seeds:
                net = build(kind, ds.image_shape, ds.num_classes, seed=seed)
                tc = TrainConfig(
                    steps=cfg["steps"],
                    batch_size=cfg["batch_size"],
                    lr=float(lr),
                    eval_every=cfg["eval_every"],
                    seed=seed,
                )
                h = train(net, ds, tc, advance=task.advance)
                out.append(
                    {k: h[k] for k in ("steps", "test_acc", "final_test_acc", "diverged", "diverged_at")}
                )
            runs[kind][repr(float(lr))] = out
    return {"config": cfg, "seeds": list(ctx.seeds), "runs": runs}


def trainable(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per model: mean final accuracy per lr, which lrs train, and the largest that does."""
    thr = float(result["config"]["trains_at"])
    out = {}
    for kind, by_lr in result["runs"].items():
        lrs = sorted(by_lr, key=float)
        acc = {lr: float(np.mean([r["final_test_acc"] for r in by_lr[lr]])) for lr in lrs}
        div = {lr: any(r["diverged"] for r in by_lr[lr]) for lr in lrs}
        ok = [float(lr) for lr in lrs if not div[lr] and acc[lr] >= thr]
        out[kind] = {
            "mean_final_acc": {lr: acc[lr] for lr in lrs},
            "diverged": div,
            "trainable": ok,
            "max_lr": max(ok) if ok else None,
        }
    return out


@lr_sweep.reporter
def _report(result: dict[str, Any]) -> Section:
    cfg = result["config"]
    t = trainable(result)
    fig, axes = new_figure(1, 1, width=6.0, height=3.8)
    ax = axes[0, 0]
    for kind, by_lr in result["runs"].items():
        lrs = sorted(by_lr, key=float)
        x = np.array([float(v) for v in lrs])
        mean, std = mean_spread(list(zip(*[[r["final_test_acc"] for r in by_lr[lr]] for lr in lrs])))
        ax.errorbar(
            x, mean, yerr=std, marker="o", ms=4, capsize=2, color=COLORS.get(kind), label=LABELS[kind]
        )
        dv = [i for i, lr in enumerate(lrs) if t[kind]["diverged"][lr]]
        if dv:
            ax.plot(x[dv], mean[dv], "x", ms=9, mew=2, color=COLORS.get(kind))
        if t[kind]["max_lr"] is not None:
            ax.axvline(t[kind]["max_lr"], color=COLORS.get(kind), ls=":", lw=1)
    ax.axhline(cfg["trains_at"], color="k", lw=0.8, ls="--", label=f"trains: acc >= {cfg['trains_at']}")
    ax.set(
        xscale="log",
        xlabel="learning rate (SGD)",
        ylabel=f"test accuracy after {cfg['steps']} steps",
        title="Learning-rate sweep\n(x: a seed diverged; dotted: largest trainable rate)",
        ylim=(0, 1.02),
    )
    ax.legend(fontsize=8, loc="lower left")

    base = t["mlp"]["max_lr"]
    factor = float(cfg["factor"])
    parts, ratios = [], {}
    for kind in t:
        if kind == "mlp":
            continue
        m = t[kind]["max_lr"]
        ratios[kind] = None if (m is None or not base) else m / base
        parts.append(
            f"{LABELS[kind]}: largest trainable lr {m} (ratio {ratios[kind]:.3g}x)"
            if ratios[kind]
            else f"{LABELS[kind]}: largest trainable lr {m}"
        )
    vals = [r for r in ratios.values()]
    agrees = bool(vals) and all(r is not None and r >= factor for r in vals)
    partly = any(r is not None and r > 1 for r in vals)
    claim = Claim(
        claim=f"BN trains at learning rates >= {factor:g}x the largest the baseline tolerates",
        measured=f"no BN: largest trainable lr {base}; "
        + "; ".join(parts)
        + f" (grid {', '.join(f'{float(v):g}' for v in cfg['lrs'])})",
        verdict=verdict(agrees, partly=partly),
        headline=f"largest trainable lr: no BN {base}, "
        + ", ".join(f"{LABELS[k]} {t[k]['max_lr']}" + (f" ({r:.3g}x)" if r else "")
                    for k, r in ratios.items()),
        numbers={
            "max_lr": {k: v["max_lr"] for k, v in t.items()},
            "ratio": ratios,
            "mean_final_acc": {k: v["mean_final_acc"] for k, v in t.items()},
        },
    )
    text = (
        f"{len(result['seeds'])} seeds per point, {cfg['steps']} plain SGD steps of batch "
        f"{cfg['batch_size']}. "
        f"A rate counts as trainable when no seed diverged and the mean final test accuracy is >= "
        f"{cfg['trains_at']}. The grid is coarse (1-2-5 per decade), so ratios are read off it."
    )
    return Section(title="3. Learning-rate sweep", text=text, figures=[("lr_sweep", fig)], claims=[claim])
