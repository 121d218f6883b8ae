"""Compare a candidate setup's generated tokens and logprobs with a baseline's, under a policy.

Three policies (``POLICIES``); under every one a non-finite logprob on either side fails (reason
``"nonfinite"``) and so does a request whose two sides generated different numbers of tokens
(``"length"``: every request runs for exactly ``max_new_tokens``):

* ``exact``: token ids must be identical for every request and step. Logprobs are not judged,
  only reported in the metrics.
* ``logprobs``: walk each request's steps. While tokens agree, the chosen-token logprobs must agree
  within the dtype's ``Tolerance.logprob_atol`` (``"logprob"``) and so must the top-k: the same
  ids with logprobs within atol, where an id that only one side lists must sit within atol of the
  other side's k-th logprob, so that noise could have swapped it out (``"topk"``). Where tokens
  differ (``"token"``), the flip is tolerated only as a near-tie: each side's own token leads the
  other side's token by at most ``Tolerance.near_tie`` nats on that side, and at most once per
  request. After a flip the two sides continue on different prefixes, so the free-running
  streams cannot be compared further: the orchestrator replays the candidate forced along the
  baseline's tokens (``Request.forced_tokens``) and ``compare(..., forced=...)`` walks that
  replay instead, where every step shares the baseline's prefix and is compared in full (the
  candidate's own greedy choice is its top-1; a second flip fails). Without a replay the steps
  after a tolerated flip are counted in ``metrics["steps_not_compared"]``, never silently.
* ``identical``: for pairs that are bit-identical when clean (SP vs SP off on the same ranks):
  tokens identical (no flip tolerated), logprobs and top-k within the dtype's measured noise
  floor ``Tolerance.identical_atol``.

Requests whose ids or order differ between the two sides are a harness bug: ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reference_impl.requests import RequestOutput

POLICIES = ("exact", "logprobs", "identical")
REASONS = ("token", "logprob", "topk", "length", "nonfinite")

TopK = tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Tolerance:
    """Per dtype: ``logprob_atol`` (|Δ logprob| of the chosen token, same prefix, under
    ``logprobs``), ``topk_atol`` (the same for the other top-k entries: far below the top, their
    logprobs carry the rounding of two logits, the token's and the top's), ``near_tie`` (how far a
    side's own token may lead the other side's token for a flip to be tolerated) and
    ``identical_atol`` (the noise floor of the ``identical`` policy, chosen and top-k alike)."""

    logprob_atol: float
    topk_atol: float
    near_tie: float
    identical_atol: float
    max_flips: int = 1  # near-tie flips tolerated per request (in its forced replay)


# Every figure below was measured with ``python -m harness.calibrate`` (docs/harness.md): the smoke
# matrix on tiny-llava, input seeds 0-2, each candidate replayed along its baseline's tokens so that
# every step of every request is compared on the same prefix; "parallel" is TP/PP against one
# device, "oracle" the one-device engine against transformers, "identical pairs" SP against SP off.

# float32, this project's CPU machine (gloo): parallel pairs differ by at most 2.7e-5 on the chosen
# token and 7.0e-5 on other top-k entries, the oracle by 4.3e-5 and 1.8e-4; no token ever flips.
# 1e-3 for both leaves 5x headroom over the largest (the oracle's top-k tail), yet sits 30x below
# the smallest top-1/top-2 logprob gap of the tiny models (~0.03) and far below what real bugs do
# (docs/detection.md: the margins against every catalogued bug). (On CUDA this assumes
# TF32 matmuls stay off, torch's default.)
FLOAT32_LOGPROB_ATOL = 1e-3
FLOAT32_TOPK_ATOL = 1e-3

# bfloat16 (8 significand bits) on this CPU machine: parallel pairs differ by up to 1.20 on the
# chosen token and 3.14 on other top-k entries, and flip tokens whose logprobs were up to 1.25
# apart; the oracle by up to 0.56 and 2.94 (tiny-llava's weights are drawn large, so its bf16
# activations carry large absolute rounding errors; row-parallel partial sums are rounded to bf16
# before the all-reduce). On 2 and 4 H200s the chosen token moved by at most 0.285-0.308
# (docs/results/). The tolerances cover the CPU figures with 1.6x: 2.0 on the chosen token, 5.0
# on the top-k tail. A bf16 TP-vs-one-device comparison therefore catches gross bugs only (wrong
# shard, rank order or KV head: whole-vocabulary changes); bf16's fine detection comes from the
# pairs that are bit-identical when clean (the ``identical`` policy below) and from fp32 runs.
BFLOAT16_LOGPROB_ATOL = 2.0
BFLOAT16_TOPK_ATOL = 5.0

# A flip is noise only if noise could have made it: each side's token may lead the other's by no
# more than rounding moves two tokens' logprobs apart. (The old rule, "each token in the other's
# top-5", tolerated a 5-nat gap and passed an engine that had dropped a layer.) fp32: no clean run
# has flipped a token (smallest top-1/top-2 gap of the tiny models ~0.03), so the fp32 atol. bf16:
# the largest clean flip gap measured is 1.25 (above), 2.0 gives 1.6x.
FLOAT32_NEAR_TIE = FLOAT32_LOGPROB_ATOL
BFLOAT16_NEAR_TIE = 2.0

# Near-tie flips tolerated per request, counted on its forced replay (every step on the baseline's
# prefix). fp32: one, and no clean run has needed it. bf16: the most any clean request showed over
# the 3-seed calibration is 3 (parallel pairs, 61 flips in 36 cases; the oracle: 2), so 5; each
# flip must still be a near-tie and every step's logprobs stay within the atols.
FLOAT32_MAX_FLIPS = 1
BFLOAT16_MAX_FLIPS = 5

# Noise floors of the ``identical`` policy (SP against SP off). Measured: 0.0 in both dtypes,
# chosen and top-k, over 60 pairs x 3 seeds (3,840 steps) on CPU / gloo; 0.0 on 2 and 4 H200s
# for the chosen token (NCCL top-k figures: the multi-GPU runs). A pair that stops being
# bit-identical must show it, so the floors stay near one rounding step: fp32 1e-6 (about 8 ulps
# of a logprob of magnitude 1); bf16 1/32 (a quarter of a bf16 ulp of a logit between 16 and 32),
# 60x under the bf16 logprob atol. The #33322 slice moves bf16 prompt-embeds logprobs by whole
# nats (docs/detection.md).
FLOAT32_IDENTICAL_ATOL = 1e-6
BFLOAT16_IDENTICAL_ATOL = 1 / 32

TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(FLOAT32_LOGPROB_ATOL, FLOAT32_TOPK_ATOL, FLOAT32_NEAR_TIE, FLOAT32_IDENTICAL_ATOL,
                         FLOAT32_MAX_FLIPS),
    "bfloat16": Tolerance(BFLOAT16_LOGPROB_ATOL, BFLOAT16_TOPK_ATOL, BFLOAT16_NEAR_TIE, BFLOAT16_IDENTICAL_ATOL,
                          BFLOAT16_MAX_FLIPS),
}


def tolerance_for(dtype: str) -> Tolerance:
    """The ``Tolerance`` for a dtype name ("float32" | "bfloat16"); ``ValueError`` otherwise."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"dtype={dtype!r}: no tolerance; choose from {', '.join(TOLERANCES)}") from None


