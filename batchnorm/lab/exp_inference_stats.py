"""Experiment 5 — which statistics BN should use at inference.

At inference a BN layer normalises with population estimates instead of batch statistics
(article 003: an EMA with β = 0.99; article 000: a cumulative average over an epoch; PyTorch:
``momentum=0.1``, or ``momentum=None`` for a cumulative average since the start). Here one BN
network (article 001's MLP, BN before ReLU) is trained once per seed, and *all* estimators are
computed side by side from the same batches — running statistics never influence training, so the
weights are identical for every estimator:

* EMA with each momentum in ``momenta`` (PyTorch convention: weight of the new batch; 0.01 is
  Keras/article 003's decay 0.99), via :func:`batchnorm.core.functional.update_running_stats`;
* the cumulative average over all batches (``momentum=None``);
* the cumulative average over the last complete epoch (article 000's recipe);
* the exact training-set statistics with the weights fixed
  (:func:`batchnorm.lab.train.recompute_bn_stats`: layer by layer, chunk moments merged with
  :func:`batchnorm.stats.merge_moments`).

Each is loaded into the network's buffers in turn and the test set evaluated in eval mode. The
train/eval gap compares that with training-mode evaluation (each test batch of the training batch
size normalised with its own statistics).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from batchnorm.core.functional import update_running_stats
from batchnorm.stats import batch_moments

from .common import band, fmt_pm, new_figure, summary
from .models import bn_layers, build
from .registry import Claim, Context, Section, experiment, verdict
from .train import TrainConfig, evaluate, recompute_bn_stats, train

_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#8c564b", "#e377c2", "#d62728", "#000000"]


def _ema_name(m: float) -> str:
    return f"EMA momentum {m:g}"


class ShadowStats:
    """Running statistics of several estimators, fed from the batches a model trains on.

    A forward pre-hook on every BN layer reads the layer's input when the layer is in training mode
    with gradients enabled (real training steps, not evaluations) and updates each estimator.
    """

    def __init__(self, model: nn.Module, momenta: list[float], steps_per_epoch: int) -> None:
        self.layers = bn_layers(model)
        self.momenta = [float(m) for m in momenta]
        self.names = [_ema_name(m) for m in self.momenta] + [
            "cumulative (all batches)",
            "cumulative (last epoch)",
        ]
        self.steps_per_epoch = steps_per_epoch
        self.state: dict[str, list[list[torch.Tensor]]] = {
            n: [self._fresh(m) for m in self.layers] for n in [*self.names, "_epoch_acc"]
        }
        self.handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    @staticmethod
    def _fresh(m: nn.Module) -> list[torch.Tensor]:
        return [
            torch.zeros_like(m.running_mean),
            torch.ones_like(m.running_var),
            torch.zeros((), dtype=torch.long),
        ]

    def _hook(self, i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return
            with torch.no_grad():
                mean, var, n = batch_moments(args[0].detach(), module.channel_axis)
                for name, mom in [
                    *zip(self.names, self.momenta),
                    ("cumulative (all batches)", None),
                    ("_epoch_acc", None),
                ]:
                    rm, rv, nbt = self.state[name][i]
                    new = update_running_stats(rm, rv, mean, var, n, mom, nbt, module.running_var_unbiased)
                    self.state[name][i] = [new.mean, new.var, new.num_batches_tracked]

        return hook

    def end_of_step(self, step: int) -> None:
        """At an epoch boundary the epoch's cumulative average becomes "last epoch" and restarts."""
        if step % self.steps_per_epoch == 0:
            self.state["cumulative (last epoch)"] = self.state["_epoch_acc"]
            self.state["_epoch_acc"] = [self._fresh(m) for m in self.layers]

    def load(self, name: str) -> None:
        """Copy estimator ``name``'s statistics into the model's BN buffers."""
        with torch.no_grad():
            for layer, (rm, rv, _) in zip(self.layers, self.state[name]):
                layer.running_mean.copy_(rm)
                layer.running_var.copy_(rv)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _distance(
    layers_est: list[tuple[torch.Tensor, torch.Tensor]],
    exact: list[dict[str, torch.Tensor]],
    eps: float = 1e-5,
) -> dict[str, float]:
    """Mean over layers and channels of the standardised mean error and |log variance ratio|."""
    shift, logr = [], []
    for (rm, rv), ex in zip(layers_est, exact):
        sd = (ex["var"] + eps).sqrt()
        shift.append(((rm.double() - ex["mean"]).abs() / sd).mean())
        logr.append(((rv.double() + eps) / (ex["var"] + eps)).log().abs().mean())
    return {"mean_shift": float(torch.stack(shift).mean()), "log_var_ratio": float(torch.stack(logr).mean())}


