"""Build one rank's engine: keep this stage, read this rank's shards of the checkpoint, wrap in a runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from reference_impl.compile.config import CompileConfig, pad_to_bucket, token_buckets
from reference_impl.config import load_config
from reference_impl.loader import DTYPES, CheckpointWeights, check_complete, materialize, meta_model
from reference_impl.model import CausalLM
from reference_impl.parallel import ParallelState, apply_tp, init_parallel, split_stages, validate_parallel
from reference_impl.parallel.pipeline import PipelineComm
from reference_impl.runner import EngineConfig, LocalComm, Runner, StageComm

DEVICES = ("cpu", "cuda")


def check_dtype_and_device(dtype: str, device: str) -> None:
    """Raise ``ValueError`` naming the choices when ``dtype`` or ``device`` is not one parity runs."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose from {', '.join(DTYPES)}")
    if device not in DEVICES:
        raise ValueError(f"device={device!r}: choose from {', '.join(DEVICES)}")


@dataclass(frozen=True)
class EngineSpec:
    """Everything a rank needs to build its part of the engine; identical on every rank.

    Checked on construction, field by field (``compile`` checks itself: ``CompileConfig``);
    ``validate`` adds what needs the checkpoint's config and the devices present.
    """

    checkpoint: str
    tp: int = 1
    pp: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    engine: EngineConfig = field(default_factory=EngineConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp={self.tp} and pp={self.pp} must be >= 1")
        check_dtype_and_device(self.dtype, self.device)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def validate(self, num_devices: int | None = None) -> None:
        """Reject a layout the checkpoint's model or the devices present cannot take, before any
        process starts."""
        validate_parallel(load_config(Path(self.checkpoint)), self.tp, self.pp, self.device, num_devices)


def local_device(kind: str, rank: int) -> torch.device:
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", rank % torch.cuda.device_count())


def load_rank_model(spec: EngineSpec, state: ParallelState, rank_device: torch.device) -> CausalLM:
    """This rank's part of the model, reading only what it keeps: the structure on the meta device,
    cut to the rank's pipeline stage, its TP shards read as slices of the checkpoint's tensors, then
    the rest of the stage (norms; everything at tp=1) read whole. Never the full checkpoint."""
    cfg = load_config(Path(spec.checkpoint))
    weights = CheckpointWeights(spec.checkpoint, spec.torch_dtype, rank_device, tied=cfg.text.tie_word_embeddings)
    model = meta_model(cfg)
    check_complete(model, weights)
    model = split_stages(model, spec.pp, state.pp_rank)
    model = apply_tp(model, state, weights)
    return materialize(model, weights).eval()


def build_runner(spec: EngineSpec, rank_device: torch.device) -> Runner:
    """This rank's runner. Needs the default process group when ``world_size > 1``."""
    state = init_parallel(spec.tp, spec.pp)
    model = load_rank_model(spec, state, rank_device)
    comm: StageComm = LocalComm()
    if spec.pp > 1:
        comm = PipelineComm(state, model.cfg.text.hidden_size, spec.torch_dtype, rank_device, spec.compile)
    runner = Runner(model, spec.engine, comm, state=state)
    if spec.compile.mode != "eager":
        from reference_impl.compile.compiled_model import CompiledModel

        runner.model_fn = CompiledModel(model, spec.compile, state, spec.torch_dtype, rank_device)
        # Buckets up to the context length: a whole-prompt replay (localization) is one step.
        max_tokens = max(spec.engine.max_num_batched_tokens + spec.engine.max_num_seqs, runner.max_model_len)
        buckets = token_buckets(spec.tp, max_tokens)
        runner.pad_tokens = lambda n: pad_to_bucket(n, buckets)
    return runner