def policy_atol(policy: str, dtype: str) -> tuple[float, float]:
    """The (chosen, top-k) logprob atols a policy applies for ``dtype`` (``exact`` reports
    logprobs only)."""
    tol = tolerance_for(dtype)
    if policy == "identical":
        return tol.identical_atol, tol.identical_atol
    return tol.logprob_atol, tol.topk_atol


@dataclass(frozen=True)
class Divergence:
    """Where a candidate and its baseline part ways, with what each side saw at that step.

    A side's token, logprob and top-k are ``None`` / empty when it has no token at ``step``
    (reason ``"length"``). ``logprob_diff`` is how far the two sides score the same token on the
    same prefix: ``|candidate_logprob - baseline_logprob|`` when both chose the same token; for
    a flip (``flip_logprob_diff``) the larger of the two tokens' differences where both sides
    score the token (``None`` when neither does, or a side is missing), never a difference
    between two different tokens; the metrics' ``max_logprob_diff`` includes it, so the two
    agree. For a flip, ``candidate_gap`` / ``baseline_gap`` are how far each side's own
    token leads the other side's token there (``None``: the other token is not in that side's
    top-k). ``tolerated``: a near-tie flip the ``logprobs`` policy accepts. ``replayed``: found
    while walking the candidate's replay forced along the baseline's tokens.
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
    candidate_gap: float | None = None
    baseline_gap: float | None = None
    replayed: bool = False
    detail: str = ""

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
        data = asdict(self)
        data["candidate_top_k"] = [[tok, lp] for tok, lp in self.candidate_top_k]
        data["baseline_top_k"] = [[tok, lp] for tok, lp in self.baseline_top_k]
        return data

    def describe(self, atol: float, near_tie: float | None = None) -> str:
        """One paragraph: request, step, both tokens with logprobs, both top-k, and why."""
        head = (
            f"request {self.request_id} step {self.step}{' (forced replay)' if self.replayed else ''}: "
            f"candidate {_side(self.candidate_token, self.candidate_logprob, self.step)} vs "
            f"baseline {_side(self.baseline_token, self.baseline_logprob, self.step)}"
        )
        tops = (
            f"candidate top-{len(self.candidate_top_k)} {_fmt_top_k(self.candidate_top_k)}; "
            f"baseline top-{len(self.baseline_top_k)} {_fmt_top_k(self.baseline_top_k)}"
        )
        return f"{head}; {tops}; {self._why(atol, atol if near_tie is None else near_tie)}"

    def _why(self, atol: float, near_tie: float) -> str:
        """The reason clause of ``describe``."""
        if self.reason == "length":
            short = "candidate" if self.candidate_token is None else "baseline"
            return f"different number of generated tokens: {short} stops after {self.step} tokens"
        if self.reason == "nonfinite":
            return f"non-finite logprob ({self.detail})"
        diff = f"|Δ logprob| {_fmt_float(self.logprob_diff)}"
        if self.reason == "logprob":
            return f"same token but {diff} > atol {atol:.2g}"
        if self.reason == "topk":
            return f"same token, top-k differs: {self.detail}"
        gaps = (f"candidate's token leads the baseline's by {_fmt_float(self.candidate_gap)} on the candidate, "
                f"baseline's leads by {_fmt_float(self.baseline_gap)} on the baseline (n/a: not in top-k)")
        if self.tolerated:
            return f"tokens differ: a near-tie: {gaps}, both <= {near_tie:.2g} (tolerated)"
        why = self.detail or f"not a near-tie (needs both gaps <= {near_tie:.2g})"
        return f"tokens differ: {gaps}; {why}"


@dataclass(frozen=True)
class Verdict:
    """The outcome of ``compare``.

    ``first_divergence``: the earliest failing divergence (earliest step, ties broken by request
    order), else the earliest tolerated one, else ``None``. ``divergences``: every divergence
    found, in that order. ``replay``: ids of the requests whose free-running walk ended in a
    tolerated flip and that were not given a forced replay (their later steps are uncompared).
    ``metrics``: ``requests``, ``steps_compared``, ``steps_not_compared``, ``tokens_identical``,
    ``max_logprob_diff`` (the same token on both sides, same prefix: the chosen token's, and at a
    flip the divergence's ``logprob_diff``; 0.0 when none), ``max_topk_diff`` (top-k ids
    listed on both sides), ``steps_over_atol``, ``divergent_requests`` (tokens or lengths
    differ), ``failing_requests``, ``tolerated_divergences``, ``replayed_requests``, ``atol``,
    ``near_tie``, ``dtype``.
    """

    passed: bool
    policy: str
    first_divergence: Divergence | None
    metrics: dict[str, Any] = field(default_factory=dict)
    divergences: tuple[Divergence, ...] = ()
    replay: tuple[str, ...] = ()

    def message(self) -> str:
        """A self-explanatory account of the verdict, fit for a pytest assertion message."""
        atol = float(self.metrics.get("atol", math.nan))
        near_tie = float(self.metrics.get("near_tie", atol))
        status = "PASS" if self.passed else "FAIL"
        context = f"{status} [policy {self.policy}, {self.metrics.get('dtype', '?')} atol {atol:.2g}]"
        if self.first_divergence is None:
            return (
                f"{context}: {self.metrics.get('requests', 0)} requests, "
                f"{self.metrics.get('steps_compared', 0)} steps, tokens identical, "
                f"max |Δ logprob| {_fmt_float(self.metrics.get('max_logprob_diff'))}"
            )
        text = f"{context}: {self.first_divergence.describe(atol, near_tie)}"
        failing = [d for d in self.divergences if not d.tolerated]
        if len(failing) > 1:
            requests = self.metrics.get("failing_requests")
            text += f" [{len(failing)} failing divergences in {requests} requests]"
        if self.metrics.get("steps_not_compared"):
            text += f" [{self.metrics['steps_not_compared']} steps after tolerated flips not compared: no replay]"
        return text


def compare(
    candidate: Sequence[RequestOutput],
    baseline: Sequence[RequestOutput],
    policy: str = "logprobs",
    dtype: str = "float32",
    forced: Mapping[str, RequestOutput] | None = None,
) -> Verdict:
    """Judge ``candidate`` against ``baseline`` (same requests, same order) under ``policy``.

    ``forced``: the candidate's replays forced along the baseline's tokens, by request id (see
    the module docstring); a request found there is judged on its replay.
    ``ValueError`` for an unknown policy or dtype, request ids or order that differ, or an output
    whose token_ids, logprobs and top_logprobs have different lengths (harness bugs, not verdicts).
    """
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r}: choose from {', '.join(POLICIES)}")
    atol, topk_atol = policy_atol(policy, dtype)
    tol = tolerance_for(dtype)
    rules = _Rules(policy, atol, topk_atol, tol.near_tie, tol.max_flips)
    _check_structure(candidate, baseline)
    forced = forced or {}
    walks = []
    for c, b in zip(candidate, baseline, strict=True):
        replay = forced.get(c.request_id)
        if replay is not None:
            _check_structure([replay], [b])
        walks.append(_walk_forced(replay, b, rules) if replay is not None else _walk(c, b, rules))
    ordered = _order(walks)
    failing = [d for d in ordered if not d.tolerated]
    first = failing[0] if failing else (ordered[0] if ordered else None)
    metrics = _metrics(walks, candidate, baseline, rules, dtype)
    replay_ids = tuple(w.request_id for w in walks if w.not_compared)
    return Verdict(not failing, policy, first, metrics, tuple(ordered), replay_ids)


@dataclass(frozen=True)
class _Rules:
    policy: str
    atol: float
    topk_atol: float
    near_tie: float
    max_flips: int

    @property
    def judges_logprobs(self) -> bool:
        return self.policy != "exact"


@dataclass
class _Walk:
    """What walking one request's steps found."""

    request_id: str
    diffs: list[float] = field(default_factory=list)
    topk_diffs: list[float] = field(default_factory=list)
    divergences: list[Divergence] = field(default_factory=list)
    steps: int = 0
    over_atol: int = 0
    not_compared: int = 0
    replayed: bool = False


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


