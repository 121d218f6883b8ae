"""Tests for reference_impl.kernels: RMSNorm and fused add + RMSNorm.

Three layers are checked:
  * the torch references against Hugging Face's LlamaRMSNorm (bit for bit),
  * the Triton kernels against the references (under the Triton interpreter on
    CPU, natively when a GPU is present),
  * the `parity::*` custom ops: dispatch, no mutation, one graph node, opcheck.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

# Run the Triton kernels on CPU under the Triton interpreter. This must happen
# before `triton` is FIRST imported in the process: the interpreter is chosen
# when a function is decorated with @triton.jit, and triton.language's own jit
# helpers (tl.sum, tl.max, ...) are decorated when triton is imported. Setting
# it later gives "Cannot call @triton.jit'd outside of the scope of a kernel".
# With a GPU the kernels run natively instead.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from reference_impl.kernels import (  # noqa: E402
    HAS_TRITON,
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    fused_add_rms_norm_triton,
    rms_norm,
    rms_norm_ref,
    rms_norm_triton,
)
from reference_impl.kernels.launch import (  # noqa: E402
    TABLE,
    LaunchConfig,
    block_size,
    fallback_config,
    launch_config,
    rows_bucket,
)

# `reference_impl.kernels.rms_norm` is also the name of a function exported by
# the package, so fetch the modules themselves from sys.modules.
RMS_MODULE = "reference_impl.kernels.rms_norm"
OPS_MODULE = "reference_impl.kernels.ops"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO_ROOT = Path(__file__).resolve().parents[1]


def _triton_skip_reason() -> str | None:
    """Why the Triton kernels cannot run in this process, or None if they can."""
    if not HAS_TRITON:
        return "triton is not installed: the Triton kernels cannot run"
    if torch.cuda.is_available():
        return None
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.sum, InterpretedFunction):
        # Cannot be repaired here: triton cannot be re-imported in one process.
        return (
            "no GPU, and triton was imported before TRITON_INTERPRET=1 was set (an "
            "earlier-collected test module imported reference_impl.kernels), so the "
            "interpreter is off; set TRITON_INTERPRET=1 in conftest.py or the environment"
        )
    return None


TRITON_SKIP_REASON = _triton_skip_reason()
requires_triton = pytest.mark.skipif(TRITON_SKIP_REASON is not None, reason=TRITON_SKIP_REASON or "")

# fp32: kernel and reference evaluate the same formula in fp32; only the order
# of the H-term sum of squares differs (numpy's / the GPU's tree vs torch's),
# plus rsqrt's approximation on GPU. That is a few fp32 ulps (2^-23 ~ 1.2e-7)
# of relative error; 1e-5 leaves ~80x headroom yet catches any real bug.
FP32_RTOL = 1e-5
FP32_ATOL = 1e-6
# bf16: the output is rounded to bf16 twice (normalized value, then the weight
# product). A few-ulp fp32 difference before either rounding can land it on the
# neighbouring bf16 value: one bf16 ulp, 2^-8 to 2^-7 of |value| (8 significand
# bits). Two roundings -> at most 2 * 2^-7.
BF16_RTOL = 2 * 2**-7
BF16_ATOL = 1e-6
# ...but such a flip needs the fp32 value within a few fp32 ulps of a bf16
# rounding midpoint, i.e. it hits ~2^-14 of the elements. Skipping one of HF's
# casts (or normalizing the unrounded sum) also stays within 2 bf16 ulps but
# changes a large share of the elements, so bound how many may be inexact.
# (Under the interpreter the kernel is in fact bit-exact: see cast_rtne.)
BF16_MAX_INEXACT_FRACTION = 0.01
# fp32 outputs may all differ by an ulp or two, so no bound on their number.
FP32_MAX_INEXACT_FRACTION = 1.0
# dtype -> (rtol, atol, max_inexact_fraction)
TOLERANCES: dict[torch.dtype, tuple[float, float, float]] = {
    torch.float32: (FP32_RTOL, FP32_ATOL, FP32_MAX_INEXACT_FRACTION),
    torch.bfloat16: (BF16_RTOL, BF16_ATOL, BF16_MAX_INEXACT_FRACTION),
}

# Odd shapes: one row, H not a power of two, 3-D leading dims, many rows with a
# tiny H, and H close to a power of two from below. Kept small: the Triton
# interpreter runs one Python-level program per row.
SHAPES = [(1, 64), (5, 123), (3, 7, 96), (257, 40), (2, 1000)]
DTYPES = [torch.float32, torch.bfloat16]
EPS_VALUES = [1e-5, 1e-6, 3e-6]
DEFAULT_EPS = 1e-6


# ---------------------------------------------------------------- helpers


def assert_close_verbose(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    rtol: float,
    atol: float,
    max_inexact_fraction: float = 1.0,
    name: str = "tensor",
) -> None:
    """allclose with NaN/Inf positions required to match; says what differs.

    Also fails when more than `max_inexact_fraction` of the elements (rounded
    up) are not bit-identical, even if all are within tolerance.
    """
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    nan_mismatch = a.isnan() != e.isnan()
    # Same infinity on both sides counts as equal; +inf vs -inf does not.
    inf_mismatch = (a.isinf() | e.isinf()) & (a != e) & ~nan_mismatch & ~(a.isnan() & e.isnan())
    finite = a.isfinite() & e.isfinite()
    abs_err = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    out_of_tol = finite & (abs_err > atol + rtol * e.abs())
    bad = out_of_tol | nan_mismatch | inf_mismatch
    n_bad = int(bad.sum())
    n_inexact = int(((a != e) & ~(a.isnan() & e.isnan())).sum())
    max_inexact = math.ceil(max_inexact_fraction * a.numel())
    if n_bad == 0 and n_inexact <= max_inexact:
        return
    rel_err = abs_err / e.abs().clamp_min(torch.finfo(torch.float32).tiny)
    excess = torch.where(out_of_tol, abs_err - rtol * e.abs(), torch.zeros_like(a))
    if bool(out_of_tol.any()):
        flat = int(excess.argmax())
    elif n_bad:
        flat = int(bad.flatten().nonzero()[0])
    else:
        flat = int(abs_err.argmax())
    worst = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
    raise AssertionError(
        f"{name}: {n_bad} of {a.numel()} elements differ beyond rtol={rtol:g}, atol={atol:g}; "
        f"{n_inexact} are not bit-identical (at most {max_inexact} may be); "
        f"worst at index {worst}: actual={a.flatten()[flat].item()!r} "
        f"expected={e.flatten()[flat].item()!r}; "
        f"max abs err={abs_err.max().item():.3e}, "
        f"max rel err={rel_err[finite].max().item() if finite.any() else 0.0:.3e}; "
        f"NaN mismatches={int(nan_mismatch.sum())}, Inf mismatches={int(inf_mismatch.sum())}"
    )


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert_close_verbose(actual, expected, rtol=0.0, atol=0.0, name=name)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Kernel vs reference, with the tolerances of the tensors' dtype."""
    rtol, atol, max_inexact_fraction = TOLERANCES[expected.dtype]
    assert_close_verbose(
        actual, expected, rtol=rtol, atol=atol,
        max_inexact_fraction=max_inexact_fraction, name=name,
    )


