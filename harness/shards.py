"""Shards of a matrix for parallel jobs: deterministic, disjoint, complete and balanced.

The unit of a shard is a setup with all its scenarios: a shard process builds (and compiles) an
engine once per setup it runs, so scattering one setup's scenarios over several shards would
build it in each (measured on the nightly matrix: four shards of scattered cases took 671 s
where one process took 202 s). Balanced by each case's duration in an earlier run's
``results.jsonl`` when one is given, by an estimate otherwise (cases an earlier run did not have
are estimated on the same scale). The partition is longest-first greedy: setups in order of
decreasing cost (ties by id) each go to the shard with the least work so far (ties by shard
index), so the same cases and durations always give the same shards, and no shard ends more than
one setup's cost above another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    """``count`` shards of ``planned`` (whole setups each); each keeps the plan's order."""
    if count < 1:
        raise ValueError(f"{count} shards: need at least one")
    cost = costs(planned, measured)
    groups: dict[str, float] = {}
    for p in planned:
        groups[group_of(p)] = groups.get(group_of(p), 0.0) + cost[p.case.id]
    loads = [0.0] * count
    owner: dict[str, int] = {}
    for group in sorted(groups, key=lambda g: (-groups[g], g)):
        i = min(range(count), key=lambda k: (loads[k], k))
        owner[group] = i
        loads[i] += groups[group]
    return [[p for p in planned if owner[group_of(p)] == i] for i in range(count)]


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
