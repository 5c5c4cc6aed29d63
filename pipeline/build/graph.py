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

In-process schedulers (threads, sync) also run decode task k+L after decode
task k, L being the number of threads: each thread decodes its own lane of
partitions in order. Dask's threaded scheduler keeps its ready tasks in a
stack, so a decode freed by the window alone jumps ahead of decodes freed
earlier: the writer then waits on the oldest partition, decoded last, and a
thread idled for a quarter of a build of 5,000 JPEGs. A decode freed by the
decode before it in its lane is the next one due.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import Any

import dask
from dask.base import DaskMethodsMixin
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from dask.task_spec import DataNode, List, Task, TaskRef

from features.base import Feature
from pipeline.build.chain import (
    abort_build,
    attach_partition,
    finalize_build,
    open_build,
    read_partition,
    write_partition,
)
from pipeline.build.decode import decode_partition, map_partition
from pipeline.build.options import BuildOptions
from pipeline.build.plan import (
    BuildPlan,
    Partition,
    committed_ids,
    describe_sources,
    partition_sources,
)
from pipeline.build.shards import (
    assign_workers,
    auto_shards,
    chain_plan,
    finish_sharded,
    plan_shards,
    resolve_count,
    sharded_build,
)
from pipeline.clients import default_client
from pipeline.errors import SchemaError
from pipeline.read.records import ColumnSpec
from pipeline.sources import local_roots

WRITER_PRIORITY = 100  # run a ready writer task before more decoding on its worker


class Build(DaskMethodsMixin):
    """A bank build as a Dask collection: computing it builds the bank.

    ``dask.compute(build)``, ``build.compute()`` and ``client.compute(build)``
    all work; the result is a :class:`pipeline.build.summary.BuildSummary`. Attributes
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
        chains: list[BuildPlan] | None = None,
        writers: list[str | None] | None = None,
    ) -> None:
        self._final = final
        self.write_keys = write_keys
        self.partitions = partitions
        self.plan = plan
        self.writer = writer
        self.chains = chains if chains is not None else [plan]
        self.writers = writers if writers is not None else [writer]
        self.local_roots: list[str] = []  # local source paths every worker must see

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
        tokens = [chain.token for chain in self.chains]
        for token in tokens:
            abort_build(token)
        if client is None:
            client = default_client()
        if client is not None:
            for token in tokens:
                client.run(abort_build, token)

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
        if len(self.chains) > 1:
            where = f", {len(self.chains)} shards"
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
        self.name = f"h5bank-build-{token}"
        self.tasks: dict[str, Any] = {}
        self.context = dask.get_annotations()
        self.annotations: dict[str, dict[str, Any]] = {
            "workers": {},
            "allow_other_workers": {},
            "priority": {},
        }
        self.chain(writer, decoders)

    def chain(self, writer: str | None, decoders: list[str] | None = None) -> None:
        """Pin the tasks added from now on to ``writer``, and place them over ``decoders``
        (a sharded build adds one writer chain after another)."""
        self.schedule = decode_schedule(decoders, writer) if decoders and writer is not None else []
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


def build_graph(
    features: Mapping[str, Feature],
    bases: Mapping[str, str],
    path: str | os.PathLike[str],
    sources: Any,
    options: BuildOptions,
    *,
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
    path = os.path.abspath(os.fspath(path))
    threads = threads or os.cpu_count() or 1
    mode = options.mode
    reads_bytes = any(feature.reads_bytes for feature in features.values())

    def partition(skip: set[str]) -> tuple[list[Partition], int]:
        return partition_sources(
            sources, options.storage_options, options.partition_size, threads, skip, reads_bytes
        )

    provenance = {"mode": mode, "sources": describe_sources(sources)}
    roots = local_roots(sources)
    workers = len(set(decoders)) if decoders else 1
    made_here: tuple[list[Partition], int] | None = None
    shards = options.shards
    if shards == "auto" and not (options.resume_shards or sharded_build(path, mode, 1)):
        made_here = partition(committed_ids(path) if mode == "a" else set())
        shards = auto_shards(workers, sum(len(p) for p in made_here[0]))
    shards = resolve_count(shards, workers)
    if sharded_build(path, mode, shards) or options.resume_shards:

        def once(skip: set[str]) -> tuple[list[Partition], int]:
            return made_here if made_here is not None and not skip else partition(skip)

        made = _sharded(features, bases, path, options, shards, once, provenance, writer, threads, decoders)  # fmt: skip
    else:
        partitions, skipped = made_here or partition(committed_ids(path) if mode == "a" else set())
        sizes = [len(p) for p in partitions]
        plan = _plan(options, path, mode, dict(features), sizes, skipped, writer, provenance)
        decode = _decoder(features, bases, options, plan.token, partitions)
        pace = (_window(options, writer, decoders, threads), _lanes(writer, threads))
        made = writer_chain(plan, writer, decoders, sizes, pace, decode, write_partition)
    made.local_roots = roots
    return made


def _window(
    options: BuildOptions, writer: str | None, decoders: list[str] | None, threads: int
) -> int | None:
    """Decoded partitions that may wait for a chain's writer: ``h5bank.build.max-pending``,
    else 2 x the threads decoding for it (``decoders``, else all ``threads``); none on a
    cluster still growing (a writer but no decode placement: see the module docstring)."""
    if options.max_pending is not None:
        return options.max_pending
    if writer is None or decoders:
        return 2 * (len(decoders) if decoders else threads)
    return None


def _lanes(writer: str | None, threads: int) -> int | None:
    """Decode lanes of a chain: one per thread when it runs in this process (no ``writer``
    worker: see the module docstring), none on a cluster (a dependency would move data)."""
    return threads if writer is None else None


def _decoder(
    features: Mapping[str, Feature],
    bases: Mapping[str, str],
    options: BuildOptions,
    token: str,
    partitions: list[Partition],
) -> Any:
    """``produce`` of a build's writer chain (:func:`writer_chain`): decode partition ``k``."""
    storage_options = dict(options.storage_options)
    fetch_settings = dict(options.fetch)

    def decode(k: int, graph: Graph, after: TaskRef | None) -> TaskRef:
        return graph.add(
            Task(
                f"h5bank-decode-{k}-{token}", decode_partition, partitions[k], graph.constant("features", dict(features)),
                dict(bases), storage_options, after, fetch_settings,
            ),
            place=k,
        )  # fmt: skip

    return decode