def make_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, residual, weight) on DEVICE; weight near 1 but not 1 so the multiply matters."""
    gen = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(shape, generator=gen)
    residual = scale * torch.randn(shape, generator=gen)
    weight = 1.0 + 0.1 * torch.randn(shape[-1], generator=gen)
    return x.to(DEVICE, dtype), residual.to(DEVICE, dtype), weight.to(DEVICE, dtype)


def hf_llama_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face LlamaRMSNorm.forward, copied statement for statement."""
    input_dtype = x.dtype
    hidden_states = x.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def ids(values: list[object]) -> list[str]:
    return [str(v).replace("torch.", "").replace(" ", "") for v in values]


# ------------------------------------------- references vs Hugging Face


@pytest.mark.parametrize("dtype", DTYPES, ids=ids(list(DTYPES)))
@pytest.mark.parametrize("eps", EPS_VALUES)
def test_reference_matches_inline_hf(dtype: torch.dtype, eps: float) -> None:
    x, residual, weight = make_inputs((4, 6, 72), dtype, scale=1e-3)
    assert_bitwise_equal(rms_norm_ref(x, weight, eps), hf_llama_rms_norm(x, weight, eps), "rms")
    # HF decoder layer: `hidden_states = residual + hidden_states; residual =
    # hidden_states; hidden_states = norm(hidden_states)`, all in the model dtype.
    hf_residual = residual + x
    out, new_residual = fused_add_rms_norm_ref(x, residual, weight, eps)
    assert_bitwise_equal(new_residual, hf_residual, "new_residual")
    assert_bitwise_equal(out, hf_llama_rms_norm(hf_residual, weight, eps), "out")


