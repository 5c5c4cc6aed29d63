"""A build as a Dask graph: partitions, decode tasks, the writer chain, back-pressure.

::

    open ─▶ write 0 ─▶ write 1 ─▶ ... ─▶ write N-1 ─▶ finalize      (one process)
              ▲          ▲                  ▲
           decode 0   decode 1   ...    decode N-1                   (any worker)
                                  ▲
                   decode k+W waits for write k (back-pressure, in-process schedulers)

Each decode task fetches and decodes one partition of sources on any worker.
Its result goes to one writer task; the writer tasks form a chain (task k
depends on task k-1) and are pinned to one worker process, so the bank is
opened once and written by exactly one process.

Memory does not grow with the bank: decode task k+W depends on writer task
k, so at most W decoded partitions wait for the writer. On a cluster that
dependency alone would make Dask place every decode task where the writer
task's result lives, the writer's worker (it places a task by its
dependencies), and leave the other workers idle: 20,000 PNGs took 3.7 s on one
of 2 workers. So each decode task also names its worker, round robin over
every worker thread (a loose restriction: another worker takes it if that one
is gone). Without the window the decode tasks spread by themselves, but the
writer's worker then ran one write per decode of its own while the others
decoded on, and decoded partitions piled up: 800 MB a worker for 200,000
images. A cluster still growing (Slurm jobs pending) gets no window: its
decode tasks are queued root tasks that Dask hands to workers as they come,
and Dask's memory manager pauses a worker short of memory.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import uuid
from collections.abc import Mapping
from typing import Any

import dask
import h5py
import numpy as np
from dask.base import DaskMethodsMixin
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from dask.task_spec import DataNode, Task, TaskRef

from features.base import Feature
from pipeline import config, layout
from pipeline.decode import Failure, Partition, decode_partition, map_partition
from pipeline.errors import DuplicateIdError, SchemaError
from pipeline.readers import ColumnSpec
from pipeline.sources import SourceSpec, expand, is_url, redact
from pipeline.writer import (
    BuildPlan,
    abort_build,
    attach_partition,
    finalize_build,
    open_build,
    read_partition,
    write_partition,
)

WRITER_PRIORITY = 100  # run a ready writer task before more decoding on its worker


class Build(DaskMethodsMixin):
    """A bank build as a Dask collection: computing it builds the bank.

    ``dask.compute(build)``, ``build.compute()`` and ``client.compute(build)``
    all work; the result is a :class:`pipeline.writer.BuildSummary`. Attributes
    say what the build will do: ``path``, ``total`` (sources to process),
    ``partitions`` (their sizes), ``write_keys`` (the writer chain's task
    keys, for progress), ``writer`` (the worker the chain is pinned to, if any).

    The writer tasks may only run on ``writer``: if that worker dies while
    ``client.compute(build)`` runs, they wait (``create`` watches for this and
    raises ``WriterError``). Cancel the future and call :meth:`abort`, then
    resume with ``mode="a"``.
    """

    def __init__(
        self,
        final: Delayed,
        write_keys: list[str],
        partitions: list[int],
        plan: BuildPlan,
        writer: str | None,
    ) -> None:
        self._final = final
        self.write_keys = write_keys
        self.partitions = partitions
        self.plan = plan
        self.writer = writer

    @property
    def path(self) -> str:
        return self.plan.path

    @property
    def final_key(self) -> str:
        """The key of the task that finishes the build (its result is the summary)."""
        return self._final.key

    @property
    def token(self) -> str:
        return self.plan.token

    @property
    def total(self) -> int:
        return sum(self.partitions)

    def abort(self, client: Any = None) -> None:
        """Close this build's writer wherever it is open, after a cancel or a failure.

        The partial bank stays, consistent up to its last commit, for
        ``create(..., mode="a")`` to resume. ``client`` defaults to the
        default distributed client, if any.
        """
        abort_build(self.token)
        if client is None:
            from pipeline.cluster import _default_client

            client = _default_client()
        if client is not None:
            client.run(abort_build, self.token)

    def __dask_graph__(self) -> Any:
        return self._final.__dask_graph__()

    def __dask_keys__(self) -> Any:
        return self._final.__dask_keys__()

    def __dask_layers__(self) -> Any:
        return self._final.__dask_layers__()

    def __dask_tokenize__(self) -> Any:
        return self._final.key

    def __dask_postcompute__(self) -> Any:
        return self._final.__dask_postcompute__()

    def __dask_postpersist__(self) -> Any:
        return self._final.__dask_postpersist__()

    # The graph is built exactly as it must run; there is nothing to optimise.
    __dask_optimize__ = staticmethod(lambda dsk, keys, **kwargs: dsk)
    __dask_scheduler__ = staticmethod(dask.threaded.get)

    def __repr__(self) -> str:
        where = f", writer on {self.writer}" if self.writer else ""
        return (
            f"<h5bank Build {self.path!r}: {self.total} sources in {len(self.partitions)} "
            f"partitions{where}>"
        )


class Graph:
    """A build's tasks as they are made: one materialized layer, annotated task by task.

    The graph of Delayed calls it replaces made a layer per task, and
    distributed copied every layer map once per collection computed: 80 MB
    and seconds for a 200,000-source build. Annotations (:class:`_PerTask`)
    pin the writer chain to the writer's worker and name each placed task's
    worker loosely. Annotations of the ``dask.annotate`` context the graph is
    made in apply to every task (a ``workers=`` there replaces the placement;
    the writer chain stays pinned).
    """

    def __init__(self, token: str, writer: str | None, decoders: list[str] | None = None) -> None:
        self.token = token
        self.schedule = (
            _decode_schedule(decoders, writer) if decoders and writer is not None else []
        )
        self.name = f"h5bank-build-{token}"
        self.tasks: dict[str, Any] = {}
        self.context = dask.get_annotations()
        self.annotations: dict[str, dict[str, Any]] = {
            "workers": {},
            "allow_other_workers": {},
            "priority": {},
        }
        self._pinned = [writer] if writer is not None else None

    def add(self, task: Task, pinned: bool = False, place: int | None = None) -> TaskRef:
        """Add ``task``: ``pinned`` to the writer's worker (if any), or, as the ``place``-th
        task spread over the cluster, on the worker the decode schedule names (if any)."""
        self.tasks[task.key] = task
        if pinned and self._pinned is not None:
            self._annotate(task.key, workers=self._pinned, allow_other_workers=False)
            self._annotate(task.key, priority=WRITER_PRIORITY)
        elif place is not None and self.schedule and "workers" not in self.context:
            worker = self.schedule[place % len(self.schedule)]
            self._annotate(task.key, workers=[worker], allow_other_workers=True)
        return TaskRef(task.key)

    def _annotate(self, key: str, **values: Any) -> None:
        for name, value in values.items():
            self.annotations[name][key] = value

    def constant(self, name: str, value: Any) -> TaskRef:
        """A value tasks share (the plan, the features, a function), sent once."""
        key = f"h5bank-{name}-{self.token}"
        if key not in self.tasks:
            self.tasks[key] = DataNode(key, value)
        return TaskRef(key)

    def delayed(self, key: str) -> Delayed:
        """The graph as a Delayed computing task ``key``."""
        names = {name for name, values in self.annotations.items() if values} | set(self.context)
        annotations = {
            name: _PerTask(self.annotations.get(name, {}), self.context.get(name)) for name in names
        }
        layer = MaterializedLayer(self.tasks, annotations=annotations or None)
        return Delayed(key, HighLevelGraph({self.name: layer}, {self.name: set()}), layer=self.name)


class _PerTask:
    """A layer annotation whose value differs by task: its own, else ``default`` (``None``:
    the task has none)."""

    def __init__(self, values: dict[str, Any], default: Any = None) -> None:
        self.values = values
        self.default = default

    def __call__(self, key: str) -> Any:
        value = self.values.get(key, self.default)
        return value(key) if callable(value) else value


def committed_ids(path: str) -> set[str]:
    """Ids already in the bank at ``path`` (or its partial file), if this process can see it.

    Only an optimisation (skip decoding what is there): the writer skips
    committed ids itself, so a bank only the writer can reach still appends
    correctly.
    """
    for candidate in (layout.partial_path(path), path):
        if not os.path.exists(candidate):
            continue
        try:
            with h5py.File(candidate, "r") as f:
                if layout.is_bank(f):  # only what the bank commits: a killed commit wrote more
                    return set(layout.read_strings(layout.ids_table(f))[: layout.committed(f)])
        except OSError:
            continue
    return set()


def partition_sources(
    sources: Any,
    storage_options: Mapping[str, Any] | None,
    partition_size: int | None,
    threads: int,
    skip: set[str],
    reads_bytes: bool = True,
) -> tuple[list[Partition], int]:
    """Expand ``sources`` into partitions; return them and how many ids were skipped.

    The default size is at most 512 sources a task when sources are fetched,
    fewer when the first files are large (about ``PARTITION_BYTES`` of
    source bytes a task, so that the partitions waiting for the writer stay
    small). Each task and commit costs a few milliseconds whatever its size:
    20,000 PNGs of 64x64 built in 2.1-2.3 s in tasks of 256, 1.9-2.0 s in
    tasks of about 500, 1.8 s in tasks of 1,024, for 20-60 MB more memory.
    At most
    4,096 when no feature reads bytes (sources made from their ids cost
    microseconds each, and Dask's per-task cost would dominate: a million
    16-float sources went at 24,000/s in tasks of 256, 62,000/s in tasks of
    2,048). A list known up front is spread over at least 4 tasks per worker
    thread.

    Sources are listed once, lazily: only the first ``4 x threads x size``
    specs are held to choose the size, and partitions are compact
    (:class:`Partition`).

    Duplicate ids in a list known up front raise :class:`DuplicateIdError`
    before anything is built; in a stream, the later duplicate becomes a
    failure and the first one is kept.
    """
    known = isinstance(sources, (str, os.PathLike, list, tuple))
    specs = iter(expand(sources, storage_options))
    if partition_size is None:
        partition_size = config.get("build.partition-size")
    if partition_size is None:
        partition_size = PARTITION_SOURCES if reads_bytes else 4096
        head = list(itertools.islice(specs, 4 * max(threads, 1) * partition_size))
        if reads_bytes:
            partition_size = min(partition_size, _size_for_bytes(head))
        if known and len(head) < 4 * max(threads, 1) * partition_size:
            partition_size = max(1, math.ceil(len(head) / (4 * max(threads, 1))))
        specs = itertools.chain(head, specs)
        del head
    if partition_size < 1:
        raise ValueError(f"partition_size must be at least 1, got {partition_size}")
    skipped = 0
    partitions: list[Partition] = []
    hashes: list[np.ndarray] = []  # each partition's ids, hashed: duplicates are found at the end
    current: list[SourceSpec] = []
    for spec in specs:
        if spec.id in skip:
            skipped += 1
            continue
        current.append(spec)
        if len(current) >= partition_size:
            hashes.append(np.fromiter((hash(s.id) for s in current), np.int64, len(current)))
            partitions.append(Partition(len(partitions), current))
            current = []
    if current:
        hashes.append(np.fromiter((hash(s.id) for s in current), np.int64, len(current)))
        partitions.append(Partition(len(partitions), current))
    duplicates = _duplicates(partitions, hashes)
    if duplicates and known:
        shown = ", ".join(
            f"{later.id!r}"
            + (f" ({redact(first.url)} and {redact(later.url)})" if first.url and later.url else "")
            for _, later, first in duplicates[:10]
        )
        more = f" and {len(duplicates) - 10} more" if len(duplicates) > 10 else ""
        raise DuplicateIdError(
            f"{len(duplicates)} duplicate source ids, nothing was written: {shown}{more}. Files "
            "found under a directory or glob get ids relative to it, so two roots holding the same "
            "relative path collide; build them into separate banks, or list the files explicitly "
            "(an explicit path keeps the string as given for its id)"
        )
    if duplicates:
        _fail_duplicates(partitions, duplicates)
    return partitions, skipped


def _duplicates(
    partitions: list[Partition], hashes: list[np.ndarray]
) -> list[tuple[int, SourceSpec, SourceSpec]]:
    """Each source whose id an earlier one has: ``(position, it, the first)``, in source order.

    Ids are compared by hash (8 bytes a source, where a set of 200,000 ids
    held 30 MB); sources whose hashes agree are then compared by id.
    """
    flat = np.concatenate(hashes) if hashes else np.empty(0, np.int64)
    order = np.argsort(flat, kind="stable")
    same = np.flatnonzero(flat[order][1:] == flat[order][:-1])
    if not len(same):
        return []
    candidates = np.unique(np.concatenate([order[same], order[same + 1]]))
    starts = np.cumsum([0, *(len(h) for h in hashes)])
    where = np.searchsorted(starts, candidates, side="right") - 1
    specs: dict[int, SourceSpec] = {}
    for k in np.unique(where).tolist():
        listed = partitions[k].specs
        for position in candidates[where == k].tolist():
            specs[position] = listed[position - int(starts[k])]
    first: dict[str, SourceSpec] = {}
    found = []
    for position in candidates.tolist():
        spec = specs[position]
        if spec.id in first:
            found.append((position, spec, first[spec.id]))
        else:
            first[spec.id] = spec
    return found


def _fail_duplicates(
    partitions: list[Partition], duplicates: list[tuple[int, SourceSpec, SourceSpec]]
) -> None:
    """Replace each later duplicate of a stream by a failure in its partition; keep the first."""
    starts = np.cumsum([0, *(len(p) for p in partitions)])
    by_partition: dict[int, dict[int, Failure]] = {}
    for position, later, first in duplicates:
        k = int(np.searchsorted(starts, position, side="right") - 1)
        which = f" ({redact(first.url)})" if first.url else ""
        by_partition.setdefault(k, {})[position - int(starts[k])] = Failure(
            later.id,
            "",
            f"DuplicateIdError: an earlier source of this build{which} has the same id; the "
            "first one is kept" + (f", this one ({redact(later.url)}) is not" if later.url else ""),
        )
    for k, failed in by_partition.items():
        listed = partitions[k].specs
        kept = [spec for j, spec in enumerate(listed) if j not in failed]
        partitions[k] = Partition(k, kept, list(failed.values()))


# Sources a decode task holds at most, by default, when its sources are fetched.
PARTITION_SOURCES = 512
# Source bytes a decode task aims at when the default partition size is chosen: the decoded
# partitions waiting for the writer (2 per worker thread) stay tens of MB even for large images.
PARTITION_BYTES = 4 << 20


def _size_for_bytes(head: list[SourceSpec], sample: int = 32) -> int:
    """Sources a partition of about ``PARTITION_BYTES`` holds, from the sizes of up to ``sample``
    local files among the first sources (any number when none is a local file)."""
    sizes = []
    for spec in head:
        if len(sizes) >= sample:
            break
        if spec.url and not is_url(spec.url):
            with contextlib.suppress(OSError):
                sizes.append(os.stat(spec.url).st_size)
    if not sizes:
        return 1 << 62
    return max(16, PARTITION_BYTES * len(sizes) // max(1, sum(sizes)))


def describe_sources(sources: Any, limit: int = 50) -> Any:
    """The source specification recorded in the bank's provenance, credentials removed."""
    if isinstance(sources, (str, os.PathLike)):
        return [redact(os.fspath(sources))]
    if isinstance(sources, (list, tuple)):
        shown = [
            redact(s.url or s.id) if isinstance(s, SourceSpec) else redact(os.fspath(s))
            for s in sources[:limit]
            if isinstance(s, (str, os.PathLike, SourceSpec))
        ]
        if len(sources) > limit:
            shown.append(f"... and {len(sources) - limit} more")
        return shown
    return f"<{type(sources).__name__} streamed>"


