"""Detection power end to end: the orchestrator under a mutation, with localization."""

from __future__ import annotations

from collections.abc import Sequence

from harness.case import CaseResult
from harness.matrix import get_matrix
from harness.orchestrate import Orchestrator
from harness.plan import PlannedCase, RunOptions, plan


def run_cases(options: RunOptions, planned: Sequence[PlannedCase]) -> list[CaseResult]:
    """The planned cases' results from one orchestrator, closed afterwards."""
    orchestrator = Orchestrator(options)
    try:
        return [orchestrator.run_case(p) for p in planned]
    finally:
        orchestrator.close()


def test_middle_slice_bug_caught_and_localized() -> None:
    """vLLM #33322 must be caught by every scenario whose embeddings come from outside the
    compiled graph (prompt-embeds, multimodal, mixed: the Middle pattern then gets a full-length
    residual and slices rank 0's rows on every rank), and localized to layer 0's residual, in
    the rows of TP rank 1. (Text-only SP without PP hides the slice, the embedding inside the
    graph making the residual arrive sharded; whether a case catches it anyway is left open.)"""
    options = RunOptions(backend="mp", mutation="sp-middle-residual-slice")
    must_catch = ["prompt_embeds", "multimodal", "mixed"]
    planned = plan(get_matrix("smoke"), options, setups=["tp2-sp-graph-full"], scenarios=must_catch)
    results = {r.scenario: r for r in run_cases(options, planned)}
    statuses = {name: r.status for name, r in results.items()}
    assert statuses == dict.fromkeys(must_catch, "fail"), statuses
    for name in must_catch:
        loc = results[name].localization
        assert loc is not None, name
        assert (loc["layer"], loc["tensor"], loc["tp_rank"]) == (0, "residual", 1), (name, loc)
        local_len = loc["num_tokens"] // 2
        assert loc["rows"] and all(r >= local_len for r in loc["rows"]), (name, loc)  # rank 1's shard
    assert "request" in results["prompt_embeds"].reason and "step" in results["prompt_embeds"].reason


def test_a_bug_every_setup_shares_fails_only_the_oracle_case_and_leaves_the_cache_clean() -> None:
    """``prompt-embeds-chunk-offset`` sits in the runner every setup shares (applied to the
    baselines' workers too): tp2 against tp1 passes, the oracle case (one device against Hugging
    Face transformers) fails. Its mutated baselines must not reach the cache of clean ones: a
    clean run right after passes."""
    options = RunOptions(backend="mp", mutation="prompt-embeds-chunk-offset")
    planned = plan(get_matrix("smoke"), options, scenarios=["prompt_embeds"])
    chosen = [p for p in planned if p.case.setup.id in ("tp2-eager", "tp1-pp1-eager")]
    assert [p.case.baseline_id for p in chosen] == ["tp1-pp1-eager", "hf"]
    mutated = {r.setup: r for r in run_cases(options, chosen)}
    assert mutated["tp2-eager"].status == "pass", mutated["tp2-eager"].reason
    assert mutated["tp1-pp1-eager"].status == "fail"
    assert "step 0" in mutated["tp1-pp1-eager"].reason
    [clean] = run_cases(RunOptions(backend="mp"), chosen[:1])
    assert clean.status == "pass", clean.reason


def test_an_engine_exception_is_a_fail_naming_rank_and_frame() -> None:
    """``sp-threshold-ignored-in-handoff`` makes the pipeline hand-off's row-count guard raise in
    the engine: the engine got the case wrong (``fail``), not the infrastructure (``error``)."""
    options = RunOptions(backend="mp", mutation="sp-threshold-ignored-in-handoff", localize=False)
    planned = plan(get_matrix("smoke"), options, setups=["tp2-pp2-sp-graph-full-spmin16"], scenarios=["text"])
    [result] = run_cases(options, planned)
    assert result.status == "fail", result.reason
    assert result.reason.startswith("engine raised in candidate tp2-pp2-sp-graph-full-spmin16, rank ")
    assert "RuntimeError: pipeline hand-off" in result.reason
    assert "reference_impl/parallel/pipeline.py" in result.reason


def test_sp_threshold_above_every_step_fails_as_vacuous() -> None:
    """SP that never rewrote a graph compares SP-off with SP-off: it must not pass."""
    options = RunOptions(backend="mp")
    planned = plan(get_matrix("smoke"), options, setups=["tp2-sp-graph-full-spmin512"], scenarios=["prompt_embeds"])
    [result] = run_cases(options, planned)
    assert result.status == "fail"
    assert result.reason.startswith("vacuous: SP never applied")
    assert result.sp_matches is not None and result.sp_matches["sp_applied_sizes"] == []
    assert set(result.sp_matches["ranks"]) == {"0", "1"}
