"""The nightly job: the workflow (valid against GitHub's schema, its jobs agreeing with `parity
matrix` and the ci/ scripts), the merge step (job summary, annotations, exit status, missing
shards), run history (new, recurring, fixed, flaky) and the baseline cache's engine key."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.history import RunStatuses, classify
from parity.cli import main
from parity.nightly import main as nightly_main

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "nightly.yml"


def workflow() -> dict:
    doc = yaml.safe_load(WORKFLOW.read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as True
    return doc


def test_workflow_validates_against_githubs_schema() -> None:
    exe = Path(sys.executable).parent / "check-jsonschema"
    res = subprocess.run([str(exe), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_workflow_jobs_agree_with_parity_matrix(capsys: pytest.CaptureFixture[str]) -> None:
    wf = workflow()
    assert "schedule" in wf["on"] and "workflow_dispatch" in wf["on"]
    jobs = wf["jobs"]
    assert set(jobs) == {"plan", "shard", "merge"}
    shard, merge = jobs["shard"], jobs["merge"]
    assert shard["strategy"]["fail-fast"] is False
    assert shard["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.shards) }}"
    assert shard["runs-on"] == "${{ fromJSON(matrix.runs_on) }}"
    assert "!cancelled()" in merge["if"] and set(merge["needs"]) == {"plan", "shard"}
    runs = [step.get("run", "") for job in jobs.values() for step in job["steps"]]
    # every script the workflow calls exists and is executable
    for script in {m for r in runs for m in re.findall(r"\bci/[\w-]+", r)}:
        assert os.access(ROOT / script, os.X_OK), script
    assert "parity\" \"${args[@]}\"" in (ROOT / "ci" / "plan").read_text()
    assert "matrix --name \"$matrix\" --shards \"$shards\" --format github" in (ROOT / "ci" / "plan").read_text()
    # the matrix keys the shard job reads are what `parity matrix --format github` writes
    used = set(re.findall(r"\bmatrix\.(\w+)", json.dumps(shard)))
    assert main(["matrix", "--name", "nightly", "--shards", "2", "--format", "github"]) == 0
    entry = json.loads(capsys.readouterr().out)["include"][0]
    assert used <= set(entry), used - set(entry)
    assert {"cases", "model", "matrix", "runs_on", "shard", "device"} <= used
    # the upload name is the directory ci/merge expects
    upload = next(s for s in shard["steps"] if "upload-artifact" in s.get("uses", ""))
    assert upload["with"]["name"] == "shard-${{ strategy.job-index }}"


def test_plan_takes_several_matrices_numbered_in_one_sequence(tmp_path: Path) -> None:
    """The nightly plans its matrices together (``MATRIX: nightly,real``): every matrix's shards,
    each with its own matrix and model, numbered I/N in one sequence (shard I uploads as shard-I)."""
    parity = tmp_path / "parity"
    parity.write_text(f"#!/bin/sh\nexec {sys.executable} -m parity.cli \"$@\"\n")
    parity.chmod(0o755)
    env = {**os.environ, "PARITY": str(parity), "PYTHON": sys.executable, "PLAN": str(tmp_path / "plan.json"),
           "PYTHONPATH": str(ROOT)}
    env.pop("GITHUB_OUTPUT", None)
    subprocess.run([str(ROOT / "ci" / "plan"), "smoke,nightly", "2"], env=env, cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    shards = json.loads((tmp_path / "plan.json").read_text())["include"]
    assert [s["shard"] for s in shards] == [f"{i}/4" for i in range(4)]
    assert [s["matrix"] for s in shards] == ["smoke", "smoke", "nightly", "nightly"]
    assert "nightly,real" in WORKFLOW.read_text()


# -- merge, summary, annotations, history (synthetic shard directories) ---------------------------

def record(case: str, status: str, reason: str = "", localization: dict | None = None) -> dict:
    setup, scenario = case.rsplit("-", 1)
    return {"id": f"tiny-llava/{case}", "setup": setup, "baseline": "tp2-graph-full", "scenario": scenario,
            "model": "tiny-llava", "status": status, "reason": reason, "seconds": 1.0,
            "localization": localization}


def write_run(d: Path, records: list[dict], engine: str = "e1", mutation: str | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (d / "summary.json").write_text(json.dumps({"run": {"engine_code": engine, "mutation": mutation},
                                                "cases": records}))
    return d


def plan_for(tmp: Path, shards: list[list[dict]]) -> Path:
    include = [{"shard": f"{i}/{len(shards)}", "count": len(s), "cases": ",".join(r["id"] for r in s)}
               for i, s in enumerate(shards)]
    path = tmp / "plan.json"
    path.write_text(json.dumps({"include": include}))
    return path


FAIL = record("tp2-sp-graph-full-prompt_embeds", "fail", "max |Δ logprob| 0.2 > atol 0.001",
              {"layer": 0, "tensor": "residual", "tp_rank": 1})
PASS = record("tp2-eager-text", "pass")


def test_merge_writes_summary_annotations_and_exit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path / "shards" / "shard-0", [PASS])
    write_run(tmp_path / "shards" / "shard-1", [FAIL])
    summary = tmp_path / "summary.md"
    code = nightly_main(["merge", "--plan", str(plan_for(tmp_path, [[PASS], [FAIL]])), "--shards",
                         str(tmp_path / "shards"), "--out", str(tmp_path / "merged"), "--summary", str(summary)])
    assert code == 1
    text = summary.read_text()
    assert "parity nightly: FAIL" in text and "layer 0 / residual / TP rank 1" in text
    assert "| `tp2-sp-graph-full` |" in text
    out = capsys.readouterr().out
    assert out.count("::error ") == 1 and "tiny-llava/tp2-sp-graph-full-prompt_embeds" in out
    assert (tmp_path / "merged" / "index.html").is_file()


def test_missing_shard_is_an_error_named_in_the_summary(tmp_path: Path) -> None:
    write_run(tmp_path / "shards" / "shard-0", [PASS])
    summary = tmp_path / "summary.md"
    code = nightly_main(["merge", "--plan", str(plan_for(tmp_path, [[PASS], [FAIL]])), "--shards",
                         str(tmp_path / "shards"), "--out", str(tmp_path / "merged"), "--summary", str(summary)])
    assert code == 3
    assert "**no results** for shard 1/2 (1 cases" in summary.read_text()
    shutil.rmtree(tmp_path / "shards")
    (tmp_path / "shards").mkdir()
    assert nightly_main(["merge", "--plan", str(plan_for(tmp_path, [[PASS]])), "--shards", str(tmp_path / "shards"),
                         "--out", str(tmp_path / "m2"), "--summary", str(summary)]) == 3


def test_three_nightlies_new_then_fixed(tmp_path: Path) -> None:
    """clean, under a mutation, clean: the mutation's failures are new, then fixed."""
    clean = write_run(tmp_path / "n1", [PASS, {**FAIL, "status": "pass"}])
    bad = write_run(tmp_path / "n2", [PASS, FAIL], mutation="sp-middle-residual-slice")
    assert main(["report", str(bad), "--out", str(tmp_path / "r2"), "--previous", str(clean)]) == 1
    h2 = json.loads((tmp_path / "r2" / "summary.json").read_text())["history"]
    assert h2["cases"][FAIL["id"]]["class"] == "new" and h2["cases"][PASS["id"]]["class"] == "pass"
    again = write_run(tmp_path / "n3", [PASS, {**FAIL, "status": "pass"}])
    assert main(["report", str(again), "--out", str(tmp_path / "r3"), "--previous", str(tmp_path / "r2"),
                 "--previous", str(clean)]) == 0
    h3 = json.loads((tmp_path / "r3" / "summary.json").read_text())["history"]
    assert h3["fixed"] == [FAIL["id"]] and h3["cases"][FAIL["id"]]["class"] == "fixed"
    assert not h3["cases"][FAIL["id"]]["flaky"]  # it changed with the code (the mutation), not by itself


