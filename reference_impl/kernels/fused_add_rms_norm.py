"""Fused residual add + RMSNorm: Triton kernel, its launcher, and the torch reference.

`new_residual = x + residual` (exact sum rounded once to x's dtype) is the
residual stream after the add; `out = rms_norm(new_residual)` with Hugging Face
`LlamaRMSNorm` casting. In fp32 this equals HF's `residual + hidden_states`
then norm; in bf16 it equals HF's bf16 add (torch rounds the exact sum once).
"""

from __future__ import annotations

import torch

from reference_impl.kernels.rms_norm import (
    HAS_TRITON,
    check_weight,
    launch_config,
    require_triton,
    rms_norm_ref,
)

if HAS_TRITON:
    import triton  # type: ignore[import-untyped, unused-ignore]
    import triton.language as tl  # type: ignore[import-untyped, unused-ignore]

    from reference_impl.kernels.rms_norm import cast_rtne

    @triton.jit  # type: ignore[untyped-decorator]
    def _fused_add_rms_norm_kernel(  # type: ignore[no-untyped-def]
        x_ptr,  # (rows, H), contiguous
        res_ptr,  # (rows, H), contiguous
        w_ptr,  # (H,)
        out_ptr,  # (rows, H), contiguous, x's dtype
        new_res_ptr,  # (rows, H), contiguous, x's dtype
        row_stride,
        H,
        eps,
        BLOCK_SIZE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # int64: rows * H may exceed 2**31
        cols = tl.arange(0, BLOCK_SIZE)  # (BLOCK_SIZE,)
        mask = cols < H
        offs = row * row_stride + cols
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        res = tl.load(res_ptr + offs, mask=mask, other=0.0)
        # The add's result, rounded once to x's dtype, IS the new residual.
        s = cast_rtne(x.to(tl.float32) + res.to(tl.float32), x.dtype)
        tl.store(new_res_ptr + offs, s, mask=mask)
        sf = s.to(tl.float32)  # normalize what was stored, as the reference does
        variance = tl.sum(sf * sf, axis=0) / H  # masked lanes are 0
        y = cast_rtne(sf * tl.rsqrt(variance + eps), x.dtype)  # HF: .to(input_dtype)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        out = y.to(tl.float32) * w.to(tl.float32)  # exact product, rounded once below
        tl.store(out_ptr + offs, cast_rtne(out, out_ptr.dtype.element_ty), mask=mask)


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton fused add + RMSNorm over (..., H); returns (out, new_residual), both new."""
    require_triton()
    check_weight(x, weight)
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    hidden = x.shape[-1]
    x2d = x.contiguous().view(-1, hidden)  # (rows, H)
    res2d = residual.contiguous().view(-1, hidden)  # (rows, H)
    w = weight.contiguous()  # (H,)
    out = torch.empty_like(x2d)  # (rows, H)
    new_res = torch.empty_like(x2d)  # (rows, H)
    rows = x2d.shape[0]
    if rows > 0:
        block_size, num_warps = launch_config(hidden, x2d.element_size())
        _fused_add_rms_norm_kernel[(rows,)](
            x2d, res2d, w, out, new_res, x2d.stride(0), hidden, eps,
            BLOCK_SIZE=block_size, num_warps=num_warps,
        )
    return out.view(x.shape), new_res.view(x.shape)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: (rms_norm_ref(x + residual), x + residual), sum in x's dtype."""
    new_residual = (x.float() + residual.float()).to(x.dtype)  # (..., H)
    return rms_norm_ref(new_residual, weight, eps), new_residual
