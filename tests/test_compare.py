"""``harness.compare``: policies, tolerances, divergence reports and structural checks."""

from __future__ import annotations

import json

import pytest

from harness.compare import (
    POLICIES,
    TOLERANCES,
    Divergence,
    Verdict,
    compare,
    tolerance_for,
)
from reference_impl.requests import RequestOutput

FP32_ATOL = tolerance_for("float32").logprob_atol


def top(*pairs: tuple[int, float]) -> list[tuple[int, float]]:
    return list(pairs)


def output(rid: str, steps: list[tuple[int, float, list[tuple[int, float]]]]) -> RequestOutput:
    """An output from ``(token, logprob, top_k)`` per step."""
    return RequestOutput(
        request_id=rid,
        prompt_len=4,
        token_ids=[t for t, _, _ in steps],
        logprobs=[lp for _, lp, _ in steps],
        top_logprobs=[tk for _, _, tk in steps],
    )


def simple(rid: str, tokens: list[int], logprobs: list[float] | None = None) -> RequestOutput:
    """Each step's chosen token is top-1, followed by token+1 and token+2 in the top-3."""
    lps = logprobs if logprobs is not None else [-0.1 * (i + 1) for i in range(len(tokens))]
    return output(rid, [(t, lp, top((t, lp), (t + 1, lp - 1.0), (t + 2, lp - 2.0))) for t, lp in zip(tokens, lps)])


def baseline_pair() -> list[RequestOutput]:
    return [simple("a", [10, 11, 12, 13]), simple("b", [20, 21, 22, 23])]


def shifted(out: RequestOutput, step: int, delta: float) -> RequestOutput:
    """A copy of ``out`` whose chosen logprob at ``step`` moved by ``delta``."""
    lps = list(out.logprobs)
    lps[step] += delta
    return RequestOutput(out.request_id, out.prompt_len, list(out.token_ids), lps, [list(t) for t in out.top_logprobs])


@pytest.mark.parametrize("policy", ["exact", "logprobs"])
def test_identical_outputs_pass_with_max_diff(policy: str) -> None:
    base = baseline_pair()
    cand = [shifted(base[0], 2, 2e-5), base[1]]
    v = compare(cand, base, policy=policy)
    assert v.passed, v.message()
    assert v.first_divergence is None
    assert v.divergences == ()
    assert v.metrics["tokens_identical"] is True
    assert v.metrics["requests"] == 2
    assert v.metrics["steps_compared"] == 8
    assert v.metrics["max_logprob_diff"] == pytest.approx(2e-5, rel=1e-3)
    assert v.metrics["divergent_requests"] == 0
    assert v.metrics["atol"] == FP32_ATOL
    assert "PASS" in v.message() and "tokens identical" in v.message()


def test_logprob_drift_fails_logprobs_policy_but_passes_exact() -> None:
    base = baseline_pair()
    cand = [base[0], shifted(base[1], 1, 0.12)]
    v = compare(cand, base, policy="logprobs")
    assert not v.passed
    d = v.first_divergence
    assert d is not None
    assert (d.request_id, d.step, d.reason, d.tolerated) == ("b", 1, "logprob", False)
    assert d.logprob_diff == pytest.approx(0.12)
    assert d.candidate_token == d.baseline_token == 21
    assert "> atol" in v.message()

    exact = compare(cand, base, policy="exact")
    assert exact.passed, exact.message()
    assert exact.first_divergence is None
    assert exact.metrics["max_logprob_diff"] == pytest.approx(0.12)
    assert exact.metrics["steps_over_atol"] == 1


def test_drift_just_within_atol_passes_and_just_beyond_fails() -> None:
    base = baseline_pair()
    within = compare([shifted(base[0], 0, 0.9 * FP32_ATOL), base[1]], base)
    beyond = compare([shifted(base[0], 0, 1.1 * FP32_ATOL), base[1]], base)
    assert within.passed
    assert not beyond.passed


