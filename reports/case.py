"""One case of the report as plain view objects (strings and numbers the template escapes; the
chart is the only pre-built markup): every diverging request with both token streams around its
divergence, the localization as a table and a chart that show the same numbers, the command that
reruns the case, and its history tag.

A case is its result-file record (``results.jsonl`` line, ``summary.json`` case); keys added to
the format later (``divergences``, a localization's ``per_tensor_error``, ``pp_stage``, a
divergence's token streams and ``token_text``) are optional: older records render without them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from markupsafe import Markup

from reports.chart import per_layer_chart
from reports.format import against, as_float, fmt, fmt_token, num, ranges, reproduce_command, times

# One case as the result files hold it: id, setup, baseline, scenario, model, status and the
# optional keys of ``RECORD_DEFAULTS``.
Record = dict[str, Any]
# A case record's optional keys with the value a missing one stands for.
RECORD_DEFAULTS: dict[str, Any] = {"reason": "", "first_divergence": None, "localization": None,
                                   "sp_matches": None, "metrics": {}, "seconds": 0.0, "divergences": None,
                                   "texts": None, "repeat": None}
# Steps of the token streams shown before and after a divergence.
STREAM_BEFORE, STREAM_AFTER = 3, 4
# What the localizer's errors measure (harness.localize.ERROR_UNIT), for records that predate it.
ERROR_UNIT = "relative: max |candidate - baseline| of a token row / max |baseline| of the tensor"
# The comparator's divergence reasons (harness.compare.REASONS) in words.
REASON_WORDS = {"token": "token flip", "logprob": "same token, logprob beyond atol",
                "topk": "same token, top-k differs", "length": "different number of tokens",
                "nonfinite": "non-finite logprob"}
# History classes (summary.json's "history"): the tag a case gets.
HISTORY_TAGS = {"new": "NEW", "recurring": "RECURRING"}


# --- view objects ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopKRow:
    """One entry of a top-k list; ``mark`` is "candidate"/"baseline" when it is that side's token."""

    rank: int
    token: str
    logprob: str
    mark: str = ""


@dataclass(frozen=True)
class StreamRow:
    """One step of both token streams; ``mark``: "div" at the divergence, "diff" where the tokens
    differ elsewhere, "" where they agree."""

    step: int
    baseline: str
    candidate: str
    mark: str


@dataclass(frozen=True)
class TextRow:
    """One request's prompt and both sides' generated text (checkpoints with a tokenizer);
    ``differs``: the two texts are not the same."""

    request_id: str
    prompt: str
    baseline: str
    candidate: str
    differs: bool


@dataclass(frozen=True)
class DivergenceView:
    """A request's (first failing) divergence, formatted for display."""

    request_id: str
    step: str
    candidate_token: str
    baseline_token: str
    candidate_logprob: str
    baseline_logprob: str
    logprob_diff: str
    delta: str  # "Δ 0.201 = 201× atol 1e-3"
    reason: str
    detail: str
    tolerated: bool
    replayed: bool
    differs: bool
    failing_in_request: int
    candidate_top_k: list[TopKRow]
    baseline_top_k: list[TopKRow]
    stream: list[StreamRow]
    stream_note: str
    extra: list[tuple[str, str]]


@dataclass(frozen=True)
class LocalizationView:
    """Where a failure starts: ``label`` (layer · tensor · TP rank · PP stage), ``tag`` (short,
    for the grid), the table ``rows``, the chart and its values per layer (``values_head``,
    ``values``: per layer the cells ``(text, localized?)``), the same numbers as the chart's bars."""

    key: tuple[Any, ...]
    label: str
    tag: str
    rows: list[tuple[str, str]]
    chart: Markup | None
    chart_note: str = ""
    values_head: list[str] = field(default_factory=list)
    values: list[tuple[int, list[tuple[str, bool]]]] = field(default_factory=list)


@dataclass(frozen=True)
class HistoryTag:
    """A case's standing across runs: ``tags`` (NEW, RECURRING, FLAKY) and a tooltip."""

    tags: list[str]
    tip: str


