"""Scenario inputs as data: text, prompt-embeds, multimodal and mixed batches of requests.

Inputs are a pure function of (model config, embedding table, seed), so every setup and the
baseline see exactly the same requests. Lengths are chosen to exercise the engine: a single
token, lengths not divisible by 2 or 4, and one prompt long enough to be chunked by the default
``max_num_batched_tokens``. Token ids include both sides of the vocabulary's TP shard boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from reference_impl.config import ModelConfig
from reference_impl.requests import Request

TEXT_LENGTHS = (1, 7, 13, 70)  # 70 > the default 64-token step budget: chunked prefill
EMBEDS_LENGTHS = (5, 11, 33)
# Noise added to real token embeddings, relative to the table's std: prompt-embeds are not rows
# of the table, so an engine that silently re-embeds token ids instead of using the given tensor
# produces other outputs.
EMBEDS_NOISE = 0.2


@dataclass(frozen=True)
class InputSpec:
    max_new_tokens: int = 16
    top_k: int = 5
    seed: int = 0


def _ids(gen: torch.Generator, n: int, cfg: ModelConfig) -> tuple[int, ...]:
    """Random ids, avoiding the image placeholder, with shard-boundary ids mixed in."""
    vocab = cfg.text.vocab_size
    ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
    boundaries = [vocab // 4 * i + d for i in (1, 2, 3) for d in (-1, 0)]
    for i in range(0, n, 5):
        ids[i] = boundaries[(i // 5) % len(boundaries)]
    image_token = cfg.multimodal.image_token_id if cfg.multimodal else None
    return tuple(t if t != image_token else t - 1 for t in ids)


def text(cfg: ModelConfig, spec: InputSpec, tag: str = "text") -> list[Request]:
    gen = torch.Generator().manual_seed(spec.seed)
    return [
        Request(f"{tag}{i}", _ids(gen, n, cfg), max_new_tokens=spec.max_new_tokens, top_k=spec.top_k)
        for i, n in enumerate(TEXT_LENGTHS)
    ]


def prompt_embeds(
    cfg: ModelConfig, embed_table: torch.Tensor, spec: InputSpec, dtype: torch.dtype,
    tag: str = "embeds",
) -> list[Request]:
    """Token embeddings plus noise: real ``(n, hidden)`` tensors in the engine's dtype."""
    gen = torch.Generator().manual_seed(spec.seed + 1)
    reqs = []
    for i, n in enumerate(EMBEDS_LENGTHS):
        ids = torch.tensor(_ids(gen, n, cfg))
        table = embed_table.float()
        rows = table[ids]  # (n, H)
        rows = rows + EMBEDS_NOISE * table.std() * torch.randn(rows.shape, generator=gen)
        reqs.append(Request(f"{tag}{i}", prompt_embeds=rows.to(dtype),
                            max_new_tokens=spec.max_new_tokens, top_k=spec.top_k))
    return reqs


def multimodal(cfg: ModelConfig, spec: InputSpec, tag: str = "mm") -> list[Request]:
    """Prompts with text before, between and after images (one or two images each)."""
    mm = cfg.multimodal
    if mm is None:
        raise ValueError(f"{cfg.architecture} takes no images: the multimodal scenario needs LLaVA")
    gen = torch.Generator().manual_seed(spec.seed + 2)
    v = mm.vision
    placeholder = (mm.image_token_id,) * mm.tokens_per_image
    reqs = []
    for i, (n_images, pre, post) in enumerate(((1, 3, 5), (2, 1, 8), (1, 0, 2))):
        ids = _ids(gen, pre, cfg) + placeholder
        if n_images == 2:
            ids += _ids(gen, 3, cfg) + placeholder
        ids += _ids(gen, post, cfg)
        images = tuple(torch.rand(v.num_channels, v.image_size, v.image_size, generator=gen)
                       for _ in range(n_images))
        reqs.append(Request(f"{tag}{i}", ids, images=images,
                            max_new_tokens=spec.max_new_tokens, top_k=spec.top_k))
    return reqs


def mixed(
    cfg: ModelConfig, embed_table: torch.Tensor, spec: InputSpec, dtype: torch.dtype
) -> list[Request]:
    """Text, prompt-embeds and (for LLaVA) image requests in one batch."""
    reqs = text(cfg, spec, "mix-text")[1:3] + prompt_embeds(cfg, embed_table, spec, dtype, "mix-emb")[:2]
    if cfg.multimodal is not None:
        reqs += multimodal(cfg, spec, "mix-mm")[:2]
    return reqs


def embedding_table(checkpoint: str | Path) -> torch.Tensor:
    """The checkpoint's full ``(vocab, hidden)`` token embedding in float32, read from its
    safetensors (that tensor alone)."""
    from reference_impl.loader import CheckpointWeights

    return CheckpointWeights(Path(checkpoint)).get("model.embed_tokens.weight")