def _walk(cand: RequestOutput, base: RequestOutput, rules: _Rules) -> _Walk:
    """Compare one free-running request step by step; stop at a flip (a failing one, or a
    tolerated one whose later steps await a forced replay)."""
    walk = _Walk(cand.request_id)
    steps = min(len(cand.token_ids), len(base.token_ids))
    for step in range(steps):
        walk.steps += 1
        if _nonfinite(cand, base, step, walk):
            continue
        if cand.token_ids[step] != base.token_ids[step]:
            div = _flip(cand, base, step, rules, flips_so_far=0)
            walk.divergences.append(div)
            if div.logprob_diff is not None:  # the flip step still shares the prefix
                walk.diffs.append(div.logprob_diff)
            if div.tolerated:
                walk.not_compared = steps - step - 1
            break
        _same_token(cand, base, step, rules, walk)
    if len(cand.token_ids) != len(base.token_ids):
        walk.divergences.append(_divergence(cand, base, steps, "length"))
    return walk


def _walk_forced(cand: RequestOutput, base: RequestOutput, rules: _Rules) -> _Walk:
    """Compare the candidate's replay forced along the baseline's tokens: every step shares the
    baseline's prefix. The candidate's own greedy choice is its top-1; where that differs from
    the baseline's token it is a flip (one near-tie tolerated per request), and the chosen
    logprobs (both of the baseline's token) and the top-k are compared at every step."""
    walk = _Walk(cand.request_id, replayed=True)
    if list(cand.token_ids) != list(base.token_ids):
        raise ValueError(f"request {cand.request_id}: the forced replay did not follow the baseline's tokens")
    flips = 0
    for step in range(len(base.token_ids)):
        walk.steps += 1
        if _nonfinite(cand, base, step, walk, replayed=True):
            continue
        greedy = forced_greedy(cand, step)
        if greedy != base.token_ids[step]:
            div = _flip(cand, base, step, rules, flips, greedy=greedy)
            walk.divergences.append(div)
            if div.logprob_diff is not None:
                walk.diffs.append(div.logprob_diff)
            flips += 1
        _same_token(cand, base, step, rules, walk, replayed=True)
    return walk