@pytest.mark.parametrize("dtype", DTYPES, ids=ids(list(DTYPES)))
def test_reference_matches_transformers_llama_rms_norm(dtype: torch.dtype) -> None:
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    x, _, weight = make_inputs((3, 5, 80), dtype)
    eps = 3e-6
    module = modeling_llama.LlamaRMSNorm(80, eps=eps).to(DEVICE, dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        expected = module(x)
    assert_bitwise_equal(rms_norm_ref(x, weight, eps), expected, "rms vs transformers")


# ------------------------------------------------ Triton vs references


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(list(DTYPES)))
@pytest.mark.parametrize("shape", SHAPES, ids=ids(list(SHAPES)))
def test_triton_rms_norm_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x, _, weight = make_inputs(shape, dtype)
    actual = rms_norm_triton(x, weight, DEFAULT_EPS)
    expected = rms_norm_ref(x, weight, DEFAULT_EPS)
    assert_matches(actual, expected, name="rms_norm")


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(list(DTYPES)))
@pytest.mark.parametrize("shape", SHAPES, ids=ids(list(SHAPES)))
def test_triton_fused_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x, residual, weight = make_inputs(shape, dtype)
    out, new_residual = fused_add_rms_norm_triton(x, residual, weight, DEFAULT_EPS)
    ref_out, ref_new_residual = fused_add_rms_norm_ref(x, residual, weight, DEFAULT_EPS)
    # One correctly rounded add on both sides: must be bit-exact in every dtype.
    assert_bitwise_equal(new_residual, ref_new_residual, "new_residual")
    assert_matches(out, ref_out, name="out")


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(list(DTYPES)))
@pytest.mark.parametrize("eps", EPS_VALUES)
def test_triton_honours_eps(eps: float, dtype: torch.dtype) -> None:
    # scale=1e-3 makes the mean square ~1e-6, the size of eps, so a kernel that
    # used another eps (or none) would be far outside tolerance.
    x, residual, weight = make_inputs((5, 123), dtype, seed=1, scale=1e-3)
    expected = rms_norm_ref(x, weight, eps)
    assert_matches(rms_norm_triton(x, weight, eps), expected, name=f"rms_norm eps={eps}")
    out, new_residual = fused_add_rms_norm_triton(x, residual, weight, eps)
    ref_out, ref_new_residual = fused_add_rms_norm_ref(x, residual, weight, eps)
    assert_bitwise_equal(new_residual, ref_new_residual, f"new_residual eps={eps}")
    assert_matches(out, ref_out, name=f"out eps={eps}")
    # The inputs really are eps-sensitive.
    assert not torch.allclose(expected, rms_norm_ref(x, weight, 10 * eps))


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(list(DTYPES)))
def test_triton_non_contiguous_inputs(dtype: torch.dtype) -> None:
    x, residual, weight = make_inputs((7, 3, 96), dtype)
    x_t, residual_t = x.transpose(0, 1), residual.transpose(0, 1)  # (3, 7, 96), strided rows
    assert not x_t.is_contiguous()
    expected = rms_norm_ref(x_t, weight, DEFAULT_EPS)
    assert_matches(rms_norm_triton(x_t, weight, DEFAULT_EPS), expected, name="rms_norm")
    out, new_residual = fused_add_rms_norm_triton(x_t, residual_t, weight, DEFAULT_EPS)
    ref_out, ref_new_residual = fused_add_rms_norm_ref(x_t, residual_t, weight, DEFAULT_EPS)
    assert_bitwise_equal(new_residual, ref_new_residual, "new_residual")
    assert_matches(out, ref_out, name="out")


