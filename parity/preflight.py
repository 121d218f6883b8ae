"""What ``parity run`` checks before anything runs or anything is written, so that bad input is
exit 2 with one line naming the problem and no half-written output: the model's checkpoint
(config, complete safetensors, every tensor with the shape its config implies), the output
directory, a ``--requests`` file (every request against the model's config), and for
``--resume DIR`` that DIR was a run of the same matrix, model and settings.

A run records its settings in ``run.json`` (atomically) before its first case, so that a run
killed at any moment can be resumed, and a resume with other settings refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.plan import RunOptions

RUN_FILE = "run.json"
RESULTS_FILE = "results.jsonl"
# The settings a resumed run must share with the run it continues: what is run, on which model and
# engine code, and how it is judged. (The command line, backend, git sha and timeouts may differ.)
RESUME_KEYS = ("matrix", "setups", "scenarios", "model", "checkpoint_hash", "engine", "engine_identity", "engine_code",
               "baseline", "policy", "dtype", "device", "seed", "mutation", "requests_hash", "repeat", "engine_limits",
               "planned")


class PreflightError(ValueError):
    """Bad input found before the run: exit 2."""


def check_model(model: str) -> None:
    """The model's checkpoint will load (``reference_impl.loader.check_checkpoint``)."""
    from reference_impl.loader import check_checkpoint
    from scenarios.models import resolve

    check_checkpoint(resolve(model))


def check_requests(options: RunOptions) -> None:
    """``--requests FILE`` holds valid requests for the model (``scenarios.request_file``: every
    problem found, one line each); prompt-embeds are read in the run's dtype."""
    if options.requests_file is None:
        return
    from reference_impl.config import load_config
    from reference_impl.loader import DTYPES
    from scenarios.models import resolve
    from scenarios.request_file import load_requests, scenario_name

    if "," in scenario_name(options.requests_file):
        raise PreflightError(f"--requests {options.requests_file}: the file's name holds a comma; its scenario "
                             f"{scenario_name(options.requests_file)} would not survive comma-separated lists "
                             "(--scenarios, --cases): rename the file")
    load_requests(options.requests_file, load_config(resolve(options.model)), DTYPES[options.dtype])


def check_out_dir(out: Path) -> None:
    """``out`` is, or can be made, a writable directory; nothing is left behind by the check."""
    if out.exists() and not out.is_dir():
        raise PreflightError(f"output directory {out}: exists and is not a directory")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise PreflightError(f"output directory {out}: cannot be created: {existing} is not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".parity-probe-", dir=existing)
        os.rmdir(probe)
    except OSError as exc:
        raise PreflightError(f"output directory {out}: not writable: {exc.strerror or exc}") from None


def stored_settings(out: Path) -> dict[str, Any] | None:
    """The settings a run in ``out`` recorded (``run.json``; else ``summary.json``'s ``"run"``)."""
    for name, key in ((RUN_FILE, None), ("summary.json", "run")):
        try:
            doc = json.loads((out / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        doc = doc.get(key) if key and isinstance(doc, dict) else doc
        if isinstance(doc, dict):
            return doc
    return None


def check_resume(out: Path, settings: dict[str, Any]) -> None:
    """``--resume out``: refuse unless ``out`` holds a run whose ``RESUME_KEYS`` equal ours."""
    if not out.is_dir():
        raise PreflightError(f"--resume {out}: no such directory")
    stored = stored_settings(out)
    if stored is None:
        if (out / RESULTS_FILE).exists():
            raise PreflightError(f"--resume {out}: the run there recorded no settings ({RUN_FILE}); "
                                 "cannot tell whether it is the same run")
        raise PreflightError(f"--resume {out}: holds no run to resume (no {RESULTS_FILE} or {RUN_FILE})")
    differ = [k for k in RESUME_KEYS if k in stored and stored.get(k) != settings.get(k)]
    if differ:
        shown = "; ".join(f"{k}: {_short(stored.get(k))} there, {_short(settings.get(k))} now" for k in differ)
        raise PreflightError(f"--resume {out}: a different run ({shown})")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def write_run_file(out: Path, settings: dict[str, Any]) -> None:
    """Record ``settings`` in ``out/run.json`` (through a temporary file and a rename)."""
    tmp = out / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(settings, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, out / RUN_FILE)


def resume_settings(run: dict[str, Any], planned: Sequence[str]) -> dict[str, Any]:
    """The run's settings with the ids of its planned cases (a resume must plan the same)."""
    return {**run, "planned": list(planned)}
