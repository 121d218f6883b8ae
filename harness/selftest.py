"""``parity selftest``: run a matrix clean and under every catalogued mutation; every mutation
must be caught by at least one case and the clean run must pass."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.case import CaseResult
from harness.matrix import Matrix
from harness.orchestrate import Orchestrator
from harness.outcome import ENGINE_RAISED
from harness.plan import PlannedCase, RunOptions, plan
from harness.progress import Progress
from harness.results import ResultStore, environment


@dataclass
class SelftestReport:
    matrix: str
    clean: list[CaseResult]
    mutated: dict[str, list[CaseResult]] = field(default_factory=dict)

    @property
    def clean_passed(self) -> bool:
        return all(r.status in ("pass", "skip") for r in self.clean)

    @property
    def clean_failures(self) -> set[str]:
        """Ids of the cases that already fail clean: their failures under a mutation prove nothing."""
        return {r.id for r in self.clean if r.status in ("fail", "error")}

    def _hits(self, results: Sequence[CaseResult]) -> list[CaseResult]:
        """The cases that caught a mutation: ``fail`` only (the engine got them wrong). An
        ``error`` is the infrastructure's (a crashed worker, a timeout) and catches nothing."""
        bad = self.clean_failures
        return [r for r in results if r.status == "fail" and r.id not in bad]

    def caught_by(self, mutation: str) -> list[CaseResult]:
        return self._hits(self.mutated[mutation])

    def errors_under(self, mutation: str) -> list[CaseResult]:
        """Infrastructure errors of a mutated run: reported, never counted as catches."""
        return [r for r in self.mutated[mutation] if r.status == "error"]

    @property
    def passed(self) -> bool:
        return self.clean_passed and all(self.caught_by(m) for m in self.mutated)

    def scenario_table(self) -> str:
        """Markdown: mutation x scenario, each cell the setups that caught it (or "missed")."""
        scenarios = list(dict.fromkeys(r.scenario for r in self.clean))
        lines = ["| mutation | " + " | ".join(scenarios) + " | caught |",
                 "| --- | " + " | ".join("---" for _ in scenarios) + " | --- |"]
        for name, results in self.mutated.items():
            cells = []
            for sc in scenarios:
                hits = self._hits([r for r in results if r.scenario == sc])
                ran = [r for r in results
                       if r.scenario == sc and r.status != "skip" and r.id not in self.clean_failures]
                cells.append(", ".join(_short(r) for r in hits) if hits else ("missed" if ran else "skip"))
            errors = len(self.errors_under(name))
            verdict = ("yes" if self.caught_by(name) else "NO") + (f" ({errors} errors)" if errors else "")
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {verdict} |")
        return "\n".join(lines)

    def margins(self) -> dict[str, Any]:
        """Largest clean errors vs the smallest errors of caught cases: logprobs (a case's error is
        the largest |Δ logprob| it showed, at its first divergence or later) and, where cases were
        localized, per-layer activations."""
        clean = [float(r.metrics.get("max_logprob_diff", 0.0)) for r in self.clean if r.status == "pass"]
        clean_act = [float(r.metrics["activation_error"]) for r in self.clean
                     if r.metrics.get("activation_error") is not None]
        caught: list[tuple[float, str]] = []
        caught_act: list[float] = []
        token_failures = raised = invisible = 0
        for name, results in self.mutated.items():
            for r in self._hits(results):
                if r.reason.startswith(ENGINE_RAISED):
                    raised += 1
                    continue
                loc = r.localization or {}
                if loc.get("layer") is not None and loc.get("per_layer_error"):
                    caught_act.append(max(loc["per_layer_error"]))
                elif loc:
                    invisible += 1
                d = r.first_divergence
                if not d or d.get("tolerated"):
                    continue
                if d.get("reason") == "logprob" and isinstance(d.get("logprob_diff"), float):
                    error = max(d["logprob_diff"], float(r.metrics.get("max_logprob_diff", 0.0)))
                    caught.append((error, f"{name}: {r.id}"))
                else:
                    token_failures += 1
        weakest = min(caught, default=(math.inf, ""))
        return {"largest_clean_logprob_diff": max(clean, default=0.0),
                "largest_clean_activation_error": max(clean_act, default=None),
                "smallest_caught_activation_error": min(caught_act, default=None),
                "caught_not_visible_in_prefill": invisible,
                "smallest_caught_logprob_diff": weakest[0], "weakest_logprob_catch": weakest[1],
                "caught_by_token_or_length": token_failures,
                "caught_by_engine_exception": raised,
                "infrastructure_errors": sum(len(self.errors_under(m)) for m in self.mutated)}

    def to_json(self) -> dict[str, Any]:
        return {"matrix": self.matrix, "clean_passed": self.clean_passed, "passed": self.passed,
                "caught": {m: [r.id for r in self.caught_by(m)] for m in self.mutated},
                "margins": self.margins(),
                "clean": [r.to_json() for r in self.clean],
                "mutated": {m: [r.to_json() for r in rs] for m, rs in self.mutated.items()}}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2e}"


