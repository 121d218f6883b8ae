"""What a launcher can say about a rank that died or hung: its exit signal, its last output lines,
its peak memory against the machine's and the cgroup's limits, and every rank's Python stack.

Each rank process calls ``prepare_rank`` first: its stdout and stderr go to ``rank<R>.log`` in the
launcher's log directory (so that the driver can quote the last lines of a rank that died), and
``faulthandler`` is registered on ``STACK_SIGNAL`` to write every thread's stack to
``rank<R>.stacks`` (so that the driver can show where each rank was when a case hung). SIGINT is
ignored in ranks: the driver owns their lifetime, and on Ctrl-C it kills them itself.

The driver keeps a ``RankWatch`` per pool: it samples each rank's peak RSS (the kernel's
``VmHWM``) while it waits, and reads the cgroup's OOM-kill counter before and after, so that a
rank killed by the kernel's OOM killer is told apart from one killed by someone else.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

# The signal on which every rank writes all its threads' Python stacks (faulthandler).
STACK_SIGNAL = signal.SIGUSR1
# How long the driver waits for the ranks' stack dumps after signalling them (a rank blocked in
# C code still dumps at once: faulthandler writes from the signal handler).
STACK_WAIT_S = 3.0
# Lines of a rank's output quoted when it died.
TAIL_LINES = 20
# How often the driver samples the ranks' peak RSS while it waits for them.
SAMPLE_EVERY_S = 0.5
# A SIGKILLed rank whose peak RSS, or whose cgroup's usage, came this close to the memory limit
# is reported as probably killed for memory even when the cgroup's OOM counter is unreadable.
NEAR_LIMIT = 0.9

# A traceback that says a rank lost its connection to a peer (a peer killed by SIGKILL makes its
# gloo peers raise at once): the launchers then look for a dead peer, whose death is the cause.
LOST_PEER = re.compile(r"gloo|nccl|Connection (closed|reset|refused)|Broken pipe|DistNetworkError|DistBackendError")

_KEEP: list[IO[Any]] = []  # the rank's open log and stack files (faulthandler needs them open)


def log_file(log_dir: str | Path, rank: int) -> Path:
    return Path(log_dir) / f"rank{rank}.log"


def stacks_file(log_dir: str | Path, rank: int) -> Path:
    return Path(log_dir) / f"rank{rank}.stacks"


def prepare_rank(log_dir: str | Path, rank: int, ignore_sigint: bool = True) -> None:
    """In a rank process, before anything else: output to ``rank<R>.log``, stacks on
    ``STACK_SIGNAL`` to ``rank<R>.stacks``, fatal-error tracebacks to the log, SIGINT ignored
    (``ignore_sigint``; a Ray worker keeps Ray's own handler)."""
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    log = open(log_file(log_dir, rank), "ab", buffering=0)  # noqa: SIM115 - kept open for the process
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    stacks = open(stacks_file(log_dir, rank), "w")  # noqa: SIM115 - kept open for the process
    _KEEP.extend((log, stacks))
    faulthandler.enable(file=sys.stderr, all_threads=True)
    faulthandler.register(STACK_SIGNAL, file=stacks, all_threads=True, chain=False)
    if ignore_sigint:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of ``path`` ("" when it cannot be read)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def signal_name(exitcode: int | None) -> str:
    """``"signal SIGKILL (9)"`` for a negative exit code, ``"exit code 3"`` otherwise."""
    if exitcode is None:
        return "unknown exit status"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name} ({-exitcode})"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


# -- memory ---------------------------------------------------------------------------------------


def peak_rss(pid: int) -> int | None:
    """The process's peak resident set size in bytes (``VmHWM``), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_dir(pid: int | str = "self", root: Path = CGROUP_ROOT) -> Path | None:
    """The memory cgroup directory of process ``pid``: cgroup v1's memory controller when the
    machine has one (``memory.limit_in_bytes``), else cgroup v2's (``memory.max``); None when
    neither can be read."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:  # v1: "4:memory:/path"
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            found = root / "memory" / path.lstrip("/")
            if (found / "memory.limit_in_bytes").is_file():
                return found
    for line in lines:  # v2: "0::/path", mounted at the root or at root/unified
        if line.startswith("0::"):
            for base in (root, root / "unified"):
                found = base / line[3:].lstrip("/")
                if (found / "memory.max").is_file():
                    return found
    return None


def _cgroup_dir() -> Path | None:
    return cgroup_dir()


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def memory_limits(cgroup: Path | None = None) -> dict[str, int | None]:
    """The machine's total memory and the cgroup's limit, usage, peak and OOM kills (bytes;
    None where unknown or unlimited)."""
    cgroup = cgroup if cgroup is not None else _cgroup_dir()
    total = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
    out: dict[str, int | None] = {"machine_total": total, "cgroup_limit": None, "cgroup_current": None,
                                  "cgroup_peak": None, "oom_kills": None}
    if cgroup is None:
        return out
    v1 = (cgroup / "memory.limit_in_bytes").is_file()
    names = (("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.max_usage_in_bytes", "memory.oom_control")
             if v1 else ("memory.max", "memory.current", "memory.peak", "memory.events"))
    limit = _read_int(cgroup / names[0])  # v2's "max" (no limit) reads as None
    out["cgroup_limit"] = limit if limit is not None and limit < UNLIMITED else None
    out["cgroup_current"] = _read_int(cgroup / names[1])
    out["cgroup_peak"] = _read_int(cgroup / names[2])
    with contextlib.suppress(OSError, ValueError):
        for line in (cgroup / names[3]).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                out["oom_kills"] = int(value)
    return out


