"""The ``parity`` command line. See README.md for the contract; exit codes:
0 every case that ran passed (skips allowed) and at least one ran, 1 a comparison failed,
2 usage/configuration error (nothing ran), 3 infrastructure error (crash, timeout) and no
comparison failure, 4 no case ran (all skipped: the reasons and the setups that would fit the
model are printed; ``--fit`` runs those)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from harness.case import CaseResult
    from harness.orchestrate import Orchestrator
    from harness.plan import PlannedCase, RunOptions
    from harness.progress import Progress
    from harness.results import ResultStore

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INFRA = 0, 1, 2, 3
# harness.results.EXIT_NOTHING_RAN, repeated like the others: importing harness.results pulls in
# torch (through harness.setup), which `parity --help` and `parity list` should not wait for.
EXIT_NOTHING_RAN = 4
# The run was interrupted (Ctrl-C, SIGTERM): what finished is kept; 128 + SIGINT, as shells do.
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """Bad command line or configuration: exit 2, nothing ran."""


def _csv(value: str | None) -> list[str] | None:
    return [v for v in value.split(",") if v] if value else None


def _shard(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError as exc:
        raise UsageError(f"--shard {value!r}: expected I/N, e.g. 0/4") from exc
    return i, n


def _run(args: argparse.Namespace) -> int:
    import torch

    from harness.matrix import get_matrix
    from harness.orchestrate import Orchestrator
    from harness.plan import RunOptions, plan, scenario_names
    from harness.progress import Progress
    from harness.results import ResultStore, environment, exit_code
    from harness.run_meta import run_settings
    from harness.shards import durations, shard
    from parity import preflight
    from parity.outputs import write_outputs

    torch.set_num_threads(1)
    matrix = get_matrix(args.matrix)
    if args.mutation:
        from harness.mutations import get_mutation

        get_mutation(args.mutation)
    options = RunOptions(
        backend=args.backend, device=args.device or matrix.device, dtype=args.dtype or matrix.dtype,
        baseline=args.baseline, model=args.model or matrix.model, fresh_workers=args.fresh_workers,
        mutation=args.mutation, seed=args.seed, policy=args.policy, fit=args.fit,
        allow_confounded=args.allow_confounded, case_timeout=args.case_timeout, engine=args.engine,
        requests_file=args.requests, repeat=args.repeat, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    planned = plan(matrix, options, _csv(args.setups), _csv(args.scenarios))
    preflight.check_model(options.model)
    preflight.check_requests(options)
    if args.cases:
        wanted_ids = _csv(args.cases) or []
        unknown = sorted(set(wanted_ids) - {p.case.id for p in planned})
        if unknown:
            raise UsageError(f"--cases: {', '.join(unknown[:5])} not in matrix {matrix.name} for model {options.model}")
        planned = [p for p in planned if p.case.id in set(wanted_ids)]
    if (sh := _shard(args.shard)) is not None:
        planned = shard(planned, *sh, durations(Path(args.durations)) if args.durations else None)
    out = Path(args.resume or args.out)
    preflight.check_out_dir(out)
    run = run_settings(options, matrix.name, _csv(args.setups) or list(matrix.setups),
                       scenario_names(matrix, options, _csv(args.scenarios)), sys.argv)
    settings = preflight.resume_settings(run, [p.case.id for p in planned])
    if args.resume:
        preflight.check_resume(out, settings)
    # Everything is checked: from here on the directory is written.
    store = ResultStore(out)
    preflight.write_run_file(out, settings)
    done = store.done_ids() if args.resume else set()
    todo = [p for p in planned if p.case.id not in done]
    print(f"parity run: matrix {matrix.name}, {len(planned)} cases ({len(planned) - len(todo)} already done), "
          f"engine {options.engine}, model {options.model}, backend {options.backend}, "
          f"{options.device}/{options.dtype}, baseline {options.baseline}, out {out}"
          + (f", each case {options.repeat} times" if options.repeat > 1 else ""), file=sys.stderr)
    orchestrator = Orchestrator(options)
    if args.durations:  # measured case times: the timeouts follow them too (harness.timeouts)
        from harness.timeouts import case_timeouts

        orchestrator.timeouts = case_timeouts(planned, orchestrator.checkpoint, durations(Path(args.durations)),
                                              options.case_timeout)
    interrupted = _run_cases(orchestrator, todo, store, Progress(len(todo)))
    wanted = {p.case.id for p in planned}
    results = [r for r in store.load() if r.id in wanted]
    index = write_outputs(out, results, environment(), run=run)
    if interrupted:
        print(f"parity run: interrupted; {len(results)} of {len(planned)} cases recorded, workers stopped; "
              f"continue with --resume {out}\nreport: {index.resolve()}  (exit {EXIT_INTERRUPTED})", file=sys.stderr)
        return EXIT_INTERRUPTED
    code = exit_code(results)
    if options.repeat > 1:
        _print_flaky(results, options.repeat)
    if code == EXIT_NOTHING_RAN:
        _explain_nothing_ran(results, planned, options)
    print(f"report: {index.resolve()}  (exit {code})", file=sys.stderr)
    return code


def _print_flaky(results: Sequence[CaseResult], repeat: int) -> None:
    """``--repeat``'s verdict on stderr: how many cases were flaky (0 included), and each one."""
    from harness.repeat import flaky

    ran = [r for r in results if r.status != "skip"]
    found = flaky(results)
    print(f"parity run: {len(found)} flaky of {len(ran)} cases run {repeat} times each"
          + (" (a flaky case fails the run)" if found else ""), file=sys.stderr)
    for r in found:
        print(f"  FLAKY {r.id}: {r.reason.splitlines()[0]}", file=sys.stderr)