@requires_triton
# numpy (the interpreter) warns on inf * 0; that NaN is the expected result.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(list(DTYPES)))
def test_triton_nan_and_inf_propagate_like_reference(dtype: torch.dtype) -> None:
    x, residual, weight = make_inputs((3, 40), dtype)
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    expected = rms_norm_ref(x, weight, DEFAULT_EPS)
    assert_matches(rms_norm_triton(x, weight, DEFAULT_EPS), expected, name="rms_norm")
    out, new_residual = fused_add_rms_norm_triton(x, residual, weight, DEFAULT_EPS)
    ref_out, ref_new_residual = fused_add_rms_norm_ref(x, residual, weight, DEFAULT_EPS)
    assert_bitwise_equal(new_residual, ref_new_residual, "new_residual")
    assert_matches(out, ref_out, name="out")


@requires_triton
def test_triton_zero_rows() -> None:
    x, residual, weight = make_inputs((0, 64), torch.float32)
    assert rms_norm_triton(x, weight, DEFAULT_EPS).shape == (0, 64)
    out, new_residual = fused_add_rms_norm_triton(x, residual, weight, DEFAULT_EPS)
    assert out.shape == new_residual.shape == (0, 64)


def test_block_size_is_the_next_power_of_two_and_refuses_spilling_rows() -> None:
    assert block_size(40, 4) == 64
    assert block_size(1000, 2) == 1024
    assert block_size(4096, 2) == 4096
    with pytest.raises(RuntimeError, match="too large"):
        block_size(65536, 2)


def test_launch_config_validates_itself() -> None:
    for bad in ({"block_rows": 3}, {"num_warps": 6}, {"num_warps": 64}, {"programs_per_sm": -1},
                {"num_stages": 0}, {"chunk": 48}, {"chunk": -2}):
        with pytest.raises(ValueError):
            LaunchConfig(**bad)  # type: ignore[arg-type]


def test_launch_config_chunk_and_source() -> None:
    assert LaunchConfig(1, 4).chunk_size(4096) == 4096  # one pass
    assert LaunchConfig(1, 4, chunk=2048).chunk_size(4096) == 2048  # two passes
    assert LaunchConfig(1, 4, chunk=8192).chunk_size(4096) == 4096  # a chunk past the row: one pass
    for cfg in (LaunchConfig(1, 16), LaunchConfig(2, 8, 4, 2, 2048, False), LaunchConfig(1, 4, evict_first=False)):
        assert eval(cfg.source(), {"LaunchConfig": LaunchConfig}) == cfg
    assert LaunchConfig(1, 16, chunk=2048).source() == "LaunchConfig(1, 16, chunk=2048)"


def test_grid_is_one_program_per_block_or_a_capped_persistent_grid() -> None:
    assert LaunchConfig(block_rows=4).grid(rows=10, num_sms=132) == 3
    assert LaunchConfig(block_rows=1).grid(rows=1, num_sms=132) == 1
    persistent = LaunchConfig(block_rows=2, programs_per_sm=4)
    assert persistent.grid(rows=100_000, num_sms=132) == 4 * 132
    assert persistent.grid(rows=9, num_sms=132) == 5  # never more programs than blocks


