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


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the safetensors headers (no weights read); ``ValueError``
    naming the file when one is not a complete safetensors file."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} holds no *.safetensors weights")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:  # validates the header against the file's size
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    shapes[normalize_name(key)] = tuple(f.get_slice(key).get_shape())
        except Exception as exc:  # safetensors raises its own SafetensorError, and OSError
            raise ValueError(f"{file}: not a complete safetensors file ({type(exc).__name__}: {exc})") from None
    return shapes


def check_checkpoint(path: str | Path) -> ModelConfig:
    """Check that ``path`` will load, without loading it: a supported config, complete
    safetensors files, and every tensor the config implies present with its shape. ``ValueError``
    names the first problem."""
    path = Path(path)
    cfg = load_config(path)
    shapes = checkpoint_shapes(path)
    with torch.device("meta"):
        model = CausalLM(cfg)
    tied = cfg.text.tie_word_embeddings
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    if tied:
        shapes.pop("lm_head.weight", None)
    missing, unexpected = expected.keys() - shapes.keys(), shapes.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise ValueError(f"{path}: tensor {name} has shape {list(shapes[name])} in the checkpoint; "
                             f"the config implies {list(shape)}")
    return cfg


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
