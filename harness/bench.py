"""Benchmarks: what the worker pool saves, and where one setup's time goes.

``python -m harness.bench [pool] [--backend ray|mp] [--setups ID,...] [--scenarios NAME,...]``:
per-case time with the warm worker pool vs ``--fresh-workers``, same cases, one run.

``python -m harness.bench startup --tp 2 --pp 2 [--compile graph --sp] [--partition piecewise]``:
one setup on the multiprocessing launcher: process start-up, engine build, the first generation
(which compiles every step size it meets) and a second, warm one; with a compiled mode also the
graph node counts before and after the passes.

``python -m harness.bench memory --model smollm2-135m --tp 3 --pp 2 [--dtype bfloat16] [--full-load]``:
each rank's memory when it builds its engine (``reference_impl.engine.build_runner``) in a fresh
process: resident set before the build (the runtime: Python, torch, the process group, what
building a model imports), the peak during it and after, and the bytes of the weights and KV
cache it keeps. ``--full-load`` builds it the way ranks did before they read slices: the whole
checkpoint loaded, then cut to the stage and sharded (``load_model``, ``split_stages``,
``apply_tp``), for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

from harness.matrix import get_matrix
from harness.orchestrate import Orchestrator
from harness.plan import RunOptions, plan

COMMANDS = ("pool", "startup", "memory")


def timed_cases(options: RunOptions, setups: list[str], scenarios: list[str]) -> list[float]:
    """Seconds per case (baselines come from the cache, so this times the candidate side)."""
    planned = plan(get_matrix("smoke"), options, setups, scenarios)
    orchestrator = Orchestrator(options)
    times = []
    try:
        for p in planned:
            start = time.perf_counter()
            result = orchestrator.run_case(p)
            times.append(time.perf_counter() - start)
            if result.status != "pass":
                raise SystemExit(f"{p.case.id}: {result.status} {result.reason}")
    finally:
        orchestrator.close()
    return times


def pool(args: argparse.Namespace) -> None:
    setups, scenarios = args.setups.split(","), args.scenarios.split(",")
    base = RunOptions(backend=args.backend)
    timed_cases(base, setups, scenarios)  # fill the baseline cache, warm imports
    pooled = timed_cases(base, setups, scenarios)
    fresh = timed_cases(RunOptions(backend=args.backend, fresh_workers=True), setups, scenarios)
    pm, fm = statistics.median(pooled), statistics.median(fresh)
    pa, fa = statistics.mean(pooled), statistics.mean(fresh)
    print(f"{len(pooled)} cases ({','.join(setups)} x {','.join(scenarios)}), backend {args.backend}:\n"
          f"  pool:  median {pm:.2f} s/case, mean {pa:.2f} s/case (the mean includes starting one pool per "
          f"world size: first cases {', '.join(f'{t:.1f}' for t in pooled[:2])} s)\n"
          f"  fresh: median {fm:.2f} s/case, mean {fa:.2f} s/case\n"
          f"  pool faster per case: {fm / pm:.1f}x (median), {fa / pa:.1f}x (mean, pool starts included)")


def startup(args: argparse.Namespace) -> None:
    import torch

    from harness.launch.mp import MpLauncher
    from reference_impl.compile import CompileConfig
    from reference_impl.config import load_config
    from reference_impl.engine import EngineSpec
    from scenarios import inputs
    from scenarios.models import resolve

    ckpt = str(resolve(args.model))
    requests = inputs.text(load_config(ckpt), inputs.InputSpec())
    spec = EngineSpec(ckpt, args.tp, args.pp, compile=CompileConfig(args.compile, args.partition, args.sp))
    spec.validate()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with MpLauncher(spec.world_size) as launcher:
        launcher.call("ping")
        t1 = time.perf_counter()
        launcher.call("load", spec)
        t2 = time.perf_counter()
        launcher.run(spec, requests)
        t3 = time.perf_counter()
        launcher.run(spec, requests)
        t4 = time.perf_counter()
        records = launcher.call("compile_records")[0]
    print(f"{args.model} tp={args.tp} pp={args.pp} compile={args.compile}/{args.partition} sp={args.sp}: "
          f"process start + rendezvous {t1 - t0:.2f}s, engine build {t2 - t1:.2f}s, "
          f"first generation {t3 - t2:.2f}s, warm generation {t4 - t3:.2f}s "
          f"({len(requests)} requests)")
    for r in records:
        print(f"  rank0 graph {r['graph']:>16s} T={r['num_tokens']:<3d} nodes {r['nodes_before']} -> "
              f"{r['nodes_after']}  changes {r['changes']}")


def _rss_bytes() -> int:
    """This process's resident set now (``/proc/self/statm``: pages)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _build_full(spec: object) -> object:
    """The engine built as before sliced loading: every rank loads the whole checkpoint, then keeps
    its stage and cuts its shard (eager only, as the bench needs)."""
    import torch

    from reference_impl.engine import EngineSpec
    from reference_impl.loader import load_model
    from reference_impl.parallel import apply_tp, init_parallel, split_stages
    from reference_impl.parallel.pipeline import PipelineComm
    from reference_impl.runner import LocalComm, Runner, StageComm

    assert isinstance(spec, EngineSpec)
    state = init_parallel(spec.tp, spec.pp)
    model = apply_tp(split_stages(load_model(spec.checkpoint, spec.torch_dtype), spec.pp, state.pp_rank), state)
    comm: StageComm = LocalComm()
    if spec.pp > 1:
        comm = PipelineComm(state, model.cfg.text.hidden_size, spec.torch_dtype, torch.device("cpu"), spec.compile)
    return Runner(model, spec.engine, comm, state=state)


