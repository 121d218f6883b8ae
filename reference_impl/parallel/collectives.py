"""Collectives as functional ops (``_c10d_functional``) so they trace into FX graphs.

In an AOT graph each appears as the collective followed by ``wait_tensor``, which is what the
sequence-parallelism patterns match.
"""

from __future__ import annotations

import torch

_c10d = torch.ops._c10d_functional


def all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    """Sum over the group. x: any shape."""
    return _c10d.wait_tensor(_c10d.all_reduce(x, "sum", group))


def all_gather(x: torch.Tensor, world: int, group: str, dim: int = 0) -> torch.Tensor:
    """Concatenate the ranks' ``x`` along ``dim`` in rank order. (n, ...) -> (world * n, ...)."""
    if dim != 0:
        x = x.movedim(dim, 0)
    out = _c10d.wait_tensor(_c10d.all_gather_into_tensor(x.contiguous(), world, group))
    return out.movedim(0, dim) if dim != 0 else out


def reduce_scatter(x: torch.Tensor, world: int, group: str) -> torch.Tensor:
    """Sum over the group, keep this rank's rows. (world * n, ...) -> (n, ...)."""
    return _c10d.wait_tensor(_c10d.reduce_scatter_tensor(x.contiguous(), "sum", world, group))
