"""What a case's outcome is, beyond the comparison of its tokens: who is to blame for an exception,
whether the TP ranks agreed on what they sampled, and whether an SP setup really ran SP.

``fail`` means the engine under test got the case wrong; ``error`` means only the infrastructure
did (a worker process died, a timeout, rendezvous, Ray, resources). A green that checked nothing
is the worst verdict a harness can give, so a sequence-parallel case whose pass rewrote no graph
of the steps it ran is a ``fail`` too: it would equal its baseline and pass vacuously.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from harness.case import HF_BASELINE, Case
from harness.launch.base import EngineRun, RankReport, WorkerError
from harness.setup import ParallelSetup
from reference_impl.compile.config import COLLECTIVES, SP_PATTERNS
from reference_impl.config import TextConfig

# How the reason of a case whose engine code raised begins (``parity selftest`` marks such catches).
ENGINE_RAISED = "engine raised"
# Frames of these paths in a rank's traceback are the reference engine (the catalogued mutations
# patch it from harness/mutations): an exception raised through them is the engine's. Another
# engine names its own (``EngineKind.code_paths``; transformers: its library and its adapter).
ENGINE_PATHS = ("reference_impl/", "harness/mutations/")
# Messages of communication failures: a peer that died or hung makes the others raise these,
# through engine frames too, so they are infrastructure whatever the traceback holds.
INFRA_PATTERNS = re.compile(
    r"gloo|nccl|Connection (closed|reset|refused)|Broken pipe|Timed out|timed out|DistBackendError|"
    r"DistNetworkError|ProcessGroup|rendezvous|Socket|CUDA out of memory|OutOfMemoryError|MemoryError",
)
# How a reason words each way a rank failed other than raising.
KIND_WORDS = {"died": "died", "timeout": "timed out", "startup": "failed to start"}


def worker_failure(err: WorkerError, side: str, setup_id: str, case_timeout: float | None = None,
                   code_paths: Sequence[str] = ENGINE_PATHS) -> tuple[str, str]:
    """``(status, reason)`` for a ``WorkerError`` raised while ``side`` ("candidate" |
    "baseline") ``setup_id`` ran: ``fail`` when the engine's code (``code_paths``: the engine
    that side ran) raised in a rank, else ``error`` (``case_timeout``: the case's limit, named in
    the reason of a timeout). The reason names the side, the setup (whose id names its engine,
    e.g. ``tp2-eager@transformers``), the rank, the exception and the innermost engine frame."""
    where = f"{side} {setup_id}" + (f", rank {err.rank}" if err.rank >= 0 else "")
    if err.kind == "timeout" and case_timeout is not None:
        where += f" (case timeout {case_timeout:.0f}s)"
    if err.kind != "raised":
        # The first line says what happened (signal, memory, which ranks were silent); the rest is
        # the evidence: the rank's last output lines, or every rank's stack.
        return "error", f"infrastructure: {where} {KIND_WORDS.get(err.kind, err.kind)}: {err.detail}"
    exception = _last_line(err.detail)
    frame = _engine_frame(err.detail, code_paths)
    if INFRA_PATTERNS.search(exception):
        return "error", f"infrastructure: {where} lost its peers or resources: {exception}"
    if frame is None:
        return "error", f"infrastructure: {where} raised outside the engine: {exception}"
    return "fail", f"{ENGINE_RAISED} in {where}: {exception} (at {frame})\n\n{err.detail}"


def with_layout(reason: str, text: TextConfig, tp: int) -> str:
    """``reason`` of a rank that raised, with the model's head layout under ``tp`` as its second
    line (facts, not a diagnosis: a reshape error next to "fewer KV heads than TP ranks" explains
    itself; the first line stays the headline)."""
    if tp == 1:
        return reason
    layout = (f"layout: tp={tp}; num_attention_heads={text.num_heads}, num_key_value_heads={text.num_kv_heads}, "
              f"head_dim={text.head_dim}")
    if text.num_kv_heads < tp:
        per_rank = text.num_kv_heads * text.head_dim / tp
        layout += (f": fewer KV heads than TP ranks, so a k/v projection split by output features gives each "
                   f"rank {per_rank:g} of one head's {text.head_dim} features unless the KV heads are replicated")
    headline, _, rest = reason.partition("\n")
    return f"{headline}\n{layout}\n{rest}"


def _last_line(text: str) -> str:
    return next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "")


def _engine_frame(traceback_text: str, code_paths: Sequence[str] = ENGINE_PATHS) -> str | None:
    """The innermost traceback frame in engine code (``code_paths``), as ``path:line in function``."""
    found = None
    for m in re.finditer(r'File "([^"]+)", line (\d+), in (\S+)', traceback_text):
        path = m.group(1).replace("\\", "/")
        for root in code_paths:
            if root in path:
                found = f"{root}{path.split(root, 1)[1]}:{m.group(2)} in {m.group(3)}"
    return found


def rank_disagreement(run: EngineRun) -> str | None:
    """Why the ranks' recorded tokens differ (every rank records every sampled token: the last
    stage's TP ranks each sample from their own logits), or None when they all agree."""
    reference = run.ranks[0]
    for report in run.ranks[1:]:
        for i, (ours, theirs) in enumerate(zip(reference.token_ids, report.token_ids, strict=True)):
            if ours != theirs:
                step = next((s for s, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                return (f"ranks disagree on sampled tokens: request #{i} step {step}: rank {reference.rank} "
                        f"recorded {list(ours[step:step + 1])}, rank {report.rank} {list(theirs[step:step + 1])}")
    return None


_COLLECTIVES = tuple(COLLECTIVES)


def rank_memory(ranks: Sequence[RankReport]) -> dict[str, list[int]]:
    """The candidate's memory per rank, in MiB: ``rank_peak_rss_mib`` (the rank process's peak
    resident set so far: a pooled worker's covers every engine it has built) and
    ``rank_weights_mib`` (its weights); empty when the ranks did not report it."""
    if not any(r.peak_rss_bytes for r in ranks):
        return {}
    mib = 1 << 20
    return {"rank_peak_rss_mib": [round(r.peak_rss_bytes / mib) for r in ranks],
            "rank_weights_mib": [round(r.weight_bytes / mib) for r in ranks]}


def sp_matches(ranks: Sequence[RankReport]) -> dict[str, Any] | None:
    """Per rank, per compiled step graph (``<input>/T=<tokens>``) the SP matches by pattern and the
    collectives left, summed over the graph's pieces; None when nothing was compiled (eager)."""
    if not any(r.steps for r in ranks):
        return None
    per_rank: dict[str, dict[str, dict[str, int]]] = {}
    for report in ranks:
        graphs: dict[str, dict[str, int]] = {}
        for step in report.steps:
            counts = dict.fromkeys(SP_PATTERNS + _COLLECTIVES, 0)
            for piece in step["pieces"]:
                for k in SP_PATTERNS:
                    counts[k] += int(piece["sp_matches"][k])
                for k in _COLLECTIVES:
                    counts[k] += int(piece["collectives"][k])
            graphs[f"{step['input']}/T={step['num_tokens']}"] = counts
        per_rank[str(report.rank)] = graphs
    return {"ranks": per_rank, **_sizes(per_rank)}


def _sizes(per_rank: dict[str, dict[str, dict[str, int]]]) -> dict[str, list[int]]:
    """Step sizes (padded tokens) whose graphs SP rewrote on some rank, and those it did not."""
    applied: set[int] = set()
    seen: set[int] = set()
    for graphs in per_rank.values():
        for name, counts in graphs.items():
            size = int(name.rsplit("=", 1)[1])
            seen.add(size)
            if any(counts[k] for k in SP_PATTERNS):
                applied.add(size)
    return {"sp_applied_sizes": sorted(applied), "sp_unapplied_sizes": sorted(seen - applied)}


def sp_vacuity(setup: ParallelSetup, matches: dict[str, Any] | None) -> tuple[str | None, str]:
    """``(fail reason or None, note)`` for an SP setup: a fail when SP rewrote no graph of the steps
    the case ran ("SP never applied"); a note naming the sizes it applied to and those it did not
    when both occur (the SP token threshold at work). Non-SP setups: ``(None, "")``."""
    if not setup.sp:
        return None, ""
    if matches is None or not matches["sp_applied_sizes"]:
        sizes = ", ".join(map(str, (matches or {}).get("sp_unapplied_sizes", []))) or "none recorded"
        return (f"vacuous: SP never applied: {setup.id}'s sequence-parallelism pass rewrote no graph of the "
                f"steps this case ran (step sizes {sizes}; sp_min_tokens={setup.sp_min_tokens}), so the case "
                "compared SP-off with SP-off"), ""
    if matches["sp_unapplied_sizes"]:
        return None, (f"SP applied to steps of {_list(matches['sp_applied_sizes'])} tokens, not to "
                      f"{_list(matches['sp_unapplied_sizes'])} (sp_min_tokens={setup.sp_min_tokens})")
    return None, f"SP applied to every step ({_list(matches['sp_applied_sizes'])} tokens)"


def _list(sizes: Sequence[int]) -> str:
    return ", ".join(map(str, sizes))


def policy_for(case: Case, requested: str) -> str:
    """The comparison policy of a case. ``auto``: ``identical`` for an SP setup against itself
    with SP off (the pair is bit-identical when clean: measured, docs/harness.md), ``logprobs``
    for everything else; any other value is used as given."""
    if requested != "auto":
        return requested
    base = case.baseline
    if base != HF_BASELINE and isinstance(base, ParallelSetup) and case.setup.sp and base == case.setup.baseline():
        return "identical"
    return "logprobs"
