"""Progress of a run: one updating line on a terminal, one plain line per case in CI logs."""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import TextIO


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None, interactive: bool | None = None) -> None:
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.counts: Counter[str] = Counter()
        self.start = time.monotonic()

    def _counts(self) -> str:
        return " ".join(f"{k} {self.counts[k]}" for k in ("pass", "fail", "error", "skip"))

    def begin(self, case_id: str) -> None:
        if self.interactive:
            line = f"[{self.done + 1}/{self.total}] {case_id}  {time.monotonic() - self.start:6.1f}s  {self._counts()}"
            self.stream.write("\r\033[K" + line)
            self.stream.flush()

    def finish(self, case_id: str, status: str, seconds: float, note: str = "") -> None:
        self.done += 1
        self.counts[status] += 1
        elapsed = time.monotonic() - self.start
        line = (f"[{self.done}/{self.total}] {status.upper():5s} {case_id} ({seconds:.1f}s)"
                f"{'  ' + note if note else ''}  elapsed {elapsed:.1f}s  {self._counts()}")
        if self.interactive:
            self.stream.write("\r\033[K")
        self.stream.write(line + "\n")
        self.stream.flush()
