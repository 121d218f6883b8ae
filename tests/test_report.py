"""The HTML report: self-contained, escaped, complete (ids, grid, divergence, top-k, SVG, skips, timings),
rendered from the result files' plain records."""

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
from reports.html import per_layer_chart

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
    assert parse(text).find("title")[0][1] == "nightly parity"


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
    details = {a["class"]: ("open" in a) for a, _ in doc.find("details")}
    assert details == {"case fail": True, "case error": True, "case pass": False}
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
    assert "mlp.down_proj" in kv and "tp_rank" in kv and "[0, 12]" in kv
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
        assert clean.find("title")[0][1] == "parity report"


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
