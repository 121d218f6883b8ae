"""Two CUDA devices over NCCL: collectives inside compiled graphs, the SP pass on GPU graphs, and
tp2 / tp2-sp end to end through the harness.

Every test carries the ``multi_gpu`` marker and is skipped with a reason with fewer than two CUDA
devices (the plugin's collection hook). Run them with ``pytest -m multi_gpu tests/test_multi_gpu.py``
on a machine with two GPUs. Ranks are the multiprocessing launcher's processes, one per GPU, with
NCCL between them; outputs are judged by the harness's own comparator and tolerances.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from harness.compare import compare
from harness.launch import MpLauncher
from harness.matrix import get_matrix
from harness.orchestrate import Orchestrator
from harness.plan import RunOptions, plan
from reference_impl.compile import CompileConfig
from reference_impl.config import load_config
from reference_impl.engine import EngineSpec
from reference_impl.requests import Request
from scenarios.models import checkpoint
from scenarios.registry import get_scenario

from helpers import ENGINE

pytestmark = pytest.mark.multi_gpu

MODEL = "tiny-llava"
DTYPES = ("float32", "bfloat16")
# Every input kind: the embedding inside the graph (text) and outside it (prompt-embeds,
# images, and a batch mixing them), which is where the SP residual bugs live.
SCENARIOS = ("text", "prompt_embeds", "multimodal", "mixed")
AR, RS, AG = (f"_c10d_functional.{op}.default" for op in ("all_reduce", "reduce_scatter_tensor",
                                                          "all_gather_into_tensor"))
COMPILED = [("graph", "full"), ("graph", "piecewise"), ("inductor", "full"), ("inductor", "piecewise")]


@pytest.fixture(scope="module")
def pool() -> Iterator[MpLauncher]:
    """Two ranks, one per GPU, NCCL between them; kept for the module."""
    launcher = MpLauncher(2, "cuda")
    yield launcher
    launcher.close()


def _spec(dtype: str, mode: str = "eager", partition: str = "full", sp: bool = False) -> EngineSpec:
    return EngineSpec(str(checkpoint(MODEL)), 2, 1, dtype, "cuda", ENGINE, CompileConfig(mode, partition, sp=sp))


def _requests(dtype: str) -> list[Request]:
    return [r for s in SCENARIOS for r in get_scenario(s).requests(checkpoint(MODEL), dtype, max_new_tokens=8)]


def _records(launcher: MpLauncher) -> list[dict[str, Any]]:
    """Rank 0's compile records: what the passes did to each graph compiled so far."""
    out: list[dict[str, Any]] = launcher.call("compile_records")[0]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["graph", "inductor"])
def test_nccl_collectives_inside_compiled_graphs(pool: MpLauncher, mode: str, dtype: str) -> None:
    """tp2 compiled (SP off) against tp2 eager: each graph keeps its all-reduces as functional
    collectives (two a layer: attention and MLP outputs, and one for the vocabulary-parallel
    embedding when the ids are embedded inside the graph), and NCCL runs them inside the
    compiled code with the same results as eager."""
    requests = _requests(dtype)
    want = pool.run(_spec(dtype), requests)
    got = pool.run(_spec(dtype, mode), requests)
    verdict = compare(got, want, "logprobs", dtype)
    assert verdict.passed, verdict.message()
    layers = load_config(checkpoint(MODEL)).text.num_layers
    recs = [r for r in _records(pool) if r["num_tokens"] > 0]
    assert {r["graph"].split("/")[0] for r in recs} >= {"ids", "embeds"}
    for r in recs:
        embedded = 1 if r["graph"].startswith("ids") else 0
        assert r["ops_after"].get(AR, 0) == 2 * layers + embedded, (r["graph"], r["ops_after"])
        assert r["ops_after"].get(RS, 0) == 0 and r["ops_after"].get(AG, 0) == 0, r["ops_after"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("mode", "partition"), COMPILED)
