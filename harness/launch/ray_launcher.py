"""``RayLauncher``: one Ray actor per rank, placed by a placement group, rendezvous on rank 0's node.

The launcher reserves one placement-group bundle per rank, creates an empty ``RankActor`` in
each, asks rank 0's actor for its node's IP and a free port there, and then has every actor
build its ``Worker`` with that address at once (``Worker.__init__`` joins the process group,
which blocks until all ranks arrive). Calls then go to every actor together and the replies are
collected with ``ray.wait``: the first rank that raises or dies stops everything (the others may
be blocked in a collective) and surfaces as ``WorkerError`` with that rank's traceback.

``ray`` is imported inside the functions that need it, so importing ``harness.launch`` stays
cheap for callers that only use the multiprocessing launcher.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any, NoReturn

from harness.engines.base import BuildSpec
from harness.launch.base import EngineRun, WorkerError, free_port
from harness.launch.postmortem import LOST_PEER, RankWatch, prepare_rank
from reference_impl.requests import Request, RequestOutput

# The repository root: on the actors' PYTHONPATH so they import harness, reference_impl, scenarios.
REPO_ROOT = Path(__file__).resolve().parents[2]
# How long the driver waits for one call on all ranks when the caller names no timeout (the
# orchestrator names one per case: ``harness.plan.case_timeout``).
CALL_TIMEOUT_S = 600.0
# After a rank raised a communication error: how long to wait for a peer's death to be reported
# (Ray notices a dead actor process within about a second).
PEER_GRACE_S = 3.0
# How long the actors get to start (import torch, join the process group), like MpLauncher's.
STARTUP_TIMEOUT_S = 300.0
# How long to wait for the placement group's bundles to be reserved. A local cluster places them
# in well under a second; longer means the cluster lacks the resources (or is busy elsewhere).
PLACEMENT_TIMEOUT_S = 60.0
# How long a pooled launcher's workers get to leave the process group cleanly on ``close``
# before their actors are killed anyway.
CLOSE_TIMEOUT_S = 10.0
# Logical CPUs reserved per rank on CPU: the tiny models keep a rank mostly idle (it waits on
# gloo), and Ray's CPU count is for scheduling only. 0.1 lets two pytest-xdist workers each
# hold a 2-rank and a 4-rank pool (2 x 6 x 0.1 = 1.2) plus a selftest's clean pools on 2 cores.
DEFAULT_CPUS_PER_RANK = 0.1
# Placement-group strategies Ray accepts; PACK keeps ranks on as few nodes as possible.
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# Set in every actor: no hub lookups, no tokenizer threads, one OpenMP thread per rank.
ACTOR_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
# Copied from the driver to the actors when set (Triton interpreter on CPU, model cache dir, the
# compile caches' locations (``harness.compile_cache``), and the NCCL / PyTorch switches that keep
# NVLink multicast off on shared GPU hosts).
FORWARDED_ENV = ("TRITON_INTERPRET", "PARITY_CACHE", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",
                 "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")

# The raylet's setting of its workers' niceness (Ray's default: 15), read when a local head starts.
RAY_WORKER_NICENESS_ENV = "RAY_worker_niceness"

# A rank's reply: ("ok", value), ("raised", traceback text) when its code raised, or
# ("died", detail) when its process or task was lost.
Reply = tuple[str, Any]
# How Ray words an actor's death by its memory monitor (OutOfMemoryError, "OUT_OF_MEMORY").
_RAY_OOM = re.compile(r"OUT_OF_MEMORY|OutOfMemoryError|memory monitor|running low on memory", re.IGNORECASE)


@contextlib.contextmanager
def loopback_node_ip() -> Iterator[None]:
    """Make Ray keep ``127.0.0.1`` as is while a local head starts (or a driver joins one).

    Ray 2.x rewrites ``_node_ip_address="127.0.0.1"`` (and a ``127.0.0.1:port`` address to
    join) to the host's routable IP, and GCS and raylet then listen on every interface, unless
    its cluster mode is off, as on macOS/Windows. Turning that flag off for the duration of
    ``ray.init`` binds every Ray service to loopback (and lets a joining driver reach them); the
    flag only decides how a process without a Ray node finds its IP.
    """
    from ray._private import ray_constants

    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if saved is None:  # a Ray without the flag: nothing to do
        yield
        return
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def is_loopback(address: str) -> bool:
    """Does a Ray address (``host:port``, optionally ``scheme://``) name this host's loopback?"""
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to Ray: reuse a running connection, join ``RAY_ADDRESS``, or start a local head.

    The local head is bound to loopback, has no dashboard, logs only warnings and advertises
    ``num_cpus`` logical CPUs (default: this machine's core count).
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token set-up for a local cluster
    # Ray starts its workers at nice 15, so that its own services stay responsive; parity's ranks
    # are the work itself, and at nice 15 any other process on the machine starves them (the
    # smoke matrix with two busy-loop processes on 2 cores: a compiled case's first generation
    # ran past 120 s). A local head started here runs its workers at the usual priority.
    os.environ.setdefault(RAY_WORKER_NICENESS_ENV, "0")
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    with _keep_sigterm_handler():
        if address:
            # A loopback head (ours, from another process) listens on loopback only: keep Ray from
            # rewriting "127.0.0.1:port" to this host's routable IP, where nothing answers.
            with loopback_node_ip() if is_loopback(address) else contextlib.nullcontext():
                ray.init(address=address, logging_level=logging.WARNING)
            return
        with loopback_node_ip():
            ray.init(
                address="local",  # never attach to someone else's `ray start` cluster on this host
                num_cpus=num_cpus or os.cpu_count() or 1,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                logging_level=logging.WARNING,
                log_to_driver=False,  # rank errors come back as WorkerError; logs stay in the session dir
            )


@contextlib.contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """Ray's core worker installs a crash handler for SIGTERM in the driver (it logs the signal
    and aborts: exit 134), which would replace ``parity run``'s (stop, keep what finished, exit
    130). Put the Python-level handler back afterwards (from the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)


def actor_env() -> dict[str, str]:
    """Environment variables for every rank's actor (Ray's runtime_env ``env_vars``).

    PYTHONPATH holds the repository root, the driver's ``sys.path`` entries inside it (pytest
    puts ``tests/`` there: what the driver imports from there, the actors import too) and the
    driver's PYTHONPATH.
    """
    root = str(REPO_ROOT)
    paths = [root] + [p for p in sys.path if p and p != root and p.startswith(root + os.sep)]
    paths += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(ACTOR_ENV, PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)))
    env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    return env


def node_ip() -> str:
    """This node's IP as Ray reports it (the address other nodes reach it at)."""
    import ray.util

    get_ip: Callable[[], str] = ray.util.get_node_ip_address  # untyped in Ray
    return get_ip()


