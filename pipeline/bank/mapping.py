"""``bank.map``: a function over every source, on the cluster; results returned or written back.

Without an output, each task reads its sources through this process's cached
handle on the bank (:func:`~pipeline.build.decode.map_rows`) and returns the
results. With one, the bank is written by a build's writer chain
(:func:`~pipeline.build.graph.map_graph`): the bank is renamed to its partial
path while the chain runs, and put back as of its last commit if the map fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import posixpath
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from features.base import Feature
from pipeline.bank.catalog import Catalog
from pipeline.build.chain import restore_after_failure
from pipeline.build.decode import map_rows
from pipeline.build.graph import map_graph
from pipeline.build.options import BuildOptions
from pipeline.build.shards import merged_summary
from pipeline.build.summary import BuildSummary, Failure
from pipeline.errors import ReadOnlyError
from pipeline.files.cache import LazyFile
from pipeline.format import layout
from pipeline.format.shards import listed_shards, write_index
from pipeline.read.records import ColumnSpec, columns_for, partition_rows, rows_per_partition
from pipeline.run.runner import runner_for


class MapResult(dict):
    """What ``bank.map(func)`` without an output returns: ``{id: func(data)}`` in bank order.

    ``failures`` lists the sources whose call raised (id, ``""``, the error).
    """

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[Failure] = []

    def __repr__(self) -> str:
        return f"<MapResult: {len(self)} results, {len(self.failures)} failures>"


def map_bank(
    catalog: Catalog,
    close: Callable[[], None],
    func: Any,
    inputs: str | list[str] | None,
    output: str | None,
    feature: Feature | None,
    scheduler: Any,
    partition_size: int | None,
    options: BuildOptions,
    open_shard: Callable[[str], Any] | None = None,
) -> MapResult | BuildSummary:
    """``bank.map``: apply ``func`` to each source's data in parallel, on the cluster.

    ``catalog`` is the bank object's; ``close()`` closes the bank object while the map runs;
    ``options`` holds ``on_error``, ``progress`` and ``max_pending``, resolved. The
    parameters below are those of ``bank.map``.

    Parameters
    ----------
    func
        Called as ``func({input: value})`` once per source, on any worker
        (so it must be picklable); values are what ``proxy.get(id)``
        returns. Only sources with data for every input are passed.
    inputs
        Feature column paths (``"images"``, ``"data/images"``), one or a
        list; ``None`` means every column of the bank. Keys of the dict
        ``func`` receives are these paths as given.
    output
        ``None``: return the results, ``{id: result}`` (a :class:`MapResult`,
        whose ``failures`` lists the calls that raised). A path: write the
        results into this bank as a new feature, aligned with the sources,
        through the build's single writer (the bank is renamed to its
        partial path meanwhile, as during an append), and return the
        :class:`~pipeline.build.summary.BuildSummary`. Sources that already have
        data in ``output`` are skipped, so running a map again after it
        stopped fills in only what is missing. A result of ``None`` stores
        nothing for that source.
    feature
        How ``output`` is stored (``Array(flat=True)``, ``Image(...)``
        for ``item`` storage...). Default: the bank's feature at
        ``output`` if it has one, else chosen from the first result
        (``Array`` for arrays, ``String`` for text, ``Bytes`` for bytes).
    scheduler, progress, max_pending
        As for :meth:`create`.
    open_shard
        Opens a shard file as the bank's type: a sharded bank is mapped shard by shard
        (:func:`map_shards`).
    partition_size
        Sources per task; default about ``h5bank.read.chunk-bytes`` of
        input per task, and at least 4 tasks per worker thread.
    on_error
        ``"skip"`` (default) records a source whose call raised (in
        ``bank.failures()`` with ``output`` as its feature, or in the
        result's ``failures``) and goes on; ``"raise"`` stops at the first
        with :class:`~pipeline.errors.SourceError`.

    Notes
    -----
    The bank is closed while the map runs and reopened in its mode after.
    If a map with an output fails, the bank is put back as of its last
    commit before the error is raised: the results written so far stay.
    """
    handle = catalog.handle
    if output is not None and open_shard is not None and layout.shard_names(catalog.file):
        return map_shards(
            catalog, close, open_shard, func, inputs, output, feature, scheduler, partition_size,
            options,
        )  # fmt: skip
    progress = options.progress
    keys = _inputs(catalog, inputs)
    columns = columns_for(catalog.features, catalog.file, keys)
    have = np.ones(catalog.count(), dtype=bool)
    for path in keys.values():
        have &= catalog.require_column(path).refs[: len(have), 0] >= 0
    skipped = 0
    if output is not None:
        output = _output(catalog, output, keys)
        existing = catalog.column(output)
        if existing is not None:
            done = existing.refs[: len(have), 0] >= 0
            skipped = int((have & done).sum())
            have &= ~done
        if feature is None and (existing is not None or output in catalog.features):
            feature = catalog.feature_of(output)
    if output is not None and handle.remote:
        raise ReadOnlyError(
            f"{handle.shown} is a remote bank: map its sources without output=, or "
            "copy it to a local path to write a feature into it"
        )
    rows = np.flatnonzero(have)
    per_partition = partition_size or rows_per_partition(
        catalog.file, list(keys.values()), catalog.count()
    )
    started = time.perf_counter()
    with runner_for(scheduler, progress=progress) as runner:
        if partition_size is None:
            spread = math.ceil(len(rows) / (4 * runner.threads)) if len(rows) else 1
            per_partition = max(1, min(per_partition, spread))
        parts = partition_rows(rows, per_partition)
        lazy = handle.lazy_file()
        close()
        try:
            if output is None:
                result = _collect(catalog, runner, func, lazy, columns, parts, options)
            else:
                result = _write(
                    catalog, runner, func, columns, parts, output, feature, skipped, options,
                )  # fmt: skip
        except BaseException:
            with contextlib.suppress(Exception):
                runner.release(handle.path)
                handle.reopen()
            raise
        runner.release(handle.path)  # the workers' read handles would refuse a writable reopen
        handle.reopen()
    if output is None:
        return result
    result.seconds = time.perf_counter() - started
    if progress:
        print(result, file=sys.stderr)
    return result


def map_shards(
    catalog: Catalog,
    close: Callable[[], None],
    open_shard: Callable[[str], Any],
    func: Any,
    inputs: str | list[str] | None,
    output: str,
    feature: Feature | None,
    scheduler: Any,
    partition_size: int | None,
    options: BuildOptions,
) -> BuildSummary:
    """``bank.map(..., output=...)`` of a sharded bank: the map of each shard in turn (each a
    bank of its own, written by its own writer chain, on the whole cluster), then the index
    written again over the shards as they are, also when a shard's map failed (the results
    the shards kept are then in the bank; running the map again fills in the rest).
    ``open_shard(path)`` opens a shard as the bank's type; the rest is :func:`map_bank`'s."""
    handle = catalog.handle
    index = handle.path
    shards = listed_shards(index)
    f = catalog.file
    provenance = layout.read_json_attr(f, layout.ATTR_PROVENANCE)
    identity = layout.bank_uuid(f)
    started = time.perf_counter()
    close()  # and its shards
    summaries: list[BuildSummary] = []
    quiet = dataclasses.replace(options, progress=False)
    try:
        with runner_for(scheduler, progress=options.progress) as runner:
            runner.release(index)  # cached readers of the bank, here and on the workers
            where = runner.client if runner.client is not None else runner.local
            for shard in shards:
                with open_shard(shard) as part:
                    catalog_of_shard = part._parts.catalog
                    args = (func, inputs, output, feature, where, partition_size, quiet)
                    summaries.append(map_bank(catalog_of_shard, part.close, *args))
    finally:
        ok, failed = sum(s.ok for s in summaries), sum(s.failed for s in summaries)
        provenance.setdefault("builds", []).append(
            {"mode": "map", "output": output, "shards": len(summaries), "ok": ok, "failed": failed}
        )
        write_index(index, shards, provenance, identity)
        handle.reopen()
    result = merged_summary(index, summaries, summaries[0].action if summaries else "mapped")
    result.seconds = time.perf_counter() - started
    if options.progress:
        print(result, file=sys.stderr)
    return result


def _inputs(catalog: Catalog, inputs: str | list[str] | None) -> dict[str, str]:
    """``{key: column path}`` for ``map``'s ``inputs``."""
    available = list(layout.iter_columns(catalog.file)) if layout.is_bank(catalog.file) else []
    if inputs is None:
        if not available:
            raise ValueError(f"{catalog.handle.shown} has no feature columns to map over")
        return {path: path for path in available}
    names = [inputs] if isinstance(inputs, str) else list(inputs)
    out: dict[str, str] = {}
    for name in names:
        path = str(name).strip("/")
        if path not in available:
            raise ValueError(
                f"map input {name!r} is not a feature column of {catalog.handle.shown}; "
                f"its columns are {available}"
            )
        out[str(name)] = path
    if not out:
        raise ValueError("map needs at least one input feature")
    return out


