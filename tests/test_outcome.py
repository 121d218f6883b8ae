"""``harness.outcome``: fail vs error, ranks that disagree, vacuous SP, the policy of a pair."""

from __future__ import annotations

from typing import Any

import pytest

from harness.case import Case
from harness.launch.base import EngineRun, RankReport, WorkerError
from harness.outcome import policy_for, rank_disagreement, sp_matches, sp_vacuity, worker_failure
from harness.setup import ParallelSetup
from reference_impl.requests import RequestOutput

ENGINE_TRACEBACK = '''Traceback (most recent call last):
  File "/repo/harness/launch/worker.py", line 70, in generate
    outputs = runner.generate(requests)
  File "/repo/reference_impl/runner.py", line 140, in generate
    self.step(chunks)
  File "/repo/reference_impl/parallel/pipeline.py", line 61, in send_intermediate
    raise RuntimeError(
RuntimeError: pipeline hand-off: residual has 48 rows for a 24-token step
'''
GLOO_TRACEBACK = '''Traceback (most recent call last):
  File "/repo/reference_impl/parallel/collectives.py", line 16, in all_reduce
    return _c10d.wait_tensor(_c10d.all_reduce(x, "sum", group))
RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4711
'''
HARNESS_TRACEBACK = '''Traceback (most recent call last):
  File "/repo/harness/launch/worker.py", line 48, in runner
    raise ValueError(f"spec needs 4 ranks; this worker pool has 2")
ValueError: spec needs 4 ranks; this worker pool has 2
'''


def test_an_exception_in_engine_code_is_a_fail_naming_rank_side_and_frame() -> None:
    status, reason = worker_failure(WorkerError(1, ENGINE_TRACEBACK), "candidate", "tp2-pp2-sp-graph-full")
    assert status == "fail"
    assert reason.startswith("engine raised in candidate tp2-pp2-sp-graph-full, rank 1: RuntimeError: pipeline")
    assert "reference_impl/parallel/pipeline.py:61 in send_intermediate" in reason


@pytest.mark.parametrize(("detail", "kind", "words"), [
    (GLOO_TRACEBACK, "raised", "lost its peers or resources: RuntimeError: [../third_party/gloo"),
    (HARNESS_TRACEBACK, "raised", "raised outside the engine: ValueError: spec needs 4 ranks"),
    ("the rank's actor died: SIGKILL", "died", "rank 0 died: the rank's actor died"),
    ("no reply from ranks [0, 1] within 600s", "timeout", "timed out: no reply"),
    (ENGINE_TRACEBACK, "died", "died"),  # a dead process is never the engine's verdict
], ids=["peer-closed", "harness-code", "died", "timeout", "died-with-engine-text"])
def test_infrastructure_failures_are_errors(detail: str, kind: str, words: str) -> None:
    status, reason = worker_failure(WorkerError(0, detail, kind), "baseline", "tp1-pp1-eager")
    assert status == "error"
    assert reason.startswith("infrastructure: baseline tp1-pp1-eager, rank 0")
    assert words in reason


def test_a_hang_names_the_case_timeout_and_keeps_every_ranks_stack() -> None:
    detail = ("no reply from ranks [0, 1] within 30s (the case timeout); every rank's Python stack at that moment:\n"
              "--- rank 0 (pid 11) stack ---\n  File \"x.py\", line 1 in barrier\n"
              "--- rank 1 (pid 12) stack ---\n  File \"y.py\", line 2 in sleep_forever")
    status, reason = worker_failure(WorkerError(-1, detail, "timeout"), "candidate", "tp2-eager", 30.0)
    assert status == "error"
    assert reason.startswith("infrastructure: candidate tp2-eager (case timeout 30s) timed out: no reply from ranks")
    assert reason.endswith("line 2 in sleep_forever")  # the evidence is kept whole


def test_unknown_failure_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="failure kind"):
        WorkerError(0, "x", "vanished")


def _run(tokens: dict[int, tuple[tuple[int, ...], ...]], steps: dict[int, list[dict[str, Any]]] | None = None
         ) -> EngineRun:
    outputs = [RequestOutput(f"r{i}", 3, list(t)) for i, t in enumerate(tokens[0])]
    return EngineRun(outputs, tuple(RankReport(r, t, tuple((steps or {}).get(r, []))) for r, t in tokens.items()))


def test_ranks_that_disagree_on_sampled_tokens_are_named() -> None:
    agree = _run({0: ((1, 2, 3), (4, 5)), 1: ((1, 2, 3), (4, 5))})
    assert rank_disagreement(agree) is None
    split = _run({0: ((1, 2, 3), (4, 5)), 1: ((1, 2, 3), (4, 9))})
    assert rank_disagreement(split) == (
        "ranks disagree on sampled tokens: request #1 step 1: rank 0 recorded [5], rank 1 [9]")


