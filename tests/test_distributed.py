"""Eager TP / PP / TP x PP on CPU with gloo: token-identical to the single-device engine."""

from __future__ import annotations

import pytest

from harness.launch import MpLauncher, Worker, WorkerError
from harness.launch.inprocess import InProcessLauncher
from reference_impl.engine import EngineSpec
from reference_impl.requests import Request
from scenarios.models import checkpoint

from helpers import ENGINE, assert_same, requests, single_device

SETUPS = {"tp2": (2, 1), "pp2": (1, 2), "tp2-pp2": (2, 2), "tp4": (4, 1)}
MODELS = ("tiny-llama", "tiny-qwen2", "tiny-llava")


def scenarios_of(name: str) -> tuple[str, ...]:
    """Ids (lengths 1, 7, 13, 70), prompt-embeds and, for LLaVA, images: one batch."""
    return ("text", "prompt_embeds") + (("multimodal",) if name == "tiny-llava" else ())


CASES = [(m, s) for m in MODELS for s in SETUPS]


@pytest.mark.parametrize("name,setup", CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_parallel_equals_single_device(launchers: dict[int, MpLauncher], name: str, setup: str) -> None:
    tp, pp = SETUPS[setup]
    spec = EngineSpec(str(checkpoint(name)), tp, pp, engine=ENGINE)
    got = launchers[tp * pp].run(spec, requests(name, *scenarios_of(name)))
    assert_same(f"{name} {setup}", got, single_device(name, *scenarios_of(name)))


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
            launcher.run(spec, requests("tiny-llama", "text"))
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
