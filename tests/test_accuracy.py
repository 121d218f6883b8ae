"""``parity accuracy`` end to end on the shipped gsm-llama: the lm-eval model against transformers
and against lm-eval's own ``hf`` model, the paired verdicts with a catalogued SP bug, multiple
choice across setups, and a model too weak to judge anything (inconclusive, not a pass)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from harness.accuracy.lm import ParityLM
from harness.accuracy.run import AccuracyOptions, docs_of, run_accuracy
from parity.cli import main
from scenarios.gsm import CHECKPOINT, TASKS

pytestmark = pytest.mark.skipif(not (CHECKPOINT / "model.safetensors").is_file(),
                                reason="gsm-llama is not trained (python -m scenarios.gsm.train)")
LIMIT = 16


class Inst:
    """The part of lm-eval's ``Instance`` a model reads."""

    def __init__(self, *args: object) -> None:
        self.args = args


def test_task_loads_offline_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval.tasks import TaskManager, get_task_dict

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = get_task_dict(["gsm8k_parity", "gsm_choice"], TaskManager(include_path=str(TASKS)))
    test = list(tasks["gsm8k_parity"].test_docs())
    assert len(test) == 600 and test[0]["answer"].split("\n")[-1].startswith("#### ")
    choice = list(tasks["gsm_choice"].test_docs())[0]
    assert len(choice["choices"]) == 4 and choice["choices"][choice["label"]] == test[0]["answer"]


def test_generate_until_equals_transformers_greedy() -> None:
    import transformers as tf

    lm = ParityLM(setup="tp1-pp1-eager", model="gsm-llama", backend="mp")
    prompts = [f"Question: {q}\nAnswer:" for q in (
        "Ava has 12 apples. She buys 5 more apples at the store. How many apples does Ava have now?",
        "Ben starts with 30 coins. Ben loses 7 of the coins. Then Ben ends up with 3 times as many coins. "
        "How many coins does Ben have now?")]
    got = lm.generate_until([Inst(p, {"until": ["Question:"], "max_gen_toks": 64}) for p in prompts])
    model = tf.AutoModelForCausalLM.from_pretrained(str(CHECKPOINT), dtype=torch.float32)
    tok = tf.AutoTokenizer.from_pretrained(str(CHECKPOINT))
    for prompt, text in zip(prompts, got):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, max_new_tokens=64, do_sample=False)[0, ids.shape[1]:]
        want = tok.decode(out).split("Question:")[0]
        assert text == want
        assert "####" in text and "Question:" not in text


def test_loglikelihood_equals_transformers() -> None:
    import transformers as tf

    lm = ParityLM(setup="tp1-pp1-eager", model="gsm-llama", backend="mp")
    pairs = [("Question: Ava has 3 pens. How many pens does Ava have now?\nAnswer:", " Ava has 3 pens.\n#### 3"),
             ("Question: Zoe has 9 eggs.", " How many eggs does Zoe have now?")]
    got = lm.loglikelihood([Inst(c, x) for c, x in pairs])
    model = tf.AutoModelForCausalLM.from_pretrained(str(CHECKPOINT), dtype=torch.float32)
    for (context, cont), (lp, greedy) in zip(pairs, got):
        ctx, whole = lm.tok_encode(context), lm.tok_encode(context + cont)
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0].float()
        lps = torch.log_softmax(logits[len(ctx) - 1:-1], -1)
        target = torch.tensor(whole[len(ctx):])
        want = lps.gather(-1, target[:, None]).sum().item()
        assert lp == pytest.approx(want, abs=1e-3)
        assert greedy == bool((lps.argmax(-1) == target).all())


def _accuracy(tmp_path: Path, name: str, *args: str) -> tuple[int, dict[str, object]]:
    out = tmp_path / name
    code = main(["accuracy", "--limit", str(LIMIT), "--backend", "mp", "--out", str(out), *args])
    return code, json.loads((out / "accuracy.json").read_text())