@pytest.mark.parametrize("policy", POLICIES)
def test_nan_logprob_fails_under_every_policy(policy: str) -> None:
    base = baseline_pair()
    v = compare([shifted(base[0], 3, float("nan")), base[1]], base, policy=policy)
    assert not v.passed, v.message()
    assert v.first_divergence is not None and v.first_divergence.reason == "nonfinite"
    assert "non-finite" in v.message() and "candidate" in v.message()


@pytest.mark.parametrize("policy", POLICIES)
def test_infinite_top_k_logprob_fails_under_every_policy(policy: str) -> None:
    base = baseline_pair()
    cand = [simple("a", [10, 11, 12, 13]), simple("b", [20, 21, 22, 23])]
    cand[1].top_logprobs[2][2] = (24, float("-inf"))
    v = compare(cand, base, policy=policy)
    assert not v.passed
    assert v.first_divergence is not None and (v.first_divergence.step, v.first_divergence.reason) == (2, "nonfinite")


def flip_pair(c_gap: float, b_gap: float) -> tuple[list[RequestOutput], list[RequestOutput]]:
    """Request "a" flips at step 1 between tokens 50 (baseline) and 51 (candidate); the
    candidate's 51 leads its 50 by ``c_gap``, the baseline's 50 leads its 51 by ``b_gap``.
    After the flip the free-running sides continue on different prefixes."""
    base_a = output("a", [
        (10, -0.1, top((10, -0.1), (11, -2.0), (12, -3.0))),
        (50, -0.7, top((50, -0.7), (51, -0.7 - b_gap), (52, -9.0))),
        (60, -0.2, top((60, -0.2), (61, -2.0), (62, -3.0))),
    ])
    cand_a = output("a", [
        (10, -0.1, top((10, -0.1), (11, -2.0), (12, -3.0))),
        (51, -0.7, top((51, -0.7), (50, -0.7 - c_gap), (52, -9.0))),
        (99, -5.0, top((99, -5.0), (98, -6.0), (97, -7.0))),
    ])
    b = simple("b", [20, 21, 22])
    return [cand_a, b], [base_a, b]


def replay_of(base: RequestOutput, flips: dict[int, tuple[int, float]] | None = None,
              drift: dict[int, float] | None = None) -> RequestOutput:
    """The candidate's replay forced along ``base``'s tokens: the same logprobs and top-k, except
    ``flips`` (step -> (the candidate's own greedy token, its lead over the forced token)) and
    ``drift`` (step -> change of the forced token's logprob)."""
    out = RequestOutput(base.request_id, base.prompt_len, list(base.token_ids), list(base.logprobs),
                        [list(t) for t in base.top_logprobs])
    for step, delta in (drift or {}).items():
        out.logprobs[step] += delta
        out.top_logprobs[step] = [(t, lp + delta if t == out.token_ids[step] else lp)
                                  for t, lp in out.top_logprobs[step]]
    for step, (greedy, lead) in (flips or {}).items():
        entries = dict(out.top_logprobs[step])
        entries[greedy] = out.logprobs[step] + lead
        ranked = sorted(entries.items(), key=lambda e: -e[1])
        out.top_logprobs[step] = ranked[:len(out.top_logprobs[step])]
    return out


def test_near_tie_flip_tolerated_and_later_steps_counted_uncompared_without_replay() -> None:
    cand, base = flip_pair(0.3 * FP32_ATOL, 0.3 * FP32_ATOL)
    v = compare(cand, base, policy="logprobs")
    assert v.passed, v.message()
    d = v.first_divergence
    assert d is not None
    assert (d.request_id, d.step, d.reason, d.tolerated) == ("a", 1, "token", True)
    assert (d.candidate_token, d.baseline_token) == (51, 50)
    assert d.candidate_gap == pytest.approx(0.3 * FP32_ATOL) and d.baseline_gap == pytest.approx(0.3 * FP32_ATOL)
    assert v.metrics["tolerated_divergences"] == 1
    # Step 2 is conditioned on different prefixes: not compared, and that is said.
    assert v.metrics["steps_not_compared"] == 1
    assert v.replay == ("a",)
    assert "not compared" in v.message()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_five_nat_flip_fails_although_each_token_is_in_the_other_top_k(dtype: str) -> None:
    cand, base = flip_pair(5.0, 5.0)
    v = compare(cand, base, policy="logprobs", dtype=dtype)
    assert not v.passed
    d = v.first_divergence
    assert d is not None and (d.reason, d.tolerated) == ("token", False)
    assert d.candidate_in_baseline_top_k and d.baseline_in_candidate_top_k
    assert "not a near-tie" in v.message()


