"""Checking a bank's structure (and, with ``data``, every chunk) against the format."""

from __future__ import annotations

import os
from collections.abc import Iterator

import h5py
import numpy as np

from pipeline.errors import FormatVersionError, NotABankError, SchemaError
from pipeline.format.layout import (
    ATTR_COMMITTED,
    BUILDING,
    COMPLETE,
    FAILURES,
    IDS,
    Column,
    category_names,
    check_format,
    committed,
    failure_tables,
    ids_table,
    iter_columns,
    read_strings,
    shard_names,
    state,
    stored_shape,
)
from pipeline.format.trust import declared_problems, outside_pointers


def bank_problems(
    f: h5py.File, data: bool = False, stopped: bool = False, allow_external: bool = False
) -> Iterator[str]:
    """The structural problems of the bank ``f``, first found first (nothing for a sound bank).

    Checks the format and version, that the build finished, that every refs
    and shape table has one row per committed id, that refs lie inside
    ``data``, agree with their storage kind and shape, and do not overlap,
    and that the failure tables agree. With ``data``, every chunk of every
    dataset is read back (HDF5 checks fletcher32 checksums where enabled) and
    label codes are checked against their names.

    With ``stopped``, ``f`` is the partial file of a build that stopped: what
    its id table commits must be sound (that is what a resume keeps), and
    rows a stopped commit wrote past it are allowed (a resume cuts them).

    First of all (once the format attributes say ``f`` is a bank), pointers
    out of the file (unless ``allow_external``) and sizes it declares but does
    not store (:mod:`pipeline.format.trust`) are problems, and nothing more
    is checked: that would follow or allocate them.
    """
    try:
        check_format(f)
        refused = [] if allow_external else [str(p) for p in outside_pointers(f)]
        refused = refused or [p for p, _ in zip(declared_problems(f), range(1), strict=False)]
    except (NotABankError, FormatVersionError) as error:
        refused = [str(error)]
    except Exception as error:
        refused = [f"HDF5 cannot read its structure ({type(error).__name__}: {error})"]
    if refused:
        yield from refused
        return
    if stopped:
        if state(f) != BUILDING:
            yield f"it is not a stopped build (state {state(f)!r})"
    elif state(f) != COMPLETE:
        yield f"its build has not finished (state {state(f)!r})"
    rows = ids_table(f).shape[0]
    counter = f.attrs.get(ATTR_COMMITTED)
    if counter is not None and (int(counter) > rows or (int(counter) != rows and not stopped)):
        yield f"{ATTR_COMMITTED} is {int(counter)} but {IDS} has {rows} rows"
        return
    n = committed(f)
    ids = read_strings(ids_table(f), 0, n)
    if len(set(ids)) != n:
        seen: set[str] = set()
        duplicate = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        yield f"{IDS}: the id {duplicate!r} is committed twice"
    lengths = {t.name: t.shape[0] for t in failure_tables(f)}
    if len(set(lengths.values())) != 1 and not stopped:
        yield f"{FAILURES}: its tables disagree in length {lengths}"
    for path in iter_columns(f):
        try:
            column = Column.open(f, path)
        except SchemaError as error:  # a storage kind h5bank does not know: a problem to list
            yield f"{path}: {error}"
            continue
        yield from _verify_column(column, n, data, stopped)
    if data:
        yield from _verify_chunks(f)
    if shard_names(f) and f.driver != "fileobj":
        yield from _verify_shards(f, ids, data)


def _verify_shards(index: h5py.File, ids: list[str], data: bool) -> Iterator[str]:
    """A sharded bank's shards, each a bank (its own problems, named by shard), holding in
    order the ids the index lists; and each virtual column mapping exactly its shards' rows."""
    folder = os.path.dirname(os.path.abspath(index.filename))
    at = 0
    for name in shard_names(index):
        try:
            shard = h5py.File(os.path.join(folder, name), "r")
        except OSError as error:
            yield f"its shard {name} cannot be opened ({error})"
            return
        with shard:
            problem = next(bank_problems(shard, data), None)
            if problem is not None:
                yield f"its shard {name}: {problem}"
                return
            n = committed(shard)
            if read_strings(ids_table(shard), 0, n) != ids[at : at + n]:
                yield f"its shard {name} does not hold the ids {IDS} lists at rows {at}..{at + n}"
                return
            at += n
    if at != len(ids):
        yield f"its shards hold {at} sources, {IDS} lists {len(ids)}"