def _run_cases(orchestrator: Orchestrator, todo: Sequence[PlannedCase], store: ResultStore,
               progress: Progress) -> bool:
    """Run ``todo``, appending each result as it is final; True when Ctrl-C or SIGTERM stopped
    the run (every rank process is then killed at once, not asked to finish its call)."""
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    # Ctrl-C raises KeyboardInterrupt even in a process that inherited SIGINT ignored (a shell
    # starts background jobs so, and Python then keeps it ignored).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler) if main_thread else None
    try:
        for p in todo:
            progress.begin(p.case.id)
            result = orchestrator.run_case(p)
            store.append(result)
            note = result.reason.splitlines()[0][:160] if result.status in ("fail", "error", "skip") else ""
            progress.finish(p.case.id, result.status, result.seconds, note)
    except KeyboardInterrupt:
        orchestrator.abort()
        return True
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)
        orchestrator.close()
    return False


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (a CI job cancelled) stops a run as Ctrl-C does."""
    raise KeyboardInterrupt

def _explain_nothing_ran(results: Sequence[CaseResult], planned: Sequence[PlannedCase],
                         options: RunOptions) -> None:
    """Exit 4's stderr: each distinct skip reason once with its count, then the setups that fit."""
    from harness.case import is_oracle

    ran = [r for r in results if r.status != "skip"]
    what = f"no parallel case ran ({len(ran)} oracle cases did: they check no parallelism)" if ran else "no case ran"
    print(f"parity run: {what}" + ("" if results else " (no case planned)"), file=sys.stderr)
    for reason, count in Counter(r.reason for r in results if r.status == "skip").items():
        print(f"  {count} x {reason}", file=sys.stderr)
    parallel = [p.case.setup.id for p in planned if not is_oracle(p.case.setup.id, p.case.baseline_id)]
    print(_fit_suggestion(parallel, options), file=sys.stderr)


