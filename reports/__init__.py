"""parity's reports: the self-contained HTML report, rendered from the result files' plain records."""

from reports.html import render_html, render_index

__all__ = ["render_html", "render_index"]
