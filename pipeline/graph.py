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
import functools
import math
import os
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import dask
import h5py
from dask.base import DaskMethodsMixin
from dask.delayed import Delayed, delayed

from features.base import Feature
from pipeline import config, layout
from pipeline.decode import Failure, Partition, decode_partition, map_partition
from pipeline.errors import DuplicateIdError, SchemaError
from pipeline.readers import ColumnSpec
from pipeline.sources import SourceSpec, expand, redact
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


def _pinned(writer: str | None) -> contextlib.AbstractContextManager[Any]:
    """Annotations that keep a writer-chain task on the writer's worker (none in-process)."""
    if writer is None:
        return contextlib.nullcontext()
    return dask.annotate(workers=[writer], allow_other_workers=False, priority=WRITER_PRIORITY)


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

    The default size spreads a known list over 4 tasks per worker thread, at
    most 256 sources a task when sources are fetched (a partition of images
    is tens of milliseconds of work) and at most 4,096 when no feature reads
    bytes (sources made from their ids cost microseconds each, and Dask's
    per-task cost would dominate: a million 16-float sources went at 24,000/s
    in tasks of 256, 62,000/s in tasks of 2,048).

    Duplicate ids in a list known up front raise :class:`DuplicateIdError`
    before anything is built; in a stream, the later duplicate becomes a
    failure and the first one is kept.
    """
    known = isinstance(sources, (str, os.PathLike, list, tuple))
    specs: Iterable[SourceSpec] = expand(sources, storage_options)
    if known:
        specs = list(specs)
    if partition_size is None:
        partition_size = config.get("build.partition-size")
    if partition_size is None:
        partition_size = 256 if reads_bytes else 4096
        if known:
            spread = math.ceil(len(specs) / (4 * max(threads, 1)))
            partition_size = max(1, min(partition_size, spread))
    if partition_size < 1:
        raise ValueError(f"partition_size must be at least 1, got {partition_size}")
    seen: dict[str, str | None] = {}  # id -> where its first source is
    duplicates: list[str] = []
    skipped = 0
    partitions: list[Partition] = [Partition(0, [])]
    for spec in specs:
        current = partitions[-1]
        if len(current) >= partition_size:
            current = Partition(len(partitions), [])
            partitions.append(current)
        if spec.id in skip:
            skipped += 1
        elif spec.id in seen:
            first, this = seen[spec.id], spec.url
            both = f" ({redact(first)} and {redact(this)})" if first and this else ""
            if known:
                duplicates.append(f"{spec.id!r}{both}")
            else:
                which = f" ({redact(first)})" if first else ""
                current.failures.append(
                    Failure(
                        spec.id,
                        "",
                        f"DuplicateIdError: an earlier source of this build{which} has the same "
                        f"id; the first one is kept"
                        + (f", this one ({redact(this)}) is not" if this else ""),
                    )
                )
        else:
            seen[spec.id] = spec.url
            current.specs.append(spec)
    if duplicates:
        shown = ", ".join(duplicates[:10])
        more = f" and {len(duplicates) - 10} more" if len(duplicates) > 10 else ""
        raise DuplicateIdError(
            f"{len(duplicates)} duplicate source ids, nothing was written: {shown}{more}. Files "
            "found under a directory or glob get ids relative to it, so two roots holding the same "
            "relative path collide; build them into separate groups or give explicit paths"
        )
    return [p for p in partitions if len(p)], skipped


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
    )

    features_task = delayed(dict(features), name=f"h5bank-features-{token}", traverse=False)
    options = dict(storage_options or {})
    fetch_settings = config.section("fetch")

    schedule = _decode_schedule(decoders, writer) if decoders and writer is not None else []

    def decode(k: int, plan_task: Delayed, opened: Delayed, after: Delayed | None) -> Delayed:
        where = (
            dask.annotate(workers=[schedule[k % len(schedule)]], allow_other_workers=True)
            if schedule
            else contextlib.nullcontext()
        )
        with where:
            return delayed(decode_partition, pure=False)(
                partitions[k], features_task, dict(bases), options, after, fetch_settings,
                dask_key_name=f"h5bank-decode-{k}-{token}",
            )  # fmt: skip

    return writer_chain(plan, writer, [len(p) for p in partitions], window, decode, write_partition)


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
    sizes: list[int],
    window: int | None,
    produce: Any,
    link: Any,
) -> Build:
    """``open ─▶ link(produce(0)) ─▶ ... ─▶ link(produce(N-1)) ─▶ finalize``, as a :class:`Build`.

    ``produce(k, plan_task, opened, after)`` makes the task whose result the
    ``k``-th link writes (it runs anywhere; ``after`` is link ``k - window``,
    for back-pressure, or ``None`` without a window). Open, the links and
    finalize are pinned to ``writer``.
    """
    pinned = functools.partial(_pinned, writer)
    token = plan.token
    plan_task = delayed(plan, name=f"h5bank-plan-{token}", traverse=False)
    with pinned():
        opened = delayed(open_build, pure=False)(plan_task, dask_key_name=f"h5bank-open-{token}")
    state = opened
    writes: list[Delayed] = []
    for k in range(len(sizes)):
        after = writes[k - window] if window and k >= window else None
        result = produce(k, plan_task, opened, after)
        with pinned():
            state = delayed(link, pure=False)(
                plan_task, result, state, k, dask_key_name=f"h5bank-write-{k}-{token}"
            )
        writes.append(state)
    with pinned():
        final = delayed(finalize_build, pure=False)(
            plan_task, state, dask_key_name=f"h5bank-finalize-{token}"
        )
    return Build(final, [w.key for w in writes], sizes, plan, writer)


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
    are arrays of source rows; read ``k+W`` waits for attach ``k``.
    """
    path = os.path.abspath(os.fspath(path))
    threads = threads or os.cpu_count() or 1
    window = config.get("build.max-pending", max_pending) or 2 * threads
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
    )
    func_task = delayed(func, name=f"h5bank-function-{token}", traverse=False)
    pinned = functools.partial(_pinned, writer)

    def read_and_map(k: int, plan_task: Delayed, opened: Delayed, after: Delayed | None) -> Delayed:
        with pinned():
            records = delayed(read_partition, pure=False)(
                plan_task, opened, columns, partitions[k], after,
                dask_key_name=f"h5bank-read-{k}-{token}",
            )  # fmt: skip
        return delayed(map_partition, pure=False)(
            func_task, columns, records, output, feature, k, dask_key_name=f"h5bank-map-{k}-{token}"
        )

    sizes = [len(p) for p in partitions]
    return writer_chain(plan, writer, sizes, window, read_and_map, attach_partition)
