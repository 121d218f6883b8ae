"""The self-contained HTML report of a run (``index.html``), rendered with jinja2 (autoescape on).

It renders plain data, the records of the result files: each case as its ``results.jsonl`` line
(``summary.json``'s ``"cases"``), and the run's settings, environment and merged inputs as
``summary.json`` holds them. Everything the template shows is prepared here as plain view objects
(strings and numbers, which the template escapes); the only pre-built markup is the per-layer
error chart, an inline SVG whose text is escaped while it is built.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup, escape

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATE = "index.html.j2"
INDEX_FILE = "index.html"
# Shown first in the header's environment table, in this order; other keys follow.
ENV_KEYS = ("git_sha", "device", "python", "torch", "transformers", "ray", "platform", "hostname",
            "cpu_count", "timestamp")
# Columns of a merged report's inputs table after the directory: (heading, summary.json part, key);
# the settings that tell shards or runs apart, and where each ran.
INPUT_COLUMNS = (
    ("matrix", "run", "matrix"), ("setups", "run", "setups"), ("mutation", "run", "mutation"),
    ("device", "run", "device"), ("dtype", "run", "dtype"), ("backend", "run", "backend"),
    ("git sha", "environment", "git_sha"), ("host", "environment", "hostname"),
    ("time", "environment", "timestamp"),
)
# Detail sections, most severe first (skips are listed in their own table).
DETAIL_ORDER = ("fail", "error", "pass")
# A case record's statuses (the result files' contract, docs/harness.md), in the header's order.
STATUSES = ("pass", "fail", "error", "skip")
# A case record's optional keys with the value a missing one stands for.
RECORD_DEFAULTS: dict[str, Any] = {"reason": "", "first_divergence": None, "localization": None,
                                   "sp_matches": None, "metrics": {}, "seconds": 0.0}

# One case as the result files hold it: id, setup, baseline, scenario, model, status and the
# optional keys of ``RECORD_DEFAULTS``.
Record = dict[str, Any]


# --- view objects ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopKRow:
    """One entry of a top-k list; ``mark`` is "candidate"/"baseline" when it is that side's token."""

    rank: int
    token: str
    logprob: str
    mark: str = ""


@dataclass(frozen=True)
class DivergenceView:
    """A first divergence, formatted for display."""

    request_id: str
    step: str
    candidate_token: str
    baseline_token: str
    candidate_logprob: str
    baseline_logprob: str
    logprob_diff: str
    reason: str
    tolerated: str
    differs: bool
    candidate_top_k: list[TopKRow]
    baseline_top_k: list[TopKRow]
    extra: list[tuple[str, str]]


@dataclass(frozen=True)
class CaseView:
    """One case as the report shows it."""

    result: Record
    anchor: str
    seconds: str
    metrics: list[tuple[str, str]]
    divergence: DivergenceView | None
    localization: list[tuple[str, str]]
    chart: Markup | None
    sp: list[tuple[str, str]] = field(default_factory=list)

    @property
    def headline(self) -> str:
        """One line for tooltips: a traceback's last line (the exception), else the reason's first."""
        reason: str = self.result["reason"]
        lines = [ln.strip() for ln in reason.splitlines() if ln.strip()]
        if not lines:
            return str(self.result["status"])
        return lines[-1] if self.result["status"] == "error" else lines[0]


@dataclass(frozen=True)
class GridRow:
    """One setup's row of a model's grid: its baselines and one cell (a list of cases) per scenario."""

    setup: str
    baselines: str
    cells: list[list[CaseView]]


@dataclass(frozen=True)
class Grid:
    """Setups (rows) x scenarios (columns) for one model."""

    model: str
    scenarios: list[str]
    rows: list[GridRow]


@dataclass(frozen=True)
class TimingRow:
    case: CaseView
    percent: float


@dataclass(frozen=True)
class InputRow:
    """One merged input directory: its path and the ``INPUT_COLUMNS`` values."""

    dir: str
    cells: list[str]


@dataclass
class ReportView:
    """Everything ``index.html.j2`` renders."""

    title: str
    totals: dict[str, int]
    total_seconds: str
    environment: list[tuple[str, str]]
    grids: list[Grid]
    details: list[tuple[str, list[CaseView]]]
    skipped: list[CaseView]
    timings: list[TimingRow] = field(default_factory=list)
    run: list[tuple[str, str]] = field(default_factory=list)  # the run settings table
    mutation: str = ""  # the injected mutation(s): a banner says failures are expected
    inputs: list[InputRow] = field(default_factory=list)  # a merge's input directories
    overridden: list[tuple[str, str, str]] = field(default_factory=list)  # (id, dir, later dir)