def test_launch_table_lookup_by_rows_bucket_with_fallback() -> None:
    assert [rows_bucket(n) for n in (1, 2, 16, 17, 4096, 16384, 16385)] == [1, 16, 16, 256, 4096, 16384, 65536]
    for (kernel, row_bytes, bucket), cfg in TABLE.items():
        assert kernel in ("rms_norm", "fused_add_rms_norm")
        assert launch_config(kernel, row_bytes // 2, 2, bucket) == cfg
    # A row size the table does not list gets the fallback rule.
    assert launch_config("rms_norm", 96, 4, 5) == fallback_config(512)
    with pytest.raises(ValueError, match="unknown kernel"):
        launch_config("layer_norm", 64, 2, 1)


# Configurations run under the interpreter (and natively on a GPU): several rows per program,
# a persistent grid that loops (the interpreter's device has one "multiprocessor"), pipelining,
# two passes over chunks (96 columns in a block of 128: the last chunk of 32 is masked, and the
# chunked persistent grid loops), the default cache hint, and every configuration of the table.
CONFIGS = sorted({LaunchConfig(4, 4), LaunchConfig(2, 2, 3), LaunchConfig(8, 1, 1, 2),
                  LaunchConfig(1, 2, chunk=32), LaunchConfig(2, 1, 3, chunk=64, evict_first=False),
                  LaunchConfig(1, 4, evict_first=False), *TABLE.values()},
                 key=repr)


@requires_triton
@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_triton_launch_configs_match_reference(config: LaunchConfig) -> None:
    # 37 rows: not a multiple of any block_rows; more blocks than a persistent grid here.
    x, residual, weight = make_inputs((37, 96), torch.bfloat16)
    assert_matches(rms_norm_triton(x, weight, DEFAULT_EPS, config), rms_norm_ref(x, weight, DEFAULT_EPS),
                   name=f"rms_norm {config}")
    out, new_residual = fused_add_rms_norm_triton(x, residual, weight, DEFAULT_EPS, config)
    ref_out, ref_new_residual = fused_add_rms_norm_ref(x, residual, weight, DEFAULT_EPS)
    assert_bitwise_equal(new_residual, ref_new_residual, f"new_residual {config}")
    assert_matches(out, ref_out, name=f"out {config}")


@requires_triton
def test_triton_reads_strided_rows_in_place() -> None:
    base, base_res, weight = make_inputs((9, 160), torch.float32)
    x, residual = base[:, :96], base_res[:, 32:128]  # (9, 96) each, row strides 160
    weight = weight[:96]
    expected = rms_norm_ref(x, weight, DEFAULT_EPS)
    actual = rms_norm_triton(x, weight, DEFAULT_EPS)
    assert actual.is_contiguous()
    assert_matches(actual, expected, name="rms_norm")
    out, new_residual = fused_add_rms_norm_triton(x, residual, weight, DEFAULT_EPS)
    ref_out, ref_new_residual = fused_add_rms_norm_ref(x, residual, weight, DEFAULT_EPS)
    assert out.is_contiguous() and new_residual.is_contiguous()
    assert_bitwise_equal(new_residual, ref_new_residual, "new_residual")
    assert_matches(out, ref_out, name="out")


def test_triton_missing_raises_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[RMS_MODULE], "HAS_TRITON", False)
    x, residual, weight = make_inputs((2, 8), torch.float32)
    with pytest.raises(RuntimeError, match="triton"):
        rms_norm_triton(x, weight, DEFAULT_EPS)
    with pytest.raises(RuntimeError, match="triton"):
        fused_add_rms_norm_triton(x, residual, weight, DEFAULT_EPS)


