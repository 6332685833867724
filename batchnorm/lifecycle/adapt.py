"""Test-time adaptation of BN networks to shifted data: statistics adaptation and TENT.

When the test data shift (noise, contrast, a new sensor) the running statistics a BN network learnt
on its training ("source") data no longer standardise the activations, and accuracy drops. Two
remedies that need no labels:

**Statistics adaptation** (Schneider et al., "Improving robustness against common corruptions by
covariate shift adaptation", NeurIPS 2020; also Li et al.'s AdaBN, 2016). Replace each layer's
source statistics ``(μ_s, σ²_s)`` by the target data's ``(μ_t, σ²_t)``, or blend them with a prior
strength ``N`` (a pseudo-count of source *samples*) against the ``n`` target samples:

.. math::

    \\bar μ = \\frac{N μ_s + n μ_t}{N + n}, \\qquad \\bar σ² = \\frac{N σ²_s + n σ²_t}{N + n}

(``N = 0`` is pure target statistics; ``N → ∞`` keeps the source). As in the paper the variances
are blended directly (no between-means term). ``n`` counts samples along the batch axis, not values
per channel, so ``N`` means the same for a layer at 8×8 and one at 56×56.

* :func:`adapt` — offline: the target moments over a whole unlabelled data set, exact and in
  dependency order, computed by :func:`batchnorm.lifecycle.recalibrate.recalibrate` (float64
  merge of :class:`batchnorm.stats.Moments`). With a prior the layers are adapted one at a time in
  call order, each layer's target moments measured while every earlier layer already normalises
  with *its blended* statistics — the statistics it will meet at inference.
* :class:`OnlineAdaptation` — online: every incoming eval-mode batch is normalised with its own
  statistics (``prior=0``; the biased batch variance, exactly training-mode normalisation) or with
  the blend against the source statistics (``n`` = the batch size). A switch: ``enable()`` /
  ``disable()``, or a ``with`` block; the stored statistics never change.

**TENT** (Wang et al., "Tent: Fully test-time adaptation by entropy minimization", ICLR 2021). The
BN layers normalise with batch statistics and only their affine parameters ``γ, β`` are trained,
to minimise the mean Shannon entropy of the predictions,

.. math::

    \\mathcal L = -\\frac{1}{B} \\sum_i \\sum_k p_{ik} \\log p_{ik}, \\qquad p_i = \\mathrm{softmax}(z_i)

with everything else frozen (``requires_grad=False``). :func:`configure_tent` prepares the model
and returns a :class:`TentSession` that undoes it (``restore()``); :func:`adapt_step` is one
update; :func:`tent` is the loop over unlabelled batches. Differences from the reference code:
the running statistics are kept (the layers train with ``momentum=0``, so the buffers do not
move, and ``num_batches_tracked`` is restored), and modules other than BN run in eval mode
(dropout off, as at inference).

Published numbers (TENT's Table 2, WRN-28-10, CIFAR-10-C severity 5, mean error): source 43.5 %,
BN statistics adaptation 20.4 %, TENT 18.6 %. ``batchnorm run adaptation`` repeats the
comparison on corrupted digits.

All tools work on our modules, ``torch.nn.BatchNorm*`` and (statistics only)
:class:`~batchnorm.lifecycle.freeze.FrozenBatchNorm`; they validate every argument before the first
write and, on an exception, leave the model as it was (statistics, γ/β, modes, ``requires_grad``,
momenta). Each returns a report of what changed per layer, measured as
:class:`~batchnorm.lifecycle.diagnostics.BNDiagnostics` measures the train/eval gap:
``shift_c = |μ_new − μ_old| / sqrt(σ²_old + ε)`` and ``ratio_c = (σ²_new + ε) / (σ²_old + ε)``.

Example:
    >>> report = adapt(model, [x for x, _ in target_loader], prior=16)   # Schneider's blend
    >>> report.layers["layer1.0.bn1"].max_mean_shift
    >>> with OnlineAdaptation(model.eval(), prior=0):                   # per-batch statistics
    ...     logits = model(x_test)
    >>> result = tent(model, target_batches)                            # entropy minimisation on γ/β
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..core import _bnlayers
from ..stats import Moments
from .freeze import FrozenBatchNorm
from .recalibrate import recalibrate

__all__ = [
    "AdaptationReport",
    "LayerShift",
    "OnlineAdaptation",
    "TentResult",
    "TentSession",
    "adapt",
    "adapt_step",
    "configure_tent",
    "entropy",
    "tent",
]

_OP = "batchnorm.adapt"
_MODES = ("exact", "layerwise", "fast")


# -- reports -------------------------------------------------------------------------------------
@dataclass
class LayerShift:
    """How one layer's normalisation statistics moved: per channel and summarised.

    ``mean_shift[c] = |μ_new − μ_old| / sqrt(σ²_old + ε)``, ``var_ratio[c] = (σ²_new + ε)/(σ²_old + ε)``
    (as :class:`~batchnorm.lifecycle.diagnostics.BNDiagnostics`). ``samples`` is the number of target
    samples ``n`` the layer saw, ``values`` the values per channel, ``target_weight`` ``n / (N + n)``.
    """

    name: str
    samples: float
    values: int
    target_weight: float
    mean_shift: list[float]
    var_ratio: list[float]
    max_mean_shift: float
    mean_mean_shift: float
    min_var_ratio: float
    max_var_ratio: float


@dataclass
class AdaptationReport:
    """What :func:`adapt` did: ``method`` ("replace" or "blend"), ``prior`` N, recalibration ``mode``,
    passes over the data and a :class:`LayerShift` per adapted layer (``skipped``: saw no input).

    ``restore()`` puts the source statistics back (the report keeps a copy of them).
    """

    method: str
    prior: float
    mode: str
    passes: int
    layers: dict[str, LayerShift] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    _saved: dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]] = field(default_factory=dict, repr=False)

    def restore(self) -> None:
        """Put back the running statistics (and ``num_batches_tracked``) the layers held before."""
        _put_stats(self._saved)

    def to_dict(self) -> dict[str, Any]:
        # not asdict(self): it would deep-copy the saved tensors and the modules they belong to
        d = {"method": self.method, "prior": self.prior, "mode": self.mode, "passes": self.passes,
             "layers": {n: asdict(s) for n, s in self.layers.items()}, "skipped": list(self.skipped)}
        return _finite(d)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _shift(m: nn.Module, name: str, old: tuple[torch.Tensor, torch.Tensor], samples: float, values: int,
           weight: float) -> LayerShift:
    eps = float(getattr(m, "eps", 1e-5))
    om, ov = old[0].double(), old[1].double().clamp_min(0)
    nm, nv = m.running_mean.detach().double(), m.running_var.detach().double().clamp_min(0)
    shift = (nm - om).abs() / torch.sqrt(ov + eps)
    ratio = (nv + eps) / (ov + eps)
    return LayerShift(name=name, samples=float(samples), values=int(values), target_weight=float(weight),
                      mean_shift=shift.tolist(), var_ratio=ratio.tolist(),
                      max_mean_shift=float(shift.max()), mean_mean_shift=float(shift.mean()),
                      min_var_ratio=float(ratio.min()), max_var_ratio=float(ratio.max()))


# -- shared checks and state ---------------------------------------------------------------------
def _check_model(op: str, model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: expected model to be a torch.nn.Module, got {type(model).__name__}")


def _check_prior(op: str, prior: object, *, allow_none: bool) -> float | None:
    if prior is None and allow_none:
        return None
    ok = (not isinstance(prior, bool) and isinstance(prior, int | float) and math.isfinite(prior)
          and prior >= 0)
    if not ok:
        none = " or None (replace)" if allow_none else ""
        raise ValueError(f"{op}: expected prior (Schneider et al.'s N, a pseudo-count of source samples) to "
                         f"be a finite number >= 0{none}, got {prior!r}; e.g. prior=16")
    return float(prior)


def _stat_layers(op: str, model: nn.Module, layers: Sequence[str] | None) -> dict[str, nn.Module]:
    found = {n: m for n, m in _bnlayers.iter_bn(model) if getattr(m, "running_mean", None) is not None}
    found = _bnlayers.select_layers(op, found, layers, "BN layers with running statistics")
    if not found:
        raise ValueError(f"{op}: {type(model).__name__} has no BN layer with running statistics to adapt")
    return found


def _save_stats(layers: dict[str, nn.Module]) -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    out = {}
    for n, m in layers.items():
        nbt = getattr(m, "num_batches_tracked", None)
        out[n] = (m, (m.running_mean.detach().clone(), m.running_var.detach().clone())
                  + (() if nbt is None else (nbt.detach().clone(),)))
    return out


def _put_stats(saved: dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]]) -> None:
    with torch.no_grad():
        for m, vals in saved.values():
            m.running_mean.copy_(vals[0])
            m.running_var.copy_(vals[1])
            if len(vals) > 2:
                m.num_batches_tracked.copy_(vals[2])


class _SampleCounter:
    """Pre-hooks that record, per layer, samples (batch axis) and values per channel of every input.

    ``recalibrate`` reports values per channel; the blend counts samples. Their ratio over all inputs a
    layer saw converts one into the other (exact when every input has the same size per sample).
    """

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.samples = dict.fromkeys(layers, 0)
        self.values = dict.fromkeys(layers, 0)
        self._handles = [m.register_forward_pre_hook(self._hook(n, m)) for n, m in layers.items()]

    def _hook(self, name: str, m: nn.Module):
        axis = _bnlayers.channel_axis(m)

        def hook(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor) and args[0].numel() > 0:
                x = args[0]
                self.samples[name] += int(x.shape[0])
                self.values[name] += x.numel() // max(int(x.shape[axis]), 1)

        return hook

    def samples_for(self, name: str, values: int) -> float:
        v = self.values[name]
        return values * self.samples[name] / v if v else 0.0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _blend_into(m: nn.Module, source: tuple[torch.Tensor, ...], prior: float, n: float) -> float:
    """Write ``(N·source + n·target)/(N + n)`` (target = what the buffers hold now) into the buffers."""
    w = n / (prior + n) if prior + n > 0 else 1.0
    with torch.no_grad():
        for buf, src in ((m.running_mean, source[0]), (m.running_var, source[1])):
            blended = (1.0 - w) * src.double() + w * buf.double()
            buf.copy_(blended.to(buf.dtype))
    return w


# -- statistics adaptation (offline) -------------------------------------------------------------
def adapt(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    prior: float | None = None,
    mode: str = "exact",
    num_batches: int | None = None,
    layers: Sequence[str] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = False,
) -> AdaptationReport:
    """Adapt every BN layer's running statistics to unlabelled target data (see the module docstring).

    Args:
        model: any ``nn.Module``; its BN layers with running statistics are adapted in place.
        batches: the target data: tensors, or tuples/lists whose first element is the input. Re-iterable
            (a list, a DataLoader without shuffling) unless ``mode="fast"``.
        prior: ``None`` (default) or ``0``: replace the statistics by the target's exact moments. A number
            ``N > 0``: Schneider et al.'s blend ``(N·source + n·target)/(N + n)`` per layer, ``n`` = the
            target samples the layer saw.
        mode: how the target moments are gathered, as :func:`~batchnorm.lifecycle.recalibrate.recalibrate`:
            ``"exact"`` (default; dependency order), ``"layerwise"`` or ``"fast"`` (one pass, batch
            statistics, blend applied at the end). With a prior, ``"exact"`` and ``"layerwise"`` adapt
            one layer per call of ``recalibrate`` in call order (one partial pass per layer).
        num_batches, layers, forward, progress: as for ``recalibrate`` (``progress`` default False).

    Returns:
        An :class:`AdaptationReport` (per layer: samples, values, shift of mean and variance ratio).

    Raises:
        TypeError / ValueError for bad arguments, empty data, no BN layer or a layer with fewer than 2
        values per channel; the model is then left as it was.
    """
    _check_model(_OP, model)
    p = _check_prior(_OP, prior, allow_none=True)
    if mode not in _MODES:
        raise ValueError(f"{_OP}: expected mode to be one of {_MODES}, got {mode!r}")
    found = _stat_layers(_OP, model, layers)
    blend = p is not None and p > 0
    if blend and mode != "fast":  # the probe below reads the data before recalibrate checks it
        if isinstance(batches, torch.Tensor) or not isinstance(batches, Iterable):
            raise TypeError(f"{_OP}: expected batches to be an iterable of batches (a list or a DataLoader), "
                            f"got {type(batches).__name__}; wrap a single tensor as [x]")
        if iter(batches) is batches:
            raise TypeError(f"{_OP}: mode={mode!r} iterates the data once per layer, but batches is a "
                            f"one-shot iterator; pass a list or a DataLoader (shuffle=False), or mode='fast'")
        if forward is not None and not callable(forward):
            raise TypeError(f"{_OP}: expected forward to be callable forward(model, batch), got {forward!r}")
    saved = _save_stats(found)
    report = AdaptationReport(method="blend" if blend else "replace", prior=p or 0.0, mode=mode, passes=0,
                              _saved=saved)
    kw = {"num_batches": num_batches, "forward": forward, "progress": progress}
    counter = _SampleCounter(found)
    try:
        if not blend or mode == "fast":  # one recalibration; the blend (if any) afterwards, all layers
            rec = recalibrate(model, batches, mode=mode, layers=list(found), **kw)
            report.passes, report.skipped = rec.passes, list(rec.skipped)
            for n in found:
                if n in rec.counts:
                    _blend_layer(report, found[n], n, saved[n][1], p or 0.0, rec.counts[n], counter)
        else:  # blend in call order: each layer's target moments under the earlier layers' blends
            for n in _call_order(model, found, batches, forward):
                one = recalibrate(model, batches, mode="layerwise", layers=[n], **kw)
                report.passes += one.passes
                if n in one.counts:
                    _blend_layer(report, found[n], n, saved[n][1], float(p), one.counts[n], counter)
                else:
                    report.skipped.append(n)
    except BaseException:
        _put_stats(saved)
        raise
    finally:
        counter.remove()
    report.layers = {n: report.layers[n] for n in found if n in report.layers}
    return report


def _call_order(model: nn.Module, found: dict[str, nn.Module], batches: Iterable[Any],
                forward: Callable[[nn.Module, Any], Any] | None) -> list[str]:
    """The layers in the order of their first call on the first batch (eval mode, no_grad), then the rest."""
    first = next(iter(batches), None)
    if first is None:
        raise ValueError(f"{_OP}: batches is empty; give at least one batch")
    order: list[str] = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if name not in order:
                order.append(name)

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in found.items()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            (forward or _default_forward)(model, first)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return order + [n for n in found if n not in order]


def _blend_layer(report: AdaptationReport, m: nn.Module, name: str, source: tuple[torch.Tensor, ...],
                 prior: float, values: int, counter: _SampleCounter) -> None:
    n = counter.samples_for(name, values)
    w = _blend_into(m, source, prior, n) if prior > 0 else 1.0
    report.layers[name] = _shift(m, name, (source[0], source[1]), n, values, w)


# -- statistics adaptation (online) --------------------------------------------------------------
class OnlineAdaptation:
    """Normalise each incoming batch with its own statistics, or their blend with the source statistics.

    In eval mode a BN layer normalises with its buffers. While this switch is on, each watched layer's
    forward first computes the batch's per-channel mean and *biased* variance (two-pass,
    :meth:`batchnorm.stats.Moments.of`), puts ``(N·source + n·batch)/(N + n)`` (``n`` = batch size) into
    the buffers for this one call, and puts the source statistics back right after it — so outputs use
    the adapted statistics and the stored statistics never change. ``prior=0`` gives exactly
    training-mode normalisation (up to rounding). Layers in training mode already use batch statistics
    and are left alone (except :class:`~batchnorm.lifecycle.freeze.FrozenBatchNorm`, which always uses
    its buffers). The statistics are constants for autograd (computed under ``no_grad``).

    Args:
        model: any ``nn.Module`` (put it in eval mode yourself).
        prior: N, the source statistics' pseudo-count of samples (default 0: the batch's own statistics).
        layers: names of the BN layers to adapt (default all with running statistics).

    Use ``enable()`` / ``disable()`` (idempotent), or ``with OnlineAdaptation(model, prior=16): ...``.
    Each batch needs at least 2 values per channel.
    """

    def __init__(self, model: nn.Module, *, prior: float = 0.0, layers: Sequence[str] | None = None) -> None:
        op = "batchnorm.OnlineAdaptation"
        _check_model(op, model)
        self.prior = float(_check_prior(op, prior, allow_none=False))  # type: ignore[arg-type]
        self.model = model
        self.layers = _stat_layers(op, model, layers)
        self._handles: list[Any] = []
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._handles)

    def enable(self) -> OnlineAdaptation:
        if not self._handles:
            for n, m in self.layers.items():
                self._handles.append(m.register_forward_pre_hook(self._pre(n, m)))
                self._handles.append(m.register_forward_hook(self._post(n), always_call=True))
        return self

    def disable(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for n in list(self._pending):
            self._put_back(n)

    def __enter__(self) -> OnlineAdaptation:
        return self.enable()

    def __exit__(self, *exc: object) -> None:
        self.disable()

    def _put_back(self, name: str) -> None:
        mean, var = self._pending.pop(name)
        m = self.layers[name]
        with torch.no_grad():
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)

    def _pre(self, name: str, m: nn.Module):
        axis = _bnlayers.channel_axis(m)
        frozen = isinstance(m, FrozenBatchNorm)

        def hook(module: nn.Module, args: tuple) -> None:
            if (module.training and not frozen) or not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            if name in self._pending:  # a call that raised before its post-hook ran
                self._put_back(name)
            if x.ndim < 2 or not -x.ndim <= axis < x.ndim or x.shape[axis] != module.running_mean.numel():
                return  # the layer's own input check gives the clear error
            with torch.no_grad():
                mom = Moments.of(x.detach(), axis)
                if int(mom.count.item()) < 2:
                    raise ValueError(f"batchnorm.OnlineAdaptation: layer {name or '<model>'} got "
                                     f"{int(mom.count.item())} value(s) per channel; batch statistics "
                                     f"need at least 2. Use larger batches, or disable() for this input")
                src = (module.running_mean.detach().clone(), module.running_var.detach().clone())
                n = float(x.shape[0])
                w = n / (self.prior + n)
                mean = (1.0 - w) * src[0].double() + w * mom.mean.double()
                var = (1.0 - w) * src[1].double() + w * mom.var.double()
                self._pending[name] = src
                module.running_mean.copy_(mean.to(module.running_mean.dtype))
                module.running_var.copy_(var.to(module.running_var.dtype))

        return hook

    def _post(self, name: str):
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if name in self._pending:
                self._put_back(name)

        return hook


# -- TENT ----------------------------------------------------------------------------------------
def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy ``−Σ_k p_k log p_k`` of ``softmax(logits)`` over dim 1, per sample (nats)."""
    logp = logits.log_softmax(1)
    return -(logp.exp() * logp).sum(1)


