"""Detection power end to end: the orchestrator under a mutation, with localization."""

from __future__ import annotations

from harness.matrix import get_matrix
from harness.orchestrate import Orchestrator, RunOptions, plan


def test_middle_slice_bug_pattern_and_localization() -> None:
    """vLLM #33322: caught by prompt-embeds, multimodal and mixed, not by text-only SP without
    PP (the embedding inside the graph makes the residual arrive sharded, hiding the slice);
    localized to layer 0's residual, in the rows of TP rank 1."""
    options = RunOptions(backend="mp", mutation="sp-middle-residual-slice")
    planned = plan(get_matrix("smoke"), options, setups=["tp2-sp-graph-full"])
    orchestrator = Orchestrator(options)
    try:
        results = {p.case.scenario: orchestrator.run_case(p) for p in planned}
    finally:
        orchestrator.close()
    statuses = {name: r.status for name, r in results.items()}
    assert statuses == {"text": "pass", "prompt_embeds": "fail", "multimodal": "fail", "mixed": "fail"}, statuses
    for name in ("prompt_embeds", "multimodal", "mixed"):
        loc = results[name].localization
        assert loc is not None, name
        assert (loc["layer"], loc["tensor"], loc["tp_rank"]) == (0, "residual", 1), (name, loc)
        local_len = loc["num_tokens"] // 2
        assert loc["rows"] and all(r >= local_len for r in loc["rows"]), (name, loc)  # rank 1's shard
    assert "request" in results["prompt_embeds"].reason and "step" in results["prompt_embeds"].reason
