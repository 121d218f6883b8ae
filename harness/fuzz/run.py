"""The fuzz driver: Hypothesis draws examples, each runs as a small ``parity run`` (every drawn
setup against its automatic baseline, plus the one-device engine against transformers) on pools
kept across examples; a failure is shrunk (bounded in time) and written as a reproducer.

Time: the search stops when ``--budget`` seconds have passed (or after ``--examples``); once a
failure is found, shrinking gets ``shrink_budget`` seconds more. Both end by raising ``_Stop``
inside the test body, which Hypothesis does not catch; the smallest failing example seen so far
(every failing run the shrinker makes is smaller than the last) is the one reported.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.case import CaseResult, is_oracle
from harness.fuzz.example import Example, materialize
from harness.fuzz.repro import Reproducer, write_repro
from harness.fuzz.strategies import FAMILIES, examples
from harness.matrix import Matrix
from harness.orchestrate import Orchestrator
from harness.plan import RunOptions, plan
from harness.pool import LauncherPool
from reference_impl.requests import Request
from scenarios.inputs import embedding_table
from scenarios.models import tiny_checkpoint
from scenarios.request_file import save_requests

# Seconds of shrinking after the first failure when the command line gives none: enough for
# ~50 engine runs of a small example on 2 CPU cores.
SHRINK_SECONDS = 300.0
EXAMPLES_FILE = "examples.jsonl"
REPORT_FILE = "fuzz.json"


class _Stop(BaseException):
    """The run's time is spent (raised in the test body; Hypothesis lets it through)."""


class FuzzFailure(AssertionError):
    """An example with a failing case (raised to Hypothesis, which then shrinks it)."""


@dataclass(frozen=True)
class FuzzOptions:
    out: Path
    budget: float | None = None  # seconds of search (None: until ``examples``)
    examples: int | None = None  # examples to draw (None: until ``budget``)
    seed: int = 0
    setups: tuple[str, ...] | None = None  # --setups: draw among these (each must fit the model)
    mutation: str | None = None
    backend: str = "mp"
    max_ranks: int = 4
    shrink_budget: float = SHRINK_SECONDS
    families: tuple[str, ...] = FAMILIES

    def __post_init__(self) -> None:
        from harness.mutations import get_mutation
        from harness.setup import ParallelSetup

        if self.budget is None and self.examples is None:
            raise ValueError("parity fuzz needs --budget SECONDS or --examples N")
        if self.budget is not None and not self.budget > 0:
            raise ValueError(f"--budget {self.budget:g}: must be a positive number of seconds")
        if self.examples is not None and self.examples < 1:
            raise ValueError(f"--examples {self.examples}: must be >= 1")
        if self.seed < 0:
            raise ValueError(f"--seed {self.seed}: must be >= 0")
        if self.max_ranks < 1:
            raise ValueError(f"--max-ranks {self.max_ranks}: must be >= 1")
        if not self.shrink_budget >= 0:
            raise ValueError(f"--shrink-budget {self.shrink_budget:g}: must be >= 0 seconds")
        if self.backend not in ("ray", "mp"):
            raise ValueError(f"backend {self.backend!r}: choose 'ray' or 'mp'")
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown or not self.families:
            raise ValueError(f"--families {','.join(self.families)}: choose among {', '.join(FAMILIES)}")
        if self.mutation is not None:
            get_mutation(self.mutation)
        for s in self.setups or ():
            if ParallelSetup.parse(s).world_size > self.max_ranks:
                raise ValueError(f"--setups {s}: needs more than --max-ranks {self.max_ranks} ranks")


@dataclass
class FuzzStats:
    """What the run did. ``compared``: searched examples in which a parallel case passed or failed
    (the rest checked no parallelism: every drawn setup was skipped, or nothing was drawn)."""

    examples: int = 0
    compared: int = 0
    oracle_only: int = 0
    nothing_ran: int = 0
    errors: int = 0
    build_errors: int = 0  # drawn examples whose checkpoint or requests could not be made (a strategy bug)
    shrink_runs: int = 0
    cases: Counter[str] = field(default_factory=Counter)
    search_seconds: float = 0.0
    shrink_seconds: float = 0.0
    first_failure_seconds: float | None = None

    @property
    def examples_per_minute(self) -> float:
        return 60.0 * self.examples / self.search_seconds if self.search_seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "cases": dict(self.cases), "examples_per_minute": round(self.examples_per_minute, 2)}


@dataclass(frozen=True)
class Failure:
    example: Example
    setup: str
    baseline: str
    reason: str


