"""Sharded banks: shard files beside the bank, and the index file that presents them as one.

A bank built with ``shards=N`` is N shard files, each a complete bank of its
own written by its own writer chain, and the bank path itself, a small
*index* file::

    photos.h5                        the index: what readers open
    photos.shard-3f9a1c-00000.h5     shard 0: a complete bank (sources 0 .. k-1)
    photos.shard-3f9a1c-00001.h5     shard 1 (sources k ..)

The index is a bank in format version 1 like any other: its id table, refs,
shape tables, label codes and failures are ordinary datasets holding the
global values (shard 1's refs are offset by shard 0's rows), and each
column's ``data`` is a virtual dataset over the shards' ``data``, so plain
h5py reads a feature as one dataset. Shard files are named by their bare
file name, which HDF5 resolves in the index's folder: the folder moves as a
whole. The root attribute ``h5bank_shards`` lists them; it is the only set
of files a bank may point to (:mod:`pipeline.format.trust`).

Shards hold consecutive blocks of the build's sources, so the index lists
sources in the order a single-file build commits them. Each shard records
the last source id of its block (``h5bank_shard_block``): a build killed
and resumed gives each shard the rest of its own block.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from pipeline.errors import DamagedBankError, ShardedWriteError
from pipeline.format import layout
from pipeline.format.partial import (  # the shard files' names: what is on disk for a path
    PARTIAL_SUFFIX,
    complete_path,
    listed_shards,
    shard_files,
    shard_path,
    shard_stem,
)

__all__ = [
    "ATTR_BLOCK",
    "block",
    "complete_path",
    "is_sharded",
    "listed_shards",
    "new_tag",
    "refuse_writing",
    "set_block",
    "shard_files",
    "shard_path",
    "shard_stem",
    "write_index",
]

ATTR_BLOCK = "h5bank_shard_block"  # JSON {"last": id or null}: the end of a shard's block

# Rows of the id and per-source tables copied into an index at a time.
_STEP = 1 << 18


def is_sharded(f: h5py.File) -> bool:
    return bool(layout.shard_names(f))


def refuse_writing(f: h5py.File, shown: str) -> None:
    """Raise :class:`ShardedWriteError` if ``f``, open for writing, is a sharded bank's index."""
    if layout.shard_names(f):
        raise ShardedWriteError(
            f"{shown} is a sharded bank (its data is in {len(layout.shard_names(f))} shard files "
            "beside it): its index is not written by one writer. Add sources with "
            "create(path, sources, mode='a') (new shards), write by id with add / set, or map "
            "with output= (each written in its shards)"
        )


def block(f: h5py.File) -> dict[str, Any] | None:
    """What a shard records of its build (``None`` for a file that is no shard): ``last``, its
    block's last source id, and ``base``, the uuid of the bank it adds to (``None``: a new
    bank)."""
    raw = f.attrs.get(ATTR_BLOCK)
    if raw is None:
        return None
    value = layout.read_json_attr(f, ATTR_BLOCK)
    return {"last": value.get("last"), "base": value.get("base")}


def set_block(f: h5py.File, value: dict[str, Any]) -> None:
    layout.write_json_attr(f, ATTR_BLOCK, value)


def write_index(
    path: str,
    shards: Sequence[str],
    provenance: dict[str, Any],
    bank_uuid: str | None = None,
    names: dict[str, list[str]] | None = None,
) -> None:
    """Write the index of the complete banks ``shards`` (paths in ``path``'s folder, in
    source order) to ``path + ".partial"``, then rename it onto ``path``; ``bank_uuid`` is
    the uuid of the bank it replaces, when it adds to it (else a new one).

    Label columns get the sorted union of their shards' names, as a build sorts them, or,
    for a column in ``names``, those names in that order followed by any new ones (what
    ``add`` / ``set`` do to a bank's names: codes already handed out keep their meaning).

    Raises ``DamagedBankError`` when the shards disagree (a feature stored as
    different kinds, dtypes or row shapes).
    """
    folder = os.path.dirname(os.path.abspath(path))
    for shard in shards:
        if os.path.dirname(os.path.abspath(shard)) != folder:
            raise ValueError(f"shard {shard} is not in the bank's folder {folder}")
    partial = path + PARTIAL_SUFFIX
    labels = names
    names = [os.path.basename(s) for s in shards]
    files = [h5py.File(s, "r") for s in shards]
    try:
        with h5py.File(partial, "w") as index:
            _write(index, files, names, provenance, labels or {})
            if bank_uuid:
                layout.set_text(index, layout.ATTR_UUID, bank_uuid)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    finally:
        for f in files:
            f.close()
    os.replace(partial, path)


