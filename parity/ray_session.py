"""One loopback-only Ray head per test session, started when the first test needs it.

The head runs in a process of its own (``python -m parity.ray_session DIR OWNER``), not in a
pytest process: an xdist worker may finish its tests and exit while another still uses the
cluster. The first process of the session to need Ray starts it, under a file lock in the
session's directory, and every process of the session reads the address it writes there. The
controlling pytest process stops it at the end of the session (``stop``); should that process
die first, the head process sees its owner gone and stops by itself.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ADDRESS_FILE = "address"
PID_FILE = "pid"
LOG_FILE = "head.log"
# How long a session waits for its head's address: a local head starts in ~5 s on an idle
# 2-core machine; a machine shared with other jobs has taken several times that.
START_TIMEOUT_S = 180.0
# How long ``stop`` waits for the head process to shut Ray down and exit before killing it.
STOP_TIMEOUT_S = 30.0
# How often the head process checks that the session's controlling process is still there.
OWNER_POLL_S = 1.0

# The head processes this process started, by pid (to reap them when they are stopped).
_STARTED: dict[int, subprocess.Popen[bytes]] = {}


def session_dir(owner: int) -> Path:
    """Where the session whose controlling process is ``owner`` keeps its head's address."""
    return Path(tempfile.gettempdir()) / f"parity-ray-{owner}"


def address(owner: int) -> str:
    """The address of the session's head: started by this call if no process of the session
    has started it yet (or the one started has died)."""
    folder = session_dir(owner)
    folder.mkdir(exist_ok=True)
    with (folder / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            known = _read(folder / ADDRESS_FILE)
            if known and alive(int(_read(folder / PID_FILE) or 0)):
                return known
            return _start(folder, owner)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _start(folder: Path, owner: int) -> str:
    (folder / ADDRESS_FILE).unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with (folder / LOG_FILE).open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "parity.ray_session", str(folder), str(owner)],
                                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    _STARTED[proc.pid] = proc
    (folder / PID_FILE).write_text(str(proc.pid))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if known := _read(folder / ADDRESS_FILE):
            return known
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    _STARTED.pop(proc.pid, None)
    tail = (folder / LOG_FILE).read_text(errors="replace")[-4000:]
    raise RuntimeError(f"the session's Ray head did not start within {START_TIMEOUT_S:.0f} s:\n{tail}")


def stop(owner: int) -> None:
    """End the session's head, if one was started, and remove the session's directory."""
    folder = session_dir(owner)
    if not folder.is_dir():
        return
    pid = int(_read(folder / PID_FILE) or 0)
    if pid and alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    if (proc := _STARTED.pop(pid, None)) is not None:
        proc.wait()
    for name in (ADDRESS_FILE, PID_FILE, LOG_FILE, "lock"):
        (folder / name).unlink(missing_ok=True)
    folder.rmdir()


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def alive(pid: int) -> bool:
    """Is ``pid`` a live process (a zombie, exited but not yet reaped, is not)?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return True  # no /proc: trust kill(0)


def _serve(folder: Path, owner: int) -> None:
    """The head process: start a local head, publish its address, keep it up until told to stop
    (SIGTERM, SIGINT) or until the session's controlling process is gone."""
    from harness.launch.ray_launcher import ensure_ray

    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    ensure_ray()
    import ray

    tmp = folder / (ADDRESS_FILE + ".tmp")
    tmp.write_text(ray.get_runtime_context().gcs_address)
    os.replace(tmp, folder / ADDRESS_FILE)
    try:
        while not stopping.wait(OWNER_POLL_S) and alive(owner):
            pass
    finally:
        ray.shutdown()


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), int(sys.argv[2]))
