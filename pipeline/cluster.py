"""Where a build runs, and running it with a progress bar.

| ``scheduler=`` | what runs the build |
| --- | --- |
| ``None`` (default) | the current default ``distributed.Client`` if there is one, else the setting ``h5bank.build.scheduler`` (default ``"local"``) |
| ``"local"`` | an embedded ``LocalCluster`` sized to the machine, or inside a Slurm job to its allocation (settings under ``h5bank.local-cluster``), closed after the build |
| ``"threads"`` / ``"sync"`` | Dask's threaded or synchronous scheduler, in this process |
| a ``distributed.Client`` | that client's cluster (left open) |
| ``"tcp://host:port"`` (any scheduler address) | a client to that scheduler, closed after the build (the cluster stays) |
| a cluster object (``LocalCluster``, dask-jobqueue's ``SLURMCluster``...) | a client to it, closed after |
| ``"slurm"`` | a dask-jobqueue ``SLURMCluster`` made from ``jobqueue.slurm`` (``configs/jobqueue.yaml``), scaled to ``h5bank.slurm.jobs`` jobs or adaptive between ``minimum-jobs`` and ``maximum-jobs``; its jobs are cancelled when the build ends or fails |

Dask's multiprocessing scheduler (``"processes"``) is refused: it runs each
task in whichever process is free, and a bank has exactly one writer process.

The embedded cluster's worker processes do not import the user's ``__main__``
(see :class:`_SpawnWithoutMain`), so a script with no
``if __name__ == "__main__":`` guard builds on it like any other.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.spawn
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import dask

with warnings.catch_warnings():  # in Jupyter without ipywidgets: the text bar, no warning
    warnings.simplefilter("ignore")
    from tqdm.auto import tqdm

from pipeline import config, layout, readers
from pipeline.errors import SchedulerError, WorkerDiedError, WriterError
from pipeline.graph import Build
from pipeline.writer import BuildSummary, abort_build

LOCAL = {"threads": "threads", "threading": "threads", "sync": "sync", "synchronous": "sync"}


@dataclass
class Runner:
    """A resolved place to run builds: a distributed client, or a local scheduler name.

    ``expected_threads`` is what a cluster still starting (Slurm jobs
    submitted, not all running) will have: partitions are sized for it.
    """

    client: Any = None
    local: str | None = None
    expected_threads: int = 0
    num_workers: int | None = None  # the threaded scheduler's threads (None: one per core)

    @property
    def threads(self) -> int:
        if self.client is None:
            return 1 if self.local == "sync" else (self.num_workers or os.cpu_count() or 1)
        present = sum(w.get("nthreads", 1) for w in _workers(self.client).values())
        return max(present, self.expected_threads) or 1

    def decode_workers(self) -> list[str] | None:
        """Where decode task ``k`` goes: entry ``k % len`` (each worker once per thread), when
        every expected worker is connected; ``None`` for a cluster still growing (and in
        process), whose decode tasks Dask places as workers arrive."""
        if self.client is None:
            return None
        workers = _workers(self.client)
        present = sum(w.get("nthreads", 1) for w in workers.values())
        if not workers or present < self.expected_threads:
            return None
        return [a for a in sorted(workers) for _ in range(max(1, workers[a].get("nthreads", 1)))]

    def writer_worker(self) -> str | None:
        """The worker the writer chain is pinned to: the first, in address order."""
        if self.client is None:
            return None
        workers = sorted(_workers(self.client))
        if not workers:
            self.client.wait_for_workers(1, timeout=60)
            workers = sorted(_workers(self.client))
        return workers[0]

    def release(self, path: str) -> None:
        """Close cached read handles on ``path`` here and on the workers: a writer needs it alone.

        The workers are this runner's cluster's and the default client's (a
        build on threads after computing on the default cluster).
        """
        readers.release(path)
        for client in {
            id(c): c for c in (self.client, _default_client()) if c is not None
        }.values():
            client.run(readers.release, path)

    def run(self, build: Build, progress: bool = True) -> BuildSummary:
        """Compute ``build``, showing sources written, rate and ETA while it runs."""
        self.release(build.path)
        self._check_output(build)
        verb = "map " if build.plan.provenance.get("mode") == "map" else ""
        desc = f"h5bank {verb}{os.path.basename(build.path)}"
        with _bar(build.total, desc, progress) as bar:
            if self.client is None:
                return self._run_local(build, bar)
            return self._run_distributed(build, bar)

    def _check_output(self, build: Build) -> None:
        """Fail before any work when the writer's worker cannot write next to the bank.

        Workers of a Slurm or remote cluster may run on machines that do not
        see this machine's disks: the bank must be on storage they share.
        """
        import socket

        folder = os.path.dirname(build.path)
        if self.client is None or build.writer is None:  # the writer runs in this process
            host, problem = _cannot_write(folder)
        else:
            host, problem = self.client.run(_cannot_write, folder, workers=[build.writer])[
                build.writer
            ]
        if problem is None:
            return
        if host == socket.gethostname():
            error = FileNotFoundError if "no folder" in problem else PermissionError
            raise error(f"cannot write the bank {build.path}: {problem}")
        raise SchedulerError(
            f"the writer's worker {build.writer} on host {host} cannot write the bank into "
            f"{folder}: {problem}. The bank's folder must be on storage that worker reaches (a "
            "shared filesystem when workers run on other machines)"
        )

    def gather(
        self, parts: list[Any], sizes: list[int], desc: str, progress: bool = True
    ) -> list[Any]:
        """Compute delayed ``parts`` (each covering ``sizes[i]`` sources) with a progress bar."""
        with _bar(sum(sizes), desc, progress) as bar:
            if self.client is None:
                by_key = {part.key: size for part, size in zip(parts, sizes, strict=True)}
                with _progress(by_key, bar):
                    return list(dask.compute(*parts, **self._local_options()))
            from distributed import as_completed

            futures = self.client.compute(parts)
            by_future = dict(zip(futures, sizes, strict=True))
            try:
                for future in as_completed(futures, loop=self.client.loop):
                    if future.status != "finished":
                        future.result()  # raises the task's exception
                    bar.update(by_future[future])
                return self.client.gather(futures)
            except BaseException:
                self.client.cancel(futures)
                raise

    def _local_options(self) -> dict[str, Any]:
        """``dask.compute`` keywords for the local scheduler."""
        if self.local == "threads" and self.num_workers:
            return {"scheduler": self.local, "num_workers": self.num_workers}
        return {"scheduler": self.local}

    def _run_local(self, build: Build, bar: Any) -> BuildSummary:
        try:
            with _progress(dict(zip(build.write_keys, build.partitions, strict=True)), bar):
                (summary,) = dask.compute(build, **self._local_options())
        except BaseException:
            abort_build(build.token)
            raise
        return summary

    def _run_distributed(self, build: Build, bar: Any) -> BuildSummary:
        if bar.disable is False and getattr(self.client, "dashboard_link", None):
            bar.write(f"h5bank: Dask dashboard at {self.client.dashboard_link}", file=sys.stderr)
        # One submission of the graph for every key: computing a collection per writer task
        # copied the graph's layer maps once each.
        final, *writes = self.client.get(
            build.__dask_graph__(), [build.final_key, *build.write_keys], sync=False
        )
        sizes = dict(zip(writes, build.partitions, strict=True))
        done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for future in (*writes, final):
            future.add_done_callback(done.put)
        try:
            while True:
                future = self._next(build, done)
                if future.status != "finished":
                    future.result()  # raises the task's exception
                if future is final:
                    return final.result()
                bar.update(sizes.pop(future))
                future.release()
        except BaseException as error:
            with contextlib.suppress(Exception):
                self.client.cancel([f for f in (final, *writes) if f.status == "pending"])
                build.abort(self.client)
            if type(error).__name__ == "KilledWorker":
                raise WorkerDiedError(
                    f"{error} Worker processes die like this when they run out of memory (give "
                    "them more: h5bank.local-cluster.memory-limit, jobqueue.slurm.memory) or when "
                    f"a decoder crashes on a source. {layout.partial_path(build.path)} keeps what "
                    "was committed: resume with mode='a' (h5bank build --resume)"
                ) from error
            raise

    def _next(self, build: Build, done: queue.SimpleQueue[Any]) -> Any:
        """The next finished future; raises if the writer's worker left the cluster meanwhile.

        Writer tasks may only run on their worker: if it dies (or an adaptive
        cluster retires it), they would wait for ever.
        """
        while True:
            try:
                return done.get(timeout=1.0)
            except queue.Empty:
                if build.writer is not None and build.writer not in _workers(self.client):
                    then = (
                        "bank.map puts the bank back as of its last commit"
                        if build.plan.provenance.get("mode") == "map"
                        else f"{layout.partial_path(build.path)} is consistent up to its last "
                        "commit: resume with mode='a'"
                    )
                    raise WriterError(
                        f"the writer of {build.path} ran on worker {build.writer}, which left the "
                        "cluster (its process died: out of memory, or a decoder crashed it on a "
                        f"source; or the cluster retired it); {then}"
                    ) from None


def _cannot_write(folder: str) -> tuple[str, str | None]:
    """This host, and why this process cannot create files in ``folder`` (``None``: it can)."""
    import socket

    host = socket.gethostname()
    if not os.path.isdir(folder):
        return host, f"there is no folder {folder} (create it first)"
    if not os.access(folder, os.W_OK | os.X_OK):
        return host, f"the folder {folder} is not writable by uid {os.getuid()}"
    return host, None


def _bar(total: int, desc: str, progress: bool) -> Any:
    return tqdm(
        total=total,
        unit="src",
        desc=desc,
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _progress(sizes: dict[Any, int], bar: Any) -> Any:
    """A local-scheduler callback that advances ``bar`` by ``sizes[key]`` when a task ends."""
    from dask.callbacks import Callback

    class _Progress(Callback):
        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            if key in sizes:
                bar.update(sizes[key])

    return _Progress()


def _workers(client: Any) -> dict[str, Any]:
    """Every worker of the client's cluster (recent distributed lists 5 unless told)."""
    try:
        return client.scheduler_info(n_workers=-1)["workers"]
    except TypeError:
        return client.scheduler_info()["workers"]


