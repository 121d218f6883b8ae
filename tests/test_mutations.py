"""The mutation catalog: every entry is well formed, every patch is idempotent, and every patch
changes the engine the way its description says, on the inputs it names.

The behavioural tests run the patch inside the worker processes (``Worker.mutate``) of a fresh
``MpLauncher`` (patches persist in a worker, so each mutation gets its own pool), run the clean
engine first and the mutated one after, and compare both to the single-device engine: the clean
run must match and the mutated one must not (or must raise), so each test fails on a no-op patch.
``sp-middle-residual-slice`` and ``pp-handoff-residual-slice`` are exercised end to end in
tests/test_compile.py; here they get direct checks of the patched function.
"""

from __future__ import annotations

import inspect
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from typing import Any

import pytest
import torch

from harness.launch import MpLauncher, Worker, WorkerError
from harness.mutations import CATALOG, Mutation, get_mutation, patches
from reference_impl.compile import CompileConfig
from reference_impl.engine import EngineSpec
from reference_impl.loader import load_model
from reference_impl.requests import Request, RequestOutput
from reference_impl.runner import EngineConfig, Runner
from reference_impl.scheduler import Chunk
from scenarios.models import checkpoint

from helpers import TP_ATOL, differences

BUDGET = 24  # tokens per step: longer prompts are prefilled in chunks
ENGINE = EngineConfig(max_num_seqs=4, max_num_batched_tokens=BUDGET)
VOCAB = 512
BOUNDARY = VOCAB // 2  # the first id of rank 1's vocabulary shard at tp2


# -- helpers -----------------------------------------------------------------------------------------

def ids(n: int, seed: int, avoid: Sequence[int] = (0, BOUNDARY)) -> tuple[int, ...]:
    """``n`` random ids in ``[1, VOCAB)`` other than ``avoid``."""
    gen = torch.Generator().manual_seed(seed)
    out = [t for t in torch.randint(1, VOCAB, (2 * n + 8,), generator=gen).tolist() if t not in avoid]
    return tuple(out[:n])


def request(rid: str, prompt: tuple[int, ...], new: int = 6) -> Request:
    return Request(rid, prompt, max_new_tokens=new, top_k=2)


# Small request sets, each aimed at the inputs that expose one or more mutations.
REQUESTS: dict[str, list[Request]] = {
    "short": [request("a", ids(7, 0)), request("b", ids(3, 1))],
    # id 256 is the first id of rank 1's shard; "plain" has no shard-first id (0 or 256).
    "boundary": [request("boundary", ids(3, 2) + (BOUNDARY,) + ids(4, 3)), request("plain", ids(8, 4))],
    # "long" (30 > BUDGET tokens) is prefilled in two chunks, then decodes; "short" is not chunked.
    "chunked": [request("long", ids(30, 5)), request("short", ids(7, 6))],
    # Prefill of 16 tokens reaches sp_min_tokens=16; the decode steps (1 token) do not.
    "threshold": [request("t16", ids(16, 7), new=2)],
    # One token: a step whose real size (1) is not a multiple of tp=2.
    "odd": [request("odd", ids(1, 8), new=2)],
}


def model_path(model: str) -> str:
    """A built-in tiny model's checkpoint, or ``model`` itself when it is a path."""
    return model if "/" in model else str(checkpoint(model))


def spec(model: str, tp: int, pp: int, mode: str = "eager", sp: bool = False, sp_min_tokens: int = 0
         ) -> EngineSpec:
    return EngineSpec(model_path(model), tp, pp, engine=ENGINE,
                      compile=CompileConfig(mode, sp=sp, sp_min_tokens=sp_min_tokens))


@cache
def single_device(model: str, requests: str) -> list[RequestOutput]:
    """The clean single-device engine's outputs (the reference every run is compared to)."""
    return Runner(load_model(model_path(model)), ENGINE).generate(REQUESTS[requests])