def test_one_sided_near_tie_fails() -> None:
    cand, base = flip_pair(0.5 * FP32_ATOL, 0.3)
    assert not compare(cand, base).passed


def test_flip_then_later_difference_fails_on_the_forced_replay() -> None:
    cand, base = flip_pair(0.3 * FP32_ATOL, 0.3 * FP32_ATOL)
    clean = replay_of(base[0], flips={1: (51, 0.3 * FP32_ATOL)})
    ok = compare(cand, base, forced={"a": clean})
    assert ok.passed, ok.message()
    assert ok.replay == () and ok.metrics["steps_not_compared"] == 0
    assert ok.metrics["replayed_requests"] == 1 and ok.metrics["steps_compared"] == 3 + 3
    later = replay_of(base[0], flips={1: (51, 0.3 * FP32_ATOL)}, drift={2: 0.3})
    v = compare(cand, base, forced={"a": later})
    assert not v.passed
    d = v.first_divergence
    assert d is not None and (d.request_id, d.step, d.reason, d.replayed) == ("a", 2, "logprob", True)
    assert "forced replay" in v.message()


def test_second_flip_in_a_request_fails() -> None:
    cand, base = flip_pair(0.3 * FP32_ATOL, 0.3 * FP32_ATOL)
    base[0].top_logprobs[2] = [(60, -0.2), (61, -0.2 - 0.3 * FP32_ATOL), (62, -3.0)]
    replay = replay_of(base[0], flips={1: (51, 0.3 * FP32_ATOL), 2: (61, 0.3 * FP32_ATOL)})
    v = compare(cand, base, forced={"a": replay})
    assert not v.passed
    failing = [d for d in v.divergences if not d.tolerated]
    assert [(d.step, d.reason) for d in failing] == [(2, "token")]
    assert "flip #2 in this request (1 near-ties tolerated per request)" in v.message()


def test_top_k_tail_that_differs_with_the_same_chosen_logprob_fails() -> None:
    base = [simple("a", [10, 11, 12])]
    cand = [simple("a", [10, 11, 12])]
    cand[0].top_logprobs[1] = [(11, base[0].logprobs[1]), (12, base[0].logprobs[1] - 1.0), (40, -1.5)]
    v = compare(cand, base)
    assert not v.passed
    d = v.first_divergence
    assert d is not None and (d.step, d.reason) == (1, "topk")
    assert "token 40" in v.message()
    assert compare(cand, base, policy="exact").passed  # exact judges token ids only


def test_top_k_order_swap_within_tolerance_passes() -> None:
    base = [output("a", [(10, -0.1, top((10, -0.1), (11, -2.0), (12, -2.0002)))])]
    cand = [output("a", [(10, -0.1, top((10, -0.1), (12, -2.0001), (13, -2.0003)))])]
    # 11 fell out of the candidate's top-3 and 13 came in, all within atol of the cut: noise.
    v = compare(cand, base)
    assert v.passed, v.message()
    assert v.metrics["max_topk_diff"] == pytest.approx(1e-4, rel=1e-3)


def test_identical_policy_uses_the_noise_floor_and_tolerates_no_flip() -> None:
    floor = tolerance_for("float32").identical_atol
    base = baseline_pair()
    assert compare([shifted(base[0], 1, 0.5 * floor), base[1]], base, policy="identical").passed
    v = compare([shifted(base[0], 1, 10 * floor), base[1]], base, policy="identical")
    assert not v.passed and v.first_divergence is not None and v.first_divergence.reason == "logprob"
    assert compare([shifted(base[0], 1, 10 * floor), base[1]], base, policy="logprobs").passed
    cand, flip_base = flip_pair(0.3 * FP32_ATOL, 0.3 * FP32_ATOL)
    flip = compare(cand, flip_base, policy="identical")
    assert not flip.passed and "tolerates no flip" in flip.message()


