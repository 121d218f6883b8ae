"""Result files of a run: ``results.jsonl`` (append-only, crash-safe), ``summary.json``, ``junit.xml``.

The formats are a contract with CI and other tools:

- ``results.jsonl``: one ``CaseResult.to_json()`` object per line, appended and fsync'd as each case
  finishes, so a killed run loses nothing finished. On reading, a truncated last line (the run was
  killed mid-write) is ignored, and when an id appears more than once the last record wins.
- ``summary.json``: ``{"run": {...}, "cases": [...], "totals": {"pass", "fail", "error", "skip"},
  "environment": {...}}``; ``"run"`` (the run's settings, ``harness.run_meta``) when known. A merge
  (``parity report``) adds ``"inputs": [{"dir", "run", "environment"}]`` and ``"overridden"``.
- ``junit.xml``: one ``<testsuite>`` with one ``<testcase>`` per case.

Exit codes of a run (``exit_code``): 0 every case that ran passed (skips allowed) and at least one
ran, 1 at least one comparison failed, 3 infrastructure errors and no comparison failure, 4 no case
ran (every case skipped, or none planned). (2, a usage error, is the CLI's.)
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import socket
import subprocess
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.case import STATUSES, CaseResult, is_oracle

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
JUNIT_FILE = "junit.xml"

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_INFRA = 3
# Every case skipped (or none planned): a green exit would claim a parity check that never happened,
# e.g. a 9-head model on a tp2/tp4 matrix.
EXIT_NOTHING_RAN = 4


# --- results.jsonl -----------------------------------------------------------------------------


class ResultStore:
    """The append-only ``results.jsonl`` of one output directory (created if missing)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / RESULTS_FILE
        self._lock = threading.Lock()

    def append(self, result: CaseResult) -> None:
        """Write ``result`` as one line, then flush and fsync so a killed run keeps it."""
        line = dumps_line(result)
        with self._lock:
            _repair_tail(self.path)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())

    def load(self) -> list[CaseResult]:
        """All recorded results, one per id (the last record wins), in order of first appearance."""
        return read_results(self.path) if self.path.exists() else []

    def done_ids(self, *, retry_errors: bool = False) -> set[str]:
        """Ids of the cases already recorded (what ``--resume`` skips).

        With ``retry_errors`` the ids whose last record is an ``error`` are left out, so that a
        resumed run tries them again (its new record then wins in ``load``).
        """
        return {r.id for r in self.load() if not (retry_errors and r.status == "error")}


def dumps_line(result: CaseResult) -> str:
    """One ``results.jsonl`` line (strict JSON, newline-terminated)."""
    return json.dumps(_jsonable(result.to_json()), ensure_ascii=False, allow_nan=False) + "\n"


def read_results(path: Path) -> list[CaseResult]:
    """Parse a ``results.jsonl``: last record per id wins; a truncated last line is ignored.

    Raises ``ValueError`` naming the line for a malformed line anywhere but at the end.
    """
    # A write cut short may end inside a multi-byte character: decode leniently, and let that line fail.
    lines = Path(path).read_bytes().decode("utf-8", errors="replace").split("\n")
    by_id: dict[str, CaseResult] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            result = CaseResult.from_json(json.loads(line))
        except (ValueError, TypeError) as e:
            if lineno == len(lines):  # the file does not end in "\n": a write cut short
                continue
            raise ValueError(f"{path}:{lineno}: malformed result line: {e}") from e
        by_id[result.id] = result
    return list(by_id.values())


class DuplicateCaseError(ValueError):
    """A case id recorded in two of the directories being merged (which record is right?)."""


@dataclass(frozen=True)
class Override:
    """Case ``id`` of ``dir`` was replaced by the record of the later directory ``by``."""

    id: str
    dir: str
    by: str


