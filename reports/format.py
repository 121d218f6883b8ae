"""Display text for the report: values, numbers, tokens, row ranges, a difference against its
tolerance, and the command line that reruns one case. Plain strings (the template escapes them)."""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Mapping, Sequence
from typing import Any


def fmt(value: Any) -> str:
    """A value as short display text: floats to 6 significant digits, containers as compact JSON."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def fmt_token(token: Any) -> str:
    """A token: ids as they are, text quoted so that whitespace is visible."""
    return json.dumps(token, ensure_ascii=False) if isinstance(token, str) else fmt(token)


def as_float(value: Any) -> float | None:
    """``value`` as a finite float, else None (missing, non-numeric, NaN or infinite)."""
    if isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def num(value: Any) -> str:
    """A number in three significant digits, small and large ones as ``2.01e-5`` (the way the
    tolerances are written); the chart's bars and the tables use this one format."""
    x = as_float(value)
    if x is None:
        return fmt(value)
    if x == 0 or 1e-2 <= abs(x) < 1e4:
        return f"{x:.3g}"
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def times(value: Any, limit: Any) -> str:
    """How many times ``limit`` ``value`` is: ``201×``, ``1.5×`` (empty when either is missing)."""
    x, y = as_float(value), as_float(limit)
    if x is None or not y:
        return ""
    factor = x / y
    return f"{factor:,.0f}×" if factor >= 100 else f"{factor:.3g}×"


def against(value: Any, limit: Any, name: str = "atol") -> str:
    """``Δ 0.201 = 201× atol 1e-3``: a difference with its tolerance and how far beyond it is."""
    if as_float(value) is None:
        return f"Δ {fmt(value)}" if value is not None else "Δ n/a"
    factor = times(value, limit)
    return f"Δ {num(value)} = {factor} {name} {num(limit)}" if factor else f"Δ {num(value)}"


def ranges(rows: Sequence[Any]) -> str:
    """Integers as ranges: ``[0, 1, 2, 3, 8]`` -> ``0–3, 8`` (anything else as it is)."""
    ints = sorted({r for r in rows if isinstance(r, int) and not isinstance(r, bool)})
    spans: list[list[int]] = []
    for r in ints:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in spans)
    others = [fmt(r) for r in rows if not (isinstance(r, int) and not isinstance(r, bool))]
    return ", ".join([text, *others] if text else others)


# ``parity run`` options that rerun one case as the run ran it: (option, run setting, default).
# A setting at its default is left out; --setups, --scenarios and --model come from the case.
_RERUN_OPTIONS = (
    ("--engine", "engine", "reference"), ("--baseline", "baseline", None), ("--policy", "policy", "auto"),
    ("--mutation", "mutation", None),
    ("--dtype", "dtype", None), ("--device", "device", None), ("--backend", "backend", "ray"),
    ("--seed", "seed", 0), ("--requests", "requests", None), ("--repeat", "repeat", 1),
)


def reproduce_command(record: Mapping[str, Any], run: Mapping[str, Any] | None) -> str:
    """``parity run --matrix M --setups S --scenarios SC --model MODEL --baseline B [--mutation X]
    [--dtype D] [--device D] …`` for one case, from the run's settings (``summary.json``'s
    ``"run"``); without them, the case's own baseline id."""
    run = run or {}
    args = ["parity", "run"]
    if run.get("matrix"):
        args += ["--matrix", str(run["matrix"])]
    args += ["--setups", str(record.get("setup")), "--scenarios", str(record.get("scenario")),
             "--model", str(record.get("model"))]
    for option, key, default in _RERUN_OPTIONS:
        value = run.get(key, record.get("baseline") if key == "baseline" else None)
        if value is not None and value != default:
            args += [option, str(value)]
    return shlex.join(args)