def clean_then_mutated(mutation: str, model: str, tp: int, pp: int, requests: str
                       ) -> tuple[dict[str, str], dict[str, str]]:
    """Differences from the single-device engine of the clean eager run and of the mutated one,
    both on one fresh worker pool (the clean engine is built first, as a harness would have it
    cached when the mutation is applied)."""
    want = single_device(model, requests)
    engine = spec(model, tp, pp)
    with MpLauncher(engine.world_size) as launcher:
        clean = launcher.run(engine, REQUESTS[requests])
        launcher.call("mutate", mutation)
        mutated = launcher.run(engine, REQUESTS[requests])
    return differences(clean, want), differences(mutated, want)


@pytest.fixture(scope="module")
def biased_llava(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tiny-llava with non-zero o_proj biases. The built checkpoint's biases are all zero (as
    transformers initialises them), which would hide any bug in how a bias is applied."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = checkpoint("tiny-llava"), tmp_path_factory.mktemp("biased-llava")
    gen = torch.Generator().manual_seed(0)
    for f in sorted(src.iterdir()):
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
            continue
        with safe_open(str(f), "pt") as fh:
            metadata = fh.metadata()
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        biases = sorted(k for k in tensors if k.endswith("o_proj.bias"))
        assert biases, "tiny-llava has no o_proj bias"
        for k in biases:
            tensors[k] = (0.1 * torch.randn(tensors[k].shape, generator=gen)).to(tensors[k].dtype)
        save_file(tensors, str(dst / f.name), metadata=metadata)
    return str(dst)


@pytest.fixture
def restore_patches() -> Iterator[None]:
    """For tests that patch this (the pytest) process: undo every patch afterwards."""
    assert not patches._ORIGINALS, "a previous test left patches applied"
    try:
        yield
    finally:
        patches.restore_all()


# -- the catalog ---------------------------------------------------------------------------------

def test_catalog_is_well_formed() -> None:
    assert len(CATALOG) >= 11
    targets = set()
    for key, m in CATALOG.items():
        assert isinstance(m, Mutation) and key == m.name
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)+", m.name), m.name
        assert m.summary and "\n" not in m.summary and len(m.summary) <= 120, m.name
        assert len(m.description) >= 250 and m.description.count(". ") >= 2, m.name
        assert m.reference == "class" or re.fullmatch(r"vLLM #\d+", m.reference), m.reference
        module, _, attr = m.target.partition(":")
        assert module == "harness.mutations.patches" and attr == m.name.replace("-", "_"), m.target
        fn = m.load()
        assert callable(fn) and list(inspect.signature(fn).parameters) == ["worker"], m.target
        assert fn.__doc__, m.target
        targets.add(m.target)
    assert len(targets) == len(CATALOG)
    assert {m.reference for m in CATALOG.values()} >= {"vLLM #33322", "vLLM #55464", "class"}


def test_get_mutation_names_the_valid_ones() -> None:
    assert get_mutation("all-gather-reversed-order").needs_rebuild
    with pytest.raises(ValueError, match="unknown mutation 'nope': choose from .*kv-heads-not-replicated"):
        get_mutation("nope")


def _closure(fn: object) -> list[object]:
    cells = getattr(fn, "__closure__", None) or ()
    return [c.cell_contents for c in cells]


def test_patches_are_idempotent(restore_patches: None) -> None:
    """A second application replaces each attribute by the same function around the same
    original, never by a wrapper of the first patch."""
    for m in CATALOG.values():
        m.load()(None)
        first = {key: getattr(*key) for key in patches._ORIGINALS}
        m.load()(None)
        for key, fn in first.items():
            again = getattr(*key)
            assert again.__code__ is fn.__code__ and _closure(again) == _closure(fn), (m.name, key)
    from reference_impl.parallel import pp

    assert pp.stage_layers(4, 2) == [range(0, 2), range(3, 4)]  # one layer dropped, not two
    assert patches.restore_all()
    assert pp.stage_layers(4, 2) == [range(0, 2), range(2, 4)]


def test_worker_mutate_drops_engines_only_when_needed(restore_patches: None) -> None:
    worker = Worker(0, 1, "127.0.0.1", 0, "cpu")  # one rank: no process group
    single = spec("tiny-llama", 1, 1)
    worker.load(single)
    worker.mutate("decode-kv-slot-off-by-one")  # a run-time patch: the cached engine stays
    assert worker._engine is not None and single in worker._engines
    worker.mutate("pp-layer-split-drops-layer")  # acts at construction: rebuild
    assert worker._engine is None and not worker._engines
    with pytest.raises(ValueError, match="unknown mutation"):
        worker.mutate("no-such-bug")


