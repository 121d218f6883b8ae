"""Launch configuration of the norm kernels: rows per program, warps and grid, from a table.

Both kernels walk blocks of ``block_rows`` rows, each row held whole in registers (one block of
``next_power_of_2(hidden)`` columns). The grid is one program per block of rows, or, when
``programs_per_sm`` is set, a persistent grid of that many programs per multiprocessor that
loops over the blocks. Which is fastest depends on the row's size in bytes and on how many rows
there are (launch- and latency-bound at decode sizes, bandwidth-bound from a few thousand rows),
so the choice is a small table keyed by (kernel, row bytes, rows bucket), measured with
``python -m reference_impl.kernels.sweep`` (docs/results/gpu-h200x1.md has the run). Row sizes
the table does not list get the rule in :func:`fallback_config`.

Everything here is plain Python: the launchers look a configuration up once per (kernel, hidden,
element size, rows bucket) and cache it, so a call pays a dictionary lookup, not a heuristic.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# Largest row (in bytes) one program keeps in registers; beyond this a row-in-registers kernel
# would spill, so we refuse rather than go slow.
MAX_FUSED_BYTES = 65536
# Rows buckets: a launch is looked up by the smallest bucket bound >= rows (the last is open).
ROWS_BUCKETS = (1, 16, 256, 1024, 4096, 16384)
KERNELS = ("rms_norm", "fused_add_rms_norm")


@dataclass(frozen=True)
class LaunchConfig:
    """How one kernel launch is shaped.

    block_rows: rows one program handles per loop iteration (a power of two).
    num_warps: warps per program (a power of two, 1 to 32).
    programs_per_sm: 0 for one program per block of rows; n > 0 for a persistent grid of
        n programs per multiprocessor, each looping over blocks ``pid, pid + grid, ...``.
    num_stages: Triton's software-pipelining depth of that loop (1: none).
    chunk: 0 to hold each row whole in registers (one pass); a power of two smaller than the
        row's block for two passes over chunks of that many columns, inductor's looped
        reduction: the sum of squares, then a second pass that re-reads the row from L2,
        normalizes and stores. A chunk not smaller than the row's block means one pass.
    evict_first: load the streamed inputs (read once from memory) with the ``evict_first``
        cache hint; False loads them with the default policy.
    """

    block_rows: int = 1
    num_warps: int = 8
    programs_per_sm: int = 0
    num_stages: int = 1
    chunk: int = 0
    evict_first: bool = True

    def __post_init__(self) -> None:
        for name in ("block_rows", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if self.num_warps > 32:
            raise ValueError(f"num_warps must be at most 32, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if self.programs_per_sm < 0:
            raise ValueError(f"programs_per_sm must be >= 0, got {self.programs_per_sm}")
        if self.chunk < 0 or self.chunk & (self.chunk - 1):
            raise ValueError(f"chunk must be 0 or a power of two, got {self.chunk}")

    def chunk_size(self, block_h: int) -> int:
        """Columns per pass for rows of block `block_h`: the whole block unless chunk is smaller."""
        return min(self.chunk, block_h) if self.chunk else block_h

    def source(self) -> str:
        """This configuration as the constructor call the table is written in."""
        text = f"LaunchConfig({self.block_rows}, {self.num_warps}"
        for name, default in (("programs_per_sm", 0), ("num_stages", 1), ("chunk", 0), ("evict_first", True)):
            value = getattr(self, name)
            if value != default:
                text += f", {name}={value!r}"
        return text + ")"

    def grid(self, rows: int, num_sms: int) -> int:
        """Number of programs for `rows` rows on a device of `num_sms` multiprocessors."""
        blocks = -(-rows // self.block_rows)
        if self.programs_per_sm == 0:
            return blocks
        return min(blocks, self.programs_per_sm * num_sms)


# (kernel, row bytes, rows bucket) -> config, measured on one H200 in bf16 (row bytes 8192 and
# 16384: hidden 4096 and 8192) by the sweep at each bucket's upper bound (2026-11-29, the third
# sweep; docs/results/gpu-h200x1.md). Where the best few were within the run-to-run noise (about
# 1%) the pick also leans on the second sweep. What it shows: latency sizes want one row per
# program and 4-16 warps; from 4k rows the kernels are bandwidth-bound and the choice moves them
# by a few per cent; a persistent grid never won by more than the noise once the casts were cheap.
# Eleven entries were then re-picked by `python -m reference_impl.kernels.ab` (2026-11-30), each
# variant timed against inductor at the bucket's bound: fused add + norm from 16k rows (and 8192
# from 4k) loads its inputs with the default cache hint (evict_first cost it 3-4%); rms_norm at
# hidden 8192 from 256 rows and at 256 x 4096 takes two passes over chunks (inductor's shape); at
# 16 x 4096 the default hint (within the noise).
TABLE: dict[tuple[str, int, int], LaunchConfig] = {
    ("rms_norm", 8192, 1): LaunchConfig(1, 4),
    ("rms_norm", 8192, 16): LaunchConfig(1, 4, evict_first=False),
    ("rms_norm", 8192, 256): LaunchConfig(1, 16, chunk=2048),
    ("rms_norm", 8192, 1024): LaunchConfig(1, 8),
    ("rms_norm", 8192, 4096): LaunchConfig(2, 16),
    ("rms_norm", 8192, 16384): LaunchConfig(2, 16),
    ("rms_norm", 8192, 65536): LaunchConfig(2, 16),
    ("rms_norm", 16384, 1): LaunchConfig(1, 16),
    ("rms_norm", 16384, 16): LaunchConfig(1, 16),
    ("rms_norm", 16384, 256): LaunchConfig(1, 16, chunk=4096),
    ("rms_norm", 16384, 1024): LaunchConfig(1, 8),
    ("rms_norm", 16384, 4096): LaunchConfig(1, 16, chunk=4096),
    ("rms_norm", 16384, 16384): LaunchConfig(1, 16, chunk=4096),
    ("rms_norm", 16384, 65536): LaunchConfig(1, 16, chunk=4096),
    ("fused_add_rms_norm", 8192, 1): LaunchConfig(1, 4),
    ("fused_add_rms_norm", 8192, 16): LaunchConfig(1, 4),
    ("fused_add_rms_norm", 8192, 256): LaunchConfig(1, 16),
    ("fused_add_rms_norm", 8192, 1024): LaunchConfig(2, 4),
    ("fused_add_rms_norm", 8192, 4096): LaunchConfig(1, 2),
    ("fused_add_rms_norm", 8192, 16384): LaunchConfig(1, 2, evict_first=False),
    ("fused_add_rms_norm", 8192, 65536): LaunchConfig(1, 2, evict_first=False),
    ("fused_add_rms_norm", 16384, 1): LaunchConfig(1, 8),
    ("fused_add_rms_norm", 16384, 16): LaunchConfig(1, 8),
    ("fused_add_rms_norm", 16384, 256): LaunchConfig(1, 8),
    ("fused_add_rms_norm", 16384, 1024): LaunchConfig(1, 4),
    ("fused_add_rms_norm", 16384, 4096): LaunchConfig(1, 32, evict_first=False),
    ("fused_add_rms_norm", 16384, 16384): LaunchConfig(4, 16, evict_first=False),
    ("fused_add_rms_norm", 16384, 65536): LaunchConfig(4, 16, evict_first=False),
}


def rows_bucket(rows: int) -> int:
    """The table's rows bucket of `rows`: the first bound >= rows, else the last (open) one."""
    for bound in ROWS_BUCKETS:
        if rows <= bound:
            return bound
    return ROWS_BUCKETS[-1] * 4


