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

    @triton.jit  # type: ignore[untyped-decorator,unused-ignore]
    def inv_rms(sum_sq, H, eps):  # type: ignore[no-untyped-def]
        """1 / sqrt(mean of squares + eps) of rows whose squares sum to sum_sq (BLOCK_ROWS, 1)."""
        return tl.rsqrt(sum_sq / H + eps)

    @triton.jit  # type: ignore[untyped-decorator]
    def scale(  # type: ignore[no-untyped-def]
        xf, rstd, w, in_dtype: tl.constexpr, out_dtype: tl.constexpr, BY_HAND: tl.constexpr
    ):
        """HF's casts: (xf * rstd) rounded to the input dtype, times the fp32 weight w."""
        y = cast_rtne(xf * rstd, in_dtype, BY_HAND)  # HF: .to(input_dtype)
        # Exact product in fp32, rounded once to the output dtype: this is what
        # torch's `weight * y` does for bf16/fp16 operands.
        return cast_rtne(y.to(tl.float32) * w, out_dtype, BY_HAND)

    @triton.jit  # type: ignore[untyped-decorator]
    def normalize(  # type: ignore[no-untyped-def]
        xf, w, H, eps, in_dtype: tl.constexpr, out_dtype: tl.constexpr, BY_HAND: tl.constexpr
    ):
        """HF LlamaRMSNorm of fp32 rows xf (BLOCK_ROWS, BLOCK_H) with fp32 weight w (1, BLOCK_H).

        Masked lanes hold 0, so they add nothing to the sum; divide by the true H.
        """
        rstd = inv_rms(tl.sum(xf * xf, axis=1, keep_dims=True), H, eps)  # (BLOCK_ROWS, 1)
        return scale(xf, rstd, w, in_dtype, out_dtype, BY_HAND)

    @triton.jit  # type: ignore[untyped-decorator]
    def row_block(block, rows, H, BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr, WIDE: tl.constexpr):  # type: ignore[no-untyped-def]
        """Row indices (BLOCK_ROWS, 1), column indices (1, BLOCK_H) and mask of block `block`.

        Rows are int64 when WIDE (offsets past 2**31 elements), int32 otherwise.
        """
        r = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]  # (BLOCK_ROWS, 1)
        if WIDE:
            r = r.to(tl.int64)
        cols = tl.arange(0, BLOCK_H)[None, :]  # (1, BLOCK_H)
        return r, cols, (r < rows) & (cols < H)

    @triton.jit  # type: ignore[untyped-decorator]
    def row_chunks(block, rows, BLOCK_ROWS: tl.constexpr, CHUNK: tl.constexpr, WIDE: tl.constexpr):  # type: ignore[no-untyped-def]
        """Row indices (BLOCK_ROWS, 1) and chunk column indices (1, CHUNK) of block `block`."""
        r = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]  # (BLOCK_ROWS, 1)
        if WIDE:
            r = r.to(tl.int64)
        return r, tl.arange(0, CHUNK)[None, :]

    @triton.jit  # type: ignore[untyped-decorator]
    def load(ptrs, mask, MASKED: tl.constexpr, policy: tl.constexpr):  # type: ignore[no-untyped-def]
        """Load; masked lanes read 0. Unmasked (MASKED False) when every lane is in bounds."""
        if MASKED:
            v = tl.load(ptrs, mask=mask, other=0.0, eviction_policy=policy)
        else:
            v = tl.load(ptrs, eviction_policy=policy)
        return v

    @triton.jit  # type: ignore[untyped-decorator]
    def store(ptrs, v, mask, MASKED: tl.constexpr):  # type: ignore[no-untyped-def]
        if MASKED:
            tl.store(ptrs, v, mask=mask)
        else:
            tl.store(ptrs, v)

    @triton.jit  # type: ignore[untyped-decorator]
    def _rms_norm_rows(  # type: ignore[no-untyped-def]
        block, x_ptr, w_ptr, out_ptr, rows, x_row_stride, H, eps,
        BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr, MASKED: tl.constexpr, WIDE: tl.constexpr,
        BY_HAND: tl.constexpr, STREAM: tl.constexpr,
    ):
        """One pass: each row of the block whole in registers."""
        r, cols, mask = row_block(block, rows, H, BLOCK_ROWS, BLOCK_H, WIDE)
        # x streams through once (STREAM: its cache hint); the weight is read by every block, so
        # keep it in cache. Both loads are issued before either is used: one memory latency.
        x = load(x_ptr + r * x_row_stride + cols, mask, MASKED, STREAM)  # (BLOCK_ROWS, BLOCK_H)
        w = load(w_ptr + cols, cols < H, MASKED, "evict_last")  # (1, BLOCK_H)
        out = normalize(x.to(tl.float32), w.to(tl.float32), H, eps, x.dtype, out_ptr.dtype.element_ty, BY_HAND)
        store(out_ptr + r * H + cols, out, mask, MASKED)

    @triton.jit  # type: ignore[untyped-decorator]
    def _rms_norm_rows_chunked(  # type: ignore[no-untyped-def]
        block, x_ptr, w_ptr, out_ptr, rows, x_row_stride, H, eps,
        BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr, CHUNK: tl.constexpr, MASKED: tl.constexpr,
        WIDE: tl.constexpr, BY_HAND: tl.constexpr, STREAM: tl.constexpr,
    ):
        """Two passes over chunks of CHUNK columns (inductor's looped reduction).

        The first sums the squares, loading x with evict_last so that it stays in L2; the second
        re-reads it from there, normalizes and stores. Same arithmetic as the one-pass kernel
        except the order of the fp32 sum of squares.
        """
        r, cols = row_chunks(block, rows, BLOCK_ROWS, CHUNK, WIDE)
        x_row = x_ptr + r * x_row_stride  # (BLOCK_ROWS, 1)
        acc = tl.zeros((BLOCK_ROWS, CHUNK), dtype=tl.float32)
        for c in range(0, BLOCK_H, CHUNK):
            mask = (r < rows) & (c + cols < H)
            xf = load(x_row + c + cols, mask, MASKED, "evict_last").to(tl.float32)  # (BLOCK_ROWS, CHUNK)
            acc += xf * xf
        rstd = inv_rms(tl.sum(acc, axis=1, keep_dims=True), H, eps)  # (BLOCK_ROWS, 1)
        for c in range(0, BLOCK_H, CHUNK):
            mask = (r < rows) & (c + cols < H)
            x = load(x_row + c + cols, mask, MASKED, STREAM)  # (BLOCK_ROWS, CHUNK), from L2
            w = load(w_ptr + c + cols, c + cols < H, MASKED, "evict_last")  # (1, CHUNK)
            out = scale(x.to(tl.float32), rstd, w.to(tl.float32), x.dtype, out_ptr.dtype.element_ty, BY_HAND)
            store(out_ptr + r * H + c + cols, out, mask, MASKED)

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
        CHUNK: tl.constexpr,  # columns per pass: BLOCK_H for one pass, less for two (see LaunchConfig)
        LOOP: tl.constexpr,  # a persistent grid: each program walks blocks pid, pid + grid, ...
        MASKED: tl.constexpr,  # some lane of some block is out of bounds (see kernel_flags)
        WIDE: tl.constexpr,  # int64 row offsets
        BY_HAND: tl.constexpr,  # round bf16 by hand (the interpreter); see cast_rtne
        STREAM: tl.constexpr,  # cache hint of the streamed input: "evict_first" or "" (default)
    ):
        if LOOP:
            for block in tl.range(tl.program_id(0), tl.cdiv(rows, BLOCK_ROWS), tl.num_programs(0)):
                if CHUNK < BLOCK_H:
                    _rms_norm_rows_chunked(block, x_ptr, w_ptr, out_ptr, rows, x_row_stride, H, eps,
                                           BLOCK_ROWS, BLOCK_H, CHUNK, MASKED, WIDE, BY_HAND, STREAM)
                else:
                    _rms_norm_rows(block, x_ptr, w_ptr, out_ptr, rows, x_row_stride, H, eps,
                                   BLOCK_ROWS, BLOCK_H, MASKED, WIDE, BY_HAND, STREAM)
        elif CHUNK < BLOCK_H:
            _rms_norm_rows_chunked(tl.program_id(0), x_ptr, w_ptr, out_ptr, rows, x_row_stride, H, eps,
                                   BLOCK_ROWS, BLOCK_H, CHUNK, MASKED, WIDE, BY_HAND, STREAM)
        else:
            _rms_norm_rows(tl.program_id(0), x_ptr, w_ptr, out_ptr, rows, x_row_stride, H, eps,
                           BLOCK_ROWS, BLOCK_H, MASKED, WIDE, BY_HAND, STREAM)


