"""The experiment registry: every ``batchnorm/lab/exp_*.py`` module registers its runs here.

How to add an experiment
========================

Create ``batchnorm/lab/exp_<something>.py``; nothing else needs editing. The module is found by
:func:`discover` (``pkgutil`` over this package, every module whose name starts with ``exp_``) the
first time the CLI or the report asks for the list::

    from batchnorm.lab.registry import Claim, Context, Section, experiment, verdict

    @experiment(
        "my_exp",                                   # `batchnorm run my_exp`
        help="one line shown by `batchnorm run --help`",
        demo=False,                                 # part of `batchnorm demo`? (3-minute budget!)
        order=70,                                   # position in the report and the demo
        cost=20,                                    # ~seconds on one core (schedules --jobs 2)
        defaults={"steps": 400, "lr": 0.1},         # options; `--set steps=1000` overrides
        quick={"steps": 40},                        # overrides under --quick (tests, smoke runs)
    )
    def my_exp(ctx: Context) -> dict:
        cfg = ctx.config                            # defaults <- quick <- --set, already merged
        task = ctx.progress.task("my_exp", total=len(ctx.seeds) * cfg["steps"])
        runs = []
        for seed in ctx.seeds:
            ...                                     # train with batchnorm.lab.train.train(...,
            runs.append(history)                    #       advance=task.advance)
        return {"runs": runs}                       # JSON-serialisable: lists, dicts, numbers, str

    @my_exp.reporter
    def _report(result: dict) -> Section:           # result is what run returned, *read back from JSON*
        fig = ...                                   # matplotlib figures (Agg backend)
        ok = ...                                    # compute the verdict from the numbers
        return Section(
            title="My experiment",
            text="what the run shows, in two or three sentences",
            figures=[("my_exp_curves", fig)],       # saved as PNG and embedded in report.html
            claims=[Claim("the claim", "measured: ...", verdict(ok, partly=...))],
        )

Rules the rest of the lab relies on:

* ``run`` returns plain JSON data; the report is made **only** from that (``report.py`` can rebuild
  every figure and verdict from ``results.json`` alone), so put every number a plot needs in it.
* Verdicts are computed from the results with :func:`verdict`, never written down in advance.
* Use ``ctx.seeds`` (several seeds, report mean ± spread), ``ctx.quick`` (tiny configuration) and
  ``ctx.progress`` (progress bars; a no-op in tests).
* Keep the whole default demo (``demo=True`` experiments) within 3 minutes on 2 cores.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "AGREES",
    "DISAGREES",
    "PARTLY",
    "Claim",
    "Context",
    "Experiment",
    "NullProgress",
    "ProgressLike",
    "Section",
    "TaskLike",
    "demo_selection",
    "discover",
    "discovery_errors",
    "experiment",
    "get",
    "merge_config",
    "registered",
    "verdict",
]

AGREES = "agrees"
PARTLY = "partly"
DISAGREES = "does not agree"


# -- progress ---------------------------------------------------------------------------------
class TaskLike(Protocol):
    """One progress bar: ``advance(n)`` after each unit of work."""

    def advance(self, n: int = 1) -> None: ...


class ProgressLike(Protocol):
    """What experiments see as ``ctx.progress``: makes bars."""

    def task(self, description: str, total: int) -> TaskLike: ...


class _NullTask:
    def __init__(self) -> None:
        self.completed = 0

    def advance(self, n: int = 1) -> None:
        self.completed += n


class NullProgress:
    """Progress handle that draws nothing (tests, library use); counts the work it was told about."""

    def __init__(self) -> None:
        self.tasks: dict[str, _NullTask] = {}

    def task(self, description: str, total: int) -> _NullTask:
        t = _NullTask()
        self.tasks[description] = t
        return t


# -- context ----------------------------------------------------------------------------------
@dataclass
class Context:
    """Everything a run function gets.

    Attributes:
        data: the :class:`batchnorm.lab.data.Dataset` (already preprocessed, train/test split).
        seeds: the seeds to repeat each configuration with (``--seeds N`` gives ``0..N-1``).
        quick: ``--quick``: use the tiny configuration.
        out: the output directory (experiments may write extra files there).
        progress: makes progress bars, see :class:`ProgressLike`.
        options: raw ``--set key=value`` overrides (strings), already merged into ``config``.
        config: the experiment's ``defaults``, then its ``quick`` overrides (if quick), then the
            options, coerced to the defaults' types. Filled in by :meth:`Experiment.__call__`.
    """

    data: Any
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    quick: bool = False
    out: Path = field(default_factory=lambda: Path("bn-report"))
    progress: ProgressLike = field(default_factory=NullProgress)
    options: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def _coerce(key: str, raw: Any, like: Any) -> Any:
    """Turn a ``--set key=value`` string into the type of the default ``like``."""
    if not isinstance(raw, str):
        return raw
    try:
        if isinstance(like, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(like, int):
            return int(raw)
        if isinstance(like, float):
            return float(raw)
        if isinstance(like, list | tuple):
            inner = like[0] if like else raw
            return [_coerce(key, p.strip(), inner) for p in raw.split(",") if p.strip()]
        if like is None:  # None defaults accept "none" or a number
            return None if raw.lower() == "none" else float(raw)
    except ValueError:
        raise ValueError(f"option {key}: cannot read {raw!r} as {type(like).__name__} "
                         f"(default {like!r}); e.g. --set {key}={like!r}") from None
    return raw


def merge_config(defaults: dict[str, Any], quick_overrides: dict[str, Any] | None, quick: bool,
                 options: dict[str, Any] | None, name: str = "experiment") -> dict[str, Any]:
    """defaults ← quick overrides (when ``quick``) ← user options, each coerced to the default's type.

    Unknown option keys raise ``ValueError`` naming the known ones.
    """
    cfg = dict(defaults)
    if quick and quick_overrides:
        cfg.update(quick_overrides)
    for key, raw in (options or {}).items():
        if key not in defaults:
            raise ValueError(f"{name}: unknown option {key!r}; known options: {', '.join(sorted(defaults))}")
        cfg[key] = _coerce(key, raw, defaults[key])
    return cfg


# -- report parts -----------------------------------------------------------------------------
@dataclass
class Claim:
    """One claim of the literature, what the run measured, and the verdict computed from it."""

    claim: str
    measured: str
    verdict: str
    numbers: dict[str, Any] = field(default_factory=dict)
    headline: str = ""  # a short form of `measured` for the terminal summary table

    def to_json(self) -> dict[str, Any]:
        return {"claim": self.claim, "measured": self.measured, "verdict": self.verdict,
                "headline": self.headline, "numbers": self.numbers}


@dataclass
class Section:
    """An experiment's part of the report: figures, a short "what the run shows", its claims."""

    title: str
    text: str
    figures: list[tuple[str, Any]] = field(default_factory=list)  # (file stem, matplotlib Figure)
    claims: list[Claim] = field(default_factory=list)


