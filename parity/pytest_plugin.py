"""pytest plugin (the ``pytest11`` entry point ``parity``): parity's options and markers, a Ray
cluster for the tests that need one, and matrix cases as parametrized tests.

- ``--parity-backend ray|mp``, ``--parity-device cpu|cuda``, ``--parity-matrix NAME``,
  ``--parity-model NAME|PATH``, ``--parity-engine reference|transformers`` (the engine under
  test), ``--parity-out DIR`` (write results.jsonl/summary/report there).
- Markers (declared here only): ``gpu``, ``multi_gpu``, ``slow``; ``gpu``/``multi_gpu`` tests
  skip with a reason when the devices are missing.
- ``ray_cluster`` (session fixture): the address of the Ray cluster the session's tests share,
  connected and exported as ``RAY_ADDRESS`` (so launchers join it). ``RAY_ADDRESS`` set before
  the session names a cluster to join; otherwise the first test to need Ray, in whichever xdist
  worker, starts one loopback-only head for the whole session (``parity.ray_session``), and the
  controlling process stops it at the end. A session none of whose tests needs Ray never
  imports ``ray``.
- A test that takes the ``parity_case`` fixture is parametrized over the matrix's cases with ids
  like ``tp2-sp-graph-full-text`` (so ``-k tp2-sp`` selects); a failing case's assertion message
  states the first divergence.

Everything heavy (torch, ray, the harness) is imported inside the hooks and fixtures: the plugin
is loaded at pytest's start-up, before any conftest has set the environment (e.g.
``TRITON_INTERPRET``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from harness.case import CaseResult
    from harness.plan import RunOptions

MARKERS = ("gpu: needs a CUDA device", "multi_gpu: needs several CUDA devices",
           "slow: takes more than a few seconds")
# The controlling process's pid, handed to xdist workers: it names the session's Ray head.
_CONTROLLER = "parity_controller_pid"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("parity")
    group.addoption("--parity-backend", default="ray", choices=["ray", "mp"],
                    help="launcher for multi-rank cases (default: ray)")
    group.addoption("--parity-device", default=None, choices=["cpu", "cuda"],
                    help="device of the cases (default: the matrix's)")
    group.addoption("--parity-matrix", default="smoke", help="matrix whose cases parametrize parity_case")
    group.addoption("--parity-model", default=None,
                    help="built-in model or local checkpoint dir (default: the matrix's)")
    group.addoption("--parity-engine", default="reference", choices=["reference", "transformers"],
                    help="the engine under test (default: reference; transformers: its tp_plan='auto' TP)")
    group.addoption("--parity-out", default=None, help="also record results and render a report here")


def _is_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")


def controller_pid(config: pytest.Config) -> int:
    """The pid of the session's controlling process (the xdist controller, or the only process)."""
    if _is_controller(config):
        return os.getpid()
    workerinput: dict[str, Any] = config.workerinput  # type: ignore[attr-defined]  # set by xdist
    return int(workerinput.get(_CONTROLLER, os.getppid()))


def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """(pytest-xdist, in the controlling process) Each worker learns whose session it is in."""
    node.workerinput[_CONTROLLER] = os.getpid()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _is_controller(config):
        from parity import ray_session

        ray_session.stop(os.getpid())


@pytest.fixture(scope="session")
def ray_cluster(pytestconfig: pytest.Config) -> str:
    """The address of the session's Ray cluster, connected in this process and exported as
    ``RAY_ADDRESS``: the one ``RAY_ADDRESS`` names, else the session's own loopback-only head."""
    from harness.launch.ray_launcher import ensure_ray

    if not os.environ.get("RAY_ADDRESS"):
        from parity import ray_session

        os.environ["RAY_ADDRESS"] = ray_session.address(controller_pid(pytestconfig))
    ensure_ray()
    return os.environ["RAY_ADDRESS"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs_gpus = [item for item in items if "gpu" in item.keywords or "multi_gpu" in item.keywords]
    if not needs_gpus:
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in needs_gpus:
        if "multi_gpu" in item.keywords and count < 2:
            item.add_marker(pytest.mark.skip(reason=f"needs >= 2 CUDA devices; {count} available"))
        elif "gpu" in item.keywords and count < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device; none available"))


def _options(config: pytest.Config) -> RunOptions:
    from harness.matrix import get_matrix
    from harness.plan import RunOptions

    matrix = get_matrix(config.getoption("--parity-matrix"))
    return RunOptions(backend=config.getoption("--parity-backend"),
                      device=config.getoption("--parity-device") or matrix.device,
                      dtype=matrix.dtype, model=config.getoption("--parity-model") or matrix.model,
                      engine=config.getoption("--parity-engine"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "parity_case" not in metafunc.fixturenames:
        return
    from harness.matrix import get_matrix
    from harness.plan import plan

    config = metafunc.config
    planned = plan(get_matrix(config.getoption("--parity-matrix")), _options(config))
    # The case id without its model (a checkpoint path may hold "/"; setup ids and scenarios do not):
    # ``tp2-sp-graph-full-text``, ``tp2-eager@transformers-text-vs-reference``.
    metafunc.parametrize("parity_case", planned, ids=[p.case.id.rsplit("/", 1)[1] for p in planned])


@pytest.fixture(scope="session")
def parity_orchestrator(request: pytest.FixtureRequest) -> Iterator[Any]:
    """One orchestrator (and worker pool) per test process, closed at the end of the session;
    on the Ray backend its launchers join the session's ``ray_cluster``."""
    from harness.orchestrate import Orchestrator

    options = _options(request.config)
    if options.backend == "ray":
        request.getfixturevalue("ray_cluster")
    orchestrator = Orchestrator(options)
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
    """Write the run directory's ``summary.json``, ``junit.xml`` and ``index.html`` as ``parity
    run`` does, with the run's settings (so the report shows them and its reproduce commands)."""
    config = session.config
    out = config.getoption("--parity-out")
    if out and _is_controller(config) and (Path(out) / "results.jsonl").is_file():
        from harness.matrix import get_matrix
        from harness.results import ResultStore, environment
        from harness.run_meta import run_settings
        from parity.outputs import write_outputs

        matrix = get_matrix(config.getoption("--parity-matrix"))
        run = run_settings(_options(config), matrix.name, list(matrix.setups), list(matrix.scenarios),
                           ["pytest", *config.invocation_params.args])
        write_outputs(Path(out), ResultStore(Path(out)).load(), environment(), run=run)
