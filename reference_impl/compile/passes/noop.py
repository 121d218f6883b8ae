"""Remove slices and reshapes whose output has the input's shape."""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten
_NOOP_CANDIDATES = {
    aten.slice.Tensor, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
    aten.expand.default,
}


def _shape(node: object) -> tuple[int, ...] | None:
    val = getattr(node, "meta", {}).get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


class NoOpEliminationPass:
    """A slice or view that keeps the shape is the identity: its users read the input directly.

    (A slice with step 1 over the full extent is the only shape-keeping slice; a view keeping
    the shape keeps the layout for contiguous inputs, which is all a functional graph has.)
    """

    name = "noop_elimination"

    def __call__(self, gm: fx.GraphModule) -> int:
        removed = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _NOOP_CANDIDATES:
                continue
            src = node.args[0]
            if not isinstance(src, fx.Node):
                continue
            if node.target is aten.slice.Tensor and len(node.args) > 4 and node.args[4] != 1:
                continue
            out, inp = _shape(node), _shape(src)
            if out is None or out != inp:
                continue
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            removed += 1
        return removed
