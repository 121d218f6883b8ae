"""What several test files share: requests and engine outputs, their comparison under the
harness's own tolerances, and operations that only the tests' own rank processes carry."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch

from harness.compare import tolerance_for
from harness.launch import mp as mp_launcher
from harness.launch import ray_launcher
from harness.launch.ray_launcher import RankActor
from harness.setup import MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS
from reference_impl.loader import load_model
from reference_impl.requests import Request, RequestOutput
from reference_impl.runner import EngineConfig, Runner
from scenarios.models import checkpoint
from scenarios.registry import get_scenario

# -- tolerances ---------------------------------------------------------------------------------
# The harness's own fp32 logprob tolerances (harness/compare.py, with their measured margins): a
# sharded or pipelined engine against one device differs in reduction order only (measured
# 3.3e-5; the tolerance sits 30x below the tiny models' smallest top-1/top-2 gap), and SP against
# SP off is bit-identical when clean (the ``identical`` policy's noise floor).
TP_ATOL = tolerance_for("float32").logprob_atol
SP_ATOL = tolerance_for("float32").identical_atol

# -- requests and engine outputs -------------------------------------------------------------
# The engine config of every harness setup: the 24-token step budget chunks the scenarios'
# 70-token prompt, so steps mix prefill with decode.
ENGINE = EngineConfig(MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS)


@cache
def scenario_requests(scenario: str, model: str = "tiny-llava", max_new_tokens: int = 16) -> list[Request]:
    """A registered scenario's fp32 requests for a built-in model, as the harness builds them."""
    return get_scenario(scenario).requests(checkpoint(model), "float32", max_new_tokens=max_new_tokens)


def requests(model: str, *scenarios: str) -> list[Request]:
    """The named scenarios' requests for ``model``, in one batch (e.g. ``"text", "prompt_embeds"``:
    ids of lengths 1, 7, 13 and 70, and prompt-embeds)."""
    return [r for s in scenarios for r in scenario_requests(s, model)]


@cache
def single_device(model: str, *scenarios: str) -> list[RequestOutput]:
    """The one-device eager engine's outputs for ``requests(model, *scenarios)`` (``ENGINE``)."""
    return Runner(load_model(checkpoint(model)), ENGINE).generate(requests(model, *scenarios))


# -- comparison ---------------------------------------------------------------------------------

def differences(got: Sequence[RequestOutput], want: Sequence[RequestOutput], atol: float = TP_ATOL
                ) -> dict[str, str]:
    """Request id -> how ``got`` differs from ``want``: its tokens, from the first step that differs
    (no flip is tolerated), or a chosen-token logprob beyond ``atol``. Requests missing, added or
    reordered on either side are a difference too (key ``"request ids"``). Empty: they agree."""
    got_ids, want_ids = [o.request_id for o in got], [o.request_id for o in want]
    if got_ids != want_ids:
        return {"request ids": f"{got_ids} != {want_ids}"}
    out = {}
    for g, w in zip(got, want, strict=True):
        if g.token_ids != w.token_ids:
            pairs = zip(g.token_ids, w.token_ids)
            step = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(g.token_ids), len(w.token_ids)))
            out[g.request_id] = f"tokens differ from step {step}"
        elif (diff := max_logprob_diff([g], [w])) > atol:
            out[g.request_id] = f"logprob diff {diff:.2e}"
    return out


def max_logprob_diff(got: Sequence[RequestOutput], want: Sequence[RequestOutput]) -> float:
    """The largest chosen-token |logprob difference| of outputs with the same tokens."""
    return max((abs(a - b) for g, w in zip(got, want, strict=True)
                for a, b in zip(g.logprobs, w.logprobs, strict=True)), default=0.0)


def assert_same(label: str, got: Sequence[RequestOutput], want: Sequence[RequestOutput],
                atol: float = TP_ATOL) -> None:
    """``got`` agrees with ``want`` (``differences``); prints the largest logprob difference
    (``pytest -rP`` shows it: the measured margin under ``atol``)."""
    problems = differences(got, want, atol)
    assert not problems, f"{label}: {problems}"
    print(f"{label}: max |logprob diff| {max_logprob_diff(got, want):.2e}")

