"""Compare a candidate setup's generated tokens and logprobs with a baseline's, under a policy.

Two policies (``POLICIES``):

* ``exact``: token ids must be identical for every request and step. Logprobs are not judged,
  only reported in the metrics.
* ``logprobs``: walk each request's steps. While tokens agree, the chosen-token logprobs must agree
  within the dtype's ``Tolerance.logprob_atol``. At the first step where tokens differ, each side's
  token must be within the *other* side's top-k at that step (a near-tie that rounding can flip);
  the request then passes and its later steps are not compared, since they are conditioned on
  different prefixes. Otherwise the divergence is a failure.

Under both policies a request whose two sides generated different numbers of tokens fails (reason
``"length"``): every request runs for exactly ``max_new_tokens``, so a length difference is a bug.
Requests whose ids or order differ between the two sides are a harness bug: ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reference_impl.requests import RequestOutput

POLICIES = ("exact", "logprobs")
REASONS = ("token", "logprob", "length")

TopK = tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Tolerance:
    """How far a candidate's chosen-token logprob may drift from the baseline's, per step,
    while both chose the same token (``|Δ logprob| <= logprob_atol`` passes)."""

    logprob_atol: float


# float32: legitimate differences between setups on this project's tiny models are reduction-order
# noise of a few fp32 ulps: TP sharding vs a single device at most 3.3e-5 (measured), SP vs SP-off
# 0.0 on CPU, the engine vs transformers at most 8.8e-5. 1e-3 leaves >10x headroom over the largest
# of these, yet sits 30x below the smallest top-1/top-2 logprob gap of the tiny models (~0.03) and
# 100x below what real bugs do to logprobs (>0.1: wrong shard, missing all-reduce, bad mask), so
# a bug cannot hide under it. (On CUDA this assumes TF32 matmuls stay off, torch's default.)
FLOAT32_LOGPROB_ATOL = 1e-3

# bfloat16: 8 significand bits, relative precision 2^-8 ~= 0.0039. Logits of magnitude ~10-40
# carry absolute rounding errors of ~0.05-0.15 after a few layers, and a different reduction order
# (TP shards, SP, fused kernels) rounds differently, so logprobs legitimately move by that much.
# Measured on 2 H200s (tiny-llava, bf16, docs/results/gpu-h200x2.md): tp2 eager vs single-device
# eager differs by up to 0.285 (row-parallel partial sums are rounded to bf16 on each rank before
# the all-reduce; one matmul accumulates in fp32), SP vs SP-off by 0.0; on 4 H200s
# (docs/results/gpu-h200x4.md) tp2 x pp2 vs one device by up to 0.285 eager and 0.308 inductor,
# PP+SP vs PP by 0.0. 0.5 leaves 1.6x headroom over the largest; gross bugs (wrong shard or rank
# order, dropped residual) move logprobs by whole nats or flip tokens out of the top-k and still
# fail. Subtler bugs (~0.1) are the fp32 runs' job. At bf16, near-ties can legitimately flip the
# greedy token; the logprobs policy tolerates that through its top-k rule, not through this atol.
BFLOAT16_LOGPROB_ATOL = 0.5

TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(logprob_atol=FLOAT32_LOGPROB_ATOL),
    "bfloat16": Tolerance(logprob_atol=BFLOAT16_LOGPROB_ATOL),
}


def tolerance_for(dtype: str) -> Tolerance:
    """The ``Tolerance`` for a dtype name ("float32" | "bfloat16"); ``ValueError`` otherwise."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"dtype={dtype!r}: no tolerance; choose from {', '.join(TOLERANCES)}") from None


