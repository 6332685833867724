"""Recompute the population statistics of every BN layer exactly, with the weights fixed ("precise BN").

During training ``running_mean``/``running_var`` are an EMA of batch statistics taken while the
weights were still changing, with the noise of each small batch. Before evaluation (after training,
after pruning or weight averaging (SWA), after a domain shift) it pays to recompute them on data:

.. math::

    μ_c = \\frac{1}{n} \\sum_{\\text{batches } b} \\sum_{i ∈ b} x_{ic}, \\qquad
    σ²_c = \\frac{1}{n − 1} \\sum_b \\sum_{i ∈ b} (x_{ic} − μ_c)²

over **all** ``n`` values of channel ``c`` in the data — the exact count-weighted statistics, not an
average of per-batch statistics (batches of different sizes weigh by their size) and not an EMA. Each
batch's ``(count, mean, M2)`` comes from :meth:`batchnorm.stats.Moments.of` on the layer's input
(captured by a forward pre-hook) and they are combined by :func:`batchnorm.stats.merge_moments`
(Chan et al.), in float64. ``running_var`` receives the unbiased ``M2/(n − 1)`` — or the biased
``M2/n`` for layers with ``running_var_unbiased=False`` — and ``num_batches_tracked`` the number of
inputs the layer saw. Works for our modules, ``torch.nn.BatchNorm*`` (incl. SyncBatchNorm, here
on one process) and :class:`~batchnorm.lifecycle.freeze.FrozenBatchNorm`.

**The subtlety: later layers see earlier layers' outputs.** The input of a deep BN layer depends on
the statistics of the BN layers before it. The statistics it will see at inference are those
computed with the earlier layers' *new* statistics, so exact recalibration must finalise layers in
dependency order. Three modes:

* ``mode="exact"`` (default): one probe forward (with autograd) finds which BN layers each BN layer's
  input depends on; layers get a *level* (1 + the highest level they depend on) and each level takes
  one pass over the data, in eval mode, with every earlier level already holding its new
  statistics. Layers on parallel branches share a level (a ResNet's downsample BN and the block's
  first BN). A pass stops as soon as its layers have seen their input, so pass ``k`` runs the
  network only up to level ``k``. Costs ``depth`` partial passes. The dependency probe follows
  autograd edges: a model that detaches tensors or runs parts under ``no_grad`` hides dependencies —
  use ``"layerwise"`` there.
* ``mode="layerwise"``: one pass per BN layer, in the order of their first call (a topological order
  for any feed-forward network). Exact without the probe; costs one partial pass per layer.
* ``mode="fast"``: one pass, every BN layer normalising with the current batch's statistics (training
  maths, buffers not updated) while all layers' inputs are recorded — the approximation of
  fvcore's/timm's "precise BN" (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021): later layers'
  statistics are gathered under batch-statistic normalisation of the earlier ones, which is close for
  large batches. (Our per-layer merge is still the exact pooled variance of what each layer saw.)

Other modules (dropout, ...) run in eval mode, as at inference. The model always gets copies of
the batches, so layers that write their input in place (InPlace-ABN) never alter the data later
passes read. A batch whose input to a layer holds NaN/Inf follows that layer's ``nonfinite``
policy (``"skip"``: left out for that layer and counted in ``report.nonfinite_batches``;
``"raise"``: FloatingPointError); non-finite final statistics are never written (ValueError).
Afterwards every module's train/eval mode and every BN layer's ``momentum`` are restored — also
when an exception interrupts; then the running statistics are also restored to what they were. In
``exact`` and ``layerwise`` mode the data is iterated once per pass and must yield the same batches
each time (a list, or a DataLoader with ``shuffle=False``); a one-shot iterator is refused.

Example:
    >>> report = recalibrate(model, [x for x, _ in loader], progress=False)
    >>> report.passes, report.levels["layer1.0.bn2"]
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core import _bnlayers
from ..stats import Moments, merge_moments

__all__ = ["RecalibrationReport", "recalibrate"]

_OP = "batchnorm.recalibrate"
_MODES = ("exact", "layerwise", "fast")


@dataclass
class RecalibrationReport:
    """What :func:`recalibrate` did: mode, passes over the data, level and value count of each layer."""

    mode: str
    passes: int
    batches: int
    levels: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    #: layer -> batches left out under the layer's nonfinite="skip" (inputs with NaN/Inf)
    nonfinite_batches: dict[str, int] = field(default_factory=dict)


class _StopForward(Exception):
    """Raised from a pre-hook once every layer of the current level has seen its input."""


def _default_forward(model: nn.Module, batch: Any) -> Any:
    x = batch[0] if isinstance(batch, tuple | list) else batch
    return model(x)


def _copied(batch: Any) -> Any:
    """``batch`` with every tensor (also inside tuples, lists and dicts) cloned."""
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, tuple | list):
        items = [_copied(b) for b in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    if isinstance(batch, dict):
        return type(batch)((k, _copied(v)) for k, v in batch.items())
    return batch


class _Acc:
    """Running float64 merge of per-batch moments for one layer."""

    def __init__(self, policy: str = "update", name: str = "") -> None:
        self.m: Moments | None = None
        self.calls = 0
        self.policy, self.name, self.skipped = policy, name, 0

    def add(self, x: torch.Tensor, axis: int) -> None:
        part = Moments.of(x.detach(), axis)
        part = Moments(part.count.double(), part.mean.double(), part.m2.double())
        if not bool(torch.isfinite(part.mean).all() & torch.isfinite(part.m2).all()):
            # the layer's own nonfinite policy, as in training: "skip" drops this batch for the layer,
            # "raise" stops (recalibrate restores everything); "update" folds it in (and _write refuses)
            if self.policy == "skip":
                self.skipped += 1
                return
            if self.policy == "raise":
                raise FloatingPointError(f"{_OP}: the input of layer {self.name or '<model>'} in one batch "
                                         f"holds NaN or Inf (its nonfinite='raise'); nothing was changed. "
                                         f"Clean the data, or build the layer with nonfinite='skip'")
        self.calls += 1
        if self.m is None:
            self.m = part
            return
        m = self.m
        self.m = merge_moments(torch.stack([m.count, part.count]), torch.stack([m.mean, part.mean]),
                               torch.stack([m.m2, part.m2]))


class _Bar:
    """A rich progress bar, imported only when shown."""

    def __init__(self, enabled: bool, total: int | None, what: str) -> None:
        self._p = None
        if enabled:
            from rich.progress import Progress

            self._p = Progress(transient=True)
            self._p.start()
            self._task = self._p.add_task(what, total=total)

    def advance(self) -> None:
        if self._p is not None:
            self._p.advance(self._task)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()


def _probe(model: nn.Module, layers: dict[str, nn.Module], batch: Any, fwd: Callable, with_deps: bool
           ) -> tuple[list[str], dict[str, int], dict[str, set[str]]]:
    """Run one forward; return the layers in first-call order, their calls and their BN dependencies."""
    order: list[str] = []
    calls: dict[str, int] = dict.fromkeys(layers, 0)
    deps: dict[str, set[str]] = {n: set() for n in layers}
    dummies = {n: torch.zeros((), dtype=torch.float64, requires_grad=True) for n in layers}
    leaf_names = {id(d): n for n, d in dummies.items()}
    memo: dict[Any, frozenset[str]] = {}

    def reach(fn: Any) -> frozenset[str]:
        if fn is None:
            return frozenset()
        stack = [(fn, False)]
        while stack:
            node, done = stack.pop()
            if node in memo:
                continue
            if done:
                found: set[str] = set()
                var = getattr(node, "variable", None)
                if var is not None and id(var) in leaf_names:
                    found.add(leaf_names[id(var)])
                for nxt, _ in node.next_functions:
                    if nxt is not None:
                        found |= memo[nxt]
                memo[node] = frozenset(found)
            else:
                stack.append((node, True))
                stack.extend((nxt, False) for nxt, _ in node.next_functions
                             if nxt is not None and nxt not in memo)
        return memo[fn]

    handles = []

    def pre(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if calls[name] == 0:
                order.append(name)
            calls[name] += 1
            if with_deps and args and isinstance(args[0], torch.Tensor):
                deps[name] |= reach(args[0].grad_fn)

        return hook

    def post(name: str):
        def hook(module: nn.Module, args: tuple, out: Any) -> Any:
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                return out + dummies[name].to(out.dtype)  # + 0: same values, an autograd edge to this layer
            return None

        return hook

    try:
        for n, m in layers.items():
            handles.append(m.register_forward_pre_hook(pre(n)))
            if with_deps:
                handles.append(m.register_forward_hook(post(n)))
        with torch.enable_grad() if with_deps else torch.no_grad():
            fwd(model, batch)
    finally:
        for h in handles:
            h.remove()
    return order, calls, deps


def _levels(order: list[str], names: Iterable[str], deps: dict[str, set[str]],
            layerwise: bool) -> dict[str, int]:
    rank = {n: i for i, n in enumerate(order)}
    levels: dict[str, int] = {}
    for i, n in enumerate(order):
        if layerwise:
            levels[n] = i + 1
        else:  # edges only to layers first called earlier: a reused layer cannot depend on itself
            levels[n] = 1 + max((levels[d] for d in deps[n] if d in rank and rank[d] < i), default=0)
    last = max(levels.values(), default=0) + 1
    for n in names:  # not called in the probe: collected after everything else, if called at all
        levels.setdefault(n, last)
    return levels


def _run_pass(model: nn.Module, fwd: Callable, data: Callable[[], Iterable[Any]],
              layers: dict[str, nn.Module], accs: dict[str, _Acc], expected: dict[str, int], *,
              early: bool, bar: _Bar) -> int:
    """One pass over the data recording the inputs of ``layers``; returns the number of batches.

    With ``early``, a forward is cut short (``_StopForward`` from the pre-hook) as soon as every layer
    has seen as many inputs as in the probe: nothing after them matters for this pass.
    """
    seen: dict[str, int] = {}
    stop_at = {n: expected.get(n, 0) for n in layers}
    early = early and all(v > 0 for v in stop_at.values())

    def hook_for(name: str, m: nn.Module):
        axis = _bnlayers.channel_axis(m)

        def hook(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor) or args[0].numel() == 0:
                return
            accs[name].add(args[0], axis)
            seen[name] = seen.get(name, 0) + 1
            if early and all(seen.get(k, 0) >= v for k, v in stop_at.items()):
                raise _StopForward

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n, m)) for n, m in layers.items()]
    count = 0
    try:
        with torch.no_grad():
            for batch in data():
                seen.clear()
                with contextlib.suppress(_StopForward):
                    fwd(model, batch)
                count += 1
                bar.advance()
    finally:
        for h in handles:
            h.remove()
    return count


def _write(m: nn.Module, acc: _Acc, name: str) -> int:
    mom = acc.m
    n = int(mom.count.item())
    if n <= 1:
        raise ValueError(f"{_OP}: layer {name or '<model>'} saw {n} value(s) per channel; the variance "
                         f"needs at least 2. Recalibrate with more or larger batches")
    var = mom.unbiased_var() if _bnlayers.running_var_unbiased(m) else mom.var
    mean, var = mom.mean.to(m.running_mean.dtype), var.to(m.running_var.dtype)
    if not bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
        raise ValueError(f"{_OP}: the recalibrated statistics of layer {name or '<model>'} are not finite in "
                         f"{m.running_var.dtype} (a batch held NaN/Inf, or values whose variance overflows); "
                         f"nothing was changed. Clean the data, or build the layer with nonfinite='skip' to "
                         f"leave such batches out")
    with torch.no_grad():
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        if getattr(m, "num_batches_tracked", None) is not None:
            m.num_batches_tracked.fill_(acc.calls)
    return n


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    mode: str = "exact",
    num_batches: int | None = None,
    layers: Sequence[str] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
) -> RecalibrationReport:
    """Recompute every BN layer's running statistics exactly over ``batches`` (see the module docstring).

    Args:
        model: any ``nn.Module``; its BN layers with running statistics are recalibrated in place.
        batches: the data: tensors, or tuples/lists whose first element is the input (a DataLoader).
            Re-iterable (list, DataLoader without shuffling) for ``mode="exact"``/``"layerwise"``.
        mode: ``"exact"`` (default), ``"layerwise"`` or ``"fast"``.
        num_batches: use only the first ``num_batches`` batches (default all).
        layers: names of the BN layers to recalibrate (default all with running statistics).
        forward: ``forward(model, batch)`` runs the model on one batch (move it to the device here);
            default ``model(batch)`` or ``model(batch[0])``.
        progress: show a rich progress bar (``progress=False`` to switch it off).

    Returns:
        A :class:`RecalibrationReport`. Layers that saw no input are left unchanged and listed in
        ``skipped``.

    Raises:
        ValueError / TypeError for bad arguments, no batches, no BN layers, or a layer with fewer than 2
        values per channel; the model is left as it was (statistics, modes and momenta).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_OP}: expected model to be a torch.nn.Module, got {type(model).__name__}")
    if mode not in _MODES:
        raise ValueError(f"{_OP}: expected mode to be one of {_MODES}, got {mode!r}")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"{_OP}: expected num_batches to be a positive int or None, got {num_batches!r}")
    if forward is not None and not callable(forward):
        raise TypeError(f"{_OP}: expected forward to be callable forward(model, batch), got {forward!r}")
    if isinstance(batches, torch.Tensor) or not isinstance(batches, Iterable):
        raise TypeError(f"{_OP}: expected batches to be an iterable of batches (a list or a DataLoader), got "
                        f"{type(batches).__name__}; wrap a single tensor as [x]")
    if mode != "fast" and iter(batches) is batches:
        raise TypeError(f"{_OP}: mode={mode!r} iterates the data once per pass, but batches is a one-shot "
                        f"iterator; pass a list or a DataLoader (shuffle=False), or use mode='fast'")
    user_fwd = forward or _default_forward

    def fwd(model: nn.Module, batch: Any) -> Any:
        # Each pass reads the same batches again; a layer that writes its input in place (InPlaceABN,
        # ReLU(inplace=True), x.relu_() in a forward) must never alter them: the model gets copies.
        return user_fwd(model, _copied(batch))
    found = {n: m for n, m in _bnlayers.iter_bn(model) if getattr(m, "running_mean", None) is not None}
    found = _bnlayers.select_layers(_OP, found, layers, "BN layers with running statistics")
    if not found:
        raise ValueError(f"{_OP}: {type(model).__name__} has no BN layer with running statistics to "
                         f"recalibrate")

    def data() -> Iterable[Any]:
        return itertools.islice(batches, num_batches) if num_batches is not None else batches

    try:
        total = len(batches)  # type: ignore[arg-type]
        total = min(total, num_batches) if num_batches is not None else total
    except TypeError:
        total = num_batches

    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in found.values() if hasattr(m, "momentum")]
    saved = {n: (m.running_mean.detach().clone(), m.running_var.detach().clone(),
                 None if getattr(m, "num_batches_tracked", None) is None else m.num_batches_tracked.clone())
             for n, m in found.items()}
    bar: _Bar | None = None
    try:
        model.eval()
        report = RecalibrationReport(mode=mode, passes=0, batches=0)
        if mode == "fast":
            plan = [list(found)]
            report.levels = dict.fromkeys(found, 1)
            for m, _ in momenta:
                m.momentum = 0.0  # batch statistics normalise; the buffers stay as they are
                m.train()
            expected: dict[str, int] = {}
        else:
            first = next(iter(data()), None)
            if first is None:
                raise ValueError(f"{_OP}: batches is empty; give at least one batch")
            order, expected, deps = _probe(model, found, first, fwd, with_deps=mode == "exact")
            report.levels = _levels(order, found, deps, layerwise=mode == "layerwise")
            depth = max(report.levels.values())
            plan = [[n for n in found if report.levels[n] == k] for k in range(1, depth + 1)]
            plan = [p for p in plan if p]
        bar = _Bar(progress, None if total is None else total * len(plan), f"recalibrating BN ({mode})")
        accs = {n: _Acc(getattr(m, "nonfinite", "update"), n) for n, m in found.items()}
        for level_layers in plan:
            count = _run_pass(model, fwd, data, {n: found[n] for n in level_layers}, accs, expected,
                              early=mode != "fast", bar=bar)
            if count == 0:
                raise ValueError(f"{_OP}: batches is empty; give at least one batch")
            report.passes += 1
            report.batches = count
            for n in level_layers:  # finalise this level before the next pass uses it
                if accs[n].skipped:
                    report.nonfinite_batches[n] = accs[n].skipped
                if accs[n].m is None:
                    report.skipped.append(n)
                else:
                    report.counts[n] = _write(found[n], accs[n], n)
    except BaseException:
        with torch.no_grad():
            for n, m in found.items():
                mean, var, nbt = saved[n]
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                if nbt is not None:
                    m.num_batches_tracked.copy_(nbt)
        raise
    finally:
        if bar is not None:
            bar.close()
        for m, momentum in momenta:
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    return report
