"""Planning a run: the cases of a matrix (setup x scenario, each against its baseline, plus the
oracle case per scenario), with a skip reason where a case cannot run here, and shards of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from harness.case import HF_BASELINE, ORACLE_SETUP, Case
from harness.matrix import Matrix
from harness.setup import ParallelSetup
from reference_impl.config import load_config
from reference_impl.runner import EngineConfig
from scenarios.models import resolve
from scenarios.registry import get_scenario


@dataclass(frozen=True)
class RunOptions:
    """How a run executes (the part of the command line that is not case selection)."""

    backend: str = "ray"  # "ray" | "mp"
    device: str = "cpu"
    dtype: str = "float32"
    baseline: str = "auto"  # "auto" | "hf" | a setup id
    model: str = "tiny-llava"
    policy: str = "auto"  # "auto" (outcome.policy_for) | "logprobs" | "exact" | "identical"
    seed: int = 0
    max_new_tokens: int = 16
    fresh_workers: bool = False
    mutation: str | None = None
    use_baseline_cache: bool = True
    localize: bool = True  # replay a failing case with activation capture (selftest turns it off)
    allow_confounded: bool = False  # accept an explicit baseline that differs in several features
    fit: bool = False  # --fit: move each setup's tp to the nearest the model takes (harness/fit.py)
    case_timeout: float | None = None  # seconds a case may run (None: harness.timeouts derives it)
    engine: str = "reference"  # --engine: the engine under test (harness.engines)
    # --requests FILE: a requests file (scenarios.request_file), run as the scenario file:<stem>
    requests_file: str | None = None
    # --repeat N: each case's candidate runs N times; a case whose verdict or outputs differ
    # between them is flaky, and fails (harness.repeat)
    repeat: int = 1
    # --max-num-seqs / --max-num-batched-tokens: the engine's batching limits in every setup
    # (None: harness.setup's defaults)
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None

    def __post_init__(self) -> None:
        from harness.engines import DEFAULT_ENGINE, get_engine

        get_engine(self.engine)
        if self.mutation is not None and self.engine != DEFAULT_ENGINE:
            raise ValueError(f"--mutation patches the reference engine's code; it cannot be combined with "
                             f"--engine {self.engine}")
        if self.backend not in ("ray", "mp"):
            raise ValueError(f"backend {self.backend!r}: choose 'ray' or 'mp'")
        if self.case_timeout is not None and not self.case_timeout > 0:
            raise ValueError(f"--case-timeout {self.case_timeout:g}: must be a positive number of seconds")
        if self.seed < 0:
            raise ValueError(f"--seed {self.seed}: must be >= 0")
        if self.mutation is not None and self.fresh_workers:
            raise ValueError("--mutation patches pooled workers; it cannot be combined with --fresh-workers")
        for flag, value in (("--max-num-seqs", self.max_num_seqs),
                            ("--max-num-batched-tokens", self.max_num_batched_tokens)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} {value}: must be >= 1")
        if self.repeat < 1:
            raise ValueError(f"--repeat {self.repeat}: must be >= 1 (the number of times each case runs)")


    def limits(self) -> EngineConfig:
        """The engine's batching limits in every setup of this run."""
        from harness.setup import engine_limits

        return engine_limits(self.max_num_seqs, self.max_num_batched_tokens)


@dataclass(frozen=True)
class PlannedCase:
    case: Case
    skip_reason: str | None = None


def available_devices(device: str) -> int | None:
    """How many ranks the device allows (None: no limit, CPU ranks are processes)."""
    if device == "cpu":
        return None
    import torch

    return torch.cuda.device_count()


# What ``--baseline ID`` must satisfy, named in the error when it does not.
BASELINE_RULE = ("a baseline must differ from the candidate in exactly one feature "
                 "(SP; TP/PP degrees; compile mode/partition; chunked prefill; dtype; device)")


def baseline_for(setup: ParallelSetup, choice: str, allow_confounded: bool = False) -> ParallelSetup | str:
    """The baseline of ``setup`` for ``--baseline choice`` ("auto" | "hf" | a setup id; an id
    without ``@<engine>`` runs on the candidate's engine, ``tp2-eager@reference`` on the named one).

    An explicit id must differ from ``setup`` in exactly one feature (``ParallelSetup.differences``),
    so that a failure points at that feature; more than one is refused (``ValueError``) unless
    ``allow_confounded``; none (the setup itself, which can never fail) is refused always.
    """
    if choice == "auto":
        # One eager device has no feature left to take away: its baseline is the oracle.
        if setup.world_size == 1 and setup.compile == "eager":
            return HF_BASELINE
        return setup.auto_baseline()
    if choice == HF_BASELINE:
        return HF_BASELINE
    base = ParallelSetup.parse(choice, setup.dtype, setup.device, setup.engine)
    diff = setup.differences(base)
    if not diff:
        raise ValueError(f"{BASELINE_RULE}; {setup.id} vs {base.id} differs in nothing: "
                         "it compares a setup with itself and can never fail")
    if len(diff) > 1 and not allow_confounded:
        raise ValueError(f"{BASELINE_RULE}; {setup.id} vs {base.id} differs in: {', '.join(diff)} "
                         "(--allow-confounded compares them anyway)")
    return base


