"""RayLauncher across two simulated Ray nodes: tp2-pp2 with SP, ranks spread over both nodes.

``ray.cluster_utils.Cluster`` starts a head and a worker node (each its own raylet) on this
machine. A driver holds one Ray connection at a time and the test session may already hold one
(the parity pytest plugin's), so the two-node run happens in a child process that owns its
cluster and reports back as JSON; the checks run here. The nodes share an IP, so what is
checked is that the rendezvous address is the one Ray reports for rank 0's node, that the ranks'
actors sit on both nodes, and that the outputs match the single-device engine's.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from harness.launch import RayLauncher, ray_launcher
from harness.launch.ray_launcher import loopback_node_ip
from reference_impl.compile import CompileConfig
from reference_impl.engine import EngineSpec
from reference_impl.requests import RequestOutput
from scenarios.models import checkpoint

from helpers import ENGINE, assert_same, requests, single_device

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-llama"
SCENARIOS = ("text", "prompt_embeds")  # ids (lengths 1, 7, 13, 70) and prompt-embeds: one batch
# Logical CPUs per simulated node: 4 ranks x 0.25 CPU fit on one, so the SPREAD strategy (not
# capacity) is what puts ranks on both nodes.
NODE_CPUS = 1
# The child's whole run: two raylets, 4 rank actors, SP graph compiles of every step size.
# Measured 90-110 s on this 2-core machine while shared; 3x headroom.
CHILD_TIMEOUT_S = 420
RESULT_PREFIX = "PARITY_RESULT "


def two_node_run() -> dict[str, Any]:
    """Child process body: own a two-node cluster, run tp2-pp2 SP with SPREAD, report."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # as ensure_ray does for a local cluster
    node_args = {"num_cpus": NODE_CPUS, "node_ip_address": "127.0.0.1"}
    with loopback_node_ip():
        cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
        cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING)
    try:
        spec = EngineSpec(str(checkpoint(MODEL)), 2, 2, engine=ENGINE,
                          compile=CompileConfig("graph", "full", sp=True))
        with RayLauncher(spec.world_size, strategy="SPREAD") as launcher:
            outputs = launcher.run(spec, requests(MODEL, *SCENARIOS))
            return {
                "cluster_nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
                "ranks": launcher.actor_info(),
                "master_addr": launcher.master_addr,
                "master_port": launcher.master_port,
                "outputs": [[o.request_id, o.token_ids, o.logprobs] for o in outputs],
            }
    finally:
        ray.shutdown()
        cluster.shutdown()


def run_child() -> dict[str, Any]:
    """Run ``two_node_run`` in a fresh interpreter (no ``RAY_ADDRESS``) and parse its report."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, __file__], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=CHILD_TIMEOUT_S)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    assert proc.returncode == 0 and lines, f"child failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX):])
    return result


def test_tp2_pp2_sp_spread_over_two_nodes() -> None:
    pytest.importorskip("ray")
    result = run_child()
    ranks = result["ranks"]
    print("ranks on nodes:", [r["node_id"][:8] for r in ranks],
          "rendezvous", result["master_addr"], result["master_port"])
    assert len(result["cluster_nodes"]) == 2
    assert sorted({r["node_id"] for r in ranks}) == result["cluster_nodes"]  # both nodes hold ranks
    assert result["master_addr"] == ranks[0]["node_ip"]  # rank 0's node IP, as Ray reports it
    assert isinstance(result["master_port"], int)

    got = [RequestOutput(rid, 0, tokens, logprobs) for rid, tokens, logprobs in result["outputs"]]
    assert_same("tp2-pp2 sp over 2 nodes", got, single_device(MODEL, *SCENARIOS))


def test_rendezvous_path_has_no_hard_coded_address() -> None:
    """Only the local head's start-up names loopback; the rendezvous asks rank 0's node."""
    for obj in (RayLauncher, ray_launcher.RankActor, ray_launcher.node_ip):
        source = inspect.getsource(obj)
        assert "127.0.0.1" not in source and "localhost" not in source, obj


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(RESULT_PREFIX + json.dumps(two_node_run()), flush=True)
