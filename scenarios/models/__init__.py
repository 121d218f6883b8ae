"""Built-in models: tiny checkpoints built offline with transformers from a config and a seed,
checkpoints shipped in the repository, and real checkpoints converted from a package's GGUF file.

Each tiny model is a ``TinyModelSpec``, each converted one a ``gguf.GgufModelSpec``;
``checkpoint(name)`` builds or converts it once into a cache directory keyed by a hash of what
determines it (spec, seed or package version, transformers major version) and returns the path.
Building is atomic (a temporary directory renamed into place), so concurrent test workers may
ask for the same model at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scenarios.models.gguf import CONVERTED

# Standard deviation of the LM-head (or tied embedding) weights. The final RMSNorm gives hidden
# states of unit RMS, so logits have std ~ sqrt(hidden) * std = 8 * 1.0: the top-1 token leads
# the runner-up by ~2 nats on average, so fp32 rounding (~1e-5) never flips a greedy choice.
LM_HEAD_STD = 1.0
# Larger than transformers' 0.02 so every layer moves the residual stream: at 0.1 the tied
# tiny-qwen2 only copied its input token (the embedding dominated), which would hide layer bugs;
# at 0.3 all three models produce varied tokens (measured: 21-24 distinct of 24 greedy tokens)
# with the smallest top-1/top-2 logprob gap seen ~0.03, far above fp32 noise.
INIT_STD = 0.3
# Attention biases (Qwen2 q/k/v, tiny-llava q/k/v/o): nonzero, about a third of a typical
# projection output, so a bias applied twice or on the wrong shard changes the outputs.
BIAS_STD = 0.1
# tiny-llava's RMSNorm epsilon: large enough against the residual stream's mean square (~0.1)
# that an engine using another epsilon than the config's (say a hard-coded 1e-6) moves every
# normed activation by ~5% and cannot pass; with the usual 1e-6..1e-5 such a bug is invisible.
LLAVA_RMS_EPS = 1e-2


@dataclass(frozen=True)
class TinyModelSpec:
    name: str
    family: str  # "llama" | "qwen2" | "llava"
    text: dict[str, Any]
    vision: dict[str, Any] = field(default_factory=dict)
    llava: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    description: str = ""
    init_std: float = INIT_STD

    def digest(self) -> str:
        import transformers

        blob = json.dumps(
            [asdict(self), LM_HEAD_STD, BIAS_STD, transformers.__version__.split(".")[0]],
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


_TEXT_BASE: dict[str, Any] = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, head_dim=16, max_position_embeddings=256,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)

MODELS: dict[str, TinyModelSpec] = {
    "tiny-llama": TinyModelSpec(
        "tiny-llama", "llama",
        {**_TEXT_BASE, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
         "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64}},
        seed=1, description="Llama, GQA (4 heads, 2 KV heads), Llama-3 RoPE scaling, untied head",
    ),
    "tiny-qwen2": TinyModelSpec(
        "tiny-qwen2", "qwen2",
        {**_TEXT_BASE, "num_key_value_heads": 1, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
         "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
        seed=2, description="Qwen2, qkv bias, one KV head, tied embeddings",
    ),
    "tiny-llava": TinyModelSpec(
        "tiny-llava", "llava",
        {**_TEXT_BASE, "num_key_value_heads": 2, "rms_norm_eps": LLAVA_RMS_EPS, "attention_bias": True},
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=32, patch_size=8, num_channels=3),
        llava=dict(image_token_id=500, vision_feature_layer=-2,
                   vision_feature_select_strategy="default", projector_hidden_act="gelu"),
        seed=3, description="LLaVA: CLIP tower (16 patches) + projector + Llama decoder with attention "
        "biases (o_proj too: a row-parallel bias), RMSNorm eps 1e-2",
    ),
    # Shaped like SmolLM2-135M (9 heads, 3 KV heads, tied embeddings): no smoke setup's tp (2, 4)
    # divides 9 heads, so only tp3 runs; intermediate 384 and vocab 576 are multiples of 3 (and
    # 576 of 2 and 4 too, so the heads are what rules tp2/tp4 out).
    "tiny-llama-9h": TinyModelSpec(
        "tiny-llama-9h", "llama",
        {**_TEXT_BASE, "vocab_size": 576, "hidden_size": 144, "intermediate_size": 384,
         "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 16, "rms_norm_eps": 1e-5,
         "tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}},
        seed=4, description="Llama shaped like SmolLM2-135M: 9 heads, 3 KV heads, tied embeddings (tp3 only)",
    ),
}


# Checkpoints shipped in the repository (trained, not built from a seed): name -> directory.
SHIPPED: dict[str, Path] = {
    "gsm-llama": Path(__file__).resolve().parent.parent / "gsm" / "checkpoint",
}
SHIPPED_DESCRIPTIONS = {
    "gsm-llama": "Llama trained in the repository on generated grade-school word problems (gsm8k format), "
                 "with a tokenizer: python -m scenarios.gsm.train",
}


def cache_root() -> Path:
    env = os.environ.get("PARITY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "parity"


def _hf_model(spec: TinyModelSpec) -> Any:
    import torch
    import transformers as tf

    torch.manual_seed(spec.seed)
    text = {**spec.text, "initializer_range": spec.init_std}
    if spec.family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**text))
    if spec.family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**text))
    cfg = tf.LlavaConfig(
        text_config=tf.LlamaConfig(**text),
        vision_config=tf.CLIPVisionConfig(**spec.vision, initializer_range=spec.init_std),
        **spec.llava,
    )
    return tf.LlavaForConditionalGeneration(cfg)


def _redraw(weight: Any, std: float, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=gen) * std)


def _peak(model: Any, spec: TinyModelSpec) -> None:
    """Re-draw the output projection with ``LM_HEAD_STD`` so greedy choices are not near-ties,
    and the decoder's attention biases with ``BIAS_STD`` (transformers starts them at zero,
    which would hide every bias bug: a zero bias added tp times is still zero)."""
    biases = [p for name, p in model.named_parameters()
              if name.endswith(".bias") and "self_attn" in name and "vision" not in name]
    for i, bias in enumerate(biases):
        _redraw(bias, BIAS_STD, spec.seed + 3000 + i)
    _redraw(model.get_output_embeddings().weight, LM_HEAD_STD, spec.seed + 1000)


def build(spec: TinyModelSpec, out: Path) -> None:
    model = _hf_model(spec)
    _peak(model, spec)
    model.save_pretrained(str(out))


def builtin_names() -> list[str]:
    """Every built-in model name: tiny, shipped and converted."""
    return sorted([*MODELS, *SHIPPED, *CONVERTED])


def checkpoint(name: str) -> Path:
    """Path of the checkpoint of a built-in model: built (tiny) or converted (GGUF) on first use,
    or shipped in the repository."""
    if name in SHIPPED:
        return SHIPPED[name]
    if name in CONVERTED:
        from scenarios.models import gguf

        spec = CONVERTED[name]
        gguf.gguf_path(spec)  # the package and gguf are installed, else a ValueError naming them
        digest = hashlib.sha256(json.dumps(spec.digest_parts()).encode()).hexdigest()[:12]
        return _cached(name, digest, lambda out: gguf.convert(spec, out))
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: built-in models are {builtin_names()}")
    tiny = MODELS[name]
    return _cached(name, tiny.digest(), lambda out: build(tiny, out))


def tiny_checkpoint(spec: TinyModelSpec) -> Path:
    """The checkpoint of any tiny spec (a built-in one or, say, one the fuzzer drew): built once
    into ``<cache>/models/<name>-<digest>``."""
    return _cached(spec.name, spec.digest(), lambda out: build(spec, out))


def _cached(name: str, digest: str, make: Callable[[Path], None]) -> Path:
    """``<cache>/models/<name>-<digest>``, made by ``make(tmp)`` into a temporary directory renamed
    into place (so a concurrent caller sees either nothing or the whole checkpoint)."""
    root = cache_root() / "models"
    final = root / f"{name}-{digest}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        make(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve(name_or_path: str) -> Path:
    """A built-in model name, or a local Hugging Face checkpoint directory."""
    if name_or_path in MODELS or name_or_path in SHIPPED or name_or_path in CONVERTED:
        return checkpoint(name_or_path)
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return path
    raise ValueError(
        f"{name_or_path!r} is neither a built-in model ({', '.join(builtin_names())}) "
        "nor a directory holding config.json"
    )
