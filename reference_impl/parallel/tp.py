"""Tensor parallelism: shard a loaded full model in place for one TP rank.

Column-parallel q/k/v/gate/up (output features split), row-parallel o/down (input features
split, outputs all-reduced, bias added once after the reduce), vocab-parallel embedding (ids
outside the shard masked, partial embeddings all-reduced) and LM head (local logits gathered).
When ``num_kv_heads < tp`` each rank keeps the one KV head its query heads use.

Every rank cuts its own shard of the same full weights, so all TP sizes share weights. The
weights come from a ``WeightSource``: the checkpoint itself (``loader.CheckpointWeights``, which
reads only the rows or columns a rank keeps, into a model built on the meta device) or, by
default, the full tensors of the already loaded model.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from reference_impl.layers import MLP, Attention, DecoderLayer
from reference_impl.model import CausalLM
from reference_impl.parallel import collectives
from reference_impl.parallel.groups import ParallelState


class WeightSource(Protocol):
    """Full-model tensors by parameter name, whole or a block of rows and/or columns."""

    def get(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor: ...


class ModuleWeights:
    """The source for a model loaded whole: slices (copies) of its own tensors."""

    def __init__(self, model: nn.Module) -> None:
        self.state = {k: v.detach() for k, v in model.state_dict().items()}

    def get(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        tensor = self.state[name][rows or slice(None)]
        return (tensor if cols is None else tensor[:, cols]).clone()


def block(size: int, rank: int, world: int) -> slice:
    """Rank's contiguous block of ``size`` items split ``world`` ways."""
    per = size // world
    return slice(rank * per, (rank + 1) * per)


def shard_rows(w: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank's block of dim 0. (out, ...) -> (out / world, ...)."""
    return w[block(w.shape[0], rank, world)].clone()


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


def _shape(lin: nn.Module) -> tuple[int, int]:
    """(out, in) of a full ``nn.Linear`` (its tensors may be on the meta device)."""
    assert isinstance(lin, nn.Linear), f"expected an unsharded nn.Linear, got {type(lin).__name__}"
    return lin.out_features, lin.in_features


def _column(lin: nn.Module, name: str, rank: int, tp: int, weights: WeightSource) -> ColumnParallelLinear:
    """Rows ``block`` of the weight (output features) and of the bias."""
    rows = block(_shape(lin)[0], rank, tp)
    return _column_rows(lin, name, rows, weights)


def _column_rows(lin: nn.Module, name: str, rows: slice, weights: WeightSource) -> ColumnParallelLinear:
    bias = weights.get(f"{name}.bias", rows) if getattr(lin, "bias", None) is not None else None
    return ColumnParallelLinear(weights.get(f"{name}.weight", rows), bias)


def _row(lin: nn.Module, name: str, state: ParallelState, weights: WeightSource) -> RowParallelLinear:
    """Columns ``block`` of the weight (input features); the full bias, added after the reduce."""
    cols = block(_shape(lin)[1], state.tp_rank, state.tp)
    local = weights.get(f"{name}.weight", cols=cols)  # (out, in / tp)
    bias = weights.get(f"{name}.bias") if getattr(lin, "bias", None) is not None else None
    return RowParallelLinear(local, bias, state)


def _kv_column(lin: nn.Module, name: str, heads: range, head_dim: int, weights: WeightSource) -> ColumnParallelLinear:
    return _column_rows(lin, name, slice(heads.start * head_dim, heads.stop * head_dim), weights)


def shard_attention(attn: Attention, prefix: str, state: ParallelState, weights: WeightSource) -> None:
    """``prefix``: the attention module's parameter-name prefix (``model.layers.3.self_attn``)."""
    rank, tp = state.tp_rank, state.tp
    kv_heads = kv_heads_for_rank(attn.num_kv_heads, rank, tp)
    attn.q_proj = _column(attn.q_proj, f"{prefix}.q_proj", rank, tp, weights)
    attn.k_proj = _kv_column(attn.k_proj, f"{prefix}.k_proj", kv_heads, attn.head_dim, weights)
    attn.v_proj = _kv_column(attn.v_proj, f"{prefix}.v_proj", kv_heads, attn.head_dim, weights)
    attn.o_proj = _row(attn.o_proj, f"{prefix}.o_proj", state, weights)
    attn.num_heads //= tp
    attn.num_kv_heads = len(kv_heads)


def shard_mlp(mlp: MLP, prefix: str, state: ParallelState, weights: WeightSource) -> None:
    mlp.gate_proj = _column(mlp.gate_proj, f"{prefix}.gate_proj", state.tp_rank, state.tp, weights)
    mlp.up_proj = _column(mlp.up_proj, f"{prefix}.up_proj", state.tp_rank, state.tp, weights)
    mlp.down_proj = _row(mlp.down_proj, f"{prefix}.down_proj", state, weights)


def shard_vocab(model: CausalLM, state: ParallelState, weights: WeightSource) -> None:
    """Embedding and LM head over the same vocabulary shard (one parameter when tied)."""
    vocab = model.cfg.text.vocab_size
    start, end = vocab_range(vocab, state.tp_rank, state.tp)
    embed: VocabParallelEmbedding | None = None
    if model.model.embed_tokens is not None:
        table = weights.get("model.embed_tokens.weight", slice(start, end))
        embed = VocabParallelEmbedding(table, start, end, state)
        model.model.embed_tokens = embed
    if model.lm_head is not None:
        if model.cfg.text.tie_word_embeddings and embed is not None:
            weight = embed.weight
        else:  # untied, or tied on a last pipeline stage without the embedding
            weight = nn.Parameter(weights.get("lm_head.weight", slice(start, end)), requires_grad=False)
        model.lm_head = ParallelLMHead(weight, state)


def apply_tp(model: CausalLM, state: ParallelState, weights: WeightSource | None = None) -> CausalLM:
    """Shard ``model`` (already split to its pipeline stage) in place for ``state.tp_rank``,
    taking each shard from ``weights`` (default: the model's own full tensors). Parameters that
    are not sharded (norms) are left as they are: on the meta device, ``loader.materialize``
    reads them afterwards."""
    if state.tp == 1:
        return model
    source = weights if weights is not None else ModuleWeights(model)
    for key, layer in model.model.layers.items():
        assert isinstance(layer, DecoderLayer)
        shard_attention(layer.self_attn, f"model.layers.{key}.self_attn", state, source)
        shard_mlp(layer.mlp, f"model.layers.{key}.mlp", state, source)
    shard_vocab(model, state, source)
    return model
