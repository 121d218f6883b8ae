"""The command-line contract: exit codes, output files, resume, matrix export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.case import CaseResult
from harness.results import exit_code
from parity.cli import main


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--matrix", "nope"]) == 2
    assert "unknown matrix 'nope'" in capsys.readouterr().err
    assert main(["run", "--setups", "tp2-fast"]) == 2
    assert main(["run", "--mutation", "not-a-bug"]) == 2
    assert main(["run", "--shard", "x"]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["report", "/nonexistent-dir"]) == 2


def test_matrix_export(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["matrix", "--name", "smoke", "--shards", "3", "--format", "github"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["shard"] for s in data["include"]] == ["0/3", "1/3", "2/3"]
    assert main(["matrix", "--name", "gpu4"]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == "cuda"


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    for what in ("matrices", "setups", "scenarios", "mutations", "models"):
        assert main(["list", what]) == 0
    out = capsys.readouterr().out
    assert "smoke" in out and "sp-middle-residual-slice" in out and "tiny-llava" in out


def test_run_writes_contract_files_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["run", "--backend", "mp", "--setups", "tp2-eager", "--scenarios", "text,multimodal",
            "--model", "tiny-llama", "--out", str(out)]
    assert main(args) == 0  # text passes, multimodal is skipped (a text model): exit 0
    assert {p.name for p in out.iterdir()} >= {"results.jsonl", "summary.json", "junit.xml", "index.html"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"] == {"pass": 1, "fail": 0, "error": 0, "skip": 1}
    # Resume: drop the last record as if the run had been killed; only that case runs again.
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text(lines[0] + "\n")
    assert main(["run", "--backend", "mp", "--setups", "tp2-eager", "--scenarios", "text,multimodal",
                 "--model", "tiny-llama", "--resume", str(out)]) == 0
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["scenario"] for r in records] == ["text", "multimodal"]


def test_comparison_failure_exits_1(tmp_path: Path) -> None:
    args = ["run", "--backend", "mp", "--setups", "tp2-eager", "--scenarios", "text", "--model", "tiny-llama",
            "--mutation", "all-gather-reversed-order", "--out", str(tmp_path / "o")]
    assert main(args) == 1
    case = json.loads((tmp_path / "o" / "summary.json").read_text())["cases"][0]
    assert case["status"] == "fail" and case["first_divergence"]["request_id"].startswith("text")
    assert case["localization"] is not None


def _result(status: str, scenario: str) -> CaseResult:
    return CaseResult(f"tiny-llama/tp2-eager-{scenario}", "tp2-eager", "tp1-pp1-eager", scenario, "tiny-llama", status)


@pytest.mark.parametrize(
    ("statuses", "code"),
    [([], 4), (["skip"], 4), (["skip", "skip"], 4), (["skip", "pass"], 0),
     (["skip", "error"], 3), (["skip", "fail"], 1), (["error", "fail"], 1)],
)
def test_exit_4_when_no_case_ran(statuses: list[str], code: int) -> None:
    """Precedence: fail (1) > error (3) > nothing ran (4) > ok (0)."""
    assert exit_code([_result(s, str(i)) for i, s in enumerate(statuses)]) == code


def test_run_where_no_setup_fits_exits_4_and_suggests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["run", "--backend", "mp", "--model", "tiny-llama-9h", "--setups", "tp2-eager,tp4-eager",
            "--scenarios", "text", "--out", str(tmp_path / "o")]
    assert main(args) == 4
    err = capsys.readouterr().err
    assert "parity run: no case ran" in err
    assert "1 x tp2-eager does not fit tiny-llama-9h: tp=2 does not divide num_attention_heads=9" in err
    assert "1 x tp4-eager does not fit tiny-llama-9h: tp=4 does not divide num_attention_heads=9" in err
    assert "setups that fit tiny-llama-9h: tp3-eager; or rerun with --fit" in err


def test_a_run_whose_only_cases_are_oracles_exits_4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The smoke matrix on a 9-head model: every parallel case skips, the oracle case (one device
    against transformers) runs and passes, and the run still checked no parallelism: exit 4."""
    args = ["run", "--backend", "mp", "--model", "tiny-llama-9h", "--scenarios", "text", "--out", str(tmp_path / "o")]
    assert main(args) == 4
    err = capsys.readouterr().err
    assert "no parallel case ran (1 oracle cases did: they check no parallelism)" in err
    suggestion = next(line for line in err.splitlines() if line.startswith("setups that fit"))
    assert "tp3-sp-graph-full" in suggestion and "tp1-pp1-eager" not in suggestion
    cases = json.loads((tmp_path / "o" / "summary.json").read_text())["cases"]
    assert [c["status"] for c in cases if c["baseline"] == "hf"] == ["pass"]


def test_run_with_fit_runs_tp3(tmp_path: Path) -> None:
    out = tmp_path / "o"
    args = ["run", "--backend", "mp", "--model", "tiny-llama-9h", "--setups", "tp2-eager", "--scenarios", "text",
            "--fit", "--out", str(out)]
    assert main(args) == 0
    cases = json.loads((out / "summary.json").read_text())["cases"]
    assert [(c["setup"], c["status"]) for c in cases] == [("tp3-eager", "pass")]


