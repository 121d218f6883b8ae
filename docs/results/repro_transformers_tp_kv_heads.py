"""transformers tp_plan="auto" with fewer KV heads than TP ranks: a reshape error on every rank.

    python docs/results/repro_transformers_tp_kv_heads.py
    -> RuntimeError: shape '[1, 7, -1, 16]' is invalid for input of size 56   (on rank 0 and rank 1)

A Qwen2 with 4 query heads and 1 KV head (head_dim 16), random weights, no download; 2 CPU ranks
(gloo), started as torchrun would (the environment variables), loaded with tp_plan="auto".
"""
import os
import tempfile

import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM


def rank(r: int, path: str) -> None:
    os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")
    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
    model(input_ids=torch.arange(7)[None])  # k_proj's 16 output features split 8 + 8, then viewed as heads of 16


if __name__ == "__main__":
    path = tempfile.mkdtemp()
    Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=16)).save_pretrained(path)
    mp.spawn(rank, args=(path,), nprocs=2)
