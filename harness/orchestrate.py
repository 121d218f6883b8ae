"""Runs cases: plans them from a matrix, gets baseline and candidate outputs from pooled
workers, compares, and records each result as soon as it is known."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from harness import outcome
from harness.baseline import BaselineCache, hf_generate
from harness.case import HF_BASELINE, ORACLE_SETUP, Case, CaseResult
from harness.compare import compare
from harness.launch.base import EngineRun, Launcher, WorkerError
from harness.localize import localize, merge_captures
from harness.matrix import Matrix
from harness.mutations import get_mutation
from harness.setup import ParallelSetup
from reference_impl.config import load_config
from reference_impl.requests import Request, RequestOutput
from scenarios.models import cache_root, resolve
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

    def __post_init__(self) -> None:
        if self.backend not in ("ray", "mp"):
            raise ValueError(f"backend {self.backend!r}: choose 'ray' or 'mp'")


_T = TypeVar("_T")


class _CaseOutcome(Exception):
    """A case ended before its comparison: ``status`` ("fail" | "error") and why."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


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
    """The baseline of ``setup`` for ``--baseline choice`` ("auto" | "hf" | a setup id).

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
    base = ParallelSetup.parse(choice, setup.dtype, setup.device)
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
    """Cases of ``matrix`` (optionally narrowed), each with a skip reason where it cannot run."""
    chosen = list(setups) if setups else list(matrix.setups)
    setup_objs = [ParallelSetup.parse(s, options.dtype, options.device) for s in chosen]
    names = list(scenarios) if scenarios else list(matrix.scenarios)
    for name in names:
        get_scenario(name)
    cfg = load_config(resolve(options.model))
    limit = available_devices(options.device)
    if options.fit:
        setup_objs = _fitted(setup_objs, cfg, limit)
    planned = []
    for setup in setup_objs:
        for name in names:
            case = Case(setup, baseline_for(setup, options.baseline, options.allow_confounded), name,
                        options.model)
            planned.append(PlannedCase(case, _skip_reason(case, cfg, limit)))
    if matrix.oracle and not setups:
        planned += [PlannedCase(c, _skip_reason(c, cfg, limit)) for c in oracle_cases(options, names)
                    if c.id not in {p.case.id for p in planned}]
    return planned


def oracle_cases(options: RunOptions, scenarios: Sequence[str]) -> list[Case]:
    """Per scenario: the one-device eager engine against Hugging Face transformers. Every other
    case compares the engine with itself, so a bug all setups share (the single-device code
    path) passes them all; this case fails it."""
    setup = ParallelSetup.parse(ORACLE_SETUP, options.dtype, options.device)
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


def _skip_reason(case: Case, cfg: Any, limit: int | None) -> str | None:
    from reference_impl.parallel import validate_parallel

    reason = get_scenario(case.scenario).skip_reason(cfg)
    if reason:
        return reason
    for setup in (case.setup, case.baseline):
        if not isinstance(setup, ParallelSetup):
            continue
        if limit is not None and setup.world_size > limit:
            return f"{setup.id} needs {setup.world_size} {setup.device} devices; {limit} available"
        try:
            validate_parallel(cfg, setup.tp, setup.pp)
        except ValueError as exc:
            return f"{setup.id} does not fit {case.model}: {exc}"
    return None


def _requests_of(rows: list[int], captured: dict[str, Any]) -> list[int]:
    """Indices of the requests whose prompt rows (per the capture's offsets) include ``rows``."""
    offsets = [int(x) for x in captured.get("offsets", [])]
    return sorted({i for r in rows for i in range(len(offsets) - 1) if offsets[i] <= r < offsets[i + 1]})


def shard(planned: list[PlannedCase], index: int, count: int) -> list[PlannedCase]:
    """Cases ``index, index + count, ...`` (``--shard I/N`` with 0 <= I < N)."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= I < N")
    return planned[index::count]


@dataclass
class LauncherPool:
    """Launchers per world size, reused across cases (``fresh_workers``: new ones per run)."""

    backend: str
    device: str
    fresh_workers: bool = False
    mutation: str | None = None  # applied inside every worker this pool starts
    _launchers: dict[int, Launcher] = field(default_factory=dict)

    def get(self, world_size: int) -> Launcher:
        if world_size == 1 and self.mutation is None:
            from harness.launch.inprocess import InProcessLauncher

            return self._launchers.setdefault(1, InProcessLauncher(self.device))
        if world_size not in self._launchers:
            launcher = self._new(world_size)
            if self.mutation is not None:
                launcher.call("mutate", self.mutation)
            self._launchers[world_size] = launcher
        return self._launchers[world_size]

    def _new(self, world_size: int) -> Launcher:
        if self.backend == "ray":
            from harness.launch.ray_launcher import RayLauncher

            return RayLauncher(world_size, self.device, fresh_workers=self.fresh_workers)
        from harness.launch.mp import MpLauncher

        return MpLauncher(world_size, self.device)

    def run(self, setup: ParallelSetup, checkpoint: str, requests: list[Request]) -> list[RequestOutput]:
        """Rank 0's outputs of ``setup`` on ``requests``."""
        return self.run_traced(setup, checkpoint, requests).outputs

    def run_traced(self, setup: ParallelSetup, checkpoint: str, requests: list[Request]) -> EngineRun:
        """``setup`` on ``requests``: the outputs and every rank's report."""
        launcher = self.get(setup.world_size)
        try:
            return launcher.run_traced(setup.engine_spec(checkpoint), requests)
        except WorkerError:
            self.drop(setup.world_size)
            raise
        finally:
            if self.fresh_workers and self.backend == "mp" and setup.world_size > 1:
                self.drop(setup.world_size)

    def capture(self, setup: ParallelSetup, checkpoint: str, requests: list[Request]) -> list[dict[str, Any]]:
        """Every rank's activations of the requests' prefill under ``setup``."""
        launcher = self.get(setup.world_size)
        try:
            out: list[dict[str, Any]] = launcher.call("capture", setup.engine_spec(checkpoint), requests)
        except WorkerError:
            self.drop(setup.world_size)
            raise
        return out

    def devices_to_start(self, world_size: int) -> int:
        """Devices that ``get(world_size)`` would newly reserve (0: held already, or in-process)."""
        if world_size in self._launchers or (world_size == 1 and self.mutation is None):
            return 0
        return world_size

    def devices_held(self) -> int:
        """Devices reserved by this pool's rank processes (the in-process launcher reserves none)."""
        return sum(ws for ws, launcher in self._launchers.items() if ws > 1 or self.mutation is not None)

    def drop(self, world_size: int) -> None:
        launcher = self._launchers.pop(world_size, None)
        if launcher is not None:
            launcher.close()

    def close(self) -> None:
        for ws in list(self._launchers):
            self.drop(ws)


class Orchestrator:
    """Runs cases one by one and hands every result to ``on_result`` as soon as it is final."""

    def __init__(self, options: RunOptions, pool: LauncherPool | None = None) -> None:
        self.options = options
        if options.mutation is not None and options.fresh_workers:
            raise ValueError("--mutation patches pooled workers; it cannot be combined with --fresh-workers")
        self.pool = pool or LauncherPool(options.backend, options.device, options.fresh_workers, options.mutation)
        # Baselines come from clean workers, except under a mutation of code every setup shares,
        # which a real engine's baselines would carry too (only the oracle case can tell).
        shared = options.mutation is not None and get_mutation(options.mutation).shared
        self.baseline_pool = self.pool if options.mutation is None or shared else LauncherPool(
            options.backend, options.device, options.fresh_workers)
        self.cache = BaselineCache(cache_root() / "baselines")
        self.checkpoint = str(resolve(options.model))
        self._requests: dict[str, list[Request]] = {}

    def requests(self, scenario: str) -> list[Request]:
        """The scenario's requests, built once per run (every setup and every replay gets the same)."""
        if scenario not in self._requests:
            self._requests[scenario] = get_scenario(scenario).requests(
                Path(self.checkpoint), self.options.dtype, self.options.seed, self.options.max_new_tokens)
        return list(self._requests[scenario])

    def baseline_outputs(self, case: Case, requests: list[Request]) -> list[RequestOutput]:
        spec = case.baseline if isinstance(case.baseline, str) else case.baseline.engine_spec(self.checkpoint)
        key = BaselineCache.key(self.checkpoint, requests, spec, self.options.dtype, self.options.device)
        # A mutated baseline pool (a shared mutation) must neither read nor write the cache of
        # clean baselines.
        cached = self.options.use_baseline_cache and self.baseline_pool.mutation is None
        if cached and (hit := self.cache.get(key)) is not None:
            return hit
        if isinstance(case.baseline, str):
            outputs = hf_generate(self.checkpoint, requests, self.options.dtype, self.options.device)
        else:
            self._make_room(self.baseline_pool, case.baseline)
            outputs = self.baseline_pool.run(case.baseline, self.checkpoint, requests)
        if cached:
            self.cache.put(key, outputs)
        return outputs

    def candidate_run(self, case: Case, requests: list[Request]) -> EngineRun:
        """The candidate's outputs and every rank's report."""
        self._make_room(self.pool, case.setup)
        return self.pool.run_traced(case.setup, self.checkpoint, requests)

    def _make_room(self, user: LauncherPool, setup: ParallelSetup) -> None:
        """Under a mutation the mutated and the clean pool each keep rank processes; on GPUs both
        may not fit (tp2 x pp2 twice on 4 GPUs), so the other pool's ranks go first (it restarts
        them, re-applying its mutation, when it next needs them)."""
        if self.baseline_pool is self.pool or self.options.device != "cuda":
            return
        other = self.baseline_pool if user is self.pool else self.pool
        limit = available_devices(self.options.device) or 0
        needed = user.devices_to_start(setup.world_size)
        if needed and user.devices_held() + other.devices_held() + needed > limit:
            other.close()

    def run_case(self, planned: PlannedCase) -> CaseResult:
        """Baseline, candidate, the checks of ``harness.outcome``, the comparison (with a forced
        replay after a tolerated flip) and, on failure, localization: one final ``CaseResult``."""
        case, start = planned.case, time.monotonic()
        if planned.skip_reason:
            return CaseResult.for_case(case, "skip", reason=planned.skip_reason)
        requests = self.requests(case.scenario)
        try:
            base = self._side(case, "baseline", lambda: self.baseline_outputs(case, requests))
            run = self._side(case, "candidate", lambda: self.candidate_run(case, requests))
        except _CaseOutcome as ended:
            return CaseResult.for_case(case, ended.status, reason=ended.reason,
                                       seconds=time.monotonic() - start)
        assert isinstance(base, list) and isinstance(run, EngineRun)
        matches = outcome.sp_matches(run.ranks)
        fields: dict[str, Any] = {"sp_matches": matches, "seconds": 0.0}
        problem = outcome.rank_disagreement(run)
        vacuous, sp_note = outcome.sp_vacuity(case.setup, matches)
        if problem or vacuous:
            return CaseResult.for_case(case, "fail", reason=problem or vacuous or "",
                                       **{**fields, "seconds": time.monotonic() - start})
        policy = outcome.policy_for(case, self.options.policy)
        verdict = compare(run.outputs, base, policy, self.options.dtype)
        if verdict.replay:
            try:
                forced = self._side(case, "candidate", lambda: self.forced_replay(case, requests, base))
            except _CaseOutcome as failed:
                return CaseResult.for_case(case, failed.status, reason=failed.reason,
                                           **{**fields, "seconds": time.monotonic() - start})
            assert isinstance(forced, dict)
            replays = {rid: forced[rid] for rid in verdict.replay}
            verdict = compare(run.outputs, base, policy, self.options.dtype, forced=replays)
        divergence = verdict.first_divergence.to_json() if verdict.first_divergence else None
        localization = None
        if not verdict.passed and divergence is not None and self.options.localize:
            localization = self.localize(case, requests, divergence["request_id"])
        metrics = {**verdict.metrics, "policy": policy, **({"sp_note": sp_note} if sp_note else {})}
        return CaseResult.for_case(
            case, "pass" if verdict.passed else "fail", reason="" if verdict.passed else verdict.message(),
            first_divergence=divergence, localization=localization, metrics=metrics,
            sp_matches=matches, seconds=time.monotonic() - start,
        )

    def _side(self, case: Case, side: str, produce: Callable[[], _T]) -> _T:
        """``produce()``, with its failure turned into the case's outcome: an exception in engine
        code is a ``fail`` (``outcome.worker_failure``), a crash, hang or lack of resources an
        ``error``."""
        setup_id = case.setup.id if side == "candidate" else case.baseline_id
        try:
            return produce()
        except WorkerError as exc:
            raise _CaseOutcome(*outcome.worker_failure(exc, side, setup_id)) from exc
        except (RuntimeError, TimeoutError, OSError) as exc:  # no resources, Ray, transformers
            raise _CaseOutcome("error", f"infrastructure: {side} {setup_id}: {type(exc).__name__}: {exc}") from exc

    def forced_replay(self, case: Case, requests: list[Request], base: list[RequestOutput]
                      ) -> dict[str, RequestOutput]:
        """The candidate rerun with every request forced along the baseline's tokens (the same
        batch, so the same schedule), by request id."""
        by_id = {o.request_id: o for o in base}
        forced = [replace(r, forced_tokens=tuple(by_id[r.request_id].token_ids)) for r in requests]
        return {o.request_id: o for o in self.candidate_run(case, forced).outputs}

    def localize(self, case: Case, requests: list[Request], request_id: str) -> dict[str, Any] | None:
        """Replay the batch's prefill (the failing request with the requests it was batched with)
        in one step with capture on both sides (not for ``hf``)."""
        if isinstance(case.baseline, str):
            return {"note": "no localization against the transformers baseline (no activation capture)"}
        try:
            self._make_room(self.pool, case.setup)
            cand = merge_captures(self.pool.capture(case.setup, self.checkpoint, requests))
            self._make_room(self.baseline_pool, case.baseline)
            base = merge_captures(self.baseline_pool.capture(case.baseline, self.checkpoint, requests))
        except (WorkerError, RuntimeError) as exc:
            return {"note": f"localization replay failed: {str(exc).splitlines()[0]}", "error": str(exc)}
        result = localize(cand, base, case.setup.tp, self.options.dtype, token_sharded=case.setup.sp)
        result["failing_request"] = request_id
        result["row_requests"] = sorted({requests[i].request_id for i in _requests_of(result["rows"], cand)})
        return result

    def close(self) -> None:
        self.pool.close()
        if self.baseline_pool is not self.pool:
            self.baseline_pool.close()

