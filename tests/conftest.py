"""Fixtures shared by the tests of the parts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.launch import MpLauncher

from helpers import use_test_operations


@pytest.fixture(scope="module")
def launchers() -> Iterator[dict[int, MpLauncher]]:
    """A 2-rank and a 4-rank process pool, kept for one test module."""
    pool = {2: MpLauncher(2), 4: MpLauncher(4)}
    yield pool
    for launcher in pool.values():
        launcher.close()


@pytest.fixture
def test_operations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank processes that ``MpLauncher`` and ``RayLauncher`` start during the test also carry the
    operations of ``helpers.TEST_OPERATIONS`` (fail on cue, probe a collective)."""
    use_test_operations(monkeypatch)
