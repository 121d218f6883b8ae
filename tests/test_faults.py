"""Faults, for real: a rank killed by SIGKILL, a rank that hangs, memory kills, the driver killed
mid-run and resumed, Ctrl-C. Each ends as the harness promises (docs/reliability.md): the case
is an ``error`` that says what happened, the pool is rebuilt, the run goes on, nothing finished
is lost."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.launch import MpLauncher, WorkerError
from harness.launch.postmortem import RankWatch, memory_limits
from parity.cli import main

from helpers import FAULT_ENV, machine_memory_mib

REPO = Path(__file__).resolve().parents[1]
# A failure must surface long before any built-in timeout: the launcher notices a dead rank
# within its 50 ms poll plus the peer grace (1 s), and a hang at the timeout the test gives.
DEATH_DEADLINE_S = 30.0
HANG_TIMEOUT_S = 10.0
RUN = ["run", "--backend", "mp", "--model", "tiny-llama", "--setups", "tp2-eager"]


# -- the launcher ------------------------------------------------------------------------------------


def test_sigkilled_rank_is_named_with_its_signal_memory_and_last_output(test_operations: None) -> None:
    launcher = MpLauncher(2)
    try:
        assert launcher.call("ping") == [0, 1]
        first = launcher.pids()
        start = time.monotonic()
        with pytest.raises(WorkerError) as info:
            launcher.call("kill_self_on_rank_1")  # rank 0 waits in a barrier meanwhile
        elapsed = time.monotonic() - start
        err = info.value
        print(err.detail)
        assert elapsed < DEATH_DEADLINE_S
        assert (err.rank, err.kind) == (1, "died")
        assert err.detail.startswith("killed by signal SIGKILL (9)")
        assert "peak RSS" in err.detail and "machine memory" in err.detail
        assert "rank 1: last words before SIGKILL" in err.detail  # its last output lines
        assert launcher.pids() == []  # every rank was torn down
        assert launcher.call("ping") == [0, 1]  # and the next call starts new ones
        assert not set(first) & set(launcher.pids())
    finally:
        launcher.close()


def test_hang_times_out_with_every_ranks_stack(test_operations: None) -> None:
    launcher = MpLauncher(2)
    try:
        launcher.call("ping")
        start = time.monotonic()
        with pytest.raises(WorkerError) as info:
            launcher.call("hang_on_rank_1", timeout=HANG_TIMEOUT_S)
        elapsed = time.monotonic() - start
        err = info.value
        print(err.detail)
        assert HANG_TIMEOUT_S <= elapsed < HANG_TIMEOUT_S + 15
        assert err.kind == "timeout" and err.rank == -1  # both ranks were silent
        assert "no reply from ranks [0, 1]" in err.detail
        rank0, rank1 = err.detail.split("--- rank 1")
        assert "--- rank 0" in rank0 and "barrier" in rank0  # rank 0 waits in the collective
        assert "in hang_on_rank_1" in rank1  # rank 1 sleeps there
        assert launcher.pids() == []
        assert launcher.call("ping") == [0, 1]
    finally:
        launcher.close()


# -- memory ------------------------------------------------------------------------------------------


def _cgroup_v1(path: Path, limit: int, peak: int, oom_kills: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (path / "memory.usage_in_bytes").write_text(f"{peak // 2}\n")
    (path / "memory.max_usage_in_bytes").write_text(f"{peak}\n")
    (path / "memory.oom_control").write_text(f"oom_kill_disable 0\nunder_oom 0\noom_kill {oom_kills}\n")
    return path


def test_kernel_oom_kill_is_named_with_the_memory_figures(tmp_path: Path) -> None:
    """The kernel's OOM killer's traces, on fake cgroup files (cgroup v1): the cgroup's
    ``oom_kill`` counter rises during the call, and the rank died by SIGKILL. The real kill is
    the next test."""
    cgroup = _cgroup_v1(tmp_path / "cg", limit=2**30, peak=2**30 - 2**20, oom_kills=0)
    watch = RankWatch(tmp_path, pids={1: 999_999_999}, peaks={1: 900 * 2**20}, cgroups={1: cgroup})
    watch.arm()
    (cgroup / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    text = watch.describe_death(1, -signal.SIGKILL)
    print(text)
    assert text.startswith("killed by signal SIGKILL (9); killed for memory: the kernel's OOM killer killed 1")
    assert "peak RSS 900 MiB (rank 1)" in text and "cgroup limit 1024 MiB" in text


# The real OOM kill below: a memory cgroup (v1) with this limit holds rank 1, which then allocates
# REAL_OOM_ALLOCATE_MIB. The limit is above a tiny-model rank's resident memory (about 300 MiB:
# torch and gloo) so joining the cgroup does not kill it, and far below what it allocates.
REAL_OOM_LIMIT_MIB = 600
REAL_OOM_ALLOCATE_MIB = 2048
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")


@pytest.fixture
def memory_cgroup() -> Iterator[Path]:
    """A fresh child memory cgroup of this process's (cgroup v1), limited to REAL_OOM_LIMIT_MIB;
    skipped where the machine does not let this process make one."""
    own = next((line.split(":", 2)[2].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()
                if line.split(":")[1] == "memory"), None) if Path("/proc/self/cgroup").is_file() else None
    parent = CGROUP_V1_MEMORY / own.lstrip("/") if own is not None else None
    if parent is None or not (parent / "memory.limit_in_bytes").is_file():
        pytest.skip("needs a cgroup v1 memory controller (to confine a rank and have the kernel's OOM killer act)")
    path = parent / f"parity-oom-test-{os.getpid()}"
    try:
        path.mkdir()
        (path / "memory.limit_in_bytes").write_text(str(REAL_OOM_LIMIT_MIB * 2**20))
    except OSError as e:
        pytest.skip(f"cannot make a memory cgroup here ({e}): the real OOM kill needs one")
    try:
        yield path
    finally:
        for pid in (path / "cgroup.procs").read_text().split():  # a rank still in it (it should be dead)
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        for _ in range(50):  # the kernel removes a cgroup only once its last process is gone
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_real_kernel_oom_kill_of_a_rank_is_named_with_rank_and_memory_figures(test_operations: None,
                                                                              memory_cgroup: Path) -> None:
    """For real: rank 1 is confined to a memory cgroup and allocates past its limit; the kernel's
    OOM killer kills it. The error names the rank, the signal, the OOM kill and the figures; the
    pool is rebuilt."""
    launcher = MpLauncher(2)
    try:
        launcher.call("join_cgroup_on_rank_1", str(memory_cgroup))
        start = time.monotonic()
        with pytest.raises(WorkerError) as info:
            launcher.call("allocate_on_rank_1", REAL_OOM_ALLOCATE_MIB)
        err = info.value
        print(err.detail)
        assert time.monotonic() - start < DEATH_DEADLINE_S
        assert (err.rank, err.kind) == (1, "died")
        assert "killed by signal SIGKILL (9); killed for memory: the kernel's OOM killer killed 1" in err.detail
        assert f"cgroup limit {REAL_OOM_LIMIT_MIB} MiB" in err.detail and "peak RSS" in err.detail
        assert "rank 1: allocating" in err.detail and "still alive" not in err.detail
        assert launcher.call("ping") == [0, 1]  # new ranks, outside the cgroup
    finally:
        launcher.close()


# Ray's memory monitor, for real: its threshold (a fraction of the machine's memory) is set this
# far above what the machine uses when the test starts, and rank 1 allocates up to
# RAY_OOM_ALLOCATE_MIB (well past it, well short of the machine's free memory). The monitor polls
# every RAY_OOM_REFRESH_MS.
RAY_OOM_HEADROOM_MIB = 1536
RAY_OOM_ALLOCATE_MIB = 6144
RAY_OOM_REFRESH_MS = 100


def test_real_ray_memory_monitor_kill_is_named_with_rank_and_memory_figures() -> None:
    """A Ray head of the test's own with a memory threshold just above the machine's present use;
    rank 1 allocates past it and Ray's memory monitor kills a rank. The error says so, with Ray's
    memory figures and the rank's peak RSS; the pool is rebuilt."""
    total, available = machine_memory_mib()
    if available < RAY_OOM_ALLOCATE_MIB + RAY_OOM_HEADROOM_MIB + 2048:
        pytest.skip(f"needs {RAY_OOM_ALLOCATE_MIB + RAY_OOM_HEADROOM_MIB + 2048} MiB available, has {available}")
    threshold = (total - available + RAY_OOM_HEADROOM_MIB) / total
    env = {**os.environ, "RAY_memory_usage_threshold": f"{threshold:.3f}",
           "RAY_memory_monitor_refresh_ms": str(RAY_OOM_REFRESH_MS), "RAY_ADDRESS": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "ray_memory_monitor_probe.py"),
                           str(RAY_OOM_ALLOCATE_MIB)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    assert lines and lines[0]["raised"], "the memory monitor did not act"
    err = lines[0]
    assert err["kind"] == "died" and err["rank"] in (0, 1)
    assert "killed for memory by Ray's memory monitor" in err["detail"]
    assert "peak RSS" in err["detail"]
    assert lines[1] == {"ping_after": [0, 1]}