@dataclass(frozen=True)
class RepeatView:
    """A case run several times (``--repeat N``): ``flaky`` when its repeats differed, each
    repeat's status and seconds, and each differing repeat's first output difference."""

    n: int
    flaky: bool
    repeats: list[tuple[int, str, str]]  # (repeat, status, seconds)
    differences: list[str]

    @property
    def tag(self) -> str:
        return "FLAKY" if self.flaky else f"×{self.n}"

    @property
    def tip(self) -> str:
        statuses = ", ".join(status for _, status, _ in self.repeats)
        what = "differed" if self.flaky else "gave the same verdict and the same output bits"
        return f"{self.n} repeats in this run {what}: {statuses}"


@dataclass(frozen=True)
class CaseView:
    """One case as the report shows it."""

    result: Record
    anchor: str
    seconds: str
    metrics: list[tuple[str, str]]
    divergences: list[DivergenceView]
    localization: LocalizationView | None
    repro: str
    sp: list[tuple[str, str]] = field(default_factory=list)
    history: HistoryTag | None = None
    texts: list[TextRow] = field(default_factory=list)
    repeat: RepeatView | None = None

    @property
    def tags(self) -> list[tuple[str, str, str]]:
        """The case's tags as ``(text, css class, tooltip)``: history (NEW, RECURRING, FLAKY across
        runs), then this run's repeats (FLAKY, or ``×N`` when its N repeats agreed)."""
        tags = [(t, t.lower(), self.history.tip) for t in self.history.tags] if self.history else []
        if self.repeat is not None:
            if self.repeat.flaky:
                tags = [t for t in tags if t[0] != "FLAKY"]
            tags.append((self.repeat.tag, "flaky" if self.repeat.flaky else "repeat", self.repeat.tip))
        return tags

    @property
    def divergence(self) -> DivergenceView | None:
        """The case's first divergence (failing, else tolerated)."""
        return self.divergences[0] if self.divergences else None

    @property
    def headline(self) -> str:
        """One line: an error's bare traceback's last line (the exception), else the reason's first
        (the harness's ``infrastructure: …`` reasons say what happened first, then the evidence)."""
        reason: str = self.result["reason"]
        lines = [ln.strip() for ln in reason.splitlines() if ln.strip()]
        if not lines:
            return str(self.result["status"])
        bare = self.result["status"] == "error" and not lines[0].startswith("infrastructure:")
        return lines[-1] if bare else lines[0]

    @property
    def largest_delta(self) -> str:
        """The largest logprob difference of the case against its atol (``max_logprob_diff``), or ""."""
        metrics = self.result["metrics"]
        return f"max {against(metrics['max_logprob_diff'], metrics.get('atol'))}" if (
            "max_logprob_diff" in metrics) else ""

    @property
    def what(self) -> str:
        """What went wrong, in a few words: the localization, else the reason's headline."""
        if self.localization is not None:
            return self.localization.label
        return _short(self.headline, 160)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- divergences -------------------------------------------------------------------------------

_DIVERGENCE_KEYS = (
    "request_id", "step", "candidate_token", "baseline_token", "candidate_top_k", "baseline_top_k",
    "candidate_logprob", "baseline_logprob", "logprob_diff", "reason", "tolerated", "detail", "replayed",
    "failing_in_request", "candidate_tokens", "baseline_tokens", "candidate_stream", "token_text",
    "candidate_gap", "baseline_gap",
)


def _token(token: Any, texts: Mapping[str, Any]) -> str:
    """A token for display: its decoded text (quoted, with the id) when the record has it, else the id."""
    if token is None:
        return "—"
    text = texts.get(str(token))
    return f"{fmt_token(str(text))} ·{token}" if text is not None else fmt_token(token)


def _top_k(entries: Any, candidate: Any, baseline: Any, texts: Mapping[str, Any]) -> list[TopKRow]:
    rows = []
    for rank, entry in enumerate(entries or [], start=1):
        pair = isinstance(entry, (list, tuple)) and len(entry) >= 2
        token, logprob = (entry[0], entry[1]) if pair else (entry, None)
        mark = "candidate" if token == candidate else "baseline" if token == baseline else ""
        rows.append(TopKRow(rank, _token(token, texts), fmt(logprob), mark))
    return rows


