"""One fuzz example as plain data: a tiny model's shape, the engine's batching limits, a request
mix and the setups to run; and what turns it into a checkpoint spec and engine requests.

Every field is a small number or a name, so an example prints, saves (``example.json``) and
shrinks as data; the tensors (prompt-embeds, images) are a pure function of the example and the
checkpoint's embedding table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from reference_impl.config import ModelConfig, MultimodalConfig, RopeConfig, TextConfig, VisionConfig
from reference_impl.parallel import validate_parallel
from reference_impl.requests import Request
from scenarios.models import TinyModelSpec

# Long enough for the longest drawn prompt (twice the largest step budget plus two images) and
# the tokens generated after it.
MAX_POSITIONS = 256
# CLIP patch size of every drawn vision tower: an image of side ``s`` gives (s / 8)^2 patches.
PATCH_SIZE = 8
# Prompt-embeds are token embeddings plus this much noise (relative to the table's std), as in
# scenarios.inputs: rows that are not rows of the table, so re-embedding the ids would show.
EMBEDS_NOISE = 0.2
# Every third prompt token is a vocabulary shard's first or last id (for tp 2 and 4, whatever the
# vocabulary), as in scenarios.inputs: random ids rarely hit a shard boundary.
BOUNDARY_EVERY = 3


@dataclass(frozen=True)
class ModelDraw:
    """A tiny decoder (and, for LLaVA, a CLIP tower). ``bias``: Llama's ``attention_bias`` (q/k/v
    and o_proj biases; Qwen2 always has q/k/v biases and no o_proj bias). ``image_size``,
    ``vision_layers`` and ``select_full`` (keep the CLS position) only matter for LLaVA."""

    family: str  # "llama" | "qwen2" | "llava"
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    eps: float
    bias: bool
    tied: bool
    rope: str  # "default" | "llama3"
    rope_theta: float
    image_size: int = 16
    vision_layers: int = 1
    select_full: bool = False
    seed: int = 0

    @property
    def image_token(self) -> int | None:
        return self.vocab - 1 if self.family == "llava" else None

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // PATCH_SIZE) ** 2 + (1 if self.select_full else 0)

    def text_config(self) -> dict[str, Any]:
        """The Hugging Face text config (Llama or Qwen2 keys)."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope == "llama3":
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return dict(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim, max_position_embeddings=MAX_POSITIONS, rms_norm_eps=self.eps,
            tie_word_embeddings=self.tied, rope_parameters=rope, bos_token_id=None, eos_token_id=None,
            pad_token_id=None, **({} if self.family == "qwen2" else {"attention_bias": self.bias}),
        )

    def spec(self) -> TinyModelSpec:
        """The checkpoint spec (``scenarios.models``), named ``fuzz-<family>``."""
        vision: dict[str, Any] = {}
        llava: dict[str, Any] = {}
        if self.family == "llava":
            vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=self.vision_layers,
                          num_attention_heads=2, image_size=self.image_size, patch_size=PATCH_SIZE, num_channels=3)
            llava = dict(image_token_id=self.image_token, vision_feature_layer=-1,
                         vision_feature_select_strategy="full" if self.select_full else "default",
                         projector_hidden_act="gelu")
        return TinyModelSpec(f"fuzz-{self.family}", self.family, self.text_config(), vision, llava, seed=self.seed,
                             description="drawn by parity fuzz")

    def rope_config(self) -> RopeConfig:
        if self.rope == "llama3":
            return RopeConfig(self.rope_theta, "llama3", 8.0, 1.0, 4.0, 64)
        return RopeConfig(self.rope_theta)

    def config(self) -> ModelConfig:
        """The engine's view of this model without building it (for fitting setups)."""
        text = TextConfig(self.vocab, self.hidden, self.intermediate, self.layers, self.heads, self.kv_heads,
                          self.head_dim, self.eps, MAX_POSITIONS, self.tied, self.family == "qwen2" or self.bias,
                          self.family != "qwen2" and self.bias, self.rope_config())
        mm = None
        if self.family == "llava":
            vision = VisionConfig(16, 32, self.vision_layers, 2, self.image_size, PATCH_SIZE, 3, 1e-5, "quick_gelu")
            mm = MultimodalConfig(vision, self.vocab - 1, -1, "full" if self.select_full else "default", "gelu", True)
        return ModelConfig(self.family, self.family, text, mm)

    def fits(self, tp: int, pp: int) -> bool:
        try:
            validate_parallel(self.config(), tp, pp)
        except ValueError:
            return False
        return True


@dataclass(frozen=True)
class EngineDraw:
    """The engine's batching limits (every setup's) and the SP threshold and chunking of the
    drawn setups."""

    max_num_batched_tokens: int
    max_num_seqs: int
    chunked_prefill: bool = True
    sp_min_tokens: int = 0