def forced_greedy(forced: RequestOutput, step: int) -> int:
    """The candidate's own greedy token at ``step`` of a forced replay: its top-1, unless the forced
    token ties it (bf16 logits tie often; greedy takes the lowest id, top-k may list either)."""
    top = _top_k(forced, step)
    if not top or top[0][1] <= forced.logprobs[step]:
        return forced.token_ids[step]
    return top[0][0]


def _same_token(cand: RequestOutput, base: RequestOutput, step: int, rules: _Rules, walk: _Walk,
                replayed: bool = False) -> None:
    """Both sides scored the same token on the same prefix: chosen logprob and top-k within atol."""
    diff = abs(cand.logprobs[step] - base.logprobs[step])
    walk.diffs.append(diff)
    if diff > rules.atol:
        walk.over_atol += 1
        if rules.judges_logprobs:
            walk.divergences.append(_divergence(cand, base, step, "logprob", replayed=replayed))
    if not rules.judges_logprobs:
        return
    worst, problem = _topk_mismatch(_top_k(cand, step), _top_k(base, step), rules.topk_atol)
    walk.topk_diffs.append(worst)
    if problem:
        walk.divergences.append(_divergence(cand, base, step, "topk", replayed=replayed, detail=problem))


def _topk_mismatch(cand: TopK, base: TopK, atol: float) -> tuple[float, str]:
    """The largest |Δ logprob| of ids both top-k lists hold, and what is wrong ("" if nothing):
    an id both list must agree within atol; an id only one side lists must lie within atol of
    the other side's k-th logprob (noise could have pushed it just past the cut)."""
    c, b = dict(cand), dict(base)
    if len(cand) != len(base):
        return 0.0, f"top-k sizes differ ({len(cand)} vs {len(base)})"
    shared = sorted(set(c) & set(b))
    diffs = {tok: abs(c[tok] - b[tok]) for tok in shared}
    worst = max(diffs.values(), default=0.0)
    bad = [tok for tok, d in diffs.items() if not d <= atol]
    if bad:
        return worst, f"token {bad[0]}: {c[bad[0]]:.6g} vs {b[bad[0]]:.6g} (top-k atol {atol:.2g})"
    for side, own, other in (("baseline", b, c), ("candidate", c, b)):
        cut = min(other.values(), default=-math.inf)
        missing = [tok for tok in own if tok not in other and own[tok] > cut + atol]
        if missing:
            tok = missing[0]
            return worst, (f"token {tok} ({own[tok]:.6g}) is in the {side}'s top-k only, "
                           f"more than the top-k atol {atol:.2g} above the other side's k-th logprob {cut:.6g}")
    return worst, ""