def verdict(agrees: bool, partly: bool = False) -> str:
    """``"agrees"`` if ``agrees``, else ``"partly"`` if ``partly``, else ``"does not agree"``."""
    if agrees:
        return AGREES
    return PARTLY if partly else DISAGREES


# -- experiments ------------------------------------------------------------------------------
@dataclass
class Experiment:
    """A registered experiment; call it with a :class:`Context` to run it."""

    name: str
    help: str
    run: Callable[[Context], dict[str, Any]]
    demo: bool = True
    order: int = 100
    defaults: dict[str, Any] = field(default_factory=dict)
    quick: dict[str, Any] = field(default_factory=dict)
    report: Callable[[dict[str, Any]], Section] | None = None
    cost: float = 1.0

    def config(self, quick: bool = False, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """The configuration a run would use."""
        return merge_config(self.defaults, self.quick, quick, options, self.name)

    def __call__(self, ctx: Context) -> dict[str, Any]:
        ctx.config = self.config(ctx.quick, ctx.options)
        return self.run(ctx)

    def reporter(self, fn: Callable[[dict[str, Any]], Section]) -> Callable[[dict[str, Any]], Section]:
        """Decorator: attach the function that turns this experiment's JSON result into a Section."""
        self.report = fn
        return fn


_REGISTRY: dict[str, Experiment] = {}
_DISCOVERED = False
_ERRORS: dict[str, str] = {}


def experiment(name: str, *, help: str, demo: bool = True, order: int = 100,
               defaults: dict[str, Any] | None = None, quick: dict[str, Any] | None = None,
               cost: float = 1.0) -> Callable[[Callable[[Context], dict[str, Any]]], Experiment]:
    """Decorator that registers ``fn(ctx) -> dict`` as the experiment ``name`` (see the module doc).

    ``cost`` is a rough relative run time (seconds of the default configuration on one core): with
    ``--jobs 2`` the longest experiments start first.
    """
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"experiment: name must be letters, digits, '_' or '-', got {name!r}")
    if quick and set(quick) - set(defaults or {}):
        raise ValueError(f"experiment {name}: quick overrides {sorted(set(quick) - set(defaults or {}))} "
                         f"have no default; add them to defaults")

    def deco(fn: Callable[[Context], dict[str, Any]]) -> Experiment:
        old = _REGISTRY.get(name)
        if old is not None and old.run.__module__ != fn.__module__:
            raise ValueError(f"experiment {name!r} is registered twice ({old.run.__module__} and "
                             f"{fn.__module__}); pick another name")
        exp = Experiment(name=name, help=help, run=fn, demo=demo, order=order,
                         defaults=dict(defaults or {}), quick=dict(quick or {}), cost=float(cost))
        _REGISTRY[name] = exp
        return exp

    return deco


def discover() -> None:
    """Import every ``batchnorm.lab.exp_*`` module once (each registers itself on import)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    from . import __path__ as lab_path

    for info in sorted(pkgutil.iter_modules(lab_path), key=lambda m: m.name):
        if info.name.startswith("exp_"):
            try:
                importlib.import_module(f"{__package__}.{info.name}")
            except Exception as e:  # one broken experiment module must not take the others down
                _ERRORS[info.name] = f"{type(e).__name__}: {e}"
    _DISCOVERED = True


def discovery_errors() -> dict[str, str]:
    """``{module: error}`` for every ``exp_*`` module that failed to import (the CLI warns about them)."""
    discover()
    return dict(_ERRORS)


def registered() -> list[Experiment]:
    """All experiments, in report order."""
    discover()
    return sorted(_REGISTRY.values(), key=lambda e: (e.order, e.name))


def demo_selection() -> list[Experiment]:
    """The experiments ``batchnorm demo`` runs."""
    return [e for e in registered() if e.demo]


def get(name: str) -> Experiment:
    """The experiment called ``name``; ``KeyError`` lists the known names."""
    discover()
    if name not in _REGISTRY:
        raise KeyError(f"no experiment named {name!r}; known: {', '.join(e.name for e in registered())}")
    return _REGISTRY[name]


def names(experiments: Iterable[Experiment] | None = None) -> list[str]:
    return [e.name for e in (registered() if experiments is None else experiments)]
