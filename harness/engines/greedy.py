"""Greedy choice from one step's logits, as the transformers engine records it: the chosen id
(teacher-forced when the request says so) with its logprob, and the top-k of that step."""

from __future__ import annotations

import torch

from reference_impl.requests import Request, RequestOutput


def record_step(logits: torch.Tensor, req: Request, out: RequestOutput) -> int:
    """logits: (vocab,) of the last position -> the id this step emits (appended to ``out`` with
    its logprob and the step's top-k). Greedy ties go to the lowest id (``torch.argmax``); a
    forced token replaces the greedy one, whose place at the top of the top-k stays."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (vocab,)
    step = len(out.token_ids)
    token = int(torch.argmax(logprobs)) if req.forced_tokens is None else req.forced_tokens[step]
    top_lp, top_ids = torch.topk(logprobs, req.top_k)  # (k,), (k,)
    out.token_ids.append(token)
    out.logprobs.append(float(logprobs[token]))
    out.top_logprobs.append(list(zip(top_ids.tolist(), top_lp.tolist())))
    return token


def score_prompt(logits: torch.Tensor, req: Request, out: RequestOutput) -> None:
    """logits: (n, vocab) of the prompt's positions -> ``out.prompt_logprobs`` / ``prompt_greedy``
    for positions 1..n-1 (position p's logits score the prompt token at p + 1)."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)  # (n - 1, vocab)
    targets = torch.tensor([req.score_id(p) for p in range(1, req.prompt_len)], dtype=torch.long)
    chosen = logprobs.gather(-1, targets[:, None].to(logprobs.device))[:, 0]
    greedy = torch.argmax(logprobs, dim=-1).cpu() == targets
    out.prompt_logprobs.extend(float(x) for x in chosen.tolist())
    out.prompt_greedy.extend(bool(x) for x in greedy.tolist())


def finished(req: Request, out: RequestOutput) -> bool:
    """The reference engine's rule: ``max_new_tokens`` generated, or a stop token emitted."""
    tokens = out.token_ids
    return len(tokens) >= req.max_new_tokens or (bool(tokens) and tokens[-1] in req.stop_token_ids)