def _short(r: CaseResult) -> str:
    return r.setup + ("!" if r.reason.startswith(ENGINE_RAISED) else "")


def run_matrix(options: RunOptions, planned: Sequence[PlannedCase], out: Path, label: str) -> list[CaseResult]:
    store = ResultStore(out)
    progress = Progress(len(planned))
    print(f"selftest: {label} ({len(planned)} cases)", file=sys.stderr)
    orchestrator = Orchestrator(options)
    results = []
    try:
        for p in planned:
            progress.begin(p.case.id)
            result = orchestrator.run_case(p)
            if options.localize and result.status == "pass":
                result.metrics["activation_error"] = clean_activation_error(orchestrator, p)
            store.append(result)
            progress.finish(p.case.id, result.status, result.seconds)
            results.append(result)
    finally:
        orchestrator.close()
    return results


def clean_activation_error(orchestrator: Orchestrator, planned: PlannedCase) -> float | None:
    """The largest per-layer activation error (``localize``'s measure) between a passing case's
    candidate and baseline prefill: what the localizer's tolerance must stay above."""
    case = planned.case
    requests = orchestrator.requests(case.scenario)
    loc = orchestrator.localize(case, requests, requests[0].request_id)
    errors = (loc or {}).get("per_layer_error")
    return max(errors) if errors else None


def selftest(matrix: Matrix, options: RunOptions, mutations: Sequence[str], out: Path,
             runner: Callable[..., list[CaseResult]] = run_matrix) -> SelftestReport:
    """Clean run first (it also fills the baseline cache), then one run per mutation."""
    planned = plan(matrix, options)
    report = SelftestReport(matrix.name, runner(options, planned, out / "clean", "clean"))
    for name in mutations:
        mutated = replace(options, mutation=name)
        report.mutated[name] = runner(mutated, plan(matrix, mutated), out / name, f"mutation {name}")
    write(report, out)
    return report


def write(report: SelftestReport, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "selftest.json").write_text(json.dumps(report.to_json(), indent=2, default=str))
    margins = report.margins()
    text = [f"# parity selftest: matrix {report.matrix}", "",
            f"clean run: {'PASS' if report.clean_passed else 'FAIL'}; "
            f"every mutation caught: {'yes' if all(report.caught_by(m) for m in report.mutated) else 'NO'}", "",
            "Cells list the setups whose case of that scenario caught the mutation "
            "(`!`: the engine raised, e.g. a shape check: a `fail`); only `fail`s count, infrastructure "
            "errors are reported apart; a case that fails clean is not counted.",
            "", report.scenario_table(), "",
            f"Largest clean |Δ logprob|: {margins['largest_clean_logprob_diff']:.2e}; smallest |Δ logprob| of a "
            f"case caught on logprobs: {margins['smallest_caught_logprob_diff']:.2e} "
            f"({margins['weakest_logprob_catch'] or 'none'}); caught by a token/length "
            f"divergence: {margins['caught_by_token_or_length']}; caught by an engine exception: "
            f"{margins['caught_by_engine_exception']}; infrastructure errors (no catch): "
            f"{margins['infrastructure_errors']}.",
            ""]
    if margins["largest_clean_activation_error"] is not None:
        text += [f"Activations (localizer, relative per-layer error): largest clean "
                 f"{margins['largest_clean_activation_error']:.2e}; smallest of a localized caught case "
                 f"{_fmt(margins['smallest_caught_activation_error'])}; caught cases whose prefill "
                 f"activations all agree (the bug is in decode or the hand-off of later steps): "
                 f"{margins['caught_not_visible_in_prefill']}.", ""]
    text += [f"environment: {json.dumps(environment())}"]
    (out / "selftest.md").write_text("\n".join(text) + "\n")
