"""A/B of launch variants at chosen sizes, interleaved with inductor: the measurements behind a table entry.

``python -m reference_impl.kernels.ab --points OP:HIDDEN:ROWS,... [--repeats 5] [--write-table] [--out F.json]``
times, at each point, the table's current configuration, its variants (see :func:`variants`: the
other cache hint, other warps and rows per program, two passes over chunks of the row) and
inductor's kernel, interleaved, ``--repeats`` times each, the way the benchmark times (CUDA-graph
replay, L2 flushed, median); checks every variant's output against the torch reference; prints the
median and range of each. With ``--write-table`` the variant with the lowest median becomes the
table's entry for that point's (kernel, row bytes, rows bucket) in ``launch.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from reference_impl.kernels import launch
from reference_impl.kernels.bench import graphed, implementations, kernel_us
from reference_impl.kernels.launch import LaunchConfig, block_size, launch_config, rows_bucket
from reference_impl.kernels.sweep import DECODE_ROWS_MAX, MAX_PER_THREAD, MIN_PER_THREAD, make_call

REPEATS = 5
# Chunks of the two-pass variants: inductor's looped reduction takes 2048 columns a pass.
CHUNKS = (2048, 4096)


def variants(op: str, hidden: int, rows: int, base: LaunchConfig) -> list[LaunchConfig]:
    """The table's configuration first, then the variants worth timing against it at this size."""
    block_h = block_size(hidden, 2)
    out = [base, dataclasses.replace(base, evict_first=not base.evict_first)]
    if rows <= DECODE_ROWS_MAX:
        out += [LaunchConfig(1, w) for w in (2, 4, 8, 16)] + [LaunchConfig(2, w) for w in (4, 8, 16)]
    else:
        out += [LaunchConfig(1, w) for w in (2, 8)] + [LaunchConfig(1, 8, evict_first=False)]
    out += [LaunchConfig(1, w, chunk=c) for c in CHUNKS if c < block_h for w in (8, 16)]
    keep = []
    for cfg in out:
        per_thread = cfg.block_rows * cfg.chunk_size(block_h) // (32 * cfg.num_warps)
        if cfg not in keep and MIN_PER_THREAD <= per_thread <= MAX_PER_THREAD:
            keep.append(cfg)
    return keep


def ab_point(
    op: str, hidden: int, rows: int, dtype: torch.dtype, repeats: int
) -> tuple[dict[str, object], LaunchConfig]:
    """Every variant's and inductor's timings at one point; the variant with the lowest median."""
    element_size = torch.tensor([], dtype=dtype).element_size()
    base = launch_config(op, hidden, element_size, rows)
    call, correct = make_call(op, hidden, rows, dtype)
    replays: dict[str, Callable[[], object]] = {}
    configs: dict[str, LaunchConfig] = {}
    wrong = []
    for cfg in variants(op, hidden, rows, base):
        fn = call(cfg)
        if not correct(fn):
            wrong.append(cfg.source())
            continue
        replays[cfg.source()] = graphed(fn)
        configs[cfg.source()] = cfg
    impls, _ = implementations(op, hidden, rows, dtype)
    replays["inductor"] = graphed(impls["inductor"])
    samples: dict[str, list[float]] = {name: [] for name in replays}
    for _ in range(repeats):
        for name, replay in replays.items():
            samples[name].append(kernel_us(replay))
    del replays, impls
    torch.cuda.empty_cache()
    ranked = sorted(configs, key=lambda name: statistics.median(samples[name]))
    ind = samples["inductor"]
    print(f"{op} H={hidden} rows={rows}: inductor {statistics.median(ind):.2f} ({min(ind):.2f}-{max(ind):.2f})"
          + (f"; WRONG OUTPUT: {wrong}" if wrong else ""), flush=True)
    for name in ranked:
        t = samples[name]
        tag = " [table]" if configs[name] == base else ""
        print(f"    {statistics.median(t):8.2f} ({min(t):.2f}-{max(t):.2f})  "
              f"{statistics.median(ind) / statistics.median(t):.3f}x  {name}{tag}", flush=True)
    return ({"op": op, "hidden": hidden, "rows": rows, "table": base.source(), "best": ranked[0],
             "samples": samples, "wrong": wrong}, configs[ranked[0]])


def write_table(path: Path, chosen: dict[tuple[str, int, int], LaunchConfig]) -> None:
    """Replace each chosen (kernel, row bytes, bucket) entry of launch.py's TABLE in place."""
    text = path.read_text()
    for (kernel, row_bytes, bucket), cfg in chosen.items():
        pattern = re.compile(rf'^(    \("{kernel}", {row_bytes}, {bucket}\): )LaunchConfig\(.*\),$', re.M)
        replacement = cfg.source() + ","

        def entry(m: re.Match[str], replacement: str = replacement) -> str:
            return m.group(1) + replacement

        text, n = pattern.subn(entry, text)
        if n != 1:
            raise RuntimeError(f"no single table entry for {(kernel, row_bytes, bucket)} in {path}")
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference_impl.kernels.ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", required=True, help="OP:HIDDEN:ROWS,...")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--write-table", action="store_true", help="make each point's fastest variant its entry")
    parser.add_argument("--out", help="also write every timing as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("the A/B needs a CUDA device", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    element_size = torch.tensor([], dtype=dtype).element_size()
    results = []
    chosen: dict[tuple[str, int, int], LaunchConfig] = {}
    for point in args.points.split(","):
        op, hidden, rows = point.split(":")
        result, best = ab_point(op, int(hidden), int(rows), dtype, args.repeats)
        results.append(result)
        key = (op, block_size(int(hidden), element_size) * element_size, rows_bucket(int(rows)))
        chosen[key] = best
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if args.write_table:
        write_table(Path(launch.__file__), chosen)
        print("table entries written: " + "; ".join(f"{k}: {c.source()}" for k, c in chosen.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