def test_tolerances_are_ordered_per_dtype() -> None:
    for tol in TOLERANCES.values():
        assert 0 < tol.identical_atol < tol.logprob_atol <= tol.topk_atol
        assert 0 < tol.near_tie <= tol.topk_atol


def wide_pair() -> tuple[list[RequestOutput], list[RequestOutput]]:
    """Request "a" flips at step 1 between tokens 50 and 51 (gaps 0.02: a near-tie in bf16 only)."""
    base_a = output("a", [
        (10, -0.1, top((10, -0.1), (11, -2.0), (12, -3.0))),
        (50, -0.70, top((50, -0.70), (51, -0.72), (52, -3.0))),
        (60, -0.2, top((60, -0.2), (61, -2.0), (62, -3.0))),
    ])
    cand_a = output("a", [
        (10, -0.1, top((10, -0.1), (11, -2.0), (12, -3.0))),
        (51, -0.69, top((51, -0.69), (50, -0.71), (52, -3.0))),
        (99, -5.0, top((99, -5.0), (98, -6.0), (97, -7.0))),
    ])
    b = simple("b", [20, 21, 22])
    return [cand_a, b], [base_a, b]


def test_gap_of_two_hundredths_is_a_near_tie_in_bf16_only() -> None:
    cand, base = wide_pair()
    assert not compare(cand, base, dtype="float32").passed
    assert compare(cand, base, dtype="bfloat16").passed
    exact = compare(cand, base, policy="exact", dtype="bfloat16")
    assert not exact.passed
    assert exact.first_divergence is not None
    assert (exact.first_divergence.step, exact.first_divergence.tolerated) == (1, False)


def test_candidate_token_outside_baseline_top_k_fails() -> None:
    base = [simple("a", [10, 11, 12])]
    # Candidate picks 77 at step 1: the baseline's top-3 there is (11, 12, 13). The baseline's 11
    # is in the candidate's top-k, so only one direction is violated.
    cand = [output("a", [
        (10, -0.1, top((10, -0.1), (11, -1.1), (12, -2.1))),
        (77, -0.5, top((77, -0.5), (11, -0.6), (12, -2.0))),
        (12, -0.3, top((12, -0.3), (13, -1.3), (14, -2.3))),
    ])]
    v = compare(cand, base, policy="logprobs", dtype="bfloat16")
    assert not v.passed
    d = v.first_divergence
    assert d is not None
    assert (d.step, d.reason, d.tolerated) == (1, "token", False)
    assert not d.candidate_in_baseline_top_k
    assert d.baseline_in_candidate_top_k
    assert d.baseline_gap is None and d.candidate_gap == pytest.approx(0.1)


def test_baseline_token_outside_candidate_top_k_fails() -> None:
    base = [simple("a", [10, 11])]
    cand = [output("a", [
        (10, -0.1, top((10, -0.1), (11, -1.1), (12, -2.1))),
        (12, -0.5, top((12, -0.5), (13, -0.6), (14, -2.0))),  # baseline's 11 absent
    ])]
    v = compare(cand, base, policy="logprobs")
    assert not v.passed
    assert v.first_divergence is not None and v.first_divergence.reason == "token"


@pytest.mark.parametrize("policy", POLICIES)
def test_length_mismatch_fails(policy: str) -> None:
    base = baseline_pair()
    cand = [base[0], simple("b", [20, 21])]
    v = compare(cand, base, policy=policy)
    assert not v.passed
    d = v.first_divergence
    assert d is not None
    assert (d.request_id, d.step, d.reason) == ("b", 2, "length")
    assert d.candidate_token is None and d.baseline_token == 22
    assert d.candidate_top_k == () and d.logprob_diff is None
    assert "stops after 2 tokens" in v.message()


