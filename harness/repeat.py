"""``parity run --repeat N``: a case whose candidate, run N times, gives different verdicts or
different outputs is flaky.

Each repeat is a whole run of the case (baseline, candidate, checks, comparison, forced replay;
the baseline comes from the cache after the first), so a repeat can differ from another in its
verdict (pass / fail / error) or, with the same verdict, in its outputs: the candidate's tokens,
chosen-token logprobs and top-k (ids and logprobs) of every request and step, compared bit for
bit. An engine that is deterministic gives the same bits on the same inputs every time; one
that is not (a race, a reduction whose order changes, uninitialized memory) is a bug even when
every repeat passes within tolerance, because a nightly gate on it goes red at random.

The case's record (``results.jsonl``) gets ``repeat``: ``{"n", "statuses", "flaky",
"differences", "seconds"}`` (docs/harness.md). A flaky case's status is ``fail`` (the engine's
behaviour changed between repeats), or ``error`` when its repeats differ only in infrastructure
errors (some repeats errored, the others passed with identical outputs); it never passes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from harness.case import CaseResult
from reference_impl.requests import RequestOutput

# Most severe first: the record of a repeated case is that of its first repeat of the worst status.
SEVERITY = ("fail", "error", "pass")
# Output differences kept per case (one per differing repeat, at most this many).
MAX_DIFFERENCES = 10


@dataclass(frozen=True)
class Attempt:
    """One repeat of a case: its result, and the candidate's outputs when it generated any."""

    result: CaseResult
    outputs: list[RequestOutput] | None


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def output_difference(first: Sequence[RequestOutput], other: Sequence[RequestOutput]) -> dict[str, Any] | None:
    """The first place where ``other`` differs from ``first`` bit for bit (request, step, what,
    both values), or None when they are identical."""
    if [o.request_id for o in first] != [o.request_id for o in other]:
        return {"field": "requests", "values": [[o.request_id for o in first], [o.request_id for o in other]]}
    for a, b in zip(first, other):
        where = {"request_id": a.request_id}
        if len(a.token_ids) != len(b.token_ids):
            return {**where, "field": "length", "values": [len(a.token_ids), len(b.token_ids)]}
        for step, (ta, tb) in enumerate(zip(a.token_ids, b.token_ids)):
            if ta != tb:
                return {**where, "step": step, "field": "token", "values": [ta, tb]}
            la, lb = a.logprobs[step], b.logprobs[step]
            if _bits(la) != _bits(lb):
                return {**where, "step": step, "field": "logprob", "values": [la, lb]}
            ka, kb = a.top_logprobs[step], b.top_logprobs[step]
            if [(i, _bits(lp)) for i, lp in ka] != [(i, _bits(lp)) for i, lp in kb]:
                values = [[list(p) for p in ka], [list(p) for p in kb]]
                return {**where, "step": step, "field": "top_k", "values": values}
    return None


def differences(attempts: Sequence[Attempt]) -> list[dict[str, Any]]:
    """Each repeat whose outputs differ from those of the first repeat that produced outputs: its
    first difference, with ``repeat`` and ``against`` (1-based repeat numbers)."""
    produced = [(k, a.outputs) for k, a in enumerate(attempts, start=1) if a.outputs is not None]
    if not produced:
        return []
    (first_k, first), found = produced[0], []
    for k, outputs in produced[1:]:
        diff = output_difference(first, outputs)
        if diff is not None:
            found.append({"repeat": k, "against": first_k, **diff})
    return found[:MAX_DIFFERENCES]


def describe(diff: dict[str, Any]) -> str:
    """One difference in words: ``repeat 3 vs 1: request text1 step 4 logprob -2.3456789 vs -2.3456788``."""
    where = f"request {diff['request_id']}" if "request_id" in diff else "the batch"
    if "step" in diff:
        where += f" step {diff['step']}"
    a, b = diff["values"]
    return f"repeat {diff['repeat']} vs {diff['against']}: {where} {diff['field']} {a!r} vs {b!r}"


def merge(attempts: Sequence[Attempt]) -> CaseResult:
    """One record of a case's repeats: the first repeat of the worst status, with ``repeat`` set;
    a flaky case (statuses or outputs differ) fails, or is an error when only infrastructure
    errors set its repeats apart, with a reason that says how its repeats differ."""
    statuses = [a.result.status for a in attempts]
    worst = min(statuses, key=lambda s: SEVERITY.index(s) if s in SEVERITY else len(SEVERITY))
    worst_k = statuses.index(worst)
    base = attempts[worst_k].result
    diffs = differences(attempts)
    flaky = len(set(statuses)) > 1 or bool(diffs)
    seconds = [round(a.result.seconds, 3) for a in attempts]
    record = {"n": len(attempts), "statuses": statuses, "flaky": flaky, "differences": diffs, "seconds": seconds}
    result = replace(base, repeat=record, seconds=sum(a.result.seconds for a in attempts))
    if not flaky:
        return result
    status = "error" if set(statuses) <= {"pass", "error"} and not diffs else "fail"
    headline = f"flaky over {len(attempts)} repeats: statuses {', '.join(statuses)}"
    if diffs:
        more = f" (and {len(diffs) - 1} more repeats differ)" if len(diffs) > 1 else ""
        headline += f"; outputs differ: {describe(diffs[0])}{more}"
    detail = f"\nrepeat {worst_k + 1} ({worst}): {base.reason}" if base.reason else ""
    return replace(result, status=status, reason=headline + detail)


def flaky(results: Sequence[CaseResult]) -> list[CaseResult]:
    """The repeated cases whose repeats differed."""
    return [r for r in results if r.repeat and r.repeat.get("flaky")]