def _fit_suggestion(setup_ids: Sequence[str], options: RunOptions) -> str:
    """The line naming the planned setups' fitted versions (``--fit`` runs them), or saying none fits."""
    from harness.fit import fitting_setups
    from harness.plan import available_devices
    from reference_impl.config import load_config
    from scenarios.models import resolve

    ids = list(dict.fromkeys(setup_ids))
    fits = fitting_setups(ids, cfg=load_config(resolve(options.model)), max_ranks=available_devices(options.device))
    if not fits:
        return f"no setup of this run fits {options.model} on the available {options.device} devices"
    # --fit changes nothing when the setups fit already (the skips are then about scenarios).
    hint = "; or rerun with --fit" if fits != ids and not options.fit else ""
    return f"setups that fit {options.model}: {', '.join(fits)}{hint}"


def _selftest(args: argparse.Namespace) -> int:
    import torch

    from harness.matrix import get_matrix
    from harness.mutations import CATALOG, get_mutation
    from harness.plan import RunOptions
    from harness.selftest import selftest

    torch.set_num_threads(1)
    matrix = get_matrix(args.matrix)
    names = _csv(args.mutations) or list(CATALOG)
    for name in names:
        get_mutation(name)
    # Localization replays add a prefill capture on both sides of every case (off by default);
    # the catalog's localizations are checked by tests/test_detection.py either way.
    options = RunOptions(backend=args.backend, device=args.device or matrix.device, dtype=matrix.dtype,
                         model=args.model or matrix.model, seed=args.seed, localize=args.localize)
    report = selftest(matrix, options, names, Path(args.out))
    print(report.scenario_table())
    print(f"clean run {'passed' if report.clean_passed else 'FAILED'}; "
          f"{sum(bool(report.caught_by(m)) for m in names)}/{len(names)} mutations caught; "
          f"details in {Path(args.out) / 'selftest.md'}")
    return EXIT_OK if report.passed else EXIT_FAIL


def _fuzz(args: argparse.Namespace) -> int:
    """Random models, inputs and engine configs against their baselines; a failure shrunk and
    written as a reproducer whose ``parity run`` command is replayed here (``--no-replay``: not)."""
    import torch

    from harness.fuzz.run import Fuzzer, FuzzOptions

    torch.set_num_threads(1)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    options = FuzzOptions(out=out, budget=args.budget, examples=args.examples, seed=args.seed,
                          setups=tuple(_csv(args.setups) or ()) or None, mutation=args.mutation,
                          backend=args.backend, max_ranks=args.max_ranks,
                          shrink_budget=args.shrink_budget if args.shrink_budget is not None else _shrink_default(args),
                          families=tuple(_csv(args.families) or ("llama", "qwen2", "llava")))
    limit = f"{options.budget:g} s" if options.budget is not None else f"{options.examples} examples"
    print(f"parity fuzz: {limit}, seed {options.seed}, backend {options.backend}, up to {options.max_ranks} ranks"
          + (f", mutation {options.mutation}" if options.mutation else "") + f", out {out}", file=sys.stderr)
    report = Fuzzer(options, progress=lambda line: print(line, file=sys.stderr, flush=True)).run()
    st = report.stats
    print(f"parity fuzz: {st.examples} examples in {st.search_seconds:.0f} s ({st.examples_per_minute:.1f}/min): "
          f"{st.compared} compared a parallel setup, {st.oracle_only} only the one-device oracle, "
          f"{st.nothing_ran} nothing, {st.errors} infrastructure errors, {st.build_errors} not buildable; "
          f"cases {dict(st.cases)}", file=sys.stderr)
    code = report.exit_code
    if report.failure is not None and report.repro is not None:
        print(f"parity fuzz: FAILURE after {st.first_failure_seconds} s, shrunk in {st.shrink_runs} runs "
              f"({st.shrink_seconds:.0f} s) to: {report.failure.example.summary()}\n"
              f"  {report.failure.setup}: {report.failure.reason[:300]}\n"
              f"reproducer: {report.repro.dir}\n  {report.repro.command}", file=sys.stderr)
        if not args.no_replay:
            replayed = main(list(report.repro.argv))
            print(f"parity fuzz: the reproducer's command exits {replayed}"
                  + (" (fails again)" if replayed == EXIT_FAIL else " (does NOT fail again)"), file=sys.stderr)
    elif code == EXIT_NOTHING_RAN:
        print("parity fuzz: no example compared a parallel setup (every drawn setup was skipped): nothing was "
              "checked", file=sys.stderr)
    print(f"parity fuzz: exit {code}; details in {out / 'fuzz.json'}", file=sys.stderr)
    return code