def kernel_flags(
    cfg: LaunchConfig, x: torch.Tensor, rows: int, block_h: int, max_row_stride: int
) -> dict[str, bool | int | str]:
    """The kernels' compile-time switches for one launch (each removes work when it can).

    BLOCK_H: the row's block. CHUNK: columns per pass (BLOCK_H: one pass). LOOP: the grid is
    persistent. MASKED: hidden is not a power of two or the last block of rows is partial, so
    loads and stores need a mask. WIDE: an element offset may reach 2**31. BY_HAND: the Triton
    interpreter (CPU tensors) truncates bf16 casts; round by hand there. STREAM: the cache hint
    of the inputs read once.
    """
    hidden = x.shape[-1]
    return {"BLOCK_ROWS": cfg.block_rows,
            "BLOCK_H": block_h,
            "CHUNK": cfg.chunk_size(block_h),
            "LOOP": cfg.programs_per_sm > 0,
            "MASKED": hidden != block_h or rows % cfg.block_rows != 0,
            "WIDE": rows * max(max_row_stride, hidden) >= 2**31,
            "BY_HAND": not x.is_cuda,
            "STREAM": "evict_first" if cfg.evict_first else ""}


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
        **kernel_flags(cfg, x, rows, block_h, x2d.stride(0)),
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
