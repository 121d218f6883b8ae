"""Shards of a matrix: deterministic, disjoint, complete, balanced; the same partition from
`parity matrix` (the CI plan job) and `parity run --shard` (a shard job)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.matrix import get_matrix
from harness.plan import RunOptions, plan
from harness.shards import costs, group_of, partition, runner_labels, shard
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
    assert max(loads) - min(loads) <= max(group_cost.values()) + 1e-9
    for part in parts:  # a setup's scenarios stay together: its engine is built in one shard
        for other in parts:
            if other is not part:
                assert not {group_of(p) for p in part} & {group_of(p) for p in other}


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
