"""The lab's training loop: plain mini-batch SGD on in-memory tensors, full-batch evaluation.

Small and explicit on purpose, so every experiment (and the data-parallel runner) uses the same
pieces:

* :func:`batch_indices` — the sampling order: a fresh random permutation per epoch from a seeded
  generator, cut into batches; the incomplete last batch is dropped (BN needs > 1 sample).
* :func:`make_optimizer` — "sgd", "momentum" (SGD, 0.9) or "adam".
* :func:`train_step` — one forward/backward/update, returns the batch loss.
* :func:`evaluate` — loss and accuracy over a whole set in eval mode (running statistics), or with
  batch statistics (``batch_stats=True``) without disturbing the running buffers.
* :func:`recompute_bn_stats` — exact population statistics for every BN layer ("precise BN", via
  :func:`batchnorm.lifecycle.recalibrate.recalibrate`).
* :func:`train` — the loop: evaluates at step 0 and every ``eval_every`` steps, stops early and
  says so when the loss becomes non-finite or explodes (a diverged run), and returns a
  JSON-ready history.

Determinism: with the same ``seed``, model initialisation (build the model under
``torch.manual_seed(seed)``, see :func:`batchnorm.lab.models.build`) and batch order are the same
in every run on the same machine.

Example:
    >>> from batchnorm.lab.data import load_dataset
    >>> from batchnorm.lab.models import build
    >>> ds = load_dataset()
    >>> net = build("mlp_bn_before", ds.image_shape, ds.num_classes, seed=0)
    >>> hist = train(net, ds, TrainConfig(steps=200, lr=0.1, seed=0))
    >>> hist["final_test_acc"] > 0.9
    True
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "TrainConfig",
    "batch_indices",
    "evaluate",
    "frozen_buffers",
    "make_optimizer",
    "recompute_bn_stats",
    "set_threads",
    "train",
    "train_step",
]


@dataclass
class TrainConfig:
    """What one training run does.

    Attributes:
        steps: optimizer steps.
        batch_size: samples per step (article / paper: 60 for Figure 1).
        lr: learning rate.
        optimizer: "sgd" (plain), "momentum" (SGD with momentum 0.9) or "adam".
        weight_decay: L2 penalty.
        eval_every: evaluate the test set every this many steps (and at step 0 and the last step).
        eval_train: also evaluate the whole training set (eval mode) at those points.
        seed: seed of the batch order.
        max_loss: a batch loss above this (or non-finite) stops the run as diverged.
    """

    steps: int = 500
    batch_size: int = 60
    lr: float = 0.1
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    eval_every: int = 25
    eval_train: bool = False
    seed: int = 0
    max_loss: float = 1e3


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads (default: 1 — the lab's models are too small to gain from more,
    and one thread keeps runs reproducible and fast on 2-core machines). Returns the number set."""
    n = 1 if n is None else max(1, int(n))
    torch.set_num_threads(n)
    return n


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` index batches over ``n`` samples: a new permutation each epoch, tail dropped."""
    if batch_size < 1 or batch_size > n:
        raise ValueError(f"batch_indices: expected 1 <= batch_size <= {n} (the training-set size), "
                         f"got {batch_size}")
    g = torch.Generator().manual_seed(int(seed))
    per_epoch = n // batch_size
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=g)
        for b in range(min(per_epoch, steps - done)):
            yield perm[b * batch_size:(b + 1) * batch_size]
        done += min(per_epoch, steps - done)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names, over all of ``model``'s parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "momentum":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"make_optimizer: unknown optimizer {cfg.optimizer!r}; "
                     f"expected 'sgd', 'momentum' or 'adam'")


def train_step(model: nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor) -> float:
    """One SGD step on a batch (model in train mode); returns the batch's cross-entropy."""
    loss = F.cross_entropy(model(xb), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


@contextlib.contextmanager
def frozen_buffers(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in train mode (batch statistics) and restore every buffer and the mode after."""
    saved = {k: v.clone() for k, v in model.named_buffers()}
    was = model.training
    model.train()
    try:
        yield model
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(saved[k])
        model.train(was)


def _chunks(n: int, chunk: int, min_last: int = 1) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges of ``chunk`` rows; a last range shorter than ``min_last`` joins the one before."""
    out = [(i, min(i + chunk, n)) for i in range(0, n, chunk)]
    if len(out) > 1 and out[-1][1] - out[-1][0] < min_last:
        out[-2:] = [(out[-2][0], n)]
    return out


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_stats: bool = False,
             chunk: int = 4096) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` over ``(x, y)``.

    ``batch_stats=False``: eval mode (BN uses its running statistics). ``True``: train mode, so
    BN normalises each chunk with that chunk's own statistics (running buffers are restored).
    """
    ctx = frozen_buffers(model) if batch_stats else contextlib.nullcontext()
    was = model.training
    total_loss, correct = 0.0, 0
    with ctx, torch.no_grad():
        if not batch_stats:
            model.eval()
        for lo, hi in _chunks(int(x.shape[0]), chunk, min_last=2 if batch_stats else 1):
            logits = model(x[lo:hi])
            total_loss += float(F.cross_entropy(logits, y[lo:hi], reduction="sum"))
            correct += int((logits.argmax(1) == y[lo:hi]).sum())
    model.train(was)
    n = max(int(x.shape[0]), 1)
    loss = total_loss / n
    return (loss if math.isfinite(loss) else None), correct / n  # type: ignore[return-value]


def recompute_bn_stats(model: nn.Module, x: torch.Tensor, *,
                       chunk: int = 1024) -> list[dict[str, torch.Tensor]]:
    """Replace every BN layer's running statistics by the exact statistics of ``x`` ("precise BN").

    A thin wrapper over :func:`batchnorm.lifecycle.recalibrate.recalibrate` (``mode="exact"``): with the
    weights fixed, the BN layers are finalised in dependency order, each over all of ``x`` (in
    chunks of ``chunk`` rows) in eval mode, with the earlier layers already normalising with
    *their* exact statistics — so every layer gets the statistics it will meet at inference. Chunk
    moments come from :meth:`batchnorm.stats.Moments.of` and are merged exactly, count-weighted,
    with :func:`batchnorm.stats.merge_moments` (no EMA). ``running_var`` gets the layer's convention
    (unbiased unless ``running_var_unbiased=False``).

    Returns, per BN layer in forward order, ``{"mean", "var"}`` (float64 copies of the new buffers).
    """
    from batchnorm.core import _bnlayers
    from batchnorm.lifecycle.recalibrate import recalibrate

    batches = [x[lo:hi] for lo, hi in _chunks(int(x.shape[0]), chunk)]
    recalibrate(model, batches, mode="exact", progress=False)
    return [{"mean": m.running_mean.detach().double().clone(), "var": m.running_var.detach().double().clone()}
            for _, m in _bnlayers.iter_bn(model) if getattr(m, "running_mean", None) is not None]


def train(model: nn.Module, data: Any, cfg: TrainConfig, *, advance: Callable[[int], None] | None = None,
          on_step: Callable[[int, nn.Module, float], None] | None = None,
          on_eval: Callable[[int, nn.Module], None] | None = None) -> dict[str, Any]:
    """Train ``model`` on ``data`` (a :class:`batchnorm.lab.data.Dataset`) as ``cfg`` says.

    Args:
        advance: progress callback, called with 1 after each step (and with the rest if stopped early).
        on_step: ``on_step(step, model, loss)`` after each update (step counts from 1).
        on_eval: ``on_eval(step, model)`` at each evaluation point, after the test evaluation.

    Returns:
        JSON-ready dict: ``steps`` (evaluation steps, from 0), ``test_acc``, ``test_loss``,
        ``train_loss`` (mean batch loss since the previous point; None at step 0), ``train_acc``
        (if ``eval_train``), ``diverged`` / ``diverged_at``, ``final_test_acc``,
        ``final_test_loss``, ``wall_s`` and the ``config``.
    """
    t0 = time.perf_counter()
    opt = make_optimizer(model, cfg)
    x, y = data.x_train, data.y_train
    hist: dict[str, Any] = {"steps": [], "test_acc": [], "test_loss": [], "train_loss": []}
    if cfg.eval_train:
        hist["train_acc"] = []

    def record(step: int, recent: list[float]) -> None:
        loss, acc = evaluate(model, data.x_test, data.y_test)
        hist["steps"].append(step)
        hist["test_acc"].append(acc)
        hist["test_loss"].append(loss)
        hist["train_loss"].append(sum(recent) / len(recent) if recent else None)
        if cfg.eval_train:
            hist["train_acc"].append(evaluate(model, x, y)[1])
        if on_eval is not None:
            on_eval(step, model)

    model.train()
    record(0, [])
    recent: list[float] = []
    diverged_at = None
    step = 0
    for step, idx in enumerate(batch_indices(x.shape[0], cfg.batch_size, cfg.steps, cfg.seed), start=1):
        loss = train_step(model, opt, x[idx], y[idx])
        if not math.isfinite(loss) or loss > cfg.max_loss:
            diverged_at = step
            break
        recent.append(loss)
        if on_step is not None:
            on_step(step, model, loss)
        if advance is not None:
            advance(1)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record(step, recent)
            recent = []
    if diverged_at is not None:
        record(diverged_at, recent)
        if advance is not None:
            advance(cfg.steps - diverged_at + 1)
    hist.update(
        diverged=diverged_at is not None,
        diverged_at=diverged_at,
        final_test_acc=hist["test_acc"][-1],
        final_test_loss=hist["test_loss"][-1],
        wall_s=time.perf_counter() - t0,
        config=asdict(cfg),
    )
    return hist