# -- direct checks ----------------------------------------------------------------------------------

def test_sp_middle_residual_slice_takes_rank0_rows_everywhere(restore_patches: None) -> None:
    from reference_impl.compile.sp_ops import residual_rows

    full = torch.arange(8.0)[:, None].repeat(1, 3)  # row i holds i
    assert residual_rows(full, 8, 2, 1)[:, 0].tolist() == [4, 5, 6, 7]
    get_mutation("sp-middle-residual-slice").load()(None)
    assert residual_rows(full, 8, 2, 1)[:, 0].tolist() == [0, 1, 2, 3]
    assert residual_rows(full[:4], 8, 2, 1)[:, 0].tolist() == [0, 1, 2, 3]  # a shard passes as before


def test_pp_handoff_residual_slice_zero_fills_instead_of_gathering(test_operations: None) -> None:
    """``helpers.gather_residual_probe``: the hand-off gather of a shard whose rows hold rank + 1."""
    with MpLauncher(2) as launcher:
        clean = launcher.call("gather_residual_probe")
        launcher.call("mutate", "pp-handoff-residual-slice")
        mutated = launcher.call("gather_residual_probe")
    assert clean == [[1, 1, 2, 2]] * 2
    assert mutated == [[1, 1, 0, 0], [2, 2, 0, 0]]


