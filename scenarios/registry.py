"""The scenario registry: each scenario by name, the requests it sends (built by ``scenarios.inputs``)
and what a model must support to run them; and the scenario of a requests file
(``parity run --requests FILE``, ``scenarios.request_file``), named ``file:<stem>``. Scenarios are data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from reference_impl.config import ModelConfig, load_config
from reference_impl.loader import DTYPES
from reference_impl.requests import Request
from scenarios import inputs, prompts
from scenarios.request_file import SCENARIO_PREFIX, load_requests, scenario_name


@dataclass(frozen=True)
class Scenario:
    """A named batch of requests. ``needs_images``: only for multimodal (LLaVA) models."""

    name: str
    description: str
    needs_images: bool = False

    def skip_reason(self, cfg: ModelConfig) -> str | None:
        if self.needs_images and cfg.multimodal is None:
            return f"scenario {self.name} needs images; {cfg.architecture} takes none"
        return None

    def requests(self, checkpoint: Path, dtype: str, seed: int = 0, max_new_tokens: int = 16) -> list[Request]:
        """The scenario's requests for ``checkpoint``: real text (``scenarios.prompts``) when it
        ships a tokenizer, else random ids and embeddings drawn from ``seed``."""
        cfg = load_config(checkpoint)
        spec = inputs.InputSpec(max_new_tokens=max_new_tokens, seed=seed)
        builders = _REAL_TEXT if prompts.has_tokenizer(checkpoint) else _RANDOM
        return builders[self.name](cfg, checkpoint, spec, DTYPES[dtype])


Builder = Callable[[ModelConfig, Path, inputs.InputSpec, torch.dtype], list[Request]]
_RANDOM: dict[str, Builder] = {
    "text": lambda cfg, ck, spec, dt: inputs.text(cfg, spec),
    "prompt_embeds": lambda cfg, ck, spec, dt: inputs.prompt_embeds(cfg, inputs.embedding_table(ck), spec, dt),
    "multimodal": lambda cfg, ck, spec, dt: inputs.multimodal(cfg, spec),
    "mixed": lambda cfg, ck, spec, dt: inputs.mixed(cfg, inputs.embedding_table(ck), spec, dt),
}


def _real_mixed(cfg: ModelConfig, ck: Path, spec: inputs.InputSpec, dt: torch.dtype) -> list[Request]:
    """Real text and real prompt-embeds (and, for LLaVA, image requests) in one batch."""
    reqs = prompts.text_requests(ck, cfg, prompts.MIXED_TEXT_PROMPTS, spec.max_new_tokens, spec.top_k, "mix-text")
    reqs += prompts.embeds_requests(ck, cfg, inputs.embedding_table(ck), prompts.MIXED_EMBEDS_PROMPTS, dt,
                                    spec.max_new_tokens, spec.top_k, "mix-emb")
    if cfg.multimodal is not None:
        reqs += inputs.multimodal(cfg, spec, "mix-mm")[:2]
    return reqs


# Checkpoints with a tokenizer: the built-in prompt set (the seed does not change it).
_REAL_TEXT: dict[str, Builder] = {
    "text": lambda cfg, ck, spec, dt: prompts.text_requests(ck, cfg, prompts.TEXT_PROMPTS, spec.max_new_tokens,
                                                            spec.top_k),
    "prompt_embeds": lambda cfg, ck, spec, dt: prompts.embeds_requests(
        ck, cfg, inputs.embedding_table(ck), prompts.EMBEDS_PROMPTS, dt, spec.max_new_tokens, spec.top_k),
    "multimodal": lambda cfg, ck, spec, dt: inputs.multimodal(cfg, spec),
    "mixed": _real_mixed,
}

SCENARIOS: dict[str, Scenario] = {
    s.name: s for s in (
        Scenario("text", "token ids: with a tokenizer, the built-in prompts (scenarios.prompts: short and long, "
                 "chat-templated); else random ids of lengths 1, 7, 13 and 70 (chunked), on vocab-shard boundaries"),
        Scenario("prompt_embeds", "real (n, hidden) tensors: with a tokenizer, the embeddings of built-in prompts; "
                 "else token embeddings plus noise, lengths 5, 11, 33"),
        Scenario("multimodal", "prompts with one or two images through the vision tower", needs_images=True),
        Scenario("mixed", "text, prompt-embeds and (LLaVA) image requests in one batch"),
    )
}


@dataclass(frozen=True)
class FileScenario:
    """The requests of a file (``scenarios.request_file``): the same for every seed and dtype
    (prompt-embeds are cast to the run's), each with its own ``max_new_tokens`` and ``top_k``."""

    path: Path

    @property
    def name(self) -> str:
        return scenario_name(self.path)

    @property
    def description(self) -> str:
        return f"requests from {self.path}"

    def skip_reason(self, cfg: ModelConfig) -> str | None:
        return None  # a file the model cannot take is refused before the run (load_requests)

    def requests(self, checkpoint: Path, dtype: str, seed: int = 0, max_new_tokens: int = 16) -> list[Request]:
        return load_requests(self.path, load_config(checkpoint), DTYPES[dtype])


AnyScenario = Scenario | FileScenario


def get_scenario(name: str, requests_file: str | Path | None = None) -> AnyScenario:
    """The scenario ``name``: a registered one, or ``file:<stem>`` of ``requests_file``."""
    if name.startswith(SCENARIO_PREFIX):
        if requests_file is None:
            raise ValueError(f"scenario {name!r} is a requests file's: give the file with --requests FILE")
        if name != scenario_name(requests_file):
            raise ValueError(f"scenario {name!r} is not the one of --requests {requests_file} "
                             f"({scenario_name(requests_file)})")
        return FileScenario(Path(requests_file))
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}: choose from {', '.join(SCENARIOS)}, "
                         f"or {SCENARIO_PREFIX}<stem> with --requests FILE")
    return SCENARIOS[name]
