"""The accuracy page: ``accuracy.json``'s document (``parity accuracy``) as HTML — per task and
setup the accuracy against the baseline, the paired test and every discordant document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

TEMPLATE_DIR = Path(__file__).parent / "templates"
ACCURACY_TEMPLATE = "accuracy.html.j2"


def _pct(value: Any) -> str:
    return "—" if value is None else f"{100 * float(value):.1f}%"


def _delta(value: Any) -> str:
    return "—" if value is None else f"{100 * float(value):+.1f} pts"


def _p(value: Any) -> str:
    return "—" if value is None else f"{float(value):.3g}"


def render_accuracy_html(doc: dict[str, Any]) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pct=_pct, delta=_delta, p=_p)
    verdicts = [s["verdict"] for s in doc["setups"]]
    overall = ("fail" if "fail" in verdicts else "error" if "error" in verdicts
               else "inconclusive" if "inconclusive" in verdicts or not verdicts else "pass")
    return env.get_template(ACCURACY_TEMPLATE).render(doc=doc, overall=overall)


def render_accuracy(out_dir: Path, doc: dict[str, Any], name: str = "index.html") -> Path:
    """Write ``out_dir/name`` (the accuracy report) and return its path."""
    path = Path(out_dir) / name
    from reports.html import write_atomic

    return write_atomic(path, render_accuracy_html(doc))
