"""parity's reports: the self-contained HTML report and the result files written with it."""

from reports.html import render_all, render_html, render_index

__all__ = ["render_all", "render_html", "render_index"]
