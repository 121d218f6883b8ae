"""A run against earlier ones (nightlies): each failure new or recurring, what got fixed, what is
flaky.

Runs are result directories (``results.jsonl`` and ``summary.json``), the current one first and
then the earlier ones, most recent first. A case is *bad* in a run when its status is ``fail`` or
``error``, *good* when ``pass``; skipped or absent, the run says nothing of it.

- ``new``: bad now, not bad in the most recent earlier run that ran it (or never ran before);
- ``recurring``: bad now and in that run;
- ``fixed``: good now, bad in that run;
- ``flaky``: within the last ``window`` runs, two runs of the same engine code (the engine's
  source hash) and the same injected mutation disagree on the case. A status that changed with
  the code is a regression or a fix, not a flake; one that changed without it is a flake.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.results import RESULTS_FILE, SUMMARY_FILE, read_results

BAD = ("fail", "error")
# Runs looked at for flakiness: a week of nightlies.
DEFAULT_WINDOW = 7


@dataclass(frozen=True)
class RunStatuses:
    """One run: where it is, what code it ran (engine hash and mutation) and each case's status."""

    dir: str
    identity: tuple[str | None, str | None]
    statuses: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, run_dir: Path) -> RunStatuses:
        path = Path(run_dir) / RESULTS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir}: no {RESULTS_FILE} (not a run directory)")
        statuses = {r.id: r.status for r in read_results(path)}
        run: dict[str, Any] = {}
        summary = Path(run_dir) / SUMMARY_FILE
        if summary.is_file():
            run = json.loads(summary.read_text()).get("run") or {}
        return cls(str(run_dir), (run.get("engine_code"), run.get("mutation")), statuses)

    def verdict(self, case: str) -> bool | None:
        """True bad, False good, None: skipped or not run."""
        status = self.statuses.get(case)
        if status in BAD:
            return True
        return False if status == "pass" else None


def classify(current: RunStatuses, previous: Sequence[RunStatuses], window: int = DEFAULT_WINDOW) -> dict[str, Any]:
    """The ``"history"`` object of ``summary.json`` (docs/report: the tags and the fixed list)."""
    runs = [current, *previous][:max(window, 1)]
    cases: dict[str, dict[str, Any]] = {}
    fixed: list[str] = []
    for case in sorted(set().union(*(r.statuses for r in runs))):
        now = current.verdict(case)
        before = next((v for r in previous if (v := r.verdict(case)) is not None), None)
        if now is True:
            kind = "recurring" if before is True else "new"
        elif now is False and before is True:
            kind = "fixed"
            fixed.append(case)
        elif now is False:
            kind = "pass"
        else:
            continue  # skipped or absent now: nothing to say of it this run
        seen = [(r.identity, v) for r in runs if (v := r.verdict(case)) is not None]
        by_code: dict[tuple[str | None, str | None], set[bool]] = {}
        for identity, v in seen:
            by_code.setdefault(identity, set()).add(v)
        flaky = any(len(vs) > 1 for identity, vs in by_code.items() if identity[0] is not None)
        cases[case] = {"class": kind, "flaky": flaky, "failures": sum(v for _, v in seen), "runs": len(seen)}
    return {"previous": [r.dir for r in previous], "window": window, "cases": cases, "fixed": fixed}


def history(current_dir: Path, previous_dirs: Sequence[Path], window: int = DEFAULT_WINDOW) -> dict[str, Any]:
    return classify(RunStatuses.read(current_dir), [RunStatuses.read(d) for d in previous_dirs], window)
