"""Experiment — masked BN on padded variable-length sequences: plain BN vs masked BN.

Claim (issue 17; Keras/Flax ``mask``; pytorch#70529): with padded batches, plain BN's statistics
count the padding, so how a sample is normalised in training depends on how much padding its batch
happens to carry, while inference uses running statistics averaged over all of that. Masked BN
takes the statistics over the valid positions only, so training and inference normalise alike.

Set-up: each image of the data set becomes a sequence of its rows (8 rows of 8 pixels for the
digits: ``L = H`` steps of ``W`` features). A random crop keeps ``min_len..H`` consecutive rows,
left-aligned and zero-padded to the batch's padded length, which is the longest crop in the batch
plus a random ``0..max_extra_pad`` steps (batches carry different amounts of padding, as with
bucketing or pad-to-multiple). A small 1-D conv net: ``Conv1d(W, c, 3) → BN+ReLU → ×mask →
Conv1d(c, c, 3) → BN+ReLU → ×mask → masked mean over time → Linear``. The two runs differ only in
the BN layers' ``mask=`` (plain BN gets none). Padded positions are zeroed after every block, so in
eval mode the prediction of a sample does not depend on its padding at all; in train mode (batch
statistics) plain BN's does.

Measured on the test set (cropped and padded the same way, fixed seed): the accuracy in eval mode
(running statistics), the accuracy in train mode (batch statistics of batches of the training
size, running buffers restored), the gap between them, and the eval accuracy during training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from batchnorm import BatchNormAct1d

from .common import fmt_pm, new_figure, summary
from .registry import Claim, Context, Section, experiment, verdict
from .train import frozen_buffers

METHODS = ("plain", "masked")
LABELS = {"plain": "plain BN (padding in the statistics)", "masked": "masked BN (valid positions only)"}
_COLORS = {"plain": "#d62728", "masked": "#1f77b4"}


class SeqNet(nn.Module):
    """The 1-D conv net of the module docstring; ``masked`` decides whether BN sees the mask."""

    def __init__(self, features: int, classes: int, channels: int, masked: bool) -> None:
        super().__init__()
        self.masked = masked
        self.conv1 = nn.Conv1d(features, channels, 3, padding=1)
        self.bn1 = BatchNormAct1d(channels)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1)
        self.bn2 = BatchNormAct1d(channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[:, None, :].to(x.dtype)
        bn_mask = mask if self.masked else None
        h = self.bn1(self.conv1(x), mask=bn_mask) * m
        h = self.bn2(self.conv2(h), mask=bn_mask) * m
        pooled = h.sum(2) / m.sum(2).clamp_min(1)
        return self.head(pooled)


def make_sequences(images: torch.Tensor, min_len: int, max_extra: int, batch: int,
                   generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Images ``(N, 1, H, W)`` → batches of ``(x (B, W, P), mask (B, P), index (B,))`` (module docstring).

    Every sample is a random crop of ``min_len..H`` consecutive rows, left-aligned; each batch is
    padded with zeros to its longest crop plus ``0..max_extra`` steps.
    """
    n, _, h, w = images.shape
    rows = images[:, 0]  # (N, H, W): row t is time step t
    order = torch.randperm(n, generator=generator)
    out = []
    for lo in range(0, n, batch):
        idx = order[lo:lo + batch]
        if idx.numel() < 2:
            continue
        lengths = torch.randint(min_len, h + 1, (idx.numel(),), generator=generator)
        starts = (torch.rand(idx.numel(), generator=generator) * (h - lengths + 1)).long()
        p = int(lengths.max()) + int(torch.randint(0, max_extra + 1, (1,), generator=generator))
        x = torch.zeros(idx.numel(), w, p)
        for k, (i, s, ln) in enumerate(zip(idx.tolist(), starts.tolist(), lengths.tolist())):
            x[k, :, :ln] = rows[i, s:s + ln].T
        mask = torch.arange(p)[None, :] < lengths[:, None]
        out.append((x, mask, idx))
    return out


