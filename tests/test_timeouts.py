"""A case's timeout: its expected cost with a margin, at least the floor, scaled by the checkpoint's
size, and grown with the machine's load when the case starts (a busy machine is slower, not hung)."""

from __future__ import annotations

import os

import pytest

from harness import timeouts
from harness.matrix import get_matrix
from harness.plan import RunOptions, plan
from harness.timeouts import MARGIN, MAX_LOAD_FACTOR, MIN_S, case_timeouts, load_factor
from scenarios.models import checkpoint


def test_derived_timeouts_have_the_margin_and_the_floor() -> None:
    planned = plan(get_matrix("smoke"), RunOptions(backend="mp"))
    got = case_timeouts(planned, checkpoint("tiny-llava"))
    assert all(t >= MIN_S for t in got.values())
    slow = {p.case.id: 100.0 for p in planned}
    assert set(case_timeouts(planned, checkpoint("tiny-llava"), slow).values()) == {MARGIN * 100.0}
    assert set(case_timeouts(planned, checkpoint("tiny-llava"), override=7.0).values()) == {7.0}


@pytest.mark.parametrize(("load", "factor"), [(0.3, 1.0), (None, 1.0), (6.0, 6.0 / (os.cpu_count() or 1)),
                                              (1e6, MAX_LOAD_FACTOR)])
def test_load_factor_follows_the_run_queue_per_core(monkeypatch: pytest.MonkeyPatch, load: float | None,
                                                    factor: float) -> None:
    def getloadavg() -> tuple[float, float, float]:
        if load is None:
            raise OSError("no load average here")
        return (load, 0.0, 0.0)

    monkeypatch.setattr(timeouts.os, "getloadavg", getloadavg)
    assert load_factor() == pytest.approx(max(1.0, min(MAX_LOAD_FACTOR, factor)))