@dataclass(frozen=True)
class RequestDraw:
    """One request. ``length``: prompt tokens (text, prompt-embeds) or the text tokens around the
    images (``kind == "image"``: ``split`` of them before the first image, one between two images)."""

    kind: str  # "text" | "embeds" | "image"
    length: int
    max_new_tokens: int
    top_k: int
    seed: int
    images: int = 0
    split: int = 0


@dataclass(frozen=True)
class Example:
    model: ModelDraw
    engine: EngineDraw
    requests: tuple[RequestDraw, ...]
    setups: tuple[str, ...]

    def prompt_tokens(self) -> int:
        """Prompt positions over all requests (image placeholders included)."""
        per_image = self.model.tokens_per_image
        return sum(r.length + r.images * per_image + (1 if r.images > 1 else 0) for r in self.requests)

    def summary(self) -> str:
        m, e = self.model, self.engine
        kinds = ",".join(f"{r.kind}{r.length}" + (f"+{r.images}img" if r.images else "") for r in self.requests)
        return (f"{m.family} L{m.layers} h{m.heads}/kv{m.kv_heads} d{m.head_dim} H{m.hidden} I{m.intermediate} "
                f"V{m.vocab} eps{m.eps:g}{' bias' if m.bias else ''}{' tied' if m.tied else ''} {m.rope}; "
                f"budget {e.max_num_batched_tokens} seqs {e.max_num_seqs}; requests [{kinds}]; "
                f"setups {','.join(self.setups)}")


def prompt_ids(model: ModelDraw, n: int, gen: torch.Generator) -> tuple[int, ...]:
    """``n`` random ids (never the image placeholder), every ``BOUNDARY_EVERY``-th a shard boundary."""
    top = model.vocab - 1 if model.image_token is not None else model.vocab
    ids = torch.randint(0, top, (n,), generator=gen).tolist()
    boundaries = sorted({model.vocab * i // tp + d for tp in (2, 4) for i in range(tp) for d in (0, -1)} - {-1})
    for i in range(0, n, BOUNDARY_EVERY):
        ids[i] = min(boundaries[(i // BOUNDARY_EVERY) % len(boundaries)], top - 1)
    return tuple(ids)


def materialize(example: Example, embed_table: torch.Tensor) -> list[Request]:
    """The example's requests for the engine (``embed_table``: the checkpoint's ``(vocab, H)``)."""
    return [_request(f"r{i}", example.model, r, embed_table) for i, r in enumerate(example.requests)]


def _request(rid: str, model: ModelDraw, r: RequestDraw, table: torch.Tensor) -> Request:
    gen = torch.Generator().manual_seed(r.seed)
    common: dict[str, Any] = {"max_new_tokens": r.max_new_tokens, "top_k": r.top_k}
    if r.kind == "embeds":
        rows = table.float()[list(prompt_ids(model, r.length, gen))]  # (n, H)
        rows = rows + EMBEDS_NOISE * table.float().std() * torch.randn(rows.shape, generator=gen)
        return Request(rid, prompt_embeds=rows, **common)
    if r.kind == "text":
        return Request(rid, prompt_ids(model, r.length, gen), **common)
    assert model.image_token is not None
    placeholder = (model.image_token,) * model.tokens_per_image
    ids = prompt_ids(model, r.length + (1 if r.images > 1 else 0), gen)
    pre, rest = ids[:r.split], ids[r.split:]
    prompt = pre + placeholder + (rest[:1] + placeholder + rest[1:] if r.images > 1 else rest)
    images = tuple(torch.rand(3, model.image_size, model.image_size, generator=gen) for _ in range(r.images))
    return Request(rid, prompt, images=images, **common)


def setup_candidates(model: ModelDraw, engine: EngineDraw, max_ranks: int,
                     allowed: Sequence[str] | None = None) -> list[str]:
    """The setup ids that fit ``model`` on ``max_ranks`` ranks, simplest first (Hypothesis shrinks
    towards the first): ``allowed`` (``--setups``) as given, else TP, PP and TP x PP degrees in
    eager, graph and SP-graph modes with the engine's chunking and SP threshold."""
    from harness.setup import ParallelSetup

    if allowed:
        parsed = [ParallelSetup.parse(s) for s in allowed]
        return [s.id for s in parsed if s.world_size <= max_ranks and model.fits(s.tp, s.pp)]
    suffix = (f"-spmin{engine.sp_min_tokens}" if engine.sp_min_tokens else "")
    nochunk = "" if engine.chunked_prefill else "-nochunk"
    ids: list[str] = []
    for tp, pp in ((2, 1), (1, 2), (2, 2), (4, 1), (1, 3), (1, 1)):
        if tp * pp > max_ranks or not model.fits(tp, pp):
            continue
        base = f"tp{tp}" + (f"-pp{pp}" if pp > 1 or tp == 1 else "")
        modes = [] if (tp, pp) == (1, 1) else ["eager"]
        modes += ["graph-full", "graph-piecewise"]
        if tp > 1:
            modes += [f"sp-graph-full{suffix}", f"sp-graph-piecewise{suffix}"]
        ids += [f"{base}-{mode}{nochunk}" for mode in modes]
    return ids
