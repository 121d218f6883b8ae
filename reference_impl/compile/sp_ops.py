"""``parity::residual_rows``: this rank's rows of a residual that may or may not be sharded yet.

The Middle SP pattern needs the residual token-sharded. Whether the residual reaching a match
is already sharded depends on what is upstream: an earlier match in the same graph (sharded),
the embedding outside the graph (prompt-embeds, multimodal), a previous pipeline stage or a
previous piecewise piece (full length). Deciding at run time, from the tensor's row count, makes
the replacement independent of the matcher's order and of graph boundaries.
"""

from __future__ import annotations

import torch


def local_rows(rank: int, local_len: int) -> slice:
    """The rows of a full-length ``(tp * local_len, H)`` tensor that belong to ``rank``."""
    return slice(rank * local_len, (rank + 1) * local_len)


@torch.library.custom_op("parity::residual_rows", mutates_args=())
def residual_rows(residual: torch.Tensor, num_tokens: int, tp: int, rank: int) -> torch.Tensor:
    """residual: (num_tokens, H) or already (num_tokens / tp, H) -> (num_tokens / tp, H)."""
    local_len = num_tokens // tp
    rows = residual.shape[0]
    if rows == local_len:
        return residual.clone()
    if rows == num_tokens:
        return residual[local_rows(rank, local_len)].clone()
    raise RuntimeError(
        f"residual has {rows} rows; expected {num_tokens} (full) or {local_len} (sharded over tp={tp})"
    )


@residual_rows.register_fake
def _residual_rows_fake(residual: torch.Tensor, num_tokens: int, tp: int, rank: int) -> torch.Tensor:
    return residual.new_empty((num_tokens // tp, *residual.shape[1:]))
