"""The matrix's cases as tests: ``pytest scenarios/ -k tp2-sp`` (``--parity-matrix`` picks it).

Each case runs a setup on a scenario's requests and compares it with its baseline; a failure
message names the first divergence (request, step, both tokens, both top-k)."""

from __future__ import annotations

from typing import Any


def test_case(parity_case: Any, parity_run: Any) -> None:
    parity_run(parity_case)
