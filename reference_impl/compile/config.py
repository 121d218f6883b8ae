"""Compile options and the two rules every part must agree on: when SP applies to a step, and
how a step's token count is padded."""

from __future__ import annotations

from dataclasses import dataclass

COMPILE_MODES = ("eager", "graph", "inductor")
# The sequence-parallelism pass's patterns, as its match counts name them.
SP_PATTERNS = ("first", "middle", "final")
# Collective ops as the pass manager's ``op_counts`` names them: what a rewritten graph has left.
COLLECTIVES = {"all_reduce": "_c10d_functional.all_reduce.default",
               "reduce_scatter": "_c10d_functional.reduce_scatter_tensor.default",
               "all_gather": "_c10d_functional.all_gather_into_tensor.default"}
PARTITIONS = ("full", "piecewise")
# Static token-count buckets (like CUDA-graph capture sizes): each distinct padded size is one
# Dynamo compile, so the set is bounded.
BASE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


@dataclass(frozen=True)
class CompileConfig:
    """How a rank's model is run. ``sp`` needs a compiled mode and ``tp > 1`` to do anything."""

    mode: str = "eager"  # "eager" | "graph" (run the transformed FX graph) | "inductor" (codegen)
    partition: str = "full"  # "full" (one graph) | "piecewise" (split at attention)
    sp: bool = False
    sp_min_tokens: int = 0  # SP applies to steps of at least this many (padded) tokens

    def __post_init__(self) -> None:
        if self.mode not in COMPILE_MODES:
            raise ValueError(f"compile mode {self.mode!r}: choose from {COMPILE_MODES}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"partition {self.partition!r}: choose from {PARTITIONS}")
        if self.sp and self.mode == "eager":
            raise ValueError("sequence parallelism is a compile pass: it needs compile 'graph' or 'inductor'")
        if self.mode == "eager" and self.partition != "full":
            raise ValueError("partition applies to compiled setups only")
        if self.sp_min_tokens < 0:
            raise ValueError(f"sp_min_tokens={self.sp_min_tokens} must be >= 0")


def sp_active(num_tokens: int, tp: int, cfg: CompileConfig) -> bool:
    """Does the compiled graph of a ``num_tokens``-token step run sequence-parallel?"""
    return cfg.sp and tp > 1 and num_tokens >= cfg.sp_min_tokens


def token_buckets(tp: int, max_tokens: int) -> list[int]:
    """Padded step sizes: the base sizes rounded up to a multiple of ``tp``, up to ``max_tokens``."""
    top = -(-max_tokens // tp) * tp
    sizes = {-(-b // tp) * tp for b in BASE_BUCKETS if b < top} | {top}
    return sorted(sizes)


def pad_to_bucket(num_tokens: int, buckets: list[int]) -> int:
    for size in buckets:
        if size >= num_tokens:
            return size
    raise ValueError(f"a step of {num_tokens} tokens exceeds the largest bucket {buckets[-1]}")
