"""Kernels of the reference engine: RMSNorm and fused add + RMSNorm.

Importing this package registers the `parity::rms_norm` and
`parity::fused_add_rms_norm` custom ops. It works without Triton installed;
the Triton path then raises a RuntimeError when requested.
"""

from reference_impl.kernels.fused_add_rms_norm import (
    fused_add_rms_norm_ref,
    fused_add_rms_norm_triton,
)
from reference_impl.kernels.ops import fused_add_rms_norm, rms_norm
from reference_impl.kernels.rms_norm import HAS_TRITON, rms_norm_ref, rms_norm_triton

__all__ = [
    "HAS_TRITON",
    "fused_add_rms_norm",
    "fused_add_rms_norm_ref",
    "fused_add_rms_norm_triton",
    "rms_norm",
    "rms_norm_ref",
    "rms_norm_triton",
]
