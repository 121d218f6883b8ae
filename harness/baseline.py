"""Baseline outputs: a disk cache keyed by what determines them, and the Hugging Face baseline.

Key = (checkpoint hash, requests hash, the baseline's full spec without the checkpoint path (the
reference engine's ``EngineSpec``: parallel degrees, dtype, device, ``EngineConfig``,
``CompileConfig``; another engine's spec with its identity: for transformers' TP its version,
torch's and the adapter's source hash) or, for ``hf``, the
transformers version and the source of ``hf_generate``, dtype, device, the engine's code hash and
torch's version), so a change to any input that changes baseline outputs misses the cache.
Entries are written atomically; concurrent xdist workers and consecutive runs share them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch

from harness.engines.base import BuildSpec
from reference_impl.requests import Request, RequestOutput

REPO_ROOT = Path(__file__).resolve().parents[1]


def _sha(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()[:16]


@cache
def checkpoint_hash(path: str) -> str:
    files = sorted(p for p in Path(path).iterdir() if p.suffix in (".json", ".safetensors"))
    return _sha(*(f.name.encode() + f.read_bytes() for f in files))


@cache
def engine_code_hash() -> str:
    sources = sorted((REPO_ROOT / "reference_impl").rglob("*.py"))
    return _sha(*(str(p.relative_to(REPO_ROOT)).encode() + p.read_bytes() for p in sources))


@cache
def hf_code_hash() -> str:
    """Hash of the code that produces ``hf`` baselines (``hf_generate`` and its per-request step)."""
    return _sha(inspect.getsource(hf_generate).encode(), inspect.getsource(_hf_one).encode())


def baseline_identity(baseline: BuildSpec | str) -> str:
    """What defines a baseline's outputs besides checkpoint, requests, dtype and device: an engine
    setup's spec without the checkpoint path (a different path to the same bytes is the same
    baseline) with, for an engine other than the reference one, its identity (the
    transformers engine: transformers' and torch's versions and its adapter's source hash); or for
    ``hf`` the transformers version and the hash of ``hf_generate``'s source."""
    if not isinstance(baseline, str):
        from harness.engines import kind_of

        spec = repr(dataclasses.replace(baseline, checkpoint=""))  # type: ignore[type-var]
        identity = kind_of(baseline).identity()
        return f"{spec}/{identity}" if identity else spec
    from importlib import metadata

    return f"{baseline}/transformers={metadata.version('transformers')}/{hf_code_hash()}"


def requests_hash(requests: Sequence[Request]) -> str:
    chunks: list[bytes] = []
    for r in requests:
        chunks.append(repr((r.request_id, r.prompt_ids, r.max_new_tokens, r.top_k, r.forced_tokens,
                            r.prompt_logprobs, r.score_ids, r.stop_token_ids)).encode())
        for t in ([r.prompt_embeds] if r.prompt_embeds is not None else []) + list(r.images):
            chunks.append(str(t.dtype).encode() + t.detach().float().cpu().numpy().tobytes())
    return _sha(*chunks)


def outputs_to_json(outputs: Sequence[RequestOutput]) -> list[dict[str, Any]]:
    return [{"request_id": o.request_id, "prompt_len": o.prompt_len, "token_ids": o.token_ids,
             "logprobs": o.logprobs, "top_logprobs": [[list(p) for p in step] for step in o.top_logprobs]}
            for o in outputs]


def outputs_from_json(data: list[dict[str, Any]]) -> list[RequestOutput]:
    return [RequestOutput(d["request_id"], d["prompt_len"], list(d["token_ids"]), list(d["logprobs"]),
                          [[(int(i), float(lp)) for i, lp in step] for step in d["top_logprobs"]])
            for d in data]


class BaselineCache:
    """``get(key)`` / ``put(key, outputs)`` under ``root`` (one JSON file per key)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    def key(checkpoint: str, requests: Sequence[Request], baseline: BuildSpec | str, dtype: str,
            device: str) -> str:
        """The cache key of ``baseline`` (its ``EngineSpec``, or ``"hf"``) on ``requests``."""
        return _sha(checkpoint_hash(checkpoint).encode(), requests_hash(requests).encode(),
                    f"{baseline_identity(baseline)}/{dtype}/{device}".encode(), engine_code_hash().encode(),
                    f"torch={torch.__version__}".encode())

    def get(self, key: str) -> list[RequestOutput] | None:
        path = self.root / f"{key}.json"
        if not path.is_file():
            return None
        try:
            return outputs_from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError):
            return None  # a damaged entry is a miss

    def put(self, key: str, outputs: Sequence[RequestOutput]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(outputs_to_json(outputs), f)
        os.replace(tmp, self.root / f"{key}.json")


# -- Hugging Face transformers at tp=1 -------------------------------------------------------------

def hf_generate(checkpoint: str, requests: Sequence[Request], dtype: str = "float32",
                device: str = "cpu") -> list[RequestOutput]:
    """Greedy generation with transformers, one request at a time, with the chosen-token logprob
    and the top-k logprobs of every step (log_softmax of the raw fp32 logits)."""
    import transformers as tf

    from reference_impl.config import load_config
    from reference_impl.loader import DTYPES

    cfg = load_config(checkpoint)
    cls: Any = tf.LlavaForConditionalGeneration if cfg.multimodal else tf.AutoModelForCausalLM
    # safetensors only: a checkpoint's pytorch_model.bin would be unpickled (code execution).
    model = cls.from_pretrained(checkpoint, dtype=DTYPES[dtype], use_safetensors=True).to(device).eval()
    # The engine runs every request for exactly max_new_tokens and never stops at, nor avoids, an
    # end-of-sequence token; so must transformers: with the checkpoint's eos id, min_new_tokens
    # would mask EOS's logit (a real chat model answering in 7 tokens then picks another token).
    model.generation_config.eos_token_id = None
    return [_hf_one(model, r, device) for r in requests]


def _hf_one(model: Any, req: Request, device: str) -> RequestOutput:
    # An explicit all-ones attention mask: without one, generate() infers it as input_ids !=
    # pad_token_id and silently drops every prompt token with id 0 (found by parity fuzz: a
    # prompt holding id 0, the first id of vocabulary shard 0, got another baseline).
    kwargs: dict[str, Any] = {"attention_mask": torch.ones(1, req.prompt_len, dtype=torch.long, device=device)}
    if req.prompt_embeds is not None:
        kwargs["inputs_embeds"] = req.prompt_embeds[None].to(device)
    else:
        kwargs["input_ids"] = torch.tensor([req.prompt_ids], device=device)
        if req.images:
            kwargs["pixel_values"] = torch.stack(req.images).to(device, model.dtype)
    with torch.no_grad():
        out = model.generate(**kwargs, max_new_tokens=req.max_new_tokens, min_new_tokens=req.max_new_tokens,
                             do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    result = RequestOutput(req.request_id, req.prompt_len)
    tokens = out.sequences[0, -req.max_new_tokens:].tolist()
    for token, logits in zip(tokens, out.logits):
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        top_lp, top_ids = torch.topk(logprobs, req.top_k)
        result.token_ids.append(int(token))
        result.logprobs.append(float(logprobs[token]))
        result.top_logprobs.append(list(zip(top_ids.tolist(), top_lp.tolist())))
    return result
