"""Tensor parallelism: shard a loaded full model in place for one TP rank.

Column-parallel q/k/v/gate/up (output features split), row-parallel o/down (input features
split, outputs all-reduced, bias added once after the reduce), vocab-parallel embedding (ids
outside the shard masked, partial embeddings all-reduced) and LM head (local logits gathered).
When ``num_kv_heads < tp`` each rank keeps the one KV head its query heads use.
Every rank loads the same full checkpoint and cuts its own shard, so all TP sizes share weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reference_impl.layers import MLP, Attention
from reference_impl.model import CausalLM
from reference_impl.parallel import collectives
from reference_impl.parallel.groups import ParallelState


def shard_rows(w: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank's block of dim 0. (out, ...) -> (out / world, ...)."""
    size = w.shape[0] // world
    return w[rank * size:(rank + 1) * size].clone()


def vocab_range(vocab: int, rank: int, world: int) -> tuple[int, int]:
    """The ``[start, end)`` token ids whose embedding rows live on ``rank``."""
    size = vocab // world
    return rank * size, (rank + 1) * size


def kv_heads_for_rank(num_kv_heads: int, rank: int, tp: int) -> range:
    """KV heads rank keeps: its own slice, or (kv < tp) the single head its queries use."""
    if num_kv_heads >= tp:
        per = num_kv_heads // tp
        return range(rank * per, (rank + 1) * per)
    head = rank * num_kv_heads // tp
    return range(head, head + 1)


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T + b_local: this rank's output features."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local W_local^T) + b: the bias is added once, after the reduce."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, state: ParallelState) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = state.tp_group_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = collectives.all_reduce(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, end)`` of the table; other ids contribute zeros before the all-reduce."""

    def __init__(self, weight: torch.Tensor, start: int, end: int, state: ParallelState) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.end = start, end
        self.group = state.tp_group_name

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (T,) -> (T, H)."""
        inside = (ids >= self.start) & (ids < self.end)  # (T,)
        local = torch.where(inside, ids - self.start, torch.zeros_like(ids))
        emb = F.embedding(local, self.weight) * inside[:, None].to(self.weight.dtype)
        return collectives.all_reduce(emb, self.group)


class ParallelLMHead(nn.Module):
    """Local logits over this rank's vocabulary shard, gathered to the full vocabulary."""

    def __init__(self, weight: nn.Parameter, state: ParallelState) -> None:
        super().__init__()
        self.weight = weight
        self.tp, self.group = state.tp, state.tp_group_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, H) -> (N, vocab)."""
        return collectives.all_gather(F.linear(x, self.weight), self.tp, self.group, dim=-1)


def _params(lin: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a full ``nn.Linear``, detached."""
    assert isinstance(lin, nn.Linear), f"expected an unsharded nn.Linear, got {type(lin).__name__}"
    return lin.weight.data, None if lin.bias is None else lin.bias.data


def _column(lin: nn.Module, rank: int, tp: int) -> ColumnParallelLinear:
    weight, bias = _params(lin)
    return ColumnParallelLinear(shard_rows(weight, rank, tp),
                                None if bias is None else shard_rows(bias, rank, tp))


def _row(lin: nn.Module, state: ParallelState) -> RowParallelLinear:
    weight, bias = _params(lin)
    local = shard_rows(weight.t(), state.tp_rank, state.tp).t().contiguous()  # (out, in / tp)
    return RowParallelLinear(local, None if bias is None else bias.clone(), state)


def _kv_column(lin: nn.Module, heads: range, head_dim: int) -> ColumnParallelLinear:
    weight, bias = _params(lin)
    rows = slice(heads.start * head_dim, heads.stop * head_dim)
    return ColumnParallelLinear(weight[rows].clone(), None if bias is None else bias[rows].clone())


def shard_attention(attn: Attention, state: ParallelState) -> None:
    rank, tp = state.tp_rank, state.tp
    kv_heads = kv_heads_for_rank(attn.num_kv_heads, rank, tp)
    attn.q_proj = _column(attn.q_proj, rank, tp)
    attn.k_proj = _kv_column(attn.k_proj, kv_heads, attn.head_dim)
    attn.v_proj = _kv_column(attn.v_proj, kv_heads, attn.head_dim)
    attn.o_proj = _row(attn.o_proj, state)
    attn.num_heads //= tp
    attn.num_kv_heads = len(kv_heads)


def shard_mlp(mlp: MLP, state: ParallelState) -> None:
    mlp.gate_proj = _column(mlp.gate_proj, state.tp_rank, state.tp)
    mlp.up_proj = _column(mlp.up_proj, state.tp_rank, state.tp)
    mlp.down_proj = _row(mlp.down_proj, state)


def _embedding_table(embed: nn.Module) -> torch.Tensor:
    assert isinstance(embed, nn.Embedding), f"expected an unsharded nn.Embedding, got {type(embed).__name__}"
    return embed.weight.data


def shard_vocab(model: CausalLM, state: ParallelState) -> None:
    """Embedding and LM head over the same vocabulary shard (one parameter when tied)."""
    vocab = model.cfg.text.vocab_size
    start, end = vocab_range(vocab, state.tp_rank, state.tp)
    embed: VocabParallelEmbedding | None = None
    if model.model.embed_tokens is not None:
        full = _embedding_table(model.model.embed_tokens)
        embed = VocabParallelEmbedding(full[start:end].clone(), start, end, state)
        model.model.embed_tokens = embed
    if model.lm_head is not None:
        if model.cfg.text.tie_word_embeddings and embed is not None:
            weight = embed.weight
        else:
            full, _ = _params(model.lm_head)
            weight = nn.Parameter(full[start:end].clone(), requires_grad=False)
        model.lm_head = ParallelLMHead(weight, state)


def apply_tp(model: CausalLM, state: ParallelState) -> CausalLM:
    """Shard ``model`` (already split to its pipeline stage) in place for ``state.tp_rank``."""
    if state.tp == 1:
        return model
    for layer in model.model.decoder_layers():
        shard_attention(layer.self_attn, state)
        shard_mlp(layer.mlp, state)
    shard_vocab(model, state)
    return model
