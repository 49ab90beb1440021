"""Where the explorer's units of work run: worker processes on this machine (the default), or
tasks on a Ray cluster (`pip install 'kvmodel[ray]'`).

An engine only answers "where does this unit run": what a unit is (a chunk of one scenario's
schedules in check/explore.py, a whole scenario and vendor in check/campaign.py), the order in
which results are folded in (the order units were submitted, so results never depend on the
engine or the number of workers), deadlines and interrupts are the callers', the same for
every engine. A pool has one method, submit(fn, *args), whose answer has result(); leaving
the pool's block by an exception (KeyboardInterrupt included) ends the work still running.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol
from unittest.mock import patch

from kvmodel.errors import KvmodelError

RAY_MISSING = "--engine ray needs Ray, an optional dependency: pip install 'kvmodel[ray]'"
RAY_OBJECT_STORE = 100 * 2**20  # a local instance's shared memory: results are a few kB each


class EngineKind(Enum):
    PROCESSES = "processes"  # a process pool on this machine (or this process, with one worker)
    RAY = "ray"  # Ray tasks: a local instance started for the command, or a cluster's address


class Pending(Protocol):
    def result(self) -> Any: ...


class Pool(Protocol):
    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Pending: ...


@dataclass(frozen=True, slots=True)
class Engine:
    """`workers`: processes (PROCESSES), or the CPUs of the local Ray instance (RAY without
    `address`; a cluster has the CPUs it has)."""

    kind: EngineKind = EngineKind.PROCESSES
    workers: int = 1
    address: str | None = None  # RAY: an existing cluster (as ray.init(address=...) takes it)

    @property
    def in_process(self) -> bool:
        """Units run here, one after the other, with nothing to start or end."""
        return self.kind is EngineKind.PROCESSES and self.workers <= 1

    def check(self) -> None:
        """Bad input before any work: Ray missing, an address without Ray, no workers."""
        if self.workers < 1:
            raise KvmodelError(f"{self.workers} workers: at least 1 is needed")
        if self.kind is EngineKind.RAY:
            _import_ray()
        elif self.address is not None:
            raise KvmodelError("--address is the address of a Ray cluster: it needs --engine ray")

    @contextmanager
    def pool(self) -> Iterator[Pool]:
        self.check()
        if self.kind is EngineKind.RAY:
            with _ray_pool(self.workers, self.address) as pool:
                yield pool
        else:
            with worker_pool(self.workers) as pool:
                yield pool


# -- worker processes ----------------------------------------------------------------------

@contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """Worker processes that leave SIGINT to the parent (a terminal's Ctrl-C reaches the whole
    process group) and die with it: on any exit from the block, KeyboardInterrupt included,
    queued work is cancelled and running workers are ended, never left orphaned."""
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_ignore_sigint)
    try:
        yield pool
    except BaseException:
        _terminate(pool)
        raise
    else:
        pool.shutdown(wait=True)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _terminate(pool: ProcessPoolExecutor) -> None:
    # No public way to end running workers before Python 3.14 (terminate_workers()).
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=5)


# -- Ray -----------------------------------------------------------------------------------

def _import_ray():
    try:
        import ray
    except ImportError:
        raise KvmodelError(RAY_MISSING) from None
    return ray


class _RayPool:
    """Each submit() is one Ray task of one CPU, run in the driver's working directory (relative
    scenario and --out paths mean there what they mean here: the nodes of a cluster need the
    same files at the same paths, and kvmodel installed)."""

    def __init__(self, ray):
        self.ray = ray
        self.unit = ray.remote(num_cpus=1, max_retries=0)(_run_in)
        self.cwd = os.getcwd()
        self.pending: set = set()  # submitted, result not taken yet: what cancel_all() ends

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> _RayPending:
        ref = self.unit.remote(self.cwd, fn, *args)
        self.pending.add(ref)
        return _RayPending(self, ref)

    def cancel_all(self) -> None:
        for ref in self.pending:
            with suppress(Exception):  # finished or already gone: nothing to end
                self.ray.cancel(ref, force=True)


@dataclass(frozen=True, slots=True)
class _RayPending:
    pool: _RayPool
    ref: Any

    def result(self) -> Any:
        value = self.pool.ray.get(self.ref)
        self.pool.pending.discard(self.ref)  # no reference left: Ray may free the result
        return value


def _run_in(cwd: str, fn: Callable[..., Any], *args: Any) -> Any:
    """A Ray task: `fn(*args)` in the driver's working directory, when this node has it."""
    if os.path.isdir(cwd):
        os.chdir(cwd)
    return fn(*args)


@contextmanager
def _ray_pool(workers: int, address: str | None) -> Iterator[_RayPool]:
    """Ray as the caller connected it (ray.init() before), else connected to `address`, else a
    local instance of `workers` CPUs started here and shut down at the end."""
    ray = _import_ray()
    ours = not ray.is_initialized()
    try:
        if ours:
            options = dict(address=address, logging_level=logging.ERROR, log_to_driver=False)
            if address is None:  # "local": never attach to some instance left running here
                options |= dict(address="local", num_cpus=workers, include_dashboard=False,
                                object_store_memory=RAY_OBJECT_STORE)
            try:
                with _signals_held(ray):
                    ray.init(**options)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise KvmodelError(f"cannot start or reach Ray ({address or 'local'}): {e}") from None
        pool = _RayPool(ray)
        try:
            yield pool
        except BaseException:
            pool.cancel_all()
            raise
    finally:
        if ours:
            ray.shutdown()


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _signals_held(ray) -> Iterator[None]:
    """SIGINT and SIGTERM wait while Ray starts, then go to the caller's handlers: a ray.init()
    cut short leaves a half-started instance that crashed the process at exit (SIGSEGV and
    SIGABRT seen, Ray 2.60), and the SIGTERM handler ray.init() sets (sys.exit) would replace
    the caller's (the CLI's: the summary so far, exit 143)."""
    pending: list[int] = []
    handlers = {s: signal.getsignal(s) for s in _SIGNALS}
    for s in _SIGNALS:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    utils = getattr(getattr(ray, "_private", None), "utils", None)
    keep_off = (patch.object(utils, "set_sigterm_handler", lambda handler: None)
                if hasattr(utils, "set_sigterm_handler") else nullcontext())
    try:
        with keep_off:
            yield
    except SystemExit as e:  # Ray's handler was set after all (another version of Ray)
        if e.code != signal.SIGTERM:
            raise
        pending.append(signal.SIGTERM)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if pending:
        signal.raise_signal(pending[0])
