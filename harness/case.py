"""A case (setup x scenario x model, against a baseline) and its result record."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from harness.setup import ParallelSetup

STATUSES = ("pass", "fail", "error", "skip")
# Record keys newer than the result-file format: written only when set, and optional on reading.
OPTIONAL_KEYS = ("divergences", "texts", "repeat")
HF_BASELINE = "hf"
# The oracle case of every gate: the one-device eager engine against Hugging Face transformers.
ORACLE_SETUP = "tp1-pp1-eager"


def is_oracle(setup_id: str, baseline_id: str) -> bool:
    """Whether a case is the oracle case (it checks the engine, but no parallelism), on any engine
    (``tp1-pp1-eager@transformers`` against ``hf`` too)."""
    return setup_id.split("@")[0] == ORACLE_SETUP and baseline_id == HF_BASELINE


@dataclass(frozen=True)
class Case:
    """Run ``setup`` on ``scenario``'s requests for ``model`` and compare with ``baseline``
    (another setup, or ``"hf"``: Hugging Face transformers at tp=1)."""

    setup: ParallelSetup
    baseline: ParallelSetup | str
    scenario: str
    model: str

    @property
    def baseline_id(self) -> str:
        return self.baseline if isinstance(self.baseline, str) else self.baseline.id

    @property
    def cross_engine(self) -> bool:
        """Whether the baseline runs on another engine than the candidate (same setup otherwise)."""
        return isinstance(self.baseline, ParallelSetup) and self.baseline.engine != self.setup.engine

    @property
    def id(self) -> str:
        """``<setup>-<scenario>`` plus the model, e.g. ``tiny-llava/tp2-sp-graph-full-text``; a
        cross-engine case ends in ``-vs-<baseline engine>`` (``tiny-qwen2/tp2-eager@transformers-
        text-vs-reference``), so that it and the same setup against one device differ."""
        suffix = f"-vs-{self.baseline.engine}" if isinstance(self.baseline, ParallelSetup) and self.cross_engine else ""
        return f"{self.model}/{self.setup.id}-{self.scenario}{suffix}"


@dataclass
class CaseResult:
    """One line of ``results.jsonl`` and one entry of ``summary.json``'s ``cases``."""

    id: str
    setup: str
    baseline: str
    scenario: str
    model: str
    status: str  # "pass" | "fail" | "error" | "skip"
    reason: str = ""
    first_divergence: dict[str, Any] | None = None
    localization: dict[str, Any] | None = None
    # Per rank and compiled step graph: SP matches by pattern and collectives left (outcome.sp_matches).
    sp_matches: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    # Optional (records written before it lack the key): per request with a failing divergence,
    # its first failing divergence with both token streams (``harness.divergences``).
    divergences: list[dict[str, Any]] | None = None
    # Optional: with a tokenizer, per request its prompt and both sides' generated text
    # (``harness.divergences.text_records``).
    texts: list[dict[str, Any]] | None = None
    # Optional (``--repeat N`` only): the case's N repeats, ``{"n", "statuses", "flaky",
    # "differences", "seconds"}`` (``harness.repeat``).
    repeat: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} not in {STATUSES}")

    @classmethod
    def for_case(cls, case: Case, status: str, **fields: Any) -> CaseResult:
        return cls(case.id, case.setup.id, case.baseline_id, case.scenario, case.model, status, **fields)

    def to_json(self) -> dict[str, Any]:
        """The record; optional keys added after the format was first published
        (``OPTIONAL_KEYS``) only when they hold something."""
        data = asdict(self)
        return {k: v for k, v in data.items() if not (k in OPTIONAL_KEYS and v is None)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CaseResult:
        return cls(**data)
