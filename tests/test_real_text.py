"""Real text: with a checkpoint that ships a tokenizer the scenarios send the built-in prompts
tokenized with it (gsm-llama here: a real trained model and tokenizer shipped in the repository),
prompt-embeds are those prompts' real embeddings, the generated text of both sides is kept in
the case record, and the report shows it side by side; tokenizer-less tiny models keep random ids."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from harness.case import CaseResult
from harness.divergences import text_records
from harness.setup import MAX_MODEL_LEN, MAX_NUM_BATCHED_TOKENS
from reference_impl.config import load_config
from reference_impl.loader import load_model
from reference_impl.requests import RequestOutput
from reference_impl.runner import EngineConfig, Runner
from reports import render_index
from scenarios import prompts
from scenarios.inputs import embedding_table
from scenarios.models import checkpoint
from scenarios.registry import get_scenario

GSM = checkpoint("gsm-llama")


def test_text_scenario_sends_the_prompts_tokenized_with_the_checkpoints_tokenizer() -> None:
    reqs = get_scenario("text").requests(GSM, "float32")
    tok = Tokenizer.from_file(str(GSM / "tokenizer.json"))
    assert [r.request_id for r in reqs] == [f"text-{p.name}" for p in prompts.PROMPTS]
    for r, p in zip(reqs, prompts.PROMPTS):
        assert r.prompt_text == p.text  # gsm-llama has no chat template: every prompt is raw text
        assert r.prompt_ids == tuple(tok.encode(p.text).ids)
        assert tok.decode(list(r.prompt_ids or ())) == p.text  # byte-level BPE: lossless
    lengths = [r.prompt_len for r in reqs]
    assert min(lengths) < MAX_NUM_BATCHED_TOKENS < max(lengths) <= MAX_MODEL_LEN - 16  # short ones, one chunked
    assert any(n % 2 and n % 3 for n in lengths)  # a length no TP degree here divides


def test_prompt_embeds_are_the_prompts_real_embeddings() -> None:
    text = {r.request_id.removeprefix("text-"): r for r in get_scenario("text").requests(GSM, "float32")}
    embeds = get_scenario("prompt_embeds").requests(GSM, "bfloat16")
    table = embedding_table(GSM)
    assert [r.request_id for r in embeds] == [f"embeds-{n}" for n in prompts.EMBEDS_PROMPTS]
    for r in embeds:
        ids = text[r.request_id.removeprefix("embeds-")].prompt_ids
        assert r.prompt_embeds is not None and r.prompt_embeds.dtype == torch.bfloat16
        assert torch.equal(r.prompt_embeds, table[list(ids or ())].to(torch.bfloat16))
    mixed = get_scenario("mixed").requests(GSM, "float32")
    assert [r.kind for r in mixed] == ["text", "text", "prompt_embeds", "prompt_embeds"]


def test_the_prompts_do_not_depend_on_the_seed_and_tokenizerless_models_keep_random_ids() -> None:
    a, b = (get_scenario("text").requests(GSM, "float32", seed=s) for s in (0, 1))
    assert [r.prompt_ids for r in a] == [r.prompt_ids for r in b]
    tiny = checkpoint("tiny-llama")
    assert not prompts.has_tokenizer(tiny)
    random_reqs = get_scenario("text").requests(tiny, "float32")
    assert [r.prompt_len for r in random_reqs] == [1, 7, 13, 70] and all(r.prompt_text is None for r in random_reqs)


def test_chat_prompts_go_through_the_chat_template(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(GSM, ck)
    (ck / "chat_template.jinja").write_text(
        "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|bot|>{% endif %}")
    prompts._tokenizer.cache_clear()
    reqs = {r.request_id: r for r in get_scenario("text").requests(ck, "float32")}
    assert reqs["text-question"].prompt_text == "<|user|>What is the capital of France?<|bot|>"
    assert reqs["text-complete"].prompt_text == "The capital of France is"  # plain text stays plain


def test_generated_text_is_readable_and_kept_for_both_sides() -> None:
    """gsm-llama answers the word problem; the record keeps prompt and both texts."""
    reqs = get_scenario("text").requests(GSM, "float32", max_new_tokens=12)
    outputs = Runner(load_model(GSM), EngineConfig(max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS)).generate(reqs)
    other = [RequestOutput(o.request_id, o.prompt_len, list(o.token_ids)) for o in outputs]
    other[0].token_ids[0] = 0  # the candidate of one request differs in its first token
    texts = text_records(reqs, other, outputs, GSM)
    assert texts is not None and len(texts) == len(reqs)
    by_id = {t["request_id"]: t for t in texts}
    problem = by_id["text-problem"]
    assert problem["prompt"].startswith("Question: Tom has 3 boxes")
    assert re.search(r"\d", problem["baseline"]), problem  # an arithmetic answer, in digits
    assert problem["baseline"] == problem["candidate"]
    assert by_id["text-word"]["baseline"] != by_id["text-word"]["candidate"]
    assert text_records(reqs, other, outputs, checkpoint("tiny-llama")) is None


def test_report_shows_the_texts_side_by_side_escaped(tmp_path: Path) -> None:
    texts = [{"request_id": "text-question", "prompt": "<|im_start|>user\nWhat is the capital?",
              "baseline": "Paris.<|im_end|>", "candidate": "Paris.<|im_end|>"},
             {"request_id": "embeds-summary", "prompt": None, "baseline": "The press <b>spread</b>",
              "candidate": "The press was"}]
    record = CaseResult("m/tp3-eager-text", "tp3-eager", "tp1-pp1-eager", "text", "m", "fail", reason="token",
                        texts=texts).to_json()
    html = render_index(tmp_path, [record], {}).read_text(encoding="utf-8")
    assert "1 of 2 requests differ" in html
    assert "&lt;|im_start|&gt;user" in html and "<|im_start|>" not in html
    assert "The press &lt;b&gt;spread&lt;/b&gt;" in html
    row = re.search(r'<tr class="diff">.*?</tr>', html, re.S)
    assert row is not None and "embeds-summary" in row.group(0) and "The press was" in row.group(0)
    assert "candidate <code>tp3-eager</code>" in html and "baseline <code>tp1-pp1-eager</code>" in html
    assert CaseResult.from_json(record).texts == texts
    old = {k: v for k, v in record.items() if k != "texts"}  # records before the key render too
    assert "generated text" not in render_index(tmp_path / "old", [old], {}).read_text(encoding="utf-8")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_real_text_fits_the_model(dtype: str) -> None:
    cfg = load_config(GSM)
    for name in ("text", "prompt_embeds", "mixed"):
        for r in get_scenario(name).requests(GSM, dtype):
            assert r.prompt_len + r.max_new_tokens <= min(MAX_MODEL_LEN, cfg.text.max_position_embeddings)
