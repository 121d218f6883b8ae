"""The launcher protocol shared by the multiprocessing and Ray launchers."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from harness.engines.base import BuildSpec
from reference_impl.requests import Request, RequestOutput

# How a rank failed: its code raised (``detail`` is the traceback), its process died, it gave no
# reply in time, or the launcher could not start it.
FAILURE_KINDS = ("raised", "died", "timeout", "startup")


class WorkerError(RuntimeError):
    """A rank raised (or died); carries the rank, how it failed and its traceback text."""

    def __init__(self, rank: int, detail: str, kind: str = "raised") -> None:
        if kind not in FAILURE_KINDS:
            raise ValueError(f"failure kind {kind!r} not in {FAILURE_KINDS}")
        super().__init__(f"rank {rank} failed ({kind}):\n{detail}")
        self.rank = rank
        self.detail = detail
        self.kind = kind


@dataclass(frozen=True)
class RankReport:
    """What one rank saw of a generation: the token ids it recorded per request (every rank
    records the sampled tokens, so TP ranks that disagree show here) and, for a compiled engine,
    each compiled step it ran with its SP matches and collectives (``steps_report``); and its
    memory: the process's peak resident set so far and the bytes of the weights it holds."""

    rank: int
    token_ids: tuple[tuple[int, ...], ...]
    steps: tuple[dict[str, Any], ...] = ()
    peak_rss_bytes: int = 0
    weight_bytes: int = 0


@dataclass(frozen=True)
class EngineRun:
    """A generation over every rank: rank 0's outputs and every rank's report, in rank order."""

    outputs: list[RequestOutput]
    ranks: tuple[RankReport, ...]

    @classmethod
    def from_replies(cls, replies: Sequence[tuple[list[RequestOutput] | None, RankReport]]) -> EngineRun:
        """From ``Worker.generate``'s replies in rank order (rank 0's carries the outputs)."""
        outputs = replies[0][0]
        if outputs is None:
            raise ValueError("rank 0 returned no outputs")
        return cls(outputs, tuple(report for _, report in replies))


class Launcher(Protocol):
    """Runs an engine spec over ``world_size`` ranks and returns rank 0's outputs."""

    world_size: int

    def call(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        """The worker operation ``method`` (``Worker.dispatch``) on every rank; replies in rank
        order. A call still running after ``timeout`` seconds (default: the launcher's) is a hang:
        ``WorkerError`` of kind ``timeout`` with every rank's stack, and every rank is stopped."""
        ...

    def run(self, spec: BuildSpec, requests: Sequence[Request]) -> list[RequestOutput]: ...

    def run_traced(self, spec: BuildSpec, requests: Sequence[Request], timeout: float | None = None) -> EngineRun: ...

    def close(self) -> None: ...

    def abort(self) -> None:
        """Stop every rank now, without asking it to leave (Ctrl-C)."""
        ...


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port
