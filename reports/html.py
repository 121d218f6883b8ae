"""The self-contained HTML report of a run (``index.html``), rendered with jinja2 (autoescape on).

It renders plain data, the records of the result files: each case as its ``results.jsonl`` line
(``summary.json``'s ``"cases"``), and the run's settings, environment, merged inputs, history
and accuracy as ``summary.json`` / ``accuracy.json`` hold them. The page reads top-down: the
verdict, a summary of the failures, the grid (setup x scenario) with filters, the failures
grouped by where they start, errors, passes, skips, accuracy, timings, and last the settings and
environment. Everything the template shows is prepared here and in ``reports.case`` as plain
view objects; the only pre-built markup is the per-layer chart (``reports.chart``). The page's
small script (filters, expand / collapse all) is inline: the file opens offline.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from reports.case import CaseView, LocalizationView, Record, anchors, case_view
from reports.chart import per_layer_chart
from reports.format import as_float, fmt, num

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATE = "index.html.j2"
INDEX_FILE = "index.html"
# Shown first in the environment table, in this order; other keys follow.
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
# A case record's statuses (the result files' contract, docs/harness.md), in the header's order.
STATUSES = ("pass", "fail", "error", "skip")
# Most severe first: a grid cell holding several cases takes the colour of its worst.
SEVERITY = ("fail", "error", "pass", "skip")
# The oracle case (harness.case.is_oracle): checks the one-device engine, no parallelism; a run
# in which only oracle cases ran checked nothing it was asked about (the run's exit 4).
ORACLE = ("tp1-pp1-eager", "hf")
# Run settings on the header's one line, in this order (all of them are in the settings table).
BRIEF_KEYS = ("matrix", "model", "dtype", "device", "backend", "baseline", "policy", "seed", "merged_from")

__all__ = ["INDEX_FILE", "per_layer_chart", "render_html", "render_index", "report_view"]


# --- view objects ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridRow:
    """One setup's row of a model's grid: its baselines and one cell (the cases) per scenario."""

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
class FailureGroup:
    """Failed cases that start in the same place: the shared localization, shown once."""

    anchor: str
    label: str
    localization: LocalizationView | None
    cases: list[CaseView]


@dataclass(frozen=True)
class TimingRow:
    case: CaseView
    percent: float


@dataclass(frozen=True)
class InputRow:
    """One merged input directory: its path and the ``INPUT_COLUMNS`` values."""

    dir: str
    cells: list[str]


@dataclass(frozen=True)
class AccuracyView:
    """``accuracy.json`` (``parity accuracy``) as tables: the baselines and each setup against its own."""

    overall: str
    heading: str
    baselines: list[list[str]]
    setups: list[list[str]]
    verdicts: list[str]


@dataclass
class ReportView:
    """Everything ``index.html.j2`` renders."""

    title: str
    verdict: str  # "PASS" | "FAIL" | "ERROR" | "NOTHING RAN"
    verdict_line: str
    totals: dict[str, int]
    total_seconds: str
    environment: list[tuple[str, str]]
    grids: list[Grid]
    summary: list[CaseView]  # failures and errors, for the table on top
    groups: list[FailureGroup]
    errors: list[CaseView]
    passes: list[CaseView]
    skipped: list[CaseView]
    setups: list[str] = field(default_factory=list)  # the filters' choices
    scenarios: list[str] = field(default_factory=list)
    timings: list[TimingRow] = field(default_factory=list)
    run: list[tuple[str, str]] = field(default_factory=list)  # the run settings table
    brief: list[tuple[str, str]] = field(default_factory=list)  # its main settings, on one line
    command: str = ""
    mutation: str = ""  # the injected mutation(s): a banner says failures are expected
    inputs: list[InputRow] = field(default_factory=list)  # a merge's input directories
    overridden: list[tuple[str, str, str]] = field(default_factory=list)  # (id, dir, later dir)
    previous: list[str] = field(default_factory=list)  # history: the earlier runs compared with
    fixed: list[str] = field(default_factory=list)  # history: failing before, passing now
    accuracy: AccuracyView | None = None


# --- building the view -------------------------------------------------------------------------


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def grids(cases: Sequence[CaseView]) -> list[Grid]:
    """One grid per model (in order of appearance): setups x scenarios; a cell holds every case of
    its setup and scenario (several when a merge or explicit baselines give more than one)."""
    out = []
    for model in _unique([c.result["model"] for c in cases]):
        mine = [c for c in cases if c.result["model"] == model]
        scenarios = _unique([c.result["scenario"] for c in mine])
        rows = []
        for setup in _unique([c.result["setup"] for c in mine]):
            row = [c for c in mine if c.result["setup"] == setup]
            cells = [sorted((c for c in row if c.result["scenario"] == s), key=lambda c: SEVERITY.index(
                c.result["status"]) if c.result["status"] in SEVERITY else 0) for s in scenarios]
            rows.append(GridRow(setup, ", ".join(_unique([c.result["baseline"] for c in row])), cells))
        out.append(Grid(model, scenarios, rows))
    return out


def failure_groups(failures: Sequence[CaseView]) -> list[FailureGroup]:
    """Failures grouped by identical localization (layer, tensor, TP ranks, PP stage), or, not
    localized, by the same note or reason headline; the largest group first."""
    keyed: dict[tuple[Any, ...], list[CaseView]] = {}
    for c in failures:
        key = c.localization.key if c.localization is not None else ("what", c.what)
        keyed.setdefault(key, []).append(c)
    groups = sorted(keyed.values(), key=len, reverse=True)
    return [FailureGroup(f"group-{i}", g[0].what, g[0].localization, g) for i, g in enumerate(groups)]


def verdict(cases: Sequence[CaseView]) -> str:
    """The run's verdict, as its exit code has it: FAIL (a case failed), ERROR (infrastructure
    errors only), NOTHING RAN (no case ran, or only oracle cases while every parallel one was
    skipped), PASS."""
    statuses = [c.result["status"] for c in cases]
    if "fail" in statuses:
        return "FAIL"
    if "error" in statuses:
        return "ERROR"
    # On any engine: ``tp1-pp1-eager@transformers`` against ``hf`` is that engine's oracle case.
    parallel = [c for c in cases if (c.result["setup"].split("@")[0], c.result["baseline"]) != ORACLE]
    if "pass" not in statuses or (parallel and all(c.result["status"] == "skip" for c in parallel)):
        return "NOTHING RAN"
    return "PASS"


def _verdict_line(totals: Mapping[str, int], cases: Sequence[CaseView], fixed: Sequence[str]) -> str:
    ran = totals["pass"] + totals["fail"] + totals["error"]
    parts = [f"{totals['fail']} of {ran} cases that ran failed" if totals["fail"] else f"{ran} cases ran"]
    words = {"error": "error", "pass": "passed", "skip": "skipped"}
    parts += [f"{totals[s]} {words[s]}{'s' if s == 'error' and totals[s] > 1 else ''}"
              for s in ("error", "pass", "skip") if totals[s]]
    tags = [t for c in cases if c.history is not None for t in c.history.tags]
    parts += [f"{tags.count(t)} {t.lower()}" for t in ("NEW", "RECURRING", "FLAKY") if t in tags]
    repeated = [c.repeat for c in cases if c.repeat is not None]
    if repeated:
        flaky = sum(r.flaky for r in repeated)
        parts.append(f"{flaky} flaky over {max(r.n for r in repeated)} repeats")
    if fixed:
        parts.append(f"{len(fixed)} fixed since the previous run")
    return ", ".join(parts)


def _environment_rows(env: dict[str, Any]) -> list[tuple[str, str]]:
    env = dict(env)
    if "device" not in env:
        devices = env.get("cuda_devices")
        env["device"] = ", ".join(map(str, devices)) if devices else "cpu"
    keys = [k for k in ENV_KEYS if k in env] + [k for k in env if k not in ENV_KEYS and k != "cuda_devices"]
    return [(k, fmt(env[k])) for k in keys]


def _timings(cases: Sequence[CaseView]) -> list[TimingRow]:
    def seconds(c: CaseView) -> float:
        return as_float(c.result["seconds"]) or 0.0

    longest = max((seconds(c) for c in cases), default=0.0) or 1.0
    return [TimingRow(c, 100.0 * max(seconds(c), 0.0) / longest) for c in sorted(cases, key=seconds, reverse=True)]


def _setting(value: Any) -> str:
    """A run setting for display: a list of names comma-separated, anything else as ``fmt`` has it."""
    return ", ".join(map(str, value)) if isinstance(value, list) else fmt(value)


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


def _pct(value: Any) -> str:
    x = as_float(value)
    return "—" if x is None else f"{100 * x:.1f}%"


def accuracy_view(doc: Mapping[str, Any] | None) -> AccuracyView | None:
    """``accuracy.json``'s document as tables: per task the baselines, and each setup's accuracy,
    delta, answers changed each way, McNemar p and verdict."""
    if not doc:
        return None
    setups = [s for s in doc.get("setups") or [] if isinstance(s, dict)]
    verdicts = [str(s.get("verdict")) for s in setups]
    overall = ("fail" if "fail" in verdicts else "error" if "error" in verdicts
               else "inconclusive" if "inconclusive" in verdicts or not verdicts else "pass")
    heading = ", ".join(f"{k} {fmt(doc[k])}" for k in ("task", "model", "input", "dtype", "limit") if k in doc)
    baselines = [[fmt(b.get("task")), fmt(b.get("id")), fmt(b.get("n")), _pct(b.get("accuracy")), fmt(b.get("seconds"))]
                 for b in doc.get("baselines") or [] if isinstance(b, dict)]
    rows = []
    for s in setups:
        changed: Mapping[str, Any] = s["changed"] if isinstance(s.get("changed"), dict) else {}
        delta = as_float(s.get("delta"))
        rows.append([fmt(s.get("task", doc.get("task"))), fmt(s.get("id")), fmt(s.get("baseline")),
                     _pct(s.get("accuracy")), "—" if delta is None else f"{100 * delta:+.1f} pts",
                     fmt(changed.get("to_wrong")), fmt(changed.get("to_correct")), num(s.get("p_value")),
                     str(s.get("verdict")), fmt(s.get("reason", ""))])
    return AccuracyView(overall, heading, baselines, rows, verdicts)


def report_view(records: Sequence[Record], environment: dict[str, Any], title: str,
                run: dict[str, Any] | None = None, merged: dict[str, Any] | None = None,
                history: dict[str, Any] | None = None, accuracy: dict[str, Any] | None = None) -> ReportView:
    """The view of the case ``records``; ``run``: the run's settings; ``merged``: a merge's
    ``{"inputs": [{"dir", "run", "environment"}], "overridden": [{"id", "dir", "by"}]}``;
    ``history``: ``{"previous", "cases", "fixed"}``; ``accuracy``: ``accuracy.json``'s document
    (all as ``summary.json`` / ``accuracy.json`` hold them)."""
    cases = [case_view(r, a, run, history) for r, a in zip(records, anchors(records))]
    inputs: list[dict[str, Any]] = (merged or {}).get("inputs") or []
    overridden: list[dict[str, Any]] = (merged or {}).get("overridden") or []
    mutation = _mutations(run, inputs)
    totals = {s: sum(c.result["status"] == s for c in cases) for s in STATUSES}
    fixed = [str(f) for f in (history or {}).get("fixed") or []]
    outcome = verdict(cases)
    by_status = {s: [c for c in cases if c.result["status"] == s] for s in STATUSES}
    run = run or {}
    return ReportView(
        title=f"{outcome} — {title}" + (f" — MUTATION RUN: {mutation}" if mutation else ""),
        verdict=outcome, verdict_line=_verdict_line(totals, cases, fixed), totals=totals,
        total_seconds=f"{sum(as_float(c.result['seconds']) or 0.0 for c in cases):.1f}",
        environment=_environment_rows(environment), grids=grids(cases),
        summary=by_status["fail"] + by_status["error"], groups=failure_groups(by_status["fail"]),
        errors=by_status["error"], passes=by_status["pass"], skipped=by_status["skip"],
        setups=_unique([c.result["setup"] for c in cases]), scenarios=_unique([c.result["scenario"] for c in cases]),
        timings=_timings(cases), run=[(str(k), _setting(v)) for k, v in run.items()],
        brief=[(k, _setting(run[k])) for k in BRIEF_KEYS if run.get(k) is not None],
        command=str(run.get("command") or ""), mutation=mutation, inputs=_input_rows(inputs),
        overridden=[(str(o.get("id")), str(o.get("dir")), str(o.get("by"))) for o in overridden],
        previous=[str(p) for p in (history or {}).get("previous") or []], fixed=fixed,
        accuracy=accuracy_view(accuracy),
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
    history: dict[str, Any] | None = None, accuracy: dict[str, Any] | None = None,
) -> str:
    """The report as a string (``run``: the settings; ``merged``: a merge's inputs; ``history``:
    the run's standing against earlier runs; ``accuracy``: an ``accuracy.json`` document)."""
    view = report_view(records, environment, title, run, merged, history, accuracy)
    return _jinja().get_template(TEMPLATE).render(
        view=view, statuses=STATUSES, input_columns=[heading for heading, _, _ in INPUT_COLUMNS])


def render_index(
    out_dir: Path, records: Sequence[Record], environment: dict[str, Any], title: str = "parity report",
    run: dict[str, Any] | None = None, merged: dict[str, Any] | None = None,
    history: dict[str, Any] | None = None, accuracy: dict[str, Any] | None = None,
) -> Path:
    """Write the self-contained ``out_dir/index.html`` of the case ``records`` and return its path.
    ``run``: the run's settings; ``merged``: a merge's inputs and overridden records; ``history``:
    ``{"previous": [dir, …], "cases": {id: {"class", "flaky", "failures", "runs"}}, "fixed": [id, …]}``;
    ``accuracy``: ``parity accuracy``'s ``accuracy.json`` (all as ``summary.json`` holds them)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / INDEX_FILE
    return write_atomic(path, render_html(records, environment, title, run, merged, history, accuracy))


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader (a browser, a
    CI upload) never sees half a report, and a killed run leaves the previous one whole."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
