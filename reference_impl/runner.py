"""The model runner: batches requests, keeps the KV cache, runs steps, samples greedily.

One ``Runner`` per rank. A step is: schedule chunks -> build the flat batch (ids or embeds,
positions, attention metadata) -> run the model (eager or compiled) -> on the last pipeline
stage compute logits for the rows that sample, take the greedy token and its logprobs.
The distributed parts (pipeline hand-off, token broadcast) go through ``StageComm``; the
single-device runner uses ``LocalComm``, which does nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from reference_impl.attention import AttentionMetadata, KVCache, SeqSlice, forward_context
from reference_impl.model import CausalLM, IntermediateTensors
from reference_impl.parallel.groups import SINGLE, ParallelState, use_state
from reference_impl.requests import Request, RequestOutput, validate_request
from reference_impl.scheduler import Chunk, Scheduler, SchedulerConfig, SeqState


@dataclass(frozen=True)
class EngineConfig:
    """Batching and cache limits of one engine (every rank uses the same)."""

    max_num_seqs: int = 8
    max_num_batched_tokens: int = 64
    chunked_prefill: bool = True
    # The context the KV cache holds per sequence, at most the model's max_position_embeddings
    # (the default); a cap keeps a long-context model's cache small (``max_num_seqs`` x this).
    max_model_len: int | None = None

    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, self.chunked_prefill)


@dataclass
class StepBatch:
    """The flat inputs of one step. ``T`` rows, of which the first ``num_real`` are tokens."""

    positions: torch.Tensor  # (T,)
    input_ids: torch.Tensor  # (T,)
    inputs_embeds: torch.Tensor | None  # (T, H) when any row needs an embedding from outside
    metadata: AttentionMetadata
    sample_rows: list[int]
    chunks: list[Chunk]

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])


ModelFn = Callable[[StepBatch, IntermediateTensors | None], "torch.Tensor | IntermediateTensors"]


class StageComm(Protocol):
    """Pipeline plumbing. Single-device: receive nothing, send nothing, tokens stay local."""

    is_first: bool
    is_last: bool

    def recv_intermediate(self, batch: StepBatch) -> IntermediateTensors | None: ...

    def send_intermediate(self, batch: StepBatch, out: IntermediateTensors) -> None: ...

    def broadcast_samples(self, samples: SampledTokens | None, n: int, k: int, m: int = 0) -> SampledTokens: ...


@dataclass
class SampledTokens:
    """Greedy choices of one step: ``(n,)`` ids and logprobs, ``(n, k)`` top-k ids and logprobs;
    ``(m,)`` logprobs of the step's scored prompt tokens and whether each was the greedy one."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor
    prompt_logprobs: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    prompt_greedy: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.bool))


class LocalComm:
    is_first = True
    is_last = True

    def recv_intermediate(self, batch: StepBatch) -> IntermediateTensors | None:
        return None

    def send_intermediate(self, batch: StepBatch, out: IntermediateTensors) -> None:
        raise RuntimeError("a single stage has nobody to send to")

    def broadcast_samples(self, samples: SampledTokens | None, n: int, k: int, m: int = 0) -> SampledTokens:
        assert samples is not None
        return samples


def score_prompt(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: (m, vocab), targets: (m,) -> (m,) logprob of each target and whether it is the
    greedy choice (ties: lowest id, as in sampling)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, targets[:, None])[:, 0]
    return chosen, torch.argmax(logprobs, dim=-1) == targets