def placement(scheduler: Any = None) -> tuple[str | None, int, list[str] | None]:
    """Where a build graph made for ``scheduler`` pins its writer, how many threads run it, and
    where its decode tasks go (:meth:`Runner.decode_workers`).

    Unlike :func:`runner_for`, ``None`` starts nothing: without a default
    client the graph is unpinned and runs on the threaded scheduler. A
    :class:`Runner` (what ``create`` has) answers for itself. ``"local"`` and
    ``"slurm"`` are refused: the cluster would be gone before the graph runs.
    """
    if isinstance(scheduler, Runner):
        return scheduler.writer_worker(), scheduler.threads, scheduler.decode_workers()
    if scheduler in ("local", "slurm"):
        raise SchedulerError(
            f"a graph cannot be made for scheduler={scheduler!r}: that cluster would be closed "
            "before the graph runs. Start the cluster yourself (LocalCluster(), "
            "dask_jobqueue.SLURMCluster()) and pass a Client to it, or use create()"
        )
    if scheduler is None and _default_client() is None:
        return None, os.cpu_count() or 1, None
    with runner_for(scheduler) as runner:
        return runner.writer_worker(), runner.threads, runner.decode_workers()


# h5mapper's create(parallelism=...): its three kinds of parallelism, as h5bank schedulers.
PARALLELISM = {"mp": "local", "threads": "threads", "none": "sync"}