def test_in_process_engine_that_runs_too_long_times_out_with_its_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """World size 1 runs in the driver: a call past its timeout is stopped (a timer in the main
    thread) and is an error of kind ``timeout`` saying where it was; the engine is dropped and
    the next call gets a fresh one."""
    from harness.launch.inprocess import InProcessLauncher
    from harness.launch.worker import Worker

    def spin_forever(worker: Worker) -> None:
        while True:  # a scheduler that never finishes a step
            pass

    monkeypatch.setattr(Worker, "spin_forever", spin_forever, raising=False)
    monkeypatch.setattr(Worker, "OPERATIONS", Worker.OPERATIONS | {"spin_forever"})
    launcher = InProcessLauncher()
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        launcher.call("spin_forever", timeout=HANG_TIMEOUT_S / 5)
    assert time.monotonic() - start < HANG_TIMEOUT_S
    err = info.value
    print(err.detail)
    assert (err.rank, err.kind) == (0, "timeout") and "in spin_forever" in err.detail
    assert "still running after 2 s" in err.detail
    assert launcher.call("ping", timeout=HANG_TIMEOUT_S) == [0]  # a fresh worker
    launcher.close()


def test_sigkill_near_the_memory_limit_is_probably_memory(tmp_path: Path) -> None:
    cgroup = _cgroup_v1(tmp_path / "cg", limit=2**30, peak=2**30 - 2**20, oom_kills=0)
    watch = RankWatch(tmp_path, pids={1: 999_999_999}, peaks={1: 1000 * 2**20}, cgroups={1: cgroup})
    watch.arm()
    assert "probably killed for memory" in watch.describe_death(1, -signal.SIGKILL)
    # Far from the limit, a SIGKILL is just a SIGKILL; and an exit without a signal is not memory.
    watch.peaks[1] = 10 * 2**20
    _cgroup_v1(cgroup, limit=2**30, peak=20 * 2**20, oom_kills=0)
    assert "memory" not in watch.describe_death(1, -signal.SIGKILL).split(";")[1].split(",")[0]
    assert watch.describe_death(1, 3).startswith("exited with exit code 3 without replying")


