"""One rank of the transformers TP engine (``harness.engines.transformers_tp`` says what it is):
load with ``tp_plan="auto"``, generate with transformers' own forward passes and KV cache, capture
per-layer activations through forward hooks."""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from harness.engines.base import weight_bytes
from harness.engines.greedy import finished, record_step, score_prompt
from harness.engines.transformers_tp import TransformersSpec
from reference_impl.config import ModelConfig, load_config
from reference_impl.loader import DTYPES
from reference_impl.requests import Request, RequestOutput, validate_request


@functools.cache
def cache_field() -> str:
    """The KV cache's name in a forward's output and keyword arguments: ``cache`` in the newer
    transformers (5.24 here), ``past_key_values`` in older ones (5.17 on the GPU machines)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def load_model(spec: TransformersSpec, device: torch.device) -> Any:
    """The checkpoint through ``from_pretrained``: sharded by ``tp_plan="auto"`` over the default
    process group when ``spec.tp > 1`` (the worker has joined it), else whole on ``device``.
    safetensors only: a checkpoint's pytorch_model.bin would be unpickled (code execution)."""
    import transformers as tf
    from transformers.distributed.configuration_utils import DistributedConfig

    hf_logging: Any = tf.utils.logging
    hf_logging.disable_progress_bar()
    config = tf.AutoConfig.from_pretrained(spec.checkpoint)
    cls: Any = tf.LlavaForConditionalGeneration if hasattr(config, "vision_config") else tf.AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": DTYPES[spec.dtype]}
    if spec.tp > 1:
        if dist.get_world_size() != spec.tp:
            raise ValueError(f"tp={spec.tp} needs a process group of {spec.tp} ranks, not {dist.get_world_size()}")
        # transformers binds each rank's accelerator from LOCAL_RANK (CPU ranks ignore it).
        os.environ["LOCAL_RANK"] = str(device.index or 0)
        kwargs["distributed_config"] = DistributedConfig(tp_plan="auto", tp_size=spec.tp)
    else:
        kwargs["device_map"] = device
    return cls.from_pretrained(spec.checkpoint, use_safetensors=True, **kwargs).eval()


def _local(x: Any) -> torch.Tensor:
    """A plain tensor of ``x``'s full value: a DTensor (sharded or replicated over the TP mesh,
    along the sequence too under a sequence-parallel plan) is gathered."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


class TransformersEngine:
    """transformers' model on this rank, serving requests one at a time (batch size 1)."""

    def __init__(self, model: Any, cfg: ModelConfig, device: torch.device, tp: int) -> None:
        self.model, self.cfg, self.device, self.tp = model, cfg, device, tp
        self.dtype: torch.dtype = model.dtype
        self.max_model_len = cfg.text.max_position_embeddings
        self.tp_rank = dist.get_rank() if tp > 1 else 0

    @classmethod
    def build(cls, spec: TransformersSpec, device: torch.device) -> TransformersEngine:
        return cls(load_model(spec, device), load_config(spec.checkpoint), device, spec.tp)

    def _validate(self, requests: Sequence[Request]) -> None:
        for req in requests:
            validate_request(req, self.cfg, self.max_model_len, self.dtype)
        if len({r.request_id for r in requests}) != len(requests):
            raise ValueError("request ids must be unique")

    def _prompt_inputs(self, req: Request) -> dict[str, torch.Tensor]:
        """The prompt as transformers takes it: ``inputs_embeds`` (1, n, H) for prompt-embeds,
        else ``input_ids`` (1, n), with ``pixel_values`` (images, C, S, S) for LLaVA's own pixel
        path (the vision tower and projector inside the model; no processor)."""
        if req.prompt_embeds is not None:
            return {"inputs_embeds": req.prompt_embeds[None].to(self.device)}
        inputs = {"input_ids": torch.tensor([req.prompt_ids], device=self.device)}
        if req.images:
            inputs["pixel_values"] = torch.stack(list(req.images)).to(self.device, self.dtype)
        return inputs

    def generate(self, requests: Sequence[Request]) -> list[RequestOutput]:
        self._validate(requests)
        with torch.no_grad():
            return [self._generate_one(req) for req in requests]

    def _generate_one(self, req: Request) -> RequestOutput:
        """Prefill the whole prompt, then one forward per token over transformers' KV cache."""
        out = RequestOutput(req.request_id, req.prompt_len)
        result = self.model(**self._prompt_inputs(req), use_cache=True)
        logits = _local(result.logits)[0]  # (n, vocab): the LM head's output is gathered over TP
        if req.prompt_logprobs:
            score_prompt(logits, req, out)
        while True:
            token = record_step(logits[-1], req, out)
            if finished(req, out):
                return out
            step = torch.tensor([[token]], device=self.device)  # (1, 1)
            result = self.model(input_ids=step, use_cache=True, **{cache_field(): getattr(result, cache_field())})
            logits = _local(result.logits)[0]

    def decoder_layers(self) -> list[Any]:
        """The text decoder's layers (LLaVA: its language model's)."""
        return list(self.model.get_decoder().layers)

    def capture_prefill(self, requests: Sequence[Request]) -> dict[str, torch.Tensor]:
        """Each request's prefill with a forward hook on every decoder layer's
        ``post_attention_layernorm``: its input is the residual stream after the attention add
        (``residual``), its output the normed MLP input (``hidden_states``), the same two tensors
        the reference engine captures. Rows are concatenated over the requests (no padding)."""
        self._validate(requests)
        rows: dict[str, list[torch.Tensor]] = {}

        def hook(index: int) -> Any:
            def record(module: Any, args: tuple[Any, ...], output: Any) -> None:
                for name, x in (("residual", args[0]), ("hidden_states", output)):
                    full = _local(x).detach().float().cpu()  # (1, n, H)
                    rows.setdefault(f"{index}.{name}", []).append(full.reshape(-1, full.shape[-1]))
            return record

        handles = [layer.post_attention_layernorm.register_forward_hook(hook(i))
                   for i, layer in enumerate(self.decoder_layers())]
        try:
            with torch.no_grad():
                for req in requests:
                    self.model(**self._prompt_inputs(req), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        if self.tp_rank != 0:
            return {}
        out = {key: torch.cat(parts) for key, parts in rows.items()}
        out["num_tokens"] = torch.tensor(sum(r.prompt_len for r in requests))
        out["offsets"] = torch.tensor([0, *itertools.accumulate(r.prompt_len for r in requests)])
        return out

    def compiled_steps(self) -> list[dict[str, Any]]:
        return []

    def compile_records(self) -> list[dict[str, object]]:
        return []

    def weight_bytes(self) -> int:
        """This rank's part of the model's parameters: under ``tp_plan="auto"`` each is a
        ``DTensor`` whose local shard (or replica) is what the rank holds."""
        return weight_bytes(self.model)
