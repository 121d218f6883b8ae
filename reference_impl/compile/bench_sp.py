"""Sequence parallelism against TP only: step time of a compiled decoder stack, the collectives
alone as the floor, and where the rest of the time goes.

``python -m reference_impl.compile.bench_sp [--tp N] [--tokens 4096,8192,16384] [--layers 2]
[--hidden 8192] [--mode inductor] [--partition full] [--profile] [--json FILE]``

Each of ``--tp`` ranks (one process per GPU, NCCL; ``--device cpu`` uses gloo, for a smoke check)
builds the same randomly initialised Llama stack (``--layers`` decoder layers, bf16), shards it
with the engine's tensor parallelism and compiles it with the engine's backend twice: SP off and
SP on (the ``SequenceParallelismPass``). A step is one prefill of ``T`` tokens made of
``T / --seq-len`` sequences through the engine's own attention op and KV cache, the embedding
inside the graph. Reported per ``T``: the median step time of each (CUDA events, after warm-up),
their ratio, and the collectives of one step measured alone on the same tensor shape
(``2 * layers + 1`` all-reduces of ``(T, hidden)`` for TP; as many reduce-scatters plus
all-gathers for SP). ``--profile`` adds a kernel-time breakdown of both at the largest ``T``
(GEMMs, attention, Triton kernels, each collective, copies).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from reference_impl.attention import AttentionMetadata, KVCache, SeqSlice, forward_context
from reference_impl.compile.compiled_model import CompiledModel
from reference_impl.compile.config import CompileConfig
from reference_impl.config import load_config
from reference_impl.layers import RotaryEmbedding, rope_inv_freq
from reference_impl.model import CausalLM
from reference_impl.parallel import apply_tp, init_parallel
from reference_impl.parallel.groups import ParallelState, use_state

WARMUP = 3
# Kernel-name fragments by category, first match wins (NCCL kernels carry the collective's name).
CATEGORIES = (
    ("all-reduce", ("allreduce",)),
    ("reduce-scatter", ("reducescatter",)),
    ("all-gather", ("allgather",)),
    ("attention", ("fmha", "flash", "attention", "efficient")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas")),
    ("triton", ("triton",)),
    ("copy/fill", ("memcpy", "memset", "copy", "fill", "cat")),
)


def category(kernel: str) -> str:
    name = kernel.lower().replace("_", "")
    for label, parts in CATEGORIES:
        if any(p in name for p in parts):
            return label
    return "other"


def llama_config(args: argparse.Namespace) -> dict[str, Any]:
    """A Llama config (``config.json``) of the stack under test."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.hidden, "intermediate_size": args.intermediate,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden // args.heads, "num_hidden_layers": args.layers,
        "vocab_size": args.vocab, "max_position_embeddings": max(args.seq_len, 4096),
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False,
    }