def _step(size: int, matches: int, label: str = "ids") -> dict[str, Any]:
    piece = {"graph": f"{label}/full", "sp_matches": {"first": 0, "middle": matches, "final": 0},
             "collectives": {"all_reduce": 0 if matches else 3, "reduce_scatter": matches, "all_gather": matches}}
    return {"input": label, "num_tokens": size, "sp_active": bool(matches), "pieces": [piece]}


SP = ParallelSetup.parse("tp2-sp-graph-full-spmin16")


def test_sp_that_rewrote_no_graph_fails_as_vacuous() -> None:
    run = _run({0: ((1,),), 1: ((1,),)}, {0: [_step(8, 0), _step(2, 0)], 1: [_step(8, 0), _step(2, 0)]})
    matches = sp_matches(run.ranks)
    assert matches is not None and matches["sp_applied_sizes"] == []
    assert matches["ranks"]["1"]["ids/T=8"]["all_reduce"] == 3
    reason, note = sp_vacuity(SP, matches)
    assert reason is not None and reason.startswith("vacuous: SP never applied")
    assert "step sizes 2, 8" in reason and "sp_min_tokens=16" in reason
    assert sp_vacuity(SP, None)[0] is not None  # a compiled SP setup that recorded nothing at all


def test_sp_applied_to_some_sizes_names_the_threshold() -> None:
    run = _run({0: ((1,),), 1: ((1,),)}, {0: [_step(24, 7), _step(2, 0)], 1: [_step(24, 7), _step(2, 0)]})
    reason, note = sp_vacuity(SP, sp_matches(run.ranks))
    assert reason is None
    assert note == "SP applied to steps of 24 tokens, not to 2 (sp_min_tokens=16)"


def test_non_sp_setups_are_never_vacuous() -> None:
    assert sp_vacuity(ParallelSetup.parse("tp2-graph-full"), None) == (None, "")
    assert sp_matches([RankReport(0, ())]) is None  # eager: nothing compiled


def test_auto_policy_is_identical_for_sp_against_sp_off_only() -> None:
    sp = ParallelSetup.parse("tp2-sp-graph-full")
    assert policy_for(Case(sp, sp.baseline(), "text", "m"), "auto") == "identical"
    assert policy_for(Case(sp, ParallelSetup.parse("tp2-graph-piecewise"), "text", "m"), "auto") == "logprobs"
    tp = ParallelSetup.parse("tp2-eager")
    assert policy_for(Case(tp, tp.auto_baseline(), "text", "m"), "auto") == "logprobs"
    assert policy_for(Case(tp, "hf", "text", "m"), "auto") == "logprobs"
    assert policy_for(Case(sp, sp.baseline(), "text", "m"), "exact") == "exact"


def test_runner_makes_its_own_parallel_state_current_while_it_runs() -> None:
    """A worker keeps several engines; ops that read the current parallel state (activation
    capture) must see the running engine's, not the last one built's."""
    import torch

    from reference_impl.loader import load_model
    from reference_impl.parallel.groups import SINGLE, ParallelState, current_state
    from reference_impl.requests import Request
    from reference_impl.runner import EngineConfig, Runner
    from scenarios.models import checkpoint

    model = load_model(checkpoint("tiny-llama"))
    seen: list[ParallelState] = []
    runner = Runner(model, EngineConfig(max_num_batched_tokens=16))

    def model_fn(batch: Any, intermediate: Any) -> torch.Tensor:
        seen.append(current_state())
        return runner.eager_forward(batch, intermediate)  # type: ignore[return-value]

    runner.model_fn = model_fn
    other = ParallelState(rank=0, world_size=1, tp=1, pp=1, tp_group=None, pp_group=None)
    runner.state = other
    runner.generate([Request("a", (1, 2, 3), max_new_tokens=2)])
    assert seen and all(s is other for s in seen)
    assert current_state() is SINGLE  # restored after the step


def test_forced_tokens_follow_the_given_ids_with_their_logprobs() -> None:
    from reference_impl.loader import load_model
    from reference_impl.requests import Request
    from reference_impl.runner import EngineConfig, Runner
    from scenarios.models import checkpoint

    runner = Runner(load_model(checkpoint("tiny-llama")), EngineConfig(max_num_batched_tokens=16))
    free = runner.generate([Request("a", (5, 6, 7, 8), max_new_tokens=4)])[0]
    forced_ids = (free.token_ids[0], free.top_logprobs[1][1][0], 3, 4)
    forced = runner.generate([Request("a", (5, 6, 7, 8), max_new_tokens=4, forced_tokens=forced_ids)])[0]
    assert tuple(forced.token_ids) == forced_ids
    assert forced.logprobs[:2] == [free.logprobs[0], free.top_logprobs[1][1][1]]  # same prefix up to step 1
    assert forced.top_logprobs[1][0][0] == free.token_ids[1]  # the engine's own greedy choice stays top-1
    with pytest.raises(ValueError, match="forced tokens"):
        runner.generate([Request("b", (5, 6), max_new_tokens=3, forced_tokens=(1, 2))])
