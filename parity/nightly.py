"""The nightly job's merge step: shard directories -> one report, the GitHub job summary, one
``::error`` annotation per failed case, and an exit status that tells comparison failures (1),
infrastructure errors or missing shards (3) and "nothing ran" (4) apart.

``python -m parity.nightly merge --plan plan.json --shards DIR --out DIR [--previous DIR]...``
(``ci/merge`` calls it). ``plan.json`` is ``parity matrix --format github``'s output; shard I's
results are expected in ``DIR/shard-I`` (the name its job uploads them under). A shard with no
results (its job died, its upload failed) is named in the summary with the cases it held.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from parity.cli import EXIT_FAIL, EXIT_INFRA, EXIT_OK, UsageError, report_dirs

SUMMARY_LIMIT = 60  # failure lines in the job summary (the report has all of them)


def shard_dir(root: Path, shard: str) -> Path:
    """Where shard ``I/N``'s results are: ``root/shard-I``."""
    return root / f"shard-{shard.split('/')[0]}"


def _localization(record: dict[str, Any]) -> str:
    loc = record.get("localization") or {}
    if not loc or loc.get("layer") is None:
        return ""
    parts = [f"layer {loc['layer']}", str(loc.get("tensor"))]
    if loc.get("tp_rank") is not None:
        parts.append(f"TP rank {loc['tp_rank']}")
    if loc.get("pp_stage") is not None:
        parts.append(f"PP stage {loc['pp_stage']}")
    return " / ".join(parts)


def _first_line(text: str, limit: int = 200) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line[:limit]


def _grid(cases: Sequence[dict[str, Any]]) -> list[str]:
    setups = list(dict.fromkeys(c["setup"] for c in cases))
    scenarios = list(dict.fromkeys(c["scenario"] for c in cases))
    cell: dict[tuple[str, str], list[str]] = {}
    for c in cases:
        cell.setdefault((c["setup"], c["scenario"]), []).append(c["status"] if c["status"] == "pass"
                                                                  else c["status"].upper())
    lines = ["| setup | " + " | ".join(scenarios) + " |", "| --- |" + " --- |" * len(scenarios)]
    for s in setups:
        lines.append(f"| `{s}` | " + " | ".join(", ".join(cell.get((s, sc), ["—"])) for sc in scenarios) + " |")
    return lines


def job_summary(doc: dict[str, Any], missing: Sequence[dict[str, Any]], code: int, report: str) -> str:
    """Markdown for ``$GITHUB_STEP_SUMMARY``: verdict, grid, one line per failure, missing shards."""
    cases = doc["cases"]
    history = (doc.get("history") or {}).get("cases", {})
    verdict = {EXIT_OK: "PASS", EXIT_FAIL: "FAIL", EXIT_INFRA: "ERROR"}.get(code, "NOTHING RAN")
    totals = doc.get("totals") or {}
    counts = ", ".join(f"{totals.get(k, 0)} {k}" for k in ("pass", "fail", "error", "skip"))
    lines = [f"## parity nightly: {verdict}", "", f"{counts} — report: {report}", ""]
    lines += _grid(cases) + [""]
    bad = [c for c in cases if c["status"] in ("fail", "error")]
    if bad:
        lines.append(f"### Failures and errors ({len(bad)})")
        for c in bad[:SUMMARY_LIMIT]:
            h = history.get(c["id"], {})
            tag = (h.get("class", "").upper() + (" FLAKY" if h.get("flaky") else "")).strip()
            loc = _localization(c)
            lines.append(f"- **{c['status'].upper()}** `{c['id']}`" + (f" [{tag}]" if tag else "")
                         + (f" — {loc}" if loc else "") + f": {_first_line(c.get('reason', ''))}")
        if len(bad) > SUMMARY_LIMIT:
            lines.append(f"- … {len(bad) - SUMMARY_LIMIT} more in the report")
        lines.append("")
    fixed = (doc.get("history") or {}).get("fixed") or []
    if fixed:
        lines += [f"### Fixed since the previous nightly ({len(fixed)})"] + [f"- `{c}`" for c in fixed] + [""]
    for m in missing:
        lines.append(f"- **no results** for shard {m['shard']} ({m['count']} cases: {m['cases'][:300]})")
    return "\n".join(lines) + "\n"


def error_annotations(doc: dict[str, Any]) -> list[str]:
    """One ``::error`` workflow command per failed case (the message escaped as GitHub wants)."""
    out = []
    for c in doc["cases"]:
        if c["status"] != "fail":
            continue
        loc = _localization(c)
        msg = _first_line(c.get("reason", "")) + (f" (localized: {loc})" if loc else "")
        msg = msg.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
        title = f"parity {c['id']}".replace(",", "%2C").replace(":", "%3A")
        out.append(f"::error title={title}::{msg}")
    return out


def merge(plan: Path, shards_root: Path, out: Path, previous: Sequence[Path], window: int,
          summary_path: Path | None) -> int:
    include = json.loads(plan.read_text())["include"]
    present, missing = [], []
    for entry in include:
        d = shard_dir(shards_root, entry["shard"])
        if (d / "results.jsonl").is_file():
            present.append(d)
        else:
            missing.append({"shard": entry["shard"], "count": entry.get("count", 0), "cases": entry.get("cases", "")})
    out.mkdir(parents=True, exist_ok=True)
    if present:
        code, index = report_dirs(present, out, previous, window)
        doc = json.loads((out / "summary.json").read_text())
        report = str(index)
    else:
        code, doc, report = EXIT_INFRA, {"cases": [], "totals": {}}, "none (no shard has results)"
    if missing and code not in (EXIT_FAIL,):
        code = EXIT_INFRA
    text = job_summary(doc, missing, code, report)
    if summary_path is not None:
        with summary_path.open("a") as fh:
            fh.write(text)
    else:
        print(text)
    for line in error_annotations(doc):
        print(line)
    for m in missing:
        print(f"::error title=parity shard {m['shard']}::no results ({m['count']} cases)")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.nightly", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge shard directories into one report with a job summary")
    m.add_argument("--plan", required=True, type=Path, help="parity matrix --format github's output")
    m.add_argument("--shards", required=True, type=Path, help="directory holding shard-I/ directories")
    m.add_argument("--out", required=True, type=Path)
    m.add_argument("--previous", action="append", default=[], type=Path, help="earlier nightlies, most recent first")
    m.add_argument("--window", type=int, default=7)
    m.add_argument("--summary", type=Path, help="markdown file to append to (default: $GITHUB_STEP_SUMMARY, "
                   "else standard output)")
    args = ap.parse_args(argv)
    env_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    summary = args.summary or (Path(env_summary) if env_summary else None)
    try:
        return merge(args.plan, args.shards, args.out, args.previous, args.window, summary)
    except (UsageError, ValueError, FileNotFoundError) as exc:
        print(f"parity nightly: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