def _virtual(dataset: h5py.Dataset) -> bool:
    return dataset.id.get_create_plist().get_layout() == h5py.h5d.VIRTUAL


def _verify_column(column: Column, n: int, data: bool, stopped: bool = False) -> Iterator[str]:
    where = column.path

    def wrong(rows: int) -> bool:  # a stopped build may have written rows past its commit
        return rows < n if stopped else rows != n

    if column.refs.shape[1:] != (2,) or wrong(column.refs.shape[0]):
        yield f"{where}/refs has {column.refs.shape[0]} rows for {n} committed sources"
        return
    if column.shape is not None and wrong(column.shape.shape[0]):
        yield f"{where}/shape has {column.shape.shape[0]} rows for {n} committed sources"
        return
    refs = column.refs[:n] if n else np.zeros((0, 2), dtype=np.int64)
    starts, stops = refs[:, 0], refs[:, 1]
    empty = starts < 0
    if ((stops < 0) != empty).any():
        row = int(np.flatnonzero((stops < 0) != empty)[0])
        yield f"{where}/refs row {row} is half empty: {refs[row].tolist()}"
        return
    rows = column.data.shape[0]
    bad = ~empty & ((starts > stops) | (stops > rows))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        yield f"{where}/refs row {row} is {refs[row].tolist()}, outside data's {rows} rows"
        return
    used = np.flatnonzero(~empty)
    order = used[np.argsort(starts[used], kind="stable")]
    overlap = np.flatnonzero(starts[order][1:] < stops[order][:-1])
    if overlap.size:
        a, b = int(order[overlap[0]]), int(order[overlap[0] + 1])
        yield f"{where}/refs rows {a} and {b} overlap: {refs[a].tolist()} and {refs[b].tolist()}"
        return
    extent = stops[used] - starts[used]
    if column.kind.one_row_per_source and (extent != 1).any():
        j = int(np.flatnonzero(extent != 1)[0])
        yield (
            f"{where}/refs row {int(used[j])} spans {int(extent[j])} rows; "
            f"{column.storage} storage has one"
        )
    if column.shape is not None:
        table = column.shape[:n] if n else np.zeros((0, 1), dtype=np.int64)
        sizes = np.where(table >= 0, table, 1).prod(axis=1)
        mismatch = used[sizes[used] != extent]
        if mismatch.size:
            row = int(mismatch[0])
            yield (
                f"{where}/shape row {row} is {stored_shape(column, row)}, but its refs hold "
                f"{int(stops[row] - starts[row])} elements"
            )
    end = int(stops[used].max()) if used.size else 0
    if data and column.kind.has_names and end:
        codes = column.data[:end]
        names = category_names(column)
        if codes.min() < 0 or codes.max() >= len(names):
            yield f"{where}/data holds label codes outside its {len(names)} names"


def _verify_chunks(f: h5py.File) -> Iterator[str]:
    datasets: list[h5py.Dataset] = []
    f.visititems(lambda _, node: datasets.append(node) if isinstance(node, h5py.Dataset) else None)
    for dataset in datasets:
        if dataset.shape == () or dataset.size == 0 or _virtual(dataset):
            continue  # a sharded bank's data: its shards are checked, chunk by chunk
        for selection in _stored_blocks(dataset):
            try:
                dataset[selection]
            except OSError as error:
                yield f"{dataset.name}: reading {_shown(selection)} failed ({error})"
                break


# Rows of an unchunked dataset read at once by verify --data.
_BLOCK_BYTES = 64 << 20


def _stored_blocks(dataset: h5py.Dataset) -> Iterator[tuple[slice, ...]]:
    """Selections covering what ``dataset`` stores: each chunk HDF5 wrote (never the chunk
    coordinates of an extent that was only declared), or blocks of rows of a contiguous one."""
    if dataset.chunks is None:
        row = max(1, dataset.dtype.itemsize * int(np.prod(dataset.shape[1:])))
        step = max(1, _BLOCK_BYTES // row)
        for start in range(0, dataset.shape[0], step):
            yield (slice(start, min(start + step, dataset.shape[0])),)
        return
    for i in range(dataset.id.get_num_chunks()):
        offset = dataset.id.get_chunk_info(i).chunk_offset
        yield tuple(
            slice(o, min(o + c, n))
            for o, c, n in zip(offset, dataset.chunks, dataset.shape, strict=True)
        )


def _shown(selection: tuple[slice, ...]) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in selection) + "]"