# cgroup v1 writes "no limit" as a huge number (PAGE_COUNTER_MAX pages, ~2**63 bytes).
UNLIMITED = 2**62


def mib(value: int | None) -> str:
    return "?" if value is None else f"{value / 2**20:.0f} MiB"


@dataclass
class RankWatch:
    """The driver's view of a pool's rank processes: pids, log directory, peak RSS samples and
    the cgroup's OOM-kill count when the pool was last known healthy."""

    log_dir: Path
    pids: dict[int, int] = field(default_factory=dict)  # rank -> pid (processes on this host)
    peaks: dict[int, int] = field(default_factory=dict)  # rank -> peak RSS seen, bytes
    cgroups: dict[int, Path | None] = field(default_factory=dict)  # rank -> its memory cgroup
    oom_kills: dict[int, int | None] = field(default_factory=dict)  # rank -> its cgroup's count at ``arm``
    _sampled: float = 0.0

    def arm(self) -> None:
        """Before a call: each rank's memory cgroup and its OOM-kill count (a rise during the call
        means the kernel's OOM killer acted)."""
        for rank, pid in self.pids.items():
            # read again each time: a process can be moved to another cgroup while it lives
            found = cgroup_dir(pid)
            if found is not None or rank not in self.cgroups:
                self.cgroups[rank] = found
            self.oom_kills[rank] = memory_limits(self.cgroups[rank])["oom_kills"]

    def sample(self, force: bool = False) -> None:
        """Record each rank's peak RSS (at most every ``SAMPLE_EVERY_S``)."""
        now = time.monotonic()
        if not force and now - self._sampled < SAMPLE_EVERY_S:
            return
        self._sampled = now
        for rank, pid in self.pids.items():
            value = peak_rss(pid)
            if value is not None:
                self.peaks[rank] = max(value, self.peaks.get(rank, 0))

    def memory_note(self, rank: int, killed: bool) -> str:
        """The rank's peak RSS against the limits, and whether it was probably killed for memory
        (``killed``: it died by SIGKILL)."""
        limits = memory_limits(self.cgroups.get(rank))
        peak = self.peaks.get(rank)
        figures = (f"peak RSS {mib(peak)} (rank {rank}), machine memory {mib(limits['machine_total'])}, "
                   f"cgroup limit {mib(limits['cgroup_limit']) if limits['cgroup_limit'] else 'none'}, "
                   f"cgroup usage {mib(limits['cgroup_current'])} (peak {mib(limits['cgroup_peak'])})")
        before, after = self.oom_kills.get(rank), limits["oom_kills"]
        if before is not None and after is not None and after > before:
            return (f"killed for memory: the kernel's OOM killer killed {after - before} process(es) in this "
                    f"cgroup during the call; {figures}")
        if not killed:
            return figures
        limit = limits["cgroup_limit"] or limits["machine_total"]
        used = max(peak or 0, limits["cgroup_peak"] or 0) if limits["cgroup_limit"] else (peak or 0)
        if limit and used >= NEAR_LIMIT * limit:
            return f"probably killed for memory (usage within {1 - NEAR_LIMIT:.0%} of the limit); {figures}"
        return figures

    def stacks(self, ranks: list[int] | None = None) -> dict[int, str]:
        """Every rank's (or ``ranks``') Python stacks, all threads: signal each live rank, then
        read what faulthandler wrote ("" for a rank that wrote nothing in time)."""
        targets = {r: p for r, p in self.pids.items() if ranks is None or r in ranks}
        sizes: dict[int, int] = {}
        for rank, pid in targets.items():
            path = stacks_file(self.log_dir, rank)
            sizes[rank] = path.stat().st_size if path.exists() else 0
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, STACK_SIGNAL)
        deadline = time.monotonic() + STACK_WAIT_S
        out: dict[int, str] = {}
        while time.monotonic() < deadline and len(out) < len(targets):
            for rank in targets:
                if rank in out:
                    continue
                text = _read_from(stacks_file(self.log_dir, rank), sizes[rank])
                if text.count("File ") and _settled(stacks_file(self.log_dir, rank)):
                    out[rank] = text
            time.sleep(0.1)
        return {r: out.get(r, "") for r in sorted(targets)}

    def describe_stacks(self, ranks: list[int] | None = None) -> str:
        parts = []
        for rank, text in self.stacks(ranks).items():
            parts.append(f"--- rank {rank} (pid {self.pids[rank]}) stack ---\n"
                         + (text.strip() or "(no stack written: the process is gone or did not answer)"))
        return "\n".join(parts)

    def describe_death(self, rank: int, exitcode: int | None, how: str = "") -> str:
        """One paragraph on a dead rank: how it ended, its memory, its last output lines."""
        killed = exitcode == -signal.SIGKILL
        if how:
            status = how
        elif exitcode is not None and exitcode < 0:
            status = f"killed by {signal_name(exitcode)}"
        else:
            status = f"exited with {signal_name(exitcode)} without replying"
        lines = tail(log_file(self.log_dir, rank))
        return (f"{status}; {self.memory_note(rank, killed)}\n"
                f"--- rank {rank} last output lines ---\n{lines or '(no output)'}")


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _settled(path: Path) -> bool:
    """The file has not grown for a moment (faulthandler has finished writing)."""
    try:
        size = path.stat().st_size
        time.sleep(0.05)
        return path.stat().st_size == size
    except OSError:
        return False
