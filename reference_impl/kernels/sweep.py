"""Launch-configuration sweep of the norm kernels: the measurements behind ``launch.TABLE``.

``python -m reference_impl.kernels.sweep [--ops ...] [--hidden 4096,8192] [--rows ...] [--out F.json]``
times every candidate configuration (rows per program, warps, grid, pipelining depth) of each
kernel at each size, the way the benchmark times kernels (CUDA-graph replay, L2 flushed, median),
checks each candidate's output against the torch reference, then re-times the best few
interleaved and prints the winner per size beside the table's current choice.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch

from reference_impl.kernels import (
    fused_add_rms_norm_ref,
    fused_add_rms_norm_triton,
    rms_norm_ref,
    rms_norm_triton,
)
from reference_impl.kernels.bench import EPS, HIDDEN, OPS, ROWS, graphed, kernel_us
from reference_impl.kernels.launch import LaunchConfig, block_size, launch_config

# Candidates keep each thread's share of a row block between these many elements: fewer than 4
# bf16 elements is narrower than an 8-byte load, more than 64 per tensor starts to spill.
MIN_PER_THREAD, MAX_PER_THREAD = 4, 64
# Row counts up to this are latency-bound: only one row per program, one program per row.
DECODE_ROWS_MAX = 256
# The sweep's quick timing (ms): one short window per candidate, then the best few re-timed.
QUICK_WARMUP_MS, QUICK_REP_MS = 5, 15
FINALISTS, FINAL_REPEATS = 3, 3
# bf16 output against the reference: one rounding step (2^-8 relative), as tests/test_gpu.py.
BF16_TOL = 1.6e-2
# Threads one multiprocessor can hold (H100/H200): a persistent grid fills this many.
THREADS_PER_SM = 2048


def candidates(hidden: int, element_size: int, rows: int) -> list[LaunchConfig]:
    """Every configuration worth timing for `rows` rows of `hidden` elements."""
    block_h = block_size(hidden, element_size)
    out = []
    for block_rows in (1,) if rows <= DECODE_ROWS_MAX else (1, 2, 4):
        for num_warps in (1, 2, 4, 8, 16, 32):
            per_thread = block_rows * block_h // (32 * num_warps)
            if not MIN_PER_THREAD <= per_thread <= MAX_PER_THREAD:
                continue
            out.append(LaunchConfig(block_rows, num_warps))
            if rows > DECODE_ROWS_MAX:
                full = max(THREADS_PER_SM // (32 * num_warps), 1)
                # Pipelining depth 2 gained at most 0.7% in the first sweep: not swept.
                out.append(LaunchConfig(block_rows, num_warps, full))
    return out


def make_call(op: str, hidden: int, rows: int, dtype: torch.dtype) -> tuple[
        Callable[[LaunchConfig], Callable[[], object]], Callable[[Callable[[], object]], bool]]:
    """(config -> call of the kernel with it, call -> whether its output matches the reference)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, hidden, generator=gen, device="cuda", dtype=dtype)  # (N, H)
    residual = torch.randn(rows, hidden, generator=gen, device="cuda", dtype=dtype)  # (N, H)
    weight = torch.randn(hidden, generator=gen, device="cuda", dtype=dtype)  # (H,)
    if op == "rms_norm":
        want: tuple[torch.Tensor, ...] = (rms_norm_ref(x, weight, EPS),)

        def call(cfg: LaunchConfig) -> Callable[[], object]:
            return lambda: rms_norm_triton(x, weight, EPS, cfg)
    else:
        want = fused_add_rms_norm_ref(x, residual, weight, EPS)

        def call(cfg: LaunchConfig) -> Callable[[], object]:
            return lambda: fused_add_rms_norm_triton(x, residual, weight, EPS, cfg)

    def correct(fn: Callable[[], object]) -> bool:
        got = fn()
        got_t = got if isinstance(got, tuple) else (got,)
        return all(torch.allclose(g, w, atol=BF16_TOL, rtol=BF16_TOL) for g, w in zip(got_t, want, strict=True))

    return call, correct


def sweep_shape(op: str, hidden: int, rows: int, dtype: torch.dtype) -> dict[str, object]:
    call, correct = make_call(op, hidden, rows, dtype)
    element_size = torch.tensor([], dtype=dtype).element_size()
    quick: list[tuple[float, LaunchConfig]] = []
    wrong = []
    for cfg in candidates(hidden, element_size, rows):
        fn = call(cfg)
        if not correct(fn):
            wrong.append(cfg)
            continue
        quick.append((kernel_us(graphed(fn), QUICK_WARMUP_MS, QUICK_REP_MS), cfg))
    quick.sort(key=lambda t: t[0])
    table_cfg = launch_config(op, hidden, element_size, rows)
    finalists = [cfg for _, cfg in quick[:FINALISTS]]
    if table_cfg not in finalists:
        finalists.append(table_cfg)
    replays = {cfg: graphed(call(cfg)) for cfg in finalists}
    final: dict[LaunchConfig, list[float]] = {cfg: [] for cfg in finalists}
    for _ in range(FINAL_REPEATS):
        for cfg, replay in replays.items():
            final[cfg].append(kernel_us(replay))
    ranked = sorted(final, key=lambda c: statistics.median(final[c]))
    best = ranked[0]
    print(f"{op} H={hidden} rows={rows}: best {best} {statistics.median(final[best]):.2f} µs "
          f"{[round(t, 2) for t in final[best]]}; table {table_cfg} {statistics.median(final[table_cfg]):.2f} µs"
          + (f"; WRONG OUTPUT: {wrong}" if wrong else ""), flush=True)
    torch.cuda.empty_cache()
    return {"op": op, "hidden": hidden, "rows": rows, "best": asdict(best),
            "final": [{"config": asdict(c), "us": final[c]} for c in ranked],
            "quick": [{"config": asdict(c), "us": t} for t, c in quick],
            "wrong": [asdict(c) for c in wrong]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference_impl.kernels.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--hidden", default=",".join(map(str, HIDDEN)))
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--out", help="also write every timing as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("the sweep needs a CUDA device", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    results = [sweep_shape(op, int(h), int(r), dtype) for op in args.ops.split(",")
               for h in args.hidden.split(",") for r in args.rows.split(",")]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