def build_graph(
    features: Mapping[str, Feature],
    bases: Mapping[str, str],
    path: str | os.PathLike[str],
    sources: Any,
    *,
    mode: str = "w",
    on_error: str | None = None,
    partition_size: int | None = None,
    max_pending: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    writer: str | None = None,
    threads: int | None = None,
    decoders: list[str] | None = None,
) -> Build:
    """The Dask graph that builds the bank at ``path`` from ``sources``.

    ``writer`` is the address of the worker the writer chain is pinned to
    (``None`` for in-process schedulers); ``threads`` the number of worker
    threads, used for the default partition size and back-pressure window;
    ``decoders`` where decode task ``k`` goes (entry ``k % len``), for a
    cluster whose workers are all there (see the module docstring).
    """
    if not features:
        raise SchemaError("the bank type has no features: add Feature class attributes to it")
    if mode not in ("w", "a"):
        raise ValueError(f"mode must be 'w' (new bank) or 'a' (append / resume), got {mode!r}")
    on_error = config.get("build.on-error", on_error)
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    path = os.path.abspath(os.fspath(path))
    threads = threads or os.cpu_count() or 1
    skip = committed_ids(path) if mode == "a" else set()
    reads_bytes = any(feature.reads_bytes for feature in features.values())
    partitions, skipped = partition_sources(
        sources, storage_options, partition_size, threads, skip, reads_bytes
    )
    sizes = [len(p) for p in partitions]
    window = config.get("build.max-pending", max_pending)
    if window is None and (writer is None or decoders):
        window = 2 * threads
    token = uuid.uuid4().hex
    plan = _plan(
        token=token,
        path=path,
        mode=mode,
        features=dict(features),
        on_error=on_error,
        provenance={
            "mode": mode,
            "sources": describe_sources(sources),
            "partitions": len(partitions),
            "on_error": on_error,
        },
        skipped=skipped,
        pinned=writer is not None,
        planned=sum(sizes),
    )

    options = dict(storage_options or {})
    fetch_settings = config.section("fetch")

    def decode(k: int, graph: Graph, after: TaskRef | None) -> TaskRef:
        return graph.add(
            Task(
                f"h5bank-decode-{k}-{token}", decode_partition, partitions[k], graph.constant("features", dict(features)),
                dict(bases), options, after, fetch_settings,
            ),
            place=k,
        )  # fmt: skip

    return writer_chain(plan, writer, decoders, sizes, window, decode, write_partition)


