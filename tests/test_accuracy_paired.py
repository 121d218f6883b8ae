"""The paired test and its verdict rule (harness.accuracy.paired), and the problem generator."""

from __future__ import annotations

import pytest

from harness.accuracy.paired import ALPHA, MIN_BASELINE_CORRECT, Doc, Paired, mcnemar_exact
from harness.accuracy.run import exit_code
from scenarios.gsm.problems import generate


@pytest.mark.parametrize("b,c,want", [
    (0, 0, 1.0),
    (5, 0, 0.0625),                            # 2 * 0.5**5
    (6, 0, 0.03125),                           # 2 * 0.5**6
    (10, 2, 2 * (1 + 12 + 66) / 4096),         # 2 * P(X <= 2), X ~ Bin(12, 1/2)
    (3, 3, 1.0),
])
def test_mcnemar_exact(b: int, c: int, want: float) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(want)
    assert mcnemar_exact(c, b) == pytest.approx(want)  # two-sided


def docs(correct: list[bool], answers: list[str] | None = None) -> list[Doc]:
    answers = answers or [str(int(x)) for x in correct]
    return [Doc(i, ok, a, a) for i, (ok, a) in enumerate(zip(correct, answers))]


def test_float32_fails_on_one_discordant_document() -> None:
    base = [True] * 20
    verdict, reason = Paired(docs(base), docs([False] + base[1:]), identical_expected=True).verdict()
    assert verdict == "fail" and "1 document(s) right -> wrong" in reason


def test_float32_passes_identical_and_counts_answers_changed_both_wrong() -> None:
    correct = [True] * 10 + [False] * 2
    p = Paired(docs(correct, ["1"] * 10 + ["7", "8"]), docs(correct, ["1"] * 10 + ["7", "9"]), identical_expected=True)
    assert p.verdict()[0] == "pass" and p.changed == 1


@pytest.mark.parametrize("lost,verdict", [(5, "pass"), (6, "fail")])
def test_bfloat16_fails_only_when_the_paired_test_is_significant(lost: int, verdict: str) -> None:
    base = [True] * 40
    cand = [False] * lost + [True] * (40 - lost)
    p = Paired(docs(base), docs(cand), identical_expected=False)
    assert (p.p_value < ALPHA) == (verdict == "fail")
    assert p.verdict()[0] == verdict


def test_bfloat16_gain_is_not_a_failure() -> None:
    p = Paired(docs([False] * 10 + [True] * 10), docs([True] * 20), identical_expected=False)
    assert p.verdict()[0] == "pass"


def test_weak_baseline_is_inconclusive_not_pass() -> None:
    # a broken model (or a broken answer filter) that gets nothing right on either side
    p = Paired(docs([False] * 100), docs([False] * 100), identical_expected=True)
    assert p.verdict()[0] == "inconclusive"
    assert Paired(docs([True] * MIN_BASELINE_CORRECT), docs([True] * MIN_BASELINE_CORRECT),
                  identical_expected=True).verdict()[0] == "pass"
    assert exit_code(["pass", "inconclusive"]) == 4 and exit_code([]) == 4


def test_different_documents_refused() -> None:
    with pytest.raises(ValueError, match="different documents"):
        Paired(docs([True] * 3), docs([True] * 4), identical_expected=True)


def test_exit_codes() -> None:
    assert exit_code(["pass"]) == 0
    assert exit_code(["pass", "fail", "error"]) == 1
    assert exit_code(["pass", "error"]) == 3


def test_problems_deterministic_distinct_and_answered() -> None:
    a, b = generate(200, seed=5), generate(200, seed=5)
    assert a == b
    assert len({p["question"] for p in a}) == 200
    for p in a:
        lines = p["answer"].split("\n")
        assert 2 <= len(lines) <= 4 and lines[-1].startswith("#### ")
        for line in lines[:-1]:  # every step's arithmetic is right
            expr, result = line.split("<<")[1].split(">>")[0].split("=")
            assert eval(expr.replace("/", "//")) == int(result)  # noqa: S307 - digits and one operator
        assert int(lines[-1][5:]) == int(lines[-2].split(">>")[1].split()[0])