@dataclass
class FuzzReport:
    stats: FuzzStats
    failure: Failure | None = None
    repro: Reproducer | None = None

    @property
    def exit_code(self) -> int:
        """1 a failure (reproducer written); 0 at least one example compared a parallel setup;
        3 none did and some hit infrastructure errors; 4 none did (nothing was checked)."""
        if self.failure is not None:
            return 1
        if self.stats.compared:
            return 0
        return 3 if self.stats.errors else 4

    def to_json(self) -> dict[str, Any]:
        failure = None
        if self.failure is not None:
            failure = {"setup": self.failure.setup, "baseline": self.failure.baseline, "reason": self.failure.reason,
                       "example": asdict(self.failure.example), "summary": self.failure.example.summary(),
                       "prompt_tokens": self.failure.example.prompt_tokens()}
        return {"stats": self.stats.to_json(), "failure": failure, "exit_code": self.exit_code,
                "repro": None if self.repro is None else {"dir": str(self.repro.dir), "command": self.repro.command}}


@dataclass
class _Ran:
    """One example's checkpoint, requests and case results."""

    checkpoint: Path
    requests: list[Request]
    results: list[CaseResult]


def _judged(result: CaseResult) -> CaseResult:
    """A case as the fuzzer counts it: an SP setup with a token threshold that no step of the drawn
    requests reached is "vacuous" to ``parity run`` (a fail: it compared SP-off with SP-off), but
    here the draw, not the engine, made it so; it is a skip. (Without a threshold SP must apply to
    every step, and a vacuous case stays a failure.)"""
    from harness.setup import ParallelSetup

    vacuous = result.status == "fail" and result.reason.startswith("vacuous:")
    if vacuous and ParallelSetup.parse(result.setup).sp_min_tokens:
        return replace(result, status="skip", reason=f"fuzz: the drawn requests never reached the SP threshold "
                                                     f"({result.reason})")
    return result