def test_sp_bug_fails_embeds_input_and_not_tokens(tmp_path: Path) -> None:
    """vLLM #33322's first bug: wrong only when the embedding runs outside the graph."""
    args = ["--setups", "tp2-sp-graph-full", "--mutation", "sp-middle-residual-slice"]
    code, doc = _accuracy(tmp_path, "embeds", "--input", "embeds", *args)
    (entry,) = doc["setups"]  # type: ignore[misc]
    assert code == 1 and entry["verdict"] == "fail", entry
    assert entry["changed"]["to_wrong"] > entry["changed"]["to_correct"] and entry["p_value"] < 0.05
    assert entry["accuracy"] < entry["baseline_accuracy"]
    html = (tmp_path / "embeds" / "index.html").read_text()
    assert "accuracy FAIL" in html and "MUTATION RUN: sp-middle-residual-slice" in html and "right → wrong" in html
    code, doc = _accuracy(tmp_path, "tokens", "--input", "tokens", *args)
    (entry,) = doc["setups"]  # type: ignore[misc]
    assert code == 0 and entry["verdict"] == "pass" and entry["changed_answers"] == 0, entry


def test_multiple_choice_identical_across_setups(tmp_path: Path) -> None:
    opts = AccuracyOptions(setups=("tp2-sp-graph-full",), tasks=("gsm_choice",), limit=24)
    doc, code = run_accuracy(opts, tmp_path, progress=lambda line: None)
    (entry,) = doc["setups"]
    assert code == 0 and entry["verdict"] == "pass" and entry["changed_answers"] == 0, entry
    assert entry["baseline_accuracy"] > 0.5  # the model tells the right result from near misses
    base = [json.loads(x) for x in (tmp_path / "samples_gsm_choice_tp1-pp1-eager.jsonl").read_text().splitlines()]
    cand = [json.loads(x) for x in (tmp_path / "samples_gsm_choice_tp2-sp-graph-full.jsonl").read_text().splitlines()]
    assert [d.answer for d in docs_of(base)] == [d.answer for d in docs_of(cand)]


def test_untrained_model_is_inconclusive_not_pass(tmp_path: Path) -> None:
    """Same tokenizer, random weights: every answer is wrong on both sides, so the setups 'agree'
    perfectly; that must not read as a pass."""
    import shutil

    import transformers as tf

    ckpt = tmp_path / "untrained"
    shutil.copytree(CHECKPOINT, ckpt)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.AutoConfig.from_pretrained(str(CHECKPOINT))).save_pretrained(str(ckpt))
    code = main(["accuracy", "--model", str(ckpt), "--setups", "tp2-eager", "--limit", "6", "--num-fewshot", "0",
                 "--backend", "mp", "--out", str(tmp_path / "out")])
    doc = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert code == 4 and doc["setups"][0]["verdict"] == "inconclusive", doc["setups"][0]


@pytest.mark.slow
def test_lm_eval_hf_model_gives_the_same_answers(tmp_path: Path) -> None:
    """lm-eval's own ``hf`` model on the shipped checkpoint and ``parity`` at tp1: the same
    accuracy and the same answer on every document."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    manager = TaskManager(include_path=str(TASKS))
    hf = simple_evaluate(model="hf", model_args=f"pretrained={CHECKPOINT},dtype=float32", tasks=["gsm8k_parity"],
                         limit=LIMIT, log_samples=True, task_manager=manager, bootstrap_iters=0, batch_size=1,
                         device="cpu")
    ours = simple_evaluate(model=ParityLM(setup="tp1-pp1-eager", backend="mp"), tasks=["gsm8k_parity"],
                           limit=LIMIT, log_samples=True, task_manager=manager, bootstrap_iters=0)
    assert hf is not None and ours is not None
    want, got = docs_of(hf["samples"]["gsm8k_parity"]), docs_of(ours["samples"]["gsm8k_parity"])
    assert [(d.doc_id, d.answer, d.correct) for d in got] == [(d.doc_id, d.answer, d.correct) for d in want]
    assert sum(d.correct for d in got) >= LIMIT // 2
