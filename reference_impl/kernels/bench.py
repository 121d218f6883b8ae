"""Kernel benchmark: the Triton ``rms_norm`` and ``fused_add_rms_norm`` against torch eager (the
references) and against torch.compile's generated kernel, with the device-to-device copy
bandwidth as the ceiling (a norm reads and writes each element once, like a copy).

``python -m reference_impl.kernels.bench [--hidden 4096,8192] [--rows 1,16,...] [--dtype bfloat16]
[--repeats 5] [--out FILE.json]`` on a CUDA device prints one markdown row per (op, hidden, rows).

How it measures, the same way for all implementations:

* kernel time: each implementation's call is captured once in a CUDA graph, and the graph's
  replay is timed by ``triton.testing.do_bench`` (median, L2 flushed before each replay). This is
  the device time of the kernels the call launches, without the Python that launches them, as a
  model run under CUDA graphs (decode in vLLM) sees it. Each implementation is timed ``--repeats``
  times, interleaved (triton, inductor, eager, copy, triton, ...); the table gives the median of
  those medians and their range, so a difference inside the range is noise.
* host time, up to 256 rows (the decode sizes, where launching costs more than the kernel):
  the wall time per call of 200 back-to-back calls from Python, as an eager (ungraphed) caller
  sees it: the launch path (Triton's launcher; Dynamo's guards and inductor's wrapper; torch's
  dispatcher per eager op) or the device time, whichever is longer.
* the ceiling: a 1 GiB device-to-device copy (bytes read + written per second); "size copy" is
  a copy moving the same bytes as the op at that size, for context: at small sizes no kernel
  reaches the large copy's bandwidth. Copies are launched directly, not from a graph (see
  COPY_NOT_GRAPHED).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from reference_impl.kernels import (
    fused_add_rms_norm_ref,
    fused_add_rms_norm_triton,
    rms_norm_ref,
    rms_norm_triton,
)

ROWS = (1, 16, 256, 1024, 4096, 16384, 65536)
HIDDEN = (4096, 8192)
OPS = ("rms_norm", "fused_add_rms_norm")
EPS = 1e-6
# Bytes of the copy that measures the ceiling: large enough (1 GiB) that launch cost vanishes.
COPY_BYTES = 1 << 30
# Interleaved timings of each implementation: enough for a median and a range that shows the
# run-to-run noise (about 0.1-0.5 µs at decode sizes on an H200).
REPEATS = 5
# do_bench's warm-up and timed window per timing, in ms: a few hundred replays at decode sizes,
# still several at the largest eager call (about 12 ms).
WARMUP_MS, REP_MS = 10, 40
# Host time: measured up to this many rows, over this many back-to-back calls per timing.
HOST_ROWS_MAX = 256
HOST_CALLS = 200
# COPY_NOT_GRAPHED: a contiguous same-dtype copy_ is a cudaMemcpy, which a CUDA graph turns into a
# memcpy node: on an H200 that ran at 2.7 TB/s against 4.25 launched directly. Copies are timed
# directly; their host-side launch (a few µs) hides behind do_bench's L2 flush (about 60 µs).
# Verdict against inductor: "faster"/"slower" only when the repeat ranges do not overlap.
VERDICTS = ("faster", "tie", "slower")


@dataclass(frozen=True)
class Timing:
    """Microseconds over the repeats: median of the per-repeat medians, lowest and highest."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Timing:
        return cls(statistics.median(samples), min(samples), max(samples))

    def cell(self) -> str:
        return f"{self.median:.1f} ({self.low:.1f}-{self.high:.1f})"


def verdict(ours: Timing, theirs: Timing) -> str:
    """faster / slower when the ranges are disjoint, tie when they overlap."""
    if ours.high < theirs.low:
        return "faster"
    if ours.low > theirs.high:
        return "slower"
    return "tie"


@dataclass(frozen=True)
class Row:
    op: str
    hidden: int
    rows: int
    moved_bytes: int  # the fewest bytes the op must move: each input read, each output written once
    ceiling_gbps: float
    triton: Timing
    inductor: Timing
    eager: Timing
    size_copy: Timing  # a copy of moved_bytes (half read, half written)
    host: dict[str, Timing] | None  # host time per call, decode sizes only

    @property
    def triton_gbps(self) -> float:
        return self.moved_bytes / self.triton.median / 1e3

    def markdown(self) -> str:
        share = self.triton_gbps / self.ceiling_gbps
        return (f"| {self.op} | {self.hidden} | {self.rows} | {self.triton.cell()} | {self.inductor.cell()} | "
                f"{self.eager.median:.1f} | {self.size_copy.median:.1f} | {self.triton_gbps:.0f} | "
                f"{100 * share:.0f}% | {100 * self.size_copy.median / self.triton.median:.0f}% | "
                f"{self.eager.median / self.triton.median:.1f}x | "
                f"{self.inductor.median / self.triton.median:.2f}x | {verdict(self.triton, self.inductor)} |")

    def host_markdown(self) -> str:
        assert self.host is not None
        h = self.host
        return (f"| {self.op} | {self.hidden} | {self.rows} | {h['triton'].cell()} | {h['inductor'].cell()} | "
                f"{h['eager'].cell()} | {h['inductor'].median / h['triton'].median:.2f}x | "
                f"{verdict(h['triton'], h['inductor'])} |")


