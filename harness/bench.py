"""Benchmark: per-case time with the warm worker pool vs ``--fresh-workers``, same cases, one run.

``python -m harness.bench [--backend ray|mp] [--setups ID,...] [--scenarios NAME,...]``
"""

from __future__ import annotations

import argparse
import statistics
import time

from harness.matrix import get_matrix
from harness.orchestrate import Orchestrator, RunOptions, plan


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="ray", choices=["ray", "mp"])
    parser.add_argument("--setups", default="tp2-eager,tp2-pp2-eager")
    parser.add_argument("--scenarios", default="text,prompt_embeds,multimodal,mixed")
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
