"""``parity accuracy``: an lm-eval task on every setup, each compared with its baseline on the
same documents (``paired``), written as ``accuracy.json``, lm-eval's per-sample logs and an HTML
section."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.accuracy.lm import ParityLM
from harness.accuracy.paired import Doc, Paired
from harness.launch.base import WorkerError
from harness.outcome import sp_matches, sp_vacuity
from harness.pool import LauncherPool
from harness.results import EXIT_FAIL, EXIT_INFRA, EXIT_NOTHING_RAN, EXIT_OK
from harness.setup import ParallelSetup
from scenarios.gsm import TASKS

DEFAULT_TASKS = ("gsm8k_parity",)
DEFAULT_SETUPS = ("tp2-sp-graph-full", "tp2-pp2-sp-graph-full")
BASELINE = "tp1-pp1-eager"
# The score a document is judged by, per metric lm-eval reports, with the filter whose answer it
# scores: gsm8k's strict "#### N" extraction first, then a multiple-choice task's accuracy.
PRIMARY = (("exact_match", "strict-match"), ("exact_match", None), ("acc", None))


@dataclass(frozen=True)
class AccuracyOptions:
    setups: tuple[str, ...] = DEFAULT_SETUPS
    baseline: str = BASELINE
    model: str = "gsm-llama"
    tasks: tuple[str, ...] = DEFAULT_TASKS
    input: str = "tokens"
    limit: int | None = None
    num_fewshot: int | None = None
    backend: str = "mp"
    dtype: str = "float32"
    device: str = "cpu"
    mutation: str | None = None
    batch_size: int = 64
    include_path: tuple[Path, ...] = (TASKS,)


@dataclass
class SetupRun:
    """One setup's lm-eval results: per task its documents, lm-eval's aggregate metrics, and the
    engine's trace."""

    setup: str
    docs: dict[str, list[Doc]] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    sp: dict[str, Any] | None = None
    seconds: float = 0.0
    error: str | None = None


def primary(sample: dict[str, Any]) -> str:
    for metric, _ in PRIMARY:
        if metric in sample:
            return metric
    raise ValueError(f"no metric of {[m for m, _ in PRIMARY]} in lm-eval's sample (keys {sorted(sample)})")


def docs_of(samples: list[dict[str, Any]]) -> list[Doc]:
    """Each document once, scored by the primary metric under its preferred filter."""
    if not samples:
        return []
    metric = primary(samples[0])
    filters = {s["filter"] for s in samples}
    preferred = next((f for m, f in PRIMARY if m == metric and f in filters), sorted(filters)[0])
    docs = []
    for s in samples:
        if s["filter"] != preferred:
            continue
        doc = s.get("doc") or {}
        filtered = s["filtered_resps"][0] if len(s["filtered_resps"]) == 1 else s["filtered_resps"]
        if isinstance(filtered, list) and filtered and isinstance(filtered[0], (list, tuple)):  # choices
            scores = [float(x[0]) for x in filtered]
            answer = str(max(range(len(scores)), key=scores.__getitem__))
            response = answer
        else:
            answer = str(filtered)
            resp = s["resps"][0]
            response = str(resp[0] if isinstance(resp, list) else resp)
        docs.append(Doc(int(s["doc_id"]), bool(s[metric]), answer, response,
                        str(doc.get("question", ""))[:2000], str(s.get("target", ""))))
    return docs


def evaluate_setup(setup: str, opts: AccuracyOptions, pool: LauncherPool,
                   progress: Callable[[str], None]) -> SetupRun:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    start = time.monotonic()
    lm = ParityLM(setup=setup, model=opts.model, dtype=opts.dtype, device=opts.device, input=opts.input,
                  batch_size=opts.batch_size, pool=pool, progress=progress)
    manager = TaskManager(include_path=[str(p) for p in opts.include_path])
    res = simple_evaluate(model=lm, tasks=list(opts.tasks), num_fewshot=opts.num_fewshot, limit=opts.limit,
                          log_samples=True, task_manager=manager, bootstrap_iters=0, verbosity="WARNING")
    assert res is not None
    run = SetupRun(setup, seconds=time.monotonic() - start)
    for task in opts.tasks:
        run.samples[task] = res["samples"][task]
        run.docs[task] = docs_of(res["samples"][task])
        run.metrics[task] = {k: v for k, v in res["results"][task].items() if not k.endswith("_stderr,none")}
    run.sp = sp_matches(lm.trace.reports())
    return run


