"""Named matrices: sets of (setup, scenario) cases."""

from __future__ import annotations

from dataclasses import dataclass

from harness.setup import ParallelSetup
from scenarios.registry import SCENARIOS

ALL_SCENARIOS = tuple(SCENARIOS)


@dataclass(frozen=True)
class Matrix:
    name: str
    description: str
    setups: tuple[str, ...]
    scenarios: tuple[str, ...] = ALL_SCENARIOS
    device: str = "cpu"
    dtype: str = "float32"
    # Add the oracle case per scenario (harness.plan.oracle_cases): the one-device engine
    # against Hugging Face transformers, so that a bug every setup shares still fails the gate.
    oracle: bool = True
    # The model a run of this matrix uses when none is given (``--model``).
    model: str = "tiny-llava"

    def parsed_setups(self, dtype: str | None = None, device: str | None = None) -> list[ParallelSetup]:
        return [ParallelSetup.parse(s, dtype or self.dtype, device or self.device) for s in self.setups]


# SmolLM2-135M has 9 attention heads and 3 KV heads: TP degree 3 (tp2 and tp4 do not divide 9).
_REAL_SETUPS = ("tp3-eager", "tp3-sp-graph-full", "tp3-sp-graph-piecewise", "tp1-pp2-eager", "tp3-pp2-eager",
                "tp3-pp2-sp-graph-full", "tp3-pp2-sp-graph-piecewise")
_SP_PAIRS = ("tp2-sp-graph-full", "tp2-sp-graph-piecewise", "tp2-pp2-sp-graph-full", "tp2-pp2-sp-graph-piecewise")

MATRICES: dict[str, Matrix] = {
    m.name: m for m in (
        Matrix("smoke", "PR gate, minutes on 2 CPU cores: TP, TP+PP and their SP variants, both partitions, "
               "tp4 (KV heads replicated: tiny-llava has 2) and PP+SP with an SP token threshold between "
               "the prefill and decode step sizes (vLLM's tests force it to 0)",
               ("tp2-eager", "tp2-pp2-eager", "tp4-eager") + _SP_PAIRS + ("tp2-pp2-sp-graph-full-spmin16",)),
        Matrix("nightly", "the full cross product that fits the device",
               ("tp2-eager", "tp4-eager", "tp1-pp2-eager", "tp2-pp2-eager", "tp2-graph-full",
                "tp4-sp-graph-full", "tp2-sp-inductor-full", "tp2-pp2-sp-inductor-full",
                "tp2-pp2-sp-graph-full-spmin16", "tp2-sp-graph-full-nochunk") + _SP_PAIRS),
        Matrix("gpu2", "two GPUs: TP and SP, graph and inductor", (
            "tp2-eager", "tp2-sp-graph-full", "tp2-sp-graph-piecewise", "tp2-sp-inductor-full",
            "tp2-sp-inductor-piecewise"), device="cuda", dtype="bfloat16"),
        Matrix("gpu4", "four GPUs: TP x PP with SP, graph and inductor", (
            "tp2-pp2-eager", "tp2-pp2-graph-full", "tp2-pp2-inductor-full",
            "tp2-pp2-sp-graph-full", "tp2-pp2-sp-inductor-full",
            "tp2-pp2-sp-graph-piecewise", "tp2-pp2-sp-inductor-piecewise"), device="cuda", dtype="bfloat16"),
        Matrix("real", "a real small checkpoint with its tokenizer and real text (SmolLM2-135M-Instruct, the "
               "'real' extra): tp3, tp1-pp2, tp3-pp2, and tp3[-pp2]-sp with both partitions, on CPU",
               _REAL_SETUPS, ("text", "prompt_embeds", "mixed"), model="smollm2-135m"),
    )
}


def get_matrix(name: str) -> Matrix:
    if name not in MATRICES:
        raise ValueError(f"unknown matrix {name!r}: choose from {', '.join(MATRICES)}")
    return MATRICES[name]
