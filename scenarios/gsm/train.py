"""Train ``gsm-llama``: a tiny Llama that solves the generated word problems.

``python -m scenarios.gsm.train [--steps N] [--out DIR]`` trains the tokenizer and the model on
``data/train.jsonl.gz`` on the CPU (seeded: the same command gives the same weights on the same
torch build), saves a Hugging Face checkpoint (safetensors, ``tokenizer.json``) and prints the
greedy strict-match accuracy on the test split with five-shot prompts built as lm-eval builds
gsm8k's (``Question: …\\nAnswer: …`` examples joined by a blank line).

Training stream: the train problems, shuffled, each written ``Question: q\\nAnswer: a\\n\\n``,
concatenated and cut into rows of ``SEQ_LEN`` tokens, so a question appears at every position a
five-shot prompt puts it. The loss counts the answers (and the ``Question:`` that follows one)
and not the question text, which is random by construction and cannot be predicted.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path
from typing import Any

import torch

from scenarios.gsm import CHECKPOINT, DATA
from scenarios.gsm.problems import read_jsonl
from scenarios.gsm.tokenizer import save_hf, train_tokenizer

SEED = 0
SEQ_LEN = 768          # longer than a five-shot prompt plus its answer (~700 tokens)
BATCH = 16             # rows per step: ~12k tokens
STEPS = 900           # ~15 minutes on the 2-core machine
LR = 3e-3
WARMUP = 100
MODEL: dict[str, Any] = dict(  # ~1 M parameters: 12k tokens/s forward+backward on 2 CPU cores
    vocab_size=576, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
    rms_norm_eps=1e-5, tie_word_embeddings=False,
)
IGNORE = -100
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")


def example_text(row: dict[str, str]) -> tuple[str, str]:
    return f"Question: {row['question']}\nAnswer:", f" {row['answer']}\n\n"


def token_stream(tok: Any, rows: list[dict[str, str]], rng: random.Random) -> tuple[list[int], list[int]]:
    """All rows shuffled, as (ids, labels): labels are the ids on answers, IGNORE on questions."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    ids: list[int] = []
    labels: list[int] = []
    for i in order:
        prompt, answer = example_text(rows[i])
        p = tok.encode(prompt).ids
        full = tok.encode(prompt + answer).ids
        assert full[: len(p)] == p, "the prompt's tokens must prefix the example's"
        ids.extend(full)
        # the "Question:" token opening an example is the answer's natural end: keep it
        labels.extend([full[0]] + [IGNORE] * (len(p) - 1) + full[len(p):])
    return ids, labels


def lr_at(step: int, steps: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    frac = (step - WARMUP) / max(1, steps - WARMUP)
    return LR * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def five_shot(train: list[dict[str, str]], row: dict[str, str], rng: random.Random, shots: int = 5) -> str:
    ex = rng.sample(train, shots)
    ctx = "\n\n".join(f"Question: {e['question']}\nAnswer: {e['answer']}" for e in ex)
    return ctx + "\n\n" + f"Question: {row['question']}\nAnswer:"


@torch.no_grad()
def evaluate(model: Any, tok: Any, train: list[dict[str, str]], test: list[dict[str, str]], limit: int,
             max_new: int = 96) -> float:
    """Greedy strict-match accuracy (transformers' generate, left-padded batches)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   padding_side="left")  # type: ignore[no-untyped-call]
    rng = random.Random(1234)
    rows = test[:limit]
    correct = 0
    model.eval()
    for i in range(0, len(rows), 50):
        batch = rows[i:i + 50]
        enc = fast([five_shot(train, r, rng) for r in batch], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=fast.pad_token_id)
        for r, seq in zip(batch, out[:, enc["input_ids"].shape[1]:]):
            text = str(fast.decode(seq)).split("Question:")[0]
            m = STRICT.search(text)
            gold = r["answer"].split("#### ")[-1].strip()
            correct += bool(m and m.group(1) == gold)
    model.train()
    return correct / len(rows)


def main(argv: list[str] | None = None) -> None:
    import transformers as tf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--out", type=Path, default=CHECKPOINT)
    ap.add_argument("--eval-limit", type=int, default=200)
    args = ap.parse_args(argv)

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    rng = random.Random(SEED)
    t0 = time.time()
    train = read_jsonl(DATA / "train.jsonl.gz")
    test = read_jsonl(DATA / "test.jsonl")
    tok = train_tokenizer("".join(example_text(r)) for r in train)
    ids, labels = token_stream(tok, train, rng)
    rows_total = len(ids) // SEQ_LEN
    print(f"tokenizer: {tok.get_vocab_size()} tokens; stream {len(ids)} tokens = {rows_total} rows", flush=True)

    cfg = tf.LlamaConfig(**MODEL, bos_token_id=None, eos_token_id=tok.token_to_id("<|endoftext|>"))
    model = tf.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.1)
    x_all = torch.tensor(ids[: rows_total * SEQ_LEN]).view(rows_total, SEQ_LEN)
    y_all = torch.tensor(labels[: rows_total * SEQ_LEN]).view(rows_total, SEQ_LEN)
    gen = torch.Generator().manual_seed(SEED)
    order = torch.randperm(rows_total, generator=gen)
    cursor = 0
    for step in range(args.steps):
        if cursor + BATCH > rows_total:
            order, cursor = torch.randperm(rows_total, generator=gen), 0
        idx = order[cursor:cursor + BATCH]
        cursor += BATCH
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps)
        loss = model(input_ids=x_all[idx], labels=y_all[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step, args.steps):.2e}  "
                  f"{time.time() - t0:.0f}s", flush=True)
    train_s = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = cfg.eos_token_id
    model.save_pretrained(str(args.out))
    save_hf(tok, args.out, model_max_length=MODEL["max_position_embeddings"])
    acc = evaluate(model, tok, train, test, args.eval_limit)
    info = {"steps": args.steps, "train_seconds": round(train_s, 1), "strict_match_5shot": acc,
            "eval_limit": args.eval_limit, "torch": torch.__version__}
    (args.out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