HEADER = ("| op | hidden | rows | triton µs | inductor µs | eager µs | size copy µs | triton GB/s | of copy "
          "| of size copy | vs eager | vs inductor | verdict |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
HOST_HEADER = ("| op | hidden | rows | triton µs/call | inductor µs/call | eager µs/call | vs inductor | verdict |\n"
               "| --- | --- | --- | --- | --- | --- | --- | --- |")


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """fn captured in a CUDA graph (after warm-up calls on a side stream); returns its replay."""
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call, unused-ignore]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compiles, autotunes, allocates outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    replay: Callable[[], None] = graph.replay
    return replay


def kernel_us(replay: Callable[[], object], warmup_ms: int = WARMUP_MS, rep_ms: int = REP_MS) -> float:
    """Median device time of one replay in µs (triton's do_bench: warm-up, L2 flush before each)."""
    from triton.testing import do_bench

    return float(do_bench(replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")) * 1e3


def host_us(fn: Callable[[], object], calls: int = HOST_CALLS) -> float:
    """Wall time per call of `calls` back-to-back calls, in µs (synchronized before and after)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def copy_gbps(dtype: torch.dtype) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    n = COPY_BYTES // torch.tensor([], dtype=dtype).element_size()
    src = torch.randn(n, device="cuda").to(dtype)  # random, not zeros: see METHOD.md
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / kernel_us(lambda: dst.copy_(src)) / 1e3  # not graphed: see COPY_NOT_GRAPHED


def implementations(op: str, hidden: int, rows: int, dtype: torch.dtype) -> tuple[dict[str, Callable[[], object]], int]:
    """The op's three implementations and a same-bytes copy, as argument-free calls; bytes moved."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, hidden, generator=gen, device="cuda", dtype=dtype)  # (N, H)
    residual = torch.randn(rows, hidden, generator=gen, device="cuda", dtype=dtype)  # (N, H)
    weight = torch.randn(hidden, generator=gen, device="cuda", dtype=dtype)  # (H,)
    torch._dynamo.reset()  # a fresh inductor kernel per shape: never the recompile limit's eager fallback
    if op == "rms_norm":
        compiled = torch.compile(rms_norm_ref, dynamic=False)
        impls: dict[str, Callable[[], object]] = {
            "triton": lambda: rms_norm_triton(x, weight, EPS),
            "inductor": lambda: compiled(x, weight, EPS),
            "eager": lambda: rms_norm_ref(x, weight, EPS)}
        tensors = 2  # read x, write out
    else:
        compiled_fused = torch.compile(fused_add_rms_norm_ref, dynamic=False)
        impls = {"triton": lambda: fused_add_rms_norm_triton(x, residual, weight, EPS),
                 "inductor": lambda: compiled_fused(x, residual, weight, EPS),
                 "eager": lambda: fused_add_rms_norm_ref(x, residual, weight, EPS)}
        tensors = 4  # read x and residual, write out and the new residual
    moved = tensors * rows * hidden * x.element_size()
    src = torch.randn(moved // 2 // x.element_size(), generator=gen, device="cuda", dtype=dtype)
    dst = torch.empty_like(src)
    impls["copy"] = lambda: dst.copy_(src)
    return impls, moved


def bench(op: str, hidden: int, rows: int, dtype: torch.dtype, ceiling: float, repeats: int) -> Row:
    impls, moved = implementations(op, hidden, rows, dtype)
    replays: dict[str, Callable[[], object]] = {  # COPY_NOT_GRAPHED
        name: fn if name == "copy" else graphed(fn) for name, fn in impls.items()}
    samples: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(repeats):
        for name, replay in replays.items():
            samples[name].append(kernel_us(replay))
    host = None
    if rows <= HOST_ROWS_MAX:
        host_samples: dict[str, list[float]] = {name: [] for name in ("triton", "inductor", "eager")}
        for _ in range(repeats):
            for name in host_samples:
                host_samples[name].append(host_us(impls[name]))
        host = {name: Timing.of(s) for name, s in host_samples.items()}
    timing = {name: Timing.of(s) for name, s in samples.items()}
    del replays, impls
    torch.cuda.empty_cache()
    return Row(op, hidden, rows, moved, ceiling, timing["triton"], timing["inductor"], timing["eager"],
               timing["copy"], host)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference_impl.kernels.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--hidden", default=",".join(map(str, HIDDEN)))
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=REPEATS, help="interleaved timings per implementation")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("the kernel benchmark needs a CUDA device", file=sys.stderr)
        return 2
    import triton  # type: ignore[import-untyped, unused-ignore]

    dtype = getattr(torch, args.dtype)
    ceiling = copy_gbps(dtype)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{args.dtype}: device-to-device copy {ceiling:.0f} GB/s; {args.repeats} repeats")
    print(HEADER)
    rows = []
    for op in args.ops.split(","):
        for hidden in (int(h) for h in args.hidden.split(",")):
            for n in (int(r) for r in args.rows.split(",")):
                row = bench(op, hidden, n, dtype, ceiling, args.repeats)
                rows.append(row)
                print(row.markdown(), flush=True)
    host_rows = [r for r in rows if r.host is not None]
    if host_rows:
        print("\nHost time per call (eager callers, no CUDA graph):\n" + HOST_HEADER)
        for row in host_rows:
            print(row.host_markdown())
    if args.out:
        Path(args.out).write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "copy_gbps": ceiling, "dtype": args.dtype, "repeats": args.repeats,
            "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
