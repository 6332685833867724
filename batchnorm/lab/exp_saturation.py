"""Experiment 4 — sigmoid saturation with shifted pre-activations (article 004's "mean −6" example).

Article 004: if a sigmoid unit's input ``x = Wu + b`` is distributed around −6, 95 % of it lies in
[−8, −4] where σ(x) ≈ 0 and σ'(x) ≈ 0: the unit is saturated, gradients vanish, training stalls.
BN pulls the input back to mean 0, variance 1 (then γ, β), into the region where σ is nearly linear
and σ' is large.

We take the Figure-1 network (3 × 100 sigmoid units) and add a fixed constant ``shift`` to every
hidden pre-activation (:class:`batchnorm.lab.models.Shift`, between the Linear and the BN/sigmoid),
with and without BN, and the same two networks unshifted as controls. At each evaluation point,
on a fixed probe batch of training images in training mode (buffers restored afterwards):

* the fraction of saturated units per layer, from :class:`batchnorm.lifecycle.diagnostics.BNDiagnostics`
  (``|z| > threshold`` on the sigmoid input; threshold 4 by default: σ'(4) ≈ 0.018, 7 % of σ'(0));
* the gradient norm ``‖∂L/∂W_l‖`` of each Linear layer's weight (``torch.autograd.grad``, so the
  optimiser's gradients are untouched).

"Trains" means a final test accuracy >= ``trains_at``; "stalls" means the test accuracy rose by
less than ``stall_gain`` over the whole run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from batchnorm.lifecycle.diagnostics import BNDiagnostics, Watch

from .common import COLORS, band, fmt_pm, new_figure, summary
from .models import build
from .registry import Claim, Context, Section, experiment, verdict
from .train import TrainConfig, frozen_buffers, train


def probe_saturation_and_grads(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, threshold: float = 4.0
) -> dict[str, list[float]]:
    """Per sigmoid layer: saturated fraction and percentiles of its input; per Linear: weight-gradient norm.

    Runs one forward/backward on ``(x, y)`` in training mode (batch statistics, buffers restored).
    """
    sig = [n for n, m in model.named_modules() if isinstance(m, nn.Sigmoid)]
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with (
        frozen_buffers(model),
        BNDiagnostics(model, watch={n: Watch("sigmoid", threshold) for n in sig}) as diag,
    ):
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, [m.weight for m in lin])
    rep = diag.report()
    return {
        "saturation": [rep.watch(n).records[-1].saturation for n in sig],
        "mean_input": [rep.watch(n).records[-1].mean for n in sig],
        "grad_norm": [float(g.norm()) for g in grads],
    }


def _key(kind: str, shift: float) -> str:
    return f"{kind}@{shift:g}"


@experiment(
    "saturation",
    help="article 004: sigmoid MLP with pre-activations shifted to mean -6: saturated fraction, per-layer "
    "gradient norms and accuracy, with and without BN",
    order=40,
    cost=11,
    defaults={
        "shift": -6.0,
        "steps": 500,
        "lr": 0.5,
        "batch_size": 60,
        "eval_every": 25,
        "threshold": 4.0,
        "probe": 256,
        "trains_at": 0.8,
        "stall_gain": 0.1,
    },
    quick={"steps": 30, "eval_every": 10, "probe": 64},
)
def saturation(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    ds = ctx.data
    configs = [(k, s) for s in (float(cfg["shift"]), 0.0) for k in ("sigmoid", "sigmoid_bn")]
    task = ctx.progress.task("saturation", total=len(configs) * len(ctx.seeds) * cfg["steps"])
    n_probe = min(int(cfg["probe"]), int(ds.x_train.shape[0]))
    xp, yp = ds.x_train[:n_probe], ds.y_train[:n_probe]
    runs: dict[str, list[dict[str, Any]]] = {}
    for kind, shift in configs:
        key = _key(kind, shift)
        runs[key] = []
        for seed in ctx.seeds:
            net = build(kind, ds.image_shape, ds.num_classes, seed=seed, shift=shift)
            probes: list[dict[str, list[float]]] = []

            def on_eval(step: int, model: nn.Module, probes: list = probes) -> None:
                probes.append(probe_saturation_and_grads(model, xp, yp, float(cfg["threshold"])))

            tc = TrainConfig(
                steps=cfg["steps"],
                batch_size=cfg["batch_size"],
                lr=cfg["lr"],
                eval_every=cfg["eval_every"],
                seed=seed,
            )
            h = train(net, ds, tc, advance=task.advance, on_eval=on_eval)
            for field in ("saturation", "mean_input", "grad_norm"):
                h[field] = [p[field] for p in probes]  # (evals, layers)
            runs[key].append(h)
    return {"config": cfg, "seeds": list(ctx.seeds), "runs": runs}


@saturation.reporter
def _report(result: dict[str, Any]) -> Section:
    cfg = result["config"]
    runs = result["runs"]
    shift = float(cfg["shift"])
    label = {
        _key("sigmoid", shift): f"no BN, shift {shift:g}",
        _key("sigmoid_bn", shift): f"BN, shift {shift:g}",
        _key("sigmoid", 0.0): "no BN, no shift",
        _key("sigmoid_bn", 0.0): "BN, no shift",
    }
    color = {k: COLORS["sigmoid_bn" if k.startswith("sigmoid_bn") else "sigmoid"] for k in runs}
    style = {k: "-" if k.endswith(f"@{shift:g}") else ":" for k in runs}
    fig, axes = new_figure(2, 2, width=5.0, height=3.4)
    for k, hs in runs.items():
        steps = hs[0]["steps"]
        band(axes[0, 0], steps, [h["test_acc"] for h in hs], label[k], color[k], style[k])
        band(
            axes[0, 1],
            steps,
            [[sum(v) / len(v) for v in h["saturation"]] for h in hs],
            label[k],
            color[k],
            style[k],
        )
        band(axes[1, 1], steps, [[g[0] for g in h["grad_norm"]] for h in hs], label[k], color[k], style[k])
    axes[0, 0].set(xlabel="training step", ylabel="test accuracy", title="(a) test accuracy", ylim=(0, 1))
    axes[0, 0].legend(fontsize=7, loc="center right")
    axes[0, 1].set(
        xlabel="training step",
        ylabel=f"fraction with |z| > {cfg['threshold']:g}",
        title="(b) saturated sigmoid inputs (mean of 3 layers)",
        ylim=(-0.02, 1.02),
    )
    axes[1, 1].set(
        xlabel="training step",
        ylabel="||dL/dW1||",
        yscale="log",
        title="(d) first-layer weight-gradient norm",
    )
    ax = axes[1, 0]
    n_layers = len(next(iter(runs.values()))[0]["grad_norm"][0])
    width = 0.2
    for i, (k, hs) in enumerate(runs.items()):
        g0 = [summary([h["grad_norm"][0][layer] for h in hs])["mean"] for layer in range(n_layers)]
        ax.bar(
            [layer + (i - 1.5) * width for layer in range(n_layers)],
            g0,
            width,
            color=color[k],
            alpha=1.0 if style[k] == "-" else 0.45,
            hatch=None if style[k] == "-" else "//",
            label=label[k],
        )
    ax.set(
        yscale="log",
        xticks=range(n_layers),
        xticklabels=[f"W{i + 1}" for i in range(n_layers)],
        ylabel="||dL/dW|| at step 0",
        title="(c) per-layer gradient norms at initialisation",
    )
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.12))

    s_bn, s_no = runs[_key("sigmoid_bn", shift)], runs[_key("sigmoid", shift)]
    acc_bn = [h["final_test_acc"] for h in s_bn]
    acc_no = [h["final_test_acc"] for h in s_no]
    gain_no = [h["test_acc"][-1] - h["test_acc"][0] for h in s_no]
    sat0 = {k: [sum(h["saturation"][0]) / len(h["saturation"][0]) for h in hs] for k, hs in runs.items()}
    satT = {k: [sum(h["saturation"][-1]) / len(h["saturation"][-1]) for h in hs] for k, hs in runs.items()}
    g1 = {k: [h["grad_norm"][0][0] for h in hs] for k, hs in runs.items()}
    bn_trains = (summary(acc_bn)["mean"] or 0) >= float(cfg["trains_at"])
    no_stalls = (summary(gain_no)["max"] if gain_no else 1) < float(cfg["stall_gain"])
    better = (summary(acc_bn)["mean"] or 0) > (summary(acc_no)["mean"] or 0) + float(cfg["stall_gain"])
    k_bn, k_no = _key("sigmoid_bn", shift), _key("sigmoid", shift)
    claim = Claim(
        claim=f"With pre-activations shifted to mean {shift:g}, the sigmoid network trains with BN and "
              f"stalls "
        f"without",
        measured=(
            f"final test accuracy with BN {fmt_pm(acc_bn)}, without {fmt_pm(acc_no)} (gain over the run "
            f"{fmt_pm(gain_no)}); saturated fraction at step 0 / at the end: with BN "
            f"{fmt_pm(sat0[k_bn], 2)} / {fmt_pm(satT[k_bn], 2)}, without {fmt_pm(sat0[k_no], 2)} / "
            f"{fmt_pm(satT[k_no], 2)}; ||dL/dW1|| at step 0: with BN {_sci(g1[k_bn])}, without "
            f"{_sci(g1[k_no])}"
        ),
        verdict=verdict(bn_trains and no_stalls, partly=better),
        headline=(
            f"final acc BN {summary(acc_bn)['mean'] or 0:.3f} vs no BN {summary(acc_no)['mean'] or 0:.3f}; "
            f"saturated at start {summary(sat0[k_bn])['mean'] or 0:.0%} vs "
            f"{summary(sat0[k_no])['mean'] or 0:.0%}"
        ),
        numbers={
            "final_acc": {k: [h["final_test_acc"] for h in hs] for k, hs in runs.items()},
            "saturation_start": sat0,
            "saturation_end": satT,
            "grad_norm_w1_start": g1,
        },
    )
    text = (
        f"{len(result['seeds'])} seeds, {cfg['steps']} SGD steps (lr {cfg['lr']}, batch "
        f"{cfg['batch_size']}). "
        f"Solid: pre-activations shifted by {shift:g}; dotted: the unshifted controls. Saturation and "
        f"gradient norms are measured on a fixed probe batch of {cfg['probe']} training images, in training "
        f"mode, with batchnorm.lifecycle.diagnostics (saturated: |sigmoid input| > {cfg['threshold']:g})."
    )
    return Section(
        title="4. Sigmoid saturation with shifted pre-activations",
        text=text,
        figures=[("saturation", fig)],
        claims=[claim],
    )


def _sci(values: list[float]) -> str:
    s = summary(values)
    return "n/a" if s["mean"] is None else f"{s['mean']:.2e}"