def _stream(div: Mapping[str, Any], texts: Mapping[str, Any]) -> tuple[list[StreamRow], str]:
    """Both streams from ``STREAM_BEFORE`` steps before the divergence to ``STREAM_AFTER`` after."""
    base, cand, step = div.get("baseline_tokens"), div.get("candidate_tokens"), div.get("step")
    if not isinstance(base, list) or not isinstance(cand, list) or not isinstance(step, int):
        return [], ""
    rows = []
    for s in range(max(0, step - STREAM_BEFORE), min(max(len(base), len(cand)), step + STREAM_AFTER + 1)):
        b, c = (base[s] if s < len(base) else None), (cand[s] if s < len(cand) else None)
        mark = "div" if s == step else "diff" if b != c else ""
        rows.append(StreamRow(s, _token(b, texts), _token(c, texts), mark))
    note = ("candidate: its own greedy choice at each step while fed the baseline's tokens (forced replay)"
            if div.get("candidate_stream") == "forced" else "each side's generated tokens")
    return rows, note


def divergence_view(div: Mapping[str, Any], atol: Any = None) -> DivergenceView:
    """Format a divergence dict (``first_divergence`` or an entry of ``divergences``; missing keys
    show as a dash); ``atol``: the chosen-token tolerance its difference is measured against."""
    cand, base = div.get("candidate_token"), div.get("baseline_token")
    texts: Mapping[str, Any] = div["token_text"] if isinstance(div.get("token_text"), dict) else {}
    stream, note = _stream(div, texts)
    return DivergenceView(
        request_id=fmt(div.get("request_id")), step=fmt(div.get("step")),
        candidate_token=_token(cand, texts), baseline_token=_token(base, texts),
        candidate_logprob=fmt(div.get("candidate_logprob")), baseline_logprob=fmt(div.get("baseline_logprob")),
        logprob_diff=num(div.get("logprob_diff")), delta=against(div.get("logprob_diff"), atol),
        reason=REASON_WORDS.get(str(div.get("reason")), str(div.get("reason") or "")),
        detail=str(div.get("detail") or ""),
        tolerated=bool(div.get("tolerated")), replayed=bool(div.get("replayed")), differs=cand != base,
        failing_in_request=int(div.get("failing_in_request") or 1),
        candidate_top_k=_top_k(div.get("candidate_top_k"), cand, base, texts),
        baseline_top_k=_top_k(div.get("baseline_top_k"), cand, base, texts),
        stream=stream, stream_note=note,
        extra=[(str(k), fmt(v)) for k, v in div.items() if k not in _DIVERGENCE_KEYS],
    )


def _divergences(r: Record) -> list[DivergenceView]:
    """Every diverging request's divergence (records before ``divergences``: the first only)."""
    atol = (r["metrics"] or {}).get("atol")
    listed = r["divergences"] if isinstance(r["divergences"], list) and r["divergences"] else None
    if listed is None:
        return [divergence_view(r["first_divergence"], atol)] if r["first_divergence"] else []
    return [divergence_view(d, atol) for d in listed if isinstance(d, dict)]


# --- localization ------------------------------------------------------------------------------

# Localization keys the table shows in its own rows (or not at all: the lists the chart draws).
_LOCALIZATION_KEYS = (
    "layer", "tensor", "rows", "row_ranges", "tp_ranks", "tp_rank", "pp_stage", "pp", "tp", "max_error", "rtol",
    "num_tokens", "per_layer_error", "per_tensor_error", "error_unit", "failing_request", "row_requests",
    "note", "shard_note", "error",
)


def _ranks(loc: Mapping[str, Any]) -> list[Any]:
    ranks = loc.get("tp_ranks")
    if isinstance(ranks, list) and ranks:
        return ranks
    rank = loc.get("tp_rank")
    return (rank if isinstance(rank, list) else [rank]) if rank is not None else []