@dataclass
class Merged:
    """Several run directories as one: the results, every input run's settings and environment
    (``{"dir", "run", "environment"}``, from its ``summary.json``), and the overridden records."""

    results: list[CaseResult]
    inputs: list[dict[str, Any]] = field(default_factory=list)
    overridden: list[Override] = field(default_factory=list)
    dirs: int = 0

    def run(self) -> dict[str, Any]:
        """The settings every input shares (a key with differing or missing values is left out),
        with ``merged_from``: the number of directories merged."""
        runs = [r for i in self.inputs if isinstance(r := i.get("run"), dict)]
        common: dict[str, Any] = {}
        if runs and len(runs) == len(self.inputs):  # an input without settings shares none
            first, rest = runs[0], runs[1:]
            common = {k: v for k, v in first.items() if all(k in r and r[k] == v for r in rest)}
        return {**common, "merged_from": self.dirs}


def merge(dirs: Sequence[Path], *, allow_duplicates: bool = False) -> Merged:
    """Results of several run directories' ``results.jsonl``, with their settings and environments.

    A case id in two directories raises ``DuplicateCaseError`` naming both, unless
    ``allow_duplicates``: the later directory's record then wins and is listed in ``overridden``.
    Everything is read here, so the output may be written over one of the inputs afterwards.
    """
    by_id: dict[str, CaseResult] = {}
    origin: dict[str, str] = {}
    merged = Merged([], dirs=len(dirs))
    for d in dirs:
        path = Path(d) / RESULTS_FILE
        if not path.exists():
            raise FileNotFoundError(f"{d}: no {RESULTS_FILE} to merge")
        for result in read_results(path):
            if result.id in origin:
                if not allow_duplicates:
                    raise DuplicateCaseError(
                        f"case {result.id} is in both {origin[result.id]} and {d}; "
                        "--allow-duplicates keeps the later directory's record")
                merged.overridden.append(Override(result.id, origin[result.id], str(d)))
            by_id[result.id], origin[result.id] = result, str(d)
        merged.inputs.extend(_inputs_of(Path(d)))
    merged.results = list(by_id.values())
    return merged


def _inputs_of(d: Path) -> list[dict[str, Any]]:
    """``d``'s run settings and environment from its ``summary.json`` (None where missing); a merged
    directory stands for its own inputs, whose environments are where the cases ran."""
    try:
        data = json.loads((d / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    if isinstance(data.get("inputs"), list):
        return [i for i in data["inputs"] if isinstance(i, dict)]
    return [{"dir": str(d), "run": data.get("run"), "environment": data.get("environment")}]


def write_results(out_dir: Path, results: Sequence[CaseResult]) -> Path:
    """Write ``out_dir/results.jsonl`` at once (a merge's records; runs append with ``ResultStore``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write(out_dir / RESULTS_FILE, "".join(dumps_line(r) for r in results))


def _repair_tail(path: Path) -> None:
    """Make ``path`` end at a line boundary before appending: cut off a truncated last line, or add
    the missing newline after a complete one, so the next record does not run into it."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":  # the usual case: one byte read per append
            return
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:].decode("utf-8"))
        complete = True
    except ValueError:
        complete = False
    with path.open("r+b") as f:
        if complete:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        else:
            f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())