def _accuracy(model: SeqNet, batches, labels: torch.Tensor, batch_stats: bool) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, mask, idx in batches:
            logits = model(x, mask)
            correct += int((logits.argmax(1) == labels[idx]).sum())
            total += idx.numel()
    return correct / max(total, 1)


def _evaluate(model: SeqNet, batches, labels) -> tuple[float, float]:
    """``(eval-mode accuracy, train-mode accuracy)``; the buffers and the mode come back as they were."""
    was = model.training
    model.eval()
    acc_eval = _accuracy(model, batches, labels, False)
    with frozen_buffers(model):
        acc_train = _accuracy(model, batches, labels, True)
    model.train(was)
    return acc_eval, acc_train


@experiment(
    "masked",
    help="padded variable-length sequences (image rows): plain vs masked BN, train/eval gap, accuracy",
    demo=False,
    order=85,
    cost=60,
    defaults={"steps": 400, "batch_size": 32, "lr": 0.05, "channels": 32, "min_len": 3,
              "max_extra_pad": 16, "eval_points": 8},
    quick={"steps": 12, "channels": 8, "eval_points": 2},
)
def masked_exp(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    ds = ctx.data
    h = int(ds.x_train.shape[2])
    if not 1 <= cfg["min_len"] <= h:
        raise ValueError(f"masked: expected min_len in [1, {h}] (the image height = sequence length), got "
                         f"{cfg['min_len']}")
    if cfg["batch_size"] < 2 or cfg["max_extra_pad"] < 0 or cfg["steps"] < 1:
        raise ValueError(f"masked: expected batch_size >= 2, max_extra_pad >= 0 and steps >= 1, got "
                         f"{cfg['batch_size']}, {cfg['max_extra_pad']}, {cfg['steps']}")
    task = ctx.progress.task("masked", total=len(ctx.seeds) * len(METHODS) * cfg["steps"])
    test = make_sequences(ds.x_test, cfg["min_len"], cfg["max_extra_pad"], cfg["batch_size"],
                          torch.Generator().manual_seed(12345))
    every = max(1, cfg["steps"] // max(1, cfg["eval_points"]))
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    for seed in ctx.seeds:
        for method in METHODS:
            torch.manual_seed(seed)
            model = SeqNet(int(ds.x_train.shape[3]), ds.num_classes, cfg["channels"], method == "masked")
            opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)
            g = torch.Generator().manual_seed(seed)  # the same crops and padding for both methods
            batches: list = []
            steps, curve = [], []
            for step in range(cfg["steps"]):
                if not batches:
                    batches = make_sequences(ds.x_train, cfg["min_len"], cfg["max_extra_pad"],
                                             cfg["batch_size"], g)
                x, mask, idx = batches.pop()
                loss = nn.functional.cross_entropy(model(x, mask), ds.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                task.advance(1)
                if (step + 1) % every == 0 or step + 1 == cfg["steps"]:
                    steps.append(step + 1)
                    curve.append(_evaluate(model, test, ds.y_test)[0])
            acc_eval, acc_train = _evaluate(model, test, ds.y_test)
            runs[method].append({"seed": seed, "eval_acc": acc_eval, "train_mode_acc": acc_train,
                                 "gap": acc_train - acc_eval, "steps": steps, "test_acc": curve,
                                 "final_loss": float(loss.detach())})
    valid = [float(m.float().mean()) for _, m, _ in test]
    return {"config": cfg, "seeds": list(ctx.seeds), "data": ds.name, "methods": list(METHODS),
            "runs": runs, "test_valid_fraction": sum(valid) / len(valid)}


# -- report ----------------------------------------------------------------------------------------
def _stat(result: dict[str, Any], method: str, key: str) -> dict[str, Any]:
    return summary([r[key] for r in result["runs"][method]])


def _margin(result: dict[str, Any]) -> float:
    stds = [_stat(result, m, k)["std"] for m in METHODS for k in ("eval_acc", "gap")]
    stds = [s for s in stds if s is not None]
    return max(0.01, 2 * (sum(stds) / len(stds) if stds else 0.0))


def _claims(result: dict[str, Any]) -> list[Claim]:
    margin = _margin(result)
    # the size of the gap per seed (a signed mean could cancel gaps of either sign)
    gap_p, gap_m = (summary([abs(r["gap"]) for r in result["runs"][m]])["mean"] for m in METHODS)
    acc_p, acc_m = (_stat(result, m, "eval_acc")["mean"] for m in METHODS)
    return [
        Claim("Masked BN removes the train/eval gap that padding causes plain BN",
              f"mean |train-mode − eval-mode accuracy| over seeds: plain BN {gap_p:.3f}, masked BN "
              f"{gap_m:.3f} (margin {margin:.3f})",
              verdict(gap_m + margin < gap_p, partly=gap_m < gap_p),
              {"gap_plain": gap_p, "gap_masked": gap_m, "margin": margin},
              headline=f"gap {gap_p:.3f} → {gap_m:.3f}"),
        Claim("Masked BN reaches at least plain BN's test accuracy (eval mode)",
              f"eval-mode test accuracy: masked BN {acc_m:.3f} vs plain BN {acc_p:.3f} "
              f"(difference {acc_m - acc_p:+.3f}; margin {margin:.3f})",
              verdict(acc_m >= acc_p - margin / 2, partly=acc_m >= acc_p - margin),
              {"acc_plain": acc_p, "acc_masked": acc_m, "margin": margin},
              headline=f"acc {acc_p:.3f} vs {acc_m:.3f}"),
    ]


@masked_exp.reporter
def _report(result: dict[str, Any]) -> Section:
    fig, axes = new_figure(2, 1)
    ax = axes[0, 0]
    for m in METHODS:
        for i, r in enumerate(result["runs"][m]):
            ax.plot(r["steps"], r["test_acc"], color=_COLORS[m], alpha=0.8, lw=1.4,
                    label=LABELS[m] if i == 0 else None)
    ax.set(xlabel="training step", ylabel="test accuracy (eval mode)",
           title="Eval-mode accuracy during training")
    ax.legend(fontsize=8, loc="lower right")
    ax = axes[0, 1]
    width = 0.38
    for k, key in enumerate(("train_mode_acc", "eval_acc")):
        means = [_stat(result, m, key)["mean"] for m in METHODS]
        stds = [_stat(result, m, key)["std"] for m in METHODS]
        ax.bar([i + (k - 0.5) * width for i in range(len(METHODS))], means, width, yerr=stds, capsize=3,
               color=[_COLORS[m] for m in METHODS], alpha=0.55 if k == 0 else 1.0,
               label="train mode (batch statistics)" if k == 0 else "eval mode (running statistics)")
    ax.set_xticks(range(len(METHODS)), ["plain BN", "masked BN"])
    ax.set(ylabel="test accuracy", title="Train-mode vs eval-mode accuracy")
    ax.legend(fontsize=8, loc="lower right")
    c = result["config"]
    text = (f"{result['data']} images as sequences of rows, random crops of {c['min_len']}.. rows, "
            f"padded per batch to the longest crop + 0..{c['max_extra_pad']} steps (test set: "
            f"{result['test_valid_fraction']:.0%} of positions valid); 1-D conv net with {c['channels']} "
            f"channels, {c['steps']} SGD steps of {c['batch_size']}, {len(result['seeds'])} seed(s). "
            f"Eval-mode test accuracy: "
            + "; ".join(f"{LABELS[m]} {fmt_pm([r['eval_acc'] for r in result['runs'][m]])}, train-mode "
                        f"{fmt_pm([r['train_mode_acc'] for r in result['runs'][m]])}" for m in METHODS) + ".")
    return Section(title="Masked BN on padded sequences", text=text, figures=[("masked", fig)],
                   claims=_claims(result))
