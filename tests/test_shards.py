"""Shards of a matrix: deterministic, disjoint, complete, balanced; the same partition from
`parity matrix` (the CI plan job) and `parity run --shard` (a shard job)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.matrix import get_matrix
from harness.plan import RunOptions, plan
from harness.shards import costs, group_of, partition, pool_start, runner_labels, shard
from parity.cli import main


def nightly() -> list:
    return plan(get_matrix("nightly"), RunOptions(backend="mp"))


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_partition_is_disjoint_complete_deterministic_and_balanced(count: int) -> None:
    planned = nightly()
    parts = partition(planned, count)
    ids = [p.case.id for part in parts for p in part]
    assert sorted(ids) == sorted(p.case.id for p in planned) and len(ids) == len(set(ids))
    assert [[p.case.id for p in part] for part in parts] == [[p.case.id for p in part]
                                                             for part in partition(nightly(), count)]
    order = [p.case.id for p in planned]
    for part in parts:  # each shard keeps the plan's order
        assert [p.case.id for p in part] == sorted((p.case.id for p in part), key=order.index)
    cost = costs(planned)
    loads = [sum(cost[p.case.id] for p in part) for part in parts]
    group_cost: dict[str, float] = {}
    for p in planned:
        group_cost[group_of(p)] = group_cost.get(group_of(p), 0.0) + cost[p.case.id]
    # balanced: loads with each shard's pool starts (one per world size it runs) differ by at most
    # one setup's cost and one pool start
    starts = [sum(pool_start(w) for w in {p.case.setup.world_size for p in part if p.skip_reason is None})
              for part in parts]
    loads = [load + start for load, start in zip(loads, starts)]
    largest_start = max(pool_start(p.case.setup.world_size) for p in planned)
    assert max(loads) - min(loads) <= max(group_cost.values()) + largest_start + 1e-9
    for part in parts:  # a setup's scenarios stay together: its engine is built in one shard
        for other in parts:
            if other is not part:
                assert not {group_of(p) for p in part} & {group_of(p) for p in other}


def _pool_starts(parts: list) -> int:
    return sum(len({p.case.setup.world_size for p in part if p.skip_reason is None} - {1}) for part in parts)


def test_shards_keep_a_world_size_together_where_the_balance_allows() -> None:
    """Each world size a shard runs costs it a pool start: the partition starts fewer pools than
    longest-first placement that ignores them, and no more than one per shard and size."""
    planned = nightly()
    cost = costs(planned)
    work: dict[str, float] = {}
    for p in planned:
        work[group_of(p)] = work.get(group_of(p), 0.0) + cost[p.case.id]
    loads, owner = [0.0] * 4, {}
    for g in sorted(work, key=lambda g: (-work[g], g)):  # the same greedy, blind to pool starts
        i = min(range(4), key=lambda k: (loads[k], k))
        owner[g], loads[i] = i, loads[i] + work[g]
    blind = [[p for p in planned if owner[group_of(p)] == i] for i in range(4)]
    print(_pool_starts(partition(planned, 4)), "pool starts, against", _pool_starts(blind))
    assert _pool_starts(partition(planned, 4)) < _pool_starts(blind)


def test_measured_durations_balance_the_shards(tmp_path: Path) -> None:
    planned = nightly()
    slow = planned[5].case.id
    lines = [json.dumps({"id": p.case.id, "setup": p.case.setup.id, "baseline": p.case.baseline_id,
                         "scenario": p.case.scenario, "model": p.case.model, "status": "pass",
                         "seconds": 600.0 if p.case.id == slow else 5.0}) for p in planned]
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    from harness.shards import durations

    parts = partition(planned, 3, durations(tmp_path))
    alone = next(part for part in parts if slow in {p.case.id for p in part})
    # the 600 s case's setup gets a shard to itself
    assert {group_of(p) for p in alone} == {group_of(planned[5])}


def test_matrix_command_and_run_shards_agree(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["matrix", "--name", "nightly", "--shards", "4", "--format", "github"]) == 0
    include = json.loads(capsys.readouterr().out)["include"]
    planned = nightly()
    for i, entry in enumerate(include):
        assert entry["shard"] == f"{i}/4" and json.loads(entry["runs_on"]) == ["ubuntu-latest"]
        assert entry["cases"].split(",") == [p.case.id for p in shard(planned, i, 4)]


def test_gpu_shards_ask_for_runners_with_enough_gpus() -> None:
    planned = plan(get_matrix("gpu4"), RunOptions(backend="mp", device="cuda", dtype="bfloat16"))
    assert runner_labels("cuda", planned)[-1] == "gpu-4"
    two = [p for p in plan(get_matrix("gpu2"), RunOptions(backend="mp", device="cuda", dtype="bfloat16"))
           if p.case.setup.world_size <= 2]
    assert runner_labels("cuda", two)[-1] == "gpu-2"


def test_bad_shard_refused() -> None:
    with pytest.raises(ValueError, match="shard 4/4"):
        shard(nightly(), 4, 4)
    with pytest.raises(ValueError, match="at least one"):
        partition(nightly(), 0)