def test_memory_limits_of_this_machine() -> None:
    limits = memory_limits()
    assert limits["machine_total"] and limits["machine_total"] > 0
    print(limits)


# -- whole runs (`parity run` in this process, mp ranks) --------------------------------------------


def _cases(out: Path) -> list[dict[str, object]]:
    cases: list[dict[str, object]] = json.loads((out / "summary.json").read_text())["cases"]
    return cases


def test_run_with_a_rank_killed_mid_case_goes_on_and_exits_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             test_operations: None) -> None:
    monkeypatch.setenv(FAULT_ENV, f"kill:1:{tmp_path / 'fired'}")
    out = tmp_path / "out"
    assert main([*RUN, "--scenarios", "text,prompt_embeds", "--out", str(out)]) == 3
    killed, after = _cases(out)
    reason = str(killed["reason"])
    print(reason)
    assert killed["status"] == "error" and after["status"] == "pass"  # the rebuilt pool ran the next case
    first = reason.splitlines()[0]
    assert first.startswith("infrastructure: candidate tp2-eager, rank 1 died: killed by signal SIGKILL (9)")
    assert "peak RSS" in first
    assert "injected fault 'kill' before generating" in reason  # the rank's last output lines


def test_run_with_a_hung_rank_times_out_with_stacks_and_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 test_operations: None) -> None:
    monkeypatch.setenv(FAULT_ENV, f"hang:1:{tmp_path / 'fired'}")
    out = tmp_path / "out"
    timeout = 30
    start = time.monotonic()
    assert main([*RUN, "--scenarios", "text,prompt_embeds", "--case-timeout", str(timeout), "--out", str(out)]) == 3
    elapsed = time.monotonic() - start
    hung, after = _cases(out)
    reason = str(hung["reason"])
    print(reason)
    assert hung["status"] == "error" and after["status"] == "pass"
    assert reason.startswith(f"infrastructure: candidate tp2-eager (case timeout {timeout}s) timed out: "
                             "no reply from ranks [0, 1]")
    assert "--- rank 0" in reason and "--- rank 1" in reason
    assert "generate_with_fault" in reason.split("--- rank 1")[1]  # where rank 1 sleeps
    assert "reference_impl" in reason.split("--- rank 1")[0]  # rank 0: in the engine's collective
    # The deadline counts from the case's start; starting the pool's ranks has its own limit.
    assert timeout - 1 <= float(hung["seconds"]) < timeout + 60  # type: ignore[arg-type]
    print(f"run took {elapsed:.1f}s")


