"""Llama-family decoder (Llama, Qwen2) with an optional LLaVA vision front end.

The model runs on a flat batch of tokens and knows nothing of ranks. Layers live in a
``ModuleDict`` keyed by layer index, so a pipeline stage that keeps a subset of them keeps
their parameter names; a stage without ``embed_tokens`` takes ``IntermediateTensors`` in, and
a stage without ``norm`` hands ``IntermediateTensors`` out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from reference_impl.config import ModelConfig
from reference_impl.layers import Attention, DecoderLayer, RMSNorm
from reference_impl.vision import Projector, VisionTower, image_features


@dataclass
class IntermediateTensors:
    """What one pipeline stage hands the next: both ``(T, hidden)``."""

    hidden_states: torch.Tensor
    residual: torch.Tensor


class DecoderModel(nn.Module):
    """Embedding, decoder layers, final norm (each may be absent on a pipeline stage)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        text = cfg.text
        self.embed_tokens: nn.Module | None = nn.Embedding(text.vocab_size, text.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(text, i) for i in range(text.num_layers)})
        self.norm: RMSNorm | None = RMSNorm(text.hidden_size, text.rms_norm_eps)

    def decoder_layers(self) -> list[DecoderLayer]:
        return [layer for layer in self.layers.values() if isinstance(layer, DecoderLayer)]

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.decoder_layers()]

    def forward(
        self,
        positions: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        intermediate: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        """positions: (T,); input_ids: (T,) or inputs_embeds: (T, H) or ``intermediate``.

        Returns the final normed hidden states (T, H) on the last stage, else the hand-off.
        """
        residual: torch.Tensor | None = None
        if intermediate is not None:
            hidden, residual = intermediate.hidden_states, intermediate.residual
        elif inputs_embeds is not None:
            hidden = inputs_embeds
        else:
            assert self.embed_tokens is not None and input_ids is not None
            hidden = self.embed_tokens(input_ids)
        for layer in self.layers.values():
            hidden, residual = layer(positions, hidden, residual)
        if self.norm is None:
            assert residual is not None
            return IntermediateTensors(hidden, residual)
        if residual is None:  # a stage with no layers at all
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class CausalLM(nn.Module):
    """Decoder + LM head, and for LLaVA checkpoints the vision tower and projector."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = DecoderModel(cfg)
        self.lm_head: nn.Module | None = nn.Linear(
            cfg.text.hidden_size, cfg.text.vocab_size, bias=False
        )
        self.vision_tower: VisionTower | None = None
        self.multi_modal_projector: Projector | None = None
        if cfg.multimodal is not None:
            self.vision_tower = VisionTower(cfg.multimodal.vision)
            self.multi_modal_projector = Projector(cfg.multimodal, cfg.text.hidden_size)

    def tie_weights(self) -> None:
        if self.cfg.text.tie_word_embeddings and self.lm_head is not None:
            assert self.model.embed_tokens is not None
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        positions: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        intermediate: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(positions, input_ids, inputs_embeds, intermediate)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T,) -> (T, H), outside any compiled graph."""
        assert self.model.embed_tokens is not None, "embedding lives on the first stage"
        out: torch.Tensor = self.model.embed_tokens(input_ids)
        return out

    def embed_multimodal(self, input_ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """Embed ids and put image features in place of the image placeholder tokens.

        input_ids: (T,) with ``B * tokens_per_image`` placeholders; pixels: (B, C, S, S).
        """
        mm = self.cfg.multimodal
        assert mm is not None and self.vision_tower is not None
        assert self.multi_modal_projector is not None
        embeds = self.embed_input_ids(input_ids)  # (T, H)
        if pixels.shape[0] == 0:
            return embeds
        feats = image_features(self.vision_tower, self.multi_modal_projector, mm, pixels)
        mask = input_ids == mm.image_token_id
        embeds = embeds.clone()
        embeds[mask] = feats.to(embeds.dtype)
        return embeds

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N, vocab) in fp32."""
        assert self.lm_head is not None, "the LM head lives on the last stage"
        logits: torch.Tensor = self.lm_head(hidden)
        return logits.float()
