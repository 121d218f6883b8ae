"""The catalog's patches: one function per mutation, ``<name with underscores>(worker)``.

Each patch monkeypatches a module attribute or a class method of the engine in the calling
process only (a worker rank's, via ``Worker.mutate``); the engine itself carries no bug flags.
Every patch wraps or replaces the *original* attribute, remembered the first time it is patched,
so applying a patch twice is the same as applying it once. ``restore_all`` undoes every patch of
this process (for single-process tests; engines built while patched stay as they were built).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

# Original attributes, by (owner, name): filled on the first patch of each, emptied by restore_all.
_ORIGINALS: dict[tuple[object, str], Any] = {}

# The epsilon the buggy SP replacements hard-code.
HARDCODED_EPS = 1e-6
SP_REPLACEMENTS = ("first_replacement", "middle_replacement", "final_replacement",
                   "middle_bias_replacement", "final_bias_replacement")


def _install(owner: object, attr: str, make: Callable[[Any], Any]) -> None:
    """Set ``owner.attr`` to ``make(original)``, where ``original`` is the attribute before any
    patch (so a second application rebuilds the same replacement instead of wrapping it again)."""
    key = (owner, attr)
    if key not in _ORIGINALS:
        _ORIGINALS[key] = getattr(owner, attr)
    setattr(owner, attr, make(_ORIGINALS[key]))


def restore_all(worker: object = None) -> list[str]:
    """Put back every patched attribute of this process; returns their names."""
    restored = []
    for (owner, attr), original in _ORIGINALS.items():
        setattr(owner, attr, original)
        restored.append(f"{getattr(owner, '__name__', owner)}.{attr}")
    _ORIGINALS.clear()
    return restored


# -- 1-3: sequence parallelism and the pipeline hand-off (vLLM #33322, #55464) ---------------------

def sp_middle_residual_slice(worker: object) -> None:
    """vLLM #33322: the Middle pattern takes residual rows ``[0:local_len]`` on every rank."""
    import reference_impl.compile.sp_ops as sp_ops

    def local_rows(rank: int, local_len: int) -> slice:
        return slice(0, local_len)

    _install(sp_ops, "local_rows", lambda original: local_rows)


def pp_handoff_residual_slice(worker: object) -> None:
    """vLLM #33322 (PP): the token-sharded residual goes into rows ``[0:local_len]`` of a zero
    hand-off buffer instead of being all-gathered."""
    from reference_impl.parallel.pipeline import PipelineComm

    def gather_residual(self: PipelineComm, residual: torch.Tensor) -> torch.Tensor:
        full = residual.new_zeros((residual.shape[0] * self.state.tp, *residual.shape[1:]))
        full[: residual.shape[0]] = residual
        return full

    _install(PipelineComm, "gather_residual", lambda original: gather_residual)


def sp_threshold_ignored_in_handoff(worker: object) -> None:
    """vLLM #55464: the runner's scattered-residual predicate ignores ``sp_min_tokens`` (the
    compiled graph's own predicate, in ``compiled_model``, still honours it)."""
    import reference_impl.parallel.pipeline as pipeline
    from reference_impl.compile.config import CompileConfig

    def sp_active(num_tokens: int, tp: int, cfg: CompileConfig) -> bool:
        return cfg.sp and tp > 1

    _install(pipeline, "sp_active", lambda original: sp_active)


# -- 4-8: construction and collectives ---------------------------------------------------------------

def token_count_not_padded_to_tp(worker: object) -> None:
    """The runner's step buckets are the base sizes, not rounded up to multiples of ``tp``
    (``engine.build_runner`` reads ``token_buckets`` from its own namespace)."""
    import reference_impl.engine as engine
    from reference_impl.compile.config import BASE_BUCKETS

    def token_buckets(tp: int, max_tokens: int) -> list[int]:
        return sorted({b for b in BASE_BUCKETS if b < max_tokens} | {max_tokens})

    _install(engine, "token_buckets", lambda original: token_buckets)


