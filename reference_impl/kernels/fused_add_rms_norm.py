"""Fused residual add + RMSNorm: Triton kernel, its launcher, and the torch reference.

`new_residual = x + residual` (exact sum rounded once to x's dtype) is the
residual stream after the add; `out = rms_norm(new_residual)` with Hugging Face
`LlamaRMSNorm` casting. In fp32 this equals HF's `residual + hidden_states`
then norm; in bf16 it equals HF's bf16 add (torch rounds the exact sum once).
"""

from __future__ import annotations

import torch

from reference_impl.kernels.launch import LaunchConfig, block_size, launch_config, num_sms
from reference_impl.kernels.rms_norm import (
    HAS_TRITON,
    check_weight,
    kernel_flags,
    require_triton,
    rms_norm_ref,
    rows_view,
    unit_stride,
)

if HAS_TRITON:
    import triton  # type: ignore[import-untyped, unused-ignore]
    import triton.language as tl  # type: ignore[import-untyped, unused-ignore]

    from reference_impl.kernels.rms_norm import (
        cast_rtne,
        inv_rms,
        load,
        normalize,
        row_block,
        row_chunks,
        scale,
        store,
    )

    @triton.jit  # type: ignore[untyped-decorator]
    def _fused_rows(  # type: ignore[no-untyped-def]
        block, x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, rows, x_row_stride, res_row_stride, H, eps,
        BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr, MASKED: tl.constexpr, WIDE: tl.constexpr,
        BY_HAND: tl.constexpr, STREAM: tl.constexpr,
    ):
        """One pass: each row of the block whole in registers."""
        r, cols, mask = row_block(block, rows, H, BLOCK_ROWS, BLOCK_H, WIDE)
        # Inputs stream through once (STREAM); the weight is read by every block (see rms_norm).
        x = load(x_ptr + r * x_row_stride + cols, mask, MASKED, STREAM)  # (BLOCK_ROWS, BLOCK_H)
        res = load(res_ptr + r * res_row_stride + cols, mask, MASKED, STREAM)  # (BLOCK_ROWS, BLOCK_H)
        w = load(w_ptr + cols, cols < H, MASKED, "evict_last")  # (1, BLOCK_H)
        # The add's result, rounded once to x's dtype, IS the new residual.
        s = cast_rtne(x.to(tl.float32) + res.to(tl.float32), x.dtype, BY_HAND)
        store(new_res_ptr + r * H + cols, s, mask, MASKED)
        # Normalize what was stored, as the reference does.
        out = normalize(s.to(tl.float32), w.to(tl.float32), H, eps, x.dtype, out_ptr.dtype.element_ty, BY_HAND)
        store(out_ptr + r * H + cols, out, mask, MASKED)

    @triton.jit  # type: ignore[untyped-decorator]
    def _fused_rows_chunked(  # type: ignore[no-untyped-def]
        block, x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, rows, x_row_stride, res_row_stride, H, eps,
        BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr, CHUNK: tl.constexpr, MASKED: tl.constexpr,
        WIDE: tl.constexpr, BY_HAND: tl.constexpr, STREAM: tl.constexpr,
    ):
        """Two passes over chunks of CHUNK columns (see rms_norm's chunked kernel).

        The first adds, stores the new residual and sums its squares; the second re-reads the
        new residual just stored (from L2: one tensor, not x and the residual again), normalizes
        and stores the output.
        """
        r, cols = row_chunks(block, rows, BLOCK_ROWS, CHUNK, WIDE)
        acc = tl.zeros((BLOCK_ROWS, CHUNK), dtype=tl.float32)
        for c in range(0, BLOCK_H, CHUNK):
            mask = (r < rows) & (c + cols < H)
            x = load(x_ptr + r * x_row_stride + c + cols, mask, MASKED, STREAM)  # (BLOCK_ROWS, CHUNK)
            res = load(res_ptr + r * res_row_stride + c + cols, mask, MASKED, STREAM)
            s = cast_rtne(x.to(tl.float32) + res.to(tl.float32), x.dtype, BY_HAND)
            store(new_res_ptr + r * H + c + cols, s, mask, MASKED)
            sf = s.to(tl.float32)
            acc += sf * sf
        rstd = inv_rms(tl.sum(acc, axis=1, keep_dims=True), H, eps)  # (BLOCK_ROWS, 1)
        # The second pass reads what this program's threads stored: order those stores first.
        tl.debug_barrier()
        for c in range(0, BLOCK_H, CHUNK):
            mask = (r < rows) & (c + cols < H)
            s = load(new_res_ptr + r * H + c + cols, mask, MASKED, "evict_first")  # (BLOCK_ROWS, CHUNK)
            w = load(w_ptr + c + cols, c + cols < H, MASKED, "evict_last")  # (1, CHUNK)
            out = scale(s.to(tl.float32), rstd, w.to(tl.float32), s.dtype, out_ptr.dtype.element_ty, BY_HAND)
            store(out_ptr + r * H + c + cols, out, mask, MASKED)

    @triton.jit(do_not_specialize=["rows"])  # type: ignore[untyped-decorator]
    def _fused_add_rms_norm_kernel(  # type: ignore[no-untyped-def]
        x_ptr,  # (rows, H), unit column stride
        res_ptr,  # (rows, H), unit column stride
        w_ptr,  # (H,), contiguous
        out_ptr,  # (rows, H), contiguous, x's dtype
        new_res_ptr,  # (rows, H), contiguous, x's dtype
        rows,
        x_row_stride,
        res_row_stride,
        H,
        eps,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_H: tl.constexpr,
        CHUNK: tl.constexpr,  # the flags: see rms_norm.kernel_flags
        LOOP: tl.constexpr,
        MASKED: tl.constexpr,
        WIDE: tl.constexpr,
        BY_HAND: tl.constexpr,
        STREAM: tl.constexpr,
    ):
        if LOOP:
            for block in tl.range(tl.program_id(0), tl.cdiv(rows, BLOCK_ROWS), tl.num_programs(0)):
                if CHUNK < BLOCK_H:
                    _fused_rows_chunked(block, x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, rows, x_row_stride,
                                        res_row_stride, H, eps, BLOCK_ROWS, BLOCK_H, CHUNK, MASKED, WIDE,
                                        BY_HAND, STREAM)
                else:
                    _fused_rows(block, x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, rows, x_row_stride,
                                res_row_stride, H, eps, BLOCK_ROWS, BLOCK_H, MASKED, WIDE, BY_HAND, STREAM)
        elif CHUNK < BLOCK_H:
            _fused_rows_chunked(tl.program_id(0), x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, rows,
                                x_row_stride, res_row_stride, H, eps, BLOCK_ROWS, BLOCK_H, CHUNK, MASKED,
                                WIDE, BY_HAND, STREAM)
        else:
            _fused_rows(tl.program_id(0), x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, rows, x_row_stride,
                        res_row_stride, H, eps, BLOCK_ROWS, BLOCK_H, MASKED, WIDE, BY_HAND, STREAM)


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
    config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton fused add + RMSNorm over (..., H); returns (out, new_residual), both new and contiguous.

    `config` overrides the launch table (the sweep times configurations this way).
    """
    require_triton()
    check_weight(x, weight)
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    hidden = x.shape[-1]
    x2d, res2d = rows_view(x), rows_view(residual)  # (rows, H) each
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # (..., H), contiguous
    new_res = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # (..., H), contiguous
    rows = x2d.shape[0]
    if rows == 0:
        return out, new_res
    block_h = block_size(hidden, x.element_size())
    cfg = config or launch_config("fused_add_rms_norm", hidden, x.element_size(), rows)
    _fused_add_rms_norm_kernel[(cfg.grid(rows, num_sms(x.device)),)](
        x2d, res2d, unit_stride(weight), out, new_res, rows, x2d.stride(0), res2d.stride(0), hidden, eps,
        **kernel_flags(cfg, x, rows, block_h, max(x2d.stride(0), res2d.stride(0))),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, new_res


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: (rms_norm_ref(x + residual), x + residual), sum in x's dtype."""
    new_residual = (x.float() + residual.float()).to(x.dtype)  # (..., H)
    return rms_norm_ref(new_residual, weight, eps), new_residual