def cluster_resources(free: bool = False) -> dict[str, float]:
    """The Ray cluster's total (or currently free) resources."""
    import ray

    query: Callable[[], dict[str, float]] = ray.available_resources if free else ray.cluster_resources
    # Placement groups add a resource per bundle; only the real ones say anything to a reader.
    return {k: v for k, v in query().items() if k in ("CPU", "GPU", "memory") or k.startswith("node:")}


def _guarded(fn: Callable[..., Any], *args: Any) -> Reply:
    """Run ``fn`` in an actor and turn an exception into its traceback text."""
    try:
        return "ok", fn(*args)
    except BaseException:
        return "raised", traceback.format_exc()


class RankActor:
    """The body of one rank's Ray actor: reports where it runs, then hosts a ``Worker``."""

    def __init__(self) -> None:
        self._worker: Any = None

    def info(self) -> Reply:
        """Where this actor runs: node id and IP, process id, actor id."""
        return _guarded(self._info)

    def rendezvous(self) -> Reply:
        """This node's IP (as Ray reports it) and a TCP port free on it, for rank 0 to listen on."""
        return _guarded(self._rendezvous)

    def start(self, rank: int, world_size: int, master_addr: str, master_port: int, device: str,
              log_dir: str | None = None) -> Reply:
        """Build the ``Worker`` (joins the process group: every rank must be called together);
        ``log_dir``: where its output and, on ``postmortem.STACK_SIGNAL``, its stacks go."""
        if log_dir is not None:
            prepare_rank(log_dir, rank, ignore_sigint=False)
        return _guarded(self._start, rank, world_size, master_addr, master_port, device)

    def call(self, method: str, *args: Any) -> Reply:
        """``Worker.dispatch(method, *args)``: a catalogued worker operation."""
        return _guarded(self._call, method, *args)

    @staticmethod
    def _info() -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "node_ip": node_ip(),
                "pid": os.getpid(), "actor_id": ctx.get_actor_id()}

    @staticmethod
    def _rendezvous() -> tuple[str, int]:
        ip = node_ip()
        return ip, free_port(ip)

    def _start(self, rank: int, world_size: int, master_addr: str, master_port: int, device: str) -> None:
        from harness.launch.worker import Worker

        self._worker = Worker(rank, world_size, master_addr, master_port, device)

    def _call(self, method: str, *args: Any) -> Any:
        if self._worker is None:
            raise RuntimeError(f"Worker.{method} called before the worker was started")
        return self._worker.dispatch(method, *args)


@cache
def _remote_actor_class() -> Any:
    """``RankActor`` as a Ray actor class (made once, after ``ray`` is imported)."""
    import ray

    return ray.remote(RankActor)