def _sharded(
    features: Mapping[str, Feature],
    bases: Mapping[str, str],
    path: str,
    options: BuildOptions,
    shards: int,
    partition: Any,
    provenance: dict[str, Any],
    writer: str | None,
    threads: int,
    decoders: list[str] | None,
) -> Build:
    """The graph of a sharded build (:mod:`pipeline.build.shards`): a writer chain per shard,
    each pinned to its own worker and fed by that worker's decode tasks, then the index."""
    sharded = plan_shards(path, options.mode, shards, partition, options.resume_shards)
    chains = sharded.chains
    placed = assign_workers(len(chains), writer, decoders) or [(writer, None)]
    sizes = [len(p) for chain in chains for p in chain.partitions]
    plan = _plan(
        options,
        path,
        options.mode,
        dict(features),
        sizes,
        sharded.skipped,
        placed[0][0],
        provenance,
    )
    graph = Graph(plan.token, None)
    write_keys: list[str] = []
    finals: list[TaskRef] = []
    plans: list[BuildPlan] = []
    for shard, (pinned, feeding) in zip(chains, placed[: len(chains)], strict=True):
        chain = chain_plan(plan, shard, sharded.base)
        chain.pinned = pinned is not None
        graph.chain(pinned, feeding)
        pace = (_window(options, pinned, feeding, threads), _lanes(pinned, threads))
        decode = _decoder(features, bases, options, chain.token, shard.partitions)
        part_sizes = [len(p) for p in shard.partitions]
        writes, final = chain_tasks(graph, chain, part_sizes, pace, decode, write_partition)
        write_keys += [w.key for w in writes]
        finals.append(final)
        plans.append(chain)
    graph.chain(placed[0][0])
    listed = [*sharded.kept, *(chain.path for chain in chains)]
    index = graph.add(
        Task(
            f"h5bank-index-{plan.token}", finish_sharded, graph.constant("plan", plan), listed,
            sharded.skipped, *finals,
        ),
        pinned=True,
    )  # fmt: skip
    return Build(
        graph.delayed(index.key), write_keys, sizes, plan, placed[0][0],
        chains=plans, writers=[w for w, _ in placed[: len(chains)]],
    )  # fmt: skip


def _plan(
    options: BuildOptions,
    path: str,
    mode: str,
    features: dict[str, Feature],
    sizes: list[int],
    skipped: int,
    writer: str | None,
    provenance: dict[str, Any],
) -> BuildPlan:
    """The plan of a new writer chain over partitions of ``sizes``, with ``options``' settings;
    ``provenance`` is completed with the partitions and ``on_error``."""
    return BuildPlan(
        token=uuid.uuid4().hex,
        path=path,
        mode=mode,
        features=features,
        on_error=options.on_error,
        provenance={**provenance, "partitions": len(sizes), "on_error": options.on_error},
        skipped=skipped,
        pinned=writer is not None,
        planned=sum(sizes),
        chunk_bytes=options.chunk_bytes,
        fsync=options.fsync,
    )


