"""The HTML report: self-contained, escaped, complete (ids, grid, divergence, top-k, SVG, skips, timings),
rendered from the result files' plain records; the review layout (verdict, failure summary, grouping,
every diverging request with its token streams, ranges, reproduce commands, history, accuracy) and
the junit failure text."""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from harness.case import CaseResult
from harness.results import Merged, Override
from parity.outputs import write_outputs
from reports import render_index
from reports.case import localization_view
from reports.format import against, ranges, reproduce_command
from reports.html import per_layer_chart, verdict

from report_data import ACCURACY, HISTORY, review_records
from report_data import ENV as REVIEW_ENV
from report_data import RUN as REVIEW_RUN

ENV = {"git_sha": "0123456789abcdef0123456789abcdef01234567", "python": "3.11.7", "torch": "2.13.0",
       "transformers": "5.0", "ray": None, "platform": "Linux", "cuda_devices": ["NVIDIA H200"]}
DIVERGENCE = {
    "request_id": "req-7", "step": 3, "candidate_token": 4242, "baseline_token": 1717,
    "candidate_top_k": [[4242, -0.25], [1717, -1.5], [99, -3.0]],
    "baseline_top_k": [[1717, -0.125], [4242, -2.5], [98, -3.5]],
    "candidate_logprob": -0.25, "baseline_logprob": -2.5, "logprob_diff": 2.25,
    "reason": "argmax differs", "tolerated": False,
}
LOCALIZATION = {"layer": 2, "tensor": "mlp.down_proj", "rows": [0, 12], "tp_rank": 1,
                "per_layer_error": [1e-7, 2e-7, 3e-3, 5e-3, float("nan")]}


def make(status: str, scenario: str, setup: str = "tp2-sp-graph-full", model: str = "tiny-llama",
         **fields: Any) -> CaseResult:
    return CaseResult(f"{model}/{setup}-{scenario}", setup, "tp2-graph-full", scenario, model, status, **fields)


def records(results: list[CaseResult]) -> list[dict[str, Any]]:
    """The results as the result files hold them (what the report renders)."""
    return [r.to_json() for r in results]


def merged_keys(merged: Merged) -> dict[str, Any]:
    """A merge's inputs and overridden records as summary.json holds them."""
    return {"inputs": merged.inputs, "overridden": [vars(o) for o in merged.overridden]}


def sample() -> list[dict[str, Any]]:
    return records(sample_results())


def sample_results() -> list[CaseResult]:
    return [
        make("fail", "text", reason="token mismatch", first_divergence=DIVERGENCE, localization=LOCALIZATION,
             metrics={"max_abs_logprob_diff": 2.25}, seconds=4.5),
        make("pass", "multimodal", metrics={"max_abs_logprob_diff": 1e-6}, seconds=3.0),
        make("error", "embeds", reason="Traceback (most recent call last):\nRuntimeError: NCCL timeout", seconds=60.0),
        make("skip", "text", setup="tp2-pp2-eager", reason="needs 4 devices, have 2"),
        make("pass", "text", model="tiny-qwen", setup="tp2-eager", seconds=1.0),
    ]


