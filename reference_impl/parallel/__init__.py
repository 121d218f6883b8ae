"""Tensor and pipeline parallelism as transformations of a plain single-device model."""

from reference_impl.parallel.groups import ParallelState, current_state, init_parallel
from reference_impl.parallel.pp import split_stages, stage_layers
from reference_impl.parallel.tp import apply_tp
from reference_impl.parallel.validate import validate_parallel

__all__ = [
    "ParallelState", "apply_tp", "current_state", "init_parallel", "split_stages", "stage_layers",
    "validate_parallel",
]
