"""Build a ``CausalLM`` from a local Hugging Face checkpoint directory (config.json + safetensors).

Checkpoints come as one ``*.safetensors`` file or sharded with an index
(``model.safetensors.index.json``), in float32, bfloat16 or float16: every tensor is converted to
the run's dtype as it is read. A rank reads only what it keeps: ``CheckpointWeights`` reads one
tensor, or one slice of it (safetensors reads just the slice's bytes), at a time, so building a
rank's model never holds the full checkpoint (``reference_impl.engine.build_runner``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

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
# runs or checks it (the harness has no comparison tolerance for it); float16 *weights* load.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The floating-point dtypes a checkpoint's tensors may be stored in (safetensors dtype names).
STORED_DTYPES = ("F32", "BF16", "F16")
INDEX_FILE = "model.safetensors.index.json"


def normalize_name(name: str) -> str:
    for old, new in _PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files: those its index names (``model.safetensors.index.json``),
    else every ``*.safetensors`` in the directory. ``ValueError`` when there are none, or when the
    index names a file that is missing."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: not a safetensors index with a weight_map ({exc})") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} names shards that are missing: {', '.join(missing[:5])}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} holds no *.safetensors weights")
    return files


class CheckpointWeights:
    """A checkpoint's tensors by engine name (``normalize_name``), read on demand: whole, or a
    block of rows and/or columns, converted to ``dtype`` on ``device``.

    Only the headers are read up front. Each read opens the tensor's file, copies out exactly the
    requested slice into memory of its own and closes the file again, so no mapping of the file
    outlives the read: what a rank holds is what it keeps (the slices), plus one tensor's pages
    at a time.
    A tied checkpoint may omit ``lm_head.weight``: it reads as ``model.embed_tokens.weight``.
    """

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", tied: bool = False) -> None:
        self.path, self.dtype, self.device = Path(path), dtype, torch.device(device)
        self.where: dict[str, tuple[Path, str]] = {}  # engine name -> (file, name in the file)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.stored: dict[str, str] = {}  # engine name -> safetensors dtype ("BF16", ...)
        for file in weight_files(self.path):
            self._scan(file)
        if tied and "lm_head.weight" not in self.where and "model.embed_tokens.weight" in self.where:
            self.where["lm_head.weight"] = self.where["model.embed_tokens.weight"]
            self.shapes["lm_head.weight"] = self.shapes["model.embed_tokens.weight"]
            self.stored["lm_head.weight"] = self.stored["model.embed_tokens.weight"]

    def _scan(self, file: Path) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(file), "pt") as f:  # validates the header against the file's size
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    name = normalize_name(key)
                    if name in self.where:
                        raise ValueError(f"tensor {key} is in both {self.where[name][0].name} and {file.name}")
                    part = f.get_slice(key)
                    self.where[name] = (file, key)
                    self.shapes[name] = tuple(part.get_shape())
                    self.stored[name] = str(part.get_dtype())
        except ValueError:
            raise
        except Exception as exc:  # safetensors raises its own SafetensorError, and OSError
            raise ValueError(f"{file}: not a complete safetensors file ({type(exc).__name__}: {exc})") from None

    def get(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """Tensor ``name`` (rows ``rows`` and, for a matrix, columns ``cols``) in the run's dtype."""
        from safetensors import safe_open

        if name not in self.where:
            raise ValueError(f"{self.path}: the checkpoint has no tensor {name}")
        stored = self.stored[name]
        if stored not in STORED_DTYPES:
            raise ValueError(f"{self.path}: tensor {name} is stored as {stored}; the engine reads {STORED_DTYPES}")
        file, key = self.where[name]
        with safe_open(str(file), "pt") as f:
            part = f.get_slice(key)
            index = (rows or slice(None),) if cols is None else (rows or slice(None), cols)
            tensor = part[index]  # only these bytes are read, in the stored dtype
        # A copy even when the dtype matches: the slice may be a view of the whole tensor's memory
        # map (measured: a bf16 row block of the embedding kept the 54 MiB mapping alive), and a
        # rank owns its weights, not mappings of files that could change under it.
        return tensor.to(device=self.device, dtype=self.dtype, copy=True).contiguous()


def check_checkpoint(path: str | Path) -> ModelConfig:
    """Check that ``path`` will load, without loading it: a supported config, complete
    safetensors files (those of its index, when sharded), every tensor the config implies present
    with its shape and a floating-point dtype. ``ValueError`` names the first problem."""
    path = Path(path)
    cfg = load_config(path)
    weights = CheckpointWeights(path, tied=cfg.text.tie_word_embeddings)
    model = meta_model(cfg)
    try:
        check_complete(model, weights)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    for name, param in model.state_dict().items():
        if weights.shapes[name] != tuple(param.shape):
            raise ValueError(f"{path}: tensor {name} has shape {list(weights.shapes[name])} in the checkpoint; "
                             f"the config implies {list(param.shape)}")
        if weights.stored[name] not in STORED_DTYPES:
            raise ValueError(f"{path}: tensor {name} is stored as {weights.stored[name]}; "
                             f"the engine reads {', '.join(STORED_DTYPES)}")
    return cfg


def meta_model(cfg: ModelConfig) -> CausalLM:
    """The model's structure with no storage (every parameter on the meta device), tied."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    model.tie_weights()
    return model


def materialize(model: CausalLM, weights: CheckpointWeights) -> CausalLM:
    """Read every parameter of ``model`` still on the meta device from ``weights`` (whole), keeping
    shared parameters shared (a tied head), and set the buffers that are not in the checkpoint.
    ``ValueError`` names a parameter the checkpoint lacks or holds in another shape."""
    done: dict[int, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        for leaf, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in done:
                name = f"{prefix}.{leaf}" if prefix else leaf
                tensor = weights.get(name)
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ValueError(f"{weights.path}: tensor {name} has shape {list(tensor.shape)} in the "
                                     f"checkpoint; the model needs {list(param.shape)}")
                done[id(param)] = nn.Parameter(tensor, requires_grad=False)
            setattr(module, leaf, done[id(param)])
    _reset_buffers(model, weights.device)
    return model


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> CausalLM:
    """The full (unsharded) model on ``device`` in ``dtype``."""
    cfg: ModelConfig = load_config(Path(path))
    weights = CheckpointWeights(path, dtype, device, tied=cfg.text.tie_word_embeddings)
    model = meta_model(cfg)
    check_complete(model, weights)
    return materialize(model, weights).eval()


def check_complete(model: CausalLM, weights: CheckpointWeights) -> None:
    """Every parameter of the full ``model`` is in the checkpoint, and nothing else is (a tied
    checkpoint may omit the head): ``ValueError`` naming the first few of either."""
    tied = model.cfg.text.tie_word_embeddings
    expected = {k for k in model.state_dict() if not (tied and k == "lm_head.weight")}
    present = {k for k in weights.where if not (tied and k == "lm_head.weight")}
    missing, unexpected = expected - present, present - expected
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def _reset_buffers(model: CausalLM, device: torch.device) -> None:
    """RoPE inverse frequencies are not in the checkpoint and stay fp32 in any model dtype."""
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.inv_freq = rope_inv_freq(model.cfg.text.head_dim, model.cfg.text.rope).to(device)
