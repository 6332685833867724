"""Experiment 2 — Figure 1 of Ioffe & Szegedy (2015) on the lab's data.

The network: three fully connected hidden layers of 100 sigmoid units, batch 60, plain SGD, with
and without BN before each sigmoid. The paper plots (a) test accuracy against the step and (b, c)
the 15th, 50th and 85th percentiles of the input of one typical sigmoid of the last hidden layer
over training: without BN they drift (internal covariate shift), with BN they stay put.

How we measure the percentiles: at each evaluation point the whole test set is passed through the
network in *training* mode (BN normalises with that batch's statistics, as during training; the
running buffers are restored afterwards), and a forward pre-hook on the last ``nn.Sigmoid`` takes
its input, ``(n_test, 100)``; the percentiles are per unit, over the test images. (A local hook, not
:mod:`batchnorm.lifecycle.diagnostics`: that module pools all units of a layer into one distribution, and
the figure is about one unit.)

Per unit we summarise the movement by

* ``median drift``: ``max_t |p50(t) − p50(0)|`` divided by the unit's mean spread
  ``mean_t (p85(t) − p15(t))`` — how far the centre wandered, in units of its own width;
* ``spread change``: ``|log((p85 − p15)(T) / (p85 − p15)(0))|`` — how much the width changed.

Both are reported as the median over the 100 units, then mean ± std over seeds.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .common import COLORS, band, fmt_pm, new_figure, summary
from .models import build, sigmoid_layers
from .registry import Claim, Context, Section, experiment, verdict
from .train import TrainConfig, frozen_buffers, train

LABELS = {"sigmoid": "without BN", "sigmoid_bn": "with BN"}
_Q = (0.15, 0.50, 0.85)


def sigmoid_input_percentiles(model: torch.nn.Module, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """``(3, units)`` 15th/50th/85th percentiles per unit of the input of sigmoid ``layer`` on ``x``.

    The model runs in training mode (batch statistics) with its buffers restored afterwards.
    """
    target = sigmoid_layers(model)[layer]
    seen: list[torch.Tensor] = []
    handle = target.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with frozen_buffers(model), torch.no_grad():
            model(x)
    finally:
        handle.remove()
    z = seen[0].to(torch.float64)
    return torch.quantile(z, torch.tensor(_Q, dtype=torch.float64), dim=0)


def _movement(p: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-unit median drift and spread change from ``(T, 3, U)`` percentiles."""
    width = (p[:, 2] - p[:, 0]).clamp_min(1e-12)  # (T, U)
    drift = (p[:, 1] - p[0, 1]).abs().amax(0) / width.mean(0)  # (U,)
    spread = (width[-1] / width[0]).log().abs()
    return drift.tolist(), spread.tolist()


