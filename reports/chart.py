"""The per-layer error chart: an inline SVG (no script, no external resource) with labelled axes,
one bar per layer and tensor, the localizer's tolerance as a dashed line, and the localized bar
in red. Every bar's value is written with ``format.num``, as the localization tables write it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from markupsafe import Markup, escape

from reports.format import as_float, num

# Bar widths (one series / several), gaps, margins in pixels.
BAR, BAR_MULTI, GAP, LEFT, TOP, BOTTOM = 18, 12, 6, 78, 22, 40
# Per series: its bar's CSS class (the template's stylesheet colours them).
SERIES_CLASS = {"residual": "s0", "hidden_states": "s1"}


def _scale(values: Sequence[float | None]) -> tuple[bool, float, float]:
    """(log scale?, low, high) for the finite values; log when all are positive and span > 1e3
    (whole decades, so that the axis reads 1e-7 … 1e-2)."""
    finite = [v for v in values if v is not None]
    if not finite:
        return False, 0.0, 1.0
    lo, hi = min(finite), max(finite)
    if lo > 0 and hi / lo > 1e3:
        return True, math.ceil(math.log10(lo)) - 1, math.ceil(math.log10(hi))
    lo = min(lo, 0.0)
    return False, lo, hi if hi > lo else lo + 1.0


def _text(x: float, y: float, text: str, cls: str = "tick", anchor: str = "end", tip: str = "",
          rotate: bool = False) -> str:
    title = f"<title>{escape(tip)}</title>" if tip else ""
    turn = f' transform="rotate(-90 {x:.1f} {y:.1f})"' if rotate else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" class="{cls}" text-anchor="{anchor}"{turn}>'
            f"{escape(text)}{title}</text>")


def _ticks(log: bool, lo: float, hi: float) -> list[float]:
    """Axis values: every decade on a log axis (at most 6 labels), else low, middle, high."""
    if log:
        step = max(1, math.ceil((hi - lo) / 6))
        return [10.0**d for d in range(int(lo), int(hi) + 1, step)]
    return [lo, (lo + hi) / 2, hi] if lo < 0 < hi or lo == 0 else [lo, hi]


def per_layer_chart(errors: Sequence[Any] | Mapping[str, Sequence[Any]], highlight: int | None = None,
                    tolerance: Any = None, highlight_series: str | None = None,
                    unit: str = "relative error", height: int = 170) -> Markup:
    """Bars of per-layer errors: one series (a list) or one per tensor (a mapping of lists). The
    ``highlight`` layer's bar (of ``highlight_series``, or every series') is red; a missing or
    non-finite value is marked with a cross; ``tolerance`` is drawn as a dashed line."""
    series = dict(errors) if isinstance(errors, Mapping) else {"": list(errors)}
    layers = max((len(v) for v in series.values()), default=0)
    values = {name: [as_float(v) for v in vals] for name, vals in series.items()}
    tol = as_float(tolerance)
    log, lo, hi = _scale([v for vals in values.values() for v in vals] + [tol])
    bar = BAR if len(series) == 1 else BAR_MULTI
    group = len(series) * bar + GAP
    width = max(LEFT + layers * group + GAP + 8, 340)  # room for the legend and the tolerance label
    floor = height - BOTTOM

    def y(v: float) -> float:
        t = ((math.log10(v) if log else v) - lo) / (hi - lo)
        return floor - (floor - TOP) * min(max(t, 0.0), 1.0)

    parts = [
        f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f"<title>per-layer error: {escape(unit)}{' (log scale)' if log else ''}</title>",
        f'<line x1="{LEFT}" y1="{floor}" x2="{width}" y2="{floor}" class="axis"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{floor}" class="axis"/>',
        _text(14, (TOP + floor) / 2, f"{unit}{', log' if log else ''}", "label", "middle", rotate=True),
        _text(LEFT + (width - LEFT) / 2, height - 4, "layer", "label", "middle"),
    ]
    parts += [_text(LEFT - 4, y(t) + 3, num(t)) for t in _ticks(log, lo, hi)]
    base_y = floor if log else y(max(lo, 0.0))
    for i in range(layers):
        x0 = LEFT + GAP + i * group
        for j, (name, vals) in enumerate(values.items()):
            parts.append(_bar(x0 + j * bar, bar, vals[i] if i < len(vals) else None,
                              series[name][i] if i < len(series[name]) else None, f"layer {i}" +
                              (f" {name}" if name else ""), y, base_y, floor,
                              i == highlight and highlight_series in (None, name), SERIES_CLASS.get(name, "")))
        if layers <= 40 or i % 5 == 0:
            parts.append(_text(x0 + (group - GAP) / 2, floor + 13, str(i), anchor="middle"))
    if tol is not None:
        ty = y(tol)
        parts.append(f'<line x1="{LEFT}" y1="{ty:.1f}" x2="{width}" y2="{ty:.1f}" class="tol"/>')
        parts.append(_text(width - 2, ty - 3, f"tolerance {num(tol)}", "tolabel"))
    if len(series) > 1:
        parts += [_text(LEFT + 6 + 110 * j, 12, f"■ {name}", f"legend {SERIES_CLASS.get(name, '')}", "start")
                  for j, name in enumerate(series)]
    parts.append("</svg>")
    return Markup("".join(parts))


def _bar(x: float, width: int, v: float | None, raw: Any, label: str, y: Any, base_y: float, floor: float,
         highlighted: bool, series_cls: str) -> str:
    """One bar (or a cross for a missing / non-finite value) with its value as a tooltip."""
    tip = f"{label}: {num(raw) if raw is not None else 'not computed'}"
    if v is None:
        return _text(x + width / 2, floor - 4, "×", "nan", "middle", tip)
    y0, y1 = sorted((y(v), base_y))
    cls = " ".join(c for c in ("bar", series_cls, "hl" if highlighted else "") if c)
    return (f'<rect x="{x}" y="{y0:.1f}" width="{width}" height="{max(y1 - y0, 1):.1f}" class="{cls}">'
            f"<title>{escape(tip)}</title></rect>")
