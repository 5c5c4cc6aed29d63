"""The embedded local cluster, and Slurm allocations it is sized to."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.spawn
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline import config
from pipeline.errors import SchedulerError


@dataclass(frozen=True)
class Allocation:
    """The CPUs and memory of the Slurm job this process runs in."""

    job_id: str
    cpus: int | None
    memory: int | None  # bytes
    basis: str  # the variables the figures come from, for messages


def slurm_allocation(env: Mapping[str, str] | None = None) -> Allocation | None:
    """What this Slurm job was given, from its ``SLURM_*`` variables; ``None`` outside a job.

    CPUs are ``SLURM_CPUS_PER_TASK`` x ``SLURM_NTASKS`` (at most this node's
    CPUs: a local cluster uses this node only), else this node's CPUs:
    ``SLURM_CPUS_ON_NODE`` (batch jobs), or the first entry of
    ``SLURM_JOB_CPUS_PER_NODE`` (``"4(x2),2"``; ``salloc`` shells have only
    this). Memory is ``SLURM_MEM_PER_NODE``, else ``SLURM_MEM_PER_CPU`` x the
    CPUs (Slurm gives both in MiB).
    """
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job:
        return None

    def number(name: str) -> int | None:
        # "4(x2),2" style lists: the first entry is the node this runs on
        text = env.get(name, "").split(",")[0].split("(")[0].strip()
        return int(text) if text.isdigit() and int(text) > 0 else None

    basis = []
    per_task = number("SLURM_CPUS_PER_TASK")
    tasks = number("SLURM_NTASKS") or number("SLURM_NPROCS")
    node_variable = next(
        (v for v in ("SLURM_CPUS_ON_NODE", "SLURM_JOB_CPUS_PER_NODE") if number(v)), None
    )
    on_node = number(node_variable) if node_variable else None
    cpus = None
    if per_task:
        cpus = per_task * (tasks or 1)
        basis.append(f"SLURM_CPUS_PER_TASK={per_task}")
        if tasks:
            basis.append(f"SLURM_NTASKS={tasks}")
    if on_node and (cpus is None or on_node < cpus):
        cpus = on_node
        basis.append(f"{node_variable}={env[node_variable]}")
    memory = None
    per_node, per_cpu = number("SLURM_MEM_PER_NODE"), number("SLURM_MEM_PER_CPU")
    if per_node:
        memory = per_node * 2**20
        basis.append(f"SLURM_MEM_PER_NODE={per_node}")
    elif per_cpu and cpus:
        memory = per_cpu * cpus * 2**20
        basis.append(f"SLURM_MEM_PER_CPU={per_cpu}")
    return Allocation(job, cpus, memory, ", ".join(basis) or "no size variables")


@dataclass(frozen=True)
class LocalSize:
    """How the embedded local cluster is sized, and why."""

    n_workers: int
    memory: Any  # bytes per worker, or "auto" / a Dask memory string
    local_directory: str | None
    allocation: Allocation | None

    def __str__(self) -> str:
        each = f", {self.memory / 2**30:.1f} GiB each" if isinstance(self.memory, int) else ""
        text = f"a local cluster of {self.n_workers} worker processes{each}"
        if self.allocation is not None:
            text += f" (inside Slurm job {self.allocation.job_id}: {self.allocation.basis})"
        return text


def local_cluster_size(n_workers: int | None = None) -> LocalSize:
    """The embedded cluster's size: ``n_workers``, else ``h5bank.local-cluster``, else this
    machine or Slurm job.

    Inside a Slurm job it is sized to the job's allocation: Slurm may not
    confine the job to it, and a cluster the size of the whole node would
    take CPUs and memory other jobs were given. 90 % of the allocated memory
    is split between the workers (the rest is for this process).
    """
    settings = config.section("local-cluster")
    allocation = slurm_allocation()
    threads = int(settings.get("threads-per-worker") or 1)
    cpus = (allocation and allocation.cpus) or os.cpu_count() or 1
    n_workers = int(n_workers or settings.get("n-workers") or max(1, cpus // threads))
    memory = settings.get("memory-limit", "auto")
    local_directory = settings.get("local-directory")
    if allocation is not None:
        if memory == "auto" and allocation.memory:
            memory = int(allocation.memory * 0.9 / n_workers)
        local_directory = local_directory or os.environ.get("TMPDIR")
    return LocalSize(n_workers, memory, local_directory, allocation)


class SpawnWithoutMain:
    """Worker processes of h5bank's local clusters that do not import the user's ``__main__``.

    Dask's nannies start worker processes with ``multiprocessing``'s
    ``spawn``, which runs the parent's main script again in each child (as
    ``__mp_main__``) before the worker starts. A script without an ``if
    __name__ == "__main__":`` guard (the first one most people write) would
    then build a bank again in every worker, start a cluster there, and fail
    with 300 lines ending in ``Nanny failed to start``. Dask's answer is the
    guard; h5bank's embedded cluster needs none: while one of its clusters is
    open, the preparation data that ``spawn`` (and ``forkserver``) send to a
    *Dask worker process* leave out the main module. Everything else is sent
    as before: ``sys.path`` (the script's folder included, so its sibling
    modules import), the working directory, the process name.

    What a worker then lacks is only the objects defined in the script; Dask
    pickles those by value (cloudpickle), so a feature class or a function
    written in the script still reaches the workers. Worker processes of
    other clusters are left alone, unless they start while an h5bank
    cluster is open (and then only their copy of ``__main__`` is skipped).
    """

    _open = 0
    _lock = threading.Lock()
    _original: Any = None
    # What distributed's Nanny names the process it starts (distributed.nanny.WorkerProcess).
    PROCESS_NAME = "Dask Worker process"

    @classmethod
    def _preparation_data(cls, name: str) -> dict[str, Any]:
        data = cls._original(name)
        if cls._open and str(name).startswith(cls.PROCESS_NAME):
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
        return data

    @classmethod
    @contextlib.contextmanager
    def active(cls) -> Iterator[None]:
        with cls._lock:
            if cls._original is None:
                cls._original = multiprocessing.spawn.get_preparation_data
                multiprocessing.spawn.get_preparation_data = cls._preparation_data
            cls._open += 1
        try:
            yield
        finally:
            with cls._lock:
                cls._open -= 1


@contextlib.contextmanager
def start_local_cluster(progress: bool = False, n_workers: int | None = None) -> Iterator[Any]:
    """The embedded default: a ``LocalCluster`` of worker processes (:func:`local_cluster_size`),
    which do not import the user's ``__main__`` (:class:`SpawnWithoutMain`)."""
    from distributed import LocalCluster

    settings = config.section("local-cluster")
    size = local_cluster_size(n_workers)
    if size.allocation is not None:
        say(progress, f"starting {size}")
    with SpawnWithoutMain.active():
        try:
            cluster = LocalCluster(
                n_workers=size.n_workers,
                threads_per_worker=settings.get("threads-per-worker") or 1,
                processes=True,
                memory_limit=size.memory,
                dashboard_address=settings.get("dashboard-address", ":0"),
                local_directory=size.local_directory,
                silence_logs=logging.CRITICAL,  # task errors reach the caller as exceptions
            )
        except Exception as error:
            while error.__cause__ is not None:  # the innermost reason (Dask wraps it twice)
                error = error.__cause__  # type: ignore[assignment]
            raise SchedulerError(
                f"the embedded local cluster could not start its {size.n_workers} worker "
                f"processes ({type(error).__name__}: {error}). Build in this process instead "
                "(scheduler='threads'), or start a Dask cluster yourself and pass its Client"
            ) from None  # Dask's internal traceback says nothing more to a user
        with closing(cluster):
            yield cluster


