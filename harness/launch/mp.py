"""``MpLauncher``: one torch.multiprocessing process per rank, loopback TCP rendezvous.

Each process builds a ``Worker`` and serves calls sent over a pipe. A rank that raises sends
its traceback back; a rank that dies is noticed by polling, and reported with its exit signal,
its memory and its last output lines (``postmortem``); a call that outlives its timeout is
reported with every rank's Python stack. Either way the driver tears every process down (the
others may be stuck in a collective) and raises ``WorkerError``; the next call starts new ones.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn

import torch.multiprocessing as mp

from harness.engines.base import BuildSpec
from harness.launch.base import EngineRun, WorkerError, free_port
from harness.launch.postmortem import LOST_PEER, RankWatch, prepare_rank
from reference_impl.requests import Request, RequestOutput

# How long the driver waits for one call on all ranks when the caller names no timeout (the
# orchestrator names one per case: ``harness.plan.case_timeout``).
CALL_TIMEOUT_S = 600.0
# How long the ranks get to start: spawn, import torch, join the process group. ~5 s on an idle
# 2-core machine; a machine whose cores are busy with other work has taken several times that.
STARTUP_TIMEOUT_S = 300.0
# How long ``close`` lets the ranks leave the process group before they are killed.
CLOSE_TIMEOUT_S = 10.0
# After a rank raised a communication error: how long to look for a peer that died, whose death
# is then the cause reported (a SIGKILLed rank makes its gloo peers raise at once).
PEER_GRACE_S = 1.0
_POLL_S = 0.05
# How often a rank checks that the driver that started it is still there.
_ORPHAN_POLL_S = 1.0


def _exit_when_orphaned() -> None:
    """A daemon thread ending the rank process when its driver is gone (killed with SIGKILL: no
    one is left to stop it, and a hung rank would otherwise live on)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_ORPHAN_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parity-orphan-watch", daemon=True).start()


def _serve(rank: int, world_size: int, port: int, device: str, conn: Connection, log_dir: str | None = None) -> None:
    """Process body: build the worker, then answer ``(method, args)`` calls until ``close``."""
    if log_dir is not None:
        prepare_rank(log_dir, rank)
    # The driver started this process with SIGINT blocked (``_start``): ignore it for good (the
    # driver owns Ctrl-C), then unblock; a Ctrl-C that came during start-up is dropped here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _exit_when_orphaned()
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
        self.watch: RankWatch | None = None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self.watch = RankWatch(Path(tempfile.mkdtemp(prefix="parity-ranks-")))
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, daemon=True,
                               args=(rank, self.world_size, port, self.device, child, str(self.watch.log_dir)))
            # A rank starts with SIGINT blocked (a child inherits the mask), so a Ctrl-C to the
            # terminal's process group cannot interrupt its start-up before it ignores SIGINT;
            # the driver's own Ctrl-C is only deferred until the mask is restored.
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                proc.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            self._procs.append(proc)
            self._conns.append(parent)
            assert proc.pid is not None  # set by start()
            self.watch.pids[rank] = proc.pid
        self._collect(STARTUP_TIMEOUT_S)

    def pids(self) -> list[int]:
        """The rank processes' ids, in rank order (empty before the first call)."""
        return [proc.pid for proc in self._procs]

    def _collect(self, timeout: float = CALL_TIMEOUT_S) -> list[Any]:
        """Each rank's reply; on any error, death or timeout, stop everything and raise."""
        results: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        assert self.watch is not None
        self.watch.arm()
        while len(results) < self.world_size:
            for rank, (proc, conn) in enumerate(zip(self._procs, self._conns)):
                if rank in results:
                    continue
                if conn.poll():
                    try:
                        status, value = conn.recv()
                    except (EOFError, OSError):  # the pipe closed: the process is dying
                        proc.join(timeout=5)
                        self._died(rank)
                    if status == "error":
                        self._raised(rank, value)
                    results[rank] = value
                elif not proc.is_alive():
                    self._died(rank)
            if time.monotonic() > deadline:
                self._timed_out(sorted(set(range(self.world_size)) - set(results)), timeout)
            self.watch.sample()
            time.sleep(_POLL_S)
        return [results[r] for r in range(self.world_size)]

    def _dead_peer(self, grace: float) -> int | None:
        """A rank whose process has ended (within ``grace`` seconds), or None."""
        deadline = time.monotonic() + grace
        while True:
            for rank, proc in enumerate(self._procs):
                if not proc.is_alive():
                    return rank
            if time.monotonic() >= deadline:
                return None
            time.sleep(_POLL_S)

    def _raised(self, rank: int, text: str) -> NoReturn:
        """Rank ``rank`` raised: if it lost a peer that died, the death is the failure to report."""
        dead = self._dead_peer(PEER_GRACE_S if LOST_PEER.search(text) else 0.0)
        if dead is not None and dead != rank:
            last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "")
            self._died(dead, f"\n(rank {rank} then raised: {last.strip()})")
        self._fail(rank, text, "raised")

    def _died(self, rank: int, note: str = "") -> NoReturn:
        assert self.watch is not None
        proc = self._procs[rank]
        proc.join(timeout=1)
        self._fail(rank, self.watch.describe_death(rank, proc.exitcode) + note, "died")

    def _timed_out(self, silent: list[int], timeout: float) -> NoReturn:
        assert self.watch is not None
        self.watch.sample(force=True)
        stacks = self.watch.describe_stacks()
        detail = (f"no reply from ranks {silent} within {timeout:.0f}s (the case timeout); every rank's "
                  f"Python stack at that moment:\n{stacks}")
        self._fail(silent[0] if len(silent) == 1 else -1, detail, "timeout")

    def _fail(self, rank: int, detail: str, kind: str) -> NoReturn:
        self._kill()
        raise WorkerError(rank, detail, kind)

    def call(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        """The worker operation ``method`` (``Worker.dispatch``) on every rank; replies in rank
        order. ``timeout``: seconds for the call (default ``CALL_TIMEOUT_S``)."""
        if not self._procs:
            self._start()
        for conn in self._conns:
            conn.send((method, args))
        return self._collect(CALL_TIMEOUT_S if timeout is None else max(timeout, 1.0))

    def run_traced(self, spec: BuildSpec, requests: Sequence[Request], timeout: float | None = None) -> EngineRun:
        spec.validate()
        if spec.world_size != self.world_size:
            raise ValueError(f"spec needs {spec.world_size} ranks; this launcher has {self.world_size}")
        return EngineRun.from_replies(self.call("generate", spec, list(requests), timeout=timeout))

    def run(self, spec: BuildSpec, requests: Sequence[Request]) -> list[RequestOutput]:
        """``run_traced``'s outputs (rank 0's)."""
        return self.run_traced(spec, requests).outputs

    def _kill(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join(timeout=5)
        self._procs, self._conns = [], []
        if self.watch is not None:
            shutil.rmtree(self.watch.log_dir, ignore_errors=True)
            self.watch = None

    def abort(self) -> None:
        """Kill every rank now, without asking them to leave (Ctrl-C)."""
        self._kill()

    def close(self) -> None:
        if self._procs:
            try:
                self.call("close", timeout=CLOSE_TIMEOUT_S)
            except (WorkerError, OSError):  # already dead or gone: kill what is left
                pass
            self._kill()

    def __enter__(self) -> MpLauncher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
