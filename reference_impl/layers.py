"""Decoder building blocks: RMSNorm, rotary embedding, attention, SwiGLU MLP.

All tensors are flat over tokens: ``x`` is ``(T, hidden)``. Nothing here knows about ranks;
``parallel/tp.py`` replaces the linears and divides the head counts after loading.
"""

from __future__ import annotations

import math
from typing import overload

import torch
import torch.nn.functional as F
from torch import nn

from reference_impl.attention import attention_op
from reference_impl.capture import capture
from reference_impl.config import RopeConfig, TextConfig
from reference_impl.kernels import fused_add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """``norm(x)``, or ``norm(x + residual)`` returning ``(normed, x + residual)``."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    @overload
    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor: ...

    @overload
    def forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return fused_add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Inverse frequencies ``(head_dim // 2,)``, with Llama-3 scaling when configured."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.rope_type != "llama3":
        return inv_freq
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """Non-interleaved RoPE as in Hugging Face Llama; cos/sin computed in fp32."""

    def __init__(self, head_dim: int, rope: RopeConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, rope), persistent=False)
        self.inv_freq: torch.Tensor

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,); q: (T, heads, hd); k: (T, kv_heads, hd)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, hd)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Attention(nn.Module):
    """GQA self-attention. ``num_heads``/``num_kv_heads`` are the *local* counts after TP."""

    def __init__(self, cfg: TextConfig, layer_name: str) -> None:
        super().__init__()
        self.layer_name = layer_name
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj: nn.Module = nn.Linear(cfg.hidden_size, q_out, bias=cfg.qkv_bias)
        self.k_proj: nn.Module = nn.Linear(cfg.hidden_size, kv_out, bias=cfg.qkv_bias)
        self.v_proj: nn.Module = nn.Linear(cfg.hidden_size, kv_out, bias=cfg.qkv_bias)
        self.o_proj: nn.Module = nn.Linear(q_out, cfg.hidden_size, bias=cfg.o_bias)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """positions: (T,); x: (T, hidden) -> (T, hidden)."""
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)  # (T, nh, hd)
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)  # (T, nkv, hd)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)
        q, k = self.rotary_emb(positions, q, k)
        out = attention_op(q, k, v, self.layer_name, self.scale)  # (T, nh, hd)
        return self.o_proj(out.reshape(T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_proj: nn.Module = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj: nn.Module = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj: nn.Module = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block. The first layer of the model (no residual yet) uses plain ``rms_norm``;
    every later norm is ``fused_add_rms_norm``, as in vLLM, which is what the SP pass matches."""

    def __init__(self, cfg: TextConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.capture = False  # record activations for localization (reference_impl/capture.py)
        self.self_attn = Attention(cfg, f"layers.{index}")
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        if self.capture:
            hidden, residual = capture(hidden, residual, self.index, positions.shape[0])
        return self.mlp(hidden), residual
