"""Bad input gets a ValueError that names the problem, before anything runs."""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path

import pytest
import torch

from reference_impl.config import config_from_dict
from reference_impl.loader import load_model
from reference_impl.model import CausalLM
from reference_impl.requests import Request
from reference_impl.runner import EngineConfig, Runner
from scenarios.models import checkpoint, resolve


@cache
def model(name: str) -> CausalLM:
    return load_model(checkpoint(name))


def run(name: str, req: Request) -> None:
    Runner(model(name), EngineConfig()).generate([req])


def test_token_id_outside_vocab() -> None:
    with pytest.raises(ValueError, match=r"token id 512 outside the vocabulary \[0, 512\)"):
        run("tiny-llama", Request("r", (1, 2, 512)))


def test_negative_token_id() -> None:
    with pytest.raises(ValueError, match="token id -1 outside"):
        run("tiny-llama", Request("r", (-1, 2)))


def test_empty_prompt() -> None:
    with pytest.raises(ValueError, match="empty prompt"):
        run("tiny-llama", Request("r", ()))


def test_prompt_longer_than_context() -> None:
    with pytest.raises(ValueError, match=r"prompt of 250 tokens \+ 16 new tokens = 266 exceeds the model's context of 256"):
        run("tiny-llama", Request("r", (1,) * 250, max_new_tokens=16))


def test_prompt_embeds_wrong_hidden_size() -> None:
    with pytest.raises(ValueError, match=r"prompt_embeds of shape \(4, 32\), expected \(n, 64\)"):
        run("tiny-llama", Request("r", prompt_embeds=torch.zeros(4, 32)))


def test_prompt_embeds_wrong_dtype() -> None:
    with pytest.raises(ValueError, match="prompt_embeds dtype torch.float64 differs from the engine's torch.float32"):
        run("tiny-llama", Request("r", prompt_embeds=torch.zeros(4, 64, dtype=torch.float64)))


def test_both_ids_and_embeds() -> None:
    with pytest.raises(ValueError, match="exactly one of prompt_ids and prompt_embeds"):
        run("tiny-llama", Request("r", (1,), prompt_embeds=torch.zeros(1, 64)))


def _mm_ids(n_images: int) -> tuple[int, ...]:
    return (5,) + (500,) * 16 * n_images + (6,)


def test_image_wrong_size() -> None:
    with pytest.raises(ValueError, match=r"image 0 has shape \(3, 16, 16\), expected \(C, H, W\) = \(3, 32, 32\)"):
        run("tiny-llava", Request("r", _mm_ids(1), images=(torch.zeros(3, 16, 16),)))


def test_image_wrong_channels() -> None:
    with pytest.raises(ValueError, match=r"image 0 has shape \(1, 32, 32\)"):
        run("tiny-llava", Request("r", _mm_ids(1), images=(torch.zeros(1, 32, 32),)))


def test_placeholder_count_mismatch() -> None:
    with pytest.raises(ValueError, match="16 image placeholder tokens for 2 images; expected 32"):
        run("tiny-llava", Request("r", _mm_ids(1), images=(torch.zeros(3, 32, 32),) * 2))


def test_images_for_text_model() -> None:
    with pytest.raises(ValueError, match="images given but LlamaForCausalLM takes none"):
        run("tiny-llama", Request("r", _mm_ids(1), images=(torch.zeros(3, 32, 32),)))


def test_unsupported_architecture(tmp_path: Path) -> None:
    shutil.copytree(checkpoint("tiny-llama"), tmp_path / "ckpt")
    cfg_file = tmp_path / "ckpt" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_model(tmp_path / "ckpt")


def test_unsupported_rope_type() -> None:
    cfg = json.loads((checkpoint("tiny-llama") / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'"):
        config_from_dict(cfg)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="neither a built-in model"):
        resolve(str(tmp_path))


def test_checkpoint_missing_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoint("tiny-llama"), tmp_path / "ckpt")
    file = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(str(file))
    del state["model.norm.weight"]
    save_file(state, str(file))
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        load_model(tmp_path / "ckpt")