def block_size(hidden: int, element_size: int) -> int:
    """Columns of one row block: the next power of two >= hidden; refuses rows that would spill."""
    block = 1 << max(hidden - 1, 0).bit_length()
    if block * element_size > MAX_FUSED_BYTES:
        raise RuntimeError(
            f"hidden size {hidden} is too large for the row-in-registers kernels "
            f"(at most {MAX_FUSED_BYTES // element_size} elements of {element_size} bytes)"
        )
    return block


def fallback_config(row_bytes: int) -> LaunchConfig:
    """Rows the table does not list: one row per program, about 512 bytes a warp, 1 to 16 warps."""
    return LaunchConfig(block_rows=1, num_warps=min(max(row_bytes // 512, 1), 16))


def launch_config(kernel: str, hidden: int, element_size: int, rows: int) -> LaunchConfig:
    """The configuration for `rows` rows of `hidden` elements of `element_size` bytes."""
    return _cached_config(kernel, hidden, element_size, rows_bucket(rows))


@functools.lru_cache(maxsize=1024)
def _cached_config(kernel: str, hidden: int, element_size: int, bucket: int) -> LaunchConfig:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    row_bytes = block_size(hidden, element_size) * element_size
    return TABLE.get((kernel, row_bytes, bucket), fallback_config(row_bytes))


@functools.lru_cache(maxsize=16)
def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; 1 elsewhere (the Triton interpreter runs on the CPU)."""
    if device.type != "cuda":
        return 1
    return int(torch.cuda.get_device_properties(device).multi_processor_count)
