"""Compiled passes on CPU with gloo: graph structure of the SP rewrite, SP numerics against the
same setup with SP off, the SP token threshold under PP, and proof that these tests bite."""

from __future__ import annotations

from typing import Any

import pytest

from harness.launch import MpLauncher
from reference_impl.compile import CompileConfig
from reference_impl.config import load_config
from reference_impl.engine import EngineSpec
from reference_impl.requests import Request, RequestOutput
from scenarios.models import checkpoint

from helpers import ENGINE, SP_ATOL, differences, scenario_requests

# SP vs SP off compares under the harness's ``identical`` noise floor (SP_ATOL): SP computes
# each norm on the same rows with the same kernel and replaces an all-reduce by reduce-scatter +
# all-gather of the same sums; on gloo/CPU the outputs are bit-identical (measured max diff 0.0).
SCENARIOS = ("text", "prompt_embeds", "multimodal", "mixed")
AR, RS, AG = (f"_c10d_functional.{op}.default" for op in ("all_reduce", "reduce_scatter_tensor",
                                                          "all_gather_into_tensor"))


def scenario(name: str, model: str = "tiny-llava") -> list[Request]:
    return scenario_requests(name, model, max_new_tokens=8)


def spec(model: str, tp: int, pp: int, sp: bool, mode: str = "graph", partition: str = "full",
         sp_min_tokens: int = 0) -> EngineSpec:
    return EngineSpec(str(checkpoint(model)), tp, pp, engine=ENGINE,
                      compile=CompileConfig(mode, partition, sp=sp, sp_min_tokens=sp_min_tokens))


def sp_differences(got: list[RequestOutput], want: list[RequestOutput]) -> dict[str, str]:
    """How an SP run differs from the same setup with SP off (``helpers.differences``)."""
    return differences(got, want, SP_ATOL)


def records(launcher: MpLauncher) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = launcher.call("compile_records")[0]
    return out


# -- graph structure -----------------------------------------------------------------------------

