"""The model behind ``torch.compile`` with the parity backend, as the runner's ``model_fn``."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch._dynamo

from reference_impl.compile.backend import GraphCompiler
from reference_impl.compile.config import COLLECTIVES, SP_PATTERNS, CompileConfig, sp_active
from reference_impl.compile.passes import NoOpEliminationPass, PassManager, SequenceParallelismPass
from reference_impl.model import CausalLM, IntermediateTensors
from reference_impl.parallel.groups import ParallelState
from reference_impl.runner import StepBatch

# Each (padded size, input kind) is one Dynamo compile: raise the recompile limits above the
# number of buckets x kinds so Dynamo never silently falls back to eager.
DYNAMO_RECOMPILE_LIMIT = 256


class CompiledModel:
    """Calls the model through ``torch.compile``; SP is applied to the graphs of steps for which
    ``sp_active`` holds, so the runner's hand-off predicate and the graph always agree."""

    def __init__(self, model: CausalLM, config: CompileConfig, state: ParallelState,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.model, self.config, self.state = model, config, state
        self.sp_pass: SequenceParallelismPass | None = None
        if config.sp and state.tp > 1:
            self.sp_pass = SequenceParallelismPass(state.tp, state.tp_rank, state.tp_group_name,
                                                   dtype, device)
        self.compiler = GraphCompiler(config, self.passes_for)
        # (input kind, padded token count) of every step run since the last ``reset_steps``.
        self.steps_run: list[tuple[str, int]] = []
        _raise_recompile_limits()
        self.fn = torch.compile(self._forward, backend=self.compiler, fullgraph=True, dynamic=False)

    def passes_for(self, num_tokens: int) -> PassManager:
        passes: list[Any] = []
        if self.sp_pass is not None and sp_active(num_tokens, self.state.tp, self.config):
            passes.append(self.sp_pass)
        passes.append(NoOpEliminationPass())
        return PassManager(passes)

    def _forward(
        self, positions: torch.Tensor, input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None, hidden: torch.Tensor | None, residual: torch.Tensor | None,
    ) -> Any:
        intermediate = None if hidden is None or residual is None else IntermediateTensors(hidden, residual)
        out = self.model(positions, input_ids, inputs_embeds, intermediate)
        if isinstance(out, IntermediateTensors):
            return out.hidden_states, out.residual
        return out

    def __call__(self, batch: StepBatch, intermediate: IntermediateTensors | None
                 ) -> torch.Tensor | IntermediateTensors:
        if intermediate is not None:
            self.compiler.label = "intermediate"
            out = self.fn(batch.positions, None, None, intermediate.hidden_states, intermediate.residual)
        elif batch.inputs_embeds is not None:
            self.compiler.label = "embeds"
            out = self.fn(batch.positions, None, batch.inputs_embeds, None, None)
        else:
            self.compiler.label = "ids"
            out = self.fn(batch.positions, batch.input_ids, None, None, None)
        self.steps_run.append((self.compiler.label, batch.num_tokens))
        if isinstance(out, tuple):
            return IntermediateTensors(out[0], out[1])
        assert isinstance(out, torch.Tensor)
        return out


def reset_steps(model_fn: object) -> None:
    """Forget the steps run so far (a worker calls it before each generation it reports on)."""
    if isinstance(model_fn, CompiledModel):
        model_fn.steps_run.clear()


def steps_report(model_fn: object) -> list[dict[str, Any]]:
    """Per distinct compiled step run since ``reset_steps`` (input kind, padded size): each of its
    graph pieces with the SP matches by pattern and the collectives left after the passes.
    Empty for an eager engine. This is what tells a sequence-parallel case that really ran SP
    from one whose pass matched nothing (which would equal its baseline and pass vacuously)."""
    if not isinstance(model_fn, CompiledModel):
        return []
    report = []
    for label, num_tokens in dict.fromkeys(model_fn.steps_run):
        pieces = [r for r in model_fn.compiler.records
                  if r.graph.split("/")[0] == label and r.num_tokens == num_tokens]
        report.append({
            "input": label, "num_tokens": num_tokens,
            "sp_active": sp_active(num_tokens, model_fn.state.tp, model_fn.config),
            "pieces": [{"graph": r.graph,
                        "sp_matches": {p: r.changes.get(f"sequence_parallelism.{p}", 0) for p in SP_PATTERNS},
                        "collectives": {k: r.ops_after.get(op, 0) for k, op in COLLECTIVES.items()}}
                       for r in pieces],
        })
    return report


def compile_records(model_fn: object) -> list[dict[str, object]]:
    """What the passes did to each graph compiled so far, as plain data (for tests, reports)."""
    if not isinstance(model_fn, CompiledModel):
        return []
    return [dataclasses.asdict(r) for r in model_fn.compiler.records]


def _raise_recompile_limits() -> None:
    cfg: Any = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), DYNAMO_RECOMPILE_LIMIT))
