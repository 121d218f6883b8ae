"""``InProcessLauncher``: the single-rank engine in the driver's own process (tp = pp = 1)."""

from __future__ import annotations

import contextlib
import signal
import threading
import traceback
from collections.abc import Iterator, Sequence
from types import FrameType
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
        """``Worker.dispatch`` in this process. ``timeout`` (seconds) stops a call that runs too
        long with a ``WorkerError`` of kind ``timeout`` carrying where it was; the engine is then
        dropped (its state is half-updated). The stop is a ``SIGALRM`` timer, which only the main
        thread receives: from another thread the call runs without a limit."""
        if self._worker is None:
            self._worker = Worker(0, 1, "127.0.0.1", 0, self.device)
        try:
            with _alarm(timeout):
                return [self._worker.dispatch(method, *args)]
        except _CallTimeout as exc:
            self.close()
            raise WorkerError(0, f"rank 0 (in-process) still running after {timeout:.0f} s; where it was:\n"
                                 f"{exc.stack}", kind="timeout") from None
        except Exception as exc:
            raise WorkerError(0, traceback.format_exc()) from exc

    def run_traced(self, spec: BuildSpec, requests: Sequence[Request], timeout: float | None = None) -> EngineRun:
        spec.validate()
        if spec.world_size != 1:
            raise ValueError(f"spec needs {spec.world_size} ranks; the in-process launcher has 1")
        return EngineRun.from_replies(self.call("generate", spec, list(requests), timeout=timeout))

    def run(self, spec: BuildSpec, requests: Sequence[Request]) -> list[RequestOutput]:
        """``run_traced``'s outputs (rank 0's)."""
        return self.run_traced(spec, requests).outputs

    def abort(self) -> None:
        self.close()

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None


class _CallTimeout(BaseException):
    """Raised inside the engine by the timer; a BaseException so that the engine's own
    ``except Exception`` clauses do not swallow it."""

    def __init__(self, stack: str) -> None:
        super().__init__("in-process call timed out")
        self.stack = stack


@contextlib.contextmanager
def _alarm(timeout: float | None) -> Iterator[None]:
    """Raise ``_CallTimeout`` in this (main) thread after ``timeout`` seconds."""
    if timeout is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: FrameType | None) -> None:
        raise _CallTimeout("".join(traceback.format_stack(frame)))

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(timeout, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
