"""Experiment — accuracy against batch size: BN, Batch Renorm, Ghost BN, GroupNorm, LayerNorm.

Claims (Ioffe 2017; Wu & He 2018; Hoffer et al. 2017): BN's accuracy falls when batches get small,
because its batch statistics get noisy and differ from the running statistics used at inference;
Batch Renorm narrows that gap; GroupNorm and LayerNorm, which use no batch statistics, do not depend
on the batch size; Ghost BN normalising virtual batches of a fixed size keeps large-batch training as
good as (or better than) BN.

Set-up: article 002's CNN (conv3×3 → norm → ReLU → max-pool, twice, then a linear layer) on the
data set in use, with the normalisation layer swapped:

* ``bn`` — :class:`batchnorm.BatchNorm2d`;
* ``renorm`` — :class:`batchnorm.family.renorm.BatchRenorm2d` with the paper's warm-up schedule scaled to
  the run (plain BN for the first ``renorm_warmup`` of the steps, then linear ramps reaching
  ``r_max`` at ``renorm_r_end`` and ``d_max`` at ``renorm_d_end`` of the steps);
* ``ghost`` — :class:`batchnorm.family.ghost.GhostBatchNorm2d` with ``virtual_batch_size`` (batches no
  larger than it are one ghost batch, i.e. plain BN: ``remainder="merge_last"``);
* ``group`` — ``torch.nn.GroupNorm(groups, C)``; ``layer`` — ``torch.nn.GroupNorm(1, C)``, LayerNorm
  over (C, H, W) as in Wu & He's comparison.

Every run sees the same number of training samples (``epochs``); the learning rate follows the
linear scaling rule ``lr · B / lr_batch`` (Goyal et al. 2017) with SGD + momentum 0.9. Measured:
the final test accuracy in eval mode (running statistics), and — to show where BN's small-batch
loss comes from — the test accuracy in train mode with batch statistics over chunks of the training
batch size (running buffers restored afterwards).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from batchnorm import BatchNorm2d
from batchnorm.family.ghost import GhostBatchNorm2d
from batchnorm.family.renorm import BatchRenorm2d, RenormSchedule

from .common import fmt_pm, new_figure, summary
from .models import cnn
from .registry import Claim, Context, Section, experiment, verdict
from .train import TrainConfig, evaluate, train

LABELS = {"bn": "BatchNorm", "renorm": "Batch Renorm", "ghost": "Ghost BN", "group": "GroupNorm",
          "layer": "LayerNorm (GroupNorm(1, C))"}
_COLORS = {"bn": "#d62728", "renorm": "#ff7f0e", "ghost": "#9467bd", "group": "#2ca02c", "layer": "#1f77b4"}


def _norm_factory(method: str, cfg: dict[str, Any], steps: int):
    momentum = cfg["bn_momentum"]
    if method == "bn":
        return lambda c: BatchNorm2d(c, momentum=momentum)
    if method == "renorm":
        w = int(cfg["renorm_warmup"] * steps)
        sched = RenormSchedule(warmup_steps=w, r_max=cfg["r_max"], d_max=cfg["d_max"],
                               r_max_steps=max(w, int(cfg["renorm_r_end"] * steps)),
                               d_max_steps=max(w, int(cfg["renorm_d_end"] * steps)))
        return lambda c: BatchRenorm2d(c, momentum=momentum, schedule=sched)
    if method == "ghost":
        return lambda c: GhostBatchNorm2d(c, momentum=momentum, virtual_batch_size=cfg["virtual_batch_size"],
                                          remainder="merge_last")
    if method == "group":
        return lambda c: nn.GroupNorm(math.gcd(cfg["groups"], c), c)
    if method == "layer":
        return lambda c: nn.GroupNorm(1, c)
    raise ValueError(f"batch_family: unknown method {method!r}; expected some of {', '.join(LABELS)}")


def _steps(cfg: dict[str, Any], n_train: int, batch: int) -> int:
    steps = max(1, round(cfg["epochs"] * n_train / batch))
    return min(steps, cfg["max_steps"]) if cfg["max_steps"] > 0 else steps


@experiment(
    "batch_family",
    help="accuracy vs batch size (2..128): BN, Batch Renorm, Ghost BN, GroupNorm, LayerNorm on the CNN",
    demo=False,
    order=80,
    cost=480,  # ~160 s per seed on one core (measured), 3 seeds by default
    defaults={"batch_sizes": [2, 4, 8, 32, 128], "methods": ["bn", "renorm", "ghost", "group", "layer"],
              "epochs": 10.0, "max_steps": 0, "lr": 0.05, "lr_batch": 32, "optimizer": "momentum",
              "bn_momentum": 0.1, "virtual_batch_size": 16, "groups": 8, "r_max": 3.0, "d_max": 5.0,
              "renorm_warmup": 0.05, "renorm_r_end": 0.4, "renorm_d_end": 0.25, "channels": [16, 32],
              "eval_points": 5},
    quick={"batch_sizes": [4, 16], "max_steps": 12, "channels": [4, 8], "virtual_batch_size": 4, "groups": 2,
           "eval_points": 2},
)
def batch_family(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    ds = ctx.data
    n_train = int(ds.x_train.shape[0])
    for m in cfg["methods"]:
        if m not in LABELS:
            raise ValueError(f"batch_family: unknown method {m!r}; expected some of {', '.join(LABELS)}")
    sizes = [int(b) for b in cfg["batch_sizes"]]
    if not sizes or min(sizes) < 2 or max(sizes) > n_train:
        raise ValueError(f"batch_family: expected batch sizes in [2, {n_train}] (the training-set size), "
                         f"got {sizes}; BN needs at least 2 samples per batch")
    total = len(ctx.seeds) * len(cfg["methods"]) * sum(_steps(cfg, n_train, b) for b in sizes)
    task = ctx.progress.task("batch_family", total=total)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for method in cfg["methods"]:
        runs[method] = {}
        for b in sizes:
            steps = _steps(cfg, n_train, b)
            runs[method][str(b)] = []
            for seed in ctx.seeds:
                torch.manual_seed(seed)
                net = cnn(ds.image_shape, ds.num_classes, True, channels=[int(c) for c in cfg["channels"]],
                          norm=_norm_factory(method, cfg, steps))
                every = max(1, steps // max(1, cfg["eval_points"]))
                tc = TrainConfig(steps=steps, batch_size=b, lr=cfg["lr"] * b / cfg["lr_batch"],
                                 optimizer=cfg["optimizer"], eval_every=every, seed=seed)
                hist = train(net, ds, tc, advance=task.advance)
                _, batch_acc = evaluate(net, ds.x_test, ds.y_test, batch_stats=True, chunk=b)
                runs[method][str(b)].append({
                    "seed": seed, "steps": steps, "lr": tc.lr, "final_test_acc": hist["final_test_acc"],
                    "batch_stats_test_acc": batch_acc, "diverged": hist["diverged"],
                    "eval_steps": hist["steps"], "test_acc": hist["test_acc"], "wall_s": hist["wall_s"],
                })
    return {"config": cfg, "seeds": list(ctx.seeds), "batch_sizes": sizes, "methods": list(cfg["methods"]),
            "data": ds.name, "n_train": n_train, "runs": runs}


# -- report ----------------------------------------------------------------------------------------

def table(result: dict[str, Any], key: str = "final_test_acc") -> dict[str, dict[int, dict[str, Any]]]:
    """``{method: {batch_size: summary over seeds}}`` of ``key`` (from the JSON result alone)."""
    return {m: {int(b): summary([r[key] for r in rs]) for b, rs in by_b.items()}
            for m, by_b in result["runs"].items()}


def _margin(tab: dict[str, dict[int, dict[str, Any]]]) -> float:
    """A difference counts when it exceeds 1 point of accuracy or twice the typical seed spread."""
    stds = [s["std"] for by_b in tab.values() for s in by_b.values() if s["std"] is not None]
    return max(0.01, 2 * (sum(stds) / len(stds) if stds else 0.0))


def _acc(tab, method: str, b: int) -> float | None:
    return tab.get(method, {}).get(b, {}).get("mean")


def _claims(result: dict[str, Any]) -> list[Claim]:
    tab = table(result)
    sizes = sorted(result["batch_sizes"])
    small, large = sizes[0], sizes[-1]
    ref = min(sizes, key=lambda b: (abs(math.log2(b / 32)), -b))  # the batch closest to 32
    margin = _margin(tab)
    claims = []
    bn_small, bn_ref = _acc(tab, "bn", small), _acc(tab, "bn", ref)
    if bn_small is not None and bn_ref is not None and small != ref:
        drop = bn_ref - bn_small
        claims.append(Claim(
            f"BN's accuracy degrades with small batches (batch {small} vs {ref})",
            f"BN test accuracy {bn_small:.3f} at batch {small} vs {bn_ref:.3f} at batch {ref} "
            f"(drop {drop:+.3f}; margin {margin:.3f})",
            verdict(drop > margin, partly=drop > 0), {"drop": drop, "margin": margin}))
    rn_small = _acc(tab, "renorm", small)
    if rn_small is not None and bn_small is not None:
        gain = rn_small - bn_small
        claims.append(Claim(
            f"Batch Renorm beats BN at small batches (batch {small})",
            f"Batch Renorm {rn_small:.3f} vs BN {bn_small:.3f} (gain {gain:+.3f}; margin {margin:.3f})",
            verdict(gain > margin, partly=gain > 0), {"gain": gain, "margin": margin}))
    for m in ("group", "layer"):
        if m in tab and "bn" in tab and len(sizes) > 1:
            means = [_acc(tab, m, b) for b in sizes]
            bn_means = [_acc(tab, "bn", b) for b in sizes]
            if None in means or None in bn_means:
                continue
            spread, bn_spread = max(means) - min(means), max(bn_means) - min(bn_means)
            claims.append(Claim(
                f"{LABELS[m]} does not depend on the batch size",
                f"accuracy range over batch sizes {spread:.3f} ({LABELS[m]}) vs {bn_spread:.3f} (BN)",
                verdict(spread <= margin, partly=spread < bn_spread),
                {"range": spread, "bn_range": bn_spread}))
    gb_large, bn_large = _acc(tab, "ghost", large), _acc(tab, "bn", large)
    if gb_large is not None and bn_large is not None:
        diff = gb_large - bn_large
        g = result["config"]["virtual_batch_size"]
        claims.append(Claim(
            f"Ghost BN (virtual batch {g}) generalises at least as well as BN at large batches "
            f"(batch {large})",
            f"Ghost BN {gb_large:.3f} vs BN {bn_large:.3f} (difference {diff:+.3f}; margin {margin:.3f})"
            + ("" if large > g else f"; batch {large} <= virtual batch {g}: Ghost BN is plain BN here"),
            verdict(diff > margin, partly=diff >= -margin), {"difference": diff, "margin": margin}))
    return claims


@batch_family.reporter
def _report(result: dict[str, Any]) -> Section:
    sizes = sorted(result["batch_sizes"])
    fig, axes = new_figure(2, 1)
    panels = ((axes[0, 0], "final_test_acc", "Test accuracy, eval mode (running stats)"),
              (axes[0, 1], "batch_stats_test_acc", "Test accuracy, batch statistics (chunks of B)"))
    for ax, key, title in panels:
        tab = table(result, key)
        for i, (m, by_b) in enumerate(tab.items()):
            xs = [b for b in sizes if by_b.get(b, {}).get("mean") is not None]
            jitter = 2 ** (0.04 * (i - (len(tab) - 1) / 2))  # side by side, so error bars stay readable
            ax.errorbar([b * jitter for b in xs], [by_b[b]["mean"] for b in xs],
                        yerr=[by_b[b]["std"] for b in xs], label=LABELS.get(m, m), color=_COLORS.get(m),
                        marker="o", capsize=3, lw=1.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set(xlabel="batch size", ylabel="test accuracy", title=title)
    axes[0, 0].legend(fontsize=8, loc="lower right")
    c = result["config"]
    finals = "; ".join(
        f"{LABELS.get(m, m)}: " + ", ".join(f"B={b} {fmt_pm([r['final_test_acc'] for r in by_b[str(b)]])}"
                                           for b in sizes if str(b) in by_b)
        for m, by_b in result["runs"].items())
    first = next(iter(result["runs"].values()))
    steps = ", ".join(f"B={b}: {first[str(b)][0]['steps']}" for b in sizes if str(b) in first)
    diverged = sum(r["diverged"] for by_b in result["runs"].values() for rs in by_b.values() for r in rs)
    text = (f"{result['data']}, {len(result['seeds'])} seed(s); CNN channels {c['channels']}; every run sees "
            f"{c['epochs']} epochs" + (f" (capped at {c['max_steps']} steps)" if c["max_steps"] else "")
            + f", SGD+momentum, lr {c['lr']}·B/{c['lr_batch']}; BN momentum {c['bn_momentum']}, Ghost BN "
            f"virtual batch {c['virtual_batch_size']}, GroupNorm {c['groups']} groups, Batch Renorm r_max "
            f"{c['r_max']}, d_max {c['d_max']} after a {c['renorm_warmup']:.0%} warm-up. Optimizer steps per "
            f"run ({steps}): the same samples, so large batches get few steps. Final test accuracy "
            f"(mean ± std over seeds): {finals}." + (f" {diverged} run(s) diverged." if diverged else ""))
    return Section(title="Batch size: BN, Batch Renorm, Ghost BN, GroupNorm, LayerNorm", text=text,
                   figures=[("batch_family", fig)], claims=_claims(result))