def _output(catalog: Catalog, output: str, inputs: Mapping[str, str]) -> str:
    path = str(output).strip("/")
    problem = layout.column_path_problem(path)
    if problem:
        raise ValueError(f"map output {output!r} is not a usable feature path: {problem}")
    if path in inputs.values():
        raise ValueError(f"map output {output!r} is also an input; write to a new feature")
    node = catalog.file.get(path)
    if node is not None and not layout.is_column(node):
        raise ValueError(
            f"map output {output!r} is already a group or dataset of {catalog.handle.shown} that is not "
            "a feature column; choose another path"
        )
    parts = path.split("/")
    inside = [
        p
        for i in range(1, len(parts))
        if layout.is_column(catalog.file.get(p := "/".join(parts[:i])))
    ]
    if inside:
        raise ValueError(
            f"map output {output!r} would be inside the column {inside[0]!r}; choose a path "
            "beside it (e.g. 'derived/...')"
        )
    return path


def _collect(
    catalog: Catalog,
    runner: Any,
    func: Any,
    lazy: LazyFile,
    columns: list[ColumnSpec],
    parts: list[np.ndarray],
    options: BuildOptions,
) -> MapResult:
    from dask.delayed import delayed

    func_task = delayed(func, traverse=False)
    tasks = [
        delayed(map_rows, pure=False)(func_task, lazy, columns, rows, options.on_error)
        for rows in parts
    ]
    done = runner.gather(
        tasks,
        [len(p) for p in parts],
        f"h5bank map {posixpath.basename(catalog.handle.shown)}",
        options.progress,
    )
    result = MapResult()
    for pairs, failures in done:
        result.update(pairs)
        result.failures.extend(failures)
    return result


def _write(
    catalog: Catalog,
    runner: Any,
    func: Any,
    columns: list[ColumnSpec],
    parts: list[np.ndarray],
    output: str,
    feature: Feature | None,
    skipped: int,
    options: BuildOptions,
) -> BuildSummary:
    build = map_graph(
        catalog.handle.path,
        func,
        columns,
        parts,
        output,
        feature,
        options,
        skipped=skipped,
        writer=runner.writer_worker(),
        threads=runner.threads,
        decoders=runner.decode_workers(),
    )
    try:
        return runner.run(build, progress=options.progress)
    except BaseException as error:
        restore_after_failure(build.path, error)
        raise