def build_stack(cfg_dir: Path, state: ParallelState, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """The stack with random weights (seed 0 on every rank, so the shards are of one model),
    sharded for this rank."""
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalLM(load_config(cfg_dir))
    model = model.to(dtype).eval()
    for module in model.modules():  # RoPE frequencies stay fp32, as the loader keeps them
        if isinstance(module, RotaryEmbedding):
            module.inv_freq = rope_inv_freq(model.cfg.text.head_dim, model.cfg.text.rope).to(device)
    return apply_tp(model, state)


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in ms over ``repeats`` calls after ``WARMUP`` (CUDA events on a
    GPU; every rank steps together, the collectives keep them in lock-step)."""
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def collectives_ms(tokens: int, hidden: int, tp: int, dtype: torch.dtype, device: torch.device,
                   repeats: int) -> dict[str, float]:
    """One all-reduce of ``(T, hidden)`` against a reduce-scatter and an all-gather of it."""
    x = torch.randn(tokens, hidden, dtype=dtype, device=device)
    shard = torch.empty(tokens // tp, hidden, dtype=dtype, device=device)
    full = torch.empty_like(x)
    return {
        "all_reduce": median_ms(lambda: dist.all_reduce(x), repeats, device),
        "reduce_scatter": median_ms(lambda: dist.reduce_scatter_tensor(shard, x), repeats, device),
        "all_gather": median_ms(lambda: dist.all_gather_into_tensor(full, shard), repeats, device),
    }


def kernel_breakdown(step: Callable[[], object], steps: int, top: int = 12) -> dict[str, Any]:
    """Device time per step by kernel category (ms), and the ``top`` kernels by time with their
    names (what a category holds), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    kernels: list[tuple[float, str]] = []
    for event in prof.key_averages():
        ms = float(getattr(event, "self_device_time_total", 0.0) or 0.0) / 1e3 / steps
        if ms > 0:
            totals[category(event.key)] = totals.get(category(event.key), 0.0) + ms
            kernels.append((ms, event.key))
    return {"categories": dict(sorted(totals.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"ms": ms, "name": name[:160], "category": category(name)}
                            for ms, name in sorted(kernels, reverse=True)[:top]]}


def step_fn(compiled: CompiledModel, state: ParallelState, metadata: AttentionMetadata,
            caches: dict[str, KVCache], positions: torch.Tensor, ids: torch.Tensor) -> Callable[[], object]:
    """One prefill step of the compiled stack. positions, ids: (T,)."""
    def step() -> object:
        with torch.no_grad(), use_state(state), forward_context(metadata, caches):
            return compiled.fn(positions, ids, None, None, None)
    return step


def run_rank(rank: int, world: int, port: int, args: argparse.Namespace, cfg_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch >= 2.13 renames the c10d calls
    torch.set_num_threads(1)
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    dtype = getattr(torch, args.dtype)
    state = init_parallel(world, 1)
    model = build_stack(Path(cfg_dir), state, dtype, device)
    text = model.cfg.text
    kv_local = max(1, text.num_kv_heads // world)
    result: dict[str, Any] = {"tokens": {}, "compile_s": {}, "profile": {}}
    gen = torch.Generator(device="cpu").manual_seed(1)
    for sp in (False, True):
        torch._dynamo.reset()  # the two compiled models share the model: no cached graph carries over
        compiled = CompiledModel(model, CompileConfig(args.mode, args.partition, sp=sp), state, dtype, device)
        label = "sp" if sp else "tp"
        for tokens in args.tokens:
            seqs = tokens // args.seq_len
            metadata = AttentionMetadata(tuple(SeqSlice(i * args.seq_len, (i + 1) * args.seq_len, 0, i)
                                               for i in range(seqs)))
            caches = {a.layer_name: KVCache.allocate(seqs, args.seq_len, kv_local, text.head_dim, dtype, device)
                      for a in model.model.attention_layers()}
            ids = torch.randint(text.vocab_size, (tokens,), generator=gen).to(device)
            positions = torch.arange(args.seq_len, device=device).repeat(seqs)
            step = step_fn(compiled, state, metadata, caches, positions, ids)
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            result["compile_s"][f"{label}/{tokens}"] = time.perf_counter() - t0
            if sp:  # a pass that matched nothing would time TP against itself
                middle = sum(r.changes.get("sequence_parallelism.middle", 0) for r in compiled.compiler.records
                             if r.num_tokens == tokens)
                if middle == 0:
                    raise RuntimeError(f"the SP pass matched nothing in the {tokens}-token graph")
                result.setdefault("sp_middle_matches", {})[str(tokens)] = middle
            entry = result["tokens"].setdefault(str(tokens), {})
            entry[f"{label}_ms"] = median_ms(step, args.repeats, device)
            if args.profile and device.type == "cuda" and tokens == max(args.tokens):
                result["profile"][label] = kernel_breakdown(step, args.profile_steps)
            del caches
    for tokens in args.tokens:
        alone = collectives_ms(tokens, text.hidden_size, world, dtype, device, args.repeats)
        reductions = 2 * text.num_layers + 1  # two a layer, one for the vocabulary-parallel embedding
        result["tokens"][str(tokens)].update(
            collectives=alone, tp_collectives_ms=reductions * alone["all_reduce"],
            sp_collectives_ms=reductions * (alone["reduce_scatter"] + alone["all_gather"]))
    if rank == 0:
        Path(out).write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


def table(result: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"tp={args.tp} {args.layers} layers hidden={args.hidden} {args.dtype} {args.mode}/{args.partition}, "
             f"sequences of {args.seq_len} tokens; medians of {args.repeats} steps (ms)",
             "| tokens | TP only | SP | SP / TP | all-reduces alone (TP) | RS + AG alone (SP) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for tokens, r in result["tokens"].items():
        lines.append(f"| {tokens} | {r['tp_ms']:.2f} | {r['sp_ms']:.2f} | {r['sp_ms'] / r['tp_ms']:.3f} | "
                     f"{r['tp_collectives_ms']:.2f} | {r['sp_collectives_ms']:.2f} |")
    for label, prof in result["profile"].items():
        lines.append(f"kernel time per step at {max(args.tokens)} tokens, {label}: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in prof["categories"].items()))
        lines += [f"  {k['ms']:8.3f} ms  {k['category']:<14} {k['name'][:100]}" for k in prof["top_kernels"]]
    return "\n".join(lines)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m reference_impl.compile.bench_sp", description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--tokens", default="4096,8192,16384", help="comma-separated step sizes")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens of each sequence in a step")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--intermediate", type=int, default=28672)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--mode", default="inductor", choices=["graph", "inductor"])
    p.add_argument("--partition", default="full", choices=["full", "piecewise"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--profile", action="store_true", help="kernel-time breakdown at the largest size (CUDA)")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    bad = [t for t in args.tokens if t % args.seq_len or t % args.tp]
    if bad:
        p.error(f"--tokens {bad}: each must be a multiple of --seq-len {args.seq_len} and of --tp {args.tp}")
    if args.device == "cuda" and torch.cuda.device_count() < args.tp:
        p.error(f"--tp {args.tp} needs {args.tp} CUDA devices; {torch.cuda.device_count()} available")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    with socket.socket() as s:  # a free loopback port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        cfg_dir = Path(tmp)
        (cfg_dir / "config.json").write_text(json.dumps(llama_config(args)))
        out = cfg_dir / "result.json"
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=run_rank, args=(rank, args.tp, port, args, str(cfg_dir), str(out)))
                 for rank in range(args.tp)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        failed = [(rank, proc.exitcode) for rank, proc in enumerate(procs) if proc.exitcode != 0]
        if failed:
            print(f"ranks failed (rank, exit code): {failed}", file=sys.stderr)
            return 1
        result = json.loads(out.read_text())
    result["args"] = {k: v for k, v in vars(args).items() if k != "json"}
    print(table(result, args))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