@dataclass(frozen=True)
class Divergence:
    """Where a candidate and its baseline part ways, with what each side saw at that step.

    A side's token, logprob and top-k are ``None`` / empty when it has no token at ``step``
    (reason ``"length"``). ``logprob_diff`` is ``|candidate_logprob - baseline_logprob|`` (of
    different tokens when reason is ``"token"``), ``None`` when either side is missing.
    ``tolerated``: a near-tie token divergence the ``logprobs`` policy accepts.
    """

    request_id: str
    step: int
    candidate_token: int | None
    baseline_token: int | None
    candidate_top_k: TopK
    baseline_top_k: TopK
    candidate_logprob: float | None
    baseline_logprob: float | None
    logprob_diff: float | None
    reason: str
    tolerated: bool = False

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"reason {self.reason!r} not in {REASONS}")

    @property
    def candidate_in_baseline_top_k(self) -> bool:
        """Whether the candidate's token is among the baseline's top-k at this step."""
        return _in_top_k(self.candidate_token, self.baseline_top_k)

    @property
    def baseline_in_candidate_top_k(self) -> bool:
        """Whether the baseline's token is among the candidate's top-k at this step."""
        return _in_top_k(self.baseline_token, self.candidate_top_k)

    def to_json(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict (top-k as lists of ``[id, logprob]``)."""
        return {
            "request_id": self.request_id,
            "step": self.step,
            "candidate_token": self.candidate_token,
            "baseline_token": self.baseline_token,
            "candidate_top_k": [[tok, lp] for tok, lp in self.candidate_top_k],
            "baseline_top_k": [[tok, lp] for tok, lp in self.baseline_top_k],
            "candidate_logprob": self.candidate_logprob,
            "baseline_logprob": self.baseline_logprob,
            "logprob_diff": self.logprob_diff,
            "reason": self.reason,
            "tolerated": self.tolerated,
        }

    def describe(self, atol: float) -> str:
        """One paragraph: request, step, both tokens with logprobs, both top-k, and why."""
        head = (
            f"request {self.request_id} step {self.step}: "
            f"candidate {_side(self.candidate_token, self.candidate_logprob, self.step)} vs "
            f"baseline {_side(self.baseline_token, self.baseline_logprob, self.step)}"
        )
        tops = (
            f"candidate top-{len(self.candidate_top_k)} {_fmt_top_k(self.candidate_top_k)}; "
            f"baseline top-{len(self.baseline_top_k)} {_fmt_top_k(self.baseline_top_k)}"
        )
        return f"{head}; {tops}; {self._why(atol)}"

    def _why(self, atol: float) -> str:
        """The reason clause of ``describe``."""
        if self.reason == "length":
            short = "candidate" if self.candidate_token is None else "baseline"
            return f"different number of generated tokens: {short} stops after {self.step} tokens"
        diff = f"|Δ logprob| {_fmt_float(self.logprob_diff)}"
        if self.reason == "logprob":
            return f"same token but {diff} > atol {atol:.2g}"
        membership = (
            f"candidate token {self.candidate_token} {_is(self.candidate_in_baseline_top_k)} in "
            f"baseline top-{len(self.baseline_top_k)}, baseline token {self.baseline_token} "
            f"{_is(self.baseline_in_candidate_top_k)} in candidate top-{len(self.candidate_top_k)}"
        )
        if self.tolerated:
            return f"tokens differ: {membership} (tolerated near-tie; later steps not compared)"
        return f"tokens differ: {membership}; {diff}"


@dataclass(frozen=True)
class Verdict:
    """The outcome of ``compare``.

    ``first_divergence``: the earliest failing divergence (earliest step, ties broken by request
    order), else the earliest tolerated one, else ``None``. ``divergences``: all that were found,
    in that order (at most one token or length divergence and one logprob divergence per request).
    ``metrics``: ``requests``, ``steps_compared`` (steps examined: agreeing ones plus each
    request's divergent step), ``tokens_identical``, ``max_logprob_diff`` (over compared steps
    whose tokens agree; 0.0 when none), ``steps_over_atol``, ``divergent_requests`` (whose tokens
    or lengths differ), ``failing_requests``, ``tolerated_divergences``, ``atol``, ``dtype``.
    """

    passed: bool
    policy: str
    first_divergence: Divergence | None
    metrics: dict[str, Any] = field(default_factory=dict)
    divergences: tuple[Divergence, ...] = ()

    def message(self) -> str:
        """A self-explanatory account of the verdict, fit for a pytest assertion message."""
        atol = float(self.metrics.get("atol", math.nan))
        status = "PASS" if self.passed else "FAIL"
        context = f"{status} [policy {self.policy}, {self.metrics.get('dtype', '?')} atol {atol:.2g}]"
        if self.first_divergence is None:
            return (
                f"{context}: {self.metrics.get('requests', 0)} requests, "
                f"{self.metrics.get('steps_compared', 0)} steps, tokens identical, "
                f"max |Δ logprob| {_fmt_float(self.metrics.get('max_logprob_diff'))}"
            )
        text = f"{context}: {self.first_divergence.describe(atol)}"
        failing = [d for d in self.divergences if not d.tolerated]
        if len(failing) > 1:
            requests = self.metrics.get("failing_requests")
            text += f" [{len(failing)} failing divergences in {requests} requests]"
        return text


def compare(
    candidate: Sequence[RequestOutput],
    baseline: Sequence[RequestOutput],
    policy: str = "logprobs",
    dtype: str = "float32",
) -> Verdict:
    """Judge ``candidate`` against ``baseline`` (same requests, same order) under ``policy``.

    ``ValueError`` for an unknown policy or dtype, request ids or order that differ, or an output
    whose token_ids, logprobs and top_logprobs have different lengths (harness bugs, not verdicts).
    """
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r}: choose from {', '.join(POLICIES)}")
    atol = tolerance_for(dtype).logprob_atol
    _check_structure(candidate, baseline)
    walks = [_walk(c, b, policy, atol) for c, b in zip(candidate, baseline)]
    ordered = _order(walks)
    failing = [d for d in ordered if not d.tolerated]
    first = failing[0] if failing else (ordered[0] if ordered else None)
    metrics = _metrics(walks, candidate, baseline, atol, dtype)
    return Verdict(not failing, policy, first, metrics, tuple(ordered))


@dataclass(frozen=True)
class _Walk:
    """What walking one request's steps found."""

    diffs: tuple[float, ...]
    divergences: tuple[Divergence, ...]
    steps: int
    over_atol: int


def _check_structure(candidate: Sequence[RequestOutput], baseline: Sequence[RequestOutput]) -> None:
    """Raise ``ValueError`` if the two sides are not the same requests in the same order, or an
    output is internally inconsistent."""
    cand_ids = [o.request_id for o in candidate]
    base_ids = [o.request_id for o in baseline]
    if cand_ids != base_ids:
        raise ValueError(
            f"candidate and baseline hold different requests or orders: candidate {cand_ids}, "
            f"baseline {base_ids} (a harness bug: both sides must run the same requests)"
        )
    for side, outputs in (("candidate", candidate), ("baseline", baseline)):
        for o in outputs:
            lens = (len(o.token_ids), len(o.logprobs), len(o.top_logprobs))
            if len(set(lens)) != 1:
                raise ValueError(
                    f"{side} request {o.request_id}: token_ids, logprobs and top_logprobs have "
                    f"lengths {lens}; they must have one entry per generated token"
                )


def _walk(cand: RequestOutput, base: RequestOutput, policy: str, atol: float) -> _Walk:
    """Compare one request step by step until the tokens differ or a side runs out."""
    diffs: list[float] = []
    found: list[Divergence] = []
    over = 0
    steps = min(len(cand.token_ids), len(base.token_ids))
    examined = steps
    for step in range(steps):
        if cand.token_ids[step] != base.token_ids[step]:
            tolerated = policy == "logprobs" and _near_tie(cand, base, step)
            found.append(_divergence(cand, base, step, "token", tolerated))
            examined = step + 1
            break
        diff = abs(cand.logprobs[step] - base.logprobs[step])
        diffs.append(diff)
        if not diff <= atol:  # also true for NaN
            over += 1
            if policy == "logprobs" and over == 1:
                found.append(_divergence(cand, base, step, "logprob", False))
    if len(cand.token_ids) != len(base.token_ids):
        found.append(_divergence(cand, base, steps, "length", False))
    return _Walk(tuple(diffs), tuple(found), examined, over)


def _near_tie(cand: RequestOutput, base: RequestOutput, step: int) -> bool:
    """Whether each side's token at ``step`` is within the other side's top-k there."""
    return _in_top_k(cand.token_ids[step], _top_k(base, step)) and _in_top_k(
        base.token_ids[step], _top_k(cand, step)
    )


def _divergence(
    cand: RequestOutput, base: RequestOutput, step: int, reason: str, tolerated: bool
) -> Divergence:
    """A ``Divergence`` at ``step`` from both sides' records (a side past its end is missing)."""
    c_lp, b_lp = _at(cand.logprobs, step), _at(base.logprobs, step)
    diff = abs(c_lp - b_lp) if c_lp is not None and b_lp is not None else None
    return Divergence(
        request_id=cand.request_id,
        step=step,
        candidate_token=_at(cand.token_ids, step),
        baseline_token=_at(base.token_ids, step),
        candidate_top_k=_top_k(cand, step),
        baseline_top_k=_top_k(base, step),
        candidate_logprob=c_lp,
        baseline_logprob=b_lp,
        logprob_diff=diff,
        reason=reason,
        tolerated=tolerated,
    )


def _order(walks: Sequence[_Walk]) -> list[Divergence]:
    """All divergences, earliest step first, ties broken by request order."""
    keyed = [(d.step, i, d) for i, w in enumerate(walks) for d in w.divergences]
    return [d for _, _, d in sorted(keyed, key=lambda k: (k[0], k[1]))]


def _metrics(
    walks: Sequence[_Walk],
    candidate: Sequence[RequestOutput],
    baseline: Sequence[RequestOutput],
    atol: float,
    dtype: str,
) -> dict[str, Any]:
    """The verdict's metrics (see ``Verdict``)."""
    diffs = [d for w in walks for d in w.diffs]
    return {
        "requests": len(walks),
        "steps_compared": sum(w.steps for w in walks),
        "tokens_identical": all(c.token_ids == b.token_ids for c, b in zip(candidate, baseline)),
        "max_logprob_diff": _max(diffs),
        "steps_over_atol": sum(w.over_atol for w in walks),
        "divergent_requests": sum(any(d.reason != "logprob" for d in w.divergences) for w in walks),
        "failing_requests": sum(any(not d.tolerated for d in w.divergences) for w in walks),
        "tolerated_divergences": sum(d.tolerated for w in walks for d in w.divergences),
        "atol": atol,
        "dtype": dtype,
    }


def _max(values: Sequence[float]) -> float:
    """The largest value, NaN if any is NaN, 0.0 for none."""
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values, default=0.0)


