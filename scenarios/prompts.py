"""Real text: a small built-in prompt set, tokenized with the checkpoint's own tokenizer.

When a checkpoint ships a tokenizer (``tokenizer.json``), the text, prompt-embeds and mixed
scenarios send these prompts instead of random ids (``scenarios.registry``), so that what the
engine generates is text a person can read, and the report shows it. Prompts marked ``chat`` are
a user message put through the tokenizer's chat template where it has one (SmolLM2-Instruct
does; gsm-llama does not, and gets the raw text); the others are plain text to continue.
Prompt-embeds requests are the real embeddings of the same prompts: the rows of the
checkpoint's own embedding table for their token ids, which is what a serving stack that takes
``--enable-prompt-embeds`` is sent.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reference_impl.config import ModelConfig
from reference_impl.requests import Request

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class Prompt:
    """One prompt of the set: ``chat``: a user message (chat-templated where there is a template),
    else plain text to continue."""

    name: str
    text: str
    chat: bool


_PARAGRAPH = (
    "The printing press was invented by Johannes Gutenberg in Mainz around 1440. Before it, books "
    "were copied by hand, which made them rare and expensive, and a single copy of a long book could "
    "take a scribe more than a year. Gutenberg combined movable metal type, an oil-based ink and a "
    "wooden screw press adapted from those used to make wine. Within fifty years printing shops had "
    "spread to more than two hundred cities across Europe and had produced millions of books. Cheaper "
    "books helped spread literacy, allowed scientists to share and check each other's results, and "
    "made it far harder for anyone to control which ideas people could read."
)

# Short and long: a word or two, a sentence to complete, a chat question, a word problem in the
# gsm8k format (what gsm-llama was trained on), and a long chat request whose prompt is several
# times the harness's step budget (24 tokens), so its prefill is chunked across steps.
PROMPTS: tuple[Prompt, ...] = (
    Prompt("word", "Hello", chat=False),
    Prompt("complete", "The capital of France is", chat=False),
    Prompt("question", "What is the capital of France?", chat=True),
    Prompt("problem", "Question: Tom has 3 boxes with 12 apples in each box. He gives 7 apples to his "
                      "sister. How many apples does he have left?\nAnswer:", chat=False),
    Prompt("summary", f"Summarize this paragraph in one sentence.\n\n{_PARAGRAPH}", chat=True),
)
# Which prompts each scenario sends (by name): prompt-embeds and mixed take a short, a chat and
# the long one.
TEXT_PROMPTS = tuple(p.name for p in PROMPTS)
EMBEDS_PROMPTS = ("complete", "question", "summary")
MIXED_TEXT_PROMPTS, MIXED_EMBEDS_PROMPTS = ("word", "problem"), ("question", "summary")


def has_tokenizer(checkpoint: str | Path) -> bool:
    """Whether the checkpoint directory ships a (fast) tokenizer."""
    return (Path(checkpoint) / TOKENIZER_FILE).is_file()


@functools.lru_cache(maxsize=4)
def _tokenizer(checkpoint: str) -> Any:
    import transformers as tf

    return tf.AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)


def encode(checkpoint: str | Path, prompt: Prompt, cfg: ModelConfig) -> tuple[tuple[int, ...], str]:
    """(token ids, the text they encode) of ``prompt`` with the checkpoint's tokenizer; a chat prompt
    goes through the chat template when the tokenizer has one. ``ValueError`` when the tokenizer
    produces an id outside the model's vocabulary or no ids at all."""
    tok = _tokenizer(str(checkpoint))
    if prompt.chat and getattr(tok, "chat_template", None):
        text = str(tok.apply_chat_template([{"role": "user", "content": prompt.text}], tokenize=False,
                                           add_generation_prompt=True))
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
    else:
        text = prompt.text
        ids = list(tok(text)["input_ids"])
    if not ids:
        raise ValueError(f"{checkpoint}: the tokenizer encodes prompt {prompt.name!r} as no tokens")
    if max(ids) >= cfg.text.vocab_size:
        raise ValueError(f"{checkpoint}: the tokenizer gives id {max(ids)} for prompt {prompt.name!r}; "
                         f"the model's vocabulary has {cfg.text.vocab_size}")
    return tuple(int(i) for i in ids), text


def _prompt(name: str) -> Prompt:
    return next(p for p in PROMPTS if p.name == name)


def text_requests(checkpoint: str | Path, cfg: ModelConfig, names: tuple[str, ...], max_new_tokens: int,
                  top_k: int, tag: str = "text") -> list[Request]:
    """One token-id request per prompt, ``<tag>-<prompt name>``."""
    reqs = []
    for name in names:
        ids, text = encode(checkpoint, _prompt(name), cfg)
        reqs.append(Request(f"{tag}-{name}", ids, max_new_tokens=max_new_tokens, top_k=top_k, prompt_text=text))
    return reqs


def embeds_requests(checkpoint: str | Path, cfg: ModelConfig, table: torch.Tensor, names: tuple[str, ...],
                    dtype: torch.dtype, max_new_tokens: int, top_k: int, tag: str = "embeds") -> list[Request]:
    """One prompt-embeds request per prompt: the rows of the embedding ``table`` (vocab, hidden) for
    its token ids, ``(n, hidden)`` in ``dtype``."""
    reqs = []
    for name in names:
        ids, text = encode(checkpoint, _prompt(name), cfg)
        rows = table[torch.tensor(ids)].to(dtype)  # (n, H)
        reqs.append(Request(f"{tag}-{name}", prompt_embeds=rows, max_new_tokens=max_new_tokens, top_k=top_k,
                            prompt_text=text))
    return reqs