def decode_schedule(decoders: list[str], writer: str) -> list[str]:
    """Decode task ``k`` goes to entry ``k % len``: every worker thread in turn, 8 times, less
    one turn per thread of the writer's worker, which also writes (about an eighth of a core
    in a build of small images, measured)."""
    schedule = [worker for _ in range(8) for worker in decoders]
    for _ in range(decoders.count(writer)):
        if len(set(schedule)) > 1:
            del schedule[len(schedule) - 1 - schedule[::-1].index(writer)]
    return schedule


def writer_chain(
    plan: BuildPlan,
    writer: str | None,
    decoders: list[str] | None,
    sizes: list[int],
    pace: tuple[int | None, int | None],
    produce: Any,
    link: Any,
) -> Build:
    """``open ─▶ link(produce(0)) ─▶ ... ─▶ link(produce(N-1)) ─▶ finalize``, as a :class:`Build`.

    ``produce(k, graph, after)`` adds to ``graph`` (a :class:`Graph`) the
    tasks whose result the ``k``-th link writes, and returns a reference to
    it. ``pace`` is ``(window, lanes)``: ``after`` is link ``k - window``
    (back-pressure) and the result of ``produce(k - lanes)`` (in-process
    schedulers: see the module docstring), each when set and ``k`` is past
    it; ``None`` when neither applies. A task it adds with ``place=k`` goes where the decode
    schedule over ``decoders`` says. Open, the links and finalize are pinned
    to ``writer``.
    """
    graph = Graph(plan.token, writer, decoders)
    writes, final = chain_tasks(graph, plan, sizes, pace, produce, link)
    return Build(graph.delayed(final.key), [w.key for w in writes], sizes, plan, writer)


def chain_tasks(
    graph: Graph,
    plan: BuildPlan,
    sizes: list[int],
    pace: tuple[int | None, int | None],
    produce: Any,
    link: Any,
) -> tuple[list[TaskRef], TaskRef]:
    """Add one writer chain to ``graph`` (see :func:`writer_chain`); return its link tasks
    and its finalize task."""
    token = plan.token
    plan_ref = graph.constant(f"plan-{token}", plan)
    state = graph.add(Task(f"h5bank-open-{token}", open_build, plan_ref), pinned=True)
    window, lanes = pace
    writes: list[TaskRef] = []
    results: list[TaskRef] = []
    for k in range(len(sizes)):
        waits = [writes[k - window]] if window and k >= window else []
        waits += [results[k - lanes]] if lanes and k >= lanes else []
        after = List(*waits) if len(waits) > 1 else (waits[0] if waits else None)
        result = produce(k, graph, after)
        results.append(result)
        state = graph.add(
            Task(f"h5bank-write-{k}-{token}", link, plan_ref, result, state, k), pinned=True
        )
        writes.append(state)
    final = graph.add(
        Task(f"h5bank-finalize-{token}", finalize_build, plan_ref, state), pinned=True
    )
    return writes, final


def map_graph(
    path: str | os.PathLike[str],
    func: Any,
    columns: list[ColumnSpec],
    partitions: list[Any],
    output: str,
    feature: Feature | None,
    options: BuildOptions,
    *,
    skipped: int = 0,
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
    window = options.max_pending or 2 * threads
    sizes = [len(p) for p in partitions]
    name = getattr(func, "__qualname__", None) or type(func).__name__
    provenance = {
        "mode": "map",
        "function": f"{getattr(func, '__module__', '')}.{name}".lstrip("."),
        "inputs": [spec.path for spec in columns],
        "output": output,
    }
    features = {output: feature} if feature is not None else {}
    plan = _plan(options, path, "a", features, sizes, skipped, writer, provenance)
    token = plan.token

    def read_and_map(k: int, graph: Graph, after: TaskRef | None) -> TaskRef:
        opened = TaskRef(f"h5bank-open-{token}")
        records = graph.add(
            Task(
                f"h5bank-read-{k}-{token}", read_partition, graph.constant(f"plan-{token}", plan), opened,
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

    pace = (window, _lanes(writer, threads))
    return writer_chain(plan, writer, decoders, sizes, pace, read_and_map, attach_partition)
