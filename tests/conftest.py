"""Fixtures shared by the tests of the parts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.launch import MpLauncher, mp, ray_launcher

from helpers import remote_actor_with_test_operations, serve_with_test_operations


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
    monkeypatch.setattr(mp, "_serve", serve_with_test_operations)
    monkeypatch.setattr(ray_launcher, "_remote_actor_class", remote_actor_with_test_operations)
