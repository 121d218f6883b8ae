"""Graph passes over functional aten graphs. Each is ``(gm) -> int`` (how many changes)."""

from reference_impl.compile.passes.manager import GraphPass, PassManager, PassRecord
from reference_impl.compile.passes.noop import NoOpEliminationPass
from reference_impl.compile.passes.sequence_parallel import SequenceParallelismPass

__all__ = ["GraphPass", "NoOpEliminationPass", "PassManager", "PassRecord", "SequenceParallelismPass"]
