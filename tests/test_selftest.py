"""``harness.selftest``: the verdict and the table, with the matrix runs replaced by canned results."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.case import CaseResult
from harness.matrix import Matrix
from harness.plan import PlannedCase, RunOptions
from harness.selftest import selftest

MATRIX = Matrix("tiny", "two setups x two scenarios", ("tp2-eager", "tp2-sp-graph-full"), scenarios=("text", "mixed"),
                oracle=False)


RAISED = "engine raised in candidate tp2-sp-graph-full, rank 1: RuntimeError: pipeline hand-off"


def _result(setup: str, scenario: str, status: str, diff: float = 0.0, reason: str = "logprob") -> CaseResult:
    """A canned result; ``diff < 0`` stands for "the engine raised" (a fail without a divergence)."""
    if status == "fail" and diff < 0:
        return CaseResult(f"m/{setup}-{scenario}", setup, "b", scenario, "m", status, reason=RAISED)
    divergence = None if status != "fail" else {"reason": reason, "logprob_diff": diff, "tolerated": False}
    return CaseResult(f"m/{setup}-{scenario}", setup, "b", scenario, "m", status,
                      reason="infrastructure: rank 0 died" if status == "error" else "",
                      first_divergence=divergence, metrics={"max_logprob_diff": diff})


def _runner(outcomes: dict[str | None, dict[tuple[str, str], tuple[str, float]]]) -> Any:
    """A ``run_matrix`` stand-in: each run's statuses from ``outcomes[mutation]`` (default pass)."""
    def run(options: RunOptions, planned: Sequence[PlannedCase], out: Path, label: str) -> list[CaseResult]:
        table = outcomes.get(options.mutation, {})
        results = []
        for p in planned:
            key = (p.case.setup.id, p.case.scenario)
            status, diff = table.get(key, ("pass", 1e-5))
            results.append(_result(*key, status, diff))
        return results
    return run


def _selftest(tmp_path: Path, outcomes: dict[str | None, dict[tuple[str, str], tuple[str, float]]],
              mutations: Sequence[str] = ("a", "b")) -> Any:
    return selftest(MATRIX, RunOptions(backend="mp"), mutations, tmp_path, runner=_runner(outcomes))


def test_passes_when_clean_passes_and_every_mutation_is_caught(tmp_path: Path) -> None:
    report = _selftest(tmp_path, {"a": {("tp2-eager", "text"): ("fail", 0.3)},
                                  "b": {("tp2-sp-graph-full", "mixed"): ("fail", -1.0)}})
    assert report.clean_passed and report.passed
    assert [r.id for r in report.caught_by("a")] == ["m/tp2-eager-text"]
    margins = report.margins()
    assert margins["largest_clean_logprob_diff"] == 1e-5
    assert margins["smallest_caught_logprob_diff"] == 0.3
    assert margins["caught_by_engine_exception"] == 1
    assert margins["infrastructure_errors"] == 0
    written = json.loads((tmp_path / "selftest.json").read_text())
    assert written["passed"] and written["caught"]["b"] == ["m/tp2-sp-graph-full-mixed"]
    table = (tmp_path / "selftest.md").read_text()
    assert "| a | tp2-eager | missed | yes |" in table
    assert "| b | missed | tp2-sp-graph-full! | yes |" in table


def test_infrastructure_errors_catch_nothing(tmp_path: Path) -> None:
    """A crashed worker or a timeout says nothing about the engine: a mutation whose only
    non-passing cases are errors is missed, and the errors are reported apart."""
    report = _selftest(tmp_path, {"a": {("tp2-eager", "text"): ("fail", 0.3)},
                                  "b": {("tp2-sp-graph-full", "mixed"): ("error", 0.0)}})
    assert not report.passed
    assert report.caught_by("b") == []
    assert [r.id for r in report.errors_under("b")] == ["m/tp2-sp-graph-full-mixed"]
    assert report.margins()["infrastructure_errors"] == 1
    assert "| b | missed | missed | NO (1 errors) |" in report.scenario_table()


def test_a_missed_mutation_fails_the_selftest(tmp_path: Path) -> None:
    report = _selftest(tmp_path, {"a": {("tp2-eager", "text"): ("fail", 0.3)}})
    assert report.clean_passed and not report.passed
    assert report.caught_by("b") == []
    assert "| b | missed | missed | NO |" in report.scenario_table()


def test_a_clean_failure_fails_the_selftest(tmp_path: Path) -> None:
    everything = {(s, sc): ("fail", 1.0) for s in MATRIX.setups for sc in ("text", "mixed")}
    report = _selftest(tmp_path, {None: {("tp2-eager", "text"): ("fail", 0.6)}, "a": everything, "b": everything})
    assert not report.clean_passed and not report.passed


def test_a_case_that_fails_clean_catches_nothing(tmp_path: Path) -> None:
    """Its failure under a mutation would have happened anyway: it is neither a catch nor a margin."""
    broken = ("tp2-eager", "text")
    report = _selftest(tmp_path, {None: {broken: ("fail", 0.6)},
                                  "a": {broken: ("fail", 0.6)},
                                  "b": {broken: ("fail", 0.6), ("tp2-eager", "mixed"): ("fail", 2.0)}})
    assert report.caught_by("a") == []
    assert [r.id for r in report.caught_by("b")] == ["m/tp2-eager-mixed"]
    assert report.margins()["smallest_caught_logprob_diff"] == 2.0
    assert report.scenario_table().splitlines()[2].startswith("| a | missed | missed | NO |")


def test_activation_margins_from_localizations(tmp_path: Path) -> None:
    """With ``--localize``: the largest clean activation error against the smallest of a localized catch."""
    def run(options: RunOptions, planned: Sequence[PlannedCase], out: Path, label: str) -> list[CaseResult]:
        results = []
        for i, p in enumerate(planned):
            r = _result(p.case.setup.id, p.case.scenario, "pass" if options.mutation is None or i else "fail", 0.2)
            if options.mutation is None:
                r.metrics["activation_error"] = 1e-6 * (i + 1)
            elif r.status == "fail":
                found = options.mutation == "a"
                r.localization = {"layer": 0 if found else None, "per_layer_error": [0.4 if found else 1e-6, 0.1]}
            results.append(r)
        return results

    report = selftest(MATRIX, RunOptions(backend="mp", localize=True), ("a", "b"), tmp_path, runner=run)
    margins = report.margins()
    assert margins["largest_clean_activation_error"] == 4e-6
    assert margins["smallest_caught_activation_error"] == 0.4
    assert margins["caught_not_visible_in_prefill"] == 1
    assert "largest clean 4.00e-06; smallest of a localized caught case 4.00e-01" in (
        tmp_path / "selftest.md").read_text()
