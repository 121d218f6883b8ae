"""Shards of a matrix for parallel jobs: deterministic, disjoint, complete and balanced.

The unit of a shard is a setup with all its scenarios: a shard process builds (and compiles) an
engine once per setup it runs, so scattering one setup's scenarios over several shards would
build it in each (measured on the nightly matrix: four shards of scattered cases took 671 s
where one process took 202 s). Balanced by each case's duration in an earlier run's
``results.jsonl`` when one is given, by an estimate otherwise (cases an earlier run did not have
are estimated on the same scale). A shard also pays once for each world size it runs: its rank
processes start (torch imported in each) before its first case of that size. Two partitions are
made, longest-first greedy over all shards (setups in order of decreasing cost, ties by id, each
to the shard that would end with the least work, a pool start included where the shard has no
ranks of that size yet; ties by shard index) and the same within shards given to each world size
in proportion to its work; the one kept ends within a pool start of the sooner and does the least
work in all. The same cases and durations always give the same shards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.case import HF_BASELINE, Case
from harness.plan import PlannedCase
from harness.results import RESULTS_FILE, read_results

# The estimate, in seconds of this project's 2-core CPU machine (measured on the smoke matrix,
# docs/benchmarks.md): a case costs a fixed part (planning, inputs, comparison), a part per rank
# (a generation steps every rank), more when the engine is compiled (a graph per step size) and
# for the transformers baseline (a model built in-process); a skipped case costs almost nothing.
BASE_S = 2.0
PER_RANK_S = 1.0
COMPILED_S = 4.0
HF_BASELINE_S = 3.0
SKIP_S = 0.05
# Starting a shard's rank processes for one world size, per rank (spawn, torch import, process
# group): measured on the nightly matrix as a world size's first case minus its later ones,
# about 10 s for four ranks on this machine (docs/nightly.md). One rank runs in-process: free.
POOL_START_PER_RANK_S = 2.5


# Expected ends of two partitions closer than this are a tie: a pool start, the estimate's grain.
TIE_S = 4 * POOL_START_PER_RANK_S


def pool_start(world_size: int) -> float:
    return 0.0 if world_size == 1 else POOL_START_PER_RANK_S * world_size


def estimate(planned: PlannedCase) -> float:
    if planned.skip_reason is not None:
        return SKIP_S
    case: Case = planned.case
    cost = BASE_S + PER_RANK_S * case.setup.world_size
    if case.setup.compile != "eager":
        cost += COMPILED_S
    if case.baseline == HF_BASELINE:
        cost += HF_BASELINE_S
    return cost


def durations(run_dir: Path) -> dict[str, float]:
    """Case id -> seconds, from an earlier run directory's results (empty when it has none)."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        return {}
    return {r.id: float(r.seconds or 0.0) for r in read_results(path)}


def costs(planned: Sequence[PlannedCase], measured: Mapping[str, float] | None = None) -> dict[str, float]:
    """Each case's expected seconds: measured where known; elsewhere the estimate, scaled by how
    the measured cases compare with their estimates (1 when none was measured)."""
    measured = {k: v for k, v in (measured or {}).items() if v > 0}
    known = [p for p in planned if p.case.id in measured]
    scale = 1.0
    if known:
        scale = sum(measured[p.case.id] for p in known) / sum(estimate(p) for p in known)
    return {p.case.id: measured.get(p.case.id, estimate(p) * scale) for p in planned}


def partition(planned: Sequence[PlannedCase], count: int,
              measured: Mapping[str, float] | None = None) -> list[list[PlannedCase]]:
    """``count`` shards of ``planned`` (whole setups each); each keeps the plan's order.

    Two candidates: setups placed longest-first over all shards; and the shards split between
    the world sizes in proportion to their work, setups placed longest-first within each (one
    pool start per shard). Kept: the one with the least work in all among those that end within
    ``TIE_S`` of the soonest (the first on a tie)."""
    if count < 1:
        raise ValueError(f"{count} shards: need at least one")
    cost = costs(planned, measured)
    work: dict[str, float] = {}
    world: dict[str, int] = {}
    for p in planned:
        work[group_of(p)] = work.get(group_of(p), 0.0) + cost[p.case.id]
        if p.skip_reason is None:
            world[group_of(p)] = p.case.setup.world_size
    groups = [_Group(g, work[g], world.get(g, 1)) for g in sorted(work, key=lambda g: (-work[g], g))]
    candidates = [_place(groups, [_Shard() for _ in range(count)])]
    if (by_world := _by_world(groups, count)) is not None:
        candidates.append(by_world)
    soonest = min(max(s.load for s in c[1]) for c in candidates)
    # Partitions that end within one pool start of the soonest are ties (the costs are not
    # known closer than that); of those, the one with the least work in all (fewest rank starts).
    close = [c for c in candidates if max(s.load for s in c[1]) <= soonest + TIE_S]
    owner, _ = min(close, key=lambda c: sum(s.load for s in c[1]))
    return [[p for p in planned if owner[group_of(p)] == i] for i in range(count)]


