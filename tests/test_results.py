"""results.jsonl (append, load, resume, truncation), totals, exit codes, summary.json, junit.xml, merge."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import asdict
from datetime import datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from harness import results as res
from harness.case import CaseResult
from harness.results import (
    EXIT_NOTHING_RAN,
    ResultStore,
    exit_code,
    merge,
    totals,
    write_junit,
    write_summary,
)

# The contract's field names, spelled out here (not derived from the dataclass) on purpose.
CASE_KEYS = {"id", "setup", "baseline", "scenario", "model", "status", "reason", "first_divergence",
             "localization", "sp_matches", "metrics", "seconds"}
DIVERGENCE = {
    "request_id": "req-3", "step": 5, "candidate_token": 42, "baseline_token": 17,
    "candidate_top_k": [[42, -0.5], [17, -0.9]], "baseline_top_k": [[17, -0.4], [42, -1.1]],
    "candidate_logprob": -0.5, "baseline_logprob": -1.1, "logprob_diff": 0.6,
    "reason": "argmax differs", "tolerated": False,
}


def make(status: str = "pass", scenario: str = "text", setup: str = "tp2-eager", model: str = "tiny-llama",
         **fields: Any) -> CaseResult:
    return CaseResult(f"{model}/{setup}-{scenario}", setup, "tp1-pp1-eager", scenario, model, status, **fields)


def lines(store: ResultStore) -> list[str]:
    return store.path.read_text(encoding="utf-8").splitlines()


# --- append / load -----------------------------------------------------------------------------


def test_store_creates_directory(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    assert store.load() == [] and store.done_ids() == set()


def test_append_load_roundtrip(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    failed = make("fail", scenario="b", reason="mismatch", first_divergence=DIVERGENCE,
                  localization={"layer": 2, "per_layer_error": [0.0, 0.5]}, metrics={"max_diff": 0.25}, seconds=1.5)
    store.append(make("pass"))
    store.append(failed)
    assert store.load() == [make("pass"), failed]
    assert store.path == tmp_path / "results.jsonl"


def test_append_writes_one_line_each_and_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store = ResultStore(tmp_path)
    for i, scenario in enumerate(["a", "b", "c"], start=1):
        store.append(make(scenario=scenario))
        # Visible on disk right away, as one complete JSON object per line.
        assert [json.loads(ln)["scenario"] for ln in lines(store)] == ["a", "b", "c"][:i]
        assert len(synced) == i


def test_a_second_store_on_the_same_dir_appends(tmp_path: Path) -> None:
    ResultStore(tmp_path).append(make(scenario="a"))
    ResultStore(tmp_path).append(make(scenario="b"))
    assert [r.scenario for r in ResultStore(tmp_path).load()] == ["a", "b"]


def test_truncated_last_line_is_ignored(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.append(make(scenario="a"))
    store.append(make(scenario="b"))
    full = res.dumps_line(make(scenario="c"))
    with store.path.open("a", encoding="utf-8") as f:
        f.write(full[: len(full) // 2])  # killed mid-write
    assert [r.scenario for r in store.load()] == ["a", "b"]
    assert store.done_ids() == {"tiny-llama/tp2-eager-a", "tiny-llama/tp2-eager-b"}


def test_truncated_inside_a_multibyte_character(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.append(make(scenario="a", reason="déjà vu"))
    full = res.dumps_line(make(scenario="b", reason="日本語")).encode("utf-8")
    with store.path.open("ab") as f:
        f.write(full[: full.index("本".encode()) + 1])  # cut in the middle of a character
    assert [r.reason for r in store.load()] == ["déjà vu"]
    store.append(make(scenario="b", reason="日本語"))
    assert [r.reason for r in store.load()] == ["déjà vu", "日本語"]


def test_append_after_truncated_tail_does_not_corrupt(tmp_path: Path) -> None:
    ResultStore(tmp_path).append(make(scenario="a"))
    with (tmp_path / "results.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"id": "tiny-llama/tp2-eager-c", "se')
    store = ResultStore(tmp_path)  # the resumed run
    store.append(make(scenario="c"))
    store.append(make(scenario="d"))
    assert [json.loads(ln)["scenario"] for ln in lines(store)] == ["a", "c", "d"]
    assert [r.scenario for r in store.load()] == ["a", "c", "d"]


def test_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    (tmp_path / "results.jsonl").write_text(res.dumps_line(make(scenario="a")).rstrip("\n"), encoding="utf-8")
    store = ResultStore(tmp_path)
    assert [r.scenario for r in store.load()] == ["a"]
    store.append(make(scenario="b"))
    assert [r.scenario for r in store.load()] == ["a", "b"]


def test_malformed_line_in_the_middle_raises(tmp_path: Path) -> None:
    good = res.dumps_line(make())
    (tmp_path / "results.jsonl").write_text(good + "{not json\n" + good, encoding="utf-8")
    with pytest.raises(ValueError, match=r"results\.jsonl:2"):
        ResultStore(tmp_path).load()


def test_last_record_wins_and_keeps_first_position(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.append(make("error", scenario="a", reason="Traceback ... NCCL timeout"))
    store.append(make(scenario="b"))
    store.append(make("pass", scenario="a", seconds=2.0))
    loaded = store.load()
    assert [(r.scenario, r.status) for r in loaded] == [("a", "pass"), ("b", "pass")]
    assert loaded[0].seconds == 2.0


def test_done_ids_for_resume(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    for status, scenario in [("pass", "a"), ("fail", "b"), ("error", "c"), ("skip", "d")]:
        store.append(make(status, scenario=scenario))
    ids = {f"tiny-llama/tp2-eager-{s}" for s in "abcd"}
    assert store.done_ids() == ids
    assert store.done_ids(retry_errors=True) == ids - {"tiny-llama/tp2-eager-c"}


def test_nonfinite_floats_are_written_as_strict_json(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.append(make(metrics={"nan": math.nan, "inf": math.inf, "pair": (1, 2)}))

    def reject(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    record = json.loads(lines(store)[0], parse_constant=reject)
    assert record["metrics"] == {"nan": "nan", "inf": "inf", "pair": [1, 2]}


# --- totals / exit codes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([], {"pass": 0, "fail": 0, "error": 0, "skip": 0}),
        (["pass", "pass", "skip"], {"pass": 2, "fail": 0, "error": 0, "skip": 1}),
        (["fail", "error", "error", "pass", "skip"], {"pass": 1, "fail": 1, "error": 2, "skip": 1}),
    ],
)
def test_totals_has_all_four_keys(statuses: list[str], expected: dict[str, int]) -> None:
    counts = totals([make(s, scenario=str(i)) for i, s in enumerate(statuses)])
    assert counts == expected
    assert list(counts) == ["pass", "fail", "error", "skip"]


@pytest.mark.parametrize(
    ("statuses", "code"),
    [
        ([], 4),  # nothing ran
        (["pass"], 0),
        (["skip"], 4),
        (["pass", "skip"], 0),
        (["fail"], 1),
        (["fail", "pass"], 1),
        (["fail", "skip"], 1),
        (["fail", "error"], 1),
        (["error", "fail", "pass", "skip"], 1),
        (["error"], 3),
        (["error", "pass"], 3),
        (["error", "skip"], 3),
        (["error", "pass", "skip"], 3),
    ],
)
def test_exit_code(statuses: list[str], code: int) -> None:
    assert exit_code([make(s, scenario=str(i)) for i, s in enumerate(statuses)]) == code


def test_exit_code_constants() -> None:
    assert (res.EXIT_OK, res.EXIT_FAIL, res.EXIT_USAGE, res.EXIT_INFRA) == (0, 1, 2, 3)


# --- environment -------------------------------------------------------------------------------


def test_environment() -> None:
    env = res.environment()
    assert {"git_sha", "python", "torch", "transformers", "ray", "platform", "hostname", "cpu_count",
            "cuda_devices", "timestamp"} <= set(env)
    assert env["git_sha"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", env["git_sha"])
    assert isinstance(env["cuda_devices"], list)
    stamp = datetime.fromisoformat(env["timestamp"])
    assert stamp.utcoffset() == timedelta(0)
    json.dumps(env)


def test_git_sha_unknown_without_git(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_git(*args: Any, **kwargs: Any) -> None:
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert res.environment()["git_sha"] == "unknown"


def test_git_sha_marks_a_dirty_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    sha = "0123456789abcdef0123456789abcdef01234567"

    def git(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        out = sha + "\n" if args[1] == "rev-parse" else (" M harness/cli.py\n" if dirty else "")
        return subprocess.CompletedProcess(args, 0, stdout=out, stderr="")

    monkeypatch.setattr(subprocess, "run", git)
    dirty = False
    assert res.environment()["git_sha"] == sha
    dirty = True
    assert res.environment()["git_sha"] == sha + "-dirty"


def test_git_sha_unknown_outside_a_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    failed = subprocess.CompletedProcess(["git"], 128, stdout="", stderr="fatal: not a git repository")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    assert res.environment()["git_sha"] == "unknown"


# --- summary.json ------------------------------------------------------------------------------


def test_summary_json_keys_exactly_per_contract(tmp_path: Path) -> None:
    cases = [
        make("fail", scenario="b", reason="mismatch", first_divergence=DIVERGENCE, localization={"layer": 1}),
        make("pass", scenario="a", metrics={"max_diff": 0.0}, seconds=0.5),
        make("skip", scenario="c", reason="no vision tower"),
        make("error", scenario="d", reason="Traceback"),
    ]
    env = {"git_sha": "abc", "python": "3.11"}
    path = write_summary(tmp_path / "out", cases, env)
    assert path == tmp_path / "out" / "summary.json"
    text = path.read_text(encoding="utf-8")
    assert text.startswith('{\n  "cases": [')  # indent 2
    data = json.loads(text)
    assert set(data) == {"cases", "totals", "environment"}
    assert set(data["totals"]) == {"pass", "fail", "error", "skip"}
    assert data["totals"] == {"pass": 1, "fail": 1, "error": 1, "skip": 1}
    assert data["environment"] == env
    assert [c["scenario"] for c in data["cases"]] == ["b", "a", "c", "d"]  # the order given
    for case in data["cases"]:
        assert set(case) == CASE_KEYS
        assert case["status"] in {"pass", "fail", "error", "skip"}
    assert data["cases"][0]["first_divergence"] == DIVERGENCE
    assert data["cases"][0]["localization"] == {"layer": 1}
    assert data["cases"][1]["first_divergence"] is None and data["cases"][1]["localization"] is None
    assert [CaseResult.from_json(c) for c in data["cases"]] == cases


def test_summary_json_has_the_run_settings_first(tmp_path: Path) -> None:
    from harness.compare import tolerance_for
    from harness.plan import RunOptions
    from harness.run_meta import run_settings

    opts = RunOptions(backend="mp", model="tiny-llama", dtype="bfloat16", seed=7, mutation="all-gather-reversed-order")
    run = run_settings(opts, "smoke", ["tp2-eager"], ["text", "mixed"],
                       ["parity", "run", "--setups", "tp2-eager", "--out", "my dir"])
    data = json.loads(write_summary(tmp_path, [make()], {"git_sha": "abc"}, run=run).read_text(encoding="utf-8"))
    assert list(data) == ["run", "cases", "totals", "environment"]
    got = data["run"]
    assert set(got) == {"matrix", "setups", "scenarios", "model", "checkpoint_hash", "engine", "engine_identity",
                        "engine_code", "baseline", "policy", "tolerances", "dtype", "device", "backend", "seed",
                        "mutation", "requests", "requests_hash", "repeat", "engine_limits", "command", "version",
                        "git_sha"}
    assert (got["requests"], got["requests_hash"], got["repeat"]) == (None, None, 1)
    from harness.setup import MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS

    assert got["engine_limits"] == {"max_num_seqs": MAX_NUM_SEQS, "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS}
    assert (got["matrix"], got["setups"], got["scenarios"], got["model"]) == (
        "smoke", ["tp2-eager"], ["text", "mixed"], "tiny-llama")
    assert (got["dtype"], got["device"], got["backend"], got["seed"]) == ("bfloat16", "cpu", "mp", 7)
    assert (got["baseline"], got["policy"], got["mutation"]) == ("auto", opts.policy, "all-gather-reversed-order")
    assert got["tolerances"] == asdict(tolerance_for("bfloat16")) != asdict(tolerance_for("float32"))
    assert got["command"] == "parity run --setups tp2-eager --out 'my dir'"
    assert re.fullmatch(r"[0-9a-f]{16}", got["checkpoint_hash"])
    assert got["version"] == metadata.version("parity-harness")
    assert got["git_sha"] == res._git_sha()


# --- junit.xml ---------------------------------------------------------------------------------


def test_junit_counts_and_elements(tmp_path: Path) -> None:
    cases = [
        make("pass", scenario="a", seconds=1.25),
        make("fail", scenario="b", reason="token mismatch", first_divergence=DIVERGENCE, seconds=2.0),
        make("error", scenario="c", reason="Traceback (most recent call last):\n  ...\nRuntimeError: boom"),
        make("skip", scenario="d", reason="no vision tower"),
        make("pass", scenario="e", model="tiny-qwen", setup="tp1-pp2-eager"),
    ]
    path = write_junit(tmp_path, cases, suite_name="nightly")
    assert path == tmp_path / "junit.xml"
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    assert len(suites) == 1
    suite = suites[0]
    assert suite.get("name") == "nightly"
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("5", "1", "1", "1")
    assert float(suite.get("time", "nan")) == pytest.approx(3.25)
    tcs = suite.findall("testcase")
    assert [(t.get("classname"), t.get("name")) for t in tcs] == [
        ("tiny-llama.tp2-eager", "a"), ("tiny-llama.tp2-eager", "b"), ("tiny-llama.tp2-eager", "c"),
        ("tiny-llama.tp2-eager", "d"), ("tiny-qwen.tp1-pp2-eager", "e"),
    ]
    assert float(tcs[0].get("time", "nan")) == pytest.approx(1.25)
    assert list(tcs[0]) == [] and list(tcs[4]) == []
    [failure] = list(tcs[1])
    assert failure.tag == "failure" and failure.get("message") == "token mismatch"
    assert failure.text and "42" in failure.text and "17" in failure.text and "req-3" in failure.text
    [error] = list(tcs[2])
    assert error.tag == "error" and error.get("message") == "RuntimeError: boom"
    assert error.text and error.text.startswith("Traceback (most recent call last):")
    [skipped] = list(tcs[3])
    assert skipped.tag == "skipped" and skipped.get("message") == "no vision tower"


def test_junit_survives_control_characters_and_markup(tmp_path: Path) -> None:
    bad = "decoded \x00\x1b[31m <b>&amp; \"quoted\""
    path = write_junit(tmp_path, [make("fail", reason=bad, model="m<&>")])
    root = ET.parse(path).getroot()  # must still be well-formed XML
    tc = next(root.iter("testcase"))
    assert tc.get("classname") == "m<&>.tp2-eager"
    failure = tc.find("failure")
    assert failure is not None and "<b>&amp;" in (failure.get("message") or "")


def test_junit_empty_run(tmp_path: Path) -> None:
    suite = next(ET.parse(write_junit(tmp_path, [])).getroot().iter("testsuite"))
    assert suite.get("tests") == "0" and suite.findall("testcase") == []


# --- merge -------------------------------------------------------------------------------------


def test_merge_later_dirs_win(tmp_path: Path) -> None:
    a, b = ResultStore(tmp_path / "shard0"), ResultStore(tmp_path / "shard1")
    a.append(make(scenario="x"))
    a.append(make("error", scenario="y", reason="crash"))
    b.append(make("fail", scenario="y", reason="mismatch"))
    b.append(make(scenario="z"))
    with b.path.open("a", encoding="utf-8") as f:
        f.write('{"id": "trunc')
    merged = merge([a.out_dir, b.out_dir], allow_duplicates=True)
    assert [(r.scenario, r.status) for r in merged.results] == [("x", "pass"), ("y", "fail"), ("z", "pass")]
    assert merged.overridden == [res.Override(make(scenario="y").id, str(a.out_dir), str(b.out_dir))]
    assert [(r.scenario, r.status) for r in merge([b.out_dir, a.out_dir], allow_duplicates=True).results] == [
        ("y", "error"), ("z", "pass"), ("x", "pass"),
    ]


def test_merge_refuses_duplicates_across_dirs(tmp_path: Path) -> None:
    a, b = ResultStore(tmp_path / "shard0"), ResultStore(tmp_path / "shard1")
    a.append(make(scenario="y", status="error"))
    a.append(make(scenario="y"))  # a retry within one directory is no duplicate
    b.append(make(scenario="y", status="fail"))
    with pytest.raises(res.DuplicateCaseError, match=r"tiny-llama/tp2-eager-y is in both .*shard0 and .*shard1"):
        merge([a.out_dir, b.out_dir])
    assert [r.status for r in merge([a.out_dir]).results] == ["pass"]


def test_merge_keeps_inputs_settings_and_common_run(tmp_path: Path) -> None:
    for i, (host, shard) in enumerate((("node-a", "0/2"), ("node-b", "1/2"))):
        d = tmp_path / f"shard{i}"
        ResultStore(d).append(make(scenario=f"s{i}"))
        write_summary(d, [make(scenario=f"s{i}")], {"hostname": host},
                      run={"matrix": "smoke", "seed": 0, "command": f"parity run --shard {shard}"})
    ResultStore(tmp_path / "bare").append(make(scenario="s2"))  # no summary.json
    merged = merge([tmp_path / "shard0", tmp_path / "shard1"])
    assert [i["environment"] for i in merged.inputs] == [{"hostname": "node-a"}, {"hostname": "node-b"}]
    assert [i["dir"] for i in merged.inputs] == [str(tmp_path / "shard0"), str(tmp_path / "shard1")]
    assert merged.run() == {"matrix": "smoke", "seed": 0, "merged_from": 2}  # the commands differ
    with_bare = merge([tmp_path / "shard0", tmp_path / "bare"])
    assert with_bare.inputs[1] == {"dir": str(tmp_path / "bare"), "run": None, "environment": None}
    assert with_bare.run() == {"merged_from": 2}


def test_write_results_round_trips(tmp_path: Path) -> None:
    cases = [make(scenario="a"), make("fail", scenario="b", first_divergence=DIVERGENCE)]
    path = res.write_results(tmp_path / "m", cases)
    assert path == tmp_path / "m" / "results.jsonl"
    assert res.read_results(path) == cases
    assert path.read_text(encoding="utf-8").count("\n") == 2


def test_merge_missing_shard_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="results.jsonl"):
        merge([tmp_path / "nowhere"])
    assert not (tmp_path / "nowhere").exists()


def test_only_oracle_cases_running_is_nothing_ran() -> None:
    """The oracle case checks the one-device engine, not parallelism: a run whose every parallel
    case skipped exits 4 even though its oracle cases passed; an oracle-only run is a real run."""
    oracle = CaseResult("m/tp1-pp1-eager-text", "tp1-pp1-eager", "hf", "text", "m", "pass")
    skipped = make("skip", scenario="text", reason="tp2 does not divide 9 heads")
    assert exit_code([skipped, oracle]) == EXIT_NOTHING_RAN
    assert exit_code([oracle]) == 0
    assert exit_code([make("pass", scenario="text"), skipped, oracle]) == 0