@pytest.mark.parametrize("model,eps", [("tiny-llama", 1e-5), ("tiny-qwen2", 1e-6), ("tiny-llava", 1e-2)])
def test_sp_pattern_counts_full_graph(launchers: dict[int, MpLauncher], model: str, eps: float) -> None:
    assert load_config(checkpoint(model)).text.rms_norm_eps == eps  # every epsilon must match
    launcher = launchers[2]
    launcher.run(spec(model, 2, 1, sp=True), scenario("text", model) + scenario("prompt_embeds", model))
    recs = records(launcher)
    kinds = {r["graph"].split("/")[0] for r in recs}
    assert kinds == {"ids", "embeds"}, kinds
    layers = load_config(checkpoint(model)).text.num_layers
    for r in recs:
        c, ops, T = r["changes"], r["ops_after"], r["num_tokens"]
        where = f"{r['graph']} T={T}: {c}"
        if r["graph"].startswith("ids"):
            # The embedding's all-reduce feeds the first norm: First once.
            assert c["sequence_parallelism.first"] == 1, where
            # Middle and Final (one per norm after the first) all see a sharded residual.
            assert r["residual_rows_inputs"] == [T // 2] * (2 * layers), where
        else:
            # Embedding outside the graph: no First; Middle gets the full-length residual.
            assert c["sequence_parallelism.first"] == 0, where
            assert r["residual_rows_inputs"][0] == T, where
            assert r["residual_rows_inputs"][1:] == [T // 2] * (2 * layers - 1), where
        assert c["sequence_parallelism.middle"] == 2 * layers - 1, where
        assert c["sequence_parallelism.final"] == 1, where
        matches = c["sequence_parallelism"]
        assert ops.get(AR, 0) == 0, f"all-reduce left in the decoder: {where}"
        assert ops.get(RS, 0) == ops.get(AG, 0) == matches, where


def test_sp_pattern_counts_per_piece(launchers: dict[int, MpLauncher]) -> None:
    launcher = launchers[2]
    launcher.run(spec("tiny-llama", 2, 1, sp=True, partition="piecewise"), scenario("text", "tiny-llama"))
    recs = [r for r in records(launcher) if r["graph"].startswith("ids")]
    by_piece: dict[str, set[tuple[int, int, int]]] = {}
    for r in recs:
        c = r["changes"]
        key = (c["sequence_parallelism.first"], c["sequence_parallelism.middle"], c["sequence_parallelism.final"])
        by_piece.setdefault(r["graph"].split("/")[1], set()).add(key)
    # 4 layers -> attention in submod_1/3/5/7; compiled pieces between them.
    assert by_piece == {
        "submod_0": {(1, 0, 0)},  # embedding all-reduce -> first norm
        "submod_2": {(0, 2, 0)},  # o_proj -> post-attention norm, down_proj -> next input norm
        "submod_4": {(0, 2, 0)},
        "submod_6": {(0, 2, 0)},
        "submod_8": {(0, 1, 1)},  # last layer's post-attention norm, then the final norm
    }, by_piece


# -- numerics: SP equals the same setup with SP off --------------------------------------------

NUMERIC_CASES = [(tp, pp, part) for tp, pp in ((2, 1), (2, 2)) for part in ("full", "piecewise")]


@pytest.mark.parametrize("tp,pp,partition", NUMERIC_CASES,
                         ids=[f"tp{tp}{'-pp2' if pp > 1 else ''}-sp-graph-{p}" for tp, pp, p in NUMERIC_CASES])
def test_sp_equals_sp_off(launchers: dict[int, MpLauncher], tp: int, pp: int, partition: str) -> None:
    launcher = launchers[tp * pp]
    baseline = {s: launcher.run(spec("tiny-llava", tp, pp, sp=False, partition=partition), scenario(s))
                for s in SCENARIOS}
    failures = {}
    for s in SCENARIOS:
        got = launcher.run(spec("tiny-llava", tp, pp, sp=True, partition=partition), scenario(s))
        if problems := sp_differences(got, baseline[s]):
            failures[s] = problems
    assert not failures, failures


def test_sp_equals_sp_off_inductor(launchers: dict[int, MpLauncher]) -> None:
    launcher = launchers[2]
    want = launcher.run(spec("tiny-llava", 2, 1, sp=False, mode="inductor"), scenario("mixed"))
    got = launcher.run(spec("tiny-llava", 2, 1, sp=True, mode="inductor"), scenario("mixed"))
    assert not sp_differences(got, want)
    assert any(r["changes"].get("sequence_parallelism", 0) > 0 for r in records(launcher))


def test_sp_threshold_under_pp(launchers: dict[int, MpLauncher]) -> None:
    """Prefill steps (24 tokens) run SP, decode steps (4 tokens) do not; the hand-off follows."""
    launcher = launchers[4]
    reqs = scenario("text", "tiny-llama")
    want = launcher.run(spec("tiny-llama", 2, 2, sp=False), reqs)
    got = launcher.run(spec("tiny-llama", 2, 2, sp=True, sp_min_tokens=16), reqs)
    assert not sp_differences(got, want)
    sp_sizes = {r["num_tokens"] for r in records(launcher) if r["changes"].get("sequence_parallelism", 0)}
    plain_sizes = {r["num_tokens"] for r in records(launcher) if not r["changes"].get("sequence_parallelism", 0)}
    assert sp_sizes and min(sp_sizes) >= 16, sp_sizes
    assert plain_sizes and max(plain_sizes) < 16, plain_sizes


# -- these tests bite ------------------------------------------------------------------------------

def test_middle_slice_bug_caught_by_embeds_and_multimodal_only() -> None:
    with MpLauncher(2) as launcher:
        baseline = {s: launcher.run(spec("tiny-llava", 2, 1, sp=False), scenario(s)) for s in SCENARIOS}
        launcher.call("mutate", "sp-middle-residual-slice")  # vLLM #33322, harness.mutations
        caught = {s: bool(sp_differences(launcher.run(spec("tiny-llava", 2, 1, sp=True), scenario(s)), baseline[s]))
                  for s in SCENARIOS}
    assert caught == {"text": False, "prompt_embeds": True, "multimodal": True, "mixed": True}, caught


def test_pp_handoff_slice_bug_caught_by_pp_sp() -> None:
    with MpLauncher(4) as launcher:
        reqs = scenario("text")
        want = launcher.run(spec("tiny-llava", 2, 2, sp=False), reqs)
        launcher.call("mutate", "pp-handoff-residual-slice")
        assert not sp_differences(launcher.run(spec("tiny-llava", 2, 2, sp=False), reqs), want)  # no SP: unaffected
        assert sp_differences(launcher.run(spec("tiny-llava", 2, 2, sp=True), reqs), want)