def _decode_schedule(decoders: list[str], writer: str) -> list[str]:
    """Decode task ``k`` goes to entry ``k % len``: every worker thread in turn, 8 times, less
    one turn per thread of the writer's worker, which also writes (about an eighth of a core
    in a build of small images, measured)."""
    schedule = [worker for _ in range(8) for worker in decoders]
    for _ in range(decoders.count(writer)):
        if len(set(schedule)) > 1:
            del schedule[len(schedule) - 1 - schedule[::-1].index(writer)]
    return schedule


def _plan(**fields: Any) -> BuildPlan:
    """A :class:`BuildPlan` with the writer's settings read here, where the build is made."""
    return BuildPlan(
        **fields,
        chunk_bytes=int(config.get("build.chunk-bytes")),
        fsync=bool(config.get("build.fsync")),
    )


def writer_chain(
    plan: BuildPlan,
    writer: str | None,
    decoders: list[str] | None,
    sizes: list[int],
    window: int | None,
    produce: Any,
    link: Any,
) -> Build:
    """``open ─▶ link(produce(0)) ─▶ ... ─▶ link(produce(N-1)) ─▶ finalize``, as a :class:`Build`.

    ``produce(k, graph, after)`` adds to ``graph`` (a :class:`Graph`) the
    tasks whose result the ``k``-th link writes, and returns a reference to
    it (``after`` is link ``k - window``, for back-pressure, or ``None``
    without a window); a task it adds with ``place=k`` goes where the decode
    schedule over ``decoders`` says. Open, the links and finalize are pinned
    to ``writer``.
    """
    token = plan.token
    graph = Graph(token, writer, decoders)
    plan_ref = graph.constant("plan", plan)
    state = graph.add(Task(f"h5bank-open-{token}", open_build, plan_ref), pinned=True)
    writes: list[TaskRef] = []
    for k in range(len(sizes)):
        after = writes[k - window] if window and k >= window else None
        result = produce(k, graph, after)
        state = graph.add(
            Task(f"h5bank-write-{k}-{token}", link, plan_ref, result, state, k), pinned=True
        )
        writes.append(state)
    final = graph.add(
        Task(f"h5bank-finalize-{token}", finalize_build, plan_ref, state), pinned=True
    )
    return Build(graph.delayed(final.key), [w.key for w in writes], sizes, plan, writer)


