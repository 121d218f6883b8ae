"""Every diverging request of a failed case, as its record keeps them (``CaseResult.divergences``):
per request its first failing divergence, both token streams and, when the checkpoint directory
ships a tokenizer (``tokenizer.json``), the text of every token the report shows. With a
tokenizer, every case (passed or not) also keeps each request's prompt and both sides' generated
text (``CaseResult.texts``), which the report shows side by side.

The first divergence of the case (``first_divergence``) tells where the case went wrong first;
these tell whether one request or every request did, and what each side generated around it.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.compare import Divergence, Verdict, forced_greedy

if TYPE_CHECKING:
    from reference_impl.requests import Request, RequestOutput

TOKENIZER_FILE = "tokenizer.json"


def divergence_records(verdict: Verdict, candidate: Sequence[RequestOutput], baseline: Sequence[RequestOutput],
                       forced: Mapping[str, RequestOutput] | None = None,
                       checkpoint: str | Path | None = None) -> list[dict[str, Any]]:
    """Per request with a failing divergence (earliest first): its first failing divergence
    (``Divergence.to_json``) plus ``failing_in_request`` (how many it has), ``baseline_tokens``,
    ``candidate_tokens`` (the candidate's free-running stream, or for a divergence found on the
    forced replay its greedy choice at each step on the baseline's prefix: ``candidate_stream``
    says which) and, with a tokenizer, ``token_text``: ``{id: text}`` of every token in both
    streams and both top-k lists."""
    candidates = {o.request_id: o for o in candidate}
    baselines = {o.request_id: o for o in baseline}
    failing = [d for d in verdict.divergences if not d.tolerated]
    counts = Counter(d.request_id for d in failing)
    first: dict[str, Divergence] = {}
    for d in failing:
        first.setdefault(d.request_id, d)
    decode = token_decoder(checkpoint)
    records = []
    for rid, d in first.items():
        replay = (forced or {}).get(rid) if d.replayed else None
        stream = ([forced_greedy(replay, s) for s in range(len(replay.token_ids))] if replay is not None
                  else list(candidates[rid].token_ids))
        record = {**d.to_json(), "failing_in_request": counts[rid], "baseline_tokens": list(baselines[rid].token_ids),
                  "candidate_tokens": stream, "candidate_stream": "forced" if replay is not None else "free"}
        if decode is not None:
            ids = {*stream, *baselines[rid].token_ids, *(t for t, _ in d.candidate_top_k),
                   *(t for t, _ in d.baseline_top_k)}
            record["token_text"] = {str(t): decode(t) for t in sorted(ids)}
        records.append(record)
    return records


def text_records(requests: Sequence[Request], candidate: Sequence[RequestOutput],
                 baseline: Sequence[RequestOutput], checkpoint: str | Path | None) -> list[dict[str, Any]] | None:
    """Per request ``{"request_id", "prompt", "baseline", "candidate"}``: the prompt's text (as the
    scenario made it, else its ids decoded; None for embeddings of no known text) and each side's
    generated tokens decoded with the checkpoint's tokenizer, special tokens kept. None without a
    tokenizer."""
    if checkpoint is None or not (Path(checkpoint) / TOKENIZER_FILE).is_file():
        return None
    tokenizer = _tokenizer(str(Path(checkpoint) / TOKENIZER_FILE))

    def decode(ids: Sequence[int]) -> str:
        return str(tokenizer.decode(list(ids), skip_special_tokens=False))

    candidates = {o.request_id: o for o in candidate}
    baselines = {o.request_id: o for o in baseline}
    records = []
    for r in requests:
        if r.request_id not in candidates or r.request_id not in baselines:
            continue
        prompt = r.prompt_text if r.prompt_text is not None else (
            decode(r.prompt_ids) if r.prompt_ids is not None and not r.images else None)
        records.append({"request_id": r.request_id, "prompt": prompt,
                        "baseline": decode(baselines[r.request_id].token_ids),
                        "candidate": decode(candidates[r.request_id].token_ids)})
    return records


def token_decoder(checkpoint: str | Path | None) -> Callable[[int], str] | None:
    """A function from token id to its text, from the checkpoint directory's ``tokenizer.json``;
    ``None`` without one (the built-in random tiny models have none: their reports show ids)."""
    if checkpoint is None or not (Path(checkpoint) / TOKENIZER_FILE).is_file():
        return None
    return _decoder(str(Path(checkpoint) / TOKENIZER_FILE))


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


@functools.lru_cache(maxsize=4)
def _decoder(path: str) -> Callable[[int], str]:
    tokenizer = _tokenizer(path)

    def decode(token: int) -> str:
        return str(tokenizer.decode([token], skip_special_tokens=False))

    return decode
