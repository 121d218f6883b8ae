"""Run by ``test_faults.py``: a Ray head of its own whose memory monitor is set to act a little
above this machine's present use, a 2-rank pool, and rank 1 allocating past it. Prints the
WorkerError's rank, kind and detail as JSON (or what happened instead)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402

from harness.launch import RayLauncher, WorkerError  # noqa: E402
from harness.launch.ray_launcher import ensure_ray  # noqa: E402

from helpers import machine_memory_mib, use_test_operations  # noqa: E402

# After a kill, how long the node may take to give the killed rank's memory back.
MEMORY_RELEASE_S = 60.0
# How far under the monitor's threshold the node must be before new ranks start.
RELEASE_MARGIN_MIB = 512


def _wait_for_memory_below_threshold() -> None:
    threshold = float(os.environ["RAY_memory_usage_threshold"])
    deadline = time.monotonic() + MEMORY_RELEASE_S
    while time.monotonic() < deadline:
        total, available = machine_memory_mib()
        if total - available < threshold * total - RELEASE_MARGIN_MIB:
            return
        time.sleep(0.2)


def main() -> None:
    allocate_mib = int(sys.argv[1])
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_test_operations(monkeypatch)
        ensure_ray(num_cpus=2)
        launcher = RayLauncher(2)
        try:
            assert launcher.call("ping") == [0, 1]
            try:
                launcher.call("allocate_on_rank_1", allocate_mib, timeout=120)
                print(json.dumps({"raised": False}))
            except WorkerError as err:
                print(json.dumps({"raised": True, "rank": err.rank, "kind": err.kind, "detail": err.detail}))
            _wait_for_memory_below_threshold()  # else the monitor kills the new ranks too
            print(json.dumps({"ping_after": launcher.call("ping")}))
        finally:
            launcher.close()
    os._exit(0)  # no Ray shutdown wait


if __name__ == "__main__":
    main()