@contextlib.contextmanager
def local_cluster(n_workers: int | None = None, progress: bool = False) -> Iterator[Any]:
    """h5bank's embedded local cluster, kept open for several calls; yields its ``Client``.

    ::

        with local_cluster() as client:       # one cluster for everything below
            bank = Photos.create("photos.h5", "photos/")
            bank.map(summarise, inputs="images")
            mean = bank.images.to_dask().mean(axis=0).compute()

    Inside the block the client is Dask's default, so ``create``, ``map`` and
    ``.compute()`` all run on it instead of each starting (and closing) a
    cluster of its own. Like the embedded default, and unlike ``Client()``, it
    works in a script without an ``if __name__ == "__main__":`` guard. Sized
    by ``n_workers``, else ``h5bank.local-cluster`` (one worker process per
    core, or fitted to a Slurm job's allocation); closed at the end.
    """
    from distributed import Client

    with start_local_cluster(progress, n_workers) as cluster, closing(Client(cluster)) as client:
        yield client


@contextlib.contextmanager
def closing(thing: Any) -> Iterator[Any]:
    """Close a cluster or client at the end; a failure to close never hides the build's error.

    (Closing a cluster whose workers just died can raise, e.g. "can only join
    a started process"; that error would otherwise replace the one that
    says why the build stopped.)
    """
    try:
        yield thing
    except BaseException:
        with contextlib.suppress(Exception):
            thing.close()
        raise
    thing.close()


def say(progress: bool, message: str) -> None:
    if progress:
        print(f"h5bank: {message}", file=sys.stderr, flush=True)