def test_import_without_triton() -> None:
    """The package imports and the CPU ops work when `import triton` fails."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import os, torch\n"
        "import reference_impl.kernels as k\n"
        "assert not k.HAS_TRITON\n"
        "x, w = torch.randn(2, 8), torch.randn(8)\n"
        "assert torch.equal(k.rms_norm(x, w, 1e-6), k.rms_norm_ref(x, w, 1e-6))\n"
        "os.environ['PARITY_FORCE_TRITON'] = '1'\n"
        "try:\n"
        "    k.fused_add_rms_norm(x, x, w, 1e-6)\n"
        "except RuntimeError as err:\n"
        "    assert 'triton' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('expected RuntimeError')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("PARITY_FORCE_TRITON", None)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------ custom ops


def test_ops_are_registered() -> None:
    assert hasattr(torch.ops.parity, "rms_norm")
    assert hasattr(torch.ops.parity, "fused_add_rms_norm")


def test_registration_is_idempotent() -> None:
    importlib.reload(sys.modules[OPS_MODULE])  # would raise if it defined the ops again
    x, residual, weight = (t.cpu() for t in make_inputs((2, 16), torch.float32))  # the torch path
    assert_bitwise_equal(
        torch.ops.parity.rms_norm(x, weight, DEFAULT_EPS), rms_norm_ref(x, weight, DEFAULT_EPS),
        "rms_norm after reload",
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=ids(list(DTYPES)))
def test_ops_match_reference_on_cpu(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PARITY_FORCE_TRITON", raising=False)
    x, residual, weight = make_inputs((3, 7, 96), dtype)
    x, residual, weight = x.cpu(), residual.cpu(), weight.cpu()
    assert_bitwise_equal(
        rms_norm(x, weight, 3e-6), rms_norm_ref(x, weight, 3e-6), "rms_norm"
    )
    out, new_residual = fused_add_rms_norm(x, residual, weight, 3e-6)
    ref_out, ref_new_residual = fused_add_rms_norm_ref(x, residual, weight, 3e-6)
    assert_bitwise_equal(out, ref_out, "out")
    assert_bitwise_equal(new_residual, ref_new_residual, "new_residual")


@requires_triton
def test_force_triton_env_dispatches_to_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARITY_FORCE_TRITON", "1")
    x, residual, weight = make_inputs((3, 40), torch.bfloat16)
    calls: list[str] = []
    ops = sys.modules[OPS_MODULE]
    real_rms, real_fused = ops.rms_norm_triton, ops.fused_add_rms_norm_triton

    def spy_rms(*args: object) -> torch.Tensor:
        calls.append("rms_norm")
        return real_rms(*args)  # type: ignore[no-any-return]

    def spy_fused(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append("fused")
        return real_fused(*args)  # type: ignore[no-any-return]

    monkeypatch.setattr(ops, "rms_norm_triton", spy_rms)
    monkeypatch.setattr(ops, "fused_add_rms_norm_triton", spy_fused)
    assert_bitwise_equal(
        rms_norm(x, weight, DEFAULT_EPS), real_rms(x, weight, DEFAULT_EPS), "rms_norm"
    )
    out, new_residual = fused_add_rms_norm(x, residual, weight, DEFAULT_EPS)
    ref_out, ref_new_residual = real_fused(x, residual, weight, DEFAULT_EPS)
    assert_bitwise_equal(out, ref_out, "out")
    assert_bitwise_equal(new_residual, ref_new_residual, "new_residual")
    assert calls == ["rms_norm", "fused"]


def test_fused_op_does_not_mutate_or_alias_inputs() -> None:
    x, residual, weight = make_inputs((4, 32), torch.bfloat16)
    before = [t.clone() for t in (x, residual, weight)]
    out, new_residual = fused_add_rms_norm(x, residual, weight, DEFAULT_EPS)
    for name, now, then in zip(("x", "residual", "weight"), (x, residual, weight), before):
        assert_bitwise_equal(now, then, f"{name} after the op")
    input_ptrs = {t.data_ptr() for t in (x, residual, weight)}
    assert out.data_ptr() not in input_ptrs
    assert new_residual.data_ptr() not in input_ptrs
    assert out.data_ptr() != new_residual.data_ptr()


def _capture_aot_graphs(
    fn: Callable[..., object], *args: torch.Tensor
) -> list[torch.fx.GraphModule]:
    """Compile fn with AOT autograd (functionalization on) and return its forward graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[torch.fx.GraphModule] = []

    def capture(
        gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]
    ) -> Callable[..., object]:
        graphs.append(gm)
        return make_boxed_func(gm.forward)  # type: ignore[no-any-return]

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=capture), fullgraph=True)
    compiled(*args)
    return graphs


def test_compiled_graph_has_one_fused_node_and_no_copy() -> None:
    x, residual, weight = make_inputs((4, 48), torch.float32)

    def layer(
        x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_add_rms_norm(x, residual, weight, DEFAULT_EPS)

    graphs = _capture_aot_graphs(layer, x, residual, weight)
    assert len(graphs) == 1
    nodes = [n for n in graphs[0].graph.nodes if n.op == "call_function"]
    targets = [str(n.target) for n in nodes]
    assert targets.count("parity.fused_add_rms_norm.default") == 1, targets
    assert not [t for t in targets if "copy" in t], targets
    # Only the op and the tuple unpacking around it.
    assert set(targets) <= {"parity.fused_add_rms_norm.default", "<built-in function getitem>"}


@pytest.mark.parametrize("force_triton", [False, True], ids=["torch", "triton"])
def test_opcheck(force_triton: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if force_triton:
        if TRITON_SKIP_REASON is not None:
            pytest.skip(TRITON_SKIP_REASON)
        monkeypatch.setenv("PARITY_FORCE_TRITON", "1")
    else:
        monkeypatch.delenv("PARITY_FORCE_TRITON", raising=False)
    x, residual, weight = make_inputs((3, 40), torch.float32)
    torch.library.opcheck(torch.ops.parity.rms_norm.default, (x, weight, DEFAULT_EPS))
    torch.library.opcheck(
        torch.ops.parity.fused_add_rms_norm.default, (x, residual, weight, 3e-6)
    )
