"""Where a build runs, and running it with a progress bar.

| ``scheduler=`` | what runs the build |
| --- | --- |
| ``None`` (default) | the current default ``distributed.Client`` if there is one, else an embedded ``LocalCluster`` sized to the machine (settings under ``h5bank.local-cluster``), closed after the build |
| ``"threads"`` / ``"sync"`` | Dask's threaded or synchronous scheduler, in this process |
| a ``distributed.Client`` | that client's cluster (left open) |
| ``"tcp://host:port"`` (any scheduler address) | a client to that scheduler, closed after the build (the cluster stays) |
| a cluster object (``LocalCluster``, dask-jobqueue's ``SLURMCluster``...) | a client to it, closed after |

Dask's multiprocessing scheduler (``"processes"``) is refused: it runs each
task in whichever process is free, and a bank has exactly one writer process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dask
from tqdm.auto import tqdm

from pipeline import config, layout, readers
from pipeline.errors import SchedulerError, WriterError
from pipeline.graph import Build
from pipeline.writer import BuildSummary, abort_build

LOCAL = {"threads": "threads", "threading": "threads", "sync": "sync", "synchronous": "sync"}


@dataclass
class Runner:
    """A resolved place to run builds: a distributed client, or a local scheduler name."""

    client: Any = None
    local: str | None = None

    @property
    def threads(self) -> int:
        if self.client is None:
            return 1 if self.local == "sync" else (os.cpu_count() or 1)
        return sum(w.get("nthreads", 1) for w in _workers(self.client).values()) or 1

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
        verb = "map " if build.plan.provenance.get("mode") == "map" else ""
        desc = f"h5bank {verb}{os.path.basename(build.path)}"
        with _bar(build.total, desc, progress) as bar:
            if self.client is None:
                return self._run_local(build, bar)
            return self._run_distributed(build, bar)

    def gather(
        self, parts: list[Any], sizes: list[int], desc: str, progress: bool = True
    ) -> list[Any]:
        """Compute delayed ``parts`` (each covering ``sizes[i]`` sources) with a progress bar."""
        with _bar(sum(sizes), desc, progress) as bar:
            if self.client is None:
                by_key = {part.key: size for part, size in zip(parts, sizes, strict=True)}
                with _progress(by_key, bar):
                    return list(dask.compute(*parts, scheduler=self.local))
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

    def _run_local(self, build: Build, bar: Any) -> BuildSummary:
        try:
            with _progress(dict(zip(build.write_keys, build.partitions, strict=True)), bar):
                (summary,) = dask.compute(build, scheduler=self.local)
        except BaseException:
            abort_build(build.token)
            raise
        return summary

    def _run_distributed(self, build: Build, bar: Any) -> BuildSummary:
        if bar.disable is False and getattr(self.client, "dashboard_link", None):
            bar.write(f"h5bank: Dask dashboard at {self.client.dashboard_link}", file=sys.stderr)
        final, *writes = self.client.compute([build, *_delayed_keys(build)])
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
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.cancel([f for f in (final, *writes) if f.status == "pending"])
                build.abort(self.client)
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
                        f"cluster (it died or was retired); {then}"
                    ) from None


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


def placement(scheduler: Any = None) -> tuple[str | None, int]:
    """Where a build graph made for ``scheduler`` pins its writer, and how many threads run it.

    Unlike :func:`runner_for`, ``None`` starts nothing: without a default
    client the graph is unpinned and runs on the threaded scheduler.
    """
    if scheduler is None and _default_client() is None:
        return None, os.cpu_count() or 1
    with runner_for(scheduler) as runner:
        return runner.writer_worker(), runner.threads


def _delayed_keys(build: Build) -> list[Any]:
    """Delayed objects for the writer tasks of ``build`` (their results feed the progress bar)."""
    from dask.delayed import Delayed

    graph = build.__dask_graph__()
    return [Delayed(key, graph) for key in build.write_keys]


@contextlib.contextmanager
def runner_for(scheduler: Any = None) -> Iterator[Runner]:
    """A :class:`Runner` for ``scheduler`` (see the module table); closes what it opened."""
    if isinstance(scheduler, str) and scheduler in LOCAL:
        yield Runner(local=LOCAL[scheduler])
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
    if scheduler is None:
        current = _default_client()
        if current is not None:
            yield Runner(client=current)
            return
        with _local_cluster() as cluster, Client(cluster) as client:
            yield Runner(client=client)
        return
    if (isinstance(scheduler, str) and "://" in scheduler) or hasattr(
        scheduler, "scheduler_address"
    ):
        with Client(scheduler) as client:
            yield Runner(client=client)
        return
    raise SchedulerError(
        f"unknown scheduler {scheduler!r}: use None (embedded local cluster), 'threads', 'sync', "
        "a distributed.Client, a cluster object or a scheduler address like 'tcp://host:8786'"
    )


def _default_client() -> Any:
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        return None


@contextlib.contextmanager
def _local_cluster() -> Iterator[Any]:
    """The embedded default: a ``LocalCluster`` of worker processes sized to the machine."""
    from distributed import LocalCluster

    settings = config.get("local-cluster")
    n_workers = settings.get("n-workers") or os.cpu_count() or 1
    with LocalCluster(
        n_workers=n_workers,
        threads_per_worker=settings.get("threads-per-worker") or 1,
        processes=True,
        memory_limit=settings.get("memory-limit", "auto"),
        dashboard_address=settings.get("dashboard-address", ":0"),
        silence_logs=logging.ERROR,
    ) as cluster:
        yield cluster