# --- formatting --------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    """A value as short display text: floats to 6 significant digits, containers as compact JSON."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def fmt_token(token: Any) -> str:
    """A token: ids as they are, text quoted so that whitespace is visible."""
    return json.dumps(token, ensure_ascii=False) if isinstance(token, str) else fmt(token)


def _kv_rows(data: dict[str, Any], skip: Sequence[str] = ()) -> list[tuple[str, str]]:
    return [(str(k), fmt(v)) for k, v in data.items() if k not in skip]


def _anchors(records: Sequence[Record]) -> list[str]:
    """Unique HTML ids derived from the case ids."""
    seen: dict[str, int] = {}
    anchors = []
    for r in records:
        base = "case-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", r["id"])
        n = seen.get(base, 0)
        seen[base] = n + 1
        anchors.append(base if n == 0 else f"{base}-{n}")
    return anchors


# --- divergence and localization ---------------------------------------------------------------

_DIVERGENCE_KEYS = (
    "request_id", "step", "candidate_token", "baseline_token", "candidate_top_k", "baseline_top_k",
    "candidate_logprob", "baseline_logprob", "logprob_diff", "reason", "tolerated",
)


def _top_k(entries: Any, candidate: Any, baseline: Any) -> list[TopKRow]:
    rows = []
    for rank, entry in enumerate(entries or [], start=1):
        pair = isinstance(entry, (list, tuple)) and len(entry) >= 2
        token, logprob = (entry[0], entry[1]) if pair else (entry, None)
        mark = "candidate" if token == candidate else "baseline" if token == baseline else ""
        rows.append(TopKRow(rank, fmt_token(token), fmt(logprob), mark))
    return rows


def divergence_view(div: dict[str, Any]) -> DivergenceView:
    """Format a ``first_divergence`` dict (missing keys show as a dash)."""
    cand, base = div.get("candidate_token"), div.get("baseline_token")
    return DivergenceView(
        request_id=fmt(div.get("request_id")), step=fmt(div.get("step")),
        candidate_token=fmt_token(cand), baseline_token=fmt_token(base),
        candidate_logprob=fmt(div.get("candidate_logprob")),
        baseline_logprob=fmt(div.get("baseline_logprob")),
        logprob_diff=fmt(div.get("logprob_diff")), reason=str(div.get("reason") or ""),
        tolerated=fmt(div.get("tolerated")), differs=cand != base,
        candidate_top_k=_top_k(div.get("candidate_top_k"), cand, base),
        baseline_top_k=_top_k(div.get("baseline_top_k"), cand, base),
        extra=_kv_rows(div, skip=_DIVERGENCE_KEYS),
    )


