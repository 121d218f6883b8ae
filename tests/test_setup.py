"""ParallelSetup ids, parsing, validation and baselines; matrices and case planning."""

from __future__ import annotations

import pytest

from harness.case import Case
from harness.matrix import MATRICES, get_matrix
from harness.orchestrate import RunOptions, plan, shard
from harness.setup import ParallelSetup


@pytest.mark.parametrize("setup_id", [
    "tp1-pp1-eager", "tp2-eager", "tp2-pp2-eager", "tp2-sp-graph-full", "tp2-pp2-sp-graph-piecewise",
    "tp4-sp-inductor-full", "tp2-pp2-sp-graph-full-spmin16", "tp2-sp-graph-full-nochunk", "tp1-pp2-graph-full",
])
def test_id_round_trip(setup_id: str) -> None:
    assert ParallelSetup.parse(setup_id).id == setup_id


def test_id_examples() -> None:
    assert ParallelSetup(tp=2, pp=2, sp=True, compile="graph").id == "tp2-pp2-sp-graph-full"
    assert ParallelSetup().id == "tp1-pp1-eager"


@pytest.mark.parametrize("kwargs,message", [
    ({"tp": 0}, "tp=0 and pp=1 must be >= 1"),
    ({"tp": 2, "sp": True}, "sp needs a compiled setup"),
    ({"sp": True, "compile": "graph"}, "sp needs tp > 1"),
    ({"compile": "jit"}, "compile='jit'"),
    ({"compile": "eager", "partition": "piecewise"}, "partition applies to compiled setups only"),
    ({"dtype": "float16"}, "dtype='float16'"),
    ({"device": "tpu"}, "device='tpu'"),
])
def test_invalid_setup(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ParallelSetup(**kwargs)  # type: ignore[arg-type]


def test_malformed_id() -> None:
    with pytest.raises(ValueError, match="malformed setup id 'tp2-fast'"):
        ParallelSetup.parse("tp2-fast")


def test_baseline_changes_only_sp() -> None:
    s = ParallelSetup(tp=2, pp=2, sp=True, compile="inductor", partition="piecewise", sp_min_tokens=16,
                      chunked_prefill=False, dtype="bfloat16", device="cuda")
    b = s.baseline()
    assert (b.tp, b.pp, b.compile, b.partition, b.chunked_prefill, b.dtype, b.device) == (
        2, 2, "inductor", "piecewise", False, "bfloat16", "cuda")
    assert not b.sp
    assert s.auto_baseline() == b
    assert ParallelSetup(tp=2, pp=2).auto_baseline().id == "tp1-pp1-eager"


def test_auto_baseline_takes_away_one_feature() -> None:
    chain = []
    setup = ParallelSetup.parse("tp2-pp2-sp-inductor-piecewise-nochunk", "bfloat16", "cuda")
    while setup.id != "tp1-pp1-eager-nochunk":
        setup = setup.auto_baseline()
        chain.append(setup.id)
        assert (setup.dtype, setup.device, setup.chunked_prefill) == ("bfloat16", "cuda", False)
    assert chain == ["tp2-pp2-inductor-piecewise-nochunk", "tp1-pp1-inductor-piecewise-nochunk",
                     "tp1-pp1-eager-nochunk"]


def test_engine_spec_carries_everything() -> None:
    s = ParallelSetup.parse("tp2-pp2-sp-graph-piecewise-spmin16")
    spec = s.engine_spec("/ckpt")
    assert (spec.tp, spec.pp, spec.compile.mode, spec.compile.partition, spec.compile.sp,
            spec.compile.sp_min_tokens) == (2, 2, "graph", "piecewise", True, 16)


def test_matrices_parse() -> None:
    for m in MATRICES.values():
        assert m.parsed_setups()
    smoke = {s.id for s in get_matrix("smoke").parsed_setups()}
    assert {"tp2-eager", "tp2-pp2-eager", "tp2-sp-graph-full", "tp2-sp-graph-piecewise",
            "tp2-pp2-sp-graph-full", "tp2-pp2-sp-graph-piecewise"} <= smoke
    with pytest.raises(ValueError, match="unknown matrix 'huge'"):
        get_matrix("huge")


def test_plan_skips_with_reasons() -> None:
    opts = RunOptions(backend="mp", model="tiny-llama")
    planned = plan(get_matrix("smoke"), opts, setups=["tp2-eager"], scenarios=["text", "multimodal"])
    reasons = {p.case.scenario: p.skip_reason for p in planned}
    assert reasons["text"] is None
    assert reasons["multimodal"] == "scenario multimodal needs images; LlamaForCausalLM takes none"
    cuda = plan(get_matrix("gpu4"), RunOptions(backend="mp", device="cuda"), scenarios=["text"])
    assert all("needs 4 cuda devices; 0 available" in (p.skip_reason or "") for p in cuda)
    bad = plan(get_matrix("smoke"), opts, setups=["tp3-eager"], scenarios=["text"])
    assert "tp=3 does not divide num_attention_heads=4" in (bad[0].skip_reason or "")


def test_plan_baselines_and_shards() -> None:
    planned = plan(get_matrix("smoke"), RunOptions(backend="mp"))
    case: Case = next(p.case for p in planned if p.case.setup.id == "tp2-pp2-sp-graph-full")
    assert case.baseline_id == "tp2-pp2-graph-full"
    hf = plan(get_matrix("smoke"), RunOptions(backend="mp", baseline="hf"), setups=["tp2-eager"])
    assert all(p.case.baseline_id == "hf" for p in hf)
    parts = [shard(planned, i, 3) for i in range(3)]
    assert sorted(p.case.id for part in parts for p in part) == sorted(p.case.id for p in planned)
    with pytest.raises(ValueError, match="shard 3/3"):
        shard(planned, 3, 3)


class _FakeLauncher:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(("gpus", "freed"), [(4, True), (8, False)])
def test_mutated_and_clean_pools_share_the_gpus(monkeypatch: pytest.MonkeyPatch, gpus: int, freed: bool) -> None:
    """Under a mutation on 4 GPUs, the clean pool's tp2 x pp2 ranks only fit once the mutated
    pool's are gone (and the other way round); with 8 GPUs both stay."""
    import harness.orchestrate as orchestrate

    monkeypatch.setattr(orchestrate, "available_devices", lambda device: gpus)
    orch = orchestrate.Orchestrator(RunOptions(backend="mp", device="cuda", mutation="all-gather-reversed-order"))
    mutated = _FakeLauncher()
    orch.pool._launchers[4] = mutated  # type: ignore[assignment]
    setup = ParallelSetup.parse("tp2-pp2-graph-full", "bfloat16", "cuda")
    orch._make_room(orch.baseline_pool, setup)
    assert mutated.closed is freed and (4 in orch.pool._launchers) is not freed
    clean = _FakeLauncher()
    orch.baseline_pool._launchers[4] = clean  # type: ignore[assignment]
    orch._make_room(orch.pool, setup)
    assert clean.closed is freed
    # One-device clean baselines run in the driver and reserve nothing.
    orch._make_room(orch.baseline_pool, ParallelSetup.parse("tp1-pp1-eager", "bfloat16", "cuda"))
