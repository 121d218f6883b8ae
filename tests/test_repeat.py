"""``parity run --repeat N``: a case whose repeats differ in verdict or in output bits is flaky,
fails, and says so in results.jsonl, on the console and in the report; a clean run reports 0.

The unit tests build repeats by hand (``harness.repeat``); the runs inject nondeterminism into
the candidate's rank 0 once (``helpers.FAULT_ENV``: ``nudge`` changes a logprob by 2**-20, far
within the tolerance, ``skew`` by 0.5, beyond it), so the first repeat differs from the others."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from harness.case import CaseResult
from harness.repeat import Attempt, describe, flaky, merge, output_difference
from harness.results import dumps_line, exit_code, read_results
from parity.cli import main
from reference_impl.requests import RequestOutput
from reports import render_index
from reports.format import reproduce_command

from helpers import FAULT_ENV

RUN = ["run", "--backend", "mp", "--model", "tiny-llama", "--setups", "tp2-eager", "--scenarios", "text"]


def outputs(logprob: float = -1.25, token: int = 7, top: float = -1.25) -> list[RequestOutput]:
    return [RequestOutput("a", 3, [1, 2], [-0.5, -0.75], [[(1, -0.5), (9, -2.0)], [(2, -0.75), (3, -1.0)]]),
            RequestOutput("b", 4, [5, token], [-0.25, logprob], [[(5, -0.25), (6, -3.0)], [(token, top), (8, -2.5)]])]


def result(status: str = "pass", seconds: float = 1.0, **fields: Any) -> CaseResult:
    return CaseResult("tiny-llama/tp2-eager-text", "tp2-eager", "tp1-pp1-eager", "text", "tiny-llama", status,
                      seconds=seconds, **fields)


# --- output differences -------------------------------------------------------------------------


def test_identical_outputs_have_no_difference() -> None:
    assert output_difference(outputs(), outputs()) is None


def test_a_logprob_one_bit_apart_is_a_difference() -> None:
    nudged = math.nextafter(-1.25, 0.0)
    diff = output_difference(outputs(), outputs(logprob=nudged, top=nudged))
    assert diff == {"request_id": "b", "step": 1, "field": "logprob", "values": [-1.25, nudged]}
    # Printed with every digit: the two values do not print the same.
    text = describe({"repeat": 2, "against": 1, **diff})
    assert text == f"repeat 2 vs 1: request b step 1 logprob -1.25 vs {nudged!r}" and repr(nudged) != "-1.25"


@pytest.mark.parametrize(("other", "field"), [
    (outputs(token=8), "token"),
    (outputs(top=-1.5), "top_k"),
    (outputs()[:1], "requests"),
])
def test_tokens_top_k_and_requests_differ(other: list[RequestOutput], field: str) -> None:
    diff = output_difference(outputs(), other)
    assert diff is not None and diff["field"] == field


def test_a_different_length_is_a_difference() -> None:
    short = outputs()
    short[1].token_ids.pop()
    assert output_difference(outputs(), short) == {"request_id": "b", "field": "length", "values": [2, 1]}


# --- merging a case's repeats -------------------------------------------------------------------


def test_repeats_that_agree_keep_the_verdict_and_record_the_repeats() -> None:
    merged = merge([Attempt(result(seconds=1.0), outputs()), Attempt(result(seconds=2.0), outputs())])
    assert merged.status == "pass" and merged.reason == "" and merged.seconds == 3.0
    assert merged.repeat == {"n": 2, "statuses": ["pass", "pass"], "flaky": False, "differences": [],
                             "seconds": [1.0, 2.0]}
    assert flaky([merged]) == []
    failing = merge([Attempt(result("fail", reason="token flip"), outputs())] * 3)
    assert failing.status == "fail" and failing.reason == "token flip" and not failing.repeat["flaky"]  # type: ignore[index]


def test_outputs_that_differ_make_a_passing_case_flaky_and_fail() -> None:
    nudged = outputs(logprob=-1.25 + 2**-20)
    merged = merge([Attempt(result(), outputs()), Attempt(result(), nudged), Attempt(result(), nudged)])
    assert merged.status == "fail" and flaky([merged]) == [merged]
    assert merged.reason.startswith("flaky over 3 repeats: statuses pass, pass, pass; outputs differ: "
                                    "repeat 2 vs 1: request b step 1 logprob -1.25 vs ")
    assert "(and 1 more repeats differ)" in merged.reason
    assert [d["repeat"] for d in merged.repeat["differences"]] == [2, 3]  # type: ignore[index]
    assert exit_code([merged]) == 1


def test_a_verdict_that_changes_fails_with_the_failing_repeats_record() -> None:
    div = {"request_id": "b", "step": 1}
    attempts = [Attempt(result(), outputs()),
                Attempt(result("fail", reason="logprob beyond atol", first_divergence=div), outputs(logprob=-0.5)),
                Attempt(result(), outputs())]
    merged = merge(attempts)
    assert merged.status == "fail" and merged.first_divergence == div
    assert merged.reason.splitlines() == [
        "flaky over 3 repeats: statuses pass, fail, pass; outputs differ: repeat 2 vs 1: request b step 1 "
        "logprob -1.25 vs -0.5", "repeat 2 (fail): logprob beyond atol"]


def test_an_infrastructure_error_in_one_repeat_is_a_flaky_error() -> None:
    merged = merge([Attempt(result(), outputs()), Attempt(result("error", reason="infrastructure: rank 1 died"), None)])
    assert merged.status == "error" and merged.repeat["flaky"]  # type: ignore[index]
    assert merged.reason.startswith("flaky over 2 repeats: statuses pass, error\nrepeat 2 (error): infrastructure:")
    assert exit_code([merged]) == 3
    # ... but an error beside output differences is the engine's: a failure.
    engine = merge([Attempt(result(), outputs()), Attempt(result("error"), None), Attempt(result(), outputs(token=8))])
    assert engine.status == "fail"


def test_the_repeat_record_round_trips_and_is_absent_without_repeats(tmp_path: Path) -> None:
    merged = merge([Attempt(result(), outputs()), Attempt(result(), outputs(token=8))])
    single = CaseResult(**{**result().__dict__, "id": "tiny-llama/tp2-eager-mixed", "scenario": "mixed"})
    (tmp_path / "results.jsonl").write_text(dumps_line(merged) + dumps_line(single))
    back, once = read_results(tmp_path / "results.jsonl")
    assert back == merged and once == single and once.repeat is None
    assert "repeat" not in json.loads(dumps_line(single))


# --- the report -----------------------------------------------------------------------------------


def test_the_report_tags_flaky_and_stable_repeated_cases(tmp_path: Path) -> None:
    stable = merge([Attempt(result(), outputs())] * 5)
    shaky = merge([Attempt(result(), outputs()), Attempt(result(), outputs(token=8))])
    shaky = CaseResult(**{**shaky.__dict__, "id": "tiny-llama/tp2-eager-mixed", "scenario": "mixed"})
    run = {"matrix": "smoke", "baseline": "auto", "repeat": 5, "requests": "/data/mine.json"}
    html = render_index(tmp_path, [stable.to_json(), shaky.to_json()], {}, run=run).read_text()
    assert '<span class="tag flaky" title="2 repeats in this run differed: pass, pass">FLAKY</span>' in html
    assert '<span class="tag repeat" title="5 repeats in this run gave the same verdict and the same output bits: ' \
           'pass, pass, pass, pass, pass">×5</span>' in html
    assert "repeat 2 vs repeat 1: request b step 1, token 7 vs 8" in html
    assert "1 of 2 cases that ran failed, 1 passed, 1 flaky over 5 repeats" in html
    assert reproduce_command(stable.to_json(), run).endswith("--requests /data/mine.json --repeat 5")


# --- runs with injected nondeterminism (tiny-llama, tp2 on the mp launcher) ---------------------


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, CaseResult, str, str]:
    out = tmp_path / "out"
    code = main([*RUN, "--out", str(out), *extra])
    err = capsys.readouterr().err
    print(err)
    [record] = read_results(out / "results.jsonl")
    return code, record, err, (out / "index.html").read_text()


def test_a_clean_run_repeated_reports_no_flaky_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, record, err, html = _run(tmp_path, capsys, "--repeat", "3")
    assert code == 0 and record.status == "pass"
    assert record.repeat is not None and record.repeat["statuses"] == ["pass"] * 3 and not record.repeat["flaky"]
    assert "parity run: 0 flaky of 1 cases run 3 times each" in err
    assert ">×3</span>" in html
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["run"]["repeat"] == 3 and summary["cases"][0]["repeat"]["n"] == 3


def test_outputs_that_change_between_repeats_fail_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          test_operations: None) -> None:
    monkeypatch.setenv(FAULT_ENV, f"nudge:0:{tmp_path / 'fired'}")
    code, record, err, html = _run(tmp_path, capsys, "--repeat", "3")
    assert (tmp_path / "fired").exists()
    assert code == 1 and record.status == "fail"
    assert record.repeat is not None and record.repeat["statuses"] == ["pass"] * 3 and record.repeat["flaky"]
    first = record.repeat["differences"][0]
    assert (first["repeat"], first["against"], first["request_id"], first["step"], first["field"]) == (
        2, 1, "text0", 0, "logprob")
    assert first["values"][1] - first["values"][0] == pytest.approx(2**-20)
    assert "parity run: 1 flaky of 1 cases run 3 times each (a flaky case fails the run)" in err
    assert "FLAKY tiny-llama/tp2-eager-text: flaky over 3 repeats: statuses pass, pass, pass; outputs differ" in err
    assert ">FLAKY</span>" in html


def test_a_verdict_that_changes_between_repeats_fails_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              test_operations: None) -> None:
    monkeypatch.setenv(FAULT_ENV, f"skew:0:{tmp_path / 'fired'}")
    code, record, err, _ = _run(tmp_path, capsys, "--repeat", "2")
    assert code == 1 and record.status == "fail"
    assert record.repeat is not None and record.repeat["statuses"] == ["fail", "pass"]
    assert record.reason.startswith("flaky over 2 repeats: statuses fail, pass")
    assert record.first_divergence is not None and record.first_divergence["request_id"] == "text0"
    # Without --repeat the same nondeterminism is one failure, no flake reported.
    (tmp_path / "fired").unlink()
    code, once, err, _ = _run(tmp_path / "once", capsys)
    assert code == 1 and once.repeat is None and "flaky" not in err
