"""transformers' tensor parallelism under the harness, over real CPU ranks (mp backend, gloo):
a clean Llama at tp2 passes against both its baselines (transformers on one device, and the
reference engine at tp2) and its per-layer capture matches the reference engine's; a Qwen2 with one KV head at tp2 fails with transformers' own message,
rank and layout; a pp2 setup is skipped with the reason. ~25 s on this project's 2-core CPU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.case import CaseResult
from harness.localize import ACTIVATION_RTOL, localize, merge_captures
from harness.matrix import get_matrix
from harness.orchestrate import Orchestrator
from harness.plan import RunOptions, plan
from harness.pool import LauncherPool
from harness.setup import ParallelSetup
from scenarios.models import checkpoint
from scenarios.registry import get_scenario

# Fewer generated tokens than the matrices' 16: the findings below show from the first steps.
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def pool() -> Iterator[LauncherPool]:
    """One pool of rank processes for the module (every engine and checkpoint is built in it)."""
    shared = LauncherPool("mp", "cpu")
    yield shared
    shared.close()


def run(pool: LauncherPool, model: str, setups: list[str], scenarios: list[str]) -> dict[str, CaseResult]:
    options = RunOptions(backend="mp", model=model, engine="transformers", max_new_tokens=MAX_NEW_TOKENS,
                         use_baseline_cache=False)
    orchestrator = Orchestrator(options, pool=pool)
    return {p.case.id: orchestrator.run_case(p) for p in plan(get_matrix("smoke"), options, setups, scenarios)}


def test_clean_llama_tp2_passes_against_one_device_and_the_reference_engine(pool: LauncherPool) -> None:
    results = run(pool, "tiny-llama", ["tp2-eager"], ["prompt_embeds"])
    same = results["tiny-llama/tp2-eager@transformers-prompt_embeds"]
    cross = results["tiny-llama/tp2-eager@transformers-prompt_embeds-vs-reference"]
    assert (same.status, same.baseline) == ("pass", "tp1-pp1-eager@transformers"), same.reason
    assert (cross.status, cross.baseline) == ("pass", "tp2-eager"), cross.reason
    for result in (same, cross):  # it compared something: every step of every request
        assert result.metrics["steps_compared"] == 3 * MAX_NEW_TOKENS and result.metrics["tokens_identical"]


def test_tp2_capture_through_hooks_matches_the_reference_engine_layer_by_layer(pool: LauncherPool) -> None:
    """The localizer's replay on transformers' TP ranks: forward hooks, TP rank 0 answering, the
    same tensors as the reference engine at tp2 within the localizer's fp32 tolerance."""
    ck = str(checkpoint("tiny-llama"))
    reqs = get_scenario("text").requests(Path(ck), "float32")
    ours = merge_captures(pool.capture(ParallelSetup(tp=2, engine="transformers"), ck, reqs))
    reference = merge_captures(pool.capture(ParallelSetup(tp=2), ck, reqs))
    assert {k for k in ours if k.endswith(".residual")} == {f"{i}.residual" for i in range(4)}
    found = localize(ours, reference, 2, "float32", token_sharded=False)
    assert found["layer"] is None and max(found["per_layer_error"]) < ACTIVATION_RTOL["float32"], found


def test_tp2_ranks_report_the_weights_they_hold(pool: LauncherPool) -> None:
    """Each transformers TP rank's ``weight_bytes`` (the record's ``rank_weights_mib``) is its local
    shard of every DTensor parameter: less than the model, the ranks together at least the model
    (replicated norms count on each), as for the reference engine's ranks."""
    from reference_impl.loader import load_model

    ck = str(checkpoint("tiny-llama"))
    reqs = get_scenario("text").requests(Path(ck), "float32")[:1]
    full = sum(p.numel() * p.element_size() for p in load_model(ck).parameters())
    for setup in (ParallelSetup(tp=2, engine="transformers"), ParallelSetup(tp=2)):
        ranks = pool.run_traced(setup, ck, reqs).ranks
        held = [r.weight_bytes for r in ranks]
        assert len(held) == 2 and all(0 < b < full for b in held) and sum(held) >= full, (setup.id, held, full)
        assert all(r.peak_rss_bytes > 0 for r in ranks)


def test_qwen2_with_one_kv_head_at_tp2_fails_naming_engine_rank_and_message(pool: LauncherPool) -> None:
    result = run(pool, "tiny-qwen2", ["tp2-eager"], ["text"])["tiny-qwen2/tp2-eager@transformers-text"]
    assert result.status == "fail"
    headline, layout = result.reason.splitlines()[:2]
    assert headline.startswith("engine raised in candidate tp2-eager@transformers, rank ")
    # The text scenario's first prompt is one token: k_proj's 16 features split 8 per rank.
    assert "RuntimeError: shape '[1, 1, -1, 16]' is invalid for input of size 8" in headline
    assert "(at transformers/models/qwen2/modeling_qwen2.py:" in headline
    assert "fewer KV heads than TP ranks" in layout


def test_pp2_is_skipped_with_the_reason(pool: LauncherPool) -> None:
    results = run(pool, "tiny-llama", ["tp2-pp2-eager"], ["text"])
    result = results["tiny-llama/tp2-pp2-eager@transformers-text"]
    assert result.status == "skip" and "cannot express pp=2" in result.reason
