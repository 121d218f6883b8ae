"""Eager TP / PP / TP x PP on CPU with gloo: token-identical to the single-device engine."""

from __future__ import annotations

from functools import cache

import pytest
import torch

from harness.launch import MpLauncher, Worker, WorkerError
from harness.launch.inprocess import InProcessLauncher
from reference_impl.config import load_config
from reference_impl.engine import EngineSpec
from reference_impl.loader import load_model
from reference_impl.requests import Request, RequestOutput
from reference_impl.runner import EngineConfig, Runner
from scenarios import inputs
from scenarios.models import checkpoint

# fp32 chosen-token logprobs, sharded vs single-device: TP changes the summation order of the
# row-parallel matmuls (partial sums all-reduced) and nothing else; PP changes nothing (0.0).
# Measured max 3.3e-5 over all cases here (`pytest tests/test_distributed.py -k equals -rP`);
# 2e-4 leaves 6x headroom and sits ~150x below the tiny models' smallest top-1/top-2 gap
# (~0.03), so a wrong shard, which moves logprobs by far more, cannot pass.
TP_LOGPROB_ATOL = 2e-4

SETUPS = {"tp2": (2, 1), "pp2": (1, 2), "tp2-pp2": (2, 2), "tp4": (4, 1)}
MODELS = ("tiny-llama", "tiny-qwen2", "tiny-llava")
# A small step budget so the 70-token prompt is chunked and steps mix prefill with decode.
ENGINE = EngineConfig(max_num_seqs=8, max_num_batched_tokens=24)


@cache
def requests_for(name: str) -> list[Request]:
    """Ids (lengths 1, 7, 13, 70), prompt-embeds and, for LLaVA, images: one batch."""
    ckpt = checkpoint(name)
    cfg = load_config(ckpt)
    spec = inputs.InputSpec(max_new_tokens=16)
    reqs = inputs.text(cfg, spec) + inputs.prompt_embeds(cfg, inputs.embedding_table(ckpt), spec, torch.float32)
    if cfg.multimodal is not None:
        reqs += inputs.multimodal(cfg, spec)
    return reqs


@cache
def single_device(name: str) -> list[RequestOutput]:
    return Runner(load_model(checkpoint(name)), ENGINE).generate(requests_for(name))


def assert_same(name: str, setup: str, got: list[RequestOutput], want: list[RequestOutput]) -> None:
    assert [o.request_id for o in got] == [o.request_id for o in want]
    worst = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g.logprobs, w.logprobs))
    print(f"{name} {setup}: max |logprob diff| {worst:.2e}")
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids, f"{name} {setup} {g.request_id}: {g.token_ids} != {w.token_ids}"
        diff = max(abs(a - b) for a, b in zip(g.logprobs, w.logprobs))
        assert diff <= TP_LOGPROB_ATOL, f"{name} {setup} {g.request_id}: logprob diff {diff:.2e}"


CASES = [(m, s) for m in MODELS for s in SETUPS]


@pytest.mark.parametrize("name,setup", CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_parallel_equals_single_device(launchers: dict[int, MpLauncher], name: str, setup: str) -> None:
    tp, pp = SETUPS[setup]
    spec = EngineSpec(str(checkpoint(name)), tp, pp, engine=ENGINE)
    got = launchers[tp * pp].run(spec, requests_for(name))
    assert_same(name, setup, got, single_device(name))


@pytest.mark.parametrize(
    "tp,pp,device,message",
    [
        (3, 1, "cpu", "tp=3 does not divide num_attention_heads=4"),
        (8, 1, "cpu", "tp=8 does not divide num_attention_heads=4"),
        (1, 5, "cpu", r"pp=5 is larger than the number of layers \(4\)"),
        (2, 1, "cuda", r"tp=2 x pp=1 = 2 ranks need 2 CUDA devices; 0 available"),
    ],
)
def test_invalid_setup_rejected_before_processes_start(tp: int, pp: int, device: str, message: str) -> None:
    launcher = MpLauncher(tp * pp, device)
    spec = EngineSpec(str(checkpoint("tiny-llama")), tp, pp, device=device)
    num_devices = 0 if device == "cuda" else None
    with pytest.raises(ValueError, match=message):
        spec.validate(num_devices)
    if device == "cpu":
        with pytest.raises(ValueError, match=message):
            launcher.run(spec, requests_for("tiny-llama"))
    assert launcher._procs == []  # nothing was started


def test_rank_failure_surfaces_traceback_without_hanging(test_operations: None) -> None:
    launcher = MpLauncher(2)
    try:
        launcher.call("ping")
        with pytest.raises(WorkerError) as info:
            launcher.call("raise_on_rank_1")  # rank 0 waits in a barrier meanwhile
        assert info.value.rank == 1
        assert "RuntimeError: boom on rank 1" in info.value.detail
        assert "raise_on_rank_1" in info.value.detail  # the traceback, not just the message
        assert launcher._procs == []  # every process was torn down
    finally:
        launcher.close()


def test_workers_run_only_catalogued_operations() -> None:
    worker = Worker(0, 1, "127.0.0.1", 0, "cpu")  # one rank: no process group
    assert worker.dispatch("ping") == 0
    for name in ("apply", "runner", "_engines", "__init__"):
        with pytest.raises(ValueError, match=f"'{name}' is not a worker operation"):
            worker.dispatch(name, "os:getpid")
    launcher = InProcessLauncher()
    with pytest.raises(WorkerError, match="'apply' is not a worker operation"):
        launcher.call("apply", "os:getpid")
    launcher.close()


def test_invalid_request_in_worker_is_reported() -> None:
    with MpLauncher(2) as launcher:
        spec = EngineSpec(str(checkpoint("tiny-llama")), 2, 1)
        with pytest.raises(WorkerError, match="token id 9999 outside the vocabulary"):
            launcher.run(spec, [Request("bad", (1, 9999))])
