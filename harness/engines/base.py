"""The engine interface: what the harness asks of any engine under test.

An engine is built on each rank from a ``BuildSpec`` (a checkpoint and a setup, in the engine's
own terms) and then serves batches of requests: greedy generation returning, per request, the
tokens, the chosen tokens' logprobs and each step's top-k (``RequestOutput``), and, for the
localizer, the activations of the requests' prefill per decoder layer. Everything above the
worker (planning, orchestration, comparison, localization, reports) sees only this interface and
the ``EngineKind`` of a setup; it never asks which engine it drives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from reference_impl.requests import Request, RequestOutput

if TYPE_CHECKING:
    from harness.setup import ParallelSetup
    from reference_impl.runner import EngineConfig


class BuildSpec(Protocol):
    """What every rank needs to build its part of an engine; identical on every rank, hashable
    (workers keep engines per spec) and picklable (it travels to Ray actors and processes)."""

    @property
    def checkpoint(self) -> str: ...

    @property
    def tp(self) -> int: ...

    @property
    def device(self) -> str: ...

    @property
    def world_size(self) -> int: ...

    def validate(self, num_devices: int | None = None) -> None:
        """Raise ``ValueError`` for a layout this engine cannot take here, before any rank starts."""
        ...


class Engine(Protocol):
    """One rank's engine, built from a ``BuildSpec``."""

    def generate(self, requests: Sequence[Request]) -> list[RequestOutput]:
        """Greedy generation for every request (``Request``: token ids, prompt-embeds or ids with
        images; ``forced_tokens`` teacher-forces the chosen ids), outputs in request order."""
        ...

    def capture_prefill(self, requests: Sequence[Request]) -> dict[str, torch.Tensor]:
        """The requests' prefill with activation capture: ``"<layer>.residual"`` (the residual
        stream after the attention add) and ``"<layer>.hidden_states"`` (the normed MLP input),
        each ``(tokens, hidden)`` full length over the requests' rows in order; ``"num_tokens"``
        (the step's padded size) and ``"offsets"`` (each request's first row, then the end). Only
        one TP rank per stage need answer; the others return ``{}``."""
        ...

    def compiled_steps(self) -> list[dict[str, Any]]:
        """Per compiled step graph run by the last ``generate``: its SP matches and collectives
        (``reference_impl.compile``); ``[]`` for an engine that compiles nothing."""
        ...

    def compile_records(self) -> list[dict[str, object]]:
        """What the compile passes did to every graph of this engine; ``[]`` when none."""
        ...

    def weight_bytes(self) -> int:
        """Bytes of the weights this rank holds (its shards under TP, its stage's under PP)."""
        ...


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters ``model`` holds on this rank (a tied one once): of a ``DTensor``
    (transformers' TP) its local shard, whose global size ``numel`` would give."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total


@dataclass(frozen=True)
class EngineKind:
    """An engine the harness can drive, as the planner and the orchestrator see it.

    name: the ``--engine`` value and the setup id suffix (``tp2-eager@transformers``; the
    reference engine's ids have none). code_paths: traceback path fragments of this engine's code
    (an exception raised through them is the engine's ``fail``, not an infrastructure ``error``).
    unsupported: why a setup cannot run on this engine (a skip reason), or None. spec: the
    ``BuildSpec`` of a setup on a checkpoint (with the reference engine's batching limits, which
    other engines may ignore). identity: what besides the checkpoint, requests and spec
    determines this engine's outputs (versions and adapter source; the baseline cache's key).
    """

    name: str
    description: str
    code_paths: tuple[str, ...]
    spec_type: type
    unsupported: Callable[[ParallelSetup], str | None]
    spec: Callable[[ParallelSetup, str, EngineConfig | None], BuildSpec]
    build: Callable[[Any, torch.device], Engine]
    identity: Callable[[], str]
