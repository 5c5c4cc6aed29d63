"""Reading sources' values by row: what bags and ``bank.map`` read."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from features.base import Feature
from pipeline import config
from pipeline.errors import BankChangedError
from pipeline.files.cache import Expect, LazyFile
from pipeline.format import layout
from pipeline.format.rows import one_request
from pipeline.format.storage import kind as storage_kind
from pipeline.schema import owner_path
from pipeline.urls import redact

# Sources per partition of a per-source bag at most: each becomes a Python
# object in the partition's list, so bytes alone would make label bags huge.
MAX_PARTITION_SOURCES = 10_000


@dataclass(frozen=True)
class ColumnSpec:
    """What a task needs to read one column per source: its path, storage, feature.

    ``expect`` is what the column's ``data`` held when the task was planned
    (checked on read, like a dask array's blocks); ``None`` skips the check.
    """

    key: str  # the name the value gets in the dict handed out (the path the caller used)
    path: str
    storage: str
    feature: Feature
    expect: Expect | None = None


def stored_value(
    feature: Feature, storage: str, block: np.ndarray, shape: tuple[int, ...] | None, id_: str
) -> Any:
    """One source's value as reads return it, from its rows of a column's ``data``.

    Shorthand for ``kind(storage).value(...)`` (:meth:`StorageKind.value
    <pipeline.format.storage.StorageKind.value>`) for callers that hold the
    storage name.
    """
    return storage_kind(storage).value(feature, block, shape, id_)


@dataclass
class RawRows:
    """Sources' data as stored, read for :func:`decode_rows`: ids, and per column each
    source's rows and shape (``None`` where it has no data)."""

    ids: list[str]
    columns: list[list[tuple[np.ndarray, tuple[int, ...] | None] | None]]


def read_raw(f: h5py.File, columns: Sequence[ColumnSpec], rows: Sequence[int]) -> RawRows:
    """The stored data of the sources at ``rows`` (sorted) that have data in every column.

    Each column is read in one request spanning the rows' data when their
    data is about contiguous (a built bank), else source by source. Nothing
    is decoded: :func:`decode_rows` does that, wherever it runs.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return RawRows([], [[] for _ in columns])
    first, last = int(rows[0]), int(rows[-1]) + 1
    ids = layout.read_strings(layout.ids_table(f), first, last)
    offsets = rows - first
    blocks: list[list[Any]] = []
    keep = np.ones(len(rows), dtype=bool)
    for spec in columns:
        column = layout.Column.open(f, spec.path)
        problem = spec.expect.problem(Expect.of(column.data)) if spec.expect else None
        if problem:
            raise BankChangedError(
                f"{redact(f.filename)}: {spec.path} no longer holds what this Dask graph was made from "
                f"({problem}): make it again from the bank as it is now"
            )
        refs = column.refs[first:last][offsets]
        keep &= refs[:, 0] >= 0
        shapes = column.shape[first:last][offsets] if column.shape is not None else None
        blocks.append(_read_column(column, refs, shapes))
    chosen = np.flatnonzero(keep)
    return RawRows(
        [ids[offsets[i]] for i in chosen], [[column[i] for i in chosen] for column in blocks]
    )


def _read_column(
    column: layout.Column, refs: np.ndarray, shapes: np.ndarray | None
) -> list[tuple[np.ndarray, tuple[int, ...] | None] | None]:
    have = refs[:, 0] >= 0
    out: list[Any] = [None] * len(refs)
    if not have.any():
        return out
    starts, stops = refs[have, 0], refs[have, 1]
    low, high = int(starts.min()), int(stops.max())
    needed = int((stops - starts).sum())
    row_bytes = column.data.dtype.itemsize * math.prod(column.data.shape[1:])
    block = column.data[low:high] if one_request(low, high, needed, row_bytes) else None
    for i in np.flatnonzero(have):
        start, stop = int(refs[i, 0]), int(refs[i, 1])
        rows = block[start - low : stop - low] if block is not None else column.data[start:stop]
        shape = None if shapes is None else tuple(int(s) for s in shapes[i] if s >= 0)
        out[i] = (rows, shape)
    return out


def decode_rows(
    columns: Sequence[ColumnSpec], raw: RawRows | None
) -> list[tuple[str, dict[str, Any]]]:
    """``(id, {key: value})`` for each source of ``raw``, values as ``proxy.get`` returns them."""
    if raw is None:
        return []
    kinds = [storage_kind(spec.storage) for spec in columns]
    out = []
    for i, id_ in enumerate(raw.ids):
        values = {}
        for spec, kind, column in zip(columns, kinds, raw.columns, strict=True):
            block, shape = column[i]
            values[spec.key] = kind.value(spec.feature, block, shape, id_)
        out.append((id_, values))
    return out


def read_rows(
    f: h5py.File, columns: Sequence[ColumnSpec], rows: Sequence[int]
) -> list[tuple[str, dict[str, Any]]]:
    """``(id, {key: value})`` of the sources at ``rows`` (sorted) with data in every column."""
    return decode_rows(columns, read_raw(f, columns, rows))


def read_rows_lazily(
    lazy: LazyFile, columns: Sequence[ColumnSpec], rows: Sequence[int]
) -> list[tuple[str, dict[str, Any]]]:
    """:func:`read_rows` through this process's cached handle of ``lazy``."""
    with lazy.acquire() as f:
        return read_rows(f, columns, rows)


def _single_values(
    lazy: LazyFile, columns: Sequence[ColumnSpec], rows: Sequence[int]
) -> list[tuple[str, Any]]:
    (spec,) = columns
    return [(id_, values[spec.key]) for id_, values in read_rows_lazily(lazy, columns, rows)]


def partition_rows(rows: Sequence[int], size: int) -> list[Sequence[int]]:
    """``rows`` (an array or a ``range``) cut into consecutive pieces of at most ``size``."""
    size = max(1, int(size))
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def rows_per_partition(f: h5py.File, paths: Sequence[str], n_sources: int) -> int:
    """Sources per partition so that one partition reads about ``h5bank.read.chunk-bytes``."""
    target = int(config.get("read.chunk-bytes"))
    per_source = 0.0
    for path in paths:
        data = f[path][layout.DATA]
        per_source += data.shape[0] * max(1, math.prod(data.shape[1:])) * data.dtype.itemsize
    per_source = per_source / max(1, n_sources)
    by_bytes = target // max(1, int(per_source)) if per_source else MAX_PARTITION_SOURCES
    return int(max(1, min(MAX_PARTITION_SOURCES, by_bytes)))


def source_bag(
    lazy: LazyFile,
    columns: Sequence[ColumnSpec],
    rows: Sequence[int],
    partition_size: int,
    single: bool = False,
) -> Any:
    """A ``dask.bag`` of ``(id, value)`` (``single``) or ``(id, {key: value})`` for ``rows``.

    One partition per ``partition_size`` consecutive rows; a partition is one
    task that opens the bank once (per process) and reads each column's span.
    """
    import dask.bag as db
    from dask.delayed import delayed

    reader = _single_values if single else read_rows_lazily
    parts = [
        delayed(reader, pure=True, traverse=False)(lazy, list(columns), piece)
        for piece in partition_rows(rows, partition_size)
    ]
    if not parts:
        return db.from_sequence([], npartitions=1)
    return db.from_delayed(parts)


def columns_for(
    features: Mapping[str, Feature], f: h5py.File, paths: Mapping[str, str]
) -> list[ColumnSpec]:
    """A :class:`ColumnSpec` for each ``{key: column path}``, from the bank's features."""
    specs = []
    for key, path in paths.items():
        column = layout.Column.open(f, path)
        owner = owner_path(path, features)
        specs.append(ColumnSpec(key, path, column.storage, features[owner], Expect.of(column.data)))
    return specs