def test_sp_norm_eps_hardcoded_ignores_the_matched_eps(restore_patches: None) -> None:
    """Each SP replacement, on a small-magnitude input (mean square ~1.6e-5, like tiny-llava's
    embeddings), gives the output of eps=1e-6 whatever eps it is passed."""
    from reference_impl.compile.passes.sequence_parallel import SequenceParallelismPass

    class Identity:  # the replacements' collectives, on one rank
        def _scatter(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def _gather(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def _rows(self, residual: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
            return residual

    gen = torch.Generator().manual_seed(0)
    x, r, b = (0.004 * torch.randn(8, 16, generator=gen) for _ in range(3))
    w = 1 + 0.1 * torch.randn(16, generator=gen)
    args = {"first_replacement": (x, w), "middle_replacement": (x, r, w), "final_replacement": (x, r, w),
            "middle_bias_replacement": (x, b[0], r, w), "final_bias_replacement": (x, b[0], r, w)}
    assert set(args) == set(patches.SP_REPLACEMENTS)
    original = {name: getattr(SequenceParallelismPass, name) for name in args}

    def first_output(name: str, fn: Callable[..., Any], eps: float) -> torch.Tensor:
        out = fn(Identity(), *args[name], eps=eps)
        first: torch.Tensor = out[0] if isinstance(out, tuple) else out
        return first

    get_mutation("sp-norm-eps-hardcoded").load()(None)
    for name, fn in original.items():
        patched = getattr(SequenceParallelismPass, name)
        assert inspect.signature(patched) == inspect.signature(fn), name  # the matcher reads it
        got = first_output(name, patched, 3e-6)
        torch.testing.assert_close(got, first_output(name, fn, 1e-6), rtol=0, atol=0)
        gap = (got - first_output(name, fn, 3e-6)).abs().max().item()
        assert gap > 1e-2, f"{name}: eps 3e-6 vs 1e-6 moved the output by only {gap:.1e}"


# -- end to end, inside the workers ------------------------------------------------------------------

def assert_clean_passes_and_mutated_raises(mutation: str, model: str, engine: EngineSpec, requests: str,
                                           match: str) -> None:
    """On one worker pool: the clean run of ``engine`` (built from ``model``) agrees with the
    single-device engine; under ``mutation`` the same run raises a ``WorkerError`` matching ``match``."""
    with MpLauncher(engine.world_size) as launcher:
        clean = launcher.run(engine, REQUESTS[requests])
        launcher.call("mutate", mutation)
        with pytest.raises(WorkerError, match=match):
            launcher.run(engine, REQUESTS[requests])
    assert not differences(clean, single_device(model, requests))


def test_sp_threshold_ignored_in_handoff_breaks_small_steps_under_pp() -> None:
    assert_clean_passes_and_mutated_raises(
        "sp-threshold-ignored-in-handoff", "tiny-llama", spec("tiny-llama", 2, 2, mode="graph", sp=True, sp_min_tokens=16),
        "threshold", "the scattered-residual predicate disagrees with the compiled graph")


def test_token_count_not_padded_to_tp_breaks_odd_steps_under_pp_sp() -> None:
    assert_clean_passes_and_mutated_raises(
        "token-count-not-padded-to-tp", "tiny-llama", spec("tiny-llama", 2, 2, mode="graph", sp=True),
        "odd", "residual has 2 rows for a 1-token step")


def test_all_gather_reversed_order_changes_tp_outputs() -> None:
    clean, mutated = clean_then_mutated("all-gather-reversed-order", "tiny-llama", 2, 1, "short")
    assert not clean, clean
    assert set(mutated) == {"a", "b"}, mutated


def test_kv_heads_not_replicated_changes_tp4_with_two_kv_heads() -> None:
    clean, mutated = clean_then_mutated("kv-heads-not-replicated", "tiny-llama", 4, 1, "short")
    assert not clean, clean
    assert set(mutated) == {"a", "b"}, mutated


def test_vocab_shard_boundary_off_by_one_hits_only_shard_first_ids() -> None:
    want = single_device("tiny-llama", "boundary")
    plain = next(o for o in want if o.request_id == "plain")
    assert not {0, BOUNDARY} & set(plain.token_ids)  # nothing in "plain" touches a shard's first id
    clean, mutated = clean_then_mutated("vocab-shard-boundary-off-by-one", "tiny-llama", 2, 1, "boundary")
    assert not clean, clean
    assert set(mutated) == {"boundary"}, mutated


def test_pp_layer_split_drops_layer_changes_pp_outputs() -> None:
    clean, mutated = clean_then_mutated("pp-layer-split-drops-layer", "tiny-llama", 1, 2, "short")
    assert not clean, clean
    assert set(mutated) == {"a", "b"}, mutated


def test_decode_kv_slot_off_by_one_hits_only_chunked_prompts() -> None:
    want = single_device("tiny-llama", "chunked")
    with MpLauncher(2) as launcher:
        engine = spec("tiny-llama", 2, 1)
        clean = launcher.run(engine, REQUESTS["chunked"])
        launcher.call("mutate", "decode-kv-slot-off-by-one")
        mutated = launcher.run(engine, REQUESTS["chunked"])
    assert not differences(clean, want)
    assert set(differences(mutated, want)) == {"long"}
    long_got, long_want = mutated[0], want[0]
    assert long_got.token_ids[0] == long_want.token_ids[0]  # sampled from the prefill: unaffected
    assert abs(long_got.logprobs[0] - long_want.logprobs[0]) <= TP_ATOL
    assert max(abs(a - b) for a, b in zip(long_got.logprobs[1:], long_want.logprobs[1:], strict=True)) > TP_ATOL


def test_row_parallel_bias_per_rank_changes_biased_models(biased_llava: str) -> None:
    # The mutation sums tiny-llava's o_proj bias tp times (made non-zero: see ``biased_llava``).
    clean, mutated = clean_then_mutated("row-parallel-bias-per-rank", biased_llava, 2, 1, "short")
    assert not clean, clean
    assert set(mutated) == {"a", "b"}, mutated


def test_single_device_chunk_schedule_matches_the_budget() -> None:
    """The "chunked" inputs do what the decode-slot test needs: "long" is prefilled in chunks."""
    from reference_impl.scheduler import Scheduler, SeqState

    sched = Scheduler(ENGINE.scheduler())
    seqs = [SeqState(r, -1, RequestOutput(r.request_id, r.prompt_len)) for r in REQUESTS["chunked"]]
    for s in seqs:
        sched.add(s)
    first: list[Chunk] = sched.schedule()
    assert [(c.seq.request.request_id, c.num_tokens) for c in first] == [("long", BUDGET)]