def _label(loc: Mapping[str, Any]) -> tuple[str, str]:
    """(label, grid tag) of a localization to a layer."""
    parts, tag = [f"layer {loc['layer']}", str(loc.get("tensor"))], [f"L{loc['layer']}", str(loc.get("tensor"))]
    ranks = ", ".join(map(str, _ranks(loc)))
    if ranks:
        parts.append(f"TP rank {ranks}")
        tag.append(f"r{ranks}")
    if loc.get("pp_stage") is not None:
        parts.append(f"PP stage {loc['pp_stage']}")
        tag.append(f"s{loc['pp_stage']}")
    return " · ".join(parts), " ".join(tag)


def _localization_rows(loc: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = [("layer", fmt(loc.get("layer"))), ("tensor", fmt(loc.get("tensor")))]
    token_rows = loc.get("rows") if isinstance(loc.get("rows"), list) else []
    if token_rows:
        of = f" of {loc['num_tokens']}" if loc.get("num_tokens") else ""
        rows.append(("token rows", f"{ranges(token_rows)} ({len(token_rows)} rows{of} in the prefill step)"))
    ranks = _ranks(loc)
    rows.append(("TP rank", ", ".join(map(str, ranks)) if ranks else str(loc.get("shard_note") or "—")))
    if loc.get("pp_stage") is not None:
        rows.append(("PP stage", f"{loc['pp_stage']} of {loc.get('pp', '?')}"))
    elif loc.get("pp") == 1:
        rows.append(("PP stage", "— (one stage)"))
    if loc.get("max_error") is not None or loc.get("rtol") is not None:
        factor = times(loc.get("max_error"), loc.get("rtol"))
        rows.append(("error", f"{num(loc.get('max_error'))}" + (f" = {factor} tolerance {num(loc.get('rtol'))}"
                                                                 if factor else "")))
        rows.append(("unit", str(loc.get("error_unit") or ERROR_UNIT)))
    for key, label in (("failing_request", "failing request"), ("row_requests", "requests whose rows differ"),
                       ("note", "note"), ("error", "replay error")):
        if loc.get(key):
            value = loc[key]
            rows.append((label, ", ".join(map(str, value)) if isinstance(value, list) else str(value)))
    rows += [(str(k), fmt(v)) for k, v in loc.items() if k not in _LOCALIZATION_KEYS]
    return rows


def _series(loc: Mapping[str, Any]) -> dict[str, list[Any]]:
    """The chart's series: per tensor when recorded, else the per-layer maximum ("" : one series)."""
    per_tensor = loc.get("per_tensor_error")
    if isinstance(per_tensor, dict) and per_tensor and all(isinstance(v, list) for v in per_tensor.values()):
        return {str(k): v for k, v in per_tensor.items()}
    errors = loc.get("per_layer_error")
    return {"": list(errors)} if isinstance(errors, (list, tuple)) and errors else {}


def localization_view(loc: Mapping[str, Any] | None) -> LocalizationView | None:
    """The table and chart of a ``localization`` dict (None: none recorded)."""
    if not loc:
        return None
    layer = loc.get("layer")
    if layer is None:
        note = str(loc.get("note") or "no layer localized")
        return LocalizationView(("note", note), f"not localized: {note}", "", _localization_rows(loc), None)
    label, tag = _label(loc)
    series = _series(loc)
    highlight = layer if isinstance(layer, int) and not isinstance(layer, bool) else None
    chart: Markup | None = None
    note = ""
    head: list[str] = []
    values: list[tuple[int, list[tuple[str, bool]]]] = []
    if series:
        one = list(series) == [""]
        chart = per_layer_chart(series[""] if one else series, highlight, loc.get("rtol"),
                                None if one else str(loc.get("tensor")), "relative error")
        note = "bars: the larger error of each layer's two tensors" if one else ""
        head = ["layer", *(["error"] if one else list(series))]
        layers = max(len(v) for v in series.values())
        values = [(i, [(num(v[i]) if i < len(v) and v[i] is not None else "—",
                        i == highlight and (one or name == loc.get("tensor"))) for name, v in series.items()])
                  for i in range(layers)]
    key = ("layer", layer, loc.get("tensor"), tuple(map(str, _ranks(loc))), loc.get("pp_stage"))
    return LocalizationView(key, label, tag, _localization_rows(loc), chart, note, head, values)


# --- the case ----------------------------------------------------------------------------------


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


def history_tag(entry: Any) -> HistoryTag | None:
    """The tag of a case's ``history["cases"]`` entry: NEW / RECURRING for a failure, FLAKY when
    its outcome changed between runs; None for a steady pass or no entry."""
    if not isinstance(entry, dict):
        return None
    tags = [HISTORY_TAGS[c] for c in (entry.get("class"),) if c in HISTORY_TAGS]
    if entry.get("flaky"):
        tags.append("FLAKY")
    if not tags:
        return None
    runs, failures = entry.get("runs"), entry.get("failures")
    tip = f"failed {failures} of the last {runs} runs" if runs is not None and failures is not None else ""
    return HistoryTag(tags, tip)


def repeat_view(entry: Any) -> RepeatView | None:
    """The view of a record's ``repeat`` (None: the case ran once, or a record without it)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("statuses"), list):
        return None
    seconds: list[Any] = entry["seconds"] if isinstance(entry.get("seconds"), list) else []
    repeats = [(k, str(status), fmt(seconds[k - 1]) if k <= len(seconds) else "—")
               for k, status in enumerate(entry["statuses"], start=1)]
    diffs = [d for d in entry.get("differences") or [] if isinstance(d, dict)]
    return RepeatView(int(entry.get("n") or len(repeats)), bool(entry.get("flaky")), repeats,
                      [_difference(d) for d in diffs])


def _difference(d: Mapping[str, Any]) -> str:
    """A repeat's first output difference (``harness.repeat``'s record) in words."""
    where = f"request {d['request_id']}" if "request_id" in d else "the batch"
    if "step" in d:
        where += f" step {d['step']}"
    values: list[Any] = d["values"] if isinstance(d.get("values"), list) else []
    # Every digit: two values that differ in their last bit must not print the same.
    shown = " vs ".join(json.dumps(v, default=str) for v in values)
    return f"repeat {d.get('repeat')} vs repeat {d.get('against')}: {where}, {d.get('field')} {shown}"


def anchors(records: Sequence[Record]) -> list[str]:
    """Unique HTML ids derived from the case ids."""
    seen: dict[str, int] = {}
    out = []
    for r in records:
        base = "case-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", str(r["id"]))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.append(base if n == 0 else f"{base}-{n}")
    return out


def text_rows(texts: Any) -> list[TextRow]:
    """The record's ``texts`` (prompt, baseline and candidate text per request) as rows; records
    without them (no tokenizer, or older) have none."""
    if not isinstance(texts, list):
        return []
    rows = []
    for t in texts:
        if isinstance(t, dict):
            base, cand = str(t.get("baseline") or ""), str(t.get("candidate") or "")
            prompt = t.get("prompt")
            rows.append(TextRow(fmt(t.get("request_id")), "—" if prompt is None else str(prompt), base, cand,
                                base != cand))
    return rows


def case_view(record: Record, anchor: str, run: Mapping[str, Any] | None = None,
              history: Mapping[str, Any] | None = None) -> CaseView:
    """The view of one record; ``run``: the run's settings (for the reproduce command);
    ``history``: ``summary.json``'s ``"history"`` (for the case's tag)."""
    r = {**RECORD_DEFAULTS, **record}
    r["metrics"] = r["metrics"] or {}
    cases = (history or {}).get("cases")
    return CaseView(
        result=r, anchor=anchor, seconds=f"{as_float(r['seconds']) or 0.0:.2f}",
        metrics=[(str(k), fmt(v)) for k, v in r["metrics"].items()], divergences=_divergences(r),
        localization=localization_view(r["localization"]), repro=reproduce_command(r, run),
        sp=sp_rows(r["sp_matches"]), texts=text_rows(r["texts"]),
        history=history_tag(cases.get(r["id"])) if isinstance(cases, dict) else None,
        repeat=repeat_view(r["repeat"]),
    )