def map_graph(
    path: str | os.PathLike[str],
    func: Any,
    columns: list[ColumnSpec],
    partitions: list[Any],
    output: str,
    feature: Feature | None,
    *,
    on_error: str,
    skipped: int = 0,
    max_pending: int | None = None,
    writer: str | None = None,
    threads: int | None = None,
    decoders: list[str] | None = None,
) -> Build:
    """The Dask graph of ``bank.map(func, ..., output=output)`` over the bank at ``path``.

    ::

        open ─▶ read k ──▶ func over k ──▶ attach k ─▶ ... ─▶ finalize   (read/attach: writer)
                                (any worker)

    The writer chain is the build's: it opens the bank for writing (renamed to
    its partial path until the chain finishes), and each ``attach`` task writes
    one partition's results as ``output`` at the rows of its sources. The
    writer process also reads each partition's inputs (no other process may
    open a file being written), so ``func`` runs on any worker. ``partitions``
    are arrays of source rows; read ``k+W`` waits for attach ``k``. The
    ``func`` tasks are placed like a build's decode tasks (``decoders``):
    else Dask would run every one where its input was read.
    """
    path = os.path.abspath(os.fspath(path))
    threads = threads or os.cpu_count() or 1
    window = config.get("build.max-pending", max_pending) or 2 * threads
    sizes = [len(p) for p in partitions]
    token = uuid.uuid4().hex
    name = getattr(func, "__qualname__", None) or type(func).__name__
    plan = _plan(
        token=token,
        path=path,
        mode="a",
        features={output: feature} if feature is not None else {},
        on_error=on_error,
        provenance={
            "mode": "map",
            "function": f"{getattr(func, '__module__', '')}.{name}".lstrip("."),
            "inputs": [spec.path for spec in columns],
            "output": output,
            "partitions": len(partitions),
            "on_error": on_error,
        },
        skipped=skipped,
        pinned=writer is not None,
        planned=sum(sizes),
    )

    def read_and_map(k: int, graph: Graph, after: TaskRef | None) -> TaskRef:
        opened = TaskRef(f"h5bank-open-{token}")
        records = graph.add(
            Task(
                f"h5bank-read-{k}-{token}", read_partition, graph.constant("plan", plan), opened,
                columns, partitions[k], after,
            ),
            pinned=True,
        )  # fmt: skip
        return graph.add(
            Task(
                f"h5bank-map-{k}-{token}", map_partition, graph.constant("function", func), columns,
                records, output, feature, k,
            ),
            place=k,
        )  # fmt: skip

    return writer_chain(plan, writer, decoders, sizes, window, read_and_map, attach_partition)