def _tent_layers(op: str, model: nn.Module, layers: Sequence[str] | None) -> dict[str, nn.Module]:
    found = {n: m for n, m in _bnlayers.iter_bn(model)
             if not isinstance(m, FrozenBatchNorm) and isinstance(getattr(m, "weight", None), nn.Parameter)
             and isinstance(getattr(m, "bias", None), nn.Parameter) and hasattr(m, "momentum")}
    found = _bnlayers.select_layers(op, found, layers, "trainable affine BN layers (FrozenBatchNorm and "
                                    "affine=False layers have no γ/β to adapt)")
    if not found:
        raise ValueError(f"{op}: {type(model).__name__} has no BN layer with affine parameters γ/β to adapt; "
                         f"TENT needs affine=True BN layers (unfreeze() frozen ones)")
    return found


class TentSession:
    """A model configured for TENT (made by :func:`configure_tent`) and the way back.

    Attributes:
        model: the model.
        layers: ``{name: module}`` of the adapted BN layers.

    ``parameters()`` are the γ/β to optimise. ``restore(weights=False)`` puts back every module's
    train/eval mode, every parameter's ``requires_grad``, the layers' momenta and buffers; with
    ``weights=True`` also the γ/β values from before the session. As a context manager it restores on
    exit — the adapted weights are kept, except when the block raises: then everything is restored.
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        self.model = model
        self.layers = layers
        self._modes = [(m, m.training) for m in model.modules()]
        self._grads = [(p, p.requires_grad) for p in model.parameters()]
        self._momenta = [(m, m.momentum) for m in layers.values()]
        self._stats = _save_stats({n: m for n, m in layers.items()
                                   if getattr(m, "running_mean", None) is not None})
        self._weights = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in layers.items()}
        self.active = False

    def _apply(self) -> None:
        self.active = True
        try:
            self.model.eval()
            self.model.requires_grad_(False)
            for m in self.layers.values():
                m.train()  # batch statistics ...
                m.momentum = 0.0  # ... and buffers that do not move
                m.weight.requires_grad_(True)
                m.bias.requires_grad_(True)
        except BaseException:
            self.restore(weights=True)
            raise

    def parameters(self) -> list[nn.Parameter]:
        """The γ and β of every adapted layer (what the optimizer must hold)."""
        return [p for m in self.layers.values() for p in (m.weight, m.bias)]

    def weight_change(self) -> dict[str, dict[str, float]]:
        """Per layer, the largest ``|Δγ|`` and ``|Δβ|`` since the session began."""
        out = {}
        for n, m in self.layers.items():
            w0, b0 = self._weights[n]
            out[n] = {"max_abs_dgamma": float((m.weight.detach() - w0).abs().max()),
                      "max_abs_dbeta": float((m.bias.detach() - b0).abs().max())}
        return out

    def restore(self, *, weights: bool = False) -> None:
        """Undo :func:`configure_tent` (see the class docstring); safe to call more than once."""
        with torch.no_grad():
            if weights:
                for n, m in self.layers.items():
                    m.weight.copy_(self._weights[n][0])
                    m.bias.copy_(self._weights[n][1])
            _put_stats(self._stats)
        for m, momentum in self._momenta:
            m.momentum = momentum
        for p, g in self._grads:
            p.requires_grad_(g)
        for m, training in self._modes:
            m.training = training
        self.active = False

    def __enter__(self) -> TentSession:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.restore(weights=exc_type is not None)


def configure_tent(model: nn.Module, *, layers: Sequence[str] | None = None) -> TentSession:
    """Prepare ``model`` for TENT: BN layers use batch statistics, only their γ/β require grad.

    Every module goes to eval mode, every parameter gets ``requires_grad=False``; then each adapted BN
    layer (all with affine γ/β by default, or those named in ``layers``) goes to training mode with
    ``momentum=0`` (batch statistics; the running buffers do not change) and its γ/β require grad.

    Returns a :class:`TentSession`; ``session.restore()`` undoes all of it.

    Raises:
        TypeError / ValueError for a non-module, unknown layer names, or no BN layer with γ/β; the model is
        then unchanged.
    """
    op = "batchnorm.configure_tent"
    _check_model(op, model)
    session = TentSession(model, _tent_layers(op, model, layers))
    session._apply()
    return session


def _default_forward(model: nn.Module, batch: Any) -> Any:
    x = batch[0] if isinstance(batch, tuple | list) else batch
    return model(x)


@dataclass
class TentStep:
    """One :func:`adapt_step`: the mean entropy minimised and the predictions made before the update."""

    entropy: float
    logits: torch.Tensor


def adapt_step(model: nn.Module, batch: Any, optimizer: torch.optim.Optimizer, *,
               forward: Callable[[nn.Module, Any], Any] | None = None) -> TentStep:
    """One TENT update: forward, mean prediction entropy, backward, ``optimizer.step()``.

    Call it on a model prepared by :func:`configure_tent` (only γ/β require grad, so only they get
    gradients: an optimizer over all parameters still changes only γ/β). The returned logits are the
    predictions for this batch, made before the update (TENT's online protocol).

    Raises:
        TypeError for a non-module, a non-optimizer or an output that is not ``(N, K)`` logits;
        RuntimeError when no parameter requires grad (call :func:`configure_tent` first). The
        parameters are not changed when it raises before ``optimizer.step()``.
    """
    op = "batchnorm.adapt_step"
    _check_model(op, model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{op}: expected a torch.optim.Optimizer over the session's parameters, got "
                        f"{type(optimizer).__name__}; e.g. torch.optim.Adam(session.parameters(), lr=1e-3)")
    if forward is not None and not callable(forward):
        raise TypeError(f"{op}: expected forward to be callable forward(model, batch), got {forward!r}")
    if not any(p.requires_grad for p in model.parameters()):
        raise RuntimeError(f"{op}: no parameter of the model requires grad, so there is nothing to adapt; "
                           f"call configure_tent(model) first")
    out = (forward or _default_forward)(model, batch)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or not out.is_floating_point():
        what = f"a {out.ndim}-D {out.dtype} tensor" if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"{op}: expected the model to return (N, K) float logits, got {what}; pass "
                        f"forward=lambda m, b: m(b)[...] to pick them")
    loss = entropy(out).mean()
    if not loss.requires_grad:
        raise RuntimeError(f"{op}: the entropy does not depend on any parameter; do not run adapt_step under "
                           f"torch.no_grad, and call configure_tent(model) first")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return TentStep(entropy=float(loss.detach()), logits=out.detach())


@dataclass
class TentResult:
    """What :func:`tent` did: mean entropy per step, steps, and per-layer ``|Δγ|``/``|Δβ|`` maxima."""

    steps: int
    entropies: list[float]
    layers: list[str]
    weight_change: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))


def tent(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    optimizer: torch.optim.Optimizer | Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    lr: float = 1e-3,
    epochs: int = 1,
    layers: Sequence[str] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    on_step: Callable[[int, TentStep], None] | None = None,
) -> TentResult:
    """TENT over unlabelled ``batches``: one :func:`adapt_step` per batch, ``epochs`` times.

    Args:
        model: the model to adapt (γ/β of its BN layers change in place).
        batches: tensors or tuples/lists whose first element is the input; re-iterable if ``epochs > 1``.
        optimizer: an optimizer over the session's parameters, or a factory ``params -> optimizer``;
            default TENT's Adam with ``lr`` (1e-3, betas (0.9, 0.999)).
        lr: learning rate of the default optimizer.
        epochs: passes over the data (TENT: 1, online).
        layers: BN layers to adapt (default every affine one).
        forward: ``forward(model, batch)`` returning ``(N, K)`` logits.
        on_step: ``on_step(step, TentStep)`` after each update (e.g. to score the predictions).

    Afterwards the modes, ``requires_grad`` flags, momenta and running statistics are restored and the
    adapted γ/β kept. (They were learnt under batch-statistics normalisation: evaluate in that mode,
    e.g. ``with OnlineAdaptation(model.eval()):``.) On an exception the model is left as it was,
    γ/β included.
    """
    op = "batchnorm.tent"
    _check_model(op, model)
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{op}: expected lr to be a positive finite number, got {lr!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"{op}: expected epochs to be a positive int, got {epochs!r}")
    if isinstance(batches, torch.Tensor) or not isinstance(batches, Iterable):
        raise TypeError(f"{op}: expected batches to be an iterable of batches (a list or a DataLoader), got "
                        f"{type(batches).__name__}; wrap a single tensor as [x]")
    if epochs > 1 and iter(batches) is batches:
        raise TypeError(f"{op}: epochs={epochs} iterates the data more than once, but batches is a one-shot "
                        f"iterator; pass a list or a DataLoader")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and not callable(optimizer):
        raise TypeError(f"{op}: expected optimizer to be a torch.optim.Optimizer, a factory params -> "
                        f"optimizer, or None, got {type(optimizer).__name__}")
    if forward is not None and not callable(forward):
        raise TypeError(f"{op}: expected forward to be callable forward(model, batch), got {forward!r}")
    session = TentSession(model, _tent_layers(op, model, layers))
    entropies: list[float] = []
    with session:
        session._apply()
        if optimizer is None:
            opt = torch.optim.Adam(session.parameters(), lr=float(lr), betas=(0.9, 0.999))
        elif isinstance(optimizer, torch.optim.Optimizer):
            opt = optimizer
        else:
            opt = optimizer(session.parameters())
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"{op}: the optimizer factory returned {type(opt).__name__}, not a "
                                f"torch.optim.Optimizer")
        for _ in range(epochs):
            for batch in batches:
                step = adapt_step(model, batch, opt, forward=forward)
                entropies.append(step.entropy)
                if on_step is not None:
                    on_step(len(entropies), step)
        if not entropies:
            raise ValueError(f"{op}: batches is empty; give at least one batch")
        change = session.weight_change()
    return TentResult(steps=len(entropies), entropies=entropies, layers=list(session.layers),
                      weight_change=change)
