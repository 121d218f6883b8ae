"""Checkpoint loading as real checkpoints come: sharded safetensors with an index file, bf16 and
fp16 weights converted to the run's dtype, ``torch_dtype`` in the config; and each rank reading
only the slices it keeps (``reference_impl.engine.load_rank_model``) yet getting exactly what
cutting the fully loaded model would give it, in less memory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from reference_impl.engine import EngineSpec, load_rank_model
from reference_impl.loader import INDEX_FILE, CheckpointWeights, check_checkpoint, load_model
from reference_impl.parallel import ParallelState, apply_tp, split_stages
from scenarios.models import checkpoint
from scenarios.models.gguf import save_sharded

REPO = Path(__file__).resolve().parents[1]


def _state(tp: int, pp: int, tp_rank: int, pp_rank: int) -> ParallelState:
    """A rank's layout without a process group: sharding only reads the TP group's name."""
    group: Any = SimpleNamespace(group_name="tp")
    return ParallelState(pp_rank * tp + tp_rank, tp * pp, tp, pp, group if tp > 1 else None,
                         group if pp > 1 else None)


def _as_real(src: Path, out: Path, dtype: torch.dtype, shard_bytes: int) -> Path:
    """``src`` re-saved the way published checkpoints come: in ``dtype``, sharded with an index,
    ``torch_dtype`` (not ``dtype``) in config.json, no tokenizer files."""
    out.mkdir()
    state: dict[str, torch.Tensor] = {}
    for file in sorted(src.glob("*.safetensors")):
        state.update({k: v.to(dtype) for k, v in load_file(str(file)).items()})
    save_sharded(state, out, shard_bytes)
    config = json.loads((src / "config.json").read_text())
    config.pop("dtype", None)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def bf16_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llava (biases, a vision tower, 2 KV heads) in bf16, in shards of 64 KiB (a dozen files)."""
    return _as_real(checkpoint("tiny-llava"), tmp_path_factory.mktemp("ck") / "llava", torch.bfloat16, 64 * 1024)


def test_sharded_bf16_checkpoint_loads_converted_to_the_run_dtype(bf16_llava: Path) -> None:
    files = sorted(p.name for p in bf16_llava.glob("*.safetensors"))
    assert len(files) > 3 and (bf16_llava / INDEX_FILE).is_file()
    check_checkpoint(bf16_llava)
    model = load_model(bf16_llava, torch.float32)
    reference = load_model(checkpoint("tiny-llava"), torch.float32)
    for (name, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert p.dtype == torch.float32, name
        torch.testing.assert_close(p, q.to(torch.bfloat16).float(), rtol=0, atol=0, msg=name)


def test_fp16_weights_and_stale_files_outside_the_index(tmp_path: Path) -> None:
    """fp16 weights load into bf16; a safetensors file the index does not name is not read."""
    ck = _as_real(checkpoint("tiny-llama"), tmp_path / "ck", torch.float16, 256 * 1024)
    shutil.copy(checkpoint("tiny-qwen2") / "model.safetensors", ck / "stale.safetensors")
    model = load_model(ck, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    (ck / INDEX_FILE).write_text(json.dumps({"weight_map": {"model.norm.weight": "model-00009-of-00009.safetensors"}}))
    with pytest.raises(ValueError, match="names shards that are missing: model-00009-of-00009"):
        CheckpointWeights(ck)


@pytest.mark.parametrize("tp,pp", [(2, 2), (4, 1), (1, 2)])
def test_sliced_rank_model_equals_the_full_model_cut(bf16_llava: Path, tp: int, pp: int) -> None:
    """Every rank of tp x pp: reading only its slices gives exactly the tensors that loading the
    whole checkpoint and cutting it gives (tp4: KV heads replicated, 2 KV heads)."""
    spec = EngineSpec(str(bf16_llava), tp, pp)
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            state = _state(tp, pp, tp_rank, pp_rank)
            sliced = load_rank_model(spec, state, torch.device("cpu")).state_dict()
            full = apply_tp(split_stages(load_model(bf16_llava), pp, pp_rank), state).state_dict()
            assert sliced.keys() == full.keys()
            for name in full:
                assert sliced[name].shape == full[name].shape, name
                assert torch.equal(sliced[name], full[name]), f"rank {state.rank}: {name}"


# A checkpoint big enough that weights, not the Python runtime, dominate a rank's memory:
# 48M parameters (192 MiB in fp32), 96 MiB of bf16 on disk in 32 MiB shards.
_BIG = dict(vocab_size=16384, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=256)
# A rank's build may hold at most this many times the weights it keeps beyond its memory before
# the build (the bound: 1.5x the shard plus the runtime). One tensor of the source in its
# stored dtype and its fp32 conversion are in flight at a time, at most 32 MiB here.
SLICED_PEAK_FACTOR = 1.5

_PROBE = textwrap.dedent("""
    import sys, torch
    from types import SimpleNamespace
    from reference_impl.engine import EngineSpec, load_rank_model
    from reference_impl.config import load_config
    from reference_impl.loader import load_model, meta_model
    from reference_impl.parallel import ParallelState, apply_tp, split_stages
    path, mode = sys.argv[1], sys.argv[2]
    group = SimpleNamespace(group_name="tp")
    state = ParallelState(3, 4, 2, 2, group, group)  # tp rank 1 of the last of 2 stages
    meta_model(load_config(path))  # the runtime: what building a model imports (~80 MiB), no weights
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096
    before = rss()
    if mode == "sliced":
        model = load_rank_model(EngineSpec(path, 2, 2), state, torch.device("cpu"))
    else:
        model = apply_tp(split_stages(load_model(path), 2, 1), state)
    from harness.launch.worker import peak_rss_bytes
    peak = peak_rss_bytes()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(before, peak, weights)
""")


def _probe(path: Path, mode: str) -> tuple[int, int, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(path), mode], capture_output=True, text=True,
                         cwd=REPO, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
                         check=True, timeout=300)
    before, peak, weights = map(int, out.stdout.split()[-3:])
    return before, peak, weights


def test_a_rank_reads_only_its_slices(tmp_path: Path) -> None:
    import transformers as tf

    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = tf.LlamaForCausalLM(tf.LlamaConfig(**_BIG)).state_dict()
    state = {k: torch.randn(v.shape, dtype=torch.bfloat16) for k, v in shapes.items()}
    ck = tmp_path / "big"
    ck.mkdir()
    save_sharded(state, ck, 32 << 20)
    (ck / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16",
                                                **_BIG}))
    del state
    s_before, s_peak, s_weights = _probe(ck, "sliced")
    f_before, f_peak, f_weights = _probe(ck, "full")
    assert s_weights == f_weights  # the same rank keeps the same weights either way
    sliced, full = s_peak - s_before, f_peak - f_before
    assert sliced <= SLICED_PEAK_FACTOR * s_weights, (sliced >> 20, s_weights >> 20)
    assert full > 2 * sliced, (full >> 20, sliced >> 20)  # the whole checkpoint went through memory
