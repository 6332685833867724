"""Experiment 1 — convergence with and without BN, both placements (article 001), and the CNN (002).

Claim (Ioffe & Szegedy 2015, §4.2; article 001): with BN a network reaches the accuracy of its
un-normalised version in a fraction of the steps. We train article 001's MLP (300-100 ReLU) without
BN, with BN after each activation and with BN before it (bias off), and article 002's CNN with and
without BN, same data, learning rate, batch size and seeds, and record test accuracy and training
loss against the step.

Measured: the baseline's final accuracy (mean of its last 3 evaluations, per seed), the step at
which each BN model first reaches it, and that step as a fraction of the steps the *baseline*
needed to first reach the same accuracy (the strict reading of "in fewer steps"; the fraction of
the baseline's whole run is reported too).
"""

from __future__ import annotations

from typing import Any

from .common import COLORS, band, fmt_pm, new_figure, reach_ratio, summary
from .models import build
from .registry import Claim, Context, Section, experiment, verdict
from .train import TrainConfig, train

LABELS = {
    "mlp": "MLP, no BN",
    "mlp_bn_after": "MLP, BN after ReLU",
    "mlp_bn_before": "MLP, BN before ReLU",
    "cnn": "CNN, no BN",
    "cnn_bn": "CNN, conv-BN-ReLU-pool",
}


@experiment(
    "convergence",
    help="accuracy/loss vs step: MLP 300-100 without BN, BN after and before ReLU; CNN with/without BN",
    order=10,
    cost=30,
    defaults={
        "steps": 600,
        "lr": 0.05,
        "batch_size": 60,
        "eval_every": 10,
        "optimizer": "sgd",
        "cnn": True,
        "target_fraction": 1 / 3,
    },
    quick={"steps": 40, "eval_every": 10, "cnn": False},
)
def convergence(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    ds = ctx.data
    kinds = ["mlp", "mlp_bn_after", "mlp_bn_before"] + (["cnn", "cnn_bn"] if cfg["cnn"] else [])
    task = ctx.progress.task("convergence", total=len(kinds) * len(ctx.seeds) * cfg["steps"])
    runs: dict[str, list[dict[str, Any]]] = {}
    for kind in kinds:
        runs[kind] = []
        for seed in ctx.seeds:
            net = build(kind, ds.image_shape, ds.num_classes, seed=seed)
            tc = TrainConfig(
                steps=cfg["steps"],
                batch_size=cfg["batch_size"],
                lr=cfg["lr"],
                optimizer=cfg["optimizer"],
                eval_every=cfg["eval_every"],
                seed=seed,
            )
            runs[kind].append(train(net, ds, tc, advance=task.advance))
    return {"config": cfg, "seeds": list(ctx.seeds), "runs": runs}


def _pairs(result: dict[str, Any], base: str, other: str) -> list[dict[str, Any]]:
    return [reach_ratio(b, o) for b, o in zip(result["runs"][base], result["runs"][other])]


def _claim(result: dict[str, Any], base: str, others: list[str], what: str) -> Claim:
    frac = float(result["config"]["target_fraction"])
    parts, heads, numbers, ok_all, faster_any = [], [], {}, True, False
    for o in others:
        rr = _pairs(result, base, o)
        strict = [
            None
            if r["steps"] is None or not r["baseline_steps_to_target"]
            else r["steps"] / r["baseline_steps_to_target"]
            for r in rr
        ]
        reached = all(s is not None for s in strict)
        mean_strict = summary(strict)["mean"]
        ok = reached and mean_strict is not None and mean_strict <= frac
        ok_all &= ok
        faster_any |= reached and mean_strict is not None and mean_strict < 1
        numbers[o] = {
            "per_seed": rr,
            "fraction_of_baseline_steps_to_target": strict,
            "mean_fraction": mean_strict,
            "reached_all_seeds": reached,
        }
        m_steps = summary([r["steps"] for r in rr])["mean"]
        m_base = summary([r["baseline_steps_to_target"] for r in rr])["mean"]
        heads.append(f"{LABELS[o].split(', ', 1)[-1]}: step {m_steps:.0f} vs {m_base:.0f} ({mean_strict:.2f})"
                     if m_steps is not None and m_base and mean_strict is not None
                     else f"{LABELS[o].split(', ', 1)[-1]}: never reached")
        parts.append(
            f"{LABELS[o]}: reaches {fmt_pm([r['target'] for r in rr])} at step "
            f"{fmt_pm([r['steps'] for r in rr], 0)} vs the baseline's "
            f"{fmt_pm([r['baseline_steps_to_target'] for r in rr], 0)} "
            f"(fraction {fmt_pm(strict, 2)}; of the baseline's whole run: "
            f"{fmt_pm([r['ratio'] for r in rr], 2)})"
        )
    return Claim(
        claim=f"{what}: BN reaches the baseline's final accuracy in <= {frac:.2g} of the steps the "
        f"baseline needs",
        measured="; ".join(parts) + ("" if ok_all else "; a model that never reaches it counts as failing"),
        verdict=verdict(ok_all, partly=faster_any),
        numbers=numbers,
        headline="; ".join(heads),
    )


@convergence.reporter
def _report(result: dict[str, Any]) -> Section:
    runs = result["runs"]
    fig, axes = new_figure(2, 1)
    for kind, hs in runs.items():
        style = "--" if kind.startswith("cnn") else "-"
        steps = hs[0]["steps"]
        band(axes[0, 0], steps, [h["test_acc"] for h in hs], LABELS[kind], COLORS.get(kind), style)
        band(axes[0, 1], steps[1:], [h["train_loss"][1:] for h in hs], LABELS[kind], COLORS.get(kind), style)
    axes[0, 0].set(
        xlabel="training step",
        ylabel="test accuracy",
        title="Test accuracy (eval mode)",
        ylim=(max(0.0, min(min(h["test_acc"][1:] or [0]) for hs in runs.values() for h in hs) - 0.05), 1.0),
    )
    axes[0, 1].set(
        xlabel="training step",
        ylabel="training loss (mean over the interval)",
        title="Training loss",
        yscale="log",
    )
    axes[0, 0].legend(fontsize=8, loc="lower right")
    claims = [_claim(result, "mlp", ["mlp_bn_after", "mlp_bn_before"], "MLP 300-100 (article 001)")]
    if "cnn" in runs and "cnn_bn" in runs:
        claims.append(_claim(result, "cnn", ["cnn_bn"], "CNN conv-BN-ReLU-pool (article 002)"))
    finals = ", ".join(f"{LABELS[k]} {fmt_pm([h['final_test_acc'] for h in hs])}" for k, hs in runs.items())
    c = result["config"]
    text = (
        f"{len(result['seeds'])} seeds, {c['steps']} SGD steps of batch {c['batch_size']} at lr {c['lr']}. "
        f"Final test accuracy (mean ± std over seeds): {finals}. The curves show how early each BN model "
        f"passes the baseline; the table gives the steps."
    )
    return Section(
        title="1. Convergence with and without BN", text=text, figures=[("convergence", fig)], claims=claims
    )
