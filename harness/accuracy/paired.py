"""The paired comparison of two setups' answers on the same documents, and its verdict.

Rule (docs/accuracy.md):
- ``inconclusive`` when the baseline got fewer than ``MIN_BASELINE_CORRECT`` documents right: even
  a candidate that lost every one of them could not be told from noise, so a pass would have
  checked nothing.
- float32 (setups expected to answer identically): ``fail`` on any discordant document (right on
  one side, wrong on the other).
- otherwise: ``fail`` when the candidate lost more documents than it gained and the exact
  McNemar test on the discordant pairs gives ``p < ALPHA``; ``pass`` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import comb
from typing import Any

# The significance level of the paired test: one nightly accuracy job compares a handful of
# setups, so a 5% false-alarm rate per clean setup is the usual trade-off against missing a
# few-point regression on a few hundred documents.
ALPHA = 0.05
# The exact two-sided McNemar p-value of k discordant documents all going one way is 2 * 0.5**k:
# 0.0625 at k = 5, 0.031 at k = 6. With fewer than six baseline-correct documents no regression
# can reach ALPHA, so such a comparison is inconclusive rather than a pass.
MIN_BASELINE_CORRECT = 6


def mcnemar_exact(to_wrong: int, to_correct: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of the discordant pairs against 1/2."""
    n = to_wrong + to_correct
    if n == 0:
        return 1.0
    k = min(to_wrong, to_correct)
    tail = sum(comb(n, i) for i in range(k + 1)) / float(1 << n)
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Doc:
    """One document's outcome on one setup."""

    doc_id: int
    correct: bool
    answer: str     # the filtered answer lm-eval scored
    response: str   # the raw generation (or the chosen option)
    question: str = ""
    target: str = ""


@dataclass
class Paired:
    baseline: list[Doc]
    candidate: list[Doc]
    identical_expected: bool
    to_correct: list[tuple[Doc, Doc]] = field(default_factory=list)
    to_wrong: list[tuple[Doc, Doc]] = field(default_factory=list)
    changed: int = 0  # documents whose answer differs, discordant or not

    def __post_init__(self) -> None:
        base = {d.doc_id: d for d in self.baseline}
        cand = {d.doc_id: d for d in self.candidate}
        if set(base) != set(cand):
            missing = sorted(set(base) ^ set(cand))[:5]
            raise ValueError(f"the setups answered different documents (e.g. ids {missing})")
        for doc_id in sorted(base):
            b, c = base[doc_id], cand[doc_id]
            self.changed += b.answer != c.answer
            if b.correct and not c.correct:
                self.to_wrong.append((b, c))
            elif c.correct and not b.correct:
                self.to_correct.append((b, c))

    @property
    def n(self) -> int:
        return len(self.baseline)

    @staticmethod
    def accuracy(docs: list[Doc]) -> float:
        return sum(d.correct for d in docs) / len(docs) if docs else 0.0

    @property
    def p_value(self) -> float:
        return mcnemar_exact(len(self.to_wrong), len(self.to_correct))

    def verdict(self) -> tuple[str, str]:
        """``(pass|fail|inconclusive, reason)`` by the module's rule."""
        base_correct = sum(d.correct for d in self.baseline)
        b, c = len(self.to_wrong), len(self.to_correct)
        moved = f"{b} document(s) right -> wrong, {c} wrong -> right of {self.n}"
        if base_correct < MIN_BASELINE_CORRECT:
            return "inconclusive", (f"the baseline answered only {base_correct} of {self.n} documents right "
                                    f"(< {MIN_BASELINE_CORRECT}): no regression could be detected")
        if self.identical_expected:
            if b or c:
                return "fail", f"float32 setups answer identically, but {moved}"
            return "pass", f"no discordant document of {self.n} ({self.changed} answers changed, all wrong both ways)" \
                if self.changed else f"identical correctness on all {self.n} documents"
        p = self.p_value
        if b > c and p < ALPHA:
            return "fail", f"{moved}: exact McNemar p = {p:.3g} < {ALPHA}"
        return "pass", f"{moved}: exact McNemar p = {p:.3g}" + (" (the candidate gained)" if c > b else "")

    def discordant_rows(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = [{"doc_id": b.doc_id, "direction": direction, "question": b.question, "target": b.target,
                 "baseline": b.response, "candidate": c.response,
                 "baseline_answer": b.answer, "candidate_answer": c.answer}
                for direction, pairs in (("to_wrong", self.to_wrong), ("to_correct", self.to_correct))
                for b, c in pairs]
        return rows[:limit]
