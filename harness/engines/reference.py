"""The reference engine (``reference_impl``) behind the ``Engine`` interface: a ``Runner`` built by
``reference_impl.engine.build_runner`` from an ``EngineSpec``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from harness.engines.base import weight_bytes
from reference_impl.engine import EngineSpec, build_runner
from reference_impl.requests import Request, RequestOutput
from reference_impl.runner import Runner

if TYPE_CHECKING:
    from harness.setup import ParallelSetup

NAME = "reference"
# Its code in a rank's traceback; the catalogued mutations patch it from harness/mutations.
CODE_PATHS = ("reference_impl/", "harness/mutations/")


class ReferenceEngine:
    """One rank's runner (possibly sharded, staged and compiled)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    @classmethod
    def build(cls, spec: EngineSpec, device: torch.device) -> ReferenceEngine:
        return cls(build_runner(spec, device))

    def generate(self, requests: Sequence[Request]) -> list[RequestOutput]:
        from reference_impl.compile.compiled_model import reset_steps

        reset_steps(self.runner.model_fn)
        return self.runner.generate(requests)

    def capture_prefill(self, requests: Sequence[Request]) -> dict[str, torch.Tensor]:
        return self.runner.capture_prefill(requests)

    def compiled_steps(self) -> list[dict[str, Any]]:
        from reference_impl.compile.compiled_model import steps_report

        return list(steps_report(self.runner.model_fn))

    def compile_records(self) -> list[dict[str, object]]:
        from reference_impl.compile.compiled_model import compile_records

        return compile_records(self.runner.model_fn)

    def weight_bytes(self) -> int:
        return weight_bytes(self.runner.model)


def unsupported(setup: ParallelSetup) -> str | None:
    """The reference engine expresses every setup (its layout limits are checked by the plan)."""
    return None


def identity() -> str:
    """Nothing to add: its source is hashed into every baseline key already
    (``harness.baseline.engine_code_hash``), with torch's version."""
    return ""