def test_length_mismatch_fails_even_after_tolerated_divergence() -> None:
    cand, base = flip_pair(0.3 * FP32_ATOL, 0.3 * FP32_ATOL)
    cand[0].token_ids.pop()
    cand[0].logprobs.pop()
    cand[0].top_logprobs.pop()
    v = compare(cand, base)
    assert not v.passed
    assert v.first_divergence is not None and v.first_divergence.reason == "length"


@pytest.mark.parametrize(
    "cand_ids",
    [["a"], ["b", "a"], ["a", "c"], ["a", "b", "c"]],
    ids=["missing", "reordered", "renamed", "extra"],
)
def test_mismatched_request_ids_raise(cand_ids: list[str]) -> None:
    base = baseline_pair()
    cand = [simple(rid, [1, 2, 3, 4]) for rid in cand_ids]
    with pytest.raises(ValueError, match="different requests"):
        compare(cand, base)


def test_inconsistent_output_raises() -> None:
    base = baseline_pair()
    bad = simple("a", [10, 11, 12, 13])
    bad.logprobs.pop()
    with pytest.raises(ValueError, match="candidate request a"):
        compare([bad, base[1]], base)


def test_first_divergence_is_earliest_step_across_requests() -> None:
    base = [simple("a", [10, 11, 12, 13]), simple("b", [20, 21, 22, 23]), simple("c", [30, 31, 32, 33])]
    cand = [
        shifted(base[0], 3, 0.5),  # request a fails late (step 3)
        simple("b", [20, 21, 99, 23]),  # request b fails at step 2 (99 not in any top-k)
        shifted(base[2], 2, 0.5),  # request c fails at step 2 too, but comes after b
    ]
    v = compare(cand, base)
    assert not v.passed
    d = v.first_divergence
    assert d is not None
    assert (d.request_id, d.step) == ("b", 2)
    assert [(x.request_id, x.step) for x in v.divergences] == [("b", 2), ("c", 2), ("a", 3)]
    assert v.metrics["failing_requests"] == 3
    assert "3 failing divergences" in v.message()


def test_failing_divergence_outranks_earlier_tolerated_one() -> None:
    cand, base = flip_pair(0.3 * FP32_ATOL, 0.3 * FP32_ATOL)  # tolerated at request a step 1
    cand[1] = shifted(base[1], 2, 0.5)  # failing at request b step 2
    v = compare(cand, base)
    assert not v.passed
    d = v.first_divergence
    assert d is not None
    assert (d.request_id, d.step, d.tolerated) == ("b", 2, False)
    assert [x.tolerated for x in v.divergences] == [True, False]


def test_bf16_tolerance_is_looser_than_fp32() -> None:
    assert tolerance_for("bfloat16").logprob_atol > tolerance_for("float32").logprob_atol
    assert set(TOLERANCES) == {"float32", "bfloat16"}
    base = baseline_pair()
    cand = [shifted(base[0], 1, 0.1), base[1]]
    assert not compare(cand, base, dtype="float32").passed
    bf16 = compare(cand, base, dtype="bfloat16")
    assert bf16.passed, bf16.message()
    assert bf16.metrics["atol"] == tolerance_for("bfloat16").logprob_atol
    assert not compare([shifted(base[0], 1, 3.0), base[1]], base, dtype="bfloat16").passed


def test_message_names_both_tokens_and_both_top_k() -> None:
    cand, base = wide_pair()
    msg = compare(cand, base, policy="exact").message()
    assert "FAIL" in msg
    assert "request a step 1" in msg
    assert "candidate token 51" in msg and "baseline token 50" in msg
    assert "candidate top-3 [51: -0.69, 50: -0.71, 52: -3]" in msg
    assert "baseline top-3 [50: -0.7, 51: -0.72, 52: -3]" in msg


def test_divergence_to_json_is_plain() -> None:
    cand, base = wide_pair()
    d = compare(cand, base, dtype="bfloat16").first_divergence
    assert d is not None
    data = d.to_json()
    assert data["candidate_top_k"] == [[51, -0.69], [50, -0.71], [52, -3.0]]
    assert isinstance(data["baseline_top_k"][0], list)
    assert json.loads(json.dumps(data)) == data
    assert data["tolerated"] is True and data["reason"] == "token"


