"""Where a build runs, and running it with a progress bar.

| ``scheduler=`` | what runs the build |
| --- | --- |
| ``None`` (default) | the current default ``distributed.Client`` if there is one, else the setting ``h5bank.build.scheduler`` (default ``"auto"``) |
| ``"auto"`` | a build chooses ``"threads"`` or ``"local"`` from its features and a sample of its sources (:mod:`pipeline.run.auto`); anything else that runs on it (``map``) takes ``"local"`` |
| ``"local"`` | an embedded ``LocalCluster`` sized to the machine, or inside a Slurm job to its allocation (settings under ``h5bank.local-cluster``), closed after the build |
| ``"threads"`` / ``"sync"`` | Dask's threaded or synchronous scheduler, in this process |
| a ``distributed.Client`` | that client's cluster (left open) |
| ``"tcp://host:port"`` (any scheduler address) | a client to that scheduler, closed after the build (the cluster stays) |
| a cluster object (``LocalCluster``, dask-jobqueue's ``SLURMCluster``...) | a client to it, closed after |
| ``"slurm"`` | a dask-jobqueue ``SLURMCluster`` made from ``jobqueue.slurm`` (``configs/jobqueue.yaml``), scaled to ``h5bank.slurm.jobs`` jobs or adaptive between ``minimum-jobs`` and ``maximum-jobs``; its jobs are cancelled when the build ends or fails |

Dask's multiprocessing scheduler (``"processes"``) is refused: it runs each
task in whichever process is free, and a bank has exactly one writer process.

The embedded cluster's worker processes do not import the user's ``__main__``
(see :class:`SpawnWithoutMain`), so a script with no
``if __name__ == "__main__":`` guard builds on it like any other.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dask

with warnings.catch_warnings():  # in Jupyter without ipywidgets: the text bar, no warning
    warnings.simplefilter("ignore")
    from tqdm.auto import tqdm

from pipeline import config
from pipeline.build.chain import abort_build
from pipeline.build.graph import Build
from pipeline.build.summary import BuildSummary
from pipeline.clients import cluster_workers, default_client
from pipeline.errors import SchedulerError, WorkerDiedError, WriterLostError
from pipeline.files.cache import release
from pipeline.format.partial import partial_path
from pipeline.run.local import closing, start_local_cluster
from pipeline.run.slurm import start_slurm_cluster
from pipeline.terminal import printable

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
        present = sum(w.get("nthreads", 1) for w in cluster_workers(self.client).values())
        return max(present, self.expected_threads) or 1

    def decode_workers(self) -> list[str] | None:
        """Where decode task ``k`` goes: entry ``k % len`` (each worker once per thread), when
        every expected worker is connected; ``None`` for a cluster still growing (and in
        process), whose decode tasks Dask places as workers arrive."""
        if self.client is None:
            return None
        workers = cluster_workers(self.client)
        present = sum(w.get("nthreads", 1) for w in workers.values())
        if not workers or present < self.expected_threads:
            return None
        return [a for a in sorted(workers) for _ in range(max(1, workers[a].get("nthreads", 1)))]

    def wait_for_expected(self, timeout: float = 120.0) -> None:
        """Wait (up to ``timeout`` s) until a cluster still starting has the threads it
        expects: a sharded build places a writer on each worker, so it plans once they are
        there (on a cluster still short of them after that, it plans with those there)."""
        if self.client is None or not self.expected_threads:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            workers = cluster_workers(self.client)
            if sum(w.get("nthreads", 1) for w in workers.values()) >= self.expected_threads:
                return
            time.sleep(0.2)

    def writer_worker(self) -> str | None:
        """The worker the writer chain is pinned to: the first, in address order."""
        if self.client is None:
            return None
        workers = sorted(cluster_workers(self.client))
        if not workers:
            self.client.wait_for_workers(1, timeout=60)
            workers = sorted(cluster_workers(self.client))
        return workers[0]

    def release(self, path: str) -> None:
        """Close cached read handles on ``path`` here and on the workers: a writer needs it alone.

        The workers are this runner's cluster's and the default client's (a
        build on threads after computing on the default cluster).
        """
        release(path)
        for client in {id(c): c for c in (self.client, default_client()) if c is not None}.values():
            client.run(release, path)

    def run(self, build: Build, progress: bool = True) -> BuildSummary:
        """Compute ``build``, showing sources written, rate and ETA while it runs."""
        self.release(build.path)
        self._check_output(build)
        self._check_sources(build)
        verb = "map " if build.plan.provenance.get("mode") == "map" else ""
        desc = f"h5bank {verb}{printable(os.path.basename(build.path))}"
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
        writers = sorted({w for w in build.writers if w is not None})
        if self.client is None or not writers:  # the writer runs in this process
            answers = {None: _cannot_write(folder)}
        else:
            answers = self.client.run(_cannot_write, folder, workers=writers)
        for writer, (host, problem) in answers.items():
            if problem is None:
                continue
            if host == socket.gethostname():
                error = FileNotFoundError if "no folder" in problem else PermissionError
                raise error(f"cannot write the bank {build.path}: {problem}")
            raise SchedulerError(
                f"the writer's worker {writer} on host {host} cannot write the bank into "
                f"{folder}: {problem}. The bank's folder must be on storage that worker reaches "
                "(a shared filesystem when workers run on other machines)"
            )

    def _check_sources(self, build: Build) -> None:
        """Fail before any work when a worker cannot see a local source path the client
        gave: workers read local sources themselves (a cluster's machines share only what
        their filesystems share)."""
        if self.client is None or not build.local_roots:
            return
        answers = self.client.run(_missing, build.local_roots)
        for worker, (host, missing) in sorted(answers.items()):
            if missing:
                raise SchedulerError(
                    f"worker {worker} on host {host} cannot see the source path {missing}: "
                    "workers read local sources themselves, so a local path must be on "
                    "storage every worker reaches (a shared filesystem); or give the sources "
                    "as URLs (https://, s3://...)"
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
        """``dask.compute`` keywords for the local scheduler: on threads, one more thread than
        decode: a build's graph decodes on :attr:`threads` lanes (``pipeline.build.graph``) and
        the extra thread writes, so a core is not idle while the writer waits for its syncs
        (5,000 JPEGs to 224 px on 2 cores: 862-931 files/s on 2 threads, 940-950 on 3)."""
        if self.local == "threads":
            return {"scheduler": self.local, "num_workers": self.threads + 1}
        return {"scheduler": self.local}

    def _run_local(self, build: Build, bar: Any) -> BuildSummary:
        try:
            with _progress(dict(zip(build.write_keys, build.partitions, strict=True)), bar):
                (summary,) = dask.compute(build, **self._local_options())
        except BaseException:
            for chain in build.chains:
                abort_build(chain.token)
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
                    f"a decoder crashes on a source. {partial_path(build.path)} keeps what "
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
                present = cluster_workers(self.client)
                gone = next((w for w in build.writers if w is not None and w not in present), None)
                if gone is not None:
                    then = (
                        "bank.map puts the bank back as of its last commit"
                        if build.plan.provenance.get("mode") == "map"
                        else f"{partial_path(build.path)} is consistent up to its last "
                        "commit: resume with mode='a'"
                    )
                    raise WriterLostError(
                        f"the writer of {build.path} ran on worker {gone}, which left the "
                        "cluster (its process died: out of memory, or a decoder crashed it on a "
                        f"source; or the cluster retired it); {then}"
                    ) from None


def _missing(paths: list[str]) -> tuple[str, str | None]:
    """This host, and the first of ``paths`` this process cannot see (``None``: it sees all)."""
    import socket

    return socket.gethostname(), next((p for p in paths if not os.path.lexists(p)), None)


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
    if scheduler is None and default_client() is None:
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
        where = default_client() or config.get("build.scheduler") or "auto"
    if where in ("local", "auto", *LOCAL):  # one thread ("sync") has nothing to size: accepted
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
        current = default_client()
        if current is not None:
            yield Runner(client=current)
            return
        scheduler = config.get("build.scheduler") or "auto"
    if scheduler == "auto":  # chosen by a build (pipeline.run.auto); anything else: a cluster
        scheduler = "local"
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
        with (
            start_local_cluster(progress, n_workers) as cluster,
            closing(Client(cluster)) as client,
        ):
            yield Runner(client=client)
        return
    if scheduler == "slurm":
        with start_slurm_cluster(progress) as (client, threads):
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
        "h5bank.build.scheduler), 'auto', 'local' (embedded local cluster), 'threads', 'sync', "
        "'slurm' (dask-jobqueue), a distributed.Client, a cluster object or a scheduler "
        "address like 'tcp://host:8786'"
    )


# -- the embedded local cluster, and Slurm allocations -----------------------


# -- Slurm through dask-jobqueue ----------------------------------------------
