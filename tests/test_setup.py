"""ParallelSetup ids, parsing, validation and baselines; matrices and case planning."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from harness.baseline import BaselineCache
from harness.case import Case
from harness.matrix import MATRICES, get_matrix
from harness.plan import RunOptions, plan
from harness.setup import ParallelSetup
from harness.shards import shard
from reference_impl.engine import EngineSpec
from reference_impl.requests import Request


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
    ({"tp": 2, "sp": True}, "sequence parallelism is a compile pass"),
    ({"sp": True, "compile": "graph"}, "sp needs tp > 1"),
    ({"compile": "jit"}, "compile mode 'jit'"),
    ({"compile": "graph", "sp_min_tokens": -1}, "sp_min_tokens=-1 must be >= 0"),
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
    oracle = [p for p in cuda if p.case.baseline == "hf"]
    assert [p.case.setup.id for p in oracle] == ["tp1-pp1-eager"]
    assert "needs 1 cuda devices; 0 available" in (oracle[0].skip_reason or "")
    assert all("needs 4 cuda devices; 0 available" in (p.skip_reason or "") for p in cuda if p not in oracle)
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
    import harness.pool
    from harness.orchestrate import Orchestrator

    monkeypatch.setattr(harness.pool, "available_devices", lambda device: gpus)
    orch = Orchestrator(RunOptions(backend="mp", device="cuda", mutation="all-gather-reversed-order"))
    mutated = _FakeLauncher()
    orch.pool._launchers[4] = mutated  # type: ignore[assignment]
    setup = ParallelSetup.parse("tp2-pp2-graph-full", "bfloat16", "cuda")
    orch._make_room(orch.baseline_pool, setup)
    assert mutated.closed is freed and (4 in orch.pool._launchers) is not freed
    clean = _FakeLauncher()
    orch.baseline_pool._launchers[4] = clean  # type: ignore[assignment]
    orch._make_room(orch.pool, setup)
    assert clean.closed is freed
    # One-device clean baselines run in the driver and reserve nothing: the mutated ranks stay.
    held = _FakeLauncher()
    orch.pool._launchers[4] = held  # type: ignore[assignment]
    orch._make_room(orch.baseline_pool, ParallelSetup.parse("tp1-pp1-eager", "bfloat16", "cuda"))
    assert not held.closed and orch.pool._launchers[4] is held


@pytest.mark.parametrize(("gpus", "freed"), [(2, True), (3, False)])
def test_a_mutated_pool_frees_its_own_ranks_for_another_world_size(monkeypatch: pytest.MonkeyPatch, gpus: int,
                                                                  freed: bool) -> None:
    """Seen on 2 GPUs under a mutation: the mutated pool's tp2 ranks held both GPUs and its
    one-rank oracle candidate (a rank process under a mutation) waited for a GPU until Ray gave
    up. The pool drops its own ranks of another world size when the new ones would not fit."""
    import harness.pool
    from harness.orchestrate import Orchestrator

    monkeypatch.setattr(harness.pool, "available_devices", lambda device: gpus)
    orch = Orchestrator(RunOptions(backend="mp", device="cuda", mutation="sp-middle-residual-slice"))
    tp2 = _FakeLauncher()
    orch.pool._launchers[2] = tp2  # type: ignore[assignment]
    orch._make_room(orch.pool, ParallelSetup.parse("tp1-pp1-eager", "bfloat16", "cuda"))
    assert tp2.closed is freed and (2 in orch.pool._launchers) is not freed


# --- explicit baselines: exactly one feature apart ---------------------------------------------


def test_differences_name_each_feature() -> None:
    cand = ParallelSetup.parse("tp2-sp-graph-full")
    assert cand.differences(ParallelSetup.parse("tp1-pp1-eager")) == ["tp/pp", "sp", "compile"]
    assert cand.differences(ParallelSetup.parse("tp2-graph-full")) == ["sp"]
    assert cand.differences(ParallelSetup.parse("tp2-sp-graph-full-spmin16")) == ["sp"]
    assert cand.differences(ParallelSetup.parse("tp2-sp-graph-piecewise")) == ["compile"]
    assert cand.differences(ParallelSetup.parse("tp2-sp-graph-full-nochunk")) == ["batching"]
    assert cand.differences(ParallelSetup.parse("tp2-sp-graph-full", "bfloat16", "cuda")) == ["dtype", "device"]
    assert cand.differences(cand) == []


def test_auto_baselines_differ_in_exactly_one_feature() -> None:
    for m in MATRICES.values():
        for setup in m.parsed_setups():
            assert len(setup.differences(setup.auto_baseline())) == 1, setup.id


def test_confounded_explicit_baseline_refused_unless_allowed() -> None:
    opts = RunOptions(backend="mp", model="tiny-llama", baseline="tp1-pp1-eager")
    with pytest.raises(ValueError, match=r"exactly one feature .*tp2-sp-graph-full vs tp1-pp1-eager differs in: "
                                         r"tp/pp, sp, compile"):
        plan(get_matrix("smoke"), opts, setups=["tp2-sp-graph-full"], scenarios=["text"])
    allowed = RunOptions(backend="mp", model="tiny-llama", baseline="tp1-pp1-eager", allow_confounded=True)
    [planned] = plan(get_matrix("smoke"), allowed, setups=["tp2-sp-graph-full"], scenarios=["text"])
    assert planned.case.baseline_id == "tp1-pp1-eager" and planned.skip_reason is None
    # One feature apart needs no flag.
    one = RunOptions(backend="mp", model="tiny-llama", baseline="tp1-pp1-eager")
    [p] = plan(get_matrix("smoke"), one, setups=["tp2-eager"], scenarios=["text"])
    assert p.case.baseline_id == "tp1-pp1-eager"


@pytest.mark.parametrize("allow", [False, True])
def test_baseline_equal_to_candidate_refused(allow: bool) -> None:
    opts = RunOptions(backend="mp", model="tiny-llama", baseline="tp2-eager", allow_confounded=allow)
    with pytest.raises(ValueError, match="differs in nothing: it compares a setup with itself"):
        plan(get_matrix("smoke"), opts, setups=["tp2-eager"], scenarios=["text"])


# --- the baseline cache key --------------------------------------------------------------------


@pytest.fixture
def key_inputs(tmp_path: Path) -> tuple[str, list[Request], EngineSpec]:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    spec = ParallelSetup.parse("tp1-pp1-eager").engine_spec(str(tmp_path))
    return str(tmp_path), [Request("r0", prompt_ids=(1, 2, 3))], spec


def test_cache_key_covers_engine_config_and_compile(key_inputs: tuple[str, list[Request], EngineSpec]) -> None:
    ckpt, reqs, spec = key_inputs
    base = BaselineCache.key(ckpt, reqs, spec, "float32", "cpu")
    assert BaselineCache.key(ckpt, reqs, spec, "float32", "cpu") == base
    changed = [
        replace(spec, engine=replace(spec.engine, max_num_batched_tokens=spec.engine.max_num_batched_tokens + 8)),
        replace(spec, engine=replace(spec.engine, max_num_seqs=spec.engine.max_num_seqs + 1)),
        replace(spec, engine=replace(spec.engine, max_model_len=64)),
        replace(spec, engine=replace(spec.engine, chunked_prefill=False)),
        replace(spec, compile=replace(spec.compile, mode="graph")),
    ]
    assert all(BaselineCache.key(ckpt, reqs, s, "float32", "cpu") != base for s in changed)
    # The checkpoint's path is not part of the key (its content hash is).
    assert BaselineCache.key(ckpt, reqs, replace(spec, checkpoint="/elsewhere"), "float32", "cpu") == base


def test_cache_key_covers_torch_and_hf_code(key_inputs: tuple[str, list[Request], EngineSpec],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import harness.baseline as baseline

    ckpt, reqs, spec = key_inputs
    engine, hf = (BaselineCache.key(ckpt, reqs, b, "float32", "cpu") for b in (spec, "hf"))
    assert engine != hf
    monkeypatch.setattr(baseline, "hf_code_hash", lambda: "other-hf-code")
    assert BaselineCache.key(ckpt, reqs, "hf", "float32", "cpu") != hf
    assert BaselineCache.key(ckpt, reqs, spec, "float32", "cpu") == engine  # hf code: hf baselines only
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert BaselineCache.key(ckpt, reqs, spec, "float32", "cpu") != engine
