"""RMSNorm: Triton kernel, its launcher, and the torch reference.

Casting follows Hugging Face ``LlamaRMSNorm`` exactly: normalize in fp32, cast
the normalized value back to the input dtype, then multiply by the weight.
"""

from __future__ import annotations

import torch

try:
    import triton  # type: ignore[import-untyped, unused-ignore]
    import triton.language as tl  # type: ignore[import-untyped, unused-ignore]

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

# Largest row (in bytes) one program keeps in registers; beyond this a
# one-program-per-row kernel would spill, so we refuse rather than go slow.
MAX_FUSED_BYTES = 65536


if HAS_TRITON:

    @triton.jit  # type: ignore[untyped-decorator]
    def cast_rtne(v, dtype: tl.constexpr):  # type: ignore[no-untyped-def]
        """fp32 -> dtype with round-to-nearest-even, bit for bit torch's `.to(dtype)`.

        bf16 is rounded by hand: the Triton interpreter (TRITON_INTERPRET=1)
        truncates fp32 -> bf16 casts, while GPUs and torch round to nearest even.
        The integer form gives the same bits on both, so interpreter tests are
        exact. Other dtypes use the native cast (already RTNE everywhere).
        """
        if dtype == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            # Add just under half an ulp, plus one when the kept lsb is odd (ties to even).
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(v != v, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
            out = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            out = v.to(dtype)
        return out

    @triton.jit  # type: ignore[untyped-decorator]
    def _rms_norm_kernel(  # type: ignore[no-untyped-def]
        x_ptr,  # (rows, H), contiguous
        w_ptr,  # (H,)
        out_ptr,  # (rows, H), contiguous, x's dtype
        row_stride,
        H,
        eps,
        BLOCK_SIZE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # int64: rows * H may exceed 2**31
        cols = tl.arange(0, BLOCK_SIZE)  # (BLOCK_SIZE,)
        mask = cols < H
        x = tl.load(x_ptr + row * row_stride + cols, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        # Masked lanes load 0, so they add nothing; divide by the true H.
        variance = tl.sum(xf * xf, axis=0) / H
        y = cast_rtne(xf * tl.rsqrt(variance + eps), x.dtype)  # HF: .to(input_dtype)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        # Exact product in fp32, rounded once to the output dtype: this is what
        # torch's `weight * y` does for bf16/fp16 operands.
        out = y.to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + row * row_stride + cols, cast_rtne(out, out_ptr.dtype.element_ty), mask=mask)


def require_triton() -> None:
    """Raise a clear error when the Triton path is requested without Triton."""
    if not HAS_TRITON:
        raise RuntimeError(
            "the Triton kernels were requested (CUDA tensor or PARITY_FORCE_TRITON=1) "
            "but `triton` is not installed"
        )


def launch_config(hidden: int, element_size: int) -> tuple[int, int]:
    """Pick (BLOCK_SIZE, num_warps) for one program per row of `hidden` elements."""
    require_triton()
    block_size = int(triton.next_power_of_2(hidden))
    if block_size * element_size > MAX_FUSED_BYTES:
        raise RuntimeError(
            f"hidden size {hidden} is too large for the one-program-per-row kernel "
            f"(at most {MAX_FUSED_BYTES // element_size} elements of {element_size} bytes)"
        )
    # About 256 elements per warp, 1 to 8 warps.
    num_warps = min(max(block_size // 256, 1), 8)
    return block_size, num_warps


def check_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    """The weight is one vector of length H = x.shape[-1]."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape ({x.shape[-1]},) to match x {tuple(x.shape)}, "
            f"got {tuple(weight.shape)}"
        )


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm over the last dim of x (..., H); output has x's dtype and shape."""
    require_triton()
    check_weight(x, weight)
    hidden = x.shape[-1]
    x2d = x.contiguous().view(-1, hidden)  # (rows, H)
    w = weight.contiguous()  # (H,)
    out = torch.empty_like(x2d)  # (rows, H)
    rows = x2d.shape[0]
    if rows == 0:
        return out.view(x.shape)
    block_size, num_warps = launch_config(hidden, x2d.element_size())
    _rms_norm_kernel[(rows,)](
        x2d, w, out, x2d.stride(0), hidden, eps,
        BLOCK_SIZE=block_size, num_warps=num_warps,
    )
    return out.view(x.shape)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Torch reference, line for line Hugging Face `LlamaRMSNorm.forward`.

    The weight multiply happens in torch's promoted dtype (x's dtype when the
    weight has x's dtype), as HF does.
    """
    xf = x.float()  # (..., H) fp32
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)