def _shrink_default(args: argparse.Namespace) -> float:
    """Shrinking's seconds when ``--shrink-budget`` is not given: 300, or the budget if smaller."""
    from harness.fuzz.run import SHRINK_SECONDS

    return min(SHRINK_SECONDS, args.budget) if args.budget is not None else SHRINK_SECONDS


def _list(args: argparse.Namespace) -> int:
    from harness.matrix import MATRICES
    from scenarios.models import MODELS, SHIPPED_DESCRIPTIONS
    from scenarios.models.gguf import CONVERTED
    from scenarios.registry import SCENARIOS

    if args.what == "models":
        for name, spec in MODELS.items():
            print(f"{name:12s} {spec.description}")
        for name, description in SHIPPED_DESCRIPTIONS.items():
            print(f"{name:12s} {description}")
        for name, converted in CONVERTED.items():
            print(f"{name:12s} {converted.description}")
    elif args.what == "matrices":
        for m in MATRICES.values():
            print(f"{m.name:8s} {len(m.setups)} setups x {len(m.scenarios)} scenarios "
                  f"({m.device}/{m.dtype}): {m.description}")
    elif args.what == "setups":
        seen: dict[str, list[str]] = {}
        for m in MATRICES.values():
            for s in m.setups:
                seen.setdefault(s, []).append(m.name)
        for s, ms in seen.items():
            print(f"{s:32s} in {', '.join(ms)}")
    elif args.what == "scenarios":
        for sc in SCENARIOS.values():
            print(f"{sc.name:14s} {sc.description}")
        print(f"{'file:<stem>':14s} the requests of --requests FILE (<stem>.json): ids, prompt-embeds and images "
              "as safetensors (docs/requests.md)")
    elif args.what == "mutations":
        from harness.mutations import CATALOG

        for mut in CATALOG.values():
            print(f"{mut.name:28s} {mut.reference:14s} {mut.summary}")
    return EXIT_OK


def _matrix(args: argparse.Namespace) -> int:
    """The matrix, or its shards (each with its case ids, estimated seconds and runner labels)."""
    from harness.matrix import get_matrix

    m = get_matrix(args.name)
    if args.shards < 1:
        raise UsageError(f"--shards {args.shards}: must be >= 1")
    from harness.plan import RunOptions, plan
    from harness.shards import costs, durations, partition, runner_labels

    model = args.model or m.model
    planned = plan(m, RunOptions(backend="mp", device=m.device, dtype=m.dtype, model=model))
    measured = durations(Path(args.durations)) if args.durations else None
    cost = costs(planned, measured)
    shards = [{"shard": f"{i}/{args.shards}", "matrix": m.name, "model": model, "device": m.device,
               "dtype": m.dtype, "runs_on": json.dumps(runner_labels(m.device, part)),
               "cases": ",".join(p.case.id for p in part), "count": len(part),
               "estimate_s": round(sum(cost[p.case.id] for p in part), 1)}
              for i, part in enumerate(partition(planned, args.shards, measured))]
    if args.format == "github":
        print(json.dumps({"include": shards}))
    else:
        print(json.dumps({"name": m.name, "description": m.description, "device": m.device, "dtype": m.dtype,
                          "setups": list(m.setups), "scenarios": list(m.scenarios), "shards": shards}, indent=2))
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    """Merge run directories (everything is read before anything is written, so ``--out`` may be
    one of them) into ``results.jsonl``, ``summary.json``, ``junit.xml`` and ``index.html``."""
    dirs = [Path(d) for d in args.dirs]
    out = Path(args.out) if args.out else dirs[0]
    code, index = report_dirs(dirs, out, [Path(p) for p in args.previous], args.window, args.allow_duplicates)
    print(f"report: {index.resolve()}", file=sys.stderr)
    return code


