"""``InProcessLauncher``: the single-rank engine in the driver's own process (tp = pp = 1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from harness.engines.base import BuildSpec
from harness.launch.base import EngineRun, WorkerError
from harness.launch.worker import Worker
from reference_impl.requests import Request, RequestOutput


class InProcessLauncher:
    """World size 1: no processes to start; exceptions still come back as ``WorkerError``."""

    world_size = 1

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._worker: Worker | None = None

    def call(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        """``Worker.dispatch`` in this process (``timeout`` cannot apply: nothing here can be
        stopped from outside; one device's engine has no collective to hang in)."""
        if self._worker is None:
            self._worker = Worker(0, 1, "127.0.0.1", 0, self.device)
        try:
            return [self._worker.dispatch(method, *args)]
        except Exception as exc:
            import traceback

            raise WorkerError(0, traceback.format_exc()) from exc

    def run_traced(self, spec: BuildSpec, requests: Sequence[Request], timeout: float | None = None) -> EngineRun:
        spec.validate()
        if spec.world_size != 1:
            raise ValueError(f"spec needs {spec.world_size} ranks; the in-process launcher has 1")
        return EngineRun.from_replies(self.call("generate", spec, list(requests)))

    def run(self, spec: BuildSpec, requests: Sequence[Request]) -> list[RequestOutput]:
        """``run_traced``'s outputs (rank 0's)."""
        return self.run_traced(spec, requests).outputs

    def abort(self) -> None:
        self.close()

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None