def sample_greedy(logits: torch.Tensor, k: int, forced: Sequence[int | None] = ()) -> SampledTokens:
    """logits: (n, vocab) fp32 -> greedy ids (ties: lowest id) with logprobs and top-k.

    ``forced[i]``, when given and not None, replaces row ``i``'s greedy id (teacher forcing);
    its logprob is then the forced token's, and the top-k stays the engine's own."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.argmax(logprobs, dim=-1)  # (n,)
    for row, token in enumerate(forced):
        if token is not None:
            ids[row] = token
    top_lp, top_ids = torch.topk(logprobs, k, dim=-1)  # (n, k)
    chosen = logprobs.gather(-1, ids[:, None])[:, 0]
    return SampledTokens(ids, chosen, top_ids, top_lp)


@dataclass
class Runner:
    """Serves requests on one rank's (possibly sharded, possibly staged) model."""

    model: CausalLM
    config: EngineConfig = field(default_factory=EngineConfig)
    comm: StageComm = field(default_factory=LocalComm)
    model_fn: ModelFn | None = None  # compiled forward; None runs the model eagerly
    pad_tokens: Callable[[int], int] = lambda n: n  # token-count bucketing (SP needs multiples of tp)
    state: ParallelState = SINGLE  # this engine's ranks and groups (set current while it runs)
    kv_caches: dict[str, KVCache] = field(init=False)

    def __post_init__(self) -> None:
        self.param = next(self.model.parameters())
        positions = self.model.cfg.text.max_position_embeddings
        self.max_model_len = min(self.config.max_model_len or positions, positions)
        self.kv_caches = self._allocate_caches()

    @property
    def dtype(self) -> torch.dtype:
        return self.param.dtype

    @property
    def device(self) -> torch.device:
        return self.param.device

    def _allocate_caches(self) -> dict[str, KVCache]:
        caches = {}
        for attn in self.model.model.attention_layers():
            caches[attn.layer_name] = KVCache.allocate(
                self.config.max_num_seqs, self.max_model_len, attn.num_kv_heads, attn.head_dim,
                self.dtype, self.device,
            )
        return caches

    # -- public --------------------------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[RequestOutput]:
        """Serve all requests to completion; outputs in request order."""
        for req in requests:
            validate_request(req, self.model.cfg, self.max_model_len, self.dtype)
        if len({r.request_id for r in requests}) != len(requests):
            raise ValueError("request ids must be unique")
        scheduler = Scheduler(self.config.scheduler())
        pending = [self._admit(req) for req in requests]
        for seq in pending:
            scheduler.add(seq)
        while scheduler.has_work():
            chunks = scheduler.schedule()
            self.step(chunks)
            scheduler.finish_step(chunks)
        return [s.output for s in pending]

    def capture_prefill(self, requests: Sequence[Request]) -> dict[str, torch.Tensor]:
        """Replay the requests' prefills as one step (the same batch composition, unchunked)
        with activation capture on. Returns this stage's ``"<layer>.hidden_states"`` /
        ``"<layer>.residual"`` (real_tokens, H) tensors (full length, padding removed),
        ``"num_tokens"`` (the padded step size) and ``"offsets"`` (each request's first row, then
        the end)."""
        from reference_impl import capture

        if len(requests) > self.config.max_num_seqs:
            raise ValueError(f"{len(requests)} requests exceed max_num_seqs={self.config.max_num_seqs}")
        for req in requests:
            validate_request(req, self.model.cfg, self.max_model_len, self.dtype)
        seqs = [self._admit(req) for req in requests]
        for slot, seq in enumerate(seqs):
            seq.slot = slot
        real = sum(s.prompt_len for s in seqs)
        layers = self.model.model.decoder_layers()
        capture.STORE.clear()
        for layer in layers:
            layer.capture = True
        try:
            self.step([Chunk(s, 0, s.prompt_len) for s in seqs])
        finally:
            for layer in layers:
                layer.capture = False
        out = {k: v[:real] for k, v in capture.STORE.items()}
        capture.STORE.clear()
        out["num_tokens"] = torch.tensor(self.pad_tokens(real))
        out["offsets"] = torch.tensor([0] + list(itertools.accumulate(s.prompt_len for s in seqs)))
        return out

    def step(self, chunks: list[Chunk]) -> None:
        batch = self.build_batch(chunks)
        out = self.run_model(batch)
        n, k = len(batch.sample_rows), self._top_k(chunks)
        scored = _scored_rows(batch)
        samples = None
        if self.comm.is_last:
            assert isinstance(out, torch.Tensor)
            logits = self.model.compute_logits(out[batch.sample_rows])
            samples = sample_greedy(logits, k, _forced(batch.chunks))
            if scored:
                rows = torch.tensor([r for r, _ in scored], device=out.device)
                targets = torch.tensor([t for _, t in scored], device=out.device)
                samples.prompt_logprobs, samples.prompt_greedy = score_prompt(
                    self.model.compute_logits(out[rows]), targets)
        samples = self.comm.broadcast_samples(samples, n, k, len(scored))
        self._record(batch, samples)

    # -- steps -----------------------------------------------------------------------------------

    def _admit(self, req: Request) -> SeqState:
        seq = SeqState(req, slot=-1, output=RequestOutput(req.request_id, req.prompt_len))
        if self.comm.is_first:
            seq.prompt_embeds = self._prompt_embeds(req)
        return seq

    def _prompt_embeds(self, req: Request) -> torch.Tensor | None:
        """(n, H) for prompt-embeds and multimodal requests, computed once at admission."""
        if req.prompt_embeds is not None:
            return req.prompt_embeds.to(self.device)
        if not req.images:
            return None
        ids = torch.tensor(req.prompt_ids or (), device=self.device)
        pixels = torch.stack(list(req.images)).to(self.device, self.dtype)
        with torch.no_grad():
            return self.model.embed_multimodal(ids, pixels)

    @staticmethod
    def _top_k(chunks: list[Chunk]) -> int:
        return max(c.seq.request.top_k for c in chunks)

    def build_batch(self, chunks: list[Chunk]) -> StepBatch:
        """Flatten the chunks into one padded batch of ``pad_tokens(num_real)`` rows."""
        ids: list[int] = []
        positions: list[int] = []
        seqs: list[SeqSlice] = []
        sample_rows: list[int] = []
        for c in chunks:
            seqs.append(SeqSlice(len(ids), len(ids) + c.num_tokens, c.start, c.seq.slot))
            for pos in range(c.start, c.start + c.num_tokens):
                ids.append(c.seq.token_at(pos))
                positions.append(pos)
            if c.sample:
                sample_rows.append(len(ids) - 1)
        pad = self.pad_tokens(len(ids)) - len(ids)
        id_t = torch.tensor(ids + [0] * pad, device=self.device)
        pos_t = torch.tensor(positions + [0] * pad, device=self.device)
        embeds = self._step_embeds(chunks, id_t, seqs) if self.comm.is_first else None
        return StepBatch(pos_t, id_t, embeds, AttentionMetadata(tuple(seqs)), sample_rows, chunks)

    def _step_embeds(
        self, chunks: list[Chunk], ids: torch.Tensor, seqs: list[SeqSlice]
    ) -> torch.Tensor | None:
        """Embeds for the whole step when any prefill row comes from outside the vocabulary
        (vLLM does the same: such a step runs the graph variant without the embedding)."""
        outside = [(c, s) for c, s in zip(chunks, seqs) if c.is_prefill and c.seq.prompt_embeds is not None]
        if not outside:
            return None
        with torch.no_grad():
            embeds = self.model.embed_input_ids(ids)  # (T, H)
        for c, s in outside:
            assert c.seq.prompt_embeds is not None
            n_prompt = min(c.num_tokens, c.seq.prompt_len - c.start)
            rows = c.seq.prompt_embeds[c.start:c.start + n_prompt]
            embeds[s.q_start:s.q_start + n_prompt] = rows.to(embeds.dtype)
        return embeds

    def run_model(self, batch: StepBatch) -> torch.Tensor | IntermediateTensors:
        intermediate = self.comm.recv_intermediate(batch)
        with torch.no_grad(), use_state(self.state), forward_context(batch.metadata, self.kv_caches):
            if self.model_fn is not None:
                out = self.model_fn(batch, intermediate)
            else:
                out = self.eager_forward(batch, intermediate)
        if isinstance(out, IntermediateTensors):
            self.comm.send_intermediate(batch, out)
        return out

    def eager_forward(
        self, batch: StepBatch, intermediate: IntermediateTensors | None
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate is not None:
            return self.model(batch.positions, intermediate=intermediate)
        if batch.inputs_embeds is not None:
            return self.model(batch.positions, inputs_embeds=batch.inputs_embeds)
        return self.model(batch.positions, input_ids=batch.input_ids)

    def _record(self, batch: StepBatch, samples: SampledTokens) -> None:
        sampling = [c for c in batch.chunks if c.sample]
        ids, lps = samples.ids.tolist(), samples.logprobs.tolist()
        top_ids, top_lps = samples.top_ids.tolist(), samples.top_logprobs.tolist()
        for i, c in enumerate(sampling):
            out, k = c.seq.output, c.seq.request.top_k
            out.token_ids.append(int(ids[i]))
            out.logprobs.append(float(lps[i]))
            out.top_logprobs.append(list(zip(top_ids[i][:k], top_lps[i][:k])))
        if samples.prompt_logprobs.numel():
            lps_p, greedy = samples.prompt_logprobs.tolist(), samples.prompt_greedy.tolist()
            at = 0
            for c in batch.chunks:
                m = _num_scored(c)
                c.seq.output.prompt_logprobs.extend(float(x) for x in lps_p[at:at + m])
                c.seq.output.prompt_greedy.extend(bool(x) for x in greedy[at:at + m])
                at += m


def _num_scored(c: Chunk) -> int:
    """Prompt rows of the chunk whose next token is a prompt token (position p scores p + 1)."""
    if not c.seq.request.prompt_logprobs:
        return 0
    return max(0, min(c.start + c.num_tokens, c.seq.prompt_len - 1) - c.start)


def _scored_rows(batch: StepBatch) -> list[tuple[int, int]]:
    """(row, target id) of every prompt row the step scores, in chunk order."""
    rows: list[tuple[int, int]] = []
    for c, s in zip(batch.chunks, batch.metadata.seqs):
        for i in range(_num_scored(c)):
            rows.append((s.q_start + i, c.seq.request.score_id(c.start + i + 1)))
    return rows


def _forced(chunks: list[Chunk]) -> list[int | None]:
    """Per sampling row of a step: the request's forced token for this step, or None."""
    forced: list[int | None] = []
    for c in chunks:
        if c.sample:
            tokens = c.seq.request.forced_tokens
            forced.append(None if tokens is None else tokens[len(c.seq.output.token_ids)])
    return forced