def test_sp_pass_on_gpu_graphs(pool: MpLauncher, mode: str, partition: str, dtype: str) -> None:
    """tp2-sp against the same setup with SP off, every input kind: the pass rewrote every step's
    graph (no all-reduce left, a reduce-scatter and an all-gather in its place, matches of each
    pattern), and the outputs are identical within the ``identical`` policy's noise floor."""
    requests = _requests(dtype)
    want = pool.run(_spec(dtype, mode, partition), requests)
    run = pool.run_traced(_spec(dtype, mode, partition, sp=True), requests)
    verdict = compare(run.outputs, want, "identical", dtype)
    assert verdict.passed, verdict.message()
    steps = run.ranks[0].steps
    assert steps and {s["input"] for s in steps} >= {"ids", "embeds"}, steps
    for step in steps:
        assert step["sp_active"], step
        matches = {p: sum(piece["sp_matches"][p] for piece in step["pieces"]) for p in ("first", "middle", "final")}
        left = {k: sum(piece["collectives"][k] for piece in step["pieces"]) for k in ("all_reduce", "reduce_scatter",
                                                                                       "all_gather")}
        assert matches["middle"] > 0 and matches["final"] == 1, (step["input"], step["num_tokens"], matches)
        assert left["all_reduce"] == 0, (step["input"], left)
        assert left["reduce_scatter"] > 0 and left["all_gather"] > 0, (step["input"], left)


@pytest.mark.parametrize("dtype", DTYPES)
def test_middle_residual_slice_bug_caught_on_gpus(dtype: str) -> None:
    """vLLM #33322 injected on two GPUs: the SP run fails the ``identical`` comparison for the
    inputs whose embedding is outside the graph (prompt-embeds, images, mixed), and text passes
    (its residual is already sharded by the First pattern). Proof that the SP test above bites."""
    by_scenario = {s: get_scenario(s).requests(checkpoint(MODEL), dtype, max_new_tokens=8) for s in SCENARIOS}
    with MpLauncher(2, "cuda") as launcher:
        want = {s: launcher.run(_spec(dtype, "graph"), r) for s, r in by_scenario.items()}
        launcher.call("mutate", "sp-middle-residual-slice")
        got = {s: launcher.run(_spec(dtype, "graph", sp=True), r) for s, r in by_scenario.items()}
    passed = {s: compare(got[s], want[s], "identical", dtype).passed for s in SCENARIOS}
    assert passed == {"text": True, "prompt_embeds": False, "multimodal": False, "mixed": False}, passed


@pytest.mark.parametrize("setups", [("tp2-eager",), ("tp2-sp-graph-full", "tp2-sp-inductor-piecewise")],
                         ids=["tp2", "tp2-sp"])
def test_matrix_cases_end_to_end(setups: tuple[str, ...]) -> None:
    """The gpu2 matrix's cases through the orchestrator (automatic baselines, bf16, NCCL): every
    case runs and passes, and each SP case really ran sequence-parallel."""
    matrix = get_matrix("gpu2")
    options = RunOptions(backend="mp", device="cuda", dtype="bfloat16", use_baseline_cache=False, max_new_tokens=8)
    planned = plan(matrix, options, list(setups), list(SCENARIOS))
    assert len(planned) == len(setups) * len(SCENARIOS)
    orchestrator = Orchestrator(options)
    try:
        results = [orchestrator.run_case(p) for p in planned]
    finally:
        orchestrator.close()
    bad = {r.id: f"{r.status}: {r.reason}" for r in results if r.status != "pass"}
    assert not bad, bad
    for r in results:
        if "-sp-" in r.setup:
            assert r.sp_matches, r.id
            for rank, graphs in r.sp_matches["ranks"].items():
                assert graphs and all(g["middle"] > 0 and g["reduce_scatter"] > 0 for g in graphs.values()), \
                    (r.id, rank, graphs)