def _cli(args: list[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "parity.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _children(pid: int) -> set[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _wait_for_records(path: Path, count: int, proc: subprocess.Popen[bytes], limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError(f"{path}: fewer than {count} records after {limit}s")


def _assert_gone(pids: set[int], limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        left = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" != _state(p)]
        if not left:
            return
        time.sleep(0.2)
    raise AssertionError(f"processes {left} still alive {limit}s later")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def _comparable(case: dict[str, object]) -> dict[str, object]:
    """A case record without what differs between two clean runs (times)."""
    return {k: v for k, v in case.items() if k not in ("seconds", "metrics")}


SCENARIOS = ["--scenarios", "text,prompt_embeds,multimodal"]  # multimodal: a skip on a text model


def test_driver_killed_mid_run_then_resumed_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main([*RUN, *SCENARIOS, "--out", str(whole)]) == 0
    proc = _cli([*RUN, *SCENARIOS, "--out", str(killed)])
    _wait_for_records(killed / "results.jsonl", 1, proc)
    ranks = _children(proc.pid)
    assert ranks  # the tp2 pool's rank processes
    os.kill(proc.pid, signal.SIGKILL)  # the driver only: its ranks must notice and go
    proc.wait()
    lines = (killed / "results.jsonl").read_bytes()
    assert lines.endswith(b"\n") and all(json.loads(line) for line in lines.splitlines())  # no partial line
    recorded = len(lines.splitlines())
    assert 1 <= recorded < 3
    _assert_gone(ranks, 15)  # orphaned ranks end themselves
    # Another model, matrix or settings: refused, nothing written.
    before = sorted(p.name for p in killed.iterdir())
    for other in (["--model", "tiny-qwen2"], ["--seed", "1"], ["--setups", "tp2-pp2-eager"]):
        args = [*RUN, *SCENARIOS, *other, "--resume", str(killed)]
        assert main(args) == 2
    assert sorted(p.name for p in killed.iterdir()) == before
    assert main([*RUN, *SCENARIOS, "--resume", str(killed)]) == 0
    records = [json.loads(line) for line in (killed / "results.jsonl").read_text().splitlines()]
    assert len(records) == 3  # only the missing cases ran
    got, want = (json.loads((d / "summary.json").read_text()) for d in (killed, whole))
    assert got["totals"] == want["totals"]
    assert [_comparable(c) for c in got["cases"]] == [_comparable(c) for c in want["cases"]]


def test_ctrl_c_stops_the_run_within_seconds_and_keeps_what_finished(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _cli([*RUN, "--setups", "tp2-eager,tp2-pp2-eager", *SCENARIOS, "--out", str(out)])
    _wait_for_records(out / "results.jsonl", 1, proc)
    ranks = _children(proc.pid)
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the foreground group on Ctrl-C
    _, err = proc.communicate(timeout=60)
    elapsed = time.monotonic() - start
    print(err.decode()[-2000:])
    print(f"stopped {elapsed:.1f}s after Ctrl-C")
    assert proc.returncode == 130
    assert elapsed < 15
    assert "interrupted" in err.decode() and "Traceback" not in err.decode()
    _assert_gone(ranks, 5)  # every rank process is gone
    records = (out / "results.jsonl").read_text().splitlines()
    assert len(records) >= 1 and all(json.loads(r) for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["cases"]) == len(records)  # the report holds what finished


def test_sigterm_under_the_ray_launcher_stops_the_run_and_keeps_what_finished(tmp_path: Path) -> None:
    """A cancelled CI job sends SIGTERM. Under Ray, whose core worker installs a crash handler for
    SIGTERM in the driver (log and abort: exit 134), the run still stops as for Ctrl-C: exit 130,
    what finished kept and reported."""
    out = tmp_path / "out"
    ray_run = [*RUN[:RUN.index("--backend")], "--backend", "ray", *RUN[RUN.index("--backend") + 2:]]
    proc = _cli([*ray_run, "--setups", "tp2-eager,tp2-pp2-eager", *SCENARIOS, "--out", str(out)])
    _wait_for_records(out / "results.jsonl", 1, proc)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    print(err.decode()[-2000:])
    assert proc.returncode == 130, err.decode()[-2000:]
    assert time.monotonic() - start < 15
    assert "interrupted" in err.decode()
    records = (out / "results.jsonl").read_text().splitlines()
    summary = json.loads((out / "summary.json").read_text())
    assert len(records) >= 1 and len(summary["cases"]) == len(records)

