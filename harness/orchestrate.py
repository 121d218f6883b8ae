"""Runs cases: gets baseline and candidate outputs from pooled workers, compares, and returns
each case's final result as soon as it is known. Planning is ``harness.plan``, the pools
``harness.pool``, the replay that localizes a failure ``harness.localize``."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from harness import outcome
from harness.baseline import BaselineCache, hf_generate
from harness.case import Case, CaseResult
from harness.compare import compare
from harness.compile_cache import use_compile_cache
from harness.divergences import divergence_records, text_records
from harness.engines import get_engine
from harness.launch.base import EngineRun, WorkerError
from harness.localize import localize_replay
from harness.mutations import get_mutation
from harness.plan import PlannedCase, RunOptions
from harness.pool import LauncherPool, make_room
from harness.repeat import Attempt
from harness.repeat import merge as merge_repeats
from harness.setup import ParallelSetup
from harness.timeouts import case_timeouts, load_factor
from reference_impl.config import load_config
from reference_impl.requests import Request, RequestOutput
from scenarios.models import cache_root, resolve
from scenarios.registry import get_scenario

_T = TypeVar("_T")


class _CaseOutcome(Exception):
    """A case ended before its comparison: ``status`` ("fail" | "error") and why."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class Orchestrator:
    """Runs cases one by one and hands every result to ``on_result`` as soon as it is final."""

    def __init__(self, options: RunOptions, pool: LauncherPool | None = None,
                 baseline_pool: LauncherPool | None = None) -> None:
        self.options = options
        use_compile_cache()  # before any pool starts: ranks inherit the location
        if options.mutation is not None and options.fresh_workers:
            raise ValueError("--mutation patches pooled workers; it cannot be combined with --fresh-workers")
        self.pool = pool or LauncherPool(options.backend, options.device, options.fresh_workers, options.mutation)
        # Baselines come from clean workers, except under a mutation of code every setup shares,
        # which a real engine's baselines would carry too (only the oracle case can tell).
        shared = options.mutation is not None and get_mutation(options.mutation).shared
        self.baseline_pool = self.pool if options.mutation is None or shared else baseline_pool or LauncherPool(
            options.backend, options.device, options.fresh_workers)
        self.limits = options.limits()
        self.cache = BaselineCache(cache_root() / "baselines")
        self.checkpoint = str(resolve(options.model))
        self._requests: dict[str, list[Request]] = {}
        self.timeouts: dict[str, float] = {}  # case id -> seconds (``case_timeout``)
        self._timeout: float | None = None

    def requests(self, scenario: str) -> list[Request]:
        """The scenario's requests, built once per run (every setup and every replay gets the same)."""
        if scenario not in self._requests:
            self._requests[scenario] = get_scenario(scenario, self.options.requests_file).requests(
                Path(self.checkpoint), self.options.dtype, self.options.seed, self.options.max_new_tokens)
        return list(self._requests[scenario])

    def baseline_outputs(self, case: Case, requests: list[Request]) -> list[RequestOutput]:
        spec = (case.baseline if isinstance(case.baseline, str)
                else case.baseline.build_spec(self.checkpoint, self.limits))
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
            outputs = self.baseline_pool.run_traced(case.baseline, self.checkpoint, requests, self.limits).outputs
        if cached:
            self.cache.put(key, outputs)
        return outputs

    def candidate_run(self, case: Case, requests: list[Request]) -> EngineRun:
        """The candidate's outputs and every rank's report."""
        self._make_room(self.pool, case.setup)
        return self.pool.run_traced(case.setup, self.checkpoint, requests, self.limits)

    def _make_room(self, user: LauncherPool, setup: ParallelSetup) -> None:
        """Free the other pool's GPUs if ``user`` needs them for ``setup`` (``pool.make_room``)."""
        make_room(user, self.baseline_pool if user is self.pool else self.pool, setup.world_size)

    def case_timeout(self, planned: PlannedCase) -> float:
        """How long ``planned`` may run: ``--case-timeout``, or its expected cost with a margin
        (``harness.timeouts``; ``timeouts``: precomputed per case id, e.g. from measured durations)."""
        if planned.case.id in self.timeouts:
            return self.timeouts[planned.case.id]
        return case_timeouts([planned], self.checkpoint, override=self.options.case_timeout)[planned.case.id]

    def run_case(self, planned: PlannedCase) -> CaseResult:
        """The case's result: one run of it, or with ``--repeat N`` its N repeats merged
        (``harness.repeat``: a case whose repeats differ in verdict or outputs is flaky). Only the
        first failing repeat is localized."""
        if planned.skip_reason:
            return CaseResult.for_case(planned.case, "skip", reason=planned.skip_reason)
        attempts: list[Attempt] = []
        for _ in range(self.options.repeat):
            localize = self.options.localize and not any(a.result.status == "fail" for a in attempts)
            attempts.append(self._attempt(planned, localize))
        return attempts[0].result if len(attempts) == 1 else merge_repeats(attempts)

    def _attempt(self, planned: PlannedCase, localize: bool) -> Attempt:
        """``_run_case`` under the case's deadline: a call still running at its end is a hang,
        reported with every rank's stack (``harness.launch.postmortem``)."""
        self._timeout = self.case_timeout(planned)
        if self.options.case_timeout is None:  # derived, not the user's: scaled by the load now
            self._timeout *= load_factor()
        self.pool.deadline = self.baseline_pool.deadline = time.monotonic() + self._timeout
        try:
            return self._run_case(planned, localize)
        finally:
            self.pool.deadline = self.baseline_pool.deadline = None

    def abort(self) -> None:
        """Kill every rank process of both pools now (Ctrl-C)."""
        self.pool.abort()
        self.baseline_pool.abort()

    def _run_case(self, planned: PlannedCase, localize: bool = True) -> Attempt:
        """Baseline, candidate, the checks of ``harness.outcome``, the comparison (with a forced
        replay after a tolerated flip) and, on failure, localization: one final ``CaseResult``,
        with the candidate's outputs when it generated any."""
        case, start = planned.case, time.monotonic()
        requests = self.requests(case.scenario)
        matches = None
        run: EngineRun | None = None
        try:
            base = self._side(case, "baseline", lambda: self.baseline_outputs(case, requests))
            run = self._side(case, "candidate", lambda: self.candidate_run(case, requests))
            matches = outcome.sp_matches(run.ranks)
            vacuous, sp_note = outcome.sp_vacuity(case.setup, matches)
            problem = outcome.rank_disagreement(run) or vacuous
            if problem:
                raise _CaseOutcome("fail", problem)
            policy = outcome.policy_for(case, self.options.policy)
            verdict = compare(run.outputs, base, policy, self.options.dtype)
            forced: dict[str, RequestOutput] = {}
            if verdict.replay:
                replay_ids = verdict.replay
                forced = self._side(case, "candidate", lambda: self.forced_replay(case, requests, base, replay_ids))
                verdict = compare(run.outputs, base, policy, self.options.dtype, forced=forced)
        except _CaseOutcome as ended:
            return Attempt(CaseResult.for_case(case, ended.status, reason=ended.reason, sp_matches=matches,
                                               seconds=time.monotonic() - start), run.outputs if run else None)
        divergence = verdict.first_divergence.to_json() if verdict.first_divergence else None
        localization = divergences = None
        if not verdict.passed:
            divergences = divergence_records(verdict, run.outputs, base, forced, self.checkpoint)
        if not verdict.passed and divergence is not None and localize:
            localization = self.localize(case, requests, divergence["request_id"])
        metrics = {**verdict.metrics, "policy": policy, **({"sp_note": sp_note} if sp_note else {}),
                   **outcome.rank_memory(run.ranks)}
        return Attempt(CaseResult.for_case(
            case, "pass" if verdict.passed else "fail", reason="" if verdict.passed else verdict.message(),
            first_divergence=divergence, localization=localization, metrics=metrics,
            sp_matches=matches, seconds=time.monotonic() - start, divergences=divergences,
            texts=text_records(requests, run.outputs, base, self.checkpoint),
        ), run.outputs)

    def _side(self, case: Case, side: str, produce: Callable[[], _T]) -> _T:
        """``produce()``, with its failure turned into the case's outcome: an exception in engine
        code is a ``fail`` (``outcome.worker_failure``), a crash, hang or lack of resources an
        ``error``."""
        setup = case.setup if side == "candidate" else case.baseline
        setup_id = setup.id if isinstance(setup, ParallelSetup) else setup
        # Whose code raised is judged by the engine that side ran (``hf`` runs in this process).
        paths = get_engine(setup.engine).code_paths if isinstance(setup, ParallelSetup) else outcome.ENGINE_PATHS
        try:
            return produce()
        except WorkerError as exc:
            status, reason = outcome.worker_failure(exc, side, setup_id, self._timeout, paths)
            if status == "fail" and isinstance(setup, ParallelSetup):
                reason = outcome.with_layout(reason, load_config(self.checkpoint).text, setup.tp)
            raise _CaseOutcome(status, reason) from exc
        except (RuntimeError, TimeoutError, OSError) as exc:  # no resources, Ray, transformers
            raise _CaseOutcome("error", f"infrastructure: {side} {setup_id}: {type(exc).__name__}: {exc}") from exc

    def forced_replay(self, case: Case, requests: list[Request], base: list[RequestOutput],
                      ids: Collection[str] | None = None) -> dict[str, RequestOutput]:
        """The candidate rerun with every request forced along the baseline's tokens (the same
        batch, so the same schedule): the replays of ``ids`` (default: all), by request id."""
        by_id = {o.request_id: o for o in base}
        forced = [replace(r, forced_tokens=tuple(by_id[r.request_id].token_ids)) for r in requests]
        return {o.request_id: o for o in self.candidate_run(case, forced).outputs
                if ids is None or o.request_id in ids}

    def localize(self, case: Case, requests: list[Request], request_id: str) -> dict[str, Any] | None:
        """Replay the batch's prefill with capture on both sides (``localize_replay``; not for ``hf``)."""
        baseline = case.baseline
        if isinstance(baseline, str):
            return {"note": "no localization against the transformers baseline (no activation capture)"}
        return localize_replay(case.setup, self.options.dtype, requests, request_id,
                               lambda: self._capture(self.pool, case.setup, requests),
                               lambda: self._capture(self.baseline_pool, baseline, requests))

    def _capture(self, pool: LauncherPool, setup: ParallelSetup, requests: list[Request]) -> list[dict[str, Any]]:
        self._make_room(pool, setup)
        return pool.capture(setup, self.checkpoint, requests, self.limits)

    def close(self) -> None:
        self.pool.close()
        if self.baseline_pool is not self.pool:
            self.baseline_pool.close()

