"""Single-process unit tests of compile pieces: configs, buckets, the no-op pass, the
residual-rows op, the piecewise split."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from reference_impl.compile.config import CompileConfig, pad_to_bucket, sp_active, token_buckets
from reference_impl.compile.passes import NoOpEliminationPass
from reference_impl.compile.sp_ops import residual_rows


def test_compile_config_validation() -> None:
    with pytest.raises(ValueError, match="compile mode 'jit'"):
        CompileConfig(mode="jit")
    with pytest.raises(ValueError, match="partition 'half'"):
        CompileConfig(mode="graph", partition="half")
    with pytest.raises(ValueError, match="sequence parallelism is a compile pass"):
        CompileConfig(mode="eager", sp=True)


def test_sp_active_threshold() -> None:
    cfg = CompileConfig(mode="graph", sp=True, sp_min_tokens=16)
    assert sp_active(16, 2, cfg) and not sp_active(8, 2, cfg)
    assert not sp_active(64, 1, cfg)  # tp=1: nothing to shard
    assert not sp_active(64, 2, CompileConfig(mode="graph"))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_buckets_are_multiples_of_tp_and_cover(tp: int) -> None:
    buckets = token_buckets(tp, 32)
    assert all(b % tp == 0 for b in buckets) and buckets == sorted(set(buckets))
    for n in range(1, 33):
        padded = pad_to_bucket(n, buckets)
        assert padded >= n and padded % tp == 0
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        pad_to_bucket(buckets[-1] + 1, buckets)


def test_noop_elimination_removes_only_shape_keeping_ops() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        a = x[0:8]  # full extent: no-op
        b = a.view(8, 4)  # same shape: no-op
        c = b[0:4]  # a real slice
        return c.reshape(2, 8)  # a real reshape

    gm = make_fx(fn, tracing_mode="fake")(torch.randn(8, 4))
    x = torch.randn(8, 4)
    want = gm(x)
    removed = NoOpEliminationPass()(gm)
    gm.recompile()
    assert removed == 2
    torch.testing.assert_close(gm(x), want, rtol=0, atol=0)


def test_residual_rows_full_or_sharded() -> None:
    full = torch.arange(8.0)[:, None].repeat(1, 3)  # (8, 3), row i holds i
    assert residual_rows(full, 8, 2, 1)[:, 0].tolist() == [4, 5, 6, 7]
    shard = full[:4]
    assert torch.equal(residual_rows(shard, 8, 2, 1), shard)  # already sharded: unchanged
    with pytest.raises(RuntimeError, match="residual has 3 rows; expected 8 .full. or 4"):
        residual_rows(full[:3], 8, 2, 0)


@pytest.fixture
def single_rank_group() -> Iterator[str]:
    """A one-rank gloo group: enough to trace and rewrite SP patterns in this process."""
    import torch.distributed as dist

    from harness.launch.base import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield str(dist.new_group([0]).group_name)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("eps", [1e-5, 1e-6, 3e-6, 1e-2])
def test_sp_patterns_match_any_epsilon(single_rank_group: str, eps: float) -> None:
    """vLLM registers its SP patterns for 1e-5 and 1e-6 only and silently skips other models."""
    from reference_impl.compile.passes import SequenceParallelismPass
    from reference_impl.compile.passes.sequence_parallel import trace_fake
    from reference_impl.kernels import ops
    from reference_impl.parallel import collectives

    group = single_rank_group

    def layer(p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = collectives.all_reduce(p0, group)  # embedding -> first norm
        h = ops.rms_norm(x, w, eps)
        h, r = ops.fused_add_rms_norm(collectives.all_reduce(p1 * h, group), x, w, eps)  # middle
        out, _ = ops.fused_add_rms_norm(collectives.all_reduce(p2 * h, group), r, w, eps)  # final
        return out

    t = [torch.randn(8, 16) for _ in range(3)]
    gm = trace_fake(layer, (*t, torch.randn(16)))
    sp = SequenceParallelismPass(1, 0, group, torch.float32, torch.device("cpu"))
    assert sp(gm) == 3
    assert sp.last_counts == {"first": 1, "middle": 1, "final": 1}
    gm.recompile()
    norms = [n for n in gm.graph.nodes if n.op == "call_function"
             and str(n.target) in ("parity.rms_norm.default", "parity.fused_add_rms_norm.default")]
    assert [n.args[-1] for n in norms] == [eps] * 3  # every replacement keeps the graph's epsilon



@pytest.mark.parametrize("mode", ["graph", "inductor"])
def test_side_effect_ops_stay_in_compiled_graphs(mode: str) -> None:
    """``parity::attention`` writes the KV cache and ``parity::capture`` the capture store, state
    their arguments do not name, so both are declared ``mutates_args=()`` (the comments above
    them say why that is safe). Compiled, the graph keeps one of each per layer, and a prefill
    leaves the KV cache and captures the activations that eager does, up to compiler rounding
    (the localizer's activation tolerance: a lost or misplaced write is off by whole values)."""
    from harness.localize import ACTIVATION_RTOL
    from reference_impl.capture import STORE
    from reference_impl.compile.compiled_model import compile_records
    from reference_impl.config import load_config
    from reference_impl.engine import EngineSpec, build_runner
    from reference_impl.requests import Request
    from scenarios.models import checkpoint

    def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
        scale = want.abs().max().item()
        assert scale > 0, "eager wrote nothing"
        return (got - want).abs().max().item() / scale

    ckpt = str(checkpoint("tiny-llama"))
    layers = load_config(ckpt).text.num_layers
    requests = [Request("a", tuple(range(3, 20))), Request("b", tuple(range(40, 47)))]
    cpu, rtol = torch.device("cpu"), ACTIVATION_RTOL["float32"]
    eager = build_runner(EngineSpec(ckpt), cpu)
    compiled = build_runner(EngineSpec(ckpt, compile=CompileConfig(mode)), cpu)
    want, got = eager.capture_prefill(requests), compiled.capture_prefill(requests)
    assert not STORE  # capture_prefill hands the store over and clears it
    [record] = compile_records(compiled.model_fn)  # one step size, one graph
    assert record["ops_after"].get("parity.attention.default") == layers, record["ops_after"]
    assert record["ops_after"].get("parity.capture.default") == layers, record["ops_after"]
    assert sorted(got) == sorted(want) and len(want) == 2 * layers + 2  # + num_tokens, offsets
    errors = {name: relative_error(got[name], want[name]) for name in want if want[name].is_floating_point()}
    for name, cache in eager.kv_caches.items():
        errors[f"{name}.k"] = relative_error(compiled.kv_caches[name].k, cache.k)
        errors[f"{name}.v"] = relative_error(compiled.kv_caches[name].v, cache.v)
    assert max(errors.values()) <= rtol, {k: f"{v:.1e}" for k, v in errors.items() if v > rtol}