def scheduler_for(
    scheduler: Any = None, parallelism: str | None = None, n_workers: int | None = None
) -> Any:
    """The ``scheduler`` that h5mapper's ``parallelism`` and ``n_workers`` arguments ask for.

    ``parallelism`` is ``"mp"`` (the embedded local cluster of worker
    processes), ``"threads"`` or ``"none"`` (one thread, in this process).
    ``n_workers`` sizes what h5bank starts (the local cluster's worker
    processes, or the threads); it cannot resize a cluster that is already
    running, so with a client or an address it is refused, saying what to
    write instead.
    """
    if parallelism is not None:
        if parallelism not in PARALLELISM:
            raise ValueError(
                f"parallelism must be one of {sorted(PARALLELISM)} (h5mapper's), got "
                f"{parallelism!r}; or give h5bank's scheduler= ('local', 'threads', 'sync', a "
                "distributed Client, a scheduler address, 'slurm')"
            )
        if scheduler is not None and scheduler != PARALLELISM[parallelism]:
            raise ValueError(
                f"give scheduler= or parallelism=, not both (parallelism={parallelism!r} is "
                f"scheduler={PARALLELISM[parallelism]!r})"
            )
        scheduler = PARALLELISM[parallelism]
    if n_workers is None:
        return scheduler
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
        raise ValueError(f"n_workers must be a whole number >= 1, got {n_workers!r}")
    where = scheduler
    if where is None:
        where = _default_client() or config.get("build.scheduler") or "local"
    if where in ("local", *LOCAL):  # one thread ("sync") has nothing to size: accepted
        return where
    shown = getattr(where, "scheduler", None) and getattr(where.scheduler, "address", None)
    raise ValueError(
        f"n_workers={n_workers} sizes a cluster h5bank starts (the embedded local cluster, or "
        f"the threads of scheduler='threads'), but this build runs on "
        f"{shown or where!r}, which is sized where it was started. Leave n_workers out, or "
        f"pass scheduler='local' to build on a local cluster of {n_workers} workers"
    )


