"""Runs passes in order, logging what each changed."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from torch import fx

log = logging.getLogger("parity.compile")


class GraphPass(Protocol):
    """A pass rewrites ``gm`` in place and returns how many rewrites it made."""

    name: str

    def __call__(self, gm: fx.GraphModule) -> int: ...


def op_counts(gm: fx.GraphModule) -> Counter[str]:
    """``call_function`` targets by name, e.g. ``_c10d_functional.all_reduce.default``."""
    counts: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function":
            counts[_op_name(node.target)] += 1
    return counts


def _op_name(target: object) -> str:
    name = getattr(target, "__name__", str(target))
    namespace = getattr(getattr(target, "_schema", None), "name", "")
    if "::" in namespace:
        overload = name.rsplit(".", 1)[-1] if "." in name else "default"
        return f"{namespace.replace('::', '.')}.{overload}"
    return name


@dataclass
class PassRecord:
    """What the passes did to one compiled graph (one step size, input kind and piece)."""

    graph: str
    num_tokens: int
    changes: dict[str, int] = field(default_factory=dict)
    nodes_before: int = 0
    nodes_after: int = 0
    ops_after: dict[str, int] = field(default_factory=dict)
    # Row count of the residual entering each parity::residual_rows (SP's Middle/Final): the
    # full step size where the residual arrives unsharded (embedding outside, pipeline input).
    residual_rows_inputs: list[int] = field(default_factory=list)


@dataclass
class PassManager:
    passes: list[GraphPass]

    def run(self, gm: fx.GraphModule, record: PassRecord) -> PassRecord:
        record.nodes_before = len(gm.graph.nodes)
        for p in self.passes:
            count = p(gm)
            record.changes[p.name] = record.changes.get(p.name, 0) + count
            for detail, n in getattr(p, "last_counts", {}).items():
                record.changes[f"{p.name}.{detail}"] = n
            log.info("%s [%s]: %s changed %d", record.graph, record.num_tokens, p.name, count)
        gm.graph.lint()
        gm.recompile()
        record.nodes_after = len(gm.graph.nodes)
        record.ops_after = dict(op_counts(gm))
        record.residual_rows_inputs = [
            int(n.args[0].meta["val"].shape[0]) for n in gm.graph.nodes
            if n.op == "call_function" and _op_name(n.target) == "parity.residual_rows.default"
        ]
        return record
