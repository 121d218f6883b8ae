"""One CUDA device: the engine's GPU paths against their references.

Every test carries the ``gpu`` marker and is skipped with a reason without a CUDA device (the
plugin's collection hook). Run them with ``pytest -m gpu tests/test_gpu.py`` on a GPU machine:
the Triton kernels natively (not under the interpreter), the compiled one-device engine against
eager and the eager engine against Hugging Face transformers, in bf16 and fp32, and the KV-cache,
chunked-prefill and prompt-embeds paths on CUDA tensors. Comparisons use the harness's own
comparator and tolerances (``harness.compare``), so a GPU run is judged like a matrix case.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harness.baseline import hf_generate
from harness.compare import compare
from reference_impl.compile.config import CompileConfig
from reference_impl.engine import EngineSpec, build_runner
from reference_impl.requests import Request, RequestOutput
from reference_impl.runner import EngineConfig
from scenarios.models import checkpoint
from scenarios.registry import get_scenario

pytestmark = pytest.mark.gpu

MODEL = "tiny-llava"
DTYPES = ("float32", "bfloat16")
# Kernel tolerances against the torch references (same casting, fp32 accumulation in both):
# fp32 differs by reduction order only (a few ulps); bf16/fp16 outputs are rounded once, so one
# rounding step of the output (2^-8 relative for bf16, 2^-11 for fp16) bounds the difference.
KERNEL_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}
KERNEL_SHAPES = ((1, 64), (7, 4096), (5, 123, 123), (257, 8192), (3, 1000))


def _engine(dtype: str, mode: str = "eager", partition: str = "full", chunked: bool = True) -> EngineSpec:
    return EngineSpec(str(checkpoint(MODEL)), 1, 1, dtype, "cuda", EngineConfig(8, 24, chunked),
                      CompileConfig(mode, partition))


def _generate(spec: EngineSpec, requests: list[Request]) -> list[RequestOutput]:
    return build_runner(spec, torch.device("cuda", 0)).generate(requests)


def _requests(scenario: str, dtype: str) -> list[Request]:
    return get_scenario(scenario).requests(checkpoint(MODEL), dtype)


def _on_cuda(requests: list[Request]) -> list[Request]:
    """The same requests with their tensors on the GPU."""
    return [dataclasses.replace(
        r, prompt_embeds=None if r.prompt_embeds is None else r.prompt_embeds.cuda(),
        images=tuple(i.cuda() for i in r.images)) for r in requests]


@pytest.mark.parametrize("dtype", list(KERNEL_TOL), ids=str)
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
def test_triton_kernels_natively_match_their_references(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    from reference_impl.kernels import (
        fused_add_rms_norm_ref,
        fused_add_rms_norm_triton,
        rms_norm_ref,
        rms_norm_triton,
    )

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, generator=gen, device="cuda", dtype=dtype)
    residual = torch.randn(shape, generator=gen, device="cuda", dtype=dtype)
    weight = torch.randn(shape[-1], generator=gen, device="cuda", dtype=dtype)
    atol, rtol = KERNEL_TOL[dtype]
    torch.testing.assert_close(rms_norm_triton(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5).to(dtype),
                               atol=atol, rtol=rtol)
    got = fused_add_rms_norm_triton(x, residual, weight, 1e-5)
    want = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w.to(dtype), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", list(KERNEL_TOL), ids=str)
def test_triton_kernels_take_non_contiguous_inputs(dtype: torch.dtype) -> None:
    from reference_impl.kernels import fused_add_rms_norm_ref, fused_add_rms_norm_triton, rms_norm_ref, rms_norm_triton

    base = torch.randn(64, 2 * 4096, device="cuda", dtype=dtype)
    weight = torch.randn(4096, device="cuda", dtype=dtype)
    atol, rtol = KERNEL_TOL[dtype]
    # Stride 2 in the last dim (the launcher copies), and rows of stride 8192 (read in place).
    for x, residual in ((base[:, ::2], base[:, 1::2]), (base[:, :4096], base[:, 4096:])):
        got = rms_norm_triton(x, weight, 1e-6)
        assert got.is_contiguous()
        torch.testing.assert_close(got, rms_norm_ref(x, weight, 1e-6).to(dtype), atol=atol, rtol=rtol)
        out, new_residual = fused_add_rms_norm_triton(x, residual, weight, 1e-6)
        want_out, want_residual = fused_add_rms_norm_ref(x, residual, weight, 1e-6)
        torch.testing.assert_close(new_residual, want_residual, atol=0, rtol=0)
        torch.testing.assert_close(out, want_out.to(dtype), atol=atol, rtol=rtol)


# Every configuration of the launch table, natively, on rows that leave a partial last block and
# make each persistent grid loop (more blocks than 64 programs on each of 132 multiprocessors).
TABLE_ROWS = 20_011


def _table_cases() -> list[tuple[str, int, object]]:
    from reference_impl.kernels.launch import TABLE

    return [(kernel, row_bytes // 2, cfg) for (kernel, row_bytes, _), cfg in sorted(TABLE.items(), key=repr)]


@pytest.mark.parametrize(("kernel", "hidden", "config"), _table_cases(), ids=repr)
def test_every_launch_table_config_matches_the_reference(kernel: str, hidden: int, config: object) -> None:
    from reference_impl.kernels import fused_add_rms_norm_ref, fused_add_rms_norm_triton, rms_norm_ref, rms_norm_triton

    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(TABLE_ROWS, hidden, generator=gen, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(TABLE_ROWS, hidden, generator=gen, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(hidden, generator=gen, device="cuda", dtype=torch.bfloat16)
    atol, rtol = KERNEL_TOL[torch.bfloat16]
    if kernel == "rms_norm":
        got = rms_norm_triton(x, weight, 1e-6, config)  # type: ignore[arg-type]
        torch.testing.assert_close(got, rms_norm_ref(x, weight, 1e-6), atol=atol, rtol=rtol)
    else:
        out, new_residual = fused_add_rms_norm_triton(x, residual, weight, 1e-6, config)  # type: ignore[arg-type]
        want_out, want_residual = fused_add_rms_norm_ref(x, residual, weight, 1e-6)
        torch.testing.assert_close(new_residual, want_residual, atol=0, rtol=0)
        torch.testing.assert_close(out, want_out, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("mode", "partition"), [("graph", "full"), ("graph", "piecewise"),
                                                 ("inductor", "full"), ("inductor", "piecewise")])
def test_compiled_engine_matches_eager(mode: str, partition: str, dtype: str) -> None:
    requests = _on_cuda(_requests("mixed", dtype))
    want = _generate(_engine(dtype), requests)
    got = _generate(_engine(dtype, mode, partition), requests)
    verdict = compare(got, want, "logprobs", dtype)
    assert verdict.passed, verdict.message()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scenario", ["text", "prompt_embeds", "multimodal"])
def test_eager_engine_matches_transformers(scenario: str, dtype: str) -> None:
    requests = _requests(scenario, dtype)
    want = hf_generate(str(checkpoint(MODEL)), requests, dtype, "cuda")
    got = _generate(_engine(dtype), _on_cuda(requests))
    verdict = compare(got, want, "logprobs", dtype)
    assert verdict.passed, verdict.message()


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_prefill_and_kv_cache_match_unchunked_on_cuda(dtype: str) -> None:
    """The long text prompt and the 33-row prompt-embeds prompt are chunked over steps (KV cache
    written and read across steps) with a 24-token budget; without chunking each prefill is one
    step. The two must generate the same."""
    requests = _on_cuda(_requests("mixed", dtype))
    chunked = _generate(_engine(dtype), requests)
    whole = _generate(_engine(dtype, chunked=False), requests)
    verdict = compare(chunked, whole, "logprobs", dtype)
    assert verdict.passed, verdict.message()
    assert any(r.prompt_len > 24 for r in requests)  # something was chunked