def test_confounded_explicit_baseline_exits_2_before_running(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    args = ["run", "--backend", "mp", "--setups", "tp2-sp-graph-full", "--baseline", "tp1-pp1-eager",
            "--scenarios", "text", "--model", "tiny-llama", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "exactly one feature" in err and "tp2-sp-graph-full vs tp1-pp1-eager differs in: tp/pp, sp, compile" in err
    assert not out.exists()  # nothing ran, nothing written
    same = ["run", "--backend", "mp", "--setups", "tp2-eager", "--baseline", "tp2-eager", "--allow-confounded",
            "--scenarios", "text", "--model", "tiny-llama", "--out", str(out)]
    assert main(same) == 2
    assert "compares a setup with itself" in capsys.readouterr().err


# --- parity report: merging run directories ----------------------------------------------------


def _run_dir(path: Path, scenarios: list[str], host: str, status: str = "pass") -> Path:
    from harness.case import CaseResult
    from harness.results import ResultStore, write_summary

    cases = [CaseResult(f"tiny-llama/tp2-eager-{s}", "tp2-eager", "tp1-pp1-eager", s, "tiny-llama", status)
             for s in scenarios]
    store = ResultStore(path)
    for c in cases:
        store.append(c)
    write_summary(path, cases, {"hostname": host}, run={"matrix": "smoke", "command": f"parity run on {host}"})
    return path


def test_report_refuses_duplicate_case_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _run_dir(tmp_path / "a", ["text", "mixed"], "node-a")
    b = _run_dir(tmp_path / "b", ["mixed"], "node-b", status="fail")
    out = tmp_path / "m"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"tiny-llama/tp2-eager-mixed is in both {a} and {b}" in err and "--allow-duplicates" in err
    assert not out.exists()
    assert main(["report", str(a), str(b), "--out", str(out), "--allow-duplicates"]) == 1  # b's fail wins
    assert f"tiny-llama/tp2-eager-mixed of {a} overridden by {b}" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overridden"] == [{"id": "tiny-llama/tp2-eager-mixed", "dir": str(a), "by": str(b)}]
    html = (out / "index.html").read_text()
    assert 'class="warning overrides"' in html and "tiny-llama/tp2-eager-mixed" in html


def test_report_writes_results_and_merges_again(tmp_path: Path) -> None:
    a = _run_dir(tmp_path / "a", ["text"], "node-a")
    b = _run_dir(tmp_path / "b", ["mixed"], "node-b")
    c = _run_dir(tmp_path / "c", ["prompt_embeds"], "node-c")
    m, m2 = tmp_path / "m", tmp_path / "m2"
    assert main(["report", str(a), str(b), "--out", str(m)]) == 0
    assert [json.loads(x)["scenario"] for x in (m / "results.jsonl").read_text().splitlines()] == ["text", "mixed"]
    assert main(["report", str(m), str(c), "--out", str(m2)]) == 0
    summary = json.loads((m2 / "summary.json").read_text())
    assert [x["scenario"] for x in summary["cases"]] == ["text", "mixed", "prompt_embeds"]
    # Every original run's environment and settings are kept, through the intermediate merge.
    assert [(i["dir"], i["environment"]["hostname"]) for i in summary["inputs"]] == [
        (str(a), "node-a"), (str(b), "node-b"), (str(c), "node-c")]
    assert summary["inputs"][2]["run"]["command"] == "parity run on node-c"
    assert summary["run"] == {"matrix": "smoke", "merged_from": 2}  # the commands differ
    assert list(summary)[0] == "run"
    html = (m2 / "index.html").read_text()
    assert 'class="inputs"' in html and "node-a" in html and "node-c" in html


def test_report_into_one_of_its_inputs_loses_nothing(tmp_path: Path) -> None:
    a = _run_dir(tmp_path / "a", ["text"], "node-a")
    b = _run_dir(tmp_path / "b", ["mixed"], "node-b")
    assert main(["report", str(a), str(b)]) == 0  # --out defaults to the first DIR
    assert [json.loads(x)["scenario"] for x in (a / "results.jsonl").read_text().splitlines()] == ["text", "mixed"]
    summary = json.loads((a / "summary.json").read_text())
    assert [i["environment"]["hostname"] for i in summary["inputs"]] == ["node-a", "node-b"]
    assert not list(a.glob("*.tmp"))


def test_run_records_its_settings(tmp_path: Path) -> None:
    """A run whose one case is skipped (images for a text model) starts no engine, yet writes its settings."""
    out = tmp_path / "o"
    main(["run", "--backend", "mp", "--setups", "tp2-eager", "--scenarios", "multimodal", "--model", "tiny-llama",
          "--seed", "5", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary)[0] == "run"
    run = summary["run"]
    assert (run["matrix"], run["setups"], run["scenarios"], run["model"]) == (
        "smoke", ["tp2-eager"], ["multimodal"], "tiny-llama")
    assert (run["backend"], run["seed"], run["mutation"], run["baseline"]) == ("mp", 5, None, "auto")
    assert run["command"] and run["git_sha"] and run["checkpoint_hash"]
    assert "MUTATION RUN" not in (out / "index.html").read_text()