# -- test operations: Worker methods that only the rank processes of a test's launchers have -----
#
# Production workers run only the operations they catalogue (``Worker.OPERATIONS``). A test that
# needs a rank to fail on cue, or to report something the catalogue does not, takes the
# ``test_operations`` fixture (tests/conftest.py, ``use_test_operations``): the rank processes its
# launchers start first call ``add_test_operations``, which adds these functions to their
# ``Worker`` class and catalogue.


def raise_on_rank_1(worker: Any) -> None:
    """Rank 1 fails while rank 0 waits in a collective that rank 1 never joins."""
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise RuntimeError("boom on rank 1")
    dist.barrier()


def exit_on_rank_1(worker: Any) -> None:
    """Rank 1's process dies without a reply while rank 0 stays busy for the Worker's whole
    collective timeout, as in a collective that does not notice a dead peer (NCCL's). (In a gloo
    collective rank 0 would fail at once on the closed connection, and whose failure came back
    first would be a race.)"""
    import time

    import torch.distributed as dist

    from harness.launch.worker import COLLECTIVE_TIMEOUT

    if dist.get_rank() == 1:
        os._exit(3)
    time.sleep(COLLECTIVE_TIMEOUT.total_seconds())


def kill_self_on_rank_1(worker: Any) -> None:
    """Rank 1 prints a line, then its process is killed by SIGKILL (as the OOM killer or an
    operator would), while rank 0 waits in a barrier that rank 1 never joins."""
    import signal

    import torch.distributed as dist

    if dist.get_rank() == 1:
        print("rank 1: last words before SIGKILL", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()


def hang_on_rank_1(worker: Any) -> None:
    """Rank 1 never enters the collective (it sleeps); rank 0 waits in it."""
    import time

    import torch.distributed as dist

    if dist.get_rank() == 1:
        time.sleep(3600)
    dist.barrier()


def join_cgroup_on_rank_1(worker: Any, cgroup: str) -> int:
    """Rank 1 moves its own process into the memory cgroup ``cgroup`` (cgroup v1's
    ``cgroup.procs``); returns its pid."""
    import torch.distributed as dist

    if dist.get_rank() == 1:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    dist.barrier()
    return os.getpid()


def machine_memory_mib() -> tuple[int, int]:
    """This machine's total and available memory, MiB (``/proc/meminfo``)."""
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    total, available = (int(info[k].split()[0]) // 1024 for k in ("MemTotal", "MemAvailable"))
    return total, available


# How fast ``allocate_on_rank_1`` grows: 64 MiB every 50 ms (1.25 GiB/s), slow enough for Ray's
# memory monitor (polling every 100 ms in its test) to act before the machine runs short.
ALLOCATE_STEP_MIB = 64
ALLOCATE_PAUSE_S = 0.05


def allocate_on_rank_1(worker: Any, mib: int) -> None:
    """Rank 1 allocates and touches up to ``mib`` MiB, step by step (in a memory cgroup: past
    its limit, so the kernel's OOM killer ends it; under Ray: past the memory monitor's
    threshold), while rank 0 waits in a barrier that rank 1 never joins."""
    import time

    import torch.distributed as dist

    if dist.get_rank() == 1:
        print(f"rank 1: allocating {mib} MiB", flush=True)
        blocks = []
        for _ in range(0, mib, ALLOCATE_STEP_MIB):
            blocks.append(bytearray(ALLOCATE_STEP_MIB * 2**20))  # touched: bytearray zero-fills
            time.sleep(ALLOCATE_PAUSE_S)
        print(f"rank 1: still alive with {len(blocks) * ALLOCATE_STEP_MIB} MiB", flush=True)
    dist.barrier()


def niceness(worker: Any) -> int:
    """The rank process's nice value."""
    return os.nice(0)


def gather_residual_probe(worker: Any) -> list[float]:
    """In a tp2 worker: the pipeline hand-off's gather of a shard whose rows hold ``rank + 1``."""
    from reference_impl.parallel import init_parallel
    from reference_impl.parallel.pipeline import PipelineComm

    state = init_parallel(2, 1)
    comm = PipelineComm(state, 3, torch.float32, torch.device("cpu"))
    shard = torch.full((2, 3), float(state.tp_rank + 1))
    out: list[float] = comm.gather_residual(shard)[:, 0].tolist()
    return out


TEST_OPERATIONS = {fn.__name__: fn for fn in (raise_on_rank_1, exit_on_rank_1, kill_self_on_rank_1, hang_on_rank_1,
                                               join_cgroup_on_rank_1, allocate_on_rank_1, niceness, gather_residual_probe)}

# A fault for a whole run (``parity run`` in a test): ``KIND:RANK:MARKER`` makes rank RANK, on its
# first ``generate`` while the file MARKER does not exist, create MARKER and then be killed by
# SIGKILL (``kill``) or sleep instead of generating (``hang``), or generate and then change the
# first request's first chosen-token logprob (rank 0 holds the outputs) by ``NONDETERMINISM``'s
# amount: ``nudge`` (far within the tolerance: the verdict stays, the output bits change) or
# ``skew`` (beyond it: that generation fails). The marker makes the fault strike once: the pool
# rebuilt after it runs clean, and of a case's repeats (``--repeat``) only the first differs.
FAULT_ENV = "PARITY_TEST_FAULT"
NONDETERMINISM = {"nudge": 2.0**-20, "skew": 0.5}


def _faulty(generate: Any) -> Any:
    def generate_with_fault(worker: Any, *args: Any) -> Any:
        import signal
        import time

        kind, rank, marker = (os.environ.get(FAULT_ENV) or "::").split(":", 2)
        if kind and worker.rank == int(rank) and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            print(f"rank {worker.rank}: injected fault {kind!r} before generating", flush=True)
            if kind in NONDETERMINISM:
                outputs, report = generate(worker, *args)
                outputs[0].logprobs[0] -= NONDETERMINISM[kind]
                return outputs, report
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)
        return generate(worker, *args)

    generate_with_fault.faulty = True  # type: ignore[attr-defined]
    return generate_with_fault


def add_test_operations() -> None:
    """Give ``Worker`` the test operations, in this process only (a test's rank process), and a
    ``generate`` that injects ``FAULT_ENV``'s fault when it is set."""
    from harness.launch.worker import Worker

    for name, fn in TEST_OPERATIONS.items():
        setattr(Worker, name, fn)
    Worker.OPERATIONS = Worker.OPERATIONS | set(TEST_OPERATIONS)
    if not getattr(Worker.generate, "faulty", False):
        Worker.generate = _faulty(Worker.generate)  # type: ignore[method-assign]


# The launcher's own rank-process body (``use_test_operations`` replaces the module's name).
_SERVE = mp_launcher._serve


def serve_with_test_operations(*args: Any) -> None:
    """An ``MpLauncher`` rank process: the launcher's own serve loop, with the test operations."""
    add_test_operations()
    _SERVE(*args)


class RankActorWithTestOperations(RankActor):
    """A ``RayLauncher`` rank actor whose worker has the test operations."""

    def _start(self, *args: Any) -> None:
        add_test_operations()
        super()._start(*args)


@cache
def remote_actor_with_test_operations() -> Any:
    import ray

    return ray.remote(RankActorWithTestOperations)


def use_test_operations(monkeypatch: Any) -> None:
    """From now until ``monkeypatch`` is undone, the rank processes that ``MpLauncher`` and
    ``RayLauncher`` start carry the test operations."""
    monkeypatch.setattr(mp_launcher, "_serve", serve_with_test_operations)
    monkeypatch.setattr(ray_launcher, "_remote_actor_class", remote_actor_with_test_operations)