def _write(
    index: h5py.File,
    files: list[h5py.File],
    names: list[str],
    provenance: dict[str, Any],
    labels: dict[str, list[str]],
) -> None:
    counts = [layout.committed(f) for f in files]
    total = sum(counts)
    schema: dict[str, Any] = {}
    for f in files:
        for key, value in layout.read_json_attr(f, layout.ATTR_SCHEMA).items():
            schema.setdefault(key, value)
    layout.init_bank(index, schema, provenance, expected=total)
    layout.set_text(index, layout.ATTR_SHARDS, json.dumps(names))
    _concatenate_strings(index, layout.IDS, files, counts)
    failures = _merged_failures(files, counts)
    for k, field in enumerate(layout.FAILURE_FIELDS):
        layout.append_strings(index[f"{layout.FAILURES}/{field}"], [f[k] for f in failures])
    columns = sorted({path for f in files for path in layout.iter_columns(f)})
    for path in columns:
        _write_column(index, path, files, names, counts, labels.get(path))
    layout.mark_committed(index)
    layout.set_state(index, layout.COMPLETE)


def _concatenate_strings(
    index: h5py.File, name: str, files: list[h5py.File], counts: list[int]
) -> None:
    table = index[name]
    for f, n in zip(files, counts, strict=True):
        for start in range(0, n, _STEP):
            layout.append_strings(table, layout.read_strings(f[name], start, min(n, start + _STEP)))


def _merged_failures(files: list[h5py.File], counts: list[int]) -> list[tuple[str, ...]]:
    """The shards' failures as one bank keeps them (the writer's ``compact_failures``, across
    shards in order): a failure is dropped when its source was committed by a later shard (an
    append that retried it), and a source keeps its latest failure (per feature when it is in
    the bank)."""
    recorded = []
    for k, f in enumerate(files):
        n = min(t.shape[0] for t in layout.failure_tables(f))
        rows = zip(*[layout.read_strings(t, 0, n) for t in layout.failure_tables(f)], strict=True)
        recorded += [(k, row) for row in rows]
    if not recorded:
        return []
    failing = {row[0] for _, row in recorded}
    committed_in: dict[str, int] = {}
    for k, (f, n) in enumerate(zip(files, counts, strict=True)):
        for start in range(0, n, _STEP):
            for id_ in layout.read_strings(f[layout.IDS], start, min(n, start + _STEP)):
                if id_ in failing:
                    committed_in.setdefault(id_, k)
    latest: dict[tuple[str, str | None], tuple[str, ...]] = {}
    for k, row in recorded:
        where = committed_in.get(row[0])
        if where is not None and where > k:
            continue  # committed since it failed
        key = (row[0], row[1] if where is not None else None)
        latest.pop(key, None)
        latest[key] = row
    return list(latest.values())