def _jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, numpy scalars/arrays as Python values and non-finite floats as
    the strings ``"nan"``, ``"inf"``, ``"-inf"`` (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return _jsonable(value.tolist())
    return str(value)


def atomic_write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


# --- verdicts ----------------------------------------------------------------------------------


def totals(results: Iterable[CaseResult]) -> dict[str, int]:
    """Counts per status; all four keys ``pass``, ``fail``, ``error``, ``skip`` are always present."""
    counts = dict.fromkeys(STATUSES, 0)
    for r in results:
        counts[r.status] += 1
    return counts


def exit_code(results: Iterable[CaseResult]) -> int:
    """1 if any case failed a comparison; else 3 if any infrastructure error; else 4 if nothing
    was checked; else 0. Nothing was checked when no case ran (all skipped, or none at all), or
    when only oracle cases ran while every parallel case was skipped: the oracle checks the
    one-device engine, not the parallelism the run was asked about."""
    results = list(results)
    counts = totals(results)
    if counts["fail"]:
        return EXIT_FAIL
    if counts["error"]:
        return EXIT_INFRA
    parallel = [r for r in results if not is_oracle(r.setup, r.baseline)]
    if not counts["pass"] or (parallel and all(r.status == "skip" for r in parallel)):
        return EXIT_NOTHING_RAN
    return EXIT_OK


# --- environment -------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """Where the run happened: git sha, package versions, platform, host, CPUs, CUDA devices, time."""
    return {
        "git_sha": _git_sha(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "ray": _version("ray"),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cuda_devices": _cuda_devices(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _git(*args: str) -> str | None:
    """``git ARGS`` in the repository holding this file: its stdout, or None if git failed."""
    try:
        proc = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _git_sha() -> str:
    """``git rev-parse HEAD``, with ``-dirty`` when tracked files differ from it (the sha alone
    would then misname the code that ran), or ``"unknown"``."""
    sha = (_git("rev-parse", "HEAD") or "").strip()
    if not sha:
        return "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return sha + "-dirty" if status else sha


def _version(package: str) -> str | None:
    """The installed version of ``package`` (without importing it), or None if it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cuda_devices() -> list[str]:
    """Names of the visible CUDA devices; empty without torch or CUDA."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [str(torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]


# --- summary.json ------------------------------------------------------------------------------


def summary(results: Sequence[CaseResult], env: dict[str, Any], run: dict[str, Any] | None = None,
            merged: Merged | None = None) -> dict[str, Any]:
    """The ``summary.json`` document: the run's settings (when given) first, a merge's inputs and
    overridden records (when ``merged``), cases in the order given, totals and environment."""
    doc: dict[str, Any] = {} if run is None else {"run": _jsonable(run)}
    if merged is not None:
        doc["inputs"] = _jsonable(merged.inputs)
        doc["overridden"] = [_jsonable(vars(o)) for o in merged.overridden]
    return {
        **doc,
        "cases": [_jsonable(r.to_json()) for r in results],
        "totals": totals(results),
        "environment": _jsonable(env),
    }


def write_summary(out_dir: Path, results: Sequence[CaseResult], environment: dict[str, Any],
                  run: dict[str, Any] | None = None, merged: Merged | None = None) -> Path:
    """Write ``out_dir/summary.json`` (indent 2) and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = summary(results, environment, run, merged)
    text = json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False)
    return atomic_write(out_dir / SUMMARY_FILE, text + "\n")


# --- junit.xml ---------------------------------------------------------------------------------

# Characters XML 1.0 does not allow, even escaped (model output may hold any of them).
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_text(text: str) -> str:
    return _XML_INVALID.sub("\ufffd", text)


def format_divergence(div: dict[str, Any] | None) -> str:
    """A first divergence as readable lines (the text of a junit ``<failure>``)."""
    if not div:
        return ""
    lines = [
        f"request {div.get('request_id')} step {div.get('step')}: "
        f"candidate token {div.get('candidate_token')!r} vs baseline token {div.get('baseline_token')!r}",
        f"logprobs: candidate {div.get('candidate_logprob')} baseline {div.get('baseline_logprob')} "
        f"(diff {div.get('logprob_diff')})",
    ]
    for side in ("candidate", "baseline"):
        if div.get(f"{side}_top_k") is not None:
            lines.append(f"{side} top-k: {div[f'{side}_top_k']}")
    if div.get("reason"):
        lines.append(f"reason: {div['reason']}")
    if "tolerated" in div:
        lines.append(f"tolerated: {div['tolerated']}")
    return "\n".join(lines)


def format_localization(loc: dict[str, Any] | None) -> str:
    """A localization as one line (junit ``<failure>`` text): layer, tensor, token rows as
    ranges, TP rank, PP stage, the error against the tolerance; or its note."""
    if not loc:
        return ""
    if loc.get("layer") is None:
        return f"localization: {loc.get('note') or 'none'}"
    parts = [f"layer {loc['layer']}", f"tensor {loc.get('tensor')}"]
    rows = loc.get("rows") or []
    if rows:
        from harness.localize import row_ranges  # (the engine's modules: only when there is a localization)

        parts.append(f"rows {row_ranges(rows)} of {loc.get('num_tokens', '?')}")
    ranks = loc.get("tp_ranks") or []
    parts.append(f"TP rank {', '.join(map(str, ranks))}" if ranks else (loc.get("shard_note") or "TP rank n/a"))
    if loc.get("pp_stage") is not None:
        parts.append(f"PP stage {loc['pp_stage']}")
    if isinstance(loc.get("max_error"), (int, float)):
        parts.append(f"error {loc['max_error']:.3g} (relative; tolerance {loc.get('rtol')})")
    if loc.get("note"):
        parts.append(str(loc["note"]))
    return "localization: " + ", ".join(parts)


def format_other_divergences(divergences: Sequence[dict[str, Any]] | None) -> str:
    """The diverging requests after the first, one line each (junit ``<failure>`` text)."""
    lines = [f"request {d.get('request_id')} step {d.get('step')}: {d.get('reason')}, candidate token "
             f"{d.get('candidate_token')!r} vs baseline token {d.get('baseline_token')!r} "
             f"(|Δ logprob| {d.get('logprob_diff')})" for d in (divergences or [])[1:]]
    return "\n".join([f"{len(lines)} more diverging requests:", *lines]) if lines else ""


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


def _last_line(text: str) -> str:
    return next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "")


def _testcase(suite: ET.Element, r: CaseResult) -> None:
    case = ET.SubElement(
        suite, "testcase", classname=_xml_text(f"{r.model}.{r.setup}"), name=_xml_text(r.scenario),
        time=f"{r.seconds:.3f}",
    )
    if r.status == "fail":
        el = ET.SubElement(case, "failure", message=_xml_text(_first_line(r.reason) or "comparison failed"))
        parts = (r.reason, format_localization(r.localization), format_divergence(r.first_divergence),
                 format_other_divergences(r.divergences))
        el.text = _xml_text("\n\n".join(t for t in parts if t))
    elif r.status == "error":
        # The harness's own reasons say what happened on their first line (the evidence follows:
        # a rank's last output lines, every rank's stack); a bare traceback says it on its last.
        summary_line = _first_line(r.reason) if r.reason.startswith("infrastructure:") else _last_line(r.reason)
        el = ET.SubElement(case, "error", message=_xml_text(summary_line or "error"))
        el.text = _xml_text(r.reason)
    elif r.status == "skip":
        ET.SubElement(case, "skipped", message=_xml_text(r.reason))


def junit_tree(results: Sequence[CaseResult], suite_name: str = "parity") -> ET.Element:
    """``<testsuites>`` holding one ``<testsuite>`` with a ``<testcase>`` per result."""
    counts = totals(results)
    attrs = {
        "name": _xml_text(suite_name), "tests": str(len(results)), "failures": str(counts["fail"]),
        "errors": str(counts["error"]), "skipped": str(counts["skip"]),
        "time": f"{sum(r.seconds for r in results):.3f}",
    }
    root = ET.Element("testsuites", attrs)
    suite = ET.SubElement(
        root, "testsuite", attrs, hostname=_xml_text(socket.gethostname()),
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    for r in results:
        _testcase(suite, r)
    return root


def write_junit(out_dir: Path, results: Sequence[CaseResult], suite_name: str = "parity") -> Path:
    """Write ``out_dir/junit.xml`` and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = junit_tree(results, suite_name)
    ET.indent(root)
    text = ET.tostring(root, encoding="unicode", xml_declaration=True)
    return atomic_write(out_dir / JUNIT_FILE, text + "\n")


__all__ = [
    "EXIT_FAIL", "EXIT_INFRA", "EXIT_NOTHING_RAN", "EXIT_OK", "EXIT_USAGE", "JUNIT_FILE", "RESULTS_FILE",
    "SUMMARY_FILE",
    "DuplicateCaseError", "Merged", "Override", "ResultStore", "atomic_write", "dumps_line", "environment", "exit_code",
    "format_divergence", "format_localization", "junit_tree", "merge", "read_results", "summary", "totals",
    "write_junit", "write_results", "write_summary",
]
