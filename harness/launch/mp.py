"""``MpLauncher``: one torch.multiprocessing process per rank, loopback TCP rendezvous.

Each process builds a ``Worker`` and serves calls sent over a pipe. A rank that raises sends
its traceback back; a rank that dies is noticed by polling. Either way the driver tears every
process down (the others may be stuck in a collective) and raises ``WorkerError``.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import torch.multiprocessing as mp

from harness.launch.base import EngineRun, WorkerError, free_port
from reference_impl.engine import EngineSpec
from reference_impl.requests import Request, RequestOutput

# How long the driver waits for one call on all ranks before declaring a hang. Generous: the
# Worker's own collective timeout (120 s) fires first for a stuck collective.
CALL_TIMEOUT_S = 600.0
_POLL_S = 0.05


def _serve(rank: int, world_size: int, port: int, device: str, conn: Connection) -> None:
    """Process body: build the worker, then answer ``(method, args)`` calls until ``close``."""
    from harness.launch.worker import Worker

    try:
        worker = Worker(rank, world_size, "127.0.0.1", port, device)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    while True:
        method, args = conn.recv()
        try:
            result = worker.dispatch(method, *args)
            conn.send(("ok", result))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
            continue
        if method == "close":
            return


class MpLauncher:
    """A pool of ``world_size`` rank processes, reused across ``run`` calls."""

    def __init__(self, world_size: int, device: str = "cpu") -> None:
        self.world_size, self.device = world_size, device
        self._procs: list[Any] = []
        self._conns: list[Connection] = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(rank, self.world_size, port, self.device, child),
                               daemon=True)
            proc.start()
            self._procs.append(proc)
            self._conns.append(parent)
        self._collect()

    def _collect(self, timeout: float = CALL_TIMEOUT_S) -> list[Any]:
        """Each rank's reply; on any error or death, stop everything and raise."""
        results: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(results) < self.world_size:
            for rank, (proc, conn) in enumerate(zip(self._procs, self._conns)):
                if rank in results:
                    continue
                if conn.poll():
                    status, value = conn.recv()
                    if status == "error":
                        self._kill()
                        raise WorkerError(rank, value, "raised")
                    results[rank] = value
                elif not proc.is_alive():
                    code = proc.exitcode
                    self._kill()
                    raise WorkerError(rank, f"process exited with code {code} without replying", "died")
            if time.monotonic() > deadline:
                self._kill()
                silent = sorted(set(range(self.world_size)) - set(results))
                raise WorkerError(-1, f"no reply from ranks {silent} within {timeout:.0f}s", "timeout")
            time.sleep(_POLL_S)
        return [results[r] for r in range(self.world_size)]

    def call(self, method: str, *args: Any) -> list[Any]:
        """The worker operation ``method`` (``Worker.dispatch``) on every rank; replies in rank order."""
        if not self._procs:
            self._start()
        for conn in self._conns:
            conn.send((method, args))
        return self._collect()

    def run_traced(self, spec: EngineSpec, requests: Sequence[Request]) -> EngineRun:
        spec.validate()
        if spec.world_size != self.world_size:
            raise ValueError(f"spec needs {spec.world_size} ranks; this launcher has {self.world_size}")
        return EngineRun.from_replies(self.call("generate", spec, list(requests)))

    def run(self, spec: EngineSpec, requests: Sequence[Request]) -> list[RequestOutput]:
        """``run_traced``'s outputs (rank 0's)."""
        return self.run_traced(spec, requests).outputs

    def _kill(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join(timeout=5)
        self._procs, self._conns = [], []

    def close(self) -> None:
        if self._procs:
            try:
                self.call("close")
            except (WorkerError, OSError):  # already dead or gone: kill what is left
                pass
            self._kill()

    def __enter__(self) -> MpLauncher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

