"""The engines the harness can drive, by name (``--engine``), and the building of one on a rank.

Nothing above the worker knows which engine it drives: the planner asks a setup's ``EngineKind``
what it cannot express and for its ``BuildSpec``; the worker builds whatever engine the spec's
type names; the orchestrator asks the kind for its code paths (who raised) and its identity
(baseline cache). Heavy imports (transformers) happen only when a rank builds the engine.
"""

from __future__ import annotations

from typing import Any

import torch

from harness.engines import reference, transformers_tp
from harness.engines.base import BuildSpec, Engine, EngineKind
from reference_impl.engine import EngineSpec

DEFAULT_ENGINE = reference.NAME


def _build_reference(spec: Any, device: torch.device) -> Engine:
    return reference.ReferenceEngine.build(spec, device)


def _build_transformers(spec: Any, device: torch.device) -> Engine:
    from harness.engines.transformers_engine import TransformersEngine

    return TransformersEngine.build(spec, device)


ENGINES: dict[str, EngineKind] = {
    k.name: k for k in (
        EngineKind(reference.NAME, "parity's own vLLM-shaped engine (reference_impl): TP, PP, SP, compile modes",
                   reference.CODE_PATHS, EngineSpec, reference.unsupported,
                   lambda setup, checkpoint, limits: setup.engine_spec(checkpoint, limits),
                   _build_reference, reference.identity),
        EngineKind(transformers_tp.NAME, "Hugging Face transformers' tensor parallelism "
                   "(from_pretrained tp_plan='auto'), eager, its own forward passes and KV cache",
                   transformers_tp.CODE_PATHS, transformers_tp.TransformersSpec, transformers_tp.unsupported,
                   transformers_tp.spec_for, _build_transformers, transformers_tp.identity),
    )
}


def get_engine(name: str) -> EngineKind:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}: choose from {', '.join(ENGINES)}")
    return ENGINES[name]


def kind_of(spec: BuildSpec) -> EngineKind:
    """The engine a spec builds (each engine has its own spec type)."""
    for kind in ENGINES.values():
        if isinstance(spec, kind.spec_type):
            return kind
    raise ValueError(f"{type(spec).__name__} is no engine's spec; the engines are {', '.join(ENGINES)}")


def build_engine(spec: BuildSpec, device: torch.device) -> Engine:
    """This rank's engine for ``spec`` (needs the default process group when it spans ranks)."""
    return kind_of(spec).build(spec, device)


__all__ = ["DEFAULT_ENGINE", "ENGINES", "BuildSpec", "Engine", "EngineKind", "build_engine", "get_engine",
           "kind_of"]
