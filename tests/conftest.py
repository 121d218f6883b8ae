"""Fixtures shared by the tests of the parts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.launch import MpLauncher


@pytest.fixture(scope="module")
def launchers() -> Iterator[dict[int, MpLauncher]]:
    """A 2-rank and a 4-rank process pool, kept for one test module."""
    pool = {2: MpLauncher(2), 4: MpLauncher(4)}
    yield pool
    for launcher in pool.values():
        launcher.close()
