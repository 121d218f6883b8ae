"""The launcher protocol shared by the multiprocessing and Ray launchers."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any, Protocol

from reference_impl.engine import EngineSpec
from reference_impl.requests import Request, RequestOutput


class WorkerError(RuntimeError):
    """A rank raised (or died); carries the rank and its traceback text."""

    def __init__(self, rank: int, detail: str) -> None:
        super().__init__(f"rank {rank} failed:\n{detail}")
        self.rank = rank
        self.detail = detail


class Launcher(Protocol):
    """Runs an engine spec over ``world_size`` ranks and returns rank 0's outputs."""

    world_size: int

    def call(self, method: str, *args: Any) -> list[Any]:
        """``Worker.method(*args)`` on every rank; replies in rank order."""
        ...

    def run(self, spec: EngineSpec, requests: Sequence[Request]) -> list[RequestOutput]: ...

    def close(self) -> None: ...


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port
