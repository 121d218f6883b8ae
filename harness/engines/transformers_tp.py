"""Hugging Face transformers' own tensor parallelism as an engine under test: what the planner
needs (the spec, the setups it cannot express, its identity), without importing transformers.
The rank-side engine is ``harness.engines.transformers_engine``.

Each rank loads the checkpoint with ``from_pretrained(..., distributed_config=
DistributedConfig(tp_plan="auto", tp_size=tp))`` (what ``tp_plan="auto"`` becomes in
transformers 5: the legacy argument is translated to exactly this) into the process group the
worker has joined (gloo on CPU, NCCL on CUDA); at tp=1 it loads the same model on one device
without a plan. Generation is transformers' own forward passes, one request at a time (batch
size 1, no padding), with its KV cache (the ``cache`` a forward returns, a ``DynamicCache``;
called ``past_key_values`` before 5.x): one prefill forward of the whole prompt, then one forward
per generated token; greedy, with logprobs from its logits (gathered over TP by its LM head).
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from reference_impl.engine import check_dtype_and_device

if TYPE_CHECKING:
    from harness.setup import ParallelSetup
    from reference_impl.runner import EngineConfig

NAME = "transformers"
# Its code in a rank's traceback: the library, and this adapter (a bug in the adapter is the
# engine under test's too, and the frame named in the reason says whose it is).
CODE_PATHS = ("transformers/", "harness/engines/transformers_engine.py", "harness/engines/greedy.py")


@dataclass(frozen=True)
class TransformersSpec:
    """One transformers TP engine: the checkpoint, the TP degree (= the world size), dtype, device."""

    checkpoint: str
    tp: int = 1
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tp={self.tp} must be >= 1")
        check_dtype_and_device(self.dtype, self.device)

    @property
    def world_size(self) -> int:
        return self.tp

    def validate(self, num_devices: int | None = None) -> None:
        """The checkpoint must be a directory with a config; on GPUs one device per rank. Head
        counts are not checked: what transformers does with them is what is under test."""
        if not (Path(self.checkpoint) / "config.json").is_file():
            raise ValueError(f"{self.checkpoint} holds no config.json")
        if num_devices is not None and self.tp > num_devices:
            raise ValueError(f"tp={self.tp} needs {self.tp} {self.device} devices; {num_devices} available")


def unsupported(setup: ParallelSetup) -> str | None:
    """Why transformers' TP cannot express ``setup`` (a skip reason), or None."""
    if setup.pp > 1:
        return (f"the transformers engine cannot express pp={setup.pp}: tp_plan='auto' shards layers "
                "over the TP mesh only; inference pipeline stages are not part of it")
    if setup.sp:
        return ("the transformers engine cannot express SP: parity's sequence-parallel compile pass belongs "
                "to the reference engine, and tp_plan='auto' has no sequence-parallel inference mode")
    if setup.compile != "eager":
        return (f"the transformers engine runs eager only: compile mode {setup.compile!r} is the reference "
                "engine's torch.compile backend")
    return None


def spec_for(setup: ParallelSetup, checkpoint: str, limits: EngineConfig | None = None) -> TransformersSpec:
    """The engine of ``setup``; the reference engine's batching limits do not apply (requests run
    one at a time, each prompt in one prefill)."""
    return TransformersSpec(checkpoint, setup.tp, setup.dtype, setup.device)


@cache
def identity() -> str:
    """transformers' and torch's versions and a hash of this adapter's source: a baseline of this
    engine is reused only while all three are the same."""
    import torch
    import transformers

    from harness.engines import greedy, transformers_engine

    h = hashlib.sha256()
    for module in (greedy, transformers_engine):
        h.update(inspect.getsource(module).encode())
    h.update(inspect.getsource(spec_for).encode())
    return f"{NAME}/transformers={transformers.__version__}/torch={torch.__version__}/{h.hexdigest()[:16]}"
