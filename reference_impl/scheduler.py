"""Continuous batching: which tokens of which requests run in each step.

Running requests decode first (one token each), then prompts are prefilled in arrival order
within the step's token budget; with chunked prefill a prompt may be split across steps, so a
step can mix decodes and prefill chunks. The schedule is a pure function of the requests and
the config, so every rank computes the same one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from reference_impl.requests import Request, RequestOutput


@dataclass
class SeqState:
    """A request being served: cache slot, how many of its tokens are in the cache, outputs."""

    request: Request
    slot: int
    output: RequestOutput
    num_computed: int = 0
    prompt_embeds: torch.Tensor | None = None  # (prompt_len, H): embeds and multimodal prompts

    @property
    def prompt_len(self) -> int:
        return self.request.prompt_len

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.prompt_len

    @property
    def finished(self) -> bool:
        tokens = self.output.token_ids
        stopped = bool(tokens) and tokens[-1] in self.request.stop_token_ids
        return stopped or len(tokens) >= self.request.max_new_tokens

    def token_at(self, pos: int) -> int:
        """The token id at ``pos`` (prompt ids, then generated ids); 0 for embeds positions."""
        if pos < self.prompt_len:
            ids = self.request.prompt_ids
            return ids[pos] if ids is not None else 0
        return self.output.token_ids[pos - self.prompt_len]


@dataclass(frozen=True)
class Chunk:
    """``num_tokens`` tokens of ``seq`` from position ``start``; ``sample`` if the step's last
    row of this chunk produces a new token (end of prompt, or a decode)."""

    seq: SeqState
    start: int
    num_tokens: int

    @property
    def is_prefill(self) -> bool:
        return self.start < self.seq.prompt_len

    @property
    def sample(self) -> bool:
        return self.start + self.num_tokens >= self.seq.prompt_len


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 64
    chunked_prefill: bool = True


@dataclass
class Scheduler:
    cfg: SchedulerConfig
    waiting: deque[SeqState] = field(default_factory=deque)
    running: list[SeqState] = field(default_factory=list)
    free_slots: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.free_slots = list(range(self.cfg.max_num_seqs))

    def add(self, seq: SeqState) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Chunk]:
        """The chunks of the next step (never empty while there is work)."""
        budget = self.cfg.max_num_batched_tokens
        chunks: list[Chunk] = []
        for seq in self.running:
            if seq.in_prefill:
                continue
            chunks.append(Chunk(seq, seq.num_computed, 1))
            budget -= 1
        for seq in [s for s in self.running if s.in_prefill] + list(self.waiting):
            if budget <= 0:
                break
            if seq not in self.running:
                if len(self.running) >= self.cfg.max_num_seqs:
                    break
                self.waiting.popleft()
                seq.slot = self.free_slots.pop(0)
                self.running.append(seq)
            remaining = seq.prompt_len - seq.num_computed
            n = min(remaining, budget) if self.cfg.chunked_prefill else remaining
            if not self.cfg.chunked_prefill and n > budget and chunks:
                break
            chunks.append(Chunk(seq, seq.num_computed, n))
            budget -= n
        return chunks

    def finish_step(self, chunks: list[Chunk]) -> list[SeqState]:
        """Advance the caches' fill levels; return (and drop) the sequences that finished."""
        for c in chunks:
            c.seq.num_computed = c.start + c.num_tokens
        done = [s for s in self.running if s.finished]
        self.running = [s for s in self.running if not s.finished]
        self.free_slots.extend(s.slot for s in done)
        return done
