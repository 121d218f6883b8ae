"""The SP speed benchmark's code path on CPU (gloo, a 64-wide stack): it runs, times both engines
and checks that the SP pass really rewrote the graph it times."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reference_impl.compile import bench_sp


def test_bench_sp_runs_and_times_a_rewritten_graph(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sp.json"
    assert bench_sp.main(["--device", "cpu", "--dtype", "float32", "--tokens", "64", "--seq-len", "32",
                          "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2",
                          "--vocab", "256", "--mode", "graph", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["tokens"]["64"]
    assert row["tp_ms"] > 0 and row["sp_ms"] > 0
    assert set(row["collectives"]) == {"all_reduce", "reduce_scatter", "all_gather"}
    assert result["sp_middle_matches"]["64"] > 0  # the SP timing is of an SP graph
    assert "| 64 |" in capsys.readouterr().out


def test_bench_sp_rejects_sizes_that_do_not_split() -> None:
    with pytest.raises(SystemExit):
        bench_sp.main(["--device", "cpu", "--tokens", "100", "--seq-len", "32"])


def test_kernel_categories() -> None:
    assert bench_sp.category("ncclDevKernel_AllReduce_Sum_bf16_RING_LL") == "all-reduce"
    assert bench_sp.category("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL") == "reduce-scatter"
    assert bench_sp.category("ncclDevKernel_AllGather_RING_LL") == "all-gather"
    assert bench_sp.category("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NTT") == "gemm"
    assert bench_sp.category("fmha_cutlassF_bf16_aligned_64x128_rf_sm80") == "attention"
    assert bench_sp.category("triton_red_fused_add_mean_mul_pow_rsqrt_0") == "triton"
    assert bench_sp.category("some_kernel") == "other"
