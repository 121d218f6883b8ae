"""torch.library custom ops `parity::rms_norm` and `parity::fused_add_rms_norm`.

Each op returns NEW tensors and mutates nothing, so functionalization / AOT
autograd insert no `copy_` and a compiled graph holds exactly one node per call.
The real implementation runs the Triton kernel for CUDA tensors (or anywhere
when PARITY_FORCE_TRITON=1, for interpreter tests) and the torch reference
otherwise. Outputs are contiguous and have x's dtype and shape.
"""

from __future__ import annotations

import os

import torch

from reference_impl.kernels.fused_add_rms_norm import (
    fused_add_rms_norm_ref,
    fused_add_rms_norm_triton,
)
from reference_impl.kernels.rms_norm import rms_norm_ref, rms_norm_triton

NAMESPACE = "parity"
FORCE_TRITON_ENV = "PARITY_FORCE_TRITON"


def use_triton(x: torch.Tensor) -> bool:
    """Triton for CUDA tensors, or for any tensor when PARITY_FORCE_TRITON=1."""
    return x.is_cuda or os.environ.get(FORCE_TRITON_ENV) == "1"


def _rms_norm_impl(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x):
        return rms_norm_triton(x, weight, eps)  # reads strided rows; its output is contiguous
    x = x.contiguous()  # (..., H): outputs are contiguous on both paths
    # `.to` is a no-op unless weight's dtype differs from x's.
    return rms_norm_ref(x, weight, eps).to(x.dtype)


def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fused_add_rms_norm_impl(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return fused_add_rms_norm_triton(x, residual, weight, eps)  # contiguous outputs
    x, residual = x.contiguous(), residual.contiguous()  # (..., H) each
    out, new_residual = fused_add_rms_norm_ref(x, residual, weight, eps)
    # `.to` is a no-op unless weight's dtype differs. Neither output can alias
    # an input: the reference builds both from fresh arithmetic.
    return out.to(x.dtype), new_residual


def _fused_add_rms_norm_fake(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    new_residual = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out, new_residual


def _is_registered(name: str) -> bool:
    """True when `parity::<name>` already exists (re-import, module reload)."""
    return torch._C._dispatch_has_kernel(f"{NAMESPACE}::{name}")


def register() -> None:
    """Define both ops and their fake kernels once; later calls do nothing."""
    if not _is_registered("rms_norm"):
        op = torch.library.custom_op(f"{NAMESPACE}::rms_norm", mutates_args=())(_rms_norm_impl)
        op.register_fake(_rms_norm_fake)
    if not _is_registered("fused_add_rms_norm"):
        fused = torch.library.custom_op(f"{NAMESPACE}::fused_add_rms_norm", mutates_args=())(
            _fused_add_rms_norm_impl
        )
        fused.register_fake(_fused_add_rms_norm_fake)


register()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x (..., H) with weight (H,), HF LlamaRMSNorm casting."""
    out: torch.Tensor = torch.ops.parity.rms_norm(x, weight, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) of x, residual (..., H); never mutates."""
    out, new_residual = torch.ops.parity.fused_add_rms_norm(x, residual, weight, eps)
    return out, new_residual