def _as_float(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _scale(values: list[float | None]) -> tuple[bool, float, float]:
    """(log scale?, low, high) for the finite values; log when all are positive and span > 1e3."""
    finite = [v for v in values if v is not None]
    if not finite:
        return False, 0.0, 1.0
    lo, hi = min(finite), max(finite)
    if lo > 0 and hi / lo > 1e3:  # whole decades, so that the axis reads 1e-07 ... 0.01
        return True, math.ceil(math.log10(lo)) - 1, math.ceil(math.log10(hi))
    lo = min(lo, 0.0)
    return False, lo, hi if hi > lo else lo + 1.0


def _svg_text(x: float, y: float, text: str, cls: str = "tick", anchor: str = "end", tip: str = "") -> str:
    title = f"<title>{escape(tip)}</title>" if tip else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" class="{cls}" text-anchor="{anchor}">{escape(text)}{title}</text>'


def per_layer_chart(errors: Sequence[Any], highlight: int | None = None, height: int = 140) -> Markup:
    """An inline SVG bar chart of per-layer errors; the ``highlight`` layer's bar is red, non-finite
    or missing values are marked with a cross."""
    values = [_as_float(v) for v in errors]
    log, lo, hi = _scale(values)
    bar, gap, left, top, bottom = 18, 4, 64, 10, 22
    width = left + len(values) * (bar + gap) + gap
    floor = height - bottom

    def y(v: float) -> float:
        t = ((math.log10(v) if log else v) - lo) / (hi - lo)
        return floor - (floor - top) * min(max(t, 0.0), 1.0)

    parts = [
        f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f"<title>per-layer error{' (log scale)' if log else ''}</title>",
        f'<line x1="{left}" y1="{floor}" x2="{width}" y2="{floor}" class="axis"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{floor}" class="axis"/>',
        _svg_text(left - 4, top + 4, fmt(10**hi if log else hi)),
        _svg_text(left - 4, floor, fmt(10**lo if log else lo)),
    ]
    if log:
        parts.append(_svg_text(left - 4, (top + floor) / 2, "log"))
    base_y = floor if log else y(max(lo, 0.0))
    for i, (raw, v) in enumerate(zip(errors, values)):
        x = left + gap + i * (bar + gap)
        tip = f"layer {i}: {fmt(raw)}"
        if v is None:
            parts.append(_svg_text(x + bar / 2, floor - 4, "×", "nan", "middle", tip))
        else:
            y0, y1 = sorted((y(v), base_y))
            cls = "bar hl" if i == highlight else "bar"
            parts.append(f'<rect x="{x}" y="{y0:.1f}" width="{bar}" height="{max(y1 - y0, 1):.1f}" '
                         f'class="{cls}"><title>{escape(tip)}</title></rect>')
        if len(values) <= 40 or i % 5 == 0:
            parts.append(_svg_text(x + bar / 2, height - 6, str(i), anchor="middle"))
    parts.append("</svg>")
    return Markup("".join(parts))


def _chart(localization: dict[str, Any] | None) -> Markup | None:
    errors = (localization or {}).get("per_layer_error")
    if not isinstance(errors, (list, tuple)) or not errors:
        return None
    layer = (localization or {}).get("layer")
    return per_layer_chart(errors, layer if isinstance(layer, int) and not isinstance(layer, bool) else None)


# --- building the view -------------------------------------------------------------------------


def case_view(record: Record, anchor: str) -> CaseView:
    r = {**RECORD_DEFAULTS, **record}
    loc = r["localization"] or {}
    return CaseView(
        result=r, anchor=anchor, seconds=f"{r['seconds']:.2f}", metrics=_kv_rows(r["metrics"]),
        divergence=divergence_view(r["first_divergence"]) if r["first_divergence"] else None,
        localization=_kv_rows(loc, skip=("per_layer_error",)) if r["localization"] else [],
        chart=_chart(r["localization"]), sp=sp_rows(r["sp_matches"]),
    )


def sp_rows(matches: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The SP record of a compiled case: applied / unapplied step sizes, then per rank each step
    graph's matches (first / middle / final) and the collectives left (all-reduce, reduce-scatter,
    all-gather)."""
    if not matches:
        return []
    rows = [("SP rewrote steps of", ", ".join(map(str, matches.get("sp_applied_sizes", []))) or "none"),
            ("left alone", ", ".join(map(str, matches.get("sp_unapplied_sizes", []))) or "none")]
    for rank, graphs in matches.get("ranks", {}).items():
        rows.append((f"rank {rank}", "; ".join(
            f"{g}: SP {c['first']}/{c['middle']}/{c['final']}, AR {c['all_reduce']} RS {c['reduce_scatter']} "
            f"AG {c['all_gather']}" for g, c in graphs.items())))
    return rows


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def grids(cases: Sequence[CaseView]) -> list[Grid]:
    """One grid per model (in order of appearance): setups x scenarios."""
    out = []
    for model in _unique([c.result["model"] for c in cases]):
        mine = [c for c in cases if c.result["model"] == model]
        scenarios = _unique([c.result["scenario"] for c in mine])
        rows = []
        for setup in _unique([c.result["setup"] for c in mine]):
            row = [c for c in mine if c.result["setup"] == setup]
            cells = [[c for c in row if c.result["scenario"] == s] for s in scenarios]
            rows.append(GridRow(setup, ", ".join(_unique([c.result["baseline"] for c in row])), cells))
        out.append(Grid(model, scenarios, rows))
    return out


def _environment_rows(env: dict[str, Any]) -> list[tuple[str, str]]:
    env = dict(env)
    if "device" not in env:
        devices = env.get("cuda_devices")
        env["device"] = ", ".join(map(str, devices)) if devices else "cpu"
    keys = [k for k in ENV_KEYS if k in env] + [k for k in env if k not in ENV_KEYS and k != "cuda_devices"]
    return [(k, fmt(env[k])) for k in keys]


def _timings(cases: Sequence[CaseView]) -> list[TimingRow]:
    longest = max((c.result["seconds"] for c in cases), default=0.0) or 1.0
    ordered = sorted(cases, key=lambda c: c.result["seconds"], reverse=True)
    return [TimingRow(c, 100.0 * max(c.result["seconds"], 0.0) / longest) for c in ordered]


def _setting(value: Any) -> str:
    """A run setting for display: a list of names comma-separated, anything else as ``fmt`` has it."""
    return ", ".join(map(str, value)) if isinstance(value, list) else fmt(value)


def _run_rows(run: dict[str, Any]) -> list[tuple[str, str]]:
    return [(str(k), _setting(v)) for k, v in run.items()]


def _input_rows(inputs: Sequence[dict[str, Any]]) -> list[InputRow]:
    rows = []
    for i in inputs:
        parts: dict[str, dict[str, Any]] = {
            part: value if isinstance(value := i.get(part), dict) else {} for part in ("run", "environment")}
        cells = [_setting(parts[part].get(key)) for _, part, key in INPUT_COLUMNS]
        rows.append(InputRow(str(i.get("dir")), cells))
    return rows


def _mutations(run: dict[str, Any] | None, inputs: Sequence[dict[str, Any]]) -> str:
    """The mutations injected into the run, or into any merged input (comma-separated; "" if none)."""
    runs = [run or {}] + [i.get("run") or {} for i in inputs]
    return ", ".join(_unique([str(r["mutation"]) for r in runs if isinstance(r, dict) and r.get("mutation")]))


def report_view(records: Sequence[Record], environment: dict[str, Any], title: str,
                run: dict[str, Any] | None = None, merged: dict[str, Any] | None = None) -> ReportView:
    """The view of the case ``records``; ``run``: the run's settings; ``merged``: a merge's
    ``{"inputs": [{"dir", "run", "environment"}], "overridden": [{"id", "dir", "by"}]}``
    (``summary.json``'s keys)."""
    cases = [case_view(r, a) for r, a in zip(records, _anchors(records))]
    inputs: list[dict[str, Any]] = (merged or {}).get("inputs") or []
    overridden: list[dict[str, Any]] = (merged or {}).get("overridden") or []
    mutation = _mutations(run, inputs)
    return ReportView(
        title=f"{title} — MUTATION RUN: {mutation}" if mutation else title,
        totals={s: sum(c.result["status"] == s for c in cases) for s in STATUSES},
        total_seconds=f"{sum(c.result['seconds'] for c in cases):.1f}",
        environment=_environment_rows(environment), grids=grids(cases),
        details=[(s, [c for c in cases if c.result["status"] == s]) for s in DETAIL_ORDER],
        skipped=[c for c in cases if c.result["status"] == "skip"], timings=_timings(cases),
        run=_run_rows(run or {}), mutation=mutation, inputs=_input_rows(inputs),
        overridden=[(str(o.get("id")), str(o.get("dir")), str(o.get("by"))) for o in overridden],
    )


# --- rendering ---------------------------------------------------------------------------------


def _jinja() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True, undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )


def render_html(
    records: Sequence[Record], environment: dict[str, Any], title: str = "parity report",
    run: dict[str, Any] | None = None, merged: dict[str, Any] | None = None,
) -> str:
    """The report as a string (``run``: the settings for the header; ``merged``: a merge's inputs)."""
    view = report_view(records, environment, title, run, merged)
    return _jinja().get_template(TEMPLATE).render(
        view=view, statuses=STATUSES, input_columns=[heading for heading, _, _ in INPUT_COLUMNS])


def render_index(
    out_dir: Path, records: Sequence[Record], environment: dict[str, Any], title: str = "parity report",
    run: dict[str, Any] | None = None, merged: dict[str, Any] | None = None,
) -> Path:
    """Write the self-contained ``out_dir/index.html`` of the case ``records`` and return its path.
    ``run``: the run's settings; ``merged``: a merge's inputs and overridden records (both as
    ``summary.json`` has them)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / INDEX_FILE
    path.write_text(render_html(records, environment, title, run, merged), encoding="utf-8")
    return path