def test_recurring_and_flaky() -> None:
    case = FAIL["id"]
    runs = [RunStatuses(f"r{i}", ("e1", None), {case: s}) for i, s in enumerate(["fail", "pass", "fail"])]
    h = classify(runs[0], runs[1:])
    assert h["cases"][case] == {"class": "new", "flaky": True, "failures": 2, "runs": 3}
    steady = [RunStatuses(f"r{i}", ("e1", None), {case: "fail"}) for i in range(3)]
    assert classify(steady[0], steady[1:])["cases"][case] == {"class": "recurring", "flaky": False,
                                                              "failures": 3, "runs": 3}
    # outcomes that differ across engine code are a regression or a fix, not a flake
    changed = [RunStatuses("a", ("e2", None), {case: "fail"}), RunStatuses("b", ("e1", None), {case: "pass"})]
    assert classify(changed[0], changed[1:])["cases"][case]["flaky"] is False
    # the window bounds how far back flakiness looks
    long = [RunStatuses("now", ("e1", None), {case: "fail"})] + \
        [RunStatuses(f"p{i}", ("e1", None), {case: "fail"}) for i in range(3)] + [RunStatuses("old", ("e1", None), {case: "pass"})]
    assert classify(long[0], long[1:], window=4)["cases"][case]["flaky"] is False
    assert classify(long[0], long[1:], window=5)["cases"][case]["flaky"] is True


