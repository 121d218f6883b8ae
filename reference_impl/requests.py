"""Requests in, outputs out, and the checks that turn bad input into a clear ``ValueError``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from reference_impl.config import ModelConfig


@dataclass(frozen=True)
class Request:
    """One generation request.

    Exactly one of ``prompt_ids`` (token ids; for LLaVA with ``tokens_per_image`` placeholder
    ids per image) and ``prompt_embeds`` (``(n, hidden)`` in the engine's dtype) is given.
    ``images`` are ``(C, S, S)`` pixel tensors, in order of their placeholders. Generation is
    greedy and runs for exactly ``max_new_tokens`` (no end-of-sequence stop), so every setup
    produces the same number of tokens to compare.

    ``forced_tokens`` (teacher forcing): step ``i`` takes ``forced_tokens[i]`` instead of the
    greedy token; the output then holds the forced ids with *their* logprobs, and each step's
    top-k as the engine computed it (its first entry is the engine's own greedy choice). Two
    engines forced along the same tokens are compared on the same prefixes at every step.

    ``prompt_text``: the prompt as text, when it came from text (for reports, like vLLM's
    ``prompt`` beside ``prompt_token_ids``); the engine reads only the ids or embeddings.
    """

    request_id: str
    prompt_ids: tuple[int, ...] | None = None
    prompt_embeds: torch.Tensor | None = None
    images: tuple[torch.Tensor, ...] = ()
    max_new_tokens: int = 16
    top_k: int = 5
    forced_tokens: tuple[int, ...] | None = None
    prompt_logprobs: bool = False
    score_ids: tuple[int, ...] | None = None
    stop_token_ids: tuple[int, ...] = ()
    prompt_text: str | None = None

    @property
    def prompt_len(self) -> int:
        if self.prompt_embeds is not None:
            return int(self.prompt_embeds.shape[0])
        return len(self.prompt_ids or ())

    def score_id(self, pos: int) -> int:
        """The prompt token at ``pos`` that prompt logprobs score."""
        ids = self.score_ids if self.score_ids is not None else self.prompt_ids
        assert ids is not None
        return ids[pos]

    @property
    def kind(self) -> str:
        if self.prompt_embeds is not None:
            return "prompt_embeds"
        return "multimodal" if self.images else "text"


@dataclass
class RequestOutput:
    """Per generated token: its id, its logprob, and the top-k ``(id, logprob)`` of that step.
    With ``Request.prompt_logprobs``: per prompt position 1..n-1 the logprob of that prompt token
    and whether it was the greedy choice there."""

    request_id: str
    prompt_len: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_greedy: list[bool] = field(default_factory=list)


def validate_request(req: Request, cfg: ModelConfig, max_model_len: int, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` naming the problem; nothing is run for an invalid request."""
    rid = req.request_id
    if (req.prompt_ids is None) == (req.prompt_embeds is None):
        raise ValueError(f"request {rid}: give exactly one of prompt_ids and prompt_embeds")
    if req.prompt_len == 0:
        raise ValueError(f"request {rid}: empty prompt")
    if req.max_new_tokens < 1:
        raise ValueError(f"request {rid}: max_new_tokens={req.max_new_tokens} must be >= 1")
    total = req.prompt_len + req.max_new_tokens
    if total > max_model_len:
        raise ValueError(
            f"request {rid}: prompt of {req.prompt_len} tokens + {req.max_new_tokens} new tokens "
            f"= {total} exceeds the model's context of {max_model_len}"
        )
    if req.prompt_ids is not None:
        _check_ids(rid, req.prompt_ids, cfg.text.vocab_size)
    if req.forced_tokens is not None:
        if len(req.forced_tokens) != req.max_new_tokens:
            raise ValueError(f"request {rid}: {len(req.forced_tokens)} forced tokens for "
                             f"max_new_tokens={req.max_new_tokens}; give one per generated token")
        _check_ids(rid, req.forced_tokens, cfg.text.vocab_size)
    if req.prompt_embeds is not None:
        _check_embeds(rid, req.prompt_embeds, cfg.text.hidden_size, dtype)
    _check_scoring(req, cfg.text.vocab_size)
    _check_images(req, cfg)


def _check_scoring(req: Request, vocab: int) -> None:
    rid = req.request_id
    if req.score_ids is not None:
        if req.prompt_embeds is None:
            raise ValueError(f"request {rid}: score_ids are for prompt-embeds requests; token-id prompts "
                             "score their own ids")
        if len(req.score_ids) != req.prompt_len:
            raise ValueError(f"request {rid}: {len(req.score_ids)} score_ids for a prompt of "
                             f"{req.prompt_len} embeddings; give one per position")
        _check_ids(rid, req.score_ids, vocab)
    if req.prompt_logprobs and req.prompt_embeds is not None and req.score_ids is None:
        raise ValueError(f"request {rid}: prompt_logprobs of a prompt-embeds request need score_ids "
                         "(the tokens the embeddings stand for)")
    _check_ids(rid, req.stop_token_ids, vocab)


def _check_ids(rid: str, ids: tuple[int, ...], vocab: int) -> None:
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"request {rid}: token id {bad[0]} outside the vocabulary [0, {vocab})")


def _check_embeds(rid: str, embeds: torch.Tensor, hidden: int, dtype: torch.dtype) -> None:
    if embeds.dim() != 2 or embeds.shape[1] != hidden:
        raise ValueError(
            f"request {rid}: prompt_embeds of shape {tuple(embeds.shape)}, expected (n, {hidden})"
        )
    if embeds.dtype != dtype:
        raise ValueError(
            f"request {rid}: prompt_embeds dtype {embeds.dtype} differs from the engine's {dtype}"
        )
    if not torch.isfinite(embeds).all():
        raise ValueError(f"request {rid}: prompt_embeds hold NaN or Inf")


def _check_images(req: Request, cfg: ModelConfig) -> None:
    rid, mm = req.request_id, cfg.multimodal
    if not req.images:
        if mm is not None and req.prompt_ids and mm.image_token_id in req.prompt_ids:
            raise ValueError(f"request {rid}: image placeholder tokens but no images")
        return
    if mm is None:
        raise ValueError(f"request {rid}: images given but {cfg.architecture} takes none")
    if req.prompt_ids is None:
        raise ValueError(f"request {rid}: images need prompt_ids with placeholder tokens")
    want = (mm.vision.num_channels, mm.vision.image_size, mm.vision.image_size)
    for i, img in enumerate(req.images):
        if tuple(img.shape) != want:
            raise ValueError(
                f"request {rid}: image {i} has shape {tuple(img.shape)}, expected (C, H, W) = {want}"
            )
    placeholders = sum(1 for t in req.prompt_ids if t == mm.image_token_id)
    expected = len(req.images) * mm.tokens_per_image
    if placeholders != expected:
        raise ValueError(
            f"request {rid}: {placeholders} image placeholder tokens for {len(req.images)} images; "
            f"expected {expected} ({mm.tokens_per_image} per image)"
        )
