"""The pytest plugin, tested by running pytest on generated files (pytester)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def own_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pytest runs here start their own Ray head, whatever this session has joined."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

CASE_TEST = """
def test_case(parity_case, parity_run):
    parity_run(parity_case)
"""


def test_cases_are_parametrized_with_readable_ids(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_m=CASE_TEST)
    result = pytester.runpytest_subprocess("--parity-backend", "mp",
                                "--collect-only", "-q", "-k", "tp2-sp")
    result.stdout.fnmatch_lines([
        "test_m.py::test_case[[]tp2-sp-graph-full-text[]]",
        "test_m.py::test_case[[]tp2-sp-graph-piecewise-mixed[]]",
    ])
    assert "tp2-pp2-eager" not in result.stdout.str()  # -k selected by setup id
    result.stdout.fnmatch_lines(["8/36 tests collected (28 deselected)*"])


def test_failure_message_states_the_first_divergence(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("""
import pytest
from harness.case import CaseResult

class FakeOrchestrator:
    def run_case(self, planned):
        return CaseResult.for_case(planned.case, "fail",
            reason="request mm1 step 3: candidate token 352 vs baseline 279")

@pytest.fixture(scope="session")
def parity_orchestrator():
    return FakeOrchestrator()
""")
    pytester.makepyfile(test_m=CASE_TEST)
    result = pytester.runpytest_subprocess("--parity-backend", "mp",
                                "-k", "tp2-sp-graph-full-text")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*tiny-llava/tp2-sp-graph-full-text differs from baseline tp2-graph-full:*",
        "*request mm1 step 3: candidate token 352 vs baseline 279*",
    ])


def test_parity_out_writes_the_report_of_parity_run(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """``--parity-out``: the same files as ``parity run --out``, the run's settings included (the
    report's header and its reproduce commands come from them)."""
    pytester.makeconftest("""
import pytest
from harness.case import CaseResult

class FakeOrchestrator:
    def run_case(self, planned):
        return CaseResult.for_case(planned.case, "fail", reason="request mm1 step 3: differs",
            localization={"layer": 0, "tensor": "residual", "rows": [0, 1, 2, 3], "tp_ranks": [1]})

@pytest.fixture(scope="session")
def parity_orchestrator():
    return FakeOrchestrator()
""")
    pytester.makepyfile(test_m=CASE_TEST)
    out = tmp_path / "out"
    result = pytester.runpytest_subprocess("--parity-backend", "mp", "--parity-out", str(out),
                                           "-k", "tp2-sp-graph-full-text")
    result.assert_outcomes(failed=1)
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "junit.xml", "results.jsonl", "summary.json"]
    run = json.loads((out / "summary.json").read_text(encoding="utf-8"))["run"]
    assert (run["matrix"], run["model"], run["backend"]) == ("smoke", "tiny-llava", "mp")
    assert run["command"].startswith("pytest ") and "--parity-out" in run["command"]
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "parity run --matrix smoke --setups tp2-sp-graph-full --scenarios text --model tiny-llava" in html
    assert "layer 0 · residual · TP rank 1" in html
    assert "localization: layer 0, tensor residual, rows 0–3" in (out / "junit.xml").read_text(encoding="utf-8")


def test_skips_carry_reasons(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_m=CASE_TEST)
    result = pytester.runpytest_subprocess("--parity-backend", "mp",
                                "--parity-model", "tiny-llama", "-k", "tp2-eager-multimodal", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*scenario multimodal needs images; LlamaForCausalLM takes none*"])


def test_engine_option_plans_transformers_cases_with_their_skip_reasons(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_m=CASE_TEST)
    result = pytester.runpytest_subprocess("--parity-backend", "mp", "--parity-engine", "transformers",
                                           "--parity-model", "tiny-llama", "-k", "tp2-pp2-eager and text", "-rs", "-v")
    result.assert_outcomes(skipped=2)  # against one device, and against the reference engine
    result.stdout.fnmatch_lines(["*test_case[[]tp2-pp2-eager@transformers-text[]] SKIPPED*",
                                 "*test_case[[]tp2-pp2-eager@transformers-text-vs-reference[]] SKIPPED*",
                                 "*the transformers engine cannot express pp=2*"])


def test_gpu_marker_skips_without_cuda(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_g="""
import pytest

@pytest.mark.gpu
def test_needs_gpu():
    pass
""")
    result = pytester.runpytest_subprocess("--parity-backend", "mp", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs a CUDA device; none available*"])


def head_stopped(pid: int) -> bool:
    from parity.ray_session import alive

    return not alive(pid)


def test_a_session_that_needs_no_ray_never_imports_it(pytester: pytest.Pytester) -> None:
    """``pytest tests/test_compare.py``: neither the plugin nor any fixture touches Ray."""
    pytester.makepyfile(test_a="""
import sys

def test_plain():
    assert "ray" not in sys.modules
""")
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_one_ray_cluster_shared_by_xdist_workers(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """The first test to need Ray starts the session's head, whichever worker runs it; every
    worker's tests, and a Ray launcher's actors, use that one; it ends with the session."""
    out = tmp_path / "addresses"
    out.mkdir()
    pytester.makepyfile(test_r=f"""
import os, pytest

@pytest.mark.parametrize("i", range(4))
def test_address(i, worker_id, ray_cluster, pytestconfig):
    import ray
    from parity.pytest_plugin import controller_pid
    from parity.ray_session import session_dir

    head = (session_dir(controller_pid(pytestconfig)) / "pid").read_text()
    with open(os.path.join({str(out)!r}, f"{{worker_id}}-{{i}}"), "w") as f:
        f.write(" ".join([ray_cluster, os.environ["RAY_ADDRESS"], ray.get_runtime_context().gcs_address, head]))


def test_launcher(ray_cluster):
    from harness.launch import RayLauncher

    with RayLauncher(1) as launcher:
        assert launcher.call("ping") == [0]
""")
    result = pytester.runpytest_subprocess("-n", "2")
    result.assert_outcomes(passed=5)
    files = list(out.iterdir())
    assert {f.name.split("-")[0] for f in files} == {"gw0", "gw1"}
    seen = {tuple(f.read_text().split()) for f in files}
    assert len(seen) == 1, seen  # every worker joined the same cluster, started once
    (fixture, env_address, gcs_address, head), = seen
    assert fixture == env_address == gcs_address
    assert head_stopped(int(head))  # the controller stopped it at the end