def all_gather_reversed_order(worker: object) -> None:
    """``collectives.all_gather`` returns the ranks' shards in reversed rank order."""
    from reference_impl.parallel import collectives

    def make(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def all_gather(x: torch.Tensor, world: int, group: str, dim: int = 0) -> torch.Tensor:
            x0 = x.movedim(dim, 0) if dim != 0 else x
            out = original(x0, world, group)  # (world * n, ...), rank order
            out = out.reshape(world, -1, *out.shape[1:]).flip(0).reshape(out.shape)
            return out.movedim(0, dim) if dim != 0 else out

        return all_gather

    _install(collectives, "all_gather", make)


def kv_heads_not_replicated(worker: object) -> None:
    """With ``num_kv_heads < tp`` every rank keeps KV head 0 instead of the one its queries use."""
    from reference_impl.parallel import tp as tp_module

    def make(original: Callable[[int, int, int], range]) -> Callable[[int, int, int], range]:
        def kv_heads_for_rank(num_kv_heads: int, rank: int, tp: int) -> range:
            if num_kv_heads < tp:
                return range(0, 1)
            return original(num_kv_heads, rank, tp)

        return kv_heads_for_rank

    _install(tp_module, "kv_heads_for_rank", make)


def vocab_shard_boundary_off_by_one(worker: object) -> None:
    """``VocabParallelEmbedding`` tests ``ids > start``: each shard's first id embeds to zeros."""
    from reference_impl.parallel import collectives
    from reference_impl.parallel.tp import VocabParallelEmbedding

    def forward(self: VocabParallelEmbedding, ids: torch.Tensor) -> torch.Tensor:
        inside = (ids > self.start) & (ids < self.end)  # (T,); should be ids >= start
        local = torch.where(inside, ids - self.start, torch.zeros_like(ids))
        emb = F.embedding(local, self.weight) * inside[:, None].to(self.weight.dtype)
        return collectives.all_reduce(emb, self.group)

    _install(VocabParallelEmbedding, "forward", lambda original: forward)


def pp_layer_split_drops_layer(worker: object) -> None:
    """``pp.stage_layers`` starts stage 1 one layer after stage 0 ends: that layer is dropped."""
    from reference_impl.parallel import pp as pp_module

    def make(original: Callable[[int, int], list[range]]) -> Callable[[int, int], list[range]]:
        def stage_layers(num_layers: int, pp: int) -> list[range]:
            ranges = original(num_layers, pp)
            if pp > 1:
                ranges[1] = range(ranges[1].start + 1, ranges[1].stop)
            return ranges

        return stage_layers

    _install(pp_module, "stage_layers", make)


def prompt_embeds_chunk_offset(worker: object) -> None:
    """``Runner._step_embeds`` takes every chunk's embedding rows from row 0 of the prompt."""
    from reference_impl.runner import Runner

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def step_embeds(self: Any, chunks: list[Any], ids: torch.Tensor, seqs: list[Any]) -> Any:
            shifted = [dataclasses.replace(c, start=0) if c.is_prefill and c.seq.prompt_embeds is not None else c
                       for c in chunks]
            return original(self, shifted, ids, seqs)

        return step_embeds

    _install(Runner, "_step_embeds", make)


# -- 9: KV cache offset ------------------------------------------------------------------------------

def decode_kv_slot_off_by_one(worker: object) -> None:
    """Decode chunks of sequences whose prompt was chunked (longer than the step budget) get an
    attention ``start_pos`` one too large: KV written one slot late, one unwritten slot read.
    The batch's positions (RoPE) are left right."""
    from reference_impl.runner import Runner, StepBatch
    from reference_impl.scheduler import Chunk

    def make(original: Callable[[Runner, list[Chunk]], StepBatch]) -> Callable[[Runner, list[Chunk]], StepBatch]:
        @functools.wraps(original)
        def build_batch(self: Runner, chunks: list[Chunk]) -> StepBatch:
            batch = original(self, chunks)
            budget = self.config.max_num_batched_tokens
            seqs = tuple(
                dataclasses.replace(s, start_pos=s.start_pos + 1)
                if c.num_tokens == 1 and not c.is_prefill and c.seq.prompt_len > budget else s
                for c, s in zip(batch.chunks, batch.metadata.seqs, strict=True)
            )
            return dataclasses.replace(batch, metadata=dataclasses.replace(batch.metadata, seqs=seqs))

        return build_batch

    _install(Runner, "build_batch", make)


# -- 10-11: norms and biases -------------------------------------------------------------------------

def sp_norm_eps_hardcoded(worker: object) -> None:
    """The ``SequenceParallelismPass`` replacements use ``eps=1e-6`` whatever eps they matched."""
    from reference_impl.compile.passes.sequence_parallel import SequenceParallelismPass

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(original)

        @functools.wraps(original)  # keeps the signature: the pattern matcher reads the arg names
        def replacement(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.arguments["eps"] = HARDCODED_EPS
            return original(*bound.args, **bound.kwargs)

        return replacement

    for name in SP_REPLACEMENTS:
        _install(SequenceParallelismPass, name, make)


def row_parallel_bias_per_rank(worker: object) -> None:
    """``RowParallelLinear`` adds its bias inside each rank's matmul, so the all-reduce sums it
    ``tp`` times."""
    from reference_impl.parallel import collectives
    from reference_impl.parallel.tp import RowParallelLinear

    def make(original: Callable[[RowParallelLinear, torch.Tensor], torch.Tensor]
             ) -> Callable[[RowParallelLinear, torch.Tensor], torch.Tensor]:
        def forward(self: RowParallelLinear, x: torch.Tensor) -> torch.Tensor:
            if self.bias is None:
                return original(self, x)
            return collectives.all_reduce(F.linear(x, self.weight, self.bias), self.group)

        return forward

    _install(RowParallelLinear, "forward", make)