def _flip(cand: RequestOutput, base: RequestOutput, step: int, rules: _Rules, flips_so_far: int,
          greedy: int | None = None) -> Divergence:
    """A token divergence at ``step``; tolerated only under ``logprobs`` as the request's first
    near-tie (each side's token leads the other's by at most ``near_tie`` on that side)."""
    c_tok = cand.token_ids[step] if greedy is None else greedy
    c_gap, b_gap = flip_gaps(cand, base, step, greedy)
    near = all(g is not None and g <= rules.near_tie for g in (c_gap, b_gap))
    detail = ""
    if rules.policy != "logprobs":
        detail = f"policy {rules.policy} tolerates no flip"
    elif near and flips_so_far >= rules.max_flips:
        detail = f"flip #{flips_so_far + 1} in this request ({rules.max_flips} near-ties tolerated per request)"
    tolerated = rules.policy == "logprobs" and near and flips_so_far < rules.max_flips
    replayed = greedy is not None
    return _divergence(cand, base, step, "token", tolerated, replayed=replayed, detail=detail,
                       gaps=(c_gap, b_gap), candidate_token=c_tok,
                       diff=flip_logprob_diff(cand, base, step, greedy))


def flip_logprob_diff(cand: RequestOutput, base: RequestOutput, step: int, greedy: int | None = None
                      ) -> float | None:
    """At a flip, both sides still share the prefix, so each of the two tokens has a logprob on
    both sides wherever that side lists it (its chosen logprob or its top-k): the larger
    ``|Δ logprob|`` of the two tokens, ``None`` when neither token is scored by both sides.
    ``greedy``: the candidate's own choice on a forced replay, whose output holds the baseline's
    token with its logprob."""
    b_tok = base.token_ids[step]
    c_tok = cand.token_ids[step] if greedy is None else greedy
    c_scores, b_scores = dict(_top_k(cand, step)), dict(_top_k(base, step))
    c_scores[cand.token_ids[step]] = cand.logprobs[step]  # the forced token on a replay
    b_scores[b_tok] = base.logprobs[step]
    diffs = [abs(c_scores[t] - b_scores[t]) for t in (b_tok, c_tok) if t in c_scores and t in b_scores]
    return max(diffs, default=None)