def _write_column(
    index: h5py.File,
    path: str,
    files: list[h5py.File],
    names: list[str],
    counts: list[int],
    labels: list[str] | None = None,
) -> None:
    """One column of the index: global refs and shapes, virtual data over the shards' (label
    codes, small and numbered per shard, are renumbered and copied)."""
    present = [(k, layout.Column.open(f, path)) for k, f in enumerate(files) if path in f]
    first = present[0][1]
    for _, column in present:
        if (column.storage, column.data.dtype, column.data.shape[1:]) != (
            first.storage, first.data.dtype, first.data.shape[1:]
        ):  # fmt: skip
            raise DamagedBankError(
                f"the shards disagree on column {path!r}: {column.data.file.filename} stores "
                f"{column.storage} {column.data.dtype} rows of {column.data.shape[1:]}, "
                f"{first.data.file.filename} {first.storage} {first.data.dtype} rows of "
                f"{first.data.shape[1:]}"
            )
    by_shard = dict(present)
    total = sum(counts)
    group = index.require_group(path)
    for key, value in first.group.attrs.items():
        if key not in (layout.ATTR_STORAGE, layout.ATTR_NAMES):
            group.attrs[key] = value
    rows_per_table = layout.table_rows(total)
    refs = group.create_dataset(
        layout.REFS, shape=(total, 2), maxshape=(None, 2), dtype="i8",
        chunks=(rows_per_table, 2), fillvalue=-1,
    )  # fmt: skip
    width = max((c.shape.shape[1] for _, c in present if c.shape is not None), default=0)
    shape = None
    if first.shape is not None:
        shape = group.create_dataset(
            layout.SHAPE, shape=(total, width), maxshape=(None, None), dtype="i8",
            chunks=(rows_per_table, max(1, min(width, 4))), fillvalue=-1,
        )  # fmt: skip
    offsets, start, rows = [], 0, 0
    for k, n in enumerate(counts):
        column = by_shard.get(k)
        extent = column.data.shape[0] if column is not None else 0
        offsets.append(rows)
        if column is not None:
            for a in range(0, n, _STEP):
                block = column.refs[a : min(n, a + _STEP)]
                refs[start + a : start + a + len(block)] = np.where(block >= 0, block + rows, -1)
                if shape is not None and column.shape is not None:
                    sb = column.shape[a : min(n, a + _STEP)]
                    shape[start + a : start + a + len(sb), : sb.shape[1]] = sb
        start += n
        rows += extent
    if first.kind.has_names:
        _copy_codes(group, present, rows, rows_per_table, labels)
    else:
        _virtual_data(group, present, names, offsets, rows)
    group.attrs[layout.ATTR_STORAGE] = first.storage  # last: marks the column complete


def _virtual_data(
    group: h5py.Group,
    present: list[tuple[int, layout.Column]],
    names: list[str],
    offsets: list[int],
    rows: int,
) -> None:
    first = present[0][1].data
    if rows == 0:
        group.create_dataset(
            layout.DATA, shape=(0, *first.shape[1:]), maxshape=(None, *first.shape[1:]),
            dtype=first.dtype, chunks=True,
        )  # fmt: skip
        return
    virtual = h5py.VirtualLayout(shape=(rows, *first.shape[1:]), dtype=first.dtype)
    for k, column in present:
        n = column.data.shape[0]
        if n:
            source = h5py.VirtualSource(names[k], column.data.name, shape=column.data.shape)
            virtual[offsets[k] : offsets[k] + n] = source
    group.create_virtual_dataset(layout.DATA, virtual)


def _copy_codes(
    group: h5py.Group,
    present: list[tuple[int, layout.Column]],
    rows: int,
    chunk: int,
    kept: list[str] | None = None,
) -> None:
    """Label codes of every shard in one dataset, renumbered to the sorted union of names
    (or to ``kept`` and the names it lacks, in the order the shards have them)."""
    if kept is None:
        names = sorted({n for _, c in present for n in layout.category_names(c)})
    else:
        names = list(
            dict.fromkeys([*kept, *(n for _, c in present for n in layout.category_names(c))])
        )
    position = {name: code for code, name in enumerate(names)}
    data = group.create_dataset(
        layout.DATA, shape=(rows,), maxshape=(None,), dtype="i8", chunks=(chunk,)
    )
    at = 0
    for _, column in present:
        remap = np.array(
            [position[n] for n in layout.category_names(column)] or [0], dtype=np.int64
        )
        n = column.data.shape[0]
        for a in range(0, n, _STEP):
            codes = column.data[a : min(n, a + _STEP)]
            data[at + a : at + a + len(codes)] = remap[codes]
        at += n
    group.attrs[layout.ATTR_NAMES] = np.array(names, dtype=h5py.string_dtype("utf-8"))


def new_tag() -> str:
    """A tag for one build's set of shard files (so a new set never replaces files a
    complete bank's index still lists)."""
    return uuid.uuid4().hex[:6]
