"""The torch.compile backend.

Dynamo hands over a torch-level graph for one static step size. ``full`` compiles it as one
piece; ``piecewise`` splits it at every ``parity::attention`` node (attention runs eagerly
between pieces) and compiles each other piece on its first call, with the tensors it actually
receives, so a piece downstream of an SP rewrite sees the sharded shapes it will get. Each
piece goes through AOT autograd to a functional aten graph, then the pass manager, then is run
as the transformed FX graph (``graph``) or through inductor's code generation (``inductor``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch._functorch._aot_autograd.utils import make_boxed_func
from torch._functorch.aot_autograd import aot_module_simplified
from torch.fx.passes.split_module import split_module

from reference_impl.compile.config import CompileConfig
from reference_impl.compile.passes import PassManager, PassRecord

log = logging.getLogger("parity.compile")
ATTENTION_OP = torch.ops.parity.attention.default


def is_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (ATTENTION_OP, torch.ops.parity.attention)


def split_at_attention(gm: fx.GraphModule) -> fx.GraphModule:
    """Submodules ``submod_{2i}`` (compiled) around ``submod_{2i+1}`` (one attention call each)."""
    piece = [0]

    def which(node: fx.Node) -> int:
        if is_attention(node):
            piece[0] += 1
            index = piece[0]
            piece[0] += 1
            return index
        return piece[0]

    return split_module(gm, gm, which, keep_original_order=True)


@dataclass
class GraphCompiler:
    """Compiles pieces; ``records`` holds what the passes did to every compiled piece."""

    config: CompileConfig
    make_passes: Callable[[int], PassManager]  # num_tokens -> the passes for that step size
    records: list[PassRecord] = field(default_factory=list)
    label: str = ""  # the input kind of the graph being compiled ("ids", "embeds", "intermediate")

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        num_tokens = _num_tokens(example_inputs)
        if self.config.partition == "full":
            return self.compile_piece(gm, example_inputs, "full", num_tokens)
        split = split_at_attention(gm)
        for name, sub in list(split.named_children()):
            assert isinstance(sub, fx.GraphModule)
            if not any(is_attention(n) for n in sub.graph.nodes):
                setattr(split, name, LazyPiece(self, sub, name, num_tokens))
        return split

    def compile_piece(self, gm: fx.GraphModule, example_inputs: Sequence[Any], name: str,
                      num_tokens: int) -> Callable[..., Any]:
        from torch._inductor.decomposition import select_decomp_table

        record = PassRecord(graph=f"{self.label}/{name}", num_tokens=num_tokens)

        def fw_compiler(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor | int | torch.SymInt | None]
                        ) -> Any:
            self.make_passes(num_tokens).run(gm, record)
            self.records.append(record)
            _dump(gm, record)
            if self.config.mode == "inductor":
                from torch._inductor.compile_fx import compile_fx_inner

                return compile_fx_inner(gm, list(example_inputs))
            return make_boxed_func(gm.forward)

        single = _tuple_output(gm)
        compiled = aot_module_simplified(gm, list(example_inputs), fw_compiler=fw_compiler,
                                         decompositions=select_decomp_table())
        if single:
            return lambda *args: compiled(*args)[0]
        return compiled


class LazyPiece(torch.nn.Module):
    """A piece compiled on its first call, from the inputs it really receives."""

    def __init__(self, compiler: GraphCompiler, gm: fx.GraphModule, name: str, num_tokens: int) -> None:
        super().__init__()
        self.compiler, self.gm, self.name, self.num_tokens = compiler, gm, name, num_tokens
        self.compiled: Callable[..., Any] | None = None

    def forward(self, *args: Any) -> Any:
        if self.compiled is None:
            self.compiled = self.compiler.compile_piece(self.gm, args, self.name, self.num_tokens)
        return self.compiled(*args)


def _tuple_output(gm: fx.GraphModule) -> bool:
    """AOT needs a tuple output: wrap a single output in one. True if it was wrapped."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    if isinstance(output.args[0], (tuple, list)):
        return False
    output.args = ((output.args[0],),)
    gm.recompile()
    return True


def _num_tokens(example_inputs: Sequence[Any]) -> int:
    """The step's token count: the length of the 1-D positions input (the only int64 vector)."""
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.dim() == 1 and x.dtype == torch.int64:
            return int(x.shape[0])
    raise RuntimeError("compiled graph has no positions input")


def _dump(gm: fx.GraphModule, record: PassRecord) -> None:
    """With ``PARITY_DUMP_GRAPHS=DIR``, write each transformed graph's code there."""
    import os

    folder = os.environ.get("PARITY_DUMP_GRAPHS")
    if not folder:
        return
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"rank{rank}-{record.graph}-{record.num_tokens}-{len(os.listdir(folder))}.py")
    with open(path, "w") as f:
        f.write(gm.code)