def flip_gaps(cand: RequestOutput, base: RequestOutput, step: int, greedy: int | None = None
              ) -> tuple[float | None, float | None]:
    """How far each side's own token leads the other side's token at ``step``, on that side:
    ``(candidate's lead, baseline's lead)``, ``None`` where the other token is not in that side's
    top-k. ``greedy``: the candidate's own choice on a forced replay (``forced_greedy``), whose
    output then holds the baseline's token with its logprob."""
    c_tok = cand.token_ids[step] if greedy is None else greedy
    b_tok = base.token_ids[step]
    c_top, b_top = dict(_top_k(cand, step)), dict(_top_k(base, step))
    c_gap = c_top[c_tok] - c_top[b_tok] if c_tok in c_top and b_tok in c_top else None
    if greedy is not None and c_tok in c_top:  # forced: the baseline's token's logprob is known
        c_gap = c_top[c_tok] - cand.logprobs[step]
    b_gap = b_top[b_tok] - b_top[c_tok] if b_tok in b_top and c_tok in b_top else None
    return c_gap, b_gap


def _nonfinite(cand: RequestOutput, base: RequestOutput, step: int, walk: _Walk, replayed: bool = False) -> bool:
    """Record a ``nonfinite`` divergence if either side's chosen or top-k logprob at ``step`` is
    NaN or infinite (under every policy: a NaN never equals anything, not even under ``exact``)."""
    bad = [side for side, out in (("candidate", cand), ("baseline", base))
           if not math.isfinite(out.logprobs[step]) or any(not math.isfinite(lp) for _, lp in _top_k(out, step))]
    if bad:
        walk.divergences.append(_divergence(cand, base, step, "nonfinite", replayed=replayed,
                                            detail=" and ".join(bad)))
    return bool(bad)


