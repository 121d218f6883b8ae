"""Pipeline plumbing for the runner: hand-off of ``IntermediateTensors`` between stages and the
broadcast of sampled tokens from the last stage to every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist

from reference_impl.compile.config import CompileConfig, sp_active
from reference_impl.model import IntermediateTensors
from reference_impl.parallel import collectives
from reference_impl.parallel.groups import ParallelState
from reference_impl.runner import SampledTokens, StepBatch


class PipelineComm:
    """``StageComm`` over torch.distributed point-to-point (TP peer to TP peer) and broadcast."""

    def __init__(self, state: ParallelState, hidden_size: int, dtype: torch.dtype,
                 device: torch.device, compile_config: CompileConfig | None = None) -> None:
        self.state = state
        self.compile_config = compile_config or CompileConfig()
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device
        self.is_first = state.is_first_stage
        self.is_last = state.is_last_stage

    def recv_intermediate(self, batch: StepBatch) -> IntermediateTensors | None:
        if self.is_first:
            return None
        src = self.state.stage_rank(self.state.pp_rank - 1)
        shape = (batch.num_tokens, self.hidden_size)
        hidden = torch.empty(shape, dtype=self.dtype, device=self.device)
        residual = torch.empty(shape, dtype=self.dtype, device=self.device)
        dist.recv(hidden, src=src)
        dist.recv(residual, src=src)
        return IntermediateTensors(hidden, residual)

    def residual_scattered(self, num_tokens: int) -> bool:
        """Is the residual this stage's graph hands out token-sharded? Exactly when SP ran on
        the graph of a step of this size (``sp_active``, SP token threshold included)."""
        return sp_active(num_tokens, self.state.tp, self.compile_config)

    def gather_residual(self, residual: torch.Tensor) -> torch.Tensor:
        """(T / tp, H) token shard -> (T, H), shards in rank order."""
        assert self.state.tp_group is not None
        return collectives.all_gather(residual, self.state.tp, self.state.tp_group_name)

    def send_intermediate(self, batch: StepBatch, out: IntermediateTensors) -> None:
        """Both tensors go out full length, ``(T, H)`` (``sync_and_gather_intermediate_tensors``)."""
        residual = out.residual
        if self.residual_scattered(batch.num_tokens):
            residual = self.gather_residual(residual)
        for name, t in (("hidden_states", out.hidden_states), ("residual", residual)):
            if t.shape[0] != batch.num_tokens:
                raise RuntimeError(
                    f"pipeline hand-off: {name} has {t.shape[0]} rows for a {batch.num_tokens}-token "
                    "step; the scattered-residual predicate disagrees with the compiled graph"
                )
        dst = self.state.stage_rank(self.state.pp_rank + 1)
        dist.send(out.hidden_states.contiguous(), dst=dst)
        dist.send(residual.contiguous(), dst=dst)

    def broadcast_samples(self, samples: SampledTokens | None, n: int, k: int, m: int = 0) -> SampledTokens:
        if self.state.pp == 1:
            assert samples is not None
            return samples
        src = self.state.stage_rank(self.state.pp - 1)
        scored = torch.empty((m, 2), dtype=torch.float64, device=self.device)  # logprob, greedy
        if m:
            if samples is not None:
                scored[:, 0] = samples.prompt_logprobs
                scored[:, 1] = samples.prompt_greedy
            dist.broadcast(scored, src=src, group=self.state.pp_group)
        # One float64 buffer (ids are exact in float64): (n, 2 + 2k).
        buf = torch.empty((n, 2 + 2 * k), dtype=torch.float64, device=self.device)
        if samples is not None:
            buf[:, 0] = samples.ids
            buf[:, 1] = samples.logprobs
            buf[:, 2:2 + k] = samples.top_ids
            buf[:, 2 + k:] = samples.top_logprobs
        dist.broadcast(buf, src=src, group=self.state.pp_group)
        if samples is not None:
            return samples
        return SampledTokens(buf[:, 0].long(), buf[:, 1].float(), buf[:, 2:2 + k].long(),
                             buf[:, 2 + k:].float(), scored[:, 0].float(), scored[:, 1] > 0.5)
