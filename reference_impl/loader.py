"""Build a ``CausalLM`` from a local Hugging Face checkpoint directory (config.json + safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from reference_impl.config import ModelConfig, load_config
from reference_impl.layers import RotaryEmbedding, rope_inv_freq
from reference_impl.model import CausalLM

# Checkpoint name prefixes (several transformers versions) -> this engine's module names.
_PREFIXES = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)

# The dtypes the engine runs in, by name: the one table every layer validates against (an
# ``EngineSpec``, and through it a harness ``ParallelSetup``). float16 is not among them: nothing
# runs or checks it (the harness has no comparison tolerance for it).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def normalize_name(name: str) -> str:
    for old, new in _PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} holds no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update({normalize_name(k): v for k, v in load_file(str(file)).items()})
    return state


def load_weights(model: CausalLM, state: dict[str, torch.Tensor]) -> None:
    """Copy every parameter from ``state``; a missing or unexpected tensor is an error."""
    tied = model.cfg.text.tie_word_embeddings
    if tied:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    expected = {k for k in model.state_dict() if not (tied and k == "lm_head.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state, strict=False)


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> CausalLM:
    """The full (unsharded) model on ``device`` in ``dtype``."""
    path = Path(path)
    cfg: ModelConfig = load_config(path)
    state = read_state_dict(path)
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device=device)
    model.tie_weights()
    load_weights(model, state)
    model.tie_weights()
    model = model.to(dtype=dtype)
    _reset_buffers(model)
    return model.eval()


def _reset_buffers(model: CausalLM) -> None:
    """RoPE inverse frequencies are not in the checkpoint and stay fp32 in any model dtype."""
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.inv_freq = rope_inv_freq(model.cfg.text.head_dim, model.cfg.text.rope).to(
                module.inv_freq.device
            )
