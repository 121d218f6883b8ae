"""RMSNorm: Triton kernel, its launcher, and the torch reference.

Casting follows Hugging Face ``LlamaRMSNorm`` exactly: normalize in fp32, cast
the normalized value back to the input dtype, then multiply by the weight.
"""

from __future__ import annotations

import torch

from reference_impl.kernels.launch import LaunchConfig, block_size, launch_config, num_sms

try:
    import triton  # type: ignore[import-untyped, unused-ignore]
    import triton.language as tl  # type: ignore[import-untyped, unused-ignore]

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_TRITON = False


if HAS_TRITON:

    @triton.jit  # type: ignore[untyped-decorator]
    def cast_rtne(v, dtype: tl.constexpr, BY_HAND: tl.constexpr):  # type: ignore[no-untyped-def]
        """fp32 -> dtype with round-to-nearest-even, bit for bit torch's `.to(dtype)`.

        On a GPU the native cast is one RTNE conversion instruction. The Triton interpreter
        (TRITON_INTERPRET=1, CPU tensors) truncates fp32 -> bf16 instead, so there (BY_HAND)
        bf16 is rounded in integer arithmetic, which gives torch's bits and keeps interpreter
        tests exact. By hand costs about ten integer operations per element: on an H200 that
        made the kernels ALU-bound (measured: 12.2 µs against 8.9 for inductor at 1024 rows of
        4096), hence native on the GPU.
        """
        if BY_HAND and dtype == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            # Add just under half an ulp, plus one when the kept lsb is odd (ties to even).
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(v != v, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
            out = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            out = v.to(dtype)
        return out

    @triton.jit  # type: ignore[untyped-decorator]
    def normalize(  # type: ignore[no-untyped-def]
        xf, w, H, eps, in_dtype: tl.constexpr, out_dtype: tl.constexpr, BY_HAND: tl.constexpr
    ):
        """HF LlamaRMSNorm of fp32 rows xf (BLOCK_ROWS, BLOCK_H) with fp32 weight w (1, BLOCK_H).

        Masked lanes hold 0, so they add nothing to the sum; divide by the true H.
        """
        variance = tl.sum(xf * xf, axis=1, keep_dims=True) / H  # (BLOCK_ROWS, 1)
        y = cast_rtne(xf * tl.rsqrt(variance + eps), in_dtype, BY_HAND)  # HF: .to(input_dtype)
        # Exact product in fp32, rounded once to the output dtype: this is what
        # torch's `weight * y` does for bf16/fp16 operands.
        return cast_rtne(y.to(tl.float32) * w, out_dtype, BY_HAND)

    @triton.jit(do_not_specialize=["rows"])  # type: ignore[untyped-decorator]
    def _rms_norm_kernel(  # type: ignore[no-untyped-def]
        x_ptr,  # (rows, H), unit column stride
        w_ptr,  # (H,), contiguous
        out_ptr,  # (rows, H), contiguous, x's dtype
        rows,
        x_row_stride,
        H,
        eps,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BY_HAND: tl.constexpr,  # round bf16 by hand (the interpreter); see cast_rtne
    ):
        cols = tl.arange(0, BLOCK_H)[None, :]  # (1, BLOCK_H)
        col_mask = cols < H
        # One program per block of rows, or a persistent grid walking the blocks.
        for block in tl.range(tl.program_id(0), tl.cdiv(rows, BLOCK_ROWS), tl.num_programs(0)):
            # int64 rows: rows * H may exceed 2**31 (block * BLOCK_ROWS < rows fits int32)
            r = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None].to(tl.int64)  # (BLOCK_ROWS, 1)
            mask = (r < rows) & col_mask  # (BLOCK_ROWS, BLOCK_H)
            # x streams through once; the weight is read by every block, so keep it in cache. Both
            # loads are issued before either is used: one memory latency, not two.
            x = tl.load(x_ptr + r * x_row_stride + cols, mask=mask, other=0.0, eviction_policy="evict_first")
            w = tl.load(w_ptr + cols, mask=col_mask, other=0.0, eviction_policy="evict_last")  # (1, BLOCK_H)
            out = normalize(x.to(tl.float32), w.to(tl.float32), H, eps, x.dtype, out_ptr.dtype.element_ty, BY_HAND)
            tl.store(out_ptr + r * H + cols, out, mask=mask)


def require_triton() -> None:
    """Raise a clear error when the Triton path is requested without Triton."""
    if not HAS_TRITON:
        raise RuntimeError(
            "the Triton kernels were requested (CUDA tensor or PARITY_FORCE_TRITON=1) "
            "but `triton` is not installed"
        )


def check_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    """The weight is one vector of length H = x.shape[-1]."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape ({x.shape[-1]},) to match x {tuple(x.shape)}, "
            f"got {tuple(weight.shape)}"
        )


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """x (..., H) as (rows, H) with unit column stride; copies only when no such view exists."""
    x2d = x.reshape(-1, x.shape[-1])  # (rows, H)
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def unit_stride(weight: torch.Tensor) -> torch.Tensor:
    return weight if weight.stride(0) == 1 else weight.contiguous()


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, config: LaunchConfig | None = None
) -> torch.Tensor:
    """Triton RMSNorm over the last dim of x (..., H); output has x's dtype and shape, contiguous.

    `config` overrides the launch table (the sweep times configurations this way).
    """
    require_triton()
    check_weight(x, weight)
    hidden = x.shape[-1]
    x2d = rows_view(x)  # (rows, H)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # (..., H), contiguous
    rows = x2d.shape[0]
    if rows == 0:
        return out
    block_h = block_size(hidden, x.element_size())
    cfg = config or launch_config("rms_norm", hidden, x.element_size(), rows)
    _rms_norm_kernel[(cfg.grid(rows, num_sms(x.device)),)](
        x2d, unit_stride(weight), out, rows, x2d.stride(0), hidden, eps,
        BLOCK_ROWS=cfg.block_rows, BLOCK_H=block_h, BY_HAND=not x.is_cuda,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Torch reference, line for line Hugging Face `LlamaRMSNorm.forward`.

    The weight multiply happens in torch's promoted dtype (x's dtype when the
    weight has x's dtype), as HF does.
    """
    xf = x.float()  # (..., H) fp32
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)