class Fuzzer:
    """Draws and runs examples on pools kept for the whole run (one per world size, as ``parity
    run`` does across cases; under a mutation, a clean one for the baselines beside it)."""

    def __init__(self, options: FuzzOptions, progress: Callable[[str], None] = lambda line: None) -> None:
        from harness.mutations import get_mutation

        self.options, self.progress = options, progress
        mutation = options.mutation
        self.pool = LauncherPool(options.backend, "cpu", mutation=mutation)
        shared = mutation is not None and get_mutation(mutation).shared
        self.baseline_pool = self.pool if mutation is None or shared else LauncherPool(options.backend, "cpu")
        self.stats = FuzzStats()
        self.best: Failure | None = None
        self._best_run: _Ran | None = None
        self._start = time.monotonic()
        self._deadline = self._start + (options.budget if options.budget is not None else math.inf)
        self._found_at: float | None = None

    # --- one example -----------------------------------------------------------------------

    def prepare(self, example: Example) -> tuple[Path, list[Request], Path]:
        """Build (or reuse) the checkpoint and write the requests file."""
        checkpoint = tiny_checkpoint(example.model.spec())
        requests = materialize(example, embedding_table(checkpoint))
        return checkpoint, requests, save_requests(self.options.out / "work" / "requests.json", requests)

    def run_example(self, example: Example, checkpoint: Path, requests: list[Request], path: Path) -> _Ran:
        """Every case of ``example``: the drawn setups against their baselines, and the oracle."""
        options = RunOptions(backend=self.options.backend, model=str(checkpoint), mutation=self.options.mutation,
                             requests_file=str(path), localize=False,
                             max_num_seqs=example.engine.max_num_seqs,
                             max_num_batched_tokens=example.engine.max_num_batched_tokens)
        planned = plan(Matrix("fuzz", "drawn setups", example.setups, scenarios=()), options)
        orchestrator = Orchestrator(options, self.pool, self.baseline_pool)
        results: list[CaseResult] = []
        for p in planned:
            if self.best is not None and not self._wanted_while_shrinking(p.case.setup.id, p.case.baseline_id):
                continue
            results.append(_judged(orchestrator.run_case(p)))
            if self.best is not None and results[-1].status == "fail":
                break  # shrinking asks only whether the example still fails
        return _Ran(checkpoint, requests, results)

    def _wanted_while_shrinking(self, setup_id: str, baseline_id: str) -> bool:
        """While shrinking, the oracle case runs only when the failure being shrunk is the oracle's
        (and a parallel case only when it is a parallel one's): a smaller example must fail the
        same kind of check, and the other one's cost buys nothing."""
        assert self.best is not None
        return is_oracle(setup_id, baseline_id) == is_oracle(self.best.setup, self.best.baseline)

    def check(self, example: Example) -> None:
        """Hypothesis's test body: run ``example``, count it, raise ``FuzzFailure`` on a failing case."""
        if time.monotonic() >= self._deadline:
            raise _Stop
        start = time.monotonic()
        try:
            prepared = self.prepare(example)
        except Exception as exc:  # the draw, not the engine: a checkpoint transformers refuses, say
            self.stats.build_errors += 1
            self.progress(f"[build error] {type(exc).__name__}: {str(exc)[:300]}  {example.summary()}")
            return
        ran = self.run_example(example, *prepared)
        seconds = time.monotonic() - start
        self._count(ran.results)
        failed = [r for r in ran.results if r.status == "fail"]
        self._log(example, ran.results, seconds)
        if not failed:
            return
        first = failed[0]
        failure = Failure(example, first.setup, first.baseline, first.reason.splitlines()[0] if first.reason else "")
        if self.best is None:
            self._found_at = time.monotonic()
            self.stats.first_failure_seconds = round(self._found_at - self._start, 1)
            self.stats.search_seconds = self._found_at - self._start
            self._deadline = self._found_at + self.options.shrink_budget
        self.best, self._best_run = failure, ran
        self.progress(f"FAIL {failure.setup}: {failure.reason[:160]}\n     example: {example.summary()}")
        raise FuzzFailure(f"{failure.setup}: {failure.reason}")

    def _count(self, results: list[CaseResult]) -> None:
        statuses = Counter(r.status for r in results)
        if self.best is not None:
            self.stats.shrink_runs += 1
            return
        self.stats.examples += 1
        self.stats.cases.update(statuses)
        parallel = [r for r in results if not is_oracle(r.setup, r.baseline) and r.status in ("pass", "fail")]
        oracle = [r for r in results if is_oracle(r.setup, r.baseline) and r.status in ("pass", "fail")]
        if parallel:
            self.stats.compared += 1
        elif oracle:
            self.stats.oracle_only += 1
        elif statuses["error"]:
            self.stats.errors += 1
        else:
            self.stats.nothing_ran += 1

    def _log(self, example: Example, results: list[CaseResult], seconds: float) -> None:
        phase = "shrink" if self.best is not None else "search"
        n = self.stats.shrink_runs if self.best is not None else self.stats.examples
        counts = Counter(r.status for r in results)
        shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        self.progress(f"[{phase} {n} {time.monotonic() - self._start:6.0f}s] {shown} ({seconds:.1f}s)  "
                      f"{example.summary()}")
        line = {"phase": phase, "n": n, "seconds": round(seconds, 2), "example": asdict(example),
                "cases": [{"setup": r.setup, "baseline": r.baseline, "status": r.status,
                           "reason": r.reason.splitlines()[0] if r.reason else ""} for r in results]}
        with (self.options.out / EXAMPLES_FILE).open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    # --- the run -----------------------------------------------------------------------------

    def run(self) -> FuzzReport:
        """Search, shrink, write the reproducer and ``fuzz.json``; the pools are closed after."""
        from hypothesis import given, seed

        self.options.out.mkdir(parents=True, exist_ok=True)
        strategy = examples(self.options.max_ranks, self.options.setups, self.options.families)

        def fuzz_example(example: Example) -> None:
            self.check(example)

        test = seed(self.options.seed)(self._settings()(given(strategy)(fuzz_example)))
        try:
            test()
        except _Stop:
            pass
        except Exception:  # the shrunk failure (FuzzFailure), or Hypothesis's Flaky about it
            if self.best is None:
                raise
        finally:
            self.pool.close()
            if self.baseline_pool is not self.pool:
                self.baseline_pool.close()
        now = time.monotonic()
        if self._found_at is None:
            self.stats.search_seconds = now - self._start
        else:
            self.stats.shrink_seconds = now - self._found_at
        report = FuzzReport(self.stats, self.best)
        if self.best is not None and self._best_run is not None:
            report.repro = write_repro(self.options.out, self.best.example, self._best_run.checkpoint,
                                       self._best_run.requests, self.best.setup, self.best.reason,
                                       self.options.mutation, self.options.backend)
        (self.options.out / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=1) + "\n", encoding="utf-8")
        return report

    def _settings(self) -> Any:
        from hypothesis import HealthCheck, Phase, settings
        from hypothesis.database import DirectoryBasedExampleDatabase

        return settings(
            max_examples=self.options.examples or 10**9, deadline=None, print_blob=False,
            database=DirectoryBasedExampleDatabase(str(self.options.out / ".hypothesis")),
            suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
            phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
        )
