"""A run's settings, as recorded in ``summary.json``'s ``"run"`` and the report's header.

What was run (matrix, setups, scenarios, the engine under test, model and its checkpoint hash, a
requests file and its hash), how it was judged (baseline mode, policy, the dtype's tolerances,
repeats), where and how (dtype, device, backend, seed, mutation) and by what (command line, parity
version, git sha), so that a report can be read, and the run repeated, without the shell history
of whoever ran it.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.plan import RunOptions

# The distribution name of this project (pyproject.toml), whose version a run records.
DISTRIBUTION = "parity-harness"


def run_settings(options: RunOptions, matrix: str, setups: Sequence[str], scenarios: Sequence[str],
                 argv: Sequence[str]) -> dict[str, Any]:
    """The ``"run"`` object of ``summary.json`` for a run of ``options`` over ``setups`` x
    ``scenarios`` of ``matrix``, started by the command line ``argv``."""
    from harness.compare import tolerance_for
    from harness.results import _git_sha

    return {
        "matrix": matrix,
        "setups": list(setups),
        "scenarios": list(scenarios),
        "model": options.model,
        "checkpoint_hash": _checkpoint_hash(options.model),
        "engine": options.engine,
        "engine_identity": _engine_identity(options.engine),
        "engine_code": _engine_code(),
        "baseline": options.baseline,
        "policy": options.policy,
        "tolerances": asdict(tolerance_for(options.dtype)),
        "dtype": options.dtype,
        "device": options.device,
        "backend": options.backend,
        "seed": options.seed,
        "mutation": options.mutation,
        "requests": str(Path(options.requests_file).resolve()) if options.requests_file else None,
        "requests_hash": _requests_hash(options.requests_file),
        "repeat": options.repeat,
        "engine_limits": {"max_num_seqs": options.limits().max_num_seqs,
                          "max_num_batched_tokens": options.limits().max_num_batched_tokens},
        "command": shlex.join(argv),
        "version": _version(),
        "git_sha": _git_sha(),
    }


def _engine_code() -> str:
    """The hash of the engine's source (the baseline cache's key part): runs with the same hash
    ran the same engine code."""
    from harness.baseline import engine_code_hash

    return engine_code_hash()


def _engine_identity(name: str) -> str | None:
    """What besides parity's code defines the engine under test (transformers' TP: the library's
    and torch's versions and the adapter's source hash); None for the reference engine."""
    from harness.engines import get_engine

    return get_engine(name).identity() or None


def _checkpoint_hash(model: str) -> str | None:
    """The hash of ``model``'s checkpoint files (the baseline cache's), or None if it cannot be read."""
    from harness.baseline import checkpoint_hash
    from scenarios.models import resolve

    try:
        return checkpoint_hash(str(resolve(model)))
    except (OSError, ValueError):
        return None


def _requests_hash(requests_file: str | None) -> str | None:
    """The hash of a ``--requests`` file and the tensor files it names, or None without one."""
    if requests_file is None:
        return None
    from scenarios.request_file import file_digest

    try:
        return file_digest(requests_file)
    except OSError:
        return None


def _version() -> str | None:
    """This project's installed version, or None when it is run from a tree that is not installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


__all__ = ["DISTRIBUTION", "run_settings"]
