"""Turn ``results.json`` into the report: PNG figures, a self-contained HTML page, a claims list.

The report is made **only** from the JSON results (the nanoGPT habit: results to JSON, plots from
those files), so it can be rebuilt at any time without training anything::

    batchnorm demo --from-results bn-report/results.json          # or, in Python:
    from batchnorm.lab.report import regenerate
    regenerate("bn-report/results.json")

``results.json`` layout::

    {"meta": {...run facts: data set, seeds, quick, threads, versions, wall/CPU time...},
     "experiments": {NAME: {"help", "config", "result", "wall_s", "cpu_s", "error"}},
     "claims": [...]}        # written by the report: the verdicts computed from the results

The HTML file embeds every figure as a base64 PNG and needs nothing else to display.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from .registry import AGREES, DISAGREES, PARTLY, Claim, Section, get

__all__ = ["build_sections", "load_results", "regenerate", "sanitize", "write_report", "write_results"]

RESULTS_FILE = "results.json"
REPORT_FILE = "report.html"


def sanitize(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats -> None, tuples -> lists, numpy/torch values -> Python."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str | int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [sanitize(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays/scalars, torch tensors
        return sanitize(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(
        f"report: cannot store a {type(obj).__name__} in results.json; return plain lists, dicts, "
        f"numbers and strings from an experiment"
    )


def write_results(results: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write ``results`` (sanitised, strict JSON) to ``out/results.json``; returns the path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(sanitize(results), indent=1, allow_nan=False))
    tmp.replace(path)
    return path


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``results.json`` (a directory holding one works too)."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_FILE
    if not p.is_file():
        raise FileNotFoundError(
            f"report: no results file at {str(p)!r}; run `batchnorm demo` first or pass the "
            f"path of a results.json"
        )
    data = json.loads(p.read_text())
    if not isinstance(data, dict) or "experiments" not in data:
        raise ValueError(f"report: {str(p)!r} is not a lab results file (no 'experiments' key)")
    return data


def build_sections(results: dict[str, Any]) -> list[tuple[str, Section | None, str | None]]:
    """``(name, section, error)`` per experiment in ``results``, in report order."""
    out = []
    items = list(results["experiments"].items())
    order = {}
    for name, _ in items:
        try:
            order[name] = get(name).order
        except KeyError:
            order[name] = 10_000
    for name, entry in sorted(items, key=lambda kv: (order[kv[0]], kv[0])):
        if entry.get("error"):
            out.append((name, None, f"the run failed: {entry['error']}"))
            continue
        try:
            exp = get(name)
        except KeyError:
            out.append((name, None, "no experiment of this name is installed; cannot draw its report"))
            continue
        if exp.report is None:
            out.append((name, None, "this experiment has no report function"))
            continue
        try:
            out.append((name, exp.report(entry["result"]), None))
        except Exception as e:  # a broken plot must not lose the other sections
            out.append((name, None, f"the report function failed: {type(e).__name__}: {e}"))
    return out


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


_BADGE = {AGREES: "#1a7f37", PARTLY: "#b7791f", DISAGREES: "#c53030"}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1150px;margin:2em auto;
padding:0 1em;color:#1f2328;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;width:100%;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:.35em .6em;text-align:left;vertical-align:top}
th{background:#f6f8fa} .v{color:#fff;border-radius:4px;padding:.1em .5em;white-space:nowrap;font-weight:600}
img{max-width:100%;border:1px solid #eee;margin:.5em 0} .meta{color:#57606a;font-size:.9em}
pre{background:#f6f8fa;padding:.6em;overflow:auto;font-size:.85em} .err{color:#c53030}
"""


def _badge(v: str) -> str:
    return f'<span class="v" style="background:{_BADGE.get(v, "#57606a")}">{html.escape(v)}</span>'


def _claims_table(rows: list[tuple[str, Claim]]) -> str:
    body = "".join(
        f"<tr><td>{html.escape(e)}</td><td>{html.escape(c.claim)}</td><td>{html.escape(c.measured)}</td>"
        f"<td>{_badge(c.verdict)}</td></tr>"
        for e, c in rows
    )
    return (
        "<table><tr><th>experiment</th><th>claim</th><th>what the run measured</th><th>verdict</th></tr>"
        f"{body}</table>"
    )


def _disagreements(claims: list[Claim]) -> str:
    """A sentence for every claim the run does not (fully) support, so it cannot be missed."""
    off = [c for c in claims if c.verdict != AGREES]
    if not off:
        return ""
    items = "".join(f"<li>{_badge(c.verdict)} {html.escape(c.claim)}: the run measured "
                    f"{html.escape(c.headline or c.measured)}.</li>" for c in off)
    return f"<p><b>Where this run does not (fully) agree:</b></p><ul>{items}</ul>"


