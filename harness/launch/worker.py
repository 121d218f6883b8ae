"""One rank: joins the process group once, builds engines for specs, runs requests.

The engine is whichever the spec names by its type (``harness.engines``: the reference engine
for an ``EngineSpec``, transformers' TP for a ``TransformersSpec``); the worker drives it only
through the ``Engine`` interface.

A launcher drives a worker by operation name; the worker runs only the operations it
catalogues (``Worker.OPERATIONS``), never a function named by the caller."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from harness.engines import BuildSpec, Engine, build_engine
from harness.launch.base import RankReport
from reference_impl.engine import local_device
from reference_impl.requests import Request, RequestOutput

# A collective that waits longer than this is a hang (a peer died or diverged), not slowness.
# A backstop only: the driver's per-case timeout (``harness.timeouts``, 90 s or more) fires
# first and reports every rank's stack; this ends a collective whose driver is gone.
COLLECTIVE_TIMEOUT = timedelta(seconds=900)
# Engines kept per worker: a case's candidate and its baseline.
ENGINE_CACHE_SIZE = 2


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far: ``VmHWM`` of ``/proc/self/status`` (Linux).
    Not ``getrusage``'s ``ru_maxrss``, which keeps the peak of the process it was forked from
    across ``exec`` (a rank started by a 500 MB driver would report at least 500 MB); 0 where
    the file is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Worker:
    """A rank's long-lived state: the process group (kept across cases) and the last engine."""

    # What a launcher may ask of a worker (``dispatch``): the methods below, and nothing else.
    OPERATIONS: ClassVar[frozenset[str]] = frozenset(
        {"load", "generate", "capture", "compile_records", "ping", "mutate", "close"})

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int,
                 device: str) -> None:
        torch.set_num_threads(1)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.rank, self.world_size, self.device_kind = rank, world_size, device
        self.device = local_device(device, rank)
        if device == "cuda":
            torch.cuda.set_device(self.device)
        if world_size > 1:
            dist.init_process_group(
                "nccl" if device == "cuda" else "gloo",
                init_method=f"tcp://{master_addr}:{master_port}",
                rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT,
            )
        self._engines: dict[BuildSpec, Engine] = {}  # most recently used last
        self._engine: Engine | None = None

    def engine(self, spec: BuildSpec) -> Engine:
        """The engine for ``spec``; the last ``ENGINE_CACHE_SIZE`` engines (a candidate and its
        baseline, with their compiled graphs) are kept, so alternating between them is free."""
        if spec.world_size != self.world_size:
            raise ValueError(f"spec needs {spec.world_size} ranks; this worker pool has {self.world_size}")
        engine = self._engines.pop(spec, None)
        if engine is None:
            while len(self._engines) >= ENGINE_CACHE_SIZE:
                self._engines.pop(next(iter(self._engines)))
            engine = build_engine(spec, self.device)
        self._engines[spec] = engine
        self._engine = engine
        return engine

    def load(self, spec: BuildSpec) -> None:
        """Build the engine for ``spec`` ahead of ``generate`` (to time or warm it)."""
        self.engine(spec)

    def generate(self, spec: BuildSpec, requests: Sequence[Request]
                 ) -> tuple[list[RequestOutput] | None, RankReport]:
        """Every rank serves the requests; rank 0 returns the outputs, and every rank its
        ``RankReport`` (the tokens it recorded, the compiled steps it ran)."""
        engine = self.engine(spec)
        outputs = engine.generate(requests)
        report = RankReport(self.rank, tuple(tuple(o.token_ids) for o in outputs), tuple(engine.compiled_steps()),
                            peak_rss_bytes(), engine.weight_bytes())
        return (outputs if self.rank == 0 else None), report

    def capture(self, spec: BuildSpec, requests: Sequence[Request]) -> dict[str, torch.Tensor]:
        """This rank's activations of the requests' prefill (TP rank 0 of each stage answers;
        the others return nothing, their tensors being the same after the gather)."""
        captured = self.engine(spec).capture_prefill(requests)
        tp_rank = self.rank % spec.tp
        return captured if tp_rank == 0 else {}

    def compile_records(self) -> list[dict[str, object]]:
        """What the compile passes did to every graph of the current engine."""
        return self._engine.compile_records() if self._engine else []

    def dispatch(self, operation: str, *args: Any) -> Any:
        """Run the catalogued ``operation`` (``OPERATIONS``) with ``args``; any other name, a
        method of this class or not, is refused with ``ValueError``."""
        if operation not in self.OPERATIONS:
            raise ValueError(f"{operation!r} is not a worker operation; the operations are "
                             f"{', '.join(sorted(self.OPERATIONS))}")
        return getattr(self, operation)(*args)

    def ping(self) -> int:
        return self.rank

    def mutate(self, name: str) -> None:
        """Apply the catalog mutation ``name`` in this rank's process; when it acts at engine
        construction or compile time, drop the cached engines so the next run rebuilds them."""
        from harness.mutations import get_mutation

        mutation = get_mutation(name)
        mutation.load()(self)
        if mutation.needs_rebuild:
            self._engines.clear()
            self._engine = None

    def close(self) -> None:
        self._engine = None
        self._engines.clear()
        if dist.is_initialized():
            dist.destroy_process_group()
