"""Kernel benchmark: the Triton ``rms_norm`` and ``fused_add_rms_norm`` against torch eager (the
references) and against torch.compile's generated kernel, with the device-to-device copy
bandwidth as the ceiling (a norm reads and writes each element once, like a copy).

``python -m reference_impl.kernels.bench [--hidden 4096,8192] [--rows 1,16,...] [--dtype bfloat16]
[--out FILE.json]`` on a CUDA device prints one markdown row per (op, hidden, rows): each
implementation's median time (``triton.testing.do_bench``), the Triton kernel's effective bandwidth
and its share of the copy bandwidth, and its speed-up over eager and over inductor.
"""

from __future__ import annotations

import argparse
import json
import sys
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
EPS = 1e-6
# Bytes of the copy that measures the ceiling: large enough (1 GiB) that launch cost vanishes.
COPY_BYTES = 1 << 30


@dataclass(frozen=True)
class Row:
    op: str
    hidden: int
    rows: int
    triton_us: float
    eager_us: float
    inductor_us: float
    triton_gbps: float
    copy_share: float  # Triton's bandwidth / copy bandwidth

    def markdown(self) -> str:
        return (f"| {self.op} | {self.hidden} | {self.rows} | {self.triton_us:.1f} | {self.eager_us:.1f} | "
                f"{self.inductor_us:.1f} | {self.triton_gbps:.0f} | {100 * self.copy_share:.0f}% | "
                f"{self.eager_us / self.triton_us:.2f}x | {self.inductor_us / self.triton_us:.2f}x |")


def median_us(fn: Callable[[], object]) -> float:
    """Median time of ``fn`` in microseconds (triton's do_bench: warm-up, L2 flush between runs)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e3


def copy_gbps(dtype: torch.dtype) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    n = COPY_BYTES // torch.tensor([], dtype=dtype).element_size()
    src = torch.empty(n, dtype=dtype, device="cuda")
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / median_us(lambda: dst.copy_(src)) / 1e3


def bench(op: str, hidden: int, rows: int, dtype: torch.dtype, ceiling: float) -> Row:
    torch._dynamo.reset()  # a fresh inductor kernel per shape: never the recompile limit's eager fallback
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, hidden, generator=gen, device="cuda", dtype=dtype)  # (N, H)
    residual = torch.randn(rows, hidden, generator=gen, device="cuda", dtype=dtype)  # (N, H)
    weight = torch.randn(hidden, generator=gen, device="cuda", dtype=dtype)  # (H,)
    if op == "rms_norm":
        ref: Callable[..., object] = rms_norm_ref
        impls = {"triton": lambda: rms_norm_triton(x, weight, EPS), "eager": lambda: ref(x, weight, EPS)}
        compiled = torch.compile(rms_norm_ref, dynamic=False)
        impls["inductor"] = lambda: compiled(x, weight, EPS)
        tensors = 2  # read x, write out
    else:
        impls = {"triton": lambda: fused_add_rms_norm_triton(x, residual, weight, EPS),
                 "eager": lambda: fused_add_rms_norm_ref(x, residual, weight, EPS)}
        compiled_fused = torch.compile(fused_add_rms_norm_ref, dynamic=False)
        impls["inductor"] = lambda: compiled_fused(x, residual, weight, EPS)
        tensors = 4  # read x and residual, write out and the new residual
    times = {name: median_us(fn) for name, fn in impls.items()}
    moved = tensors * rows * hidden * x.element_size()
    gbps = moved / times["triton"] / 1e3
    return Row(op, hidden, rows, times["triton"], times["eager"], times["inductor"], gbps, gbps / ceiling)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference_impl.kernels.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", default=",".join(map(str, HIDDEN)))
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("the kernel benchmark needs a CUDA device", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    ceiling = copy_gbps(dtype)
    print(f"{torch.cuda.get_device_name()} {args.dtype}: device-to-device copy {ceiling:.0f} GB/s")
    print("| op | hidden | rows | triton µs | eager µs | inductor µs | triton GB/s | of copy | vs eager "
          "| vs inductor |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for op in ("rms_norm", "fused_add_rms_norm"):
        for hidden in (int(h) for h in args.hidden.split(",")):
            for n in (int(r) for r in args.rows.split(",")):
                row = bench(op, hidden, n, dtype, ceiling)
                rows.append(row)
                print(row.markdown(), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"copy_gbps": ceiling, "dtype": args.dtype,
                                              "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