def write_report(results: dict[str, Any], out: str | os.PathLike) -> dict[str, Any]:
    """Write the PNG figures and ``report.html`` into ``out`` from ``results`` alone.

    Returns ``{"html": path, "figures": [paths], "claims": [(experiment, Claim)], "errors": {...}}``
    and stores the claims (as JSON) back into ``results["claims"]``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections = build_sections(results)
    claims: list[tuple[str, Claim]] = []
    figures: list[Path] = []
    errors: dict[str, str] = {}
    parts: list[str] = []
    for name, sec, err in sections:
        entry = results["experiments"][name]
        if sec is None:
            errors[name] = err or "unknown error"
            parts.append(f"<h2>{html.escape(name)}</h2><p class='err'>{html.escape(errors[name])}</p>")
            continue
        claims += [(name, c) for c in sec.claims]
        imgs = []
        for stem, fig in sec.figures:
            data = _png(fig)
            path = out / f"{stem}.png"
            path.write_bytes(data)
            figures.append(path)
            imgs.append(
                f'<img alt="{html.escape(stem)}" src="data:image/png;base64,'
                f'{base64.b64encode(data).decode()}">'
            )
        timing = f"{entry.get('wall_s', 0):.1f} s" if entry.get("wall_s") is not None else ""
        parts.append(
            f"<h2>{html.escape(sec.title)}</h2><p class='meta'><code>batchnorm run "
            f"{html.escape(name)}</code> "
            f"&middot; {html.escape(entry.get('help', ''))} &middot; {timing}</p>"
            f"<p><b>What the run shows.</b> {html.escape(sec.text)}</p>"
            + (_claims_table([(name, c) for c in sec.claims]) if sec.claims else "")
            + _disagreements(sec.claims)
            + "".join(imgs)
            + "<details><summary>configuration</summary><pre>"
            + html.escape(json.dumps(entry.get("config", {}), indent=1))
            + "</pre></details>"
        )
    meta = results.get("meta", {})
    data = meta.get("data", {})
    counts = {v: sum(1 for _, c in claims if c.verdict == v) for v in (AGREES, PARTLY, DISAGREES)}
    head = (
        f"<h1>What Batch Normalization does: lab report</h1>"
        f"<p class='meta'>data: <b>{html.escape(str(data.get('name', '?')))}</b> "
        f"({data.get('n_train', '?')} train / {data.get('n_test', '?')} test images of shape "
        f"{data.get('image_shape', '?')}, preprocessing {html.escape(str(data.get('preprocessing', '?')))}) "
        f"&middot; "
        f"seeds {meta.get('seeds', '?')} &middot; "
        f"{'quick mode' if meta.get('quick') else 'full configuration'} "
        f"&middot; {meta.get('jobs', 1)} job(s) x {meta.get('threads', '?')} thread(s) "
        f"&middot; wall time {meta.get('wall_s', 0) or 0:.1f} s "
        f"&middot; torch {html.escape(str(meta.get('torch', '?')))} &middot; created "
        f"{html.escape(str(meta.get('created', '')))}</p>"
        f"<p class='meta'>command: <code>{html.escape(str(meta.get('command', '')))}</code></p>"
        f"<p>Each claim from the literature (Ioffe &amp; Szegedy 2015 and the reference articles) is checked "
        f"against this run; the verdict is computed from the numbers in <code>results.json</code>, not "
        f"written "
        f"in advance. Verdicts: {counts[AGREES]} agree, {counts[PARTLY]} partly, {counts[DISAGREES]} do not "
        f"agree. Spreads are the standard deviation over seeds.</p>"
        f"<h2>Claims at a glance</h2>{_claims_table(claims)}"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>batchnorm lab report</title>"
        f"<style>{_CSS}</style></head><body>{head}{''.join(parts)}"
        f"<p class='meta'>Rebuild this page from the results alone: "
        f"<code>batchnorm demo --from-results {RESULTS_FILE}</code></p></body></html>"
    )
    path = out / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    results["claims"] = [{"experiment": e, **c.to_json()} for e, c in claims]
    return {"html": path, "figures": figures, "claims": claims, "errors": errors}


def regenerate(results_path: str | os.PathLike, out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Rebuild figures and ``report.html`` from a ``results.json`` (into its directory by default)."""
    p = Path(results_path)
    results = load_results(p)
    target = Path(out) if out is not None else (p if p.is_dir() else p.parent)
    info = write_report(results, target)
    results.setdefault("meta", {})["report_regenerated"] = _dt.datetime.now().isoformat(timespec="seconds")
    write_results(results, target)
    return info