def test_verdict_message_without_divergence_reports_metrics() -> None:
    v = Verdict(True, "exact", None, {"atol": 1e-3, "dtype": "float32", "requests": 1, "steps_compared": 4,
                                      "max_logprob_diff": 0.0})
    assert "4 steps" in v.message() and "PASS" in v.message()


def test_unknown_policy_and_dtype_raise() -> None:
    base = baseline_pair()
    with pytest.raises(ValueError, match="exact, logprobs, identical"):
        compare(base, base, policy="fuzzy")
    with pytest.raises(ValueError, match="float16"):
        compare(base, base, dtype="float16")
    with pytest.raises(ValueError, match="float32, bfloat16"):
        tolerance_for("int8")


def test_divergence_rejects_unknown_reason() -> None:
    with pytest.raises(ValueError, match="reason"):
        Divergence("a", 0, 1, 2, (), (), None, None, None, "vibes")


def test_a_tie_in_the_forced_replay_is_not_a_flip() -> None:
    """bf16 logits tie often: where the forced token ties the candidate's top-1, the top-k may
    list the other id first, but greedy decoding would have chosen either: no flip."""
    cand, base = flip_pair(0.3 * FP32_ATOL, 0.3 * FP32_ATOL)
    replay = replay_of(base[0], flips={1: (51, 0.3 * FP32_ATOL)})
    tied = replay_of(base[0])
    tied.top_logprobs[2] = [(61, tied.logprobs[2]), (60, tied.logprobs[2]), (62, -3.0)]
    base[0].top_logprobs[2] = [(60, -0.2), (61, -0.2), (62, -3.0)]
    replay.top_logprobs[2] = tied.top_logprobs[2]
    v = compare(cand, base, forced={"a": replay})
    assert v.passed, v.message()
    assert [d.step for d in v.divergences] == [1]


def first_step_flip() -> tuple[list[RequestOutput], list[RequestOutput]]:
    """Request "a" flips at step 0: no step before it agrees. On the shared prefix the baseline
    scores its 50 at -0.3 and the candidate's 51 at -0.8; the candidate scores them -0.6 and -0.4."""
    base = [output("a", [(50, -0.3, top((50, -0.3), (51, -0.8), (52, -3.0))),
                         (60, -0.2, top((60, -0.2), (61, -2.0), (62, -3.0)))])]
    cand = [output("a", [(51, -0.4, top((51, -0.4), (50, -0.6), (52, -3.0))),
                         (70, -0.2, top((70, -0.2), (71, -2.0), (72, -3.0)))])]
    return cand, base


@pytest.mark.parametrize("policy", POLICIES)
def test_a_flip_reports_the_same_tokens_difference_and_the_metrics_agree(policy: str) -> None:
    """A flip's ``logprob_diff`` is the larger difference of one token scored by both sides (51:
    |-0.4 - -0.8| = 0.4; 50: |-0.6 - -0.3| = 0.3), never the difference of two different tokens'
    logprobs (|-0.4 - -0.3| = 0.1), and ``max_logprob_diff`` includes it: it said 0 for a case
    whose only divergence was such a flip."""
    cand, base = first_step_flip()
    v = compare(cand, base, policy=policy)
    assert not v.passed
    d = v.first_divergence
    assert d is not None and (d.step, d.reason) == (0, "token")
    assert d.logprob_diff == pytest.approx(0.4)
    assert v.metrics["max_logprob_diff"] == pytest.approx(0.4)


def test_a_flip_whose_tokens_only_one_side_lists_has_no_difference() -> None:
    cand, base = first_step_flip()
    cand[0].top_logprobs[0] = [(51, -0.4), (53, -0.9), (52, -3.0)]  # the baseline's 50 not listed
    base[0].top_logprobs[0] = [(50, -0.3), (54, -0.8), (52, -3.0)]  # the candidate's 51 not listed
    v = compare(cand, base)
    assert v.first_divergence is not None and v.first_divergence.logprob_diff is None
    assert v.metrics["max_logprob_diff"] == 0.0
