"""``ParallelSetup``: one way of running the engine, with a stable id and an explicit baseline."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from reference_impl.compile.config import CompileConfig
from reference_impl.engine import EngineSpec
from reference_impl.runner import EngineConfig

if TYPE_CHECKING:
    from harness.engines.base import BuildSpec

# The engine's step budget in every setup: small enough that the scenarios' long prompt is
# chunked and steps mix prefill with decode.
MAX_NUM_BATCHED_TOKENS = 24
MAX_NUM_SEQS = 8
# The context every setup's KV cache holds per sequence (capped at the model's own): the longest
# scenario prompt (the real-text summary: 449 tokens with gsm-llama's tokenizer, ~190 with
# SmolLM2's) plus 16 generated tokens fits with room. Without the cap an 8192-context model
# (SmolLM2-135M) allocates 8 x 8192 positions of cache per layer: 3 GB in fp32 at tp1.
MAX_MODEL_LEN = 1024
# The features a baseline may take away, each with the fields that make it up (``differences``):
# a baseline that differs from its candidate in more than one confounds them in a failure.
_FEATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tp/pp", ("tp", "pp")),
    ("sp", ("sp", "sp_min_tokens")),
    ("compile", ("compile", "partition")),
    ("batching", ("chunked_prefill",)),
    ("dtype", ("dtype",)),
    ("device", ("device",)),
    ("engine", ("engine",)),
)
# The engine of a setup whose id names none (the reference engine's ids carry no suffix).
REFERENCE_ENGINE = "reference"


def engine_limits(max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None) -> EngineConfig:
    """The batching limits of every setup's engine: the defaults above, or those given (``parity run
    --max-num-seqs``/``--max-num-batched-tokens``; the fuzzer draws them)."""
    return EngineConfig(max_num_seqs or MAX_NUM_SEQS, max_num_batched_tokens or MAX_NUM_BATCHED_TOKENS,
                        max_model_len=MAX_MODEL_LEN)


@dataclass(frozen=True)
class ParallelSetup:
    """A way to run the engine.

    tp: tensor-parallel size. pp: pipeline-parallel size. sp: the sequence-parallelism compile
    pass (needs compile != eager and tp > 1). compile: "eager" | "graph" | "inductor".
    partition: "full" | "piecewise" (compiled setups only). chunked_prefill: split long
    prompts over steps. sp_min_tokens: SP only for steps of at least this many tokens.
    dtype: "float32" | "bfloat16". device: "cpu" | "cuda". engine: the engine under test
    (``harness.engines``: "reference", or "transformers"; the id ends in ``@<engine>`` for any
    but the reference engine). Whether an engine can express the setup is its ``unsupported``
    (a skip reason at planning), not a construction error.
    """

    tp: int = 1
    pp: int = 1
    sp: bool = False
    compile: str = "eager"
    partition: str = "full"
    chunked_prefill: bool = True
    sp_min_tokens: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    engine: str = REFERENCE_ENGINE

    def __post_init__(self) -> None:
        # The engine's configs check every field they carry (``EngineSpec``: degrees, dtype
        # against the engine's dtype table, device; ``CompileConfig``: mode, partition, SP);
        # building them is the validation. A setup adds only its own rule.
        self.engine_spec(checkpoint="")
        from harness.engines import get_engine

        get_engine(self.engine)
        if self.sp and self.tp == 1:
            raise ValueError("sp needs tp > 1: with one TP rank there is nothing to shard")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def id(self) -> str:
        """Stable id, e.g. ``tp2-pp2-sp-graph-full``, ``tp2-eager``, ``tp1-pp1-eager``."""
        parts = [f"tp{self.tp}"]
        if self.pp > 1 or self.tp == 1:
            parts.append(f"pp{self.pp}")
        if self.sp:
            parts.append("sp")
        parts.append(self.compile)
        if self.compile != "eager":
            parts.append(self.partition)
        if self.sp_min_tokens:
            parts.append(f"spmin{self.sp_min_tokens}")
        if not self.chunked_prefill:
            parts.append("nochunk")
        engine = "" if self.engine == REFERENCE_ENGINE else f"@{self.engine}"
        return "-".join(parts) + engine

    @property
    def layout_id(self) -> str:
        """The id without the engine: ``tp2-eager@transformers`` -> ``tp2-eager``."""
        return replace(self, engine=REFERENCE_ENGINE).id

    def __str__(self) -> str:
        return self.id

    def baseline(self) -> ParallelSetup:
        """The same setup without SP, and nothing else changed."""
        return replace(self, sp=False, sp_min_tokens=0)

    def single_device(self) -> ParallelSetup:
        """This setup at tp=1, pp=1: same compile mode, partition, batching, dtype and device."""
        return replace(self, tp=1, pp=1, sp=False, sp_min_tokens=0)

    def auto_baseline(self) -> ParallelSetup:
        """``--baseline auto``: the setup with exactly one feature taken away, so that a failure
        points at that feature. SP setups against SP off; TP/PP setups against one device with the
        same compile mode (a compiled TP setup against eager would mix compiler numerics into the
        parallelism check: inductor in bf16 rounds differently from eager); a one-device compiled
        setup against one-device eager."""
        if self.sp:
            return self.baseline()
        if self.world_size > 1:
            return self.single_device()
        return replace(self, compile="eager", partition="full")

    def differences(self, other: ParallelSetup) -> list[str]:
        """The features in which ``other`` differs from this setup, in a fixed order: "tp/pp"
        (degrees), "sp" (SP and its minimum step size), "compile" (mode and partition),
        "batching" (chunked prefill), "dtype", "device", "engine". A baseline should differ in
        exactly one (a cross-engine baseline: the same setup on another engine)."""
        return [name for name, fields in _FEATURES
                if any(getattr(self, f) != getattr(other, f) for f in fields)]

    def engine_spec(self, checkpoint: str, engine: EngineConfig | None = None) -> EngineSpec:
        """The engine of this setup; ``engine`` replaces the default batching limits (its
        ``chunked_prefill`` is this setup's either way)."""
        limits = engine or engine_limits()
        return EngineSpec(
            checkpoint, self.tp, self.pp, self.dtype, self.device,
            replace(limits, chunked_prefill=self.chunked_prefill),
            CompileConfig(self.compile, self.partition, self.sp, self.sp_min_tokens),
        )

    def build_spec(self, checkpoint: str, engine: EngineConfig | None = None) -> BuildSpec:
        """What a rank builds for this setup on its engine (``engine_spec`` for the reference
        engine; ``engine``: the reference engine's batching limits, which others ignore)."""
        from harness.engines import get_engine

        return get_engine(self.engine).spec(self, checkpoint, engine)

    @classmethod
    def parse(cls, setup_id: str, dtype: str = "float32", device: str = "cpu",
              engine: str = REFERENCE_ENGINE) -> ParallelSetup:
        """Inverse of ``id``: ``tp2-pp2-sp-graph-piecewise`` -> ParallelSetup(...); an id without
        ``@<engine>`` takes ``engine``."""
        m = _ID.fullmatch(setup_id)
        if m is None:
            raise ValueError(
                f"malformed setup id {setup_id!r}: expected tp<N>[-pp<N>][-sp]-<eager|graph|inductor>"
                "[-<full|piecewise>][-spmin<N>][-nochunk][@<engine>], e.g. tp2-pp2-sp-graph-full, "
                "tp2-eager@transformers"
            )
        compile_mode = m["compile"]
        return cls(
            tp=int(m["tp"]), pp=int(m["pp"] or 1), sp=bool(m["sp"]), compile=compile_mode,
            partition=m["partition"] or "full", chunked_prefill=not m["nochunk"],
            sp_min_tokens=int(m["spmin"] or 0), dtype=dtype, device=device, engine=m["engine"] or engine,
        )


_ID = re.compile(
    r"tp(?P<tp>\d+)(?:-pp(?P<pp>\d+))?(?P<sp>-sp)?-(?P<compile>eager|graph|inductor)"
    r"(?:-(?P<partition>full|piecewise))?(?:-spmin(?P<spmin>\d+))?(?P<nochunk>-nochunk)?(?:@(?P<engine>[a-z]+))?"
)
