"""The reproducer of a fuzz failure: a self-contained directory that ``parity run`` replays.

``<out>/repro/``: ``model/`` (the checkpoint, copied), ``requests.json`` (+ ``requests.safetensors``
for prompt-embeds and images, ``scenarios.request_file``), ``example.json`` (the shrunk example
as drawn), ``failure.txt`` (the failing case and why) and ``command.txt``: one ``parity run``
command with the failing setup, the engine's batching limits and the mutation, if any.
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.fuzz.example import Example
from reference_impl.requests import Request
from scenarios.request_file import save_requests

REPRO_DIR = "repro"


@dataclass(frozen=True)
class Reproducer:
    dir: Path
    argv: tuple[str, ...]  # ``parity run …`` without the program name

    @property
    def command(self) -> str:
        return shlex.join(("parity", *self.argv))


def repro_argv(repro: Path, example: Example, setup_id: str, mutation: str | None, backend: str) -> list[str]:
    """``parity run``'s arguments that replay ``setup_id`` on the reproducer in ``repro``."""
    argv = ["run", "--model", str(repro / "model"), "--requests", str(repro / "requests.json"),
            "--setups", setup_id, "--backend", backend,
            "--max-num-batched-tokens", str(example.engine.max_num_batched_tokens),
            "--max-num-seqs", str(example.engine.max_num_seqs)]
    if mutation:
        argv += ["--mutation", mutation]
    return argv + ["--out", str(repro / "run")]


def write_repro(out: Path, example: Example, checkpoint: Path, requests: Sequence[Request], setup_id: str,
                reason: str, mutation: str | None, backend: str = "mp") -> Reproducer:
    """Write the reproducer of ``example``'s failing ``setup_id`` under ``out/repro`` (replacing an
    earlier one)."""
    repro = out / REPRO_DIR
    if repro.exists():
        shutil.rmtree(repro)
    repro.mkdir(parents=True)
    shutil.copytree(checkpoint, repro / "model")
    save_requests(repro / "requests.json", requests)
    (repro / "example.json").write_text(json.dumps(asdict(example), indent=1) + "\n", encoding="utf-8")
    (repro / "failure.txt").write_text(f"{setup_id}: {reason}\n", encoding="utf-8")
    argv = tuple(repro_argv(repro, example, setup_id, mutation, backend))
    found = Reproducer(repro, argv)
    (repro / "command.txt").write_text(found.command + "\n", encoding="utf-8")
    return found


def load_example(path: Path) -> Example:
    """``example.json`` back into an ``Example``."""
    from harness.fuzz.example import EngineDraw, ModelDraw, RequestDraw

    doc = json.loads(path.read_text(encoding="utf-8"))
    return Example(ModelDraw(**doc["model"]), EngineDraw(**doc["engine"]),
                   tuple(RequestDraw(**r) for r in doc["requests"]), tuple(doc["setups"]))