@experiment(
    "inference_stats",
    help="inference statistics: EMA with several momenta vs cumulative average (momentum=None) vs exact "
    "recomputation over the training set; the train/eval accuracy gap",
    order=50,
    cost=8,
    defaults={
        "momenta": [0.01, 0.1, 0.5],
        "steps": 400,
        "lr": 0.1,
        "batch_size": 60,
        "eval_every": 10,
        "kind": "mlp_bn_before",
        "tolerance": 0.01,
    },
    quick={"steps": 30, "eval_every": 10},
)
def inference_stats(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    ds = ctx.data
    bs = int(cfg["batch_size"])
    task = ctx.progress.task("inference_stats", total=len(ctx.seeds) * cfg["steps"])
    runs = []
    for seed in ctx.seeds:
        net = build(cfg["kind"], ds.image_shape, ds.num_classes, seed=seed)
        shadow = ShadowStats(net, list(cfg["momenta"]), ds.x_train.shape[0] // bs)
        names = [*shadow.names, "exact (recomputed)"]
        curves: dict[str, list[float]] = {n: [] for n in [*names, "batch statistics (train mode)"]}
        final: dict[str, Any] = {}

        def on_eval(
            step: int,
            model: nn.Module,
            shadow: ShadowStats = shadow,
            curves: dict[str, list[float]] = curves,
            final: dict[str, Any] = final,
        ) -> None:
            own = [(m.running_mean.clone(), m.running_var.clone()) for m in shadow.layers]
            for name in shadow.names:
                shadow.load(name)
                curves[name].append(evaluate(model, ds.x_test, ds.y_test)[1])
            with torch.no_grad():
                for m, (rm, rv) in zip(shadow.layers, own):
                    m.running_mean.copy_(rm)
                    m.running_var.copy_(rv)
            exact_model = copy.deepcopy(model)
            exact = recompute_bn_stats(exact_model, ds.x_train)
            curves["exact (recomputed)"].append(evaluate(exact_model, ds.x_test, ds.y_test)[1])
            curves["batch statistics (train mode)"].append(
                evaluate(model, ds.x_test, ds.y_test, batch_stats=True, chunk=bs)[1]
            )
            final["exact"] = exact
            final["exact_model"] = exact_model

        tc = TrainConfig(
            steps=cfg["steps"], batch_size=bs, lr=cfg["lr"], eval_every=cfg["eval_every"], seed=seed
        )
        h = train(
            net,
            ds,
            tc,
            advance=task.advance,
            on_eval=on_eval,
            on_step=lambda step, model, loss, shadow=shadow: shadow.end_of_step(step),
        )
        shadow.remove()
        # the model's own buffers (momentum 0.1) must equal the shadow EMA 0.1: a self-check stored in results
        own_vs_shadow = None
        if 0.1 in shadow.momenta:
            est = shadow.state[_ema_name(0.1)]
            own_vs_shadow = max(
                float((m.running_mean - e[0]).abs().max()) for m, e in zip(shadow.layers, est)
            )
        dist = {}
        for name in shadow.names:
            dist[name] = _distance([(e[0], e[1]) for e in shadow.state[name]], final["exact"])
        train_acc: dict[str, float] = {}
        for name in shadow.names:
            shadow.load(name)
            train_acc[name] = evaluate(net, ds.x_train, ds.y_train)[1]
        train_acc["exact (recomputed)"] = evaluate(final["exact_model"], ds.x_train, ds.y_train)[1]
        train_acc["batch statistics (train mode)"] = evaluate(
            net, ds.x_train, ds.y_train, batch_stats=True, chunk=bs
        )[1]
        runs.append(
            {
                "steps": h["steps"],
                "test_acc": curves,
                "final_test_acc": {k: v[-1] for k, v in curves.items()},
                "train_acc": train_acc,
                "distance_to_exact": dist,
                "own_buffers_vs_shadow_ema": own_vs_shadow,
                "estimators": names,
            }
        )
    return {"config": cfg, "seeds": list(ctx.seeds), "runs": runs}


@inference_stats.reporter
def _report(result: dict[str, Any]) -> Section:
    cfg = result["config"]
    runs = result["runs"]
    names = runs[0]["estimators"]
    every = [*names, "batch statistics (train mode)"]
    fig, axes = new_figure(2, 1, width=5.4, height=3.8)
    steps = runs[0]["steps"]
    ax = axes[0, 0]
    for i, n in enumerate(every):
        c = _PALETTE[i % len(_PALETTE)] if n != "batch statistics (train mode)" else "#7f7f7f"
        style = "--" if n.startswith("batch") else ("-" if not n.startswith("exact") else "-.")
        band(ax, steps, [r["test_acc"][n] for r in runs], n, c, style)
    k = min(max(2, len(steps) // 4), len(steps) - 1)
    lo = min(min(r["test_acc"][n][1 : k + 1]) for r in runs for n in every)
    ax.set(
        xlabel="training step",
        ylabel="test accuracy (eval mode with each estimate)",
        xlim=(0, steps[k]),
        ylim=(max(0.0, lo - 0.03), 1.0),
        title="(a) early training (zoom)",
    )
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[0, 1]
    est = [n for n in names if n in runs[0]["distance_to_exact"]]
    for j, (key, lab) in enumerate(
        (("mean_shift", "mean |Δμ| / σ"), ("log_var_ratio", "mean |log(σ²/σ²_exact)|"))
    ):
        vals = [summary([r["distance_to_exact"][n][key] for r in runs])["mean"] or 0.0 for n in est]
        ax.bar(
            [i + (j - 0.5) * 0.38 for i in range(len(est))],
            vals,
            0.38,
            label=lab,
            color=["#1f77b4", "#ff7f0e"][j],
        )
    ax.set(
        xticks=range(len(est)),
        yscale="log",
        ylabel="distance to the exact statistics",
        title=f"(b) estimates vs exact training-set statistics at step {steps[-1]}",
    )
    ax.set_xticklabels([n.replace("EMA momentum ", "EMA ").replace(" (", "\n(") for n in est], fontsize=7)
    ax.legend(fontsize=7)

    tol = float(cfg["tolerance"])
    fin = {n: [r["final_test_acc"][n] for r in runs] for n in every}
    exact = summary(fin["exact (recomputed)"])["mean"] or 0.0
    diffs = {n: (summary(fin[n])["mean"] or 0.0) - exact for n in names if not n.startswith("exact")}
    within = {n: abs(d) <= tol for n, d in diffs.items()}
    default = _ema_name(0.1)
    claim1 = Claim(
        claim=f"Running estimates stand in for the training-set statistics at inference: at the end of "
              f"training "
        f"each estimator's test accuracy is within {tol * 100:g} points of the exact recomputation",
        measured=f"exact {fmt_pm(fin['exact (recomputed)'])}; "
        + "; ".join(f"{n} {fmt_pm(fin[n])} ({diffs[n] * 100:+.1f} pt)" for n in diffs),
        verdict=verdict(all(within.values()), partly=within.get(default, False) or any(within.values())),
        numbers={"final_test_acc": fin, "difference_to_exact": diffs},
        headline=f"exact {exact:.3f}; largest difference "
        f"{max((abs(d) for d in diffs.values()), default=0) * 100:.1f} pt",
    )
    gap = {
        n: [r["final_test_acc"]["batch statistics (train mode)"] - r["final_test_acc"][n] for r in runs]
        for n in names
    }
    gtrain = {
        n: [r["train_acc"]["batch statistics (train mode)"] - r["train_acc"][n] for r in runs] for n in names
    }
    small = {n: abs(summary(v)["mean"] or 0.0) <= tol for n, v in gap.items()}
    claim2 = Claim(
        claim=f"Train/eval gap: evaluating with population statistics (eval mode) gives the accuracy of "
        f"training-mode normalisation (batch {cfg['batch_size']}) within {tol * 100:g} points",
        measured="test-accuracy gap (train mode - eval mode): "
        + "; ".join(f"{n} {fmt_pm(gap[n], 1, 100)} pt" for n in names)
        + "; on the training set: "
        + "; ".join(
            f"{n} {fmt_pm(gtrain[n], 1, 100)} pt" for n in names if n in (default, "exact (recomputed)")
        ),
        verdict=verdict(
            small.get(default, False) and small.get("exact (recomputed)", False), partly=any(small.values())
        ),
        numbers={"test_gap": gap, "train_gap": gtrain},
        headline="test gap: " + ", ".join(
            f"{n.replace('EMA momentum', 'EMA')} {(summary(gap[n])['mean'] or 0) * 100:+.1f} pt"
            for n in (default, "exact (recomputed)") if n in gap),
    )
    d = {
        n: [r["distance_to_exact"][n]["mean_shift"] for r in runs]
        for n in names
        if n in runs[0]["distance_to_exact"]
    }
    early = {n: [r["test_acc"][n][1] for r in runs] for n in every}
    text = (
        f"{len(result['seeds'])} seeds, {cfg['kind']}, {cfg['steps']} SGD steps (lr {cfg['lr']}, batch "
        f"{cfg['batch_size']}); the estimators share one training run per seed. At the first evaluation "
        f"(step {steps[1]}): " + ", ".join(f"{n} {fmt_pm(early[n])}" for n in every) + ". Distance of each "
        "estimate to the exact statistics at the end (mean |Δμ|/σ over layers and channels): "
        + ", ".join(f"{n} {fmt_pm(v)}" for n, v in d.items())
        + "."
    )
    return Section(
        title="5. Statistics for inference: EMA, cumulative average, exact recomputation",
        text=text,
        figures=[("inference_stats", fig)],
        claims=[claim1, claim2],
    )
