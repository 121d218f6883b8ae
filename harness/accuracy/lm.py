"""``ParityLM``: lm-eval's model interface over a parallel setup of the engine.

Registered as lm-eval model ``parity`` (``model_args``: ``setup=tp2-sp-graph-full,model=gsm-llama,
backend=mp,dtype=float32,device=cpu,input=tokens``). Generation and scoring run through the warm
worker pool of the harness, in batches of ``batch_size`` documents:

- ``generate_until``: greedy; a generation ends at the end-of-text token or at a token whose text
  holds one of ``until`` (the engine's stop tokens), and its text is cut at the first ``until``
  string as lm-eval's own models cut it.
- ``loglikelihood`` / ``loglikelihood_rolling``: prompt logprobs computed by the engine (the last
  pipeline stage), summed over the continuation's tokens.

``input=embeds`` sends every prompt as prompt-embeds: the checkpoint's embedding rows of its
tokens, computed outside the engine (the path vLLM's SP bugs broke), with the tokens as
``score_ids`` for scoring.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models: its registry fills itself lazily only when empty)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from harness.launch.base import EngineRun, RankReport
from harness.outcome import rank_disagreement
from harness.pool import LauncherPool
from harness.setup import ParallelSetup
from reference_impl.config import load_config
from reference_impl.loader import DTYPES
from reference_impl.requests import Request, RequestOutput
from reference_impl.runner import EngineConfig
from scenarios.models import resolve

# Batching of accuracy runs: the matrix's 24-token step budget would prefill a five-shot gsm8k
# prompt (~700 tokens) in 30 steps; 256 does it in three chunks (still chunked, so chunked
# prefill and its SP steps run) and 32 sequences decode together.
ACCURACY_ENGINE = EngineConfig(max_num_seqs=32, max_num_batched_tokens=256)
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default for generate_until
INPUTS = ("tokens", "embeds")


@dataclass
class Trace:
    """What the engine did for one LM: every rank's compiled steps (SP matches) over all batches,
    documents served, engine seconds."""

    steps: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    requests: int = 0
    seconds: float = 0.0

    def add(self, run: EngineRun) -> None:
        for report in run.ranks:
            self.steps.setdefault(report.rank, []).extend(report.steps)

    def reports(self) -> list[RankReport]:
        return [RankReport(rank, (), tuple(steps)) for rank, steps in sorted(self.steps.items())]


@register_model("parity")
class ParityLM(TemplateLM):  # type: ignore[misc]
    """lm-eval's LM over one setup of the engine (see the module's docstring)."""

    def __init__(
        self,
        setup: str = "tp1-pp1-eager",
        model: str = "gsm-llama",
        backend: str = "mp",
        dtype: str = "float32",
        device: str = "cpu",
        input: str = "tokens",
        batch_size: int | str | None = 64,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        mutation: str | None = None,
        pool: LauncherPool | None = None,
        progress: Callable[[str], None] | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        if input not in INPUTS:
            raise ValueError(f"input={input!r}: choose from {', '.join(INPUTS)}")
        self.setup = ParallelSetup.parse(setup, dtype=dtype, device="cuda" if str(device).startswith("cuda") else "cpu")
        self.checkpoint = resolve(model)
        self.cfg = load_config(self.checkpoint)
        self.setup.engine_spec(str(self.checkpoint)).validate()
        self.input = input
        self.batch_docs = int(str(batch_size)) if str(batch_size or "").isdigit() else 64
        self.max_gen_toks = int(max_gen_toks)
        self.pool = pool or LauncherPool(backend, self.setup.device, mutation=mutation)
        self.progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
        self.trace = Trace()
        self.max_length = self.cfg.text.max_position_embeddings

    # -- tokenizer ------------------------------------------------------------------------------

    @cached_property
    def tokenizer(self) -> Any:
        if not any((self.checkpoint / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise ValueError(f"{self.checkpoint} has no tokenizer (tokenizer.json): lm-eval tasks need text")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.checkpoint))

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # lm-eval's hf model encodes without special tokens unless told (add_bos_token): same here
        return list(self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)))

    def tok_decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids)))

    @cached_property
    def embedding_table(self) -> torch.Tensor:
        from scenarios.inputs import embedding_table

        return embedding_table(self.checkpoint).to(DTYPES[self.setup.dtype])

    def stop_ids(self, until: Sequence[str]) -> tuple[int, ...]:
        """The end-of-text token and every token whose own text holds an ``until`` string."""
        return _stop_ids(self.tokenizer, tuple(until))

    # -- engine ---------------------------------------------------------------------------------

    def request(self, rid: str, ids: Sequence[int], **kw: Any) -> Request:
        if self.input == "embeds":
            return Request(rid, prompt_embeds=self.embedding_table[list(ids)],
                           score_ids=tuple(ids) if kw.get("prompt_logprobs") else None, top_k=1, **kw)
        return Request(rid, prompt_ids=tuple(ids), top_k=1, **kw)

    def serve(self, reqs: list[Request], what: str) -> list[RequestOutput]:
        """All requests through the pool, ``batch_docs`` at a time, with progress on stderr."""
        outs: list[RequestOutput] = []
        start = time.monotonic()
        for i in range(0, len(reqs), self.batch_docs):
            batch = reqs[i:i + self.batch_docs]
            run = self.pool.run_traced(self.setup, str(self.checkpoint), batch, ACCURACY_ENGINE)
            disagreement = rank_disagreement(run)
            if disagreement:
                raise RuntimeError(f"{self.setup.id}: {disagreement}")
            self.trace.add(run)
            outs.extend(run.outputs)
            done = len(outs)
            self.progress(f"[{self.setup.id} {self.input}] {what}: {done}/{len(reqs)} "
                          f"({time.monotonic() - start:.0f}s)")
        self.trace.requests += len(reqs)
        self.trace.seconds += time.monotonic() - start
        return outs

    # -- lm-eval's interface --------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        reqs: list[Request] = []
        untils: list[list[str]] = []
        for i, inst in enumerate(requests):
            context, kwargs = inst.args
            kwargs = dict(kwargs or {})
            if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
                raise ValueError("the engine decodes greedily: do_sample must be false and temperature 0")
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), self.max_length // 2)
            ids = self.tok_encode(context)
            # keep the end of a context too long for the window, as lm-eval's hf model does
            ids = ids[-(self.max_length - max_gen):]
            untils.append(until)
            reqs.append(self.request(f"g{i}", ids, max_new_tokens=max_gen,
                                     stop_token_ids=self.stop_ids(until)))
        texts = []
        for out, until in zip(self.serve(reqs, "generate"), untils):
            text = self.tok_decode(out.token_ids)
            for term in until:
                text = text.split(term)[0]
            texts.append(text)
        return texts

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        reqs, lens = [], []
        for i, (_, context_enc, continuation_enc) in enumerate(requests):
            # the window's last max_length - 1 tokens (one position is left for the sampled token)
            whole = (list(context_enc) + list(continuation_enc))[-(self.max_length - 1):]
            lens.append(min(len(continuation_enc), len(whole) - 1))
            reqs.append(self.request(f"l{i}", whole, max_new_tokens=1, prompt_logprobs=True))
        results = []
        for out, n in zip(self.serve(reqs, "loglikelihood"), lens):
            results.append((float(sum(out.prompt_logprobs[-n:])), all(out.prompt_greedy[-n:])))
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows: list[tuple[int, tuple[Any, list[int], list[int]]]] = []
        for doc, inst in enumerate(requests):
            (string,) = inst.args
            tokens = self.tok_encode(string)
            for ctx, pred in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length - 1,
                    context_len=1)):
                windows.append((doc, (None, ctx, pred)))
        scores = self._loglikelihood_tokens([w for _, w in windows])
        totals = [0.0] * len(requests)
        for (doc, _), (lp, _) in zip(windows, scores):
            totals[doc] += lp
        return totals


_STOP_CACHE: dict[tuple[int, tuple[str, ...]], tuple[int, ...]] = {}


def _stop_ids(tokenizer: Any, until: tuple[str, ...]) -> tuple[int, ...]:
    key = (id(tokenizer), until)
    if key not in _STOP_CACHE:
        ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
        if until:
            for token_id in range(len(tokenizer)):
                text = tokenizer.decode([token_id])
                if any(term in text for term in until):
                    ids.add(token_id)
        _STOP_CACHE[key] = tuple(sorted(ids))
    return _STOP_CACHE[key]

