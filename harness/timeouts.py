"""How long a case may take before it is a hang: its expected cost with a margin.

A case's expected cost is ``harness.shards.costs``'s: measured in an earlier run when one is
given (``--durations DIR``), else the estimate of a tiny model on this project's 2-core CPU
machine, scaled by how much larger the model's weights are. The timeout is ``MARGIN`` times that,
and never less than ``MIN_S``: generous enough for a machine whose cores are busy with other
work (the estimate is of an idle one; measured slow-downs under full load stay below 4x) and for
a pool's first case, which also starts its ranks and compiles. ``--case-timeout SECONDS``
replaces it. A hung case ends at its timeout as an ``error`` with every rank's stack.

A derived timeout also grows with the machine's load when the case starts (``load_factor``): on
a machine whose cores are busy with other work every case runs slower in proportion to the run
queue per core, which a fixed margin does not bound (measured: the smoke matrix with two
busy-loop processes on this 2-core machine ran a compiled setup's first case past 120 s, 15x its
idle estimate of 8 s).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from harness.plan import PlannedCase
from harness.shards import costs

# Times the expected cost a case may run: a 2-core machine under full load runs a case up to ~4x
# slower, a pool's first case adds start-up and compilation; 15x covers both with room.
MARGIN = 15.0
# The floor: below it, start-up of the ranks (spawn, import torch, join the group: up to ~30 s on
# a busy machine) would dominate the expected cost.
MIN_S = 90.0
# Checkpoint size up to which the estimate holds (the tiny models weigh ~1 MB; below this size
# fixed costs dominate). Above it a case's time grows at most linearly with the weights.
REFERENCE_WEIGHT_BYTES = 50 * 2**20


# The load factor's cap: a load spike must not turn a hang's timeout into hours.
MAX_LOAD_FACTOR = 8.0


def load_factor() -> float:
    """The 1-minute load average per core when above 1 (at most ``MAX_LOAD_FACTOR``), else 1:
    how much slower than on an idle machine a case may run now."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this platform
        return 1.0
    return min(MAX_LOAD_FACTOR, max(1.0, load / (os.cpu_count() or 1)))


def weight_bytes(checkpoint: str | Path) -> int:
    """The size of a checkpoint directory's safetensors files."""
    return sum(p.stat().st_size for p in Path(checkpoint).glob("*.safetensors"))


def size_factor(checkpoint: str | Path) -> float:
    """How much longer than a tiny model's a case of this checkpoint may take (>= 1)."""
    return max(1.0, weight_bytes(checkpoint) / REFERENCE_WEIGHT_BYTES)


def case_timeouts(planned: list[PlannedCase], checkpoint: str | Path,
                  measured: Mapping[str, float] | None = None, override: float | None = None) -> dict[str, float]:
    """Case id -> seconds it may run (``override``: the same for every case)."""
    if override is not None:
        return {p.case.id: override for p in planned}
    factor = size_factor(checkpoint) if not measured else 1.0
    return {case_id: max(MIN_S, MARGIN * cost * factor) for case_id, cost in costs(planned, measured).items()}