def _divergence(
    cand: RequestOutput, base: RequestOutput, step: int, reason: str, tolerated: bool = False,
    replayed: bool = False, detail: str = "", gaps: tuple[float | None, float | None] = (None, None),
    candidate_token: int | None = None, diff: float | None = None,
) -> Divergence:
    """A ``Divergence`` at ``step`` from both sides' records (a side past its end is missing);
    ``diff``: a flip's ``flip_logprob_diff`` (otherwise the chosen logprobs' difference)."""
    c_lp, b_lp = _at(cand.logprobs, step), _at(base.logprobs, step)
    if reason != "token":
        diff = abs(c_lp - b_lp) if c_lp is not None and b_lp is not None else None
    return Divergence(
        request_id=cand.request_id,
        step=step,
        candidate_token=_at(cand.token_ids, step) if candidate_token is None else candidate_token,
        baseline_token=_at(base.token_ids, step),
        candidate_top_k=_top_k(cand, step),
        baseline_top_k=_top_k(base, step),
        candidate_logprob=c_lp,
        baseline_logprob=b_lp,
        logprob_diff=diff,
        reason=reason,
        tolerated=tolerated,
        candidate_gap=gaps[0],
        baseline_gap=gaps[1],
        replayed=replayed,
        detail=detail,
    )


def _order(walks: Sequence[_Walk]) -> list[Divergence]:
    """All divergences, earliest step first, ties broken by request order."""
    keyed = [(d.step, i, j, d) for i, w in enumerate(walks) for j, d in enumerate(w.divergences)]
    return [d for *_, d in sorted(keyed, key=lambda k: (k[0], k[1], k[2]))]


def _metrics(
    walks: Sequence[_Walk],
    candidate: Sequence[RequestOutput],
    baseline: Sequence[RequestOutput],
    rules: _Rules,
    dtype: str,
) -> dict[str, Any]:
    """The verdict's metrics (see ``Verdict``)."""
    return {
        "requests": len(walks),
        "steps_compared": sum(w.steps for w in walks),
        "steps_not_compared": sum(w.not_compared for w in walks),
        "tokens_identical": all(c.token_ids == b.token_ids for c, b in zip(candidate, baseline, strict=True)),
        "max_logprob_diff": _max([d for w in walks for d in w.diffs]),
        "max_topk_diff": _max([d for w in walks for d in w.topk_diffs]),
        "steps_over_atol": sum(w.over_atol for w in walks),
        "divergent_requests": sum(any(d.reason in ("token", "length") for d in w.divergences) for w in walks),
        "failing_requests": sum(any(not d.tolerated for d in w.divergences) for w in walks),
        "tolerated_divergences": sum(d.tolerated for w in walks for d in w.divergences),
        "replayed_requests": sum(w.replayed for w in walks),
        "atol": rules.atol,
        "topk_atol": rules.topk_atol,
        "near_tie": rules.near_tie,
        "max_flips": rules.max_flips,
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
