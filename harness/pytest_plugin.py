"""pytest plugin: parity's options, markers, one Ray cluster per test session, and matrix cases
as parametrized tests.

- ``--parity-backend ray|mp``, ``--parity-device cpu|cuda``, ``--parity-matrix NAME``,
  ``--parity-model NAME|PATH``, ``--parity-out DIR`` (write results.jsonl/summary/report there).
- Markers: ``gpu``, ``multi_gpu``, ``slow``; ``gpu``/``multi_gpu`` tests skip with a reason when
  the devices are missing.
- The controlling process (the xdist master, or the only process) starts one local Ray head and
  exports ``RAY_ADDRESS`` before any xdist worker starts, so every worker joins the same cluster.
- A test that takes the ``parity_case`` fixture is parametrized over the matrix's cases with ids
  like ``tp2-sp-graph-full-text`` (so ``-k tp2-sp`` selects); a failing case's assertion message
  states the first divergence.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.case import CaseResult

_STARTED_RAY = "_parity_started_ray"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("parity")
    group.addoption("--parity-backend", default="ray", choices=["ray", "mp"],
                    help="launcher for multi-rank cases (default: ray)")
    group.addoption("--parity-device", default=None, choices=["cpu", "cuda"],
                    help="device of the cases (default: the matrix's)")
    group.addoption("--parity-matrix", default="smoke", help="matrix whose cases parametrize parity_case")
    group.addoption("--parity-model", default="tiny-llava", help="built-in model or local checkpoint dir")
    group.addoption("--parity-out", default=None, help="also record results and render a report here")


def _is_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    for line in ("gpu: needs a CUDA device", "multi_gpu: needs several CUDA devices",
                 "slow: takes more than a few seconds"):
        config.addinivalue_line("markers", line)
    if _is_controller(config) and config.getoption("--parity-backend") == "ray" and not os.environ.get(
            "RAY_ADDRESS"):
        _start_session_cluster(config)


def _start_session_cluster(config: pytest.Config) -> None:
    """One local, loopback-only Ray head for the whole session, shared by xdist workers."""
    from harness.launch.ray_launcher import ensure_ray

    ensure_ray()
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    setattr(config, _STARTED_RAY, True)


def pytest_unconfigure(config: pytest.Config) -> None:
    if getattr(config, _STARTED_RAY, False):
        import ray

        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if "multi_gpu" in item.keywords and count < 2:
            item.add_marker(pytest.mark.skip(reason=f"needs >= 2 CUDA devices; {count} available"))
        elif "gpu" in item.keywords and count < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device; none available"))


def _options(config: pytest.Config) -> Any:
    from harness.matrix import get_matrix
    from harness.plan import RunOptions

    matrix = get_matrix(config.getoption("--parity-matrix"))
    return RunOptions(backend=config.getoption("--parity-backend"),
                      device=config.getoption("--parity-device") or matrix.device,
                      dtype=matrix.dtype, model=config.getoption("--parity-model"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "parity_case" not in metafunc.fixturenames:
        return
    from harness.matrix import get_matrix
    from harness.plan import plan

    config = metafunc.config
    planned = plan(get_matrix(config.getoption("--parity-matrix")), _options(config))
    metafunc.parametrize("parity_case", planned, ids=[f"{p.case.setup.id}-{p.case.scenario}" for p in planned])


@pytest.fixture(scope="session")
def parity_orchestrator(pytestconfig: pytest.Config) -> Iterator[Any]:
    """One orchestrator (and worker pool) per test process, closed at the end of the session."""
    from harness.orchestrate import Orchestrator

    orchestrator = Orchestrator(_options(pytestconfig))
    yield orchestrator
    orchestrator.close()


@pytest.fixture
def parity_run(parity_orchestrator: Any, pytestconfig: pytest.Config) -> Any:
    """Run a planned case; skip/fail the test from its result (the message explains a failure)."""

    def run(planned: Any) -> CaseResult:
        result: CaseResult = parity_orchestrator.run_case(planned)
        _record(pytestconfig, result)
        if result.status == "skip":
            pytest.skip(result.reason)
        if result.status == "error":
            pytest.fail(f"{result.id}: infrastructure error\n{result.reason}", pytrace=False)
        if result.status == "fail":
            pytest.fail(f"{result.id} differs from baseline {result.baseline}:\n{result.reason}", pytrace=False)
        return result

    return run


def _record(config: pytest.Config, result: CaseResult) -> None:
    out = config.getoption("--parity-out")
    if out:
        from harness.results import ResultStore

        ResultStore(Path(out)).append(result)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    out = session.config.getoption("--parity-out")
    if out and _is_controller(session.config) and (Path(out) / "results.jsonl").is_file():
        from harness.results import ResultStore, environment
        from reports.html import render_all

        render_all(Path(out), ResultStore(Path(out)).load(), environment())