def compare(task: str, base: SetupRun, cand: SetupRun, opts: AccuracyOptions) -> dict[str, Any]:
    setup = ParallelSetup.parse(cand.setup, dtype=opts.dtype)
    entry: dict[str, Any] = {"task": task, "id": cand.setup, "baseline": base.setup, "seconds": round(cand.seconds, 1)}
    if cand.error or base.error:
        return {**entry, "verdict": "error", "reason": cand.error or f"baseline: {base.error}"}
    paired = Paired(base.docs[task], cand.docs[task], identical_expected=opts.dtype == "float32")
    verdict, reason = paired.verdict()
    vacuous, note = sp_vacuity(setup, cand.sp)
    if vacuous:
        verdict, reason = "fail", vacuous
    acc, base_acc = paired.accuracy(paired.candidate), paired.accuracy(paired.baseline)
    return {**entry, "n": paired.n, "accuracy": acc, "baseline_accuracy": base_acc, "delta": acc - base_acc,
            "changed": {"to_correct": len(paired.to_correct), "to_wrong": len(paired.to_wrong)},
            "changed_answers": paired.changed, "p_value": paired.p_value, "verdict": verdict, "reason": reason,
            "sp_note": note, "discordant": paired.discordant_rows()}


def run_accuracy(opts: AccuracyOptions, out: Path, progress: Callable[[str], None] | None = None
                 ) -> tuple[dict[str, Any], int]:
    """Evaluate the baseline and every setup, compare, write ``accuracy.json`` and the per-sample
    logs; the document and the exit code."""
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    if opts.baseline in opts.setups:
        raise ValueError(f"{opts.baseline} is the baseline; comparing it with itself would check nothing")
    for s in (opts.baseline, *opts.setups):
        ParallelSetup.parse(s, dtype=opts.dtype)  # a malformed id fails before anything runs
    out.mkdir(parents=True, exist_ok=True)
    clean = LauncherPool(opts.backend, opts.device)
    mutated = LauncherPool(opts.backend, opts.device, mutation=opts.mutation) if opts.mutation else clean
    runs: dict[str, SetupRun] = {}
    try:
        for setup in (opts.baseline, *opts.setups):
            pool = clean if setup == opts.baseline else mutated
            say(f"accuracy: {setup} on {', '.join(opts.tasks)} ({opts.input})")
            try:
                runs[setup] = evaluate_setup(setup, opts, pool, say)
            except WorkerError as err:
                runs[setup] = SetupRun(setup, error=f"{type(err).__name__}: {str(err).splitlines()[0]}")
                pool.drop(ParallelSetup.parse(setup).world_size)
            _write_samples(out, runs[setup])
    finally:
        clean.close()
        if mutated is not clean:
            mutated.close()
    base = runs[opts.baseline]
    entries = [compare(task, base, runs[s], opts) for task in opts.tasks for s in opts.setups]
    doc = {"task": ",".join(opts.tasks), "limit": opts.limit, "input": opts.input, "model": opts.model,
           "dtype": opts.dtype, "mutation": opts.mutation,
           "baselines": [{"task": t, "id": opts.baseline, "accuracy": Paired.accuracy(base.docs.get(t, [])),
                          "n": len(base.docs.get(t, [])), "metrics": base.metrics.get(t, {}),
                          "seconds": round(base.seconds, 1), "error": base.error} for t in opts.tasks],
           "setups": entries}
    (out / "accuracy.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return doc, exit_code([e["verdict"] for e in entries])


def exit_code(verdicts: Sequence[str]) -> int:
    if not verdicts:
        return EXIT_NOTHING_RAN
    if "fail" in verdicts:
        return EXIT_FAIL
    if "error" in verdicts:
        return EXIT_INFRA
    if "inconclusive" in verdicts:
        return EXIT_NOTHING_RAN
    return EXIT_OK


def _write_samples(out: Path, run: SetupRun) -> None:
    """lm-eval's per-sample log of each task, as JSON lines."""
    for task, samples in run.samples.items():
        with (out / f"samples_{task}_{run.setup}.jsonl").open("w") as fh:
            for s in samples:
                fh.write(json.dumps(s, default=str) + "\n")
