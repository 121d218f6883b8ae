"""The worker pools of a run: launchers per world size, reused across cases, and the sharing of
GPUs between a run's two pools (mutated candidates and clean baselines)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from harness.launch.base import EngineRun, Launcher, WorkerError
from harness.plan import available_devices
from harness.setup import ParallelSetup
from reference_impl.requests import Request, RequestOutput
from reference_impl.runner import EngineConfig


@dataclass
class LauncherPool:
    """Launchers per world size, reused across cases (``fresh_workers``: new ones per run)."""

    backend: str
    device: str
    fresh_workers: bool = False
    mutation: str | None = None  # applied inside every worker this pool starts
    # When the current case must end (``time.monotonic()``; None: no limit): every call gets the
    # time left as its timeout, and one still running then is a hang (``WorkerError`` "timeout").
    deadline: float | None = None
    _launchers: dict[int, Launcher] = field(default_factory=dict)

    def get(self, world_size: int) -> Launcher:
        if world_size == 1 and self.mutation is None:
            from harness.launch.inprocess import InProcessLauncher

            return self._launchers.setdefault(1, InProcessLauncher(self.device))
        if world_size not in self._launchers:
            launcher = self._new(world_size)
            if self.mutation is not None:
                launcher.call("mutate", self.mutation, timeout=self.time_left())
            self._launchers[world_size] = launcher
        return self._launchers[world_size]

    def _new(self, world_size: int) -> Launcher:
        if self.backend == "ray":
            from harness.launch.ray_launcher import RayLauncher

            return RayLauncher(world_size, self.device, fresh_workers=self.fresh_workers)
        from harness.launch.mp import MpLauncher

        return MpLauncher(world_size, self.device)

    def time_left(self) -> float | None:
        """Seconds until ``deadline`` (None: no deadline)."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def run(self, setup: ParallelSetup, checkpoint: str, requests: list[Request]) -> list[RequestOutput]:
        """Rank 0's outputs of ``setup`` on ``requests``."""
        return self.run_traced(setup, checkpoint, requests).outputs

    def run_traced(self, setup: ParallelSetup, checkpoint: str, requests: list[Request],
                   engine: EngineConfig | None = None) -> EngineRun:
        """``setup`` on ``requests`` (``engine``: other batching limits than the setup's): the
        outputs and every rank's report."""
        launcher = self.get(setup.world_size)
        try:
            return launcher.run_traced(setup.build_spec(checkpoint, engine), requests, timeout=self.time_left())
        except WorkerError:
            self.drop(setup.world_size)
            raise
        finally:
            if self.fresh_workers and self.backend == "mp" and setup.world_size > 1:
                self.drop(setup.world_size)

    def capture(self, setup: ParallelSetup, checkpoint: str, requests: list[Request],
                engine: EngineConfig | None = None) -> list[dict[str, Any]]:
        """Every rank's activations of the requests' prefill under ``setup``."""
        launcher = self.get(setup.world_size)
        try:
            out: list[dict[str, Any]] = launcher.call("capture", setup.build_spec(checkpoint, engine), requests,
                                                      timeout=self.time_left())
        except WorkerError:
            self.drop(setup.world_size)
            raise
        return out

    def devices_to_start(self, world_size: int) -> int:
        """Devices that ``get(world_size)`` would newly reserve (0: held already, or in-process)."""
        if world_size in self._launchers or (world_size == 1 and self.mutation is None):
            return 0
        return world_size

    def devices_held(self) -> int:
        """Devices reserved by this pool's rank processes (the in-process launcher reserves none)."""
        return sum(ws for ws, launcher in self._launchers.items() if ws > 1 or self.mutation is not None)

    def world_sizes(self) -> list[int]:
        """World sizes this pool holds launchers for."""
        return list(self._launchers)

    def drop(self, world_size: int) -> None:
        launcher = self._launchers.pop(world_size, None)
        if launcher is not None:
            launcher.close()

    def close(self) -> None:
        for ws in list(self._launchers):
            self.drop(ws)

    def abort(self) -> None:
        """Kill every rank process now (Ctrl-C): no goodbye to workers that may be mid-call."""
        launchers, self._launchers = list(self._launchers.values()), {}
        for launcher in launchers:
            launcher.abort()


def make_room(user: LauncherPool, other: LauncherPool, world_size: int) -> None:
    """Before ``user`` starts ranks for ``world_size`` on GPUs, free devices until they fit: first
    ``other``'s ranks (under a mutation the mutated and the clean pool each keep rank processes:
    tp2 x pp2 twice does not fit on 4 GPUs; it restarts them, re-applying its mutation, when it
    next needs them), then ``user``'s own ranks of other world sizes (a mutated pool's one-rank
    oracle candidate needs a GPU that its tp2 ranks hold on 2 GPUs). CPU ranks are processes:
    there is always room."""
    if user.device != "cuda":
        return
    limit = available_devices(user.device) or 0
    needed = user.devices_to_start(world_size)
    if not needed:
        return

    def held() -> int:
        return user.devices_held() + (other.devices_held() if other is not user else 0)

    if other is not user and held() + needed > limit:
        other.close()
    for ws in sorted(user.world_sizes(), reverse=True):
        if held() + needed <= limit:
            break
        if ws != world_size:
            user.drop(ws)