class RayLauncher:
    """``world_size`` rank actors in one placement group, reused across ``run`` calls.

    Actors start on the first ``call``/``run``. With ``fresh_workers`` every ``run`` kills them
    and starts new ones (to measure what the pool saves). ``master_addr``/``master_port`` are the
    rendezvous address chosen on rank 0's node (``None`` until started).
    """

    def __init__(self, world_size: int, device: str = "cpu", cpus_per_rank: float = DEFAULT_CPUS_PER_RANK,
                 fresh_workers: bool = False, strategy: str = "PACK") -> None:
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be >= 1")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"unsupported device {device!r}: 'cpu' or 'cuda'")
        if strategy not in STRATEGIES:
            raise ValueError(f"placement strategy {strategy!r}: choose from {STRATEGIES}")
        self.world_size, self.device, self.cpus_per_rank = world_size, device, cpus_per_rank
        self.fresh_workers, self.strategy = fresh_workers, strategy
        self.master_addr: str | None = None
        self.master_port: int | None = None
        self._actors: list[Any] = []
        self._pg: Any = None
        self.watch: RankWatch | None = None

    # -- placement ---------------------------------------------------------------------------

    def bundles(self) -> list[dict[str, float]]:
        """One placement-group bundle per rank."""
        if self.device == "cuda":
            return [{"GPU": 1, "CPU": 1}] * self.world_size
        return [{"CPU": self.cpus_per_rank}] * self.world_size

    def _place(self) -> Any:
        """Reserve the bundles, or raise naming what was asked and what the cluster has free."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        pg = placement_group(self.bundles(), strategy=self.strategy)
        try:
            ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            raise RuntimeError(
                f"Ray could not place {self.world_size} ranks with bundles {self.bundles()[0]} each "
                f"(strategy {self.strategy}) within {PLACEMENT_TIMEOUT_S:.0f}s; cluster has "
                f"{cluster_resources()} in total, {cluster_resources(free=True)} free"
            ) from None
        return pg

    def _spawn(self, rank: int) -> Any:
        """An empty rank actor in bundle ``rank`` of the placement group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        gpus = 1 if self.device == "cuda" else 0
        cpus = 1 if self.device == "cuda" else self.cpus_per_rank
        return _remote_actor_class().options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=0,
            runtime_env={"env_vars": actor_env()},
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self._pg, placement_group_bundle_index=rank),
        ).remote()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Place, create the actors, pick the rendezvous on rank 0's node, build every Worker."""
        if self._actors:
            return
        ensure_ray()
        self._pg = self._place()
        self._actors = [self._spawn(rank) for rank in range(self.world_size)]
        self.watch = RankWatch(Path(tempfile.mkdtemp(prefix="parity-ranks-")))
        self.watch.pids = self._local_pids(self._collect([a.info.remote() for a in self._actors], STARTUP_TIMEOUT_S))
        [(addr, port)] = self._collect([self._actors[0].rendezvous.remote()], STARTUP_TIMEOUT_S)
        self.master_addr, self.master_port = addr, port
        self._collect([actor.start.remote(rank, self.world_size, addr, port, self.device, str(self.watch.log_dir))
                       for rank, actor in enumerate(self._actors)], STARTUP_TIMEOUT_S)

    @staticmethod
    def _local_pids(infos: list[dict[str, Any]]) -> dict[int, int]:
        """Rank -> pid of the actors on the driver's node (the only ones it can signal and read)."""
        import ray

        here = ray.get_runtime_context().get_node_id()
        return {rank: int(info["pid"]) for rank, info in enumerate(infos) if info["node_id"] == here}

    def actor_info(self) -> list[dict[str, Any]]:
        """Per rank: ``node_id``, ``node_ip``, ``pid``, ``actor_id`` (starts the actors if needed)."""
        self.start()
        return self._collect([actor.info.remote() for actor in self._actors])

    def call(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        """The worker operation ``method`` (``Worker.dispatch``) on every rank; replies in rank
        order. ``timeout``: seconds for the call (default ``CALL_TIMEOUT_S``)."""
        self.start()
        return self._collect([actor.call.remote(method, *args) for actor in self._actors],
                             CALL_TIMEOUT_S if timeout is None else max(timeout, 1.0))

    def run_traced(self, spec: BuildSpec, requests: Sequence[Request], timeout: float | None = None) -> EngineRun:
        """Validate ``spec`` (before anything starts), then serve ``requests``; rank 0's outputs."""
        spec.validate(self._cluster_gpus() if spec.device == "cuda" else None)
        if spec.world_size != self.world_size:
            raise ValueError(f"spec needs {spec.world_size} ranks; this launcher has {self.world_size}")
        if self.fresh_workers:
            self._kill()
        return EngineRun.from_replies(self.call("generate", spec, list(requests), timeout=timeout))

    def run(self, spec: BuildSpec, requests: Sequence[Request]) -> list[RequestOutput]:
        """``run_traced``'s outputs (rank 0's)."""
        return self.run_traced(spec, requests).outputs

    def close(self) -> None:
        """Leave the process group, kill the actors, free the placement group."""
        if self._actors:
            try:
                self._collect([actor.call.remote("close") for actor in self._actors], CLOSE_TIMEOUT_S)
            except WorkerError:
                pass
        self._kill()

    def abort(self) -> None:
        """Kill every actor now, without asking the workers to leave (Ctrl-C)."""
        self._kill()

    def __enter__(self) -> RayLauncher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- collection and teardown ---------------------------------------------------------------

    def _collect(self, refs: list[Any], timeout: float = CALL_TIMEOUT_S) -> list[Any]:
        """Each rank's value (``refs[i]`` is rank ``i``'s); on the first failure kill all and raise."""
        import ray

        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        if self.watch is not None:
            self.watch.arm()
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._timed_out(sorted(pending.values()), timeout)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(remaining, 0.5))
            if self.watch is not None:
                self.watch.sample()
            for ref in ready:
                rank = pending.pop(ref)
                status, value = self._reply(ref)
                if status == "raised" and pending and LOST_PEER.search(value):
                    self._dead_peer(pending, rank, value)
                if status == "died":
                    value = self._death(rank, value)
                if status != "ok":
                    self._fail(rank, value, status)
                results[rank] = value
        return [results[rank] for rank in range(len(refs))]

    def _death(self, rank: int, detail: str) -> str:
        """Ray's word on a dead rank, with its memory and last output lines (ranks on this node)."""
        if self.watch is None or rank not in self.watch.pids:
            return detail
        return f"{detail}\n{self.watch.describe_death(rank, None, how='its actor process died')}"

    def _dead_peer(self, pending: dict[Any, int], rank: int, text: str) -> None:
        """Rank ``rank`` raised on a lost connection: if a peer's actor died, raise its death
        (the cause) instead; else return."""
        import ray

        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=PEER_GRACE_S)
        for ref in ready:
            status, value = self._reply(ref)
            if status == "died":
                last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "")
                dead = pending[ref]
                self._fail(dead, f"{self._death(dead, value)}\n(rank {rank} then raised: {last})", "died")

    def _timed_out(self, silent: list[int], timeout: float) -> NoReturn:
        """A hang: every local rank's Python stack, then tear down and raise."""
        stacks = self.watch.describe_stacks() if self.watch is not None else "(no stacks: ranks not started)"
        self._fail(silent[0] if len(silent) == 1 else -1,
                   f"no reply from ranks {silent} within {timeout:.0f}s (the case timeout); every rank's "
                   f"Python stack at that moment:\n{stacks}", "timeout")

    @staticmethod
    def _reply(ref: Any) -> Reply:
        """The actor's reply, or an error reply if the task failed or the actor died."""
        import ray

        try:
            reply: Reply = ray.get(ref)
        except ray.exceptions.RayTaskError as err:  # raised outside the guarded body
            return "died", str(err)
        except ray.exceptions.OutOfMemoryError as err:  # Ray's memory monitor killed the rank
            return "died", f"killed for memory by Ray's memory monitor: {err}"
        except ray.exceptions.RayActorError as err:  # the process died (crash, OOM, kill)
            text = str(err)
            if _RAY_OOM.search(text):
                return "died", f"killed for memory by Ray's memory monitor: the rank's actor died: {text}"
            return "died", f"the rank's actor died: {text}"
        except ray.exceptions.RayError as err:
            return "died", f"{type(err).__name__}: {err}"
        return reply

    def _fail(self, rank: int, detail: str, kind: str) -> NoReturn:
        """Tear everything down (other ranks may be stuck in a collective) and raise."""
        self._kill()
        raise WorkerError(rank, detail, kind)

    def _kill(self) -> None:
        """Kill every actor and remove the placement group; safe to call twice."""
        actors, pg = self._actors, self._pg
        self._actors, self._pg = [], None
        self.master_addr = self.master_port = None
        if self.watch is not None:
            shutil.rmtree(self.watch.log_dir, ignore_errors=True)
            self.watch = None
        if not actors and pg is None:
            return
        import ray

        if not ray.is_initialized():
            return
        from ray.util.placement_group import remove_placement_group

        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        if pg is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(pg)

    @staticmethod
    def _cluster_gpus() -> int:
        """GPUs in the whole Ray cluster (a driver without GPUs may still launch CUDA ranks)."""
        ensure_ray()
        return int(cluster_resources().get("GPU", 0))