def _top_k(out: RequestOutput, step: int) -> TopK:
    """The top-k ``(id, logprob)`` pairs of ``out`` at ``step``, empty past its end."""
    if step >= len(out.top_logprobs):
        return ()
    return tuple((int(tok), float(lp)) for tok, lp in out.top_logprobs[step])


def _in_top_k(token: int | None, top_k: TopK) -> bool:
    """Whether ``token`` is one of the ids in ``top_k``."""
    return token is not None and any(tok == token for tok, _ in top_k)


def _at(values: Sequence[Any], step: int) -> Any:
    """``values[step]``, or ``None`` past the end."""
    return values[step] if step < len(values) else None


def _side(token: int | None, logprob: float | None, step: int) -> str:
    """One side's token and logprob for a message."""
    if token is None:
        return f"no token (its output ends after {step} tokens)"
    return f"token {token} (logprob {_fmt_float(logprob, '.6g')})"


def _fmt_top_k(top_k: TopK) -> str:
    """``[id: logprob, ...]``."""
    return "[" + ", ".join(f"{tok}: {lp:.4g}" for tok, lp in top_k) + "]"


def _fmt_float(value: float | None, spec: str = ".2e") -> str:
    """A float for a message, ``n/a`` for ``None``."""
    return "n/a" if value is None else format(value, spec)


def _is(flag: bool) -> str:
    return "is" if flag else "is NOT"