def _memory_rank(rank: int, world: int, port: int, spec: object, full_load: bool, queue: object) -> None:
    """One rank of ``memory``: join the group, build the engine, report what it took."""
    import torch
    import torch.distributed as dist

    from harness.engines.base import weight_bytes
    from harness.launch.worker import peak_rss_bytes
    from reference_impl.config import load_config
    from reference_impl.engine import EngineSpec, build_runner
    from reference_impl.loader import meta_model
    from reference_impl.runner import Runner

    assert isinstance(spec, EngineSpec)
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    meta_model(load_config(spec.checkpoint))  # what building a model imports: runtime, not weights
    before, start = _rss_bytes(), time.perf_counter()
    runner = _build_full(spec) if full_load else build_runner(spec, torch.device("cpu"))
    assert isinstance(runner, Runner)
    seconds = time.perf_counter() - start
    cache = sum(c.k.numel() * c.k.element_size() * 2 for c in runner.kv_caches.values())
    queue.put((rank, before, peak_rss_bytes(), _rss_bytes(), weight_bytes(runner.model), cache, seconds))  # type: ignore[attr-defined]
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def memory(args: argparse.Namespace) -> None:
    import socket

    import torch.multiprocessing as mp

    from harness.setup import ParallelSetup
    from scenarios.models import resolve

    ckpt = str(resolve(args.model))
    spec = ParallelSetup(tp=args.tp, pp=args.pp, dtype=args.dtype).engine_spec(ckpt)
    spec.validate()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_memory_rank, args=(r, spec.world_size, port, spec, args.full_load, queue))
             for r in range(spec.world_size)]
    for p in procs:
        p.start()
    rows = sorted(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    mib = 1 << 20
    how = "whole checkpoint loaded, then cut" if args.full_load else "each rank reads its slices"
    print(f"{args.model} tp={args.tp} pp={args.pp} {args.dtype}, {how}: MiB per rank (weights = the parameters "
          "the rank keeps; KV cache = its max_num_seqs x max_model_len cache)")
    print("rank  before build  peak  after  weights  KV cache  peak - before  (peak - before - KV) / weights  build s")
    for rank, before, peak, after, weights, cache, seconds in rows:
        print(f"{rank:4d}  {before / mib:12.0f}  {peak / mib:4.0f}  {after / mib:5.0f}  {weights / mib:7.0f}  "
              f"{cache / mib:8.0f}  {(peak - before) / mib:13.0f}  {(peak - before - cache) / max(weights, 1):30.2f}  "
              f"{seconds:7.1f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pool", help="per-case time: warm worker pool vs fresh workers (the default)")
    p.add_argument("--backend", default="ray", choices=["ray", "mp"])
    p.add_argument("--setups", default="tp2-eager,tp2-pp2-eager")
    p.add_argument("--scenarios", default="text,prompt_embeds,multimodal,mixed")
    p.set_defaults(func=pool)
    s = sub.add_parser("startup", help="one setup's start-up, build, first and warm generation")
    s.add_argument("--tp", type=int, default=2)
    s.add_argument("--pp", type=int, default=2)
    s.add_argument("--model", default="tiny-llama")
    s.add_argument("--compile", default="eager", choices=["eager", "graph", "inductor"])
    s.add_argument("--partition", default="full", choices=["full", "piecewise"])
    s.add_argument("--sp", action="store_true")
    s.set_defaults(func=startup)
    m = sub.add_parser("memory", help="each rank's resident memory before, during and after its engine build")
    m.add_argument("--model", default="smollm2-135m")
    m.add_argument("--tp", type=int, default=3)
    m.add_argument("--pp", type=int, default=2)
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    m.add_argument("--full-load", action="store_true", help="build as before sliced loading (for comparison)")
    m.set_defaults(func=memory)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in (*COMMANDS, "-h", "--help"):
        args.insert(0, "pool")  # the pool comparison needs no command name
    ns = build_parser().parse_args(args)
    ns.func(ns)


if __name__ == "__main__":
    main()
