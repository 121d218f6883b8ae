"""Benchmarks: what the worker pool saves, and where one setup's time goes.

``python -m harness.bench [pool] [--backend ray|mp] [--setups ID,...] [--scenarios NAME,...]``:
per-case time with the warm worker pool vs ``--fresh-workers``, same cases, one run.

``python -m harness.bench startup --tp 2 --pp 2 [--compile graph --sp] [--partition piecewise]``:
one setup on the multiprocessing launcher: process start-up, engine build, the first generation
(which compiles every step size it meets) and a second, warm one; with a compiled mode also the
graph node counts before and after the passes.
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

COMMANDS = ("pool", "startup")


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
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in (*COMMANDS, "-h", "--help"):
        args.insert(0, "pool")  # the pool comparison needs no command name
    ns = build_parser().parse_args(args)
    ns.func(ns)


if __name__ == "__main__":
    main()
