"""Experiment 6 — the batch size: BN down to very small batches.

BN normalises with the statistics of the current mini-batch. With a batch of ``m`` samples those
are noisy estimates (the mean's standard error is ``σ/√m``; for ``m = 2`` every normalised value is
±1), and at inference the network meets population statistics it never trained with (Ioffe 2017,
"Batch Renormalization"; Wu & He 2018, "Group Normalization", Fig. 1). We train article 001's MLP
with and without BN (BN before ReLU) at each batch size for the same number of epochs (same
samples seen, same learning rate), and measure

* test accuracy in eval mode (running statistics, momentum 0.1) and with the exact training-set
  statistics recomputed after training (:func:`batchnorm.lab.train.recompute_bn_stats`);
* the train/eval gap: test accuracy in training mode (each test batch of the training batch size
  normalised with its own statistics) minus eval-mode accuracy.
"""

from __future__ import annotations

import copy
from typing import Any

from .common import COLORS, fmt_pm, mean_spread, new_figure, summary
from .models import build
from .registry import Claim, Context, Section, experiment, verdict
from .train import TrainConfig, evaluate, recompute_bn_stats, train

LABELS = {"mlp": "no BN", "mlp_bn_before": "BN before ReLU"}


@experiment(
    "batch_size",
    help="batch sizes 2..128 for the same epochs: BN vs no BN eval accuracy, exact-statistics accuracy and "
         "the "
    "train/eval gap",
    order=60,
    cost=24,
    defaults={
        "batch_sizes": [2, 4, 8, 16, 32, 64, 128],
        "epochs": 2.0,
        "lr": 0.05,
        "kinds": ["mlp", "mlp_bn_before"],
        "margin": 0.02,
    },
    quick={"batch_sizes": [2, 16], "epochs": 0.2},
)
def batch_size(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    ds = ctx.data
    n = int(ds.x_train.shape[0])
    sizes = [int(b) for b in cfg["batch_sizes"]]
    if min(sizes) < 2:
        raise ValueError(
            "batch_size: BN needs at least 2 samples per batch in training; use batch sizes >= 2"
        )
    steps_for = {b: max(1, int(cfg["epochs"] * n / b)) for b in sizes}
    kinds = list(cfg["kinds"])
    task = ctx.progress.task("batch_size", total=len(kinds) * len(ctx.seeds) * sum(steps_for.values()))
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for kind in kinds:
        runs[kind] = {}
        for b in sizes:
            out = []
            for seed in ctx.seeds:
                net = build(kind, ds.image_shape, ds.num_classes, seed=seed)
                tc = TrainConfig(
                    steps=steps_for[b], batch_size=b, lr=cfg["lr"], eval_every=steps_for[b], seed=seed
                )
                h = train(net, ds, tc, advance=task.advance)
                rec = {
                    "steps": steps_for[b],
                    "eval_acc": h["final_test_acc"],
                    "diverged": h["diverged"],
                    "train_mode_acc": evaluate(net, ds.x_test, ds.y_test, batch_stats=True, chunk=b)[1],
                }
                if kind != "mlp":
                    exact = copy.deepcopy(net)
                    recompute_bn_stats(exact, ds.x_train)
                    rec["exact_stats_acc"] = evaluate(exact, ds.x_test, ds.y_test)[1]
                out.append(rec)
            runs[kind][str(b)] = out
    return {"config": cfg, "seeds": list(ctx.seeds), "runs": runs}


@batch_size.reporter
def _report(result: dict[str, Any]) -> Section:
    cfg = result["config"]
    runs = result["runs"]
    sizes = sorted((int(b) for b in next(iter(runs.values()))), key=int)
    fig, axes = new_figure(2, 1, width=5.2, height=3.7)
    ax = axes[0, 0]
    for kind, by_b in runs.items():
        series = [("eval_acc", "eval mode", "-o")]
        if kind != "mlp":
            series += [
                ("exact_stats_acc", "exact statistics", "--s"),
                ("train_mode_acc", "train mode (batch stats)", ":^"),
            ]
        for key, tag, fmt in series:
            mean, std = mean_spread(list(zip(*[[r[key] for r in by_b[str(b)]] for b in sizes])))
            ax.errorbar(
                sizes,
                mean,
                yerr=std,
                fmt=fmt,
                ms=4,
                capsize=2,
                color=COLORS.get(kind),
                alpha=1.0 if key == "eval_acc" else 0.7,
                label=f"{LABELS.get(kind, kind)}: {tag}",
            )
    ax.set(
        xscale="log",
        xlabel="batch size",
        ylabel="test accuracy",
        xticks=sizes,
        title=f"(a) accuracy after {cfg['epochs']:g} epochs (lr {cfg['lr']})",
    )
    ax.set_xticklabels([str(b) for b in sizes])
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[0, 1]
    bn = [k for k in runs if k != "mlp"]
    gaps: dict[str, dict[int, list[float]]] = {}
    for kind in bn:
        gaps[kind] = {b: [r["train_mode_acc"] - r["eval_acc"] for r in runs[kind][str(b)]] for b in sizes}
        mean, std = mean_spread(list(zip(*[gaps[kind][b] for b in sizes])))
        ax.errorbar(
            sizes,
            mean * 100,
            yerr=std * 100,
            fmt="-o",
            ms=4,
            capsize=2,
            color=COLORS.get(kind),
            label=LABELS.get(kind, kind),
        )
    ax.axhline(0, color="k", lw=0.8)
    ax.set(
        xscale="log",
        xlabel="batch size",
        ylabel="train-mode − eval-mode test accuracy (points)",
        xticks=sizes,
        title="(b) train/eval gap",
    )
    ax.set_xticklabels([str(b) for b in sizes])
    ax.legend(fontsize=7)

    margin = float(cfg["margin"])
    claims = []
    if bn and "mlp" in runs:
        k = bn[0]
        acc = {b: summary([r["eval_acc"] for r in runs[k][str(b)]])["mean"] or 0.0 for b in sizes}
        base = {b: summary([r["eval_acc"] for r in runs["mlp"][str(b)]])["mean"] or 0.0 for b in sizes}
        small, best = sizes[0], max(sizes, key=lambda b: acc[b])
        adv = {b: acc[b] - base[b] for b in sizes}
        gap = {b: summary(gaps[k][b])["mean"] or 0.0 for b in sizes}
        degrades = acc[small] < acc[best] - margin
        adv_shrinks = adv[small] < max(adv.values()) - margin
        gap_grows = abs(gap[small]) > abs(gap[sizes[-1]]) + margin
        claims.append(
            Claim(
                claim=f"BN suffers at very small batches: at batch {small} its accuracy drops, its "
                      f"advantage over no "
                f"BN shrinks, and the train/eval gap grows in size (each by more than {margin * 100:g} "
                f"points)",
                measured=(
                    f"BN eval accuracy at batch {small}: "
                    f"{fmt_pm([r['eval_acc'] for r in runs[k][str(small)]])} vs "
                    f"{acc[best]:.3f} at its best batch {best}; advantage over no BN: "
                    f"{adv[small] * 100:+.1f} pt at "
                    f"batch {small}, best {max(adv.values()) * 100:+.1f} pt; train/eval gap "
                    f"{gap[small] * 100:+.1f} pt at batch {small} vs {gap[sizes[-1]] * 100:+.1f} pt at batch "
                    f"{sizes[-1]}; with exact statistics at batch {small}: "
                    f"{fmt_pm([r['exact_stats_acc'] for r in runs[k][str(small)]])}"
                ),
                verdict=verdict(
                    degrades and adv_shrinks and gap_grows, partly=degrades or adv_shrinks or gap_grows
                ),
                numbers={"bn_eval_acc": acc, "no_bn_eval_acc": base, "advantage": adv, "gap": gap},
                headline=(f"BN acc batch {small}: {acc[small]:.3f} vs {acc[best]:.3f} (batch {best}); gap "
                          f"{gap[small] * 100:+.1f} vs {gap[sizes[-1]] * 100:+.1f} pt"),
            )
        )
    text = (
        f"{len(result['seeds'])} seeds, {cfg['epochs']:g} epochs at every batch size (so batch 2 makes "
        f"{runs[next(iter(runs))][str(sizes[0])][0]['steps']} steps, batch {sizes[-1]} makes "
        f"{runs[next(iter(runs))][str(sizes[-1])][0]['steps']}), SGD lr {cfg['lr']}. Eval mode uses the "
        f"running "
        f"statistics (momentum 0.1); 'exact statistics' recomputes them over the training set after "
        f"training, "
        f"which separates a bad running estimate from a network that learnt to rely on noisy batch "
        f"statistics."
    )
    return Section(title="6. Batch size", text=text, figures=[("batch_size", fig)], claims=claims)