@contextlib.contextmanager
def runner_for(
    scheduler: Any = None, progress: bool = False, n_workers: int | None = None
) -> Iterator[Runner]:
    """A :class:`Runner` for ``scheduler`` (see the module table); closes what it opened.

    With ``progress``, says on stderr what it starts: the Slurm jobs and when
    their first worker connected, or the size of a local cluster fitted to a
    Slurm allocation. ``n_workers`` sizes the local cluster or the threads it
    starts (see :func:`scheduler_for`).
    """
    if scheduler is None:
        current = _default_client()
        if current is not None:
            yield Runner(client=current)
            return
        scheduler = config.get("build.scheduler") or "local"
    if isinstance(scheduler, str) and scheduler in LOCAL:
        yield Runner(local=LOCAL[scheduler], num_workers=n_workers)
        return
    if scheduler in ("processes", "multiprocessing"):
        raise SchedulerError(
            "the multiprocessing scheduler cannot keep the single writer in one process; use "
            "the default (a local cluster), 'threads', or a distributed Client"
        )
    from distributed import Client

    if isinstance(scheduler, Client):
        yield Runner(client=scheduler)
        return
    if scheduler == "local":
        with _local_cluster(progress, n_workers) as cluster, _closing(Client(cluster)) as client:
            yield Runner(client=client)
        return
    if scheduler == "slurm":
        with _slurm_cluster(progress) as (client, threads):
            yield Runner(client=client, expected_threads=threads)
        return
    if (isinstance(scheduler, str) and "://" in scheduler) or hasattr(
        scheduler, "scheduler_address"
    ):
        with Client(scheduler) as client:
            yield Runner(client=client)
        return
    raise SchedulerError(
        f"unknown scheduler {scheduler!r}: use None (the default client, else "
        "h5bank.build.scheduler), 'local' (embedded local cluster), 'threads', 'sync', "
        "'slurm' (dask-jobqueue), a distributed.Client, a cluster object or a scheduler "
        "address like 'tcp://host:8786'"
    )


def _default_client() -> Any:
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        return None


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"h5bank: {message}", file=sys.stderr, flush=True)


# -- the embedded local cluster, and Slurm allocations -----------------------


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


class _SpawnWithoutMain:
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
def _local_cluster(progress: bool = False, n_workers: int | None = None) -> Iterator[Any]:
    """The embedded default: a ``LocalCluster`` of worker processes (:func:`local_cluster_size`),
    which do not import the user's ``__main__`` (:class:`_SpawnWithoutMain`)."""
    from distributed import LocalCluster

    settings = config.section("local-cluster")
    size = local_cluster_size(n_workers)
    if size.allocation is not None:
        _say(progress, f"starting {size}")
    with _SpawnWithoutMain.active():
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
        with _closing(cluster):
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

    with _local_cluster(progress, n_workers) as cluster, _closing(Client(cluster)) as client:
        yield client


@contextlib.contextmanager
def _closing(thing: Any) -> Iterator[Any]:
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


# -- Slurm through dask-jobqueue ----------------------------------------------


def slurm_job_script() -> str:
    """The worker job script ``scheduler="slurm"`` would submit, from ``jobqueue.slurm``.

    Rendered without starting a scheduler (its address is a placeholder), so
    it works on a machine without Slurm: ``--dry-run`` prints it.
    """
    from dask_jobqueue.slurm import SLURMJob

    config.load_jobqueue_defaults()
    return SLURMJob(
        "tcp://<scheduler-address>:8786",
        name="<worker-name>",
        interface=dask.config.get("jobqueue.slurm.interface", None),
    ).job_script()


def slurm_plan() -> tuple[str, int]:
    """How ``scheduler="slurm"`` scales (for messages), and the threads it will have."""
    config.load_jobqueue_defaults()
    settings = config.section("slurm")
    cores = int(dask.config.get("jobqueue.slurm.cores") or 1)
    low, high = settings.get("minimum-jobs"), settings.get("maximum-jobs")
    if low is not None and high is not None:
        return f"adaptive, {low} to {high} Slurm jobs of {_cores(cores)}", int(high) * cores
    jobs = int(settings.get("jobs") or 1)
    return f"{jobs} Slurm job{'s' if jobs != 1 else ''} of {_cores(cores)}", jobs * cores


def _cores(n: int) -> str:
    return f"{n} core{'s' if n != 1 else ''}"