def plan(matrix: Matrix, options: RunOptions, setups: Sequence[str] | None = None,
         scenarios: Sequence[str] | None = None) -> list[PlannedCase]:
    """Cases of ``matrix`` (optionally narrowed), each with a skip reason where it cannot run.
    On an engine other than the reference one, ``--baseline auto`` gives every setup two cases
    per scenario: against the same engine on one device, and against the reference engine in the
    same setup (``cross_engine``)."""
    chosen = list(setups) if setups else list(matrix.setups)
    setup_objs = [ParallelSetup.parse(s, options.dtype, options.device, options.engine) for s in chosen]
    names = scenario_names(matrix, options, scenarios)
    for name in names:
        get_scenario(name, options.requests_file)
    cfg = load_config(resolve(options.model))
    limit = available_devices(options.device)
    if options.fit:
        setup_objs = _fitted(setup_objs, cfg, limit)
    planned = []
    for setup in setup_objs:
        for name in names:
            case = Case(setup, baseline_for(setup, options.baseline, options.allow_confounded), name,
                        options.model)
            planned.append(PlannedCase(case, _skip_reason(case, cfg, limit, options.requests_file)))
            if (cross := cross_engine(case, options)) is not None:
                planned.append(PlannedCase(cross, _skip_reason(cross, cfg, limit, options.requests_file)))
    if matrix.oracle and not setups:
        planned += [PlannedCase(c, _skip_reason(c, cfg, limit, options.requests_file))
                    for c in oracle_cases(options, names)
                    if c.id not in {p.case.id for p in planned}]
    return planned


def cross_engine(case: Case, options: RunOptions) -> Case | None:
    """Under ``--baseline auto`` on an engine other than the reference one: the same setup and
    scenario against the reference engine (a one-device setup already has the oracle)."""
    from harness.engines import DEFAULT_ENGINE

    if options.baseline != "auto" or case.setup.engine == DEFAULT_ENGINE or case.setup.world_size == 1:
        return None
    return Case(case.setup, replace(case.setup, engine=DEFAULT_ENGINE), case.scenario, case.model)


def scenario_names(matrix: Matrix, options: RunOptions, scenarios: Sequence[str] | None = None) -> list[str]:
    """The run's scenarios: ``scenarios`` (else the matrix's), and a requests file's ``file:<stem>``;
    with a requests file and no ``scenarios``, the file's alone."""
    from scenarios.request_file import scenario_name

    if options.requests_file is None:
        return list(scenarios) if scenarios else list(matrix.scenarios)
    names = list(scenarios or [])
    own = scenario_name(options.requests_file)
    return names if own in names else [*names, own]


def oracle_cases(options: RunOptions, scenarios: Sequence[str]) -> list[Case]:
    """Per scenario: the one-device eager engine against Hugging Face transformers. Every other
    case compares the engine with itself, so a bug all setups share (the single-device code
    path) passes them all; this case fails it. (For the transformers engine it checks the
    adapter: its own forward passes against transformers' ``generate``.)"""
    setup = ParallelSetup.parse(ORACLE_SETUP, options.dtype, options.device, options.engine)
    return [Case(setup, HF_BASELINE, name, options.model) for name in scenarios]


def _fitted(setups: Sequence[ParallelSetup], cfg: Any, limit: int | None) -> list[ParallelSetup]:
    """``--fit``: each setup through ``fit_setup``; those that fit to one id run once, and a setup
    nothing fits stays as it is (planned as a skip with its reason)."""
    from harness.fit import fit_setup

    by_id: dict[str, ParallelSetup] = {}
    for setup in setups:
        fitted = fit_setup(setup, cfg, limit) or setup
        by_id.setdefault(fitted.id, fitted)
    return list(by_id.values())


def _skip_reason(case: Case, cfg: Any, limit: int | None, requests_file: str | None = None) -> str | None:
    from harness.engines import get_engine
    from reference_impl.parallel import validate_parallel

    reason = get_scenario(case.scenario, requests_file).skip_reason(cfg)
    if reason:
        return reason
    for setup in (case.setup, case.baseline):
        if not isinstance(setup, ParallelSetup):
            continue
        if (cannot := get_engine(setup.engine).unsupported(setup)) is not None:
            return f"{setup.id}: {cannot}"
        if limit is not None and setup.world_size > limit:
            return f"{setup.id} needs {setup.world_size} {setup.device} devices; {limit} available"
        try:
            validate_parallel(cfg, setup.tp, setup.pp)
        except ValueError as exc:
            return f"{setup.id} does not fit {case.model}: {exc}"
    return None
