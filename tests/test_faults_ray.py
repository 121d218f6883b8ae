"""Faults under the Ray launcher, and what parity's Ray head exposes: a rank killed by SIGKILL
is named with its memory and last output lines, a hang times out with every rank's stack, and
the head listens on loopback only."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.launch import RayLauncher, WorkerError

from helpers import use_test_operations

pytestmark = pytest.mark.usefixtures("ray_cluster")
HANG_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def launcher() -> Iterator[RayLauncher]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_test_operations(monkeypatch)
        launcher = RayLauncher(2)
        yield launcher
        launcher.close()


def test_sigkilled_rank_actor_is_named_with_memory_and_last_output(launcher: RayLauncher) -> None:
    assert launcher.call("ping") == [0, 1]
    with pytest.raises(WorkerError) as info:
        launcher.call("kill_self_on_rank_1")
    err = info.value
    print(err.detail)
    assert (err.rank, err.kind) == (1, "died")
    assert "actor died" in err.detail
    assert "its actor process died; peak RSS" in err.detail
    assert "rank 1: last words before SIGKILL" in err.detail
    assert launcher.call("ping") == [0, 1]  # new actors


def test_ranks_run_at_the_drivers_priority_not_rays_worker_niceness(launcher: RayLauncher) -> None:
    """Ray would start its workers at nice 15, where any other work on the machine starves them;
    parity's head runs them at the driver's priority."""
    import os

    assert launcher.call("niceness") == [os.nice(0)] * 2


def test_hang_times_out_with_every_ranks_stack(launcher: RayLauncher) -> None:
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        launcher.call("hang_on_rank_1", timeout=HANG_TIMEOUT_S)
    elapsed = time.monotonic() - start
    err = info.value
    print(err.detail)
    assert err.kind == "timeout" and HANG_TIMEOUT_S <= elapsed < HANG_TIMEOUT_S + 15
    rank0, rank1 = err.detail.split("--- rank 1")
    assert "barrier" in rank0 and "in hang_on_rank_1" in rank1
    assert launcher.call("ping") == [0, 1]


def _listening(port: int) -> list[str]:
    """The local addresses of the TCP sockets listening on ``port`` (from /proc/net/tcp{,6})."""
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # /proc writes each 32-bit word in host (little-endian) order.
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.append(socket.inet_ntop(family, raw))
    return found


def test_the_ray_head_listens_on_loopback_only(ray_cluster: str) -> None:
    import ray

    ports = {int(ray_cluster.rsplit(":", 1)[1])}  # GCS
    for node in ray.nodes():
        assert node["NodeManagerAddress"] == "127.0.0.1"
        ports |= {int(node["NodeManagerPort"]), int(node["ObjectManagerPort"])}
    seen = {port: _listening(port) for port in ports}
    print(seen)
    assert all(seen.values()), seen  # every service was found listening
    for port, addresses in seen.items():
        # gRPC binds IPv6 sockets to the IPv4-mapped loopback (::ffff:127.0.0.1): still loopback only.
        assert all(a.removeprefix("::ffff:").startswith("127.") or a == "::1" for a in addresses), (port, addresses)