def _test_submit(script: str) -> None:
    """``sbatch --test-only`` the job script: a wrong partition or size fails now, with Slurm's words."""
    if shutil.which("sbatch") is None:
        raise SchedulerError(
            "scheduler 'slurm' needs Slurm's sbatch on this machine's PATH (run the build on a "
            "login node of the cluster), or set h5bank.slurm.test-submit: false"
        )
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="h5bank-job-") as f:
        f.write(script)
        f.flush()
        result = subprocess.run(
            ["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=120
        )
    if result.returncode != 0:
        reason = "; ".join(line.strip() for line in result.stderr.splitlines() if line.strip())
        raise SchedulerError(
            f"Slurm refused the worker job script: {reason or f'sbatch exit {result.returncode}'}. "
            "Fix jobqueue.slurm (configs/jobqueue.yaml: queue, account, cores, memory, "
            "walltime); `h5bank build CONFIG --scheduler slurm --dry-run` prints the script"
        )


@contextlib.contextmanager
def _slurm_cluster(progress: bool = False) -> Iterator[tuple[Any, int]]:
    """A client to a ``SLURMCluster`` with its jobs submitted and one worker connected."""
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    settings = config.section("slurm")
    plan, threads = slurm_plan()
    started = time.perf_counter()
    cluster = SLURMCluster()  # everything from jobqueue.slurm
    with _closing(cluster):
        if settings.get("test-submit", True):
            _test_submit(cluster.job_script())
        if settings.get("minimum-jobs") is not None and settings.get("maximum-jobs") is not None:
            cluster.adapt(  # at least one job: the build waits for a worker before it starts
                minimum_jobs=max(1, int(settings["minimum-jobs"])),
                maximum_jobs=max(1, int(settings["maximum-jobs"])),
            )
        else:
            cluster.scale(jobs=int(settings.get("jobs") or 1))
        _say(progress, f"submitted {plan}")
        with _closing(Client(cluster)) as client:
            _wait_for_first_worker(client, cluster, float(settings.get("wait-timeout") or 600))
            _say(
                progress,
                f"first Slurm worker connected {time.perf_counter() - started:.1f} s after "
                f"starting the cluster (jobs {', '.join(_job_ids(cluster)) or '?'})",
            )
            yield client, threads


def _job_ids(cluster: Any) -> list[str]:
    return [str(job.job_id) for job in cluster.workers.values() if getattr(job, "job_id", None)]


# Slurm job states after which a job will not start a worker any more.
_ENDED = frozenset(
    {
        "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
        "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "TIMEOUT", "GONE",
    }
)  # fmt: skip


def _wait_for_first_worker(client: Any, cluster: Any, timeout: float) -> None:
    """Wait until a worker connects; fail with the jobs' Slurm states when none does."""
    deadline, next_check = time.monotonic() + timeout, time.monotonic() + 5
    while not _workers(client):
        now = time.monotonic()
        if now > deadline:
            raise SchedulerError(
                f"no Slurm worker connected within {timeout:g} s (h5bank.slurm.wait-timeout); "
                f"the jobs: {_shown_states(_job_states(_job_ids(cluster)))}. Their output is "
                "in jobqueue.slurm.log-directory (default: the working directory)"
            )
        if now > next_check:  # every job ended without a worker: no point waiting
            next_check = now + 5
            states = _job_states(_job_ids(cluster))
            if states and all(state in _ENDED for state, _ in states.values()):
                raise SchedulerError(
                    f"every Slurm worker job ended before its worker connected: "
                    f"{_shown_states(states)}. Their output is in jobqueue.slurm.log-directory "
                    "(default: the working directory)"
                )
        with contextlib.suppress(Exception):
            client.wait_for_workers(1, timeout=1)


def _job_states(ids: list[str]) -> dict[str, tuple[str, str]]:
    """Job id -> (state, reason), in one ``squeue`` call; jobs it no longer lists are GONE."""
    if not ids or shutil.which("squeue") is None:
        return {}
    result = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    states = {job: ("GONE", "None") for job in ids}
    for line in result.stdout.splitlines():
        job, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        if job in states:
            states[job] = (state, reason or "None")
    return states


def _shown_states(states: dict[str, tuple[str, str]]) -> str:
    """``"12 PENDING (Resources), 13 RUNNING"``."""
    if not states:
        return "none submitted"
    return ", ".join(
        f"{job} {state}" + (f" ({reason})" if reason != "None" else "")
        for job, (state, reason) in states.items()
    )
