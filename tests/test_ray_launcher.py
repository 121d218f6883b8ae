"""RayLauncher on the session's Ray cluster: parity with the single-device engine, pooling, failures."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from harness.launch import RayLauncher, WorkerError, ray_launcher
from reference_impl.engine import EngineSpec
from scenarios.models import checkpoint

from helpers import ENGINE, assert_same, requests, single_device, use_test_operations

MODEL = "tiny-llama"
SCENARIOS = ("text", "prompt_embeds")  # ids (lengths 1, 7, 13, 70) and prompt-embeds: one batch
SETUPS = {"tp2": (2, 1), "tp2-pp2": (2, 2)}
# A rank failure must surface well before the Worker's 120 s collective timeout would fire.
FAILURE_DEADLINE_S = 60.0

# Every test here runs on the session's Ray cluster (the parity plugin's fixture).
pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def ray_launchers() -> Iterator[dict[int, RayLauncher]]:
    """A 2-rank and a 4-rank launcher, their actors kept across the module's tests. Every actor
    the module starts also carries ``helpers.TEST_OPERATIONS``, so that the failure tests reuse
    the warm 2-rank launcher."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_test_operations(monkeypatch)
        pool = {2: RayLauncher(2), 4: RayLauncher(4)}
        yield pool
        for launcher in pool.values():
            launcher.close()


def spec_for(tp: int, pp: int) -> EngineSpec:
    return EngineSpec(str(checkpoint(MODEL)), tp, pp, engine=ENGINE)


def pids(launcher: RayLauncher) -> list[int]:
    """The processes of the launcher's rank actors (which host its workers)."""
    return [info["pid"] for info in launcher.actor_info()]


@pytest.mark.parametrize("setup", list(SETUPS))
def test_parallel_equals_single_device(ray_launchers: dict[int, RayLauncher], setup: str) -> None:
    tp, pp = SETUPS[setup]
    launcher = ray_launchers[tp * pp]
    got = launcher.run(spec_for(tp, pp), requests(MODEL, *SCENARIOS))
    assert_same(setup, got, single_device(MODEL, *SCENARIOS))
    info = launcher.actor_info()
    assert launcher.master_addr == info[0]["node_ip"]  # rendezvous on rank 0's node, as Ray sees it


def test_pool_reuses_actors_and_fresh_workers_do_not(ray_launchers: dict[int, RayLauncher]) -> None:
    spec = spec_for(2, 1)
    pooled = ray_launchers[2]
    pooled.run(spec, requests(MODEL, *SCENARIOS))
    first = pooled.actor_info()
    pooled.run(spec, requests(MODEL, *SCENARIOS))
    assert pooled.actor_info() == first

    with RayLauncher(2, fresh_workers=True) as fresh:
        fresh.run(spec, requests(MODEL, *SCENARIOS))
        pids_a = pids(fresh)
        fresh.run(spec, requests(MODEL, *SCENARIOS))
        pids_b = pids(fresh)
    assert not set(pids_a) & set(pids_b), (pids_a, pids_b)
    assert not set(pids_a) & {i["pid"] for i in first}


@pytest.mark.parametrize("target,message", [
    ("raise_on_rank_1", "RuntimeError: boom on rank 1"),
    ("exit_on_rank_1", "actor died"),
])
def test_rank_failure_surfaces_without_hanging_and_restarts(ray_launchers: dict[int, RayLauncher],
                                                            target: str, message: str) -> None:
    """A rank raises while rank 0 waits in a collective, or its process dies while rank 0 is busy
    (``helpers.TEST_OPERATIONS``): the launcher raises at once, tears every actor down, and its
    next call starts new ones."""
    launcher = ray_launchers[2]
    before = pids(launcher)
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        launcher.call(target)
    elapsed = time.monotonic() - start
    torn_down = launcher._actors == [] and launcher._pg is None
    assert launcher.call("ping") == [0, 1]
    after = pids(launcher)
    print(f"{target}: WorkerError after {elapsed:.2f}s")
    assert elapsed < FAILURE_DEADLINE_S
    assert info.value.rank == 1
    assert message in info.value.detail
    if target == "raise_on_rank_1":
        assert "raise_on_rank_1" in info.value.detail  # the traceback, not just the message
    assert torn_down  # every actor was killed, the placement group removed
    assert not set(before) & set(after), (before, after)  # the next call started new actors


@pytest.mark.parametrize("tp,pp,world_size,message", [
    (3, 1, 3, "tp=3 does not divide num_attention_heads=4"),
    (1, 5, 5, r"pp=5 is larger than the number of layers \(4\)"),
    (2, 2, 2, "spec needs 4 ranks; this launcher has 2"),
])
def test_invalid_spec_rejected_before_actors_start(tp: int, pp: int, world_size: int, message: str) -> None:
    launcher = RayLauncher(world_size)
    with pytest.raises(ValueError, match=message):
        launcher.run(EngineSpec(str(checkpoint(MODEL)), tp, pp), requests(MODEL, *SCENARIOS))
    assert launcher._actors == [] and launcher._pg is None and launcher.master_addr is None


def test_unplaceable_ranks_raise_naming_the_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_launcher, "PLACEMENT_TIMEOUT_S", 2.0)
    launcher = RayLauncher(2, cpus_per_rank=64)  # more CPUs per rank than any node has
    with pytest.raises(RuntimeError, match=r"could not place 2 ranks with bundles \{'CPU': 64\}"):
        launcher.call("ping")
    assert launcher._actors == [] and launcher._pg is None