def report_dirs(dirs: Sequence[Path], out: Path, previous: Sequence[Path] = (), window: int = 7,
                allow_duplicates: bool = False) -> tuple[int, Path]:
    """``parity report``: merge ``dirs`` into ``out`` (with the history against ``previous`` runs,
    most recent first); the exit status and the index path."""
    from harness.results import environment, exit_code, merge, write_results
    from parity.outputs import write_outputs

    for d in [*dirs, *previous]:
        if not (d / "results.jsonl").is_file():
            raise UsageError(f"{d} holds no results.jsonl")
    merged = merge(dirs, allow_duplicates=allow_duplicates)  # DuplicateCaseError: exit 2
    for o in merged.overridden:
        print(f"parity report: warning: {o.id} of {o.dir} overridden by {o.by}", file=sys.stderr)
    history = None
    if previous:
        from harness.history import RunStatuses, classify

        run = merged.run() or {}
        current = RunStatuses(str(out), (run.get("engine_code"), run.get("mutation")),
                              {r.id: r.status for r in merged.results})
        history = classify(current, [RunStatuses.read(p) for p in previous], window)
        _print_history(history)
    accuracy = next((json.loads((d / "accuracy.json").read_text()) for d in dirs if (d / "accuracy.json").is_file()),
                    None)
    write_results(out, merged.results)
    index = write_outputs(out, merged.results, environment(), run=merged.run(), merged=merged, history=history,
                          accuracy=accuracy)
    return exit_code(merged.results), index


def _print_history(history: dict[str, Any]) -> None:
    counts = Counter(c["class"] for c in history["cases"].values())
    flaky = [case for case, c in history["cases"].items() if c["flaky"]]
    print(f"parity report: against {len(history['previous'])} earlier run(s): {counts['new']} new, "
          f"{counts['recurring']} recurring, {counts['fixed']} fixed, {len(flaky)} flaky", file=sys.stderr)
    for case, c in history["cases"].items():
        if c["class"] in ("new", "recurring", "fixed") or c["flaky"]:
            tag = c["class"].upper() + (" FLAKY" if c["flaky"] else "")
            print(f"  {tag:16s} {case} (bad in {c['failures']} of {c['runs']} runs)", file=sys.stderr)


def _demo(args: argparse.Namespace) -> int:
    """Build a tiny checkpoint offline, load it into the engine, and generate greedily."""
    import torch

    from reference_impl.loader import load_model
    from reference_impl.requests import Request
    from reference_impl.runner import EngineConfig, Runner
    from scenarios.models import resolve

    torch.set_num_threads(1)
    start = time.perf_counter()
    path = resolve(args.model)
    model = load_model(path)
    print(f"model {args.model}: {path}")
    gen = torch.Generator().manual_seed(0)
    vocab = model.cfg.text.vocab_size
    requests = [
        Request(f"req{i}", tuple(torch.randint(0, vocab - 16, (n,), generator=gen).tolist()),
                max_new_tokens=args.max_new_tokens)
        for i, n in enumerate((5, 17, 40))
    ]
    outputs = Runner(model, EngineConfig(max_num_batched_tokens=32)).generate(requests)
    for req, out in zip(requests, outputs):
        mean_lp = sum(out.logprobs) / len(out.logprobs)
        print(f"{out.request_id}: prompt {req.prompt_len} tokens -> {out.token_ids} (mean logprob {mean_lp:.3f})")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return EXIT_OK