@dataclass(frozen=True)
class _Group:
    name: str
    cost: float
    world_size: int


@dataclass
class _Shard:
    load: float = 0.0
    worlds: set[int] = field(default_factory=set)

    def added(self, group: _Group) -> float:
        return group.cost + (0.0 if group.world_size in self.worlds else pool_start(group.world_size))


def _place(groups: Sequence[_Group], shards: list[_Shard], allowed: Mapping[str, Sequence[int]] | None = None,
           owner: dict[str, int] | None = None) -> tuple[dict[str, int], list[_Shard]]:
    """Longest first, each group to the allowed shard that would end with the least work."""
    owner = {} if owner is None else owner
    for group in groups:
        choices = allowed[group.name] if allowed is not None else range(len(shards))
        i = min(choices, key=lambda k: (shards[k].load + shards[k].added(group), k))
        owner[group.name] = i
        shards[i].load += shards[i].added(group)
        shards[i].worlds.add(group.world_size)
    return owner, shards


def _by_world(groups: Sequence[_Group], count: int) -> tuple[dict[str, int], list[_Shard]] | None:
    """Each world size that starts rank processes gets shards of its own, in proportion to its
    work (largest work per shard first); in-process (one-rank) setups go where there is room.
    None when there are fewer shards than such world sizes."""
    sizes = sorted({g.world_size for g in groups if g.world_size > 1})
    if not sizes or len(sizes) > count:
        return None
    total = {w: sum(g.cost for g in groups if g.world_size == w) + pool_start(w) for w in sizes}
    given = {w: 1 for w in sizes}
    for _ in range(count - len(sizes)):
        w = max(sizes, key=lambda w: (total[w] / given[w], -w))
        given[w] += 1
    shards, first, span = [_Shard() for _ in range(count)], 0, {}
    for w in sizes:
        span[w] = list(range(first, first + given[w]))
        first += given[w]
    allowed = {g.name: span.get(g.world_size, list(range(count))) for g in groups}
    pooled = [g for g in groups if g.world_size > 1]
    owner, shards = _place(pooled, shards, allowed)
    return _place([g for g in groups if g.world_size == 1], shards, allowed, owner)


def group_of(planned: PlannedCase) -> str:
    """The unit a shard takes whole: the setup (with its baseline: the transformers-baseline
    oracle cases are a group of their own)."""
    return f"{planned.case.setup.id} vs {planned.case.baseline_id}"


def shard(planned: Sequence[PlannedCase], index: int, count: int,
          measured: Mapping[str, float] | None = None) -> list[PlannedCase]:
    """Shard ``index`` of ``count`` (``--shard I/N``, 0 <= I < N)."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= I < N")
    return partition(planned, count, measured)[index]


# GitHub runner labels a shard job needs: CPU shards run on hosted runners; GPU shards on
# self-hosted runners labelled with their GPU count (the smallest that holds the shard's largest
# setup).
CPU_RUNNER = ["ubuntu-latest"]
GPU_RUNNERS = {2: ["self-hosted", "linux", "gpu-2"], 4: ["self-hosted", "linux", "gpu-4"],
               8: ["self-hosted", "linux", "gpu-8"]}


def runner_labels(device: str, cases: Sequence[PlannedCase]) -> list[str]:
    if device == "cpu":
        return CPU_RUNNER
    need = max((p.case.setup.world_size for p in cases), default=1)
    for gpus, labels in sorted(GPU_RUNNERS.items()):
        if gpus >= need:
            return labels
    raise ValueError(f"no runner label for {need} GPUs (largest: {max(GPU_RUNNERS)})")