@experiment(
    "figure1",
    help="Ioffe & Szegedy Fig. 1: 3x100 sigmoid MLP, batch 60; test accuracy and the 15/50/85th "
    "percentiles of a last-layer sigmoid input over training, with and without BN",
    order=20,
    cost=9,
    defaults={
        "steps": 1000,
        "lr": 0.5,
        "batch_size": 60,
        "eval_every": 25,
        "optimizer": "sgd",
        "unit": 0,
        "stable_ratio": 0.5,
    },
    quick={"steps": 40, "eval_every": 10},
)
def figure1(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    ds = ctx.data
    task = ctx.progress.task("figure1", total=2 * len(ctx.seeds) * cfg["steps"])
    runs: dict[str, list[dict[str, Any]]] = {}
    for kind in ("sigmoid", "sigmoid_bn"):
        runs[kind] = []
        for seed in ctx.seeds:
            net = build(kind, ds.image_shape, ds.num_classes, seed=seed)
            pct: list[torch.Tensor] = []

            def on_eval(step: int, model: torch.nn.Module, pct: list[torch.Tensor] = pct) -> None:
                pct.append(sigmoid_input_percentiles(model, ds.x_test))

            tc = TrainConfig(
                steps=cfg["steps"],
                batch_size=cfg["batch_size"],
                lr=cfg["lr"],
                optimizer=cfg["optimizer"],
                eval_every=cfg["eval_every"],
                seed=seed,
            )
            h = train(net, ds, tc, advance=task.advance, on_eval=on_eval)
            p = torch.stack(pct)  # (T, 3, U)
            u = int(cfg["unit"]) % p.shape[2]
            drift, spread = _movement(p)
            h["unit"] = u
            h["unit_percentiles"] = {
                "p15": p[:, 0, u].tolist(),
                "p50": p[:, 1, u].tolist(),
                "p85": p[:, 2, u].tolist(),
            }
            h["median_drift_per_unit"] = drift
            h["spread_change_per_unit"] = spread
            h["median_drift"] = float(torch.tensor(drift).median())
            h["spread_change"] = float(torch.tensor(spread).median())
            runs[kind].append(h)
    return {"config": cfg, "seeds": list(ctx.seeds), "runs": runs}


@figure1.reporter
def _report(result: dict[str, Any]) -> Section:
    runs = result["runs"]
    cfg = result["config"]
    fig, axes = new_figure(3, 1, width=4.4)
    for kind, hs in runs.items():
        band(axes[0, 0], hs[0]["steps"], [h["test_acc"] for h in hs], LABELS[kind], COLORS[kind])
    axes[0, 0].set(xlabel="training step", ylabel="test accuracy", title="(a) test accuracy", ylim=(0, 1))
    axes[0, 0].legend(fontsize=8, loc="lower right")
    lo = min(min(runs[k][0]["unit_percentiles"]["p15"]) for k in runs)
    hi = max(max(runs[k][0]["unit_percentiles"]["p85"]) for k in runs)
    for ax, kind, tag in (
        (axes[0, 1], "sigmoid", "(b) without BN"),
        (axes[0, 2], "sigmoid_bn", "(c) with BN"),
    ):
        h = runs[kind][0]
        for key, ls in (("p85", "--"), ("p50", "-"), ("p15", "--")):
            ax.plot(
                h["steps"],
                h["unit_percentiles"][key],
                ls,
                color=COLORS[kind],
                lw=1.4,
                label=f"{key[1:]}th percentile",
            )
        ax.set(
            xlabel="training step",
            ylabel="sigmoid input",
            ylim=(lo - 0.2, hi + 0.2),
            title=f"{tag}: unit {h['unit']}, seed {result['seeds'][0]}",
        )
        if kind == "sigmoid":
            ax.legend(fontsize=8, loc="lower right")

    d = {k: [h["median_drift"] for h in hs] for k, hs in runs.items()}
    s = {k: [h["spread_change"] for h in hs] for k, hs in runs.items()}
    acc = {k: [h["final_test_acc"] for h in hs] for k, hs in runs.items()}
    md = {k: summary(v)["mean"] for k, v in d.items()}
    ms = {k: summary(v)["mean"] for k, v in s.items()}
    ratio = cfg["stable_ratio"]
    drift_ok = (
        md["sigmoid_bn"] is not None
        and md["sigmoid"] is not None
        and md["sigmoid_bn"] <= ratio * md["sigmoid"]
    )
    spread_ok = (
        ms["sigmoid_bn"] is not None
        and ms["sigmoid"] is not None
        and ms["sigmoid_bn"] <= ratio * ms["sigmoid"]
    )
    less = (md["sigmoid_bn"] or math.inf) < (md["sigmoid"] or 0) or (ms["sigmoid_bn"] or math.inf) < (
        ms["sigmoid"] or 0
    )
    claim_p = Claim(
        claim="The input distribution of a last-layer sigmoid is stable with BN and drifts without "
        f"(median drift and spread change with BN <= {ratio:g}x those without)",
        measured=(
            f"median drift (in units of the 15-85 spread, median over 100 units): with BN "
            f"{fmt_pm(d['sigmoid_bn'])}, "
            f"without {fmt_pm(d['sigmoid'])}; |log spread change|: with BN {fmt_pm(s['sigmoid_bn'])}, "
            f"without {fmt_pm(s['sigmoid'])}"
        ),
        verdict=verdict(drift_ok and spread_ok, partly=less),
        headline=(f"BN vs no BN: drift {md['sigmoid_bn'] or 0:.2f} vs {md['sigmoid'] or 0:.2f}, "
                  f"spread change {ms['sigmoid_bn'] or 0:.2f} vs {ms['sigmoid'] or 0:.2f}"),
        numbers={"median_drift": d, "spread_change": s},
    )
    a_bn, a_no = summary(acc["sigmoid_bn"])["mean"], summary(acc["sigmoid"])["mean"]
    half = [h["test_acc"][len(h["test_acc"]) // 4] for h in runs["sigmoid"]]
    half_bn = [h["test_acc"][len(h["test_acc"]) // 4] for h in runs["sigmoid_bn"]]
    q_step = runs["sigmoid"][0]["steps"][len(runs["sigmoid"][0]["steps"]) // 4]
    early_ok = (summary(half_bn)["mean"] or 0) > (summary(half)["mean"] or 0)
    claim_a = Claim(
        claim="With BN the sigmoid network trains faster and ends at least as accurate (Figure 1a)",
        measured=(
            f"test accuracy at step {q_step}: with BN {fmt_pm(half_bn)}, without {fmt_pm(half)}; "
            f"final: with BN {fmt_pm(acc['sigmoid_bn'])}, without {fmt_pm(acc['sigmoid'])}"
        ),
        verdict=verdict(
            early_ok and (a_bn or 0) >= (a_no or 0) - 0.005, partly=early_ok or (a_bn or 0) > (a_no or 0)
        ),
        headline=(f"step {q_step}: {summary(half_bn)['mean'] or 0:.3f} vs {summary(half)['mean'] or 0:.3f}; "
                  f"final {a_bn or 0:.3f} vs {a_no or 0:.3f} (BN vs no BN)"),
        numbers={
            "acc_at_quarter": {"sigmoid": half, "sigmoid_bn": half_bn},
            "final": acc,
            "quarter_step": q_step,
        },
    )
    text = (
        f"{len(result['seeds'])} seeds, {cfg['steps']} SGD steps of batch {cfg['batch_size']} at lr "
        f"{cfg['lr']}. "
        f"Panels (b) and (c) show one unit (unit {runs['sigmoid'][0]['unit']}, first seed) as in the paper; "
        f"the "
        f"drift numbers cover all 100 units of the last hidden layer and every seed."
    )
    return Section(
        title="2. Figure 1 of Ioffe & Szegedy: sigmoid network",
        text=text,
        figures=[("figure1", fig)],
        claims=[claim_p, claim_a],
    )
