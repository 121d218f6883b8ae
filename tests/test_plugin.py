"""The pytest plugin, tested by running pytest on generated files (pytester)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CASE_TEST = """
def test_case(parity_case, parity_run):
    parity_run(parity_case)
"""


def test_cases_are_parametrized_with_readable_ids(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_m=CASE_TEST)
    result = pytester.runpytest_subprocess("-p", "harness.pytest_plugin", "--parity-backend", "mp",
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
    result = pytester.runpytest_subprocess("-p", "harness.pytest_plugin", "--parity-backend", "mp",
                                "-k", "tp2-sp-graph-full-text")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*tiny-llava/tp2-sp-graph-full-text differs from baseline tp2-graph-full:*",
        "*request mm1 step 3: candidate token 352 vs baseline 279*",
    ])


def test_skips_carry_reasons(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_m=CASE_TEST)
    result = pytester.runpytest_subprocess("-p", "harness.pytest_plugin", "--parity-backend", "mp",
                                "--parity-model", "tiny-llama", "-k", "tp2-eager-multimodal", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*scenario multimodal needs images; LlamaForCausalLM takes none*"])


def test_gpu_marker_skips_without_cuda(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_g="""
import pytest

@pytest.mark.gpu
def test_needs_gpu():
    pass
""")
    result = pytester.runpytest_subprocess("-p", "harness.pytest_plugin", "--parity-backend", "mp", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs a CUDA device; none available*"])


def test_one_ray_cluster_shared_by_xdist_workers(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: object) -> None:
    from pathlib import Path

    out = Path(str(tmp_path)) / "addresses"
    out.mkdir()
    monkeypatch.setenv("PARITY_TEST_ADDR_DIR", str(out))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    pytester.makepyfile(test_r="""
import os, pytest

@pytest.mark.parametrize("i", range(4))
def test_address(i, worker_id):
    import ray
    from harness.launch.ray_launcher import ensure_ray
    ensure_ray()
    path = os.path.join(os.environ["PARITY_TEST_ADDR_DIR"], f"{worker_id}-{i}")
    with open(path, "w") as f:
        f.write(os.environ["RAY_ADDRESS"] + " " + ray.get_runtime_context().gcs_address)
""")
    result = pytester.runpytest_subprocess("-p", "harness.pytest_plugin", "-n", "2")
    result.assert_outcomes(passed=4)
    files = list(out.iterdir())
    assert {f.name.split("-")[0] for f in files} == {"gw0", "gw1"}
    addresses = {tuple(f.read_text().split()) for f in files}
    assert len(addresses) == 1, addresses  # every worker joined the same cluster
    (env_address, gcs_address), = addresses
    assert env_address == gcs_address
