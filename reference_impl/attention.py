"""Paged-by-slot KV cache and the attention custom op.

The model runs on a flat batch of tokens ``(T, ...)``: the tokens of every sequence scheduled in
a step, one after another. Attention is one opaque custom op, ``parity::attention``, like vLLM's
``unified_attention``: a compiled graph sees a single node (and piecewise compilation splits the
graph there), while the op reads the step's metadata and this layer's KV cache from the
*forward context* that the runner sets around each model call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's share of a step: rows ``[q_start, q_end)`` of the flat batch.

    ``start_pos`` is the position of the first of those tokens; the sequence's KV cache lives
    in cache row ``slot``.
    """

    q_start: int
    q_end: int
    start_pos: int
    slot: int

    @property
    def num_tokens(self) -> int:
        return self.q_end - self.q_start

    @property
    def context_len(self) -> int:
        return self.start_pos + self.num_tokens


@dataclass(frozen=True)
class AttentionMetadata:
    """The sequences of one step. Rows past the last ``q_end`` are padding (attend to nothing)."""

    seqs: tuple[SeqSlice, ...]

    @property
    def num_real_tokens(self) -> int:
        return self.seqs[-1].q_end if self.seqs else 0


@dataclass
class KVCache:
    """Per-layer key/value storage: ``(max_seqs, max_len, kv_heads, head_dim)`` each."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(
        cls, max_seqs: int, max_len: int, kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device,
    ) -> KVCache:
        shape = (max_seqs, max_len, kv_heads, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device))


@dataclass
class ForwardContext:
    metadata: AttentionMetadata
    kv_caches: dict[str, KVCache]


_CONTEXT: list[ForwardContext] = []


@contextlib.contextmanager
def forward_context(metadata: AttentionMetadata, kv_caches: dict[str, KVCache]) -> Iterator[None]:
    """Make ``metadata`` and the caches visible to ``parity::attention`` during one model call."""
    _CONTEXT.append(ForwardContext(metadata, kv_caches))
    try:
        yield
    finally:
        _CONTEXT.pop()


def current_context() -> ForwardContext:
    if not _CONTEXT:
        raise RuntimeError("parity::attention called outside forward_context()")
    return _CONTEXT[-1]


def write_kv(cache: KVCache, seq: SeqSlice, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store this step's keys/values of one sequence. k, v: (n, kv_heads, head_dim)."""
    end = seq.start_pos + seq.num_tokens
    cache.k[seq.slot, seq.start_pos:end] = k
    cache.v[seq.slot, seq.start_pos:end] = v


def attend_one(q: torch.Tensor, cache: KVCache, seq: SeqSlice, scale: float) -> torch.Tensor:
    """Causal attention of one sequence's new queries over its cached context.

    q: (n, heads, head_dim) -> (n, heads, head_dim)
    """
    n, heads, _ = q.shape
    ctx = seq.context_len
    k = cache.k[seq.slot, :ctx]  # (ctx, kv_heads, hd)
    v = cache.v[seq.slot, :ctx]
    group = heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # (heads, ctx, hd)
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)
    q_pos = torch.arange(seq.start_pos, ctx, device=q.device)  # (n,)
    k_pos = torch.arange(ctx, device=q.device)  # (ctx,)
    mask = k_pos[None, :] <= q_pos[:, None]  # (n, ctx)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1).reshape(n, heads, -1)


def attention_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: str, scale: float
) -> torch.Tensor:
    """q: (T, heads, hd); k, v: (T, kv_heads, hd) -> (T, heads, hd). Padding rows give zeros."""
    ctx = current_context()
    cache = ctx.kv_caches[layer]
    out = torch.zeros_like(q)
    for seq in ctx.metadata.seqs:
        rows = slice(seq.q_start, seq.q_end)
        write_kv(cache, seq, k[rows], v[rows])
        out[rows] = attend_one(q[rows], cache, seq, scale)
    return out


# ``mutates_args=()`` although the op writes the KV cache: ``mutates_args`` can only name the
# op's arguments, and the cache is not one (it is reached through the forward context, as in
# vLLM's ``unified_attention``; q, k and v are only read). Why a compiled graph still runs every
# cache write, in order:
# - the op is opaque: no decomposition, and a fake that touches no cache, so neither AOT
#   autograd nor inductor sees or moves the write;
# - its output is the layer's attention output, which ``o_proj`` consumes: never dead code;
# - each layer's cache is written and read by that layer's op alone, once per step, and the op
#   of layer i + 1 depends on the output of layer i, so data dependencies order every access;
# - every layer passes its own ``layer`` name, so no two calls are ever merged as common
#   subexpressions.
# tests/test_compile_units.py::test_side_effect_ops_stay_in_compiled_graphs checks that every
# compiled graph keeps one op per layer and that the cache after a compiled prefill equals eager's.
@torch.library.custom_op("parity::attention", mutates_args=())
def attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: str, scale: float
) -> torch.Tensor:
    """Opaque attention node. Writes the KV cache of ``layer`` as a side effect (see above)."""
    return attention_impl(q, k, v, layer, scale)


@attention_op.register_fake
def _attention_fake(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: str, scale: float
) -> torch.Tensor:
    return torch.empty_like(q)
