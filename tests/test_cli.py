"""The command-line contract: exit codes, output files, resume, matrix export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import main


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