def _accuracy(args: argparse.Namespace) -> int:
    from harness.accuracy.run import DEFAULT_SETUPS, DEFAULT_TASKS, AccuracyOptions, run_accuracy
    from reports.accuracy import render_accuracy

    opts = AccuracyOptions(
        setups=tuple(_csv(args.setups) or DEFAULT_SETUPS), baseline=args.baseline, model=args.model,
        tasks=tuple(_csv(args.tasks) or DEFAULT_TASKS), input=args.input, limit=args.limit,
        num_fewshot=args.num_fewshot, backend=args.backend, dtype=args.dtype, device=args.device,
        mutation=args.mutation, batch_size=args.batch_size,
        include_path=tuple(Path(p) for p in args.include_path) or AccuracyOptions.include_path,
    )
    if opts.mutation:
        from harness.mutations import get_mutation

        get_mutation(opts.mutation)  # an unknown name is a usage error before anything runs
    out = Path(args.out)
    doc, code = run_accuracy(opts, out)
    index = render_accuracy(out, doc)
    for entry in doc["setups"]:
        acc = entry.get("accuracy")
        shown = "" if acc is None else f"{100 * acc:.1f}% ({100 * entry['delta']:+.1f} pts), p={entry['p_value']:.3g}"
        verdict = entry["verdict"].upper()
        print(f"{entry['task']:16s} {entry['id']:28s} {verdict:12s} {shown}  {entry.get('reason', '')}")
    for base in doc["baselines"]:
        print(f"{base['task']:16s} {base['id']:28s} baseline     {100 * base['accuracy']:.1f}% of {base['n']}")
    print(f"report: {index}")
    return code


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``parity run: error: …``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="parity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a matrix of setups x scenarios against baselines")
    run.add_argument("--matrix", default="smoke", help="named matrix (parity list matrices)")
    run.add_argument("--setups", help="comma-separated setup ids, e.g. tp2-sp-graph-full (default: the matrix's)")
    run.add_argument("--scenarios", help="comma-separated scenarios (default: the matrix's)")
    run.add_argument("--model", help="built-in model name or local HF checkpoint dir (default: the matrix's: "
                     "tiny-llava, smollm2-135m for --matrix real)")
    # harness.engines.ENGINES' names, repeated: importing it pulls in torch, which --help should not wait for.
    run.add_argument("--engine", default="reference", choices=["reference", "transformers"],
                     help="the engine under test: parity's reference engine, or Hugging Face transformers' "
                          "tensor parallelism (tp_plan='auto'; setups it cannot express are skipped)")
    run.add_argument("--baseline", default="auto",
                     help="auto | hf | a setup id (ID@reference: that setup on the reference engine); auto on "
                          "--engine transformers compares each setup with the same engine on one device and with "
                          "the reference engine")
    run.add_argument("--backend", default="ray", choices=["ray", "mp"])
    run.add_argument("--device", choices=["cpu", "cuda"], help="default: the matrix's")
    run.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: the matrix's")
    run.add_argument("--policy", default="auto", choices=["auto", "exact", "logprobs", "identical"],
                     help="comparison policy; auto: identical for SP vs SP-off pairs, logprobs otherwise")
    run.add_argument("--mutation", help="run with a catalogued bug injected (parity list mutations)")
    run.add_argument("--fresh-workers", action="store_true", help="new worker processes for every run")
    run.add_argument("--allow-confounded", action="store_true",
                     help="accept an explicit --baseline ID that differs from a setup in more than one "
                          "feature (a failure then cannot name the feature at fault)")
    run.add_argument("--fit", action="store_true",
                     help="replace each setup's TP degree by the nearest one the model's head counts allow "
                          "(e.g. tp2 -> tp3 for 9 heads); PP, SP and compile mode stay")
    run.add_argument("--shard", help="I/N: shard I of N (balanced by --durations, else by an estimate; "
                     "the same partition as `parity matrix --shards N`)")
    run.add_argument("--durations", metavar="DIR", help="an earlier run directory whose case times balance the shards")
    run.add_argument("--cases", help="comma-separated case ids to run (of the matrix's plan), e.g. a shard's list")
    run.add_argument("--seed", type=int, default=0, help="input seed of the scenarios")
    run.add_argument("--requests", metavar="FILE",
                     help="run the requests of FILE as the scenario file:<stem> under every setup (alone, or "
                          "beside --scenarios): a JSON document {\"format\": \"parity-requests/1\", "
                          "\"requests\": [{request_id, prompt_ids | prompt_embeds, images, max_new_tokens, "
                          "top_k}]}, tensors in safetensors files beside it; checked against the model before "
                          "anything runs (docs/requests.md)")
    run.add_argument("--repeat", type=int, default=1, metavar="N",
                     help="run each case's candidate N times (the baseline once, cached): a case whose verdict "
                          "or outputs (tokens, logprobs, top-k, bit for bit) differ between repeats is flaky, "
                          "and fails the run (docs/harness.md)")
    run.add_argument("--max-num-batched-tokens", type=int, metavar="N",
                     help="the engine's step budget in every setup (default 24: the scenarios' long prompts "
                          "are chunked); a fuzzer's reproducer gives the budget it drew")
    run.add_argument("--max-num-seqs", type=int, metavar="N",
                     help="the engine's batch slots in every setup (default 8)")
    run.add_argument("--case-timeout", type=float, metavar="SECONDS",
                     help="seconds a case may run before it is a hang (an error with every rank's stack); "
                          "default: its expected cost with a margin (docs/reliability.md)")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR: only cases not yet recorded "
                     "(refused when DIR holds a run of another matrix, model or settings)")
    run.add_argument("--out", default="parity-out", help="output directory (default: parity-out)")
    run.set_defaults(func=_run)

    st = sub.add_parser("selftest", help="run a matrix clean and under every catalogued mutation")
    st.add_argument("--matrix", default="smoke")
    st.add_argument("--model", help="built-in model name or local HF checkpoint dir (default: the matrix's)")
    st.add_argument("--mutations", help="comma-separated subset of the catalog (default: all)")
    st.add_argument("--backend", default="ray", choices=["ray", "mp"])
    st.add_argument("--device", choices=["cpu", "cuda"], help="default: the matrix's")
    st.add_argument("--seed", type=int, default=0, help="input seed of the scenarios")
    st.add_argument("--localize", action="store_true",
                    help="also replay every case's prefill with activation capture: localize the caught cases "
                         "and measure clean activation errors (the localizer tolerance's margins); slower")
    st.add_argument("--out", default="parity-selftest", help="output directory (default: parity-selftest)")
    st.set_defaults(func=_selftest)

    acc = sub.add_parser("accuracy", help="an lm-eval task (gsm8k-style) on each setup against a baseline, "
                         "with a paired test on the same documents")
    acc.add_argument("--setups", help="comma-separated setup ids (default: tp2-sp-graph-full,tp2-pp2-sp-graph-full)")
    acc.add_argument("--baseline", default="tp1-pp1-eager", help="the setup every other is compared with")
    acc.add_argument("--model", default="gsm-llama", help="built-in model name or local HF checkpoint dir "
                     "(needs a tokenizer)")
    acc.add_argument("--tasks", help="comma-separated lm-eval tasks (default: gsm8k_parity; also gsm_choice)")
    acc.add_argument("--include-path", action="append", default=[],
                     help="more lm-eval task directories (the shipped scenarios/gsm/tasks is the default)")
    acc.add_argument("--input", default="tokens", choices=["tokens", "embeds"],
                     help="embeds: prompts go in as prompt-embeds computed outside the engine")
    acc.add_argument("--limit", type=int, help="first N documents of each task")
    acc.add_argument("--num-fewshot", type=int, help="default: the task's (gsm8k: 5)")
    acc.add_argument("--backend", default="mp", choices=["ray", "mp"])
    acc.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    acc.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    acc.add_argument("--mutation", help="inject a catalogued bug into the setups (not the baseline)")
    acc.add_argument("--batch-size", type=int, default=64, help="documents per engine call")
    acc.add_argument("--out", default="parity-accuracy", help="output directory (default: parity-accuracy)")
    acc.set_defaults(func=_accuracy)

    fz = sub.add_parser("fuzz", help="differential testing over random models, inputs and engine configs, "
                        "with shrinking (docs/fuzz.md)")
    limit = fz.add_mutually_exclusive_group()
    limit.add_argument("--budget", type=float, metavar="SECONDS", help="search for this long (then shrink a failure)")
    limit.add_argument("--examples", type=int, metavar="N", help="draw N examples (then shrink a failure)")
    fz.add_argument("--seed", type=int, default=0, help="Hypothesis's seed (the same seed draws the same examples)")
    fz.add_argument("--setups", help="comma-separated setup ids to draw among (default: TP, PP, TPxPP in eager, "
                    "graph and SP-graph modes, with the drawn chunking and SP threshold)")
    fz.add_argument("--mutation", help="run with a catalogued bug injected (parity list mutations)")
    fz.add_argument("--families", help="comma-separated model families to draw (default: llama,qwen2,llava)")
    fz.add_argument("--max-ranks", type=int, default=4, help="largest world size drawn (default 4)")
    fz.add_argument("--shrink-budget", type=float, metavar="SECONDS",
                    help="seconds of shrinking after the first failure (default: 300, or --budget if smaller)")
    fz.add_argument("--backend", default="mp", choices=["ray", "mp"])
    fz.add_argument("--no-replay", action="store_true", help="do not run the reproducer's command after a failure")
    fz.add_argument("--out", default="parity-fuzz", help="output directory: fuzz.json, examples.jsonl, repro/, "
                    "the example database .hypothesis/ (default: parity-fuzz)")
    fz.set_defaults(func=_fuzz)

    lst = sub.add_parser("list", help="list matrices, setups, scenarios, mutations or models")
    lst.add_argument("what", choices=["matrices", "setups", "scenarios", "mutations", "models"])
    lst.set_defaults(func=_list)

    mat = sub.add_parser("matrix", help="print a matrix as JSON, or as a GitHub Actions matrix of shards")
    mat.add_argument("--name", required=True)
    mat.add_argument("--shards", type=int, default=1)
    mat.add_argument("--model", help="the model the shards will run (skips depend on it; default: the matrix's)")
    mat.add_argument("--durations", metavar="DIR", help="an earlier run directory whose case times balance the shards")
    mat.add_argument("--format", default="json", choices=["json", "github"])
    mat.set_defaults(func=_matrix)

    rep = sub.add_parser("report", help="re-render (and merge) run directories into one report")
    rep.add_argument("dirs", nargs="+")
    rep.add_argument("--out", help="output directory (default: the first DIR)")
    rep.add_argument("--previous", action="append", default=[], metavar="DIR",
                     help="an earlier run (a nightly's merged directory) to classify failures against: new, "
                          "recurring, fixed, flaky; repeat it for more runs, most recent first")
    rep.add_argument("--window", type=int, default=7, help="runs looked at for flakiness (default 7)")
    rep.add_argument("--allow-duplicates", action="store_true",
                     help="let a case id recorded in several DIRs take the later DIR's record (listed in "
                          "the report) instead of refusing the merge")
    rep.set_defaults(func=_report)

    demo = sub.add_parser("demo", help="build a tiny model and generate with the single-device engine")
    demo.add_argument("--model", default="tiny-llama", help="built-in model name or checkpoint dir")
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        code: int = args.func(args)
    except (UsageError, ValueError) as exc:
        # One line per problem (a requests file may have several: each on its own line).
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"parity: error: {line}", file=sys.stderr)
        return EXIT_USAGE
    return code


if __name__ == "__main__":
    sys.exit(main())
