"""Sequence parallelism: all-reduce + RMSNorm => reduce-scatter + RMSNorm on a token shard + all-gather.

Between a row-parallel matmul and the next norm, every TP rank holds the same full ``(T, H)``
tensor after the all-reduce, and normalises all ``T`` rows. SP instead reduce-scatters (each rank
keeps ``T / tp`` summed rows), normalises only those, and all-gathers the normed rows for the
next column-parallel matmul. The residual stream stays token-sharded between norms.

Patterns (over the functional aten graph; any epsilon, matched as a wildcard):
- **First**  ``all_reduce -> rms_norm``: the first norm of the model when the embedding (itself
  ending in an all-reduce) is inside the graph. Its all-reduced input is the residual, which
  becomes the rank's token shard.
- **Middle** ``all_reduce -> fused_add_rms_norm(x, residual)``, both outputs used: the residual
  is taken to this rank's rows by ``parity::residual_rows`` (a no-op copy when already sharded).
- **Final**  the same with only the normed output used (the model's last norm).

Middle and Final also come in a variant with a row-parallel bias between the all-reduce and the
norm (``all_reduce(x) + b``, e.g. Llama's ``attention_bias`` on o_proj): the bias is then added
to the reduce-scattered rows, still once per row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch._inductor.pattern_matcher import Match, PatternMatcherPass, register_replacement

from reference_impl.compile.config import SP_PATTERNS
from reference_impl.compile.sp_ops import residual_rows
from reference_impl.kernels import ops as kernel_ops
from reference_impl.parallel import collectives

_EXAMPLE_TOKENS, _EXAMPLE_HIDDEN = 8, 16


def trace_fake(fn: Callable[..., Any], args: Any, get_decomp_fn: Callable[..., Any] | None = None,
               **_: Any) -> fx.GraphModule:
    """Like the pattern matcher's ``fwd_only`` but with fake tensors, so that tracing a pattern
    never runs a real collective."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    decomp = (get_decomp_fn or select_decomp_table)()
    gm = make_fx(fn, decomp, tracing_mode="fake")(*args)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


class SequenceParallelismPass:
    """Registers the three patterns for one TP group; ``counts`` has matches per pattern."""

    name = "sequence_parallelism"

    def __init__(self, tp: int, rank: int, group: str, dtype: torch.dtype, device: torch.device) -> None:
        self.tp, self.rank, self.group = tp, rank, group
        self.counts = dict.fromkeys(SP_PATTERNS, 0)  # over every graph
        self.last_counts = dict(self.counts)  # of the last graph
        self._passes = {name: PatternMatcherPass(pass_name=f"sp_{name}") for name in self.counts}
        self._register(dtype, device)

    # -- patterns ------------------------------------------------------------------------------

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return collectives.all_reduce(x, self.group)

    def _scatter(self, x: torch.Tensor) -> torch.Tensor:
        return collectives.reduce_scatter(x, self.tp, self.group)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return collectives.all_gather(x, self.tp, self.group)

    def _rows(self, residual: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
        return residual_rows(residual, partial.shape[0], self.tp, self.rank)

    def first_pattern(self, partial: torch.Tensor, weight: torch.Tensor, eps: float) -> Any:
        full = self._all_reduce(partial)
        return kernel_ops.rms_norm(full, weight, eps), full

    def first_replacement(self, partial: torch.Tensor, weight: torch.Tensor, eps: float) -> Any:
        shard = self._scatter(partial)  # (T / tp, H): becomes the residual
        return self._gather(kernel_ops.rms_norm(shard, weight, eps)), shard

    def middle_pattern(self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> Any:
        return kernel_ops.fused_add_rms_norm(self._all_reduce(partial), residual, weight, eps)

    def middle_replacement(self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> Any:
        shard = self._scatter(partial)
        out, new_residual = kernel_ops.fused_add_rms_norm(shard, self._rows(residual, partial), weight, eps)
        return self._gather(out), new_residual

    def final_pattern(self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> Any:
        return self.middle_pattern(partial, residual, weight, eps)[0]

    def final_replacement(self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> Any:
        shard = self._scatter(partial)
        out, _ = kernel_ops.fused_add_rms_norm(shard, self._rows(residual, partial), weight, eps)
        return self._gather(out)

    def middle_bias_pattern(self, partial: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor,
                            weight: torch.Tensor, eps: float) -> Any:
        return kernel_ops.fused_add_rms_norm(self._all_reduce(partial) + bias, residual, weight, eps)

    def middle_bias_replacement(self, partial: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor,
                                weight: torch.Tensor, eps: float) -> Any:
        shard = self._scatter(partial) + bias
        out, new_residual = kernel_ops.fused_add_rms_norm(shard, self._rows(residual, partial), weight, eps)
        return self._gather(out), new_residual

    def final_bias_pattern(self, partial: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor,
                           weight: torch.Tensor, eps: float) -> Any:
        return self.middle_bias_pattern(partial, bias, residual, weight, eps)[0]

    def final_bias_replacement(self, partial: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor,
                               weight: torch.Tensor, eps: float) -> Any:
        shard = self._scatter(partial) + bias
        out, _ = kernel_ops.fused_add_rms_norm(shard, self._rows(residual, partial), weight, eps)
        return self._gather(out)

    def _register(self, dtype: torch.dtype, device: torch.device) -> None:
        # Distinct tensors: the tracer identifies an input passed twice as one pattern argument.
        x, r = (torch.empty(_EXAMPLE_TOKENS, _EXAMPLE_HIDDEN, dtype=dtype, device=device) for _ in range(2))
        w, b = (torch.empty(_EXAMPLE_HIDDEN, dtype=dtype, device=device) for _ in range(2))
        eps = {"eps": 1e-5}  # a wildcard: any epsilon in the graph matches
        specs: list[tuple[str, Callable[..., Any], Callable[..., Any], list[Any]]] = [
            ("first", self.first_pattern, self.first_replacement, [x, w]),
            ("middle", self.middle_pattern, self.middle_replacement, [x, r, w]),
            ("middle", self.middle_bias_pattern, self.middle_bias_replacement, [x, b, r, w]),
            ("final", self.final_pattern, self.final_replacement, [x, r, w]),
            ("final", self.final_bias_pattern, self.final_bias_replacement, [x, b, r, w]),
        ]
        for name, pattern, replacement, example in specs:
            register_replacement(
                pattern, replacement, example, trace_fake, self._passes[name],
                extra_check=self._divisible, scalar_workaround=eps,
            )

    def _divisible(self, match: Match) -> bool:
        """Only steps whose token count splits evenly over the TP ranks."""
        partial = match.kwargs["partial"]
        val = partial.meta.get("val") if isinstance(partial, fx.Node) else None
        return isinstance(val, torch.Tensor) and int(val.shape[0]) % self.tp == 0

    # -- run -------------------------------------------------------------------------------------

    def __call__(self, gm: fx.GraphModule) -> int:
        """Middle before Final (Final's pattern is a sub-pattern of Middle's), First any time."""
        total = 0
        for name in ("middle", "final", "first"):
            n = int(self._passes[name].apply(gm.graph))
            self.counts[name] += n
            self.last_counts[name] = n
            total += n
        return total
