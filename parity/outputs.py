"""The files of a run directory, written together: ``summary.json`` and ``junit.xml`` (by the
harness, ``harness.results``) and ``index.html`` (by the reports, from the same records)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.case import CaseResult
from harness.results import Merged, atomic_write, summary, write_junit, write_summary
from reports import render_index


def write_outputs(out_dir: Path, results: Sequence[CaseResult], environment: dict[str, Any],
                  run: dict[str, Any] | None = None, merged: Merged | None = None,
                  history: dict[str, Any] | None = None, accuracy: dict[str, Any] | None = None) -> Path:
    """Write ``summary.json``, ``junit.xml`` and ``index.html`` into ``out_dir``; return the index
    path. ``run``: the run's settings (``harness.run_meta``); ``merged``: the inputs of a
    ``parity report``; ``history``: the run against earlier runs (``{"previous", "cases",
    "fixed"}``, ``summary.json``'s ``"history"``); ``accuracy``: an ``accuracy.json`` document
    to show as a section. The report renders the ``summary.json`` document's plain records."""
    write_summary(out_dir, results, environment, run, merged)
    if history is not None:
        path = Path(out_dir) / "summary.json"
        doc_with_history = json.loads(path.read_text())
        doc_with_history["history"] = history
        atomic_write(path, json.dumps(doc_with_history, indent=2) + "\n")
    write_junit(out_dir, results)
    doc = summary(results, environment, run, merged)
    inputs: dict[str, Any] = {key: doc[key] for key in ("inputs", "overridden") if key in doc}
    return render_index(out_dir, doc["cases"], doc["environment"], run=doc.get("run"), merged=inputs or None,
                        history=history, accuracy=accuracy)
