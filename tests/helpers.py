"""What several test files share: operations that only the tests' own rank processes carry."""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import torch

from harness.launch import mp as mp_launcher
from harness.launch.ray_launcher import RankActor

# -- test operations: Worker methods that only the rank processes of a test's launchers have -----
#
# Production workers run only the operations they catalogue (``Worker.OPERATIONS``). A test that
# needs a rank to fail on cue, or to report something the catalogue does not, takes the
# ``test_operations`` fixture (tests/conftest.py): the rank processes its launchers start first
# call ``add_test_operations``, which adds these functions to their ``Worker`` class and catalogue.


def raise_on_rank_1(worker: Any) -> None:
    """Rank 1 fails while rank 0 waits in a collective that rank 1 never joins."""
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise RuntimeError("boom on rank 1")
    dist.barrier()


def exit_on_rank_1(worker: Any) -> None:
    """Rank 1's process dies without a reply while rank 0 waits in a collective."""
    import torch.distributed as dist

    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()


def gather_residual_probe(worker: Any) -> list[float]:
    """In a tp2 worker: the pipeline hand-off's gather of a shard whose rows hold ``rank + 1``."""
    from reference_impl.parallel import init_parallel
    from reference_impl.parallel.pipeline import PipelineComm

    state = init_parallel(2, 1)
    comm = PipelineComm(state, 3, torch.float32, torch.device("cpu"))
    shard = torch.full((2, 3), float(state.tp_rank + 1))
    out: list[float] = comm.gather_residual(shard)[:, 0].tolist()
    return out


TEST_OPERATIONS = {fn.__name__: fn for fn in (raise_on_rank_1, exit_on_rank_1, gather_residual_probe)}


def add_test_operations() -> None:
    """Give ``Worker`` the test operations, in this process only (a test's rank process)."""
    from harness.launch.worker import Worker

    for name, fn in TEST_OPERATIONS.items():
        setattr(Worker, name, fn)
    Worker.OPERATIONS = Worker.OPERATIONS | set(TEST_OPERATIONS)


def serve_with_test_operations(*args: Any) -> None:
    """An ``MpLauncher`` rank process: the launcher's own serve loop, with the test operations."""
    add_test_operations()
    mp_launcher._serve(*args)


class RankActorWithTestOperations(RankActor):
    """A ``RayLauncher`` rank actor whose worker has the test operations."""

    def _start(self, *args: Any) -> None:
        add_test_operations()
        super()._start(*args)


@cache
def remote_actor_with_test_operations() -> Any:
    import ray

    return ray.remote(RankActorWithTestOperations)
