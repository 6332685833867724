"""Hook-based diagnostics: are the running statistics right for this data, and are units saturated?

Two questions a practitioner asks of a BN network, answered by watching forward passes:

1. **The train/eval gap.** In eval mode each BN layer normalises with its running estimates
   ``(μ_run, σ²_run)``. If the data now flowing through the layer has different statistics
   ``(μ_B, σ²_B)`` (a small or unrepresentative training batch size, a domain shift, an EMA that has
   not caught up, weights changed after the statistics were gathered) the layer's output is no longer
   standardised and accuracy drops between train and eval mode. Per channel ``c`` we report

   .. math::

       \\text{shift}_c = \\frac{|μ_{B,c} − μ_{run,c}|}{\\sqrt{σ²_{run,c} + ε}}, \\qquad
       \\text{ratio}_c = \\frac{σ²_{B,c} + ε}{σ²_{run,c} + ε}

   (a shift of 0.5 moves every normalised value by half a standard deviation; a ratio of 4 doubles
   their spread). ``σ²_B`` uses the same convention as the layer's ``running_var``: unbiased
   (``m2 / (n − 1)``, PyTorch) or biased (``running_var_unbiased=False``). A layer is **flagged**
   when ``max_c shift_c > shift_threshold`` or ``ratio_c`` leaves
   ``[1 / var_ratio_threshold, var_ratio_threshold]`` for some channel. The data statistics are the
   exact count-weighted merge (:func:`batchnorm.stats.merge_moments`) of every batch the layer saw
   while attached, compared with the running statistics the layer held before its last batch.

2. **Saturation** (reference article 004, Ioffe & Szegedy's Figure 1). For chosen modules we record
   the 15th/50th/85th (configurable) percentiles of the pre-activation values and the fraction of
   saturated units: ``|z| > threshold`` for sigmoid (default 4: σ'(4) ≈ 0.018, 7 % of its maximum)
   and tanh (default 2: tanh'(2) ≈ 0.07), ``z ≤ 0`` for relu (the unit outputs 0 and passes no
   gradient; measured on a ReLU's output this is "== 0").

Usage::

    with BNDiagnostics(model, watch={"act1": "sigmoid"}) as diag:
        model.eval()
        for x, _ in loader:
            model(x)
    report = diag.report()
    report.flagged                # names of the BN layers whose running stats disagree with the data
    json.dump(report.to_dict(), f)

Works with our modules, every ``torch.nn.BatchNorm*`` (incl. SyncBatchNorm) and FrozenBatchNorm.
Only forward (pre-)hooks are used; they are removed on exit (also when the block raises), and they
never change the model's outputs, parameters or buffers. Statistics are computed under
``torch.no_grad`` in float64 for the comparison.

Percentiles use ``torch.quantile`` (linear interpolation, as ``numpy.percentile``'s default). A tensor
with more than ``max_values`` elements is subsampled uniformly without replacement with a private,
fixed-seed generator (the global RNG is untouched), so large activations stay cheap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..core import _bnlayers
from ..stats import Moments, merge_moments

__all__ = [
    "ActivationRecord",
    "BNCallRecord",
    "BNDiagnostics",
    "BNLayerReport",
    "DiagnosticsReport",
    "Watch",
    "WatchReport",
    "diagnose",
]

_OP = "batchnorm.diagnostics"
_SATURATION_KINDS = ("sigmoid", "tanh", "relu")
_DEFAULT_THRESHOLD = {"sigmoid": 4.0, "tanh": 2.0, "relu": 0.0}
_ACTIVATION_MODULES = (nn.Sigmoid, nn.Tanh, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU,
                       nn.Hardtanh, nn.Softplus, nn.Hardsigmoid, nn.Hardswish, nn.Mish, nn.SELU, nn.CELU)


@dataclass(frozen=True)
class Watch:
    """What to record for one watched module.

    Args:
        saturation: ``"sigmoid"``, ``"tanh"``, ``"relu"`` or None (percentiles only).
        threshold: saturation threshold on ``|z|`` for sigmoid/tanh (defaults 4.0 / 2.0); unused for relu.
        where: ``"input"`` or ``"output"`` of the module, or ``"auto"``: the input of an activation
            module (``nn.Sigmoid``, ``nn.Tanh``, ``nn.ReLU``, ...: its pre-activation), else the output
            (e.g. a Linear or BN layer feeding the activation).
        per_unit: also record percentiles and saturation of every unit (channel) separately, over the
            other axes (the paper's Figure 1 follows one unit); default False (all units pooled).
        channel_axis: the unit axis for ``per_unit`` (1 for ``(N, C, ...)``; -1 for channels-last).
    """

    saturation: str | None = None
    threshold: float | None = None
    where: str = "auto"
    per_unit: bool = False
    channel_axis: int = 1


@dataclass
class ActivationRecord:
    """One forward call of a watched module: percentiles (keys like ``"p15"``) and saturated fraction.

    With ``Watch(per_unit=True)``, ``unit_percentiles[key][c]`` and ``unit_saturation[c]`` are those of
    unit ``c`` alone.
    """

    call: int
    step: int | None
    numel: int
    percentiles: dict[str, float]
    saturation: float | None
    mean: float
    std: float
    unit_percentiles: dict[str, list[float]] | None = None
    unit_saturation: list[float] | None = None


@dataclass
class WatchReport:
    name: str
    kind: str
    where: str
    saturation_kind: str | None
    threshold: float | None
    records: list[ActivationRecord] = field(default_factory=list)


@dataclass
class BNCallRecord:
    """Summary of one forward call of a BN layer: this batch against the running statistics held then."""

    call: int
    step: int | None
    training: bool
    count: int
    max_mean_shift: float | None
    mean_mean_shift: float | None
    min_var_ratio: float | None
    max_var_ratio: float | None


@dataclass
class BNLayerReport:
    """One BN layer over every batch it saw: merged data statistics vs running statistics.

    ``mean_shift`` and ``var_ratio`` are per channel (see the module docstring); they are None when the
    layer tracks no running statistics. ``reasons`` says why a layer is flagged.
    """

    name: str
    kind: str
    num_features: int
    calls: int
    count: int
    running_var_unbiased: bool
    data_mean: list[float]
    data_var: list[float]
    running_mean: list[float] | None
    running_var: list[float] | None
    mean_shift: list[float] | None
    var_ratio: list[float] | None
    max_mean_shift: float | None
    min_var_ratio: float | None
    max_var_ratio: float | None
    flagged: bool
    reasons: list[str]
    history: list[BNCallRecord] = field(default_factory=list)


@dataclass
class DiagnosticsReport:
    """Everything recorded; ``to_dict()`` gives JSON-ready data (non-finite floats become None)."""

    shift_threshold: float
    var_ratio_threshold: float
    bn: list[BNLayerReport]
    watched: list[WatchReport]

    @property
    def flagged(self) -> list[str]:
        """Names of the BN layers whose running statistics disagree with the data."""
        return [r.name for r in self.bn if r.flagged]

    def layer(self, name: str) -> BNLayerReport:
        for r in self.bn:
            if r.name == name:
                return r
        names = [r.name for r in self.bn]
        raise KeyError(f"{_OP}: no BN layer named {name!r} in this report; layers: {names}")

    def watch(self, name: str) -> WatchReport:
        for w in self.watched:
            if w.name == name:
                return w
        raise KeyError(f"{_OP}: no watched module named {name!r}; watched: {[w.name for w in self.watched]}")

    def to_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _check_positive(name: str, value: object, *, above_one: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value) and value > 0
    if not ok:
        raise ValueError(f"{_OP}: expected {name} to be a positive finite number, got {value!r}")
    if above_one and value < 1:
        raise ValueError(f"{_OP}: expected {name} >= 1 (ratios outside [1/t, t] are flagged), got {value!r}")
    return float(value)


def _normalise_watch(model: nn.Module, watch: object) -> dict[str, Watch]:
    if watch is None:
        return {}
    if isinstance(watch, str):
        raise TypeError(f"{_OP}: expected watch to be a list of module names or a dict name -> Watch/str, "
                        f"got the string {watch!r}; write watch=[{watch!r}]")
    if isinstance(watch, Mapping):
        items = list(watch.items())
    elif isinstance(watch, Iterable):
        items = [(n, None) for n in watch]
    else:
        raise TypeError(f"{_OP}: expected watch to be a list of module names or a dict name -> Watch/str, "
                        f"got {type(watch).__name__}")
    modules = dict(model.named_modules())
    out: dict[str, Watch] = {}
    for name, spec in items:
        if name not in modules:
            known = [n for n in modules if n][:20]
            raise ValueError(f"{_OP}: watch names module {name!r}, which is not in the model; "
                             f"named modules include {known}")
        if spec is None or isinstance(spec, str):
            spec = Watch(saturation=spec)
        if not isinstance(spec, Watch):
            raise TypeError(f"{_OP}: expected watch[{name!r}] to be a Watch, a saturation kind "
                            f"{_SATURATION_KINDS} or None, got {spec!r}")
        if spec.saturation is not None and spec.saturation not in _SATURATION_KINDS:
            raise ValueError(f"{_OP}: unknown saturation kind {spec.saturation!r} for {name!r}; expected one "
                             f"of {_SATURATION_KINDS} or None")
        if spec.where not in ("auto", "input", "output"):
            raise ValueError(f"{_OP}: expected where='auto', 'input' or 'output' for {name!r}, "
                             f"got {spec.where!r}")
        if spec.threshold is not None:
            _check_positive(f"threshold of {name!r}", spec.threshold)
        if isinstance(spec.channel_axis, bool) or not isinstance(spec.channel_axis, int):
            raise TypeError(f"{_OP}: expected an int channel_axis for {name!r}, got {spec.channel_axis!r}")
        out[name] = spec
    return out


class BNDiagnostics:
    """Context manager that records BN statistics and activation percentiles/saturation.

    Args:
        model: any ``nn.Module``.
        layers: names of the BN layers to record (default: every BN layer in the model).
        watch: modules whose activations to record: a list of names, or a dict name -> saturation kind
            (``"sigmoid"``, ``"tanh"``, ``"relu"``) or :class:`Watch`.
        percentiles: which percentiles (0–100) to record for watched modules. Default (15, 50, 85).
        shift_threshold: flag a layer when some channel's standardized mean shift exceeds it. Default 0.5.
        var_ratio_threshold: flag a layer when some channel's variance ratio leaves
            ``[1/t, t]``. Default 2.0.
        max_values: subsample watched tensors above this many elements for the percentiles.
        history: keep one summary per forward call (for plots over training steps). Default True.

    ``step`` (attribute, default None) is copied into every record; set it from the training loop.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), BatchNorm1d(8), nn.Sigmoid())
        >>> with BNDiagnostics(model, watch={"2": "sigmoid"}) as diag:
        ...     _ = model(torch.randn(32, 4))
        >>> rep = diag.report(); rep.watch("2").records[0].percentiles.keys()
        dict_keys(['p15', 'p50', 'p85'])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Sequence[str] | None = None,
        watch: Sequence[str] | Mapping[str, Watch | str | None] | None = None,
        percentiles: Sequence[float] = (15, 50, 85),
        shift_threshold: float = 0.5,
        var_ratio_threshold: float = 2.0,
        max_values: int = 1_000_000,
        history: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{_OP}: expected model to be a torch.nn.Module, got {type(model).__name__}")
        self.shift_threshold = _check_positive("shift_threshold", shift_threshold)
        self.var_ratio_threshold = _check_positive("var_ratio_threshold", var_ratio_threshold, above_one=True)
        if isinstance(max_values, bool) or not isinstance(max_values, int) or max_values < 2:
            raise ValueError(f"{_OP}: expected max_values to be an int >= 2, got {max_values!r}")
        self.max_values = max_values
        ps = list(percentiles)
        for p in ps:
            if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 100:
                raise ValueError(f"{_OP}: expected percentiles in [0, 100], got {p!r}")
        self.percentiles = ps
        self.history = bool(history)
        self.model = model
        self._bn = _bnlayers.select_layers(_OP, dict(_bnlayers.iter_bn(model)), layers)
        self._watch = _normalise_watch(model, watch)
        self.step: int | None = None
        self._handles: list[Any] = []
        self.reset()

    # -- lifecycle ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything recorded so far (hooks stay attached)."""
        self._moments: dict[str, list[Moments]] = {n: [] for n in self._bn}
        self._last_running: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {n: None for n in self._bn}
        self._calls: dict[str, list[BNCallRecord]] = {n: [] for n in self._bn}
        self._ncalls: dict[str, int] = dict.fromkeys(list(self._bn) + list(self._watch), 0)
        self._records: dict[str, list[ActivationRecord]] = {n: [] for n in self._watch}
        self._gen = torch.Generator().manual_seed(0)

    def attach(self) -> BNDiagnostics:
        if self._handles:
            raise RuntimeError(f"{_OP}: hooks are already attached; use one `with` block at a time")
        try:
            for name, m in self._bn.items():
                self._handles.append(m.register_forward_pre_hook(self._bn_hook(name, m)))
            modules = dict(self.model.named_modules())
            for name, spec in self._watch.items():
                m = modules[name]
                where = spec.where
                if where == "auto":
                    where = "input" if isinstance(m, _ACTIVATION_MODULES) else "output"
                if where == "input":
                    self._handles.append(m.register_forward_pre_hook(self._watch_pre_hook(name)))
                else:
                    self._handles.append(m.register_forward_hook(self._watch_hook(name)))
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> BNDiagnostics:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- hooks --------------------------------------------------------------------------------
    def _bn_hook(self, name: str, m: nn.Module):
        def hook(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor) or args[0].numel() == 0:
                return
            with torch.no_grad():
                self._record_bn(name, m, args[0].detach())

        return hook

    def _record_bn(self, name: str, m: nn.Module, x: torch.Tensor) -> None:
        axis = _bnlayers.channel_axis(m)
        mom = Moments.of(x, axis)
        mom = Moments(mom.count.double(), mom.mean.double(), mom.m2.double())
        self._moments[name].append(mom)
        call = self._ncalls[name]
        self._ncalls[name] += 1
        rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
        running = None
        if rm is not None and rv is not None:
            running = (rm.detach().double().clone(), rv.detach().double().clone())
        self._last_running[name] = running
        if not self.history:
            return
        shift = ratio = None
        if running is not None:
            shift, ratio = self._compare(m, mom, running)
        self._calls[name].append(BNCallRecord(
            call=call, step=self.step, training=bool(m.training), count=int(mom.count.item()),
            max_mean_shift=None if shift is None else float(shift.max()),
            mean_mean_shift=None if shift is None else float(shift.mean()),
            min_var_ratio=None if ratio is None else float(ratio.min()),
            max_var_ratio=None if ratio is None else float(ratio.max()),
        ))

    @staticmethod
    def _data_var(m: nn.Module, mom: Moments) -> torch.Tensor:
        return mom.unbiased_var() if _bnlayers.running_var_unbiased(m) else mom.var

    def _compare(self, m: nn.Module, mom: Moments, running: tuple[torch.Tensor, torch.Tensor]):
        eps = float(getattr(m, "eps", 1e-5))
        rm, rv = running
        shift = (mom.mean - rm).abs() / torch.sqrt(rv.clamp_min(0) + eps)
        ratio = (self._data_var(m, mom) + eps) / (rv.clamp_min(0) + eps)
        return shift, ratio

    def _watch_values(self, name: str, t: object) -> None:
        if isinstance(t, tuple | list) and t:
            t = t[0]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
            return
        with torch.no_grad():
            self._record_watch(name, t.detach())

    def _watch_pre_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self._watch_values(name, args[0] if args else None)

        return hook

    def _watch_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            self._watch_values(name, output)

        return hook

    def _record_watch(self, name: str, t: torch.Tensor) -> None:
        spec = self._watch[name]
        flat = t.reshape(-1).to(torch.float64)
        n = flat.numel()
        if n > self.max_values:
            idx = torch.randperm(n, generator=self._gen)[: self.max_values].to(flat.device)
            sample = flat[idx]
        else:
            sample = flat
        q = torch.tensor([p / 100.0 for p in self.percentiles], dtype=torch.float64, device=flat.device)
        vals = torch.quantile(sample, q).tolist() if self.percentiles else []
        pct = {_pkey(p): float(v) for p, v in zip(self.percentiles, vals)}
        sat = None if spec.saturation is None else float(_saturated(flat, spec).double().mean())
        unit_pct = unit_sat = None
        if spec.per_unit:
            unit_pct, unit_sat = self._per_unit(name, t, spec, q)
        call = self._ncalls[name]
        self._ncalls[name] += 1
        self._records[name].append(ActivationRecord(
            call=call, step=self.step, numel=n, percentiles=pct, saturation=sat,
            mean=float(flat.mean()), std=float(flat.std(correction=0)),
            unit_percentiles=unit_pct, unit_saturation=unit_sat,
        ))

    def _per_unit(self, name: str, t: torch.Tensor, spec: Watch, q: torch.Tensor):
        if t.ndim < 2 or not -t.ndim <= spec.channel_axis < t.ndim:
            raise ValueError(f"{_OP}: Watch(per_unit=True, channel_axis={spec.channel_axis}) on {name!r} "
                             f"needs a tensor with that axis, got shape {tuple(t.shape)}")
        units = t.movedim(spec.channel_axis, 0).reshape(t.shape[spec.channel_axis], -1).to(torch.float64)
        c, m = units.shape
        if c * m > self.max_values and m > 2:
            keep = max(2, self.max_values // c)
            units = units[:, torch.randperm(m, generator=self._gen)[:keep].to(units.device)]
        unit_pct = None
        if self.percentiles:
            vals = torch.quantile(units, q, dim=1)  # (P, C)
            unit_pct = {_pkey(p): vals[i].tolist() for i, p in enumerate(self.percentiles)}
        unit_sat = None
        if spec.saturation is not None:
            unit_sat = _saturated(units, spec).double().mean(dim=1).tolist()
        return unit_pct, unit_sat

    # -- results ------------------------------------------------------------------------------
    def report(self) -> DiagnosticsReport:
        """Plain-data summary of everything recorded so far (see :class:`DiagnosticsReport`)."""
        bn_reports = []
        for name, m in self._bn.items():
            parts = self._moments[name]
            if not parts:
                continue
            merged = merge_moments(torch.stack([p.count for p in parts]),
                                   torch.stack([p.mean for p in parts]),
                                   torch.stack([p.m2 for p in parts]))
            running = self._last_running[name]
            data_var = self._data_var(m, merged)
            shift = ratio = None
            reasons: list[str] = []
            if running is not None:
                shift, ratio = self._compare(m, merged, running)
                worst = int(torch.argmax(torch.nan_to_num(shift, nan=math.inf)))
                if not bool(torch.isfinite(shift).all() & torch.isfinite(ratio).all()):
                    reasons.append("non-finite statistics (NaN/Inf in the data or the running buffers)")
                if float(shift[worst]) > self.shift_threshold:
                    reasons.append(f"channel {worst}: mean shift {float(shift[worst]):.3g} running std "
                                   f"> {self.shift_threshold:g}")
                lo, hi = int(torch.argmin(ratio)), int(torch.argmax(ratio))
                t = self.var_ratio_threshold
                if float(ratio[hi]) > t:
                    reasons.append(f"channel {hi}: variance ratio data/running {float(ratio[hi]):.3g} "
                                   f"> {t:g}")
                if float(ratio[lo]) < 1.0 / t:
                    reasons.append(f"channel {lo}: variance ratio data/running {float(ratio[lo]):.3g} "
                                   f"< {1.0 / t:.3g}")
            bn_reports.append(BNLayerReport(
                name=name, kind=type(m).__name__, num_features=int(merged.mean.numel()),
                calls=len(parts), count=int(merged.count.item()),
                running_var_unbiased=_bnlayers.running_var_unbiased(m),
                data_mean=merged.mean.tolist(), data_var=data_var.tolist(),
                running_mean=None if running is None else running[0].tolist(),
                running_var=None if running is None else running[1].tolist(),
                mean_shift=None if shift is None else shift.tolist(),
                var_ratio=None if ratio is None else ratio.tolist(),
                max_mean_shift=None if shift is None else float(shift.max()),
                min_var_ratio=None if ratio is None else float(ratio.min()),
                max_var_ratio=None if ratio is None else float(ratio.max()),
                flagged=bool(reasons), reasons=reasons, history=list(self._calls[name]),
            ))
        watched = []
        modules = dict(self.model.named_modules())
        for name, spec in self._watch.items():
            m = modules[name]
            where = spec.where if spec.where != "auto" else (
                "input" if isinstance(m, _ACTIVATION_MODULES) else "output")
            thr = None
            if spec.saturation in ("sigmoid", "tanh"):
                thr = spec.threshold if spec.threshold is not None else _DEFAULT_THRESHOLD[spec.saturation]
            watched.append(WatchReport(name=name, kind=type(m).__name__, where=where,
                                       saturation_kind=spec.saturation, threshold=thr,
                                       records=list(self._records[name])))
        return DiagnosticsReport(self.shift_threshold, self.var_ratio_threshold, bn_reports, watched)


def _saturated(z: torch.Tensor, spec: Watch) -> torch.Tensor:
    """Boolean mask of saturated values: ``z <= 0`` (relu), ``|z| > threshold`` (sigmoid/tanh)."""
    if spec.saturation == "relu":
        return z <= 0
    thr = spec.threshold if spec.threshold is not None else _DEFAULT_THRESHOLD[spec.saturation]
    return z.abs() > thr


def _pkey(p: float) -> str:
    return f"p{int(p)}" if float(p).is_integer() else f"p{p:g}"


def diagnose(model: nn.Module, batches: Iterable[Any], **kwargs: Any) -> DiagnosticsReport:
    """Run ``model`` on every batch under ``torch.no_grad`` in its current mode and return the report.

    A batch is a tensor, or a tuple/list whose first element is the input (``(x, y)`` from a
    DataLoader). Keyword arguments go to :class:`BNDiagnostics`. Call ``model.eval()`` first to
    measure the train/eval gap of the running statistics; in train mode the running statistics
    move with every batch (each batch is compared with the statistics held before it).
    """
    with BNDiagnostics(model, **kwargs) as diag, torch.no_grad():
        for batch in batches:
            x = batch[0] if isinstance(batch, tuple | list) else batch
            model(x)
    return diag.report()
