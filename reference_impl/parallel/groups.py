"""Process groups. Rank layout: ``rank = pp_rank * tp + tp_rank``.

TP groups are the ``tp`` consecutive ranks of one pipeline stage; PP groups are the ranks with
the same ``tp_rank`` across stages. All ranks create all groups, in the same order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    rank: int
    world_size: int
    tp: int
    pp: int
    tp_group: dist.ProcessGroup | None  # None when tp == 1
    pp_group: dist.ProcessGroup | None  # None when pp == 1

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def tp_group_name(self) -> str:
        assert self.tp_group is not None, "no TP group when tp == 1"
        return str(self.tp_group.group_name)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def stage_rank(self, pp_rank: int) -> int:
        """Global rank of this rank's TP peer on stage ``pp_rank``."""
        return pp_rank * self.tp + self.tp_rank


SINGLE = ParallelState(rank=0, world_size=1, tp=1, pp=1, tp_group=None, pp_group=None)
_STATE: list[ParallelState] = [SINGLE]
_GROUP_CACHE: dict[tuple[int, int], tuple[list[dist.ProcessGroup], list[dist.ProcessGroup]]] = {}


def _groups(tp: int, pp: int) -> tuple[list[dist.ProcessGroup], list[dist.ProcessGroup]]:
    """Every TP group and every PP group of a (tp, pp) layout, created once per process."""
    if (tp, pp) not in _GROUP_CACHE:
        tp_groups = [dist.new_group(list(range(p * tp, (p + 1) * tp))) for p in range(pp)]
        pp_groups = [dist.new_group([t + p * tp for p in range(pp)]) for t in range(tp)]
        _GROUP_CACHE[(tp, pp)] = (tp_groups, pp_groups)
    return _GROUP_CACHE[(tp, pp)]


def init_parallel(tp: int, pp: int) -> ParallelState:
    """Groups for a (tp, pp) layout over the already initialised default process group."""
    if not dist.is_initialized():
        if tp * pp != 1:
            raise RuntimeError("torch.distributed is not initialised")
        _STATE[0] = SINGLE
        return SINGLE
    rank, world = dist.get_rank(), dist.get_world_size()
    if tp * pp != world:
        raise ValueError(f"tp={tp} x pp={pp} = {tp * pp} ranks, but the world has {world}")
    tp_groups, pp_groups = _groups(tp, pp)
    state = ParallelState(
        rank, world, tp, pp,
        tp_groups[rank // tp] if tp > 1 else None,
        pp_groups[rank % tp] if pp > 1 else None,
    )
    _STATE[0] = state
    return state


def current_state() -> ParallelState:
    return _STATE[0]


@contextlib.contextmanager
def use_state(state: ParallelState) -> Iterator[None]:
    """Make ``state`` current while an engine runs: a worker keeps several engines (a tp4 and a
    tp2 x pp2 one in one 4-rank pool), and ops that read the current state (activation capture)
    must see the groups of the engine that is running, not of the last one built."""
    saved = _STATE[0]
    _STATE[0] = state
    try:
        yield
    finally:
        _STATE[0] = saved
