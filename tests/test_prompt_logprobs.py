"""Prompt logprobs (lm-eval's loglikelihood) and stop tokens in the engine: against transformers
on one device, and the same on every parallel layout (the last pipeline stage computes them)."""

from __future__ import annotations

import pytest
import torch

from harness.launch import MpLauncher
from reference_impl.compile.config import CompileConfig
from reference_impl.engine import EngineSpec
from reference_impl.loader import load_model
from reference_impl.requests import Request, RequestOutput
from reference_impl.runner import Runner
from scenarios.inputs import embedding_table
from scenarios.models import checkpoint

from helpers import ENGINE, TP_ATOL

MODEL = "tiny-llama"
# Against transformers' own forward in fp32 on one device: two implementations of the same
# model differ by float rounding only (~1e-6 on these logits); 1e-4 leaves room and still
# catches any wrong position or target (those move logprobs by whole nats).
HF_ATOL = 1e-4


def prompts() -> list[tuple[int, ...]]:
    gen = torch.Generator().manual_seed(7)
    # 70 tokens: longer than the step budget, so the prompt is scored over several chunks
    return [tuple(torch.randint(0, 500, (n,), generator=gen).tolist()) for n in (2, 9, 70)]


def scored(max_new: int = 2) -> list[Request]:
    return [Request(f"p{i}", prompt_ids=ids, max_new_tokens=max_new, prompt_logprobs=True)
            for i, ids in enumerate(prompts())]


def one_device(reqs: list[Request]) -> list[RequestOutput]:
    return Runner(load_model(checkpoint(MODEL)), ENGINE).generate(reqs)


def hf_prompt_logprobs(ids: tuple[int, ...]) -> tuple[list[float], list[bool]]:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(str(checkpoint(MODEL)), dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1)
    target = torch.tensor(ids[1:])
    return lp.gather(-1, target[:, None])[:, 0].tolist(), (lp.argmax(-1) == target).tolist()


def test_prompt_logprobs_match_transformers() -> None:
    outs = one_device(scored())
    for ids, out in zip(prompts(), outs):
        want_lp, want_greedy = hf_prompt_logprobs(ids)
        assert len(out.prompt_logprobs) == len(ids) - 1
        assert max(abs(a - b) for a, b in zip(out.prompt_logprobs, want_lp)) < HF_ATOL
        assert out.prompt_greedy == want_greedy


def test_prompt_embeds_scored_against_score_ids() -> None:
    table = embedding_table(checkpoint(MODEL))
    reqs = [Request(f"e{i}", prompt_embeds=table[list(ids)], score_ids=ids, max_new_tokens=2, prompt_logprobs=True)
            for i, ids in enumerate(prompts())]
    for got, want in zip(one_device(reqs), one_device(scored())):
        assert got.prompt_greedy == want.prompt_greedy
        assert max(abs(a - b) for a, b in zip(got.prompt_logprobs, want.prompt_logprobs)) < TP_ATOL


def test_stop_token_ends_generation_after_it() -> None:
    ids = prompts()[1]
    full = one_device([Request("r", prompt_ids=ids, max_new_tokens=12)])[0].token_ids
    stop = full[4]
    first = full.index(stop)
    got = one_device([Request("r", prompt_ids=ids, max_new_tokens=12, stop_token_ids=(stop,))])[0]
    assert got.token_ids == full[: first + 1]


@pytest.mark.parametrize("bad,message", [
    (dict(prompt_embeds=torch.zeros(3, 64), prompt_logprobs=True), "need score_ids"),
    (dict(prompt_ids=(1, 2, 3), score_ids=(1, 2, 3)), "score_ids are for prompt-embeds"),
    (dict(prompt_embeds=torch.zeros(3, 64), score_ids=(1, 2)), "2 score_ids for a prompt of 3"),
    (dict(prompt_ids=(1, 2), stop_token_ids=(9999,)), "outside the vocabulary"),
])
def test_bad_scoring_requests_rejected(bad: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        one_device([Request("bad", **bad)])  # type: ignore[arg-type]


LAYOUTS = {
    "tp2-pp2-eager": (2, 2, CompileConfig()),
    "tp2-sp-graph-full": (2, 1, CompileConfig("graph", "full", True)),
    "tp2-pp2-sp-graph-piecewise": (2, 2, CompileConfig("graph", "piecewise", True)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prompt_logprobs_on_parallel_layouts(launchers: dict[int, MpLauncher], layout: str) -> None:
    tp, pp, comp = LAYOUTS[layout]
    spec = EngineSpec(str(checkpoint(MODEL)), tp, pp, engine=ENGINE, compile=comp)
    got = launchers[tp * pp].run(spec, scored(max_new=4))
    for g, w in zip(got, one_device(scored(max_new=4))):
        assert g.prompt_greedy == w.prompt_greedy, layout
        assert len(g.prompt_logprobs) == len(w.prompt_logprobs)
        assert max(abs(a - b) for a, b in zip(g.prompt_logprobs, w.prompt_logprobs)) < TP_ATOL, layout
        assert g.token_ids == w.token_ids