def test_engine_code_change_invalidates_the_baseline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from harness import baseline
    from reference_impl.engine import EngineSpec
    from scenarios.models import checkpoint

    ck = str(checkpoint("tiny-llama"))
    spec = EngineSpec(ck)
    shutil.copytree(ROOT / "reference_impl", tmp_path / "reference_impl",
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(baseline, "REPO_ROOT", tmp_path)
    baseline.engine_code_hash.cache_clear()
    try:
        before = baseline.BaselineCache.key(ck, [], spec, "float32", "cpu")
        assert baseline.BaselineCache.key(ck, [], spec, "float32", "cpu") == before  # stable
        runner = tmp_path / "reference_impl" / "runner.py"
        runner.write_text(runner.read_text() + "\n# a change to the engine\n")
        baseline.engine_code_hash.cache_clear()
        assert baseline.BaselineCache.key(ck, [], spec, "float32", "cpu") != before
    finally:
        baseline.engine_code_hash.cache_clear()


def test_compile_cache_lives_in_the_parity_cache_and_reaches_the_ranks(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.compile_cache import INDUCTOR_ENV, TRITON_ENV, use_compile_cache
    from harness.launch.ray_launcher import FORWARDED_ENV

    monkeypatch.delenv(INDUCTOR_ENV, raising=False)
    monkeypatch.delenv(TRITON_ENV, raising=False)
    monkeypatch.setenv("PARITY_CACHE", str(tmp_path))
    where = use_compile_cache()
    assert where == {INDUCTOR_ENV: str(tmp_path / "compile" / "inductor"), TRITON_ENV: str(tmp_path / "compile" / "triton")}
    import torch._inductor.codecache  # noqa: F401  (the module that reads the variable)
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    assert cache_dir() == str(tmp_path / "compile" / "inductor")
    assert {INDUCTOR_ENV, TRITON_ENV} <= set(FORWARDED_ENV)  # Ray actors get it; mp ranks inherit it
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    monkeypatch.setenv(INDUCTOR_ENV, default_cache_dir())  # torch's default, which it writes there itself
    assert use_compile_cache()[INDUCTOR_ENV] == str(tmp_path / "compile" / "inductor")
    monkeypatch.setenv(INDUCTOR_ENV, "/elsewhere")  # a location the user chose is kept
    assert use_compile_cache()[INDUCTOR_ENV] == "/elsewhere"
    # the nightly workflow restores and saves it with the baselines, under the engine's code hash
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "nightly.yml").read_text())
    cache = next(s for s in workflow["jobs"]["shard"]["steps"] if s.get("uses", "").startswith("actions/cache@"))
    assert {".parity-cache/baselines", ".parity-cache/compile"} <= set(cache["with"]["path"].split())
    assert "engine_hash" in cache["with"]["key"]
