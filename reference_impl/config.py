"""Model configuration read from a Hugging Face ``config.json``.

Only the fields the engine uses are kept, in frozen dataclasses. Unsupported architectures and
features are rejected here with a ``ValueError`` that names what was found.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "LlavaForConditionalGeneration": "llava",
}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters: ``theta`` and optional Llama-3 style frequency scaling."""

    theta: float = 10000.0
    rope_type: str = "default"  # "default" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class TextConfig:
    """The decoder's shape. ``head_dim * num_heads`` need not equal ``hidden_size``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2: bias on q/k/v; Llama: ``attention_bias``
    o_bias: bool  # Llama ``attention_bias`` also puts a bias on o_proj
    rope: RopeConfig = field(default_factory=RopeConfig)


@dataclass(frozen=True)
class VisionConfig:
    """A CLIP-style vision tower."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class MultimodalConfig:
    """LLaVA wiring: which vision layer feeds the projector and how image tokens are marked."""

    vision: VisionConfig
    image_token_id: int
    feature_layer: int
    select_strategy: str  # "default" drops the CLS position, "full" keeps it
    projector_act: str
    projector_bias: bool

    @property
    def tokens_per_image(self) -> int:
        extra = 0 if self.select_strategy == "default" else 1
        return self.vision.num_patches + extra


@dataclass(frozen=True)
class ModelConfig:
    """What the engine needs to build a model: family, decoder shape, optional vision part."""

    architecture: str
    family: str
    text: TextConfig
    multimodal: MultimodalConfig | None = None
    dtype: str = "float32"


def _rope_from(cfg: dict[str, Any]) -> RopeConfig:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope_type {rope_type!r}: supported are 'default' and 'llama3'")
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _text_from(cfg: dict[str, Any], family: str) -> TextConfig:
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    if cfg.get("use_sliding_window"):
        raise ValueError("sliding-window attention is not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}: only 'silu' (SwiGLU) is supported")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    attention_bias = bool(cfg.get("attention_bias", False))
    return TextConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or attention_bias,
        o_bias=family == "llama" and attention_bias,
        rope=_rope_from(cfg),
    )


def _vision_from(cfg: dict[str, Any]) -> VisionConfig:
    model_type = cfg.get("model_type", "clip_vision_model")
    if model_type != "clip_vision_model":
        raise ValueError(f"unsupported vision tower {model_type!r}: only CLIP-style towers are supported")
    return VisionConfig(
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=int(cfg["num_attention_heads"]),
        image_size=int(cfg["image_size"]),
        patch_size=int(cfg["patch_size"]),
        num_channels=int(cfg.get("num_channels", 3)),
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        hidden_act=str(cfg.get("hidden_act", "quick_gelu")),
    )


def _multimodal_from(cfg: dict[str, Any]) -> MultimodalConfig:
    layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer must be one int, got {layer!r}")
    strategy = str(cfg.get("vision_feature_select_strategy", "default"))
    if strategy not in ("default", "full"):
        raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}")
    token = cfg.get("image_token_id", cfg.get("image_token_index"))
    if token is None:
        raise ValueError("LLaVA config has no image_token_id")
    return MultimodalConfig(
        vision=_vision_from(cfg["vision_config"]),
        image_token_id=int(token),
        feature_layer=layer,
        select_strategy=strategy,
        projector_act=str(cfg.get("projector_hidden_act", "gelu")),
        projector_bias=bool(cfg.get("multimodal_projector_bias", True)),
    )


def config_from_dict(cfg: dict[str, Any]) -> ModelConfig:
    """Parse a ``config.json`` dictionary; raise ``ValueError`` for what the engine cannot run."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch!r}: supported are {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    family = SUPPORTED_ARCHITECTURES[arch]
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    if family == "llava":
        text_cfg = dict(cfg["text_config"])
        text_cfg.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
        text_family = SUPPORTED_ARCHITECTURES.get(
            {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
                str(text_cfg.get("model_type", "llama")), ""
            ),
            None,
        )
        if text_family is None:
            raise ValueError(f"unsupported LLaVA text model {text_cfg.get('model_type')!r}")
        return ModelConfig(arch, family, _text_from(text_cfg, text_family), _multimodal_from(cfg), dtype)
    return ModelConfig(arch, family, _text_from(cfg, family), None, dtype)


def load_config(path: str | Path) -> ModelConfig:
    """Read ``<path>/config.json``."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"{path} is not a Hugging Face checkpoint directory: no config.json")
    try:
        with file.open() as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not a readable JSON file: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: not a JSON object")
    try:
        return config_from_dict(data)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{file}: a required field is missing or malformed: {exc}") from None