class Elements(HTMLParser):
    """Collects every element's attributes and the text inside it (nested text included)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str], list[str]]] = []
        self._open: list[tuple[str, list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        text: list[str] = []
        self.elements.append((tag, {k: v or "" for k, v in attrs}, text))
        if tag not in {"meta", "br", "line", "rect", "input", "img", "link"}:
            self._open.append((tag, text))

    def handle_endtag(self, tag: str) -> None:
        if all(t != tag for t, _ in self._open):  # a void or self-closed element (<line/>)
            return
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, text in self._open:
            text.append(data)

    def find(self, tag: str, cls: str = "") -> list[tuple[dict[str, str], str]]:
        return [(a, "".join(t)) for tg, a, t in self.elements
                if tg == tag and (not cls or cls in a.get("class", "").split())]


def parse(html: str) -> Elements:
    p = Elements()
    p.feed(html)
    p.close()
    return p


@pytest.fixture
def html(tmp_path: Path) -> str:
    return render_index(tmp_path, sample(), ENV).read_text(encoding="utf-8")


def test_writes_index_html(tmp_path: Path) -> None:
    path = render_index(tmp_path / "out", sample(), ENV, title="nightly parity")
    assert path == tmp_path / "out" / "index.html"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert parse(text).find("title")[0][1] == "FAIL — nightly parity"


def test_contains_every_case_id(html: str) -> None:
    for r in sample():
        assert r["id"] in html


def test_is_self_contained(html: str) -> None:
    assert "<style>" in html
    assert not re.search(r"<link\b|\bsrc=|@import|url\(|https?://", html)


def test_totals_and_environment_in_header(html: str) -> None:
    doc = parse(html)
    totals = {a["class"].split()[1]: t for a, t in doc.find("div", "total")}
    assert totals == {"pass": "2pass", "fail": "1fail", "error": "1error", "skip": "1skip"}
    env_text = " ".join(t for _, t in doc.find("table", "env"))
    for value in ("0123456789abcdef0123456789abcdef01234567", "2.13.0", "5.0", "NVIDIA H200"):
        assert value in env_text


def test_grid_cells_coloured_and_linked(html: str) -> None:
    doc = parse(html)
    cells = doc.find("td", "cell")
    assert sorted(a["class"] for a, _ in cells) == [
        "cell error", "cell fail", "cell pass", "cell pass", "cell skip",
    ]
    grids = doc.find("table", "grid")
    assert len(grids) == 2  # one per model
    ids = {a["id"] for _, a, _ in doc.elements if "id" in a}
    links = [a["href"] for a, _ in doc.find("a") if a.get("href", "").startswith("#")]
    assert len(links) >= 5 and all(link[1:] in ids for link in links)
    # tiny-llama: two setups (rows) x three scenarios (columns), one cell empty.
    assert "tp2-pp2-eager" in grids[0][1] and "multimodal" in grids[0][1] and "tiny-qwen" not in grids[0][1]
    assert len(doc.find("td", "empty")) == 2


def test_details_open_for_problems_collapsed_for_passes(html: str) -> None:
    doc = parse(html)
    details = {a["class"]: ("open" in a) for a, _ in doc.find("details", "case")}
    assert details == {"case fail f": True, "case error f": True, "case pass f": False}
    assert len(doc.find("details", "pass")) == 2


def test_divergence_tokens_side_by_side(html: str) -> None:
    doc = parse(html)
    [(_, tokens)] = doc.find("table", "tokens")
    assert "1717" in tokens and "4242" in tokens and "-2.5" in tokens and "2.25" in tokens
    [(_, diverged)] = doc.find("code", "diverged")
    assert diverged == "4242"
    assert "req-7" in html


def test_top_k_tables(html: str) -> None:
    tables = [text for _, text in parse(html).find("table", "topk")]
    assert len(tables) == 2
    baseline, candidate = sorted(tables, key=lambda t: "candidate" in t)
    assert "baseline top-k" in baseline and "-0.125" in baseline and "98" in baseline
    assert "candidate top-k" in candidate and "-0.25" in candidate and "99" in candidate


def test_localization_table_and_svg(html: str) -> None:
    doc = parse(html)
    kv = " ".join(t for _, t in doc.find("table", "kv"))
    assert "mlp.down_proj" in kv and "TP rank" in kv and "0, 12 (2 rows" in kv
    assert html.count("<svg") == 1
    bars = doc.find("rect", "bar")
    assert len(bars) == 4  # the NaN layer has no bar
    assert [a["class"] for a, _ in bars].count("bar hl") == 1  # localized layer 2 highlighted


def test_no_svg_without_per_layer_error(tmp_path: Path) -> None:
    r = make("fail", "text", first_divergence=DIVERGENCE, localization={"layer": 1, "tensor": "attn.o_proj"})
    text = render_index(tmp_path, records([r]), ENV).read_text(encoding="utf-8")
    assert "<svg" not in text and "attn.o_proj" in text


def test_per_layer_chart_is_well_formed_svg() -> None:
    svg = ET.fromstring(str(per_layer_chart([0.1, 0.4, float("inf"), None, 0.2], highlight=1)))
    assert svg.tag == "svg"
    rects = svg.findall("rect")
    assert len(rects) == 3
    heights = [float(r.get("height", "0")) for r in rects]
    assert heights[1] == max(heights)  # 0.4 is the largest error
    assert rects[1].get("class") == "bar hl"


def test_escapes_markup_in_reason_and_model(tmp_path: Path) -> None:
    evil = [
        make("fail", "text", model='<script>alert("m")</script>', reason="<script>alert(1)</script>",
             first_divergence={**DIVERGENCE, "candidate_token": "<script>x</script>"}),
        make("skip", "text", setup="tp2-eager", reason="<img onerror=alert(2)>"),
    ]
    text = render_index(tmp_path, records(evil), {**ENV, "hostname": "<b>host</b>"}).read_text(encoding="utf-8")
    assert "<script>" not in text and "</script>" not in text.replace("</script>\n</body>", "")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;script&gt;alert(&#34;m&#34;)&lt;/script&gt;" in text
    assert "<img" not in text and "&lt;img onerror=alert(2)&gt;" in text
    assert "<b>host" not in text and "&lt;b&gt;host&lt;/b&gt;" in text


def test_skipped_listed_with_reasons_and_timings(html: str) -> None:
    doc = parse(html)
    [(_, skipped)] = doc.find("table", "skipped")
    assert "tiny-llama/tp2-pp2-eager-text" in skipped and "needs 4 devices, have 2" in skipped
    [(_, timings)] = doc.find("table", "timings")
    assert "60.00" in timings and "4.50" in timings
    assert timings.index("60.00") < timings.index("4.50")  # slowest first


def test_error_traceback_shown(html: str) -> None:
    reasons = [t for _, t in parse(html).find("pre", "reason")]
    assert any("RuntimeError: NCCL timeout" in r and r.startswith("Traceback") for r in reasons)


def test_empty_run_renders(tmp_path: Path) -> None:
    text = render_index(tmp_path, [], {}).read_text(encoding="utf-8")
    assert "No cases." in text


def test_write_outputs_writes_summary_junit_and_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the template is found relative to reports/html.py, not the cwd
    out = tmp_path / "run"
    index = write_outputs(out, sample_results(), ENV)
    assert index == out / "index.html"
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "junit.xml", "summary.json"]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["totals"] == {"pass": 2, "fail": 1, "error": 1, "skip": 1}
    assert next(ET.parse(out / "junit.xml").getroot().iter("testsuite")).get("tests") == "5"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_templates_are_package_data() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    assert "templates/*.j2" in config["tool"]["setuptools"]["package-data"]["reports"]
    assert (root / "reports" / "templates" / "index.html.j2").is_file()


# --- run settings, mutation banner, merged inputs ----------------------------------------------

RUN = {"matrix": "smoke", "setups": ["tp2-sp-graph-full", "tp2-eager"], "scenarios": ["text"], "model": "tiny-llama",
       "baseline": "auto", "tolerances": {"logprob_atol": 0.001}, "seed": 3, "mutation": None,
       "command": "parity run --matrix smoke"}
BANNER = "MUTATION RUN: all-gather-reversed-order injected — failures here are expected"


def test_run_settings_table_above_environment(tmp_path: Path) -> None:
    text = render_index(tmp_path, sample(), ENV, run=RUN).read_text(encoding="utf-8")
    [(_, run)] = parse(text).find("table", "run")
    assert "run settings" in run and "tp2-sp-graph-full, tp2-eager" in run and "parity run --matrix smoke" in run
    assert '{"logprob_atol": 0.001}' in run
    assert text.index('class="kv run"') < text.index('class="kv env"')
    assert not parse(render_index(tmp_path, sample(), ENV).read_text(encoding="utf-8")).find("table", "run")


def test_mutation_banner_only_for_a_mutation_run(tmp_path: Path) -> None:
    mutated = parse(render_index(tmp_path, sample(), ENV, run={**RUN, "mutation": "all-gather-reversed-order"})
                    .read_text(encoding="utf-8"))
    [(_, banner)] = mutated.find("div", "mutation-banner")
    assert banner == BANNER
    assert "MUTATION RUN: all-gather-reversed-order" in mutated.find("title")[0][1]
    assert "MUTATION RUN: all-gather-reversed-order" in mutated.find("h1")[0][1]
    for run in (RUN, None):
        clean = parse(render_index(tmp_path, sample(), ENV, run=run).read_text(encoding="utf-8"))
        assert clean.find("div", "mutation-banner") == []
        assert clean.find("title")[0][1] == "FAIL — parity report"


def test_merged_report_lists_inputs_and_overrides(tmp_path: Path) -> None:
    merged = Merged(sample_results(), inputs=[
        {"dir": "shard0", "run": {**RUN, "mutation": "all-gather-reversed-order"},
         "environment": {"hostname": "node-a", "git_sha": "aaa"}},
        {"dir": "shard1", "run": None, "environment": {"hostname": "node-b"}},
    ], overridden=[Override("tiny-llama/tp2-sp-graph-full-text", "shard0", "shard1")], dirs=2)
    text = render_index(tmp_path, sample(), ENV, run=merged.run(), merged=merged_keys(merged)).read_text(encoding="utf-8")
    doc = parse(text)
    [(_, inputs)] = doc.find("table", "inputs")
    assert "shard0" in inputs and "node-a" in inputs and "aaa" in inputs and "shard1" in inputs and "node-b" in inputs
    [(_, warning)] = doc.find("div", "overrides")
    assert "tiny-llama/tp2-sp-graph-full-text" in warning and "overridden by" in warning
    # One input was a mutation run: the merged page says so although the inputs' common run does not.
    assert merged.run() == {"merged_from": 2}
    assert [t for _, t in doc.find("div", "mutation-banner")] == [BANNER]
    plain = parse(render_index(tmp_path, sample(), ENV).read_text(encoding="utf-8"))
    assert plain.find("table", "inputs") == [] and plain.find("div", "overrides") == []


def test_write_outputs_writes_run_and_inputs_to_summary_and_report(tmp_path: Path) -> None:
    merged = Merged(sample_results(), inputs=[{"dir": "a", "run": RUN, "environment": ENV}], dirs=1)
    write_outputs(tmp_path, sample_results(), ENV, run=merged.run(), merged=merged)
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert list(summary) == ["run", "inputs", "overridden", "cases", "totals", "environment"]
    assert summary["run"] == {**RUN, "merged_from": 1}
    assert summary["inputs"] == [{"dir": "a", "run": RUN, "environment": ENV}]
    [(_, inputs)] = parse((tmp_path / "index.html").read_text(encoding="utf-8")).find("table", "inputs")
    assert "smoke" in inputs and "0123456789abcdef0123456789abcdef01234567" in inputs


# --- the review layout: verdict, failure summary, grouping, streams, reproduce, history --------

@pytest.fixture
def review(tmp_path: Path) -> Elements:
    path = render_index(tmp_path, review_records(), REVIEW_ENV, run=REVIEW_RUN, history=HISTORY, accuracy=ACCURACY)
    return parse(path.read_text(encoding="utf-8"))


def test_verdict_banner_and_title_say_the_outcome(tmp_path: Path, review: Elements) -> None:
    [(attrs, banner)] = review.find("div", "verdict")
    assert "FAIL" in attrs["class"] and banner.startswith("FAIL")
    assert "3 of 9 cases that ran failed, 1 error, 5 passed, 1 skipped" in banner
    assert review.find("title")[0][1].startswith("FAIL — ")

    def outcome(*statuses: str, setup: str = "tp2-eager", baseline: str = "tp1-pp1-eager") -> str:
        recs = [{**make(s, f"s{i}", setup=setup).to_json(), "baseline": baseline} for i, s in enumerate(statuses)]
        return parse(render_index(tmp_path, recs, ENV).read_text(encoding="utf-8")).find("div", "verdict")[0][1]

    assert outcome("pass", "skip").startswith("PASS")
    assert outcome("pass", "error").startswith("ERROR")
    assert outcome("skip").startswith("NOTHING RAN")
    assert outcome().startswith("NOTHING RAN")
    # Only the oracle case ran while the parallel case was skipped: the run's exit 4.
    oracle = [{**make("pass", "text", setup="tp1-pp1-eager").to_json(), "baseline": "hf"},
              make("skip", "text").to_json()]
    assert parse(render_index(tmp_path, oracle, ENV).read_text(encoding="utf-8")).find(
        "div", "verdict")[0][1].startswith("NOTHING RAN")
    assert verdict([]) == "NOTHING RAN"


def test_failure_summary_on_top_has_a_row_per_failure_and_error(review: Elements) -> None:
    [(_, table)] = review.find("table", "summary")
    rows = [t for a, t in review.find("tr", "f") if a.get("data-status") in ("fail", "error")]
    assert len(rows) == 4
    first = next(t for t in rows if "tp2-sp-graph-full-prompt_embeds" in t)
    assert "pe0 step 0" in first and "+1 more requests" in first
    assert '" Paris" ·17 → " Rome" ·42' in first
    assert "Δ 0.201 = 201× atol 1e-3" in first
    assert "layer 0 · residual · TP rank 1 · PP stage 0" in first
    assert "RECURRING" in first
    assert "rank 3 died" in table
    # The summary comes before the grid, the environment after it.
    order = [a["class"] for tag, a, _ in review.elements if tag == "table" and a.get("class") in ("summary", "grid", "kv env")]
    assert order == ["summary", "grid", "kv env"]


def test_failures_grouped_by_identical_localization(review: Elements) -> None:
    groups = review.find("section", "group")
    assert len(groups) == 2
    first, second = (text.strip() for _, text in groups)
    assert first.startswith("layer 0 · residual · TP rank 1 · PP stage 0 — 2 cases")
    assert "tp2-sp-graph-full-prompt_embeds" in first and "tp2-sp-graph-full-mixed" in first
    assert second.startswith("layer 2 · hidden_states · TP rank 0 · PP stage 1 — 1 case")
    # The shared localization is shown once in the group; each case's own is folded away.
    assert first.count("0–15, 32–47 (32 rows of 70 in the prefill step)") == 3
    opened = [("open" in a) for a, _ in review.find("details", "fail")]
    assert opened == [True, False, True]  # the first case of each group open


def test_every_diverging_request_and_both_streams(review: Elements) -> None:
    case = next(t for a, t in review.find("details", "fail") if "prompt_embeds" in a.get("data-scenario", ""))
    [divs] = [t for _, t in review.find("table", "divs") if "pe1" in t]
    assert "pe0" in divs and "pe1" in divs and "Δ 0.15 = 150× atol 1e-3" in divs
    streams = [t for _, t in review.find("table", "stream")]
    assert sum("request pe0" in t for t in streams) == 1 and sum("request pe1" in t for t in streams) == 1
    pe0 = next(t for t in streams if "request pe0" in t)
    assert '" Paris" ·17' in pe0 and '" Rome" ·42' in pe0 and '"w201" ·201' in pe0
    # Without a tokenizer the streams show ids.
    t1 = next(t for t in streams if "request t1" in t)
    assert "20" in t1 and "45" in t1 and '"' not in t1
    assert "token streams around each divergence" in case


def test_localization_table_and_chart_show_the_same_numbers(review: Elements, tmp_path: Path) -> None:
    group = review.find("section", "group")[1][1]
    assert "error0.034 = 1,700× tolerance 2e-5" in group
    text = render_index(tmp_path, review_records()[7:8], REVIEW_ENV).read_text(encoding="utf-8")
    [svg] = [ET.fromstring(m) for m in re.findall(r"<svg.*?</svg>", text, re.S)]
    [bar] = [r for r in svg.iter("rect") if "hl" in (r.get("class") or "").split()]
    assert bar.findtext("title") == "layer 2 hidden_states: 0.034"
    assert len(list(svg.iter("rect"))) == 2 * 4  # two tensors x four layers
    # Axis labels and the tolerance line.
    labels = [t for _, t in review.find("text", "label")]
    assert "layer" in labels and any(label.startswith("relative error") for label in labels)
    assert any(t == "tolerance 2e-5" for _, t in review.find("text", "tolabel"))
    values = [t for _, t in review.find("table", "layers")]
    assert any("0.034" in v for v in values)


def test_row_lists_as_ranges() -> None:
    assert ranges(list(range(16)) + list(range(32, 48))) == "0–15, 32–47"
    assert ranges([5]) == "5" and ranges([]) == "" and ranges([3, 1, 2, 9, 10]) == "1–3, 9–10"
    view = localization_view({"layer": 1, "tensor": "residual", "rows": [0, 1, 2, 7], "tp_ranks": [0, 1]})
    assert view is not None and ("token rows", "0–2, 7 (4 rows in the prefill step)") in view.rows
    assert view.label == "layer 1 · residual · TP rank 0, 1"


def test_against_states_the_factor() -> None:
    assert against(0.201, 1e-3) == "Δ 0.201 = 201× atol 1e-3"
    assert against(3e-6, 1e-6) == "Δ 3e-6 = 3× atol 1e-6"
    assert against(None, 1e-3) == "Δ n/a"
    assert against(0.5, None) == "Δ 0.5"


def test_reproduce_command_per_case(review: Elements) -> None:
    rec = review_records()[4]
    expected = ("parity run --matrix smoke --setups tp2-sp-graph-full --scenarios prompt_embeds --model tiny-llama "
                "--baseline auto --dtype float32 --device cpu")
    assert reproduce_command(rec, REVIEW_RUN) == expected
    mutated = reproduce_command(rec, {**REVIEW_RUN, "mutation": "sp-middle-residual-slice", "backend": "mp", "seed": 3})
    assert mutated == expected.replace("--baseline auto", "--baseline auto --mutation sp-middle-residual-slice") + \
        " --backend mp --seed 3"
    assert reproduce_command(rec, None) == ("parity run --setups tp2-sp-graph-full --scenarios prompt_embeds "
                                            "--model tiny-llama --baseline tp2-graph-full")
    transformers_rec = {**rec, "setup": "tp2-eager@transformers", "baseline": "tp2-eager"}
    assert reproduce_command(transformers_rec, {**REVIEW_RUN, "engine": "transformers"}).startswith(
        "parity run --matrix smoke --setups tp2-eager@transformers --scenarios prompt_embeds --model tiny-llama "
        "--engine transformers --baseline auto")
    assert expected in [t for _, t in review.find("code", "repro")]


def test_history_tags_and_fixed_list(review: Elements, tmp_path: Path) -> None:
    pills = {a["href"]: t for a, t in review.find("a", "pill")}
    assert "RECURRING" in pills["#case-tiny-llama_tp2-sp-graph-full-prompt_embeds"]
    assert "NEW" in pills["#case-tiny-llama_tp2-sp-graph-full-mixed"]
    flaky = pills["#case-tiny-llama_tp2-pp2-sp-graph-full-text"]
    assert "RECURRING" in flaky and "FLAKY" in flaky
    assert "L2 hidden_states r0 s1" in flaky  # the localization tag
    assert not any(tag in pills["#case-tiny-llama_tp2-eager-text"] for tag in ("NEW", "RECURRING", "FLAKY"))
    [(_, fixed)] = review.find("div", "fixed")
    assert "Fixed since the previous run (1)" in fixed and "tiny-llama/tp2-graph-full-text" in fixed
    assert "1 new, 2 recurring, 1 flaky, 1 fixed since the previous run" in review.find("div", "verdict")[0][1]
    # Without history: no tags, no list.
    plain = parse(render_index(tmp_path, review_records(), REVIEW_ENV, run=REVIEW_RUN).read_text(encoding="utf-8"))
    assert plain.find("span", "tag") == [] and plain.find("div", "fixed") == []


def test_grid_aligned_when_a_cell_holds_two_cases(review: Elements) -> None:
    [(_, grid)] = review.find("table", "grid")
    rows = [a for tag, a, _ in review.elements if tag == "tr" and "data-setup" in a and "data-status" not in a]
    assert len(rows) == 5  # five setups
    cells = review.find("td", "cell") + review.find("td", "empty")
    assert len(cells) == 5 * 3  # setups x scenarios: one td each, whatever it holds
    assert sorted(t.count("pass") for _, t in review.find("td", "cell"))[-1] == 2  # tp2-eager x text
    assert "tp2-eager" in grid


def test_accuracy_section(review: Elements, tmp_path: Path) -> None:
    [(_, table)] = review.find("table", "accuracy")
    assert "tp2-eager" in table and "62.0%" in table and "+0.0 pts" in table
    assert review.find("table", "accuracy-baselines")
    plain = parse(render_index(tmp_path, review_records(), REVIEW_ENV).read_text(encoding="utf-8"))
    assert plain.find("table", "accuracy") == []


def test_filters_and_expand_collapse_controls(review: Elements) -> None:
    boxes = [a["value"] for a, _ in review.find("input", "fstatus")]
    assert boxes == ["pass", "fail", "error", "skip"]
    options = [t for _, t in review.find("option")]
    assert "tp2-pp2-sp-graph-full" in options and "prompt_embeds" in options and "every setup" in options
    assert {a.get("id") for a, _ in review.find("button")} >= {"expand", "collapse"}
    # Every case element carries what the filters select on.
    for a, _ in review.find("details", "case"):
        assert {"data-status", "data-setup", "data-scenario"} <= set(a)


def test_environment_folded_below(review: Elements) -> None:
    [(attrs, settings)] = review.find("details", "settings")
    assert "open" not in attrs and "environment" in settings and "run settings" in settings


def test_old_records_still_render(tmp_path: Path) -> None:
    """A record from before ``divergences``, ``per_tensor_error`` and ``pp_stage``."""
    old = make("fail", "text", reason="token mismatch", first_divergence=DIVERGENCE,
               localization={"layer": 1, "tensor": "residual", "rows": [0, 1, 2], "tp_ranks": [0],
                             "max_error": 0.5, "per_layer_error": [0.0, 0.5], "rtol": 2e-5},
               metrics={"atol": 1e-3}).to_json()
    assert "divergences" not in old
    doc = parse(render_index(tmp_path, [old], ENV).read_text(encoding="utf-8"))
    [(_, summary)] = doc.find("table", "summary")
    assert "req-7 step 3" in summary and "Δ 2.25 = 2,250× atol 1e-3" in summary
    assert "layer 1 · residual · TP rank 0" in summary
    assert len(doc.find("rect", "bar")) == 2


def test_junit_failure_carries_the_localization(tmp_path: Path) -> None:
    recs = review_records()
    results = [CaseResult.from_json(r) for r in recs]
    write_outputs(tmp_path, results, ENV, run=REVIEW_RUN)
    failures = {tc.get("classname", "") + "/" + tc.get("name", ""): tc.find("failure")
                for tc in ET.parse(tmp_path / "junit.xml").getroot().iter("testcase")}
    failure = failures["tiny-llama.tp2-sp-graph-full/prompt_embeds"]
    assert failure is not None and failure.text
    assert ("localization: layer 0, tensor residual, rows 0–15, 32–47 of 70, TP rank 1, PP stage 0, "
            "error 0.201 (relative; tolerance 2e-05)") in failure.text
    assert "1 more diverging requests:\nrequest pe1 step 0" in failure.text


def test_write_outputs_passes_history_and_accuracy_to_the_report(tmp_path: Path) -> None:
    results = [CaseResult.from_json(r) for r in review_records()]
    index = write_outputs(tmp_path, results, ENV, run=REVIEW_RUN, history=HISTORY, accuracy=ACCURACY)
    doc = parse(index.read_text(encoding="utf-8"))
    assert doc.find("div", "fixed") and doc.find("table", "accuracy")
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert summary["cases"][4]["divergences"][1]["request_id"] == "pe1"
    assert "divergences" not in summary["cases"][0]  # only where there are some
