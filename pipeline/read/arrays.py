"""Dask arrays over a bank's datasets."""

from __future__ import annotations

import math
import os
from typing import Any

import h5py
import numpy as np

from pipeline import config
from pipeline.errors import NoDataError
from pipeline.files.cache import Expect, LazyFile
from pipeline.format.rows import one_request
from pipeline.urls import redact


class LazyDataset:
    """An array-like over one dataset of a :class:`LazyFile`, for ``dask.array.from_array``.

    Holds the shape and dtype read when it was made, so building a Dask array
    on it reads nothing more.
    """

    def __init__(self, file: LazyFile, name: str, expect: Expect) -> None:
        self.file = file
        self.name = name
        self.expect = expect
        self.shape = expect.shape
        self.dtype = np.dtype(expect.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, selection: Any) -> np.ndarray:
        return self.file.read(self.name, selection, self.expect)

    def __dask_tokenize__(self) -> Any:
        return (type(self).__name__, self.file.__dask_tokenize__(), self.name, self.expect)

    def __repr__(self) -> str:
        return f"LazyDataset({self.file.path!r}, {self.name!r}, shape={self.shape}, {self.dtype})"


class LazySourceRows(LazyDataset):
    """An item or category column read by source: row ``i`` is source ``i``'s item.

    For a column with one row per source. Each read takes the refs of the
    sources it covers; when they point at the same rows (a bank built in one
    go) it is one contiguous read of ``data``, otherwise the rows are gathered
    (a ``bank.map`` re-run that filled gaps appends them out of order).
    """

    def __init__(self, file: LazyFile, name: str, expect: Expect, refs: str, n: int) -> None:
        super().__init__(file, name, expect)
        self.refs = refs
        self.refs_expect = Expect((n, 2), np.dtype("i8").str)

    def __getitem__(self, selection: Any) -> np.ndarray:
        selection = selection if isinstance(selection, tuple) else (selection,)
        first, rest = selection[0], selection[1:]
        start, stop, _ = first.indices(self.shape[0])
        starts = self.file.read(self.refs, (slice(start, stop), 0), self.refs_expect)
        if starts.size == 0 or np.array_equal(starts, np.arange(start, stop)):
            return self.file.read(self.name, (slice(start, stop), *rest), self.expect)
        if (starts < 0).any():
            row = start + int(np.flatnonzero(starts < 0)[0])
            raise NoDataError(
                f"{redact(self.file.path)}: source row {row} has no data in {self.name}; read this "
                "feature with to_dask_sources(), which skips such sources"
            )
        # Read the span at once when close (format.rows.one_request), else each run of
        # consecutive rows once; then put the rows in source order.
        order = np.argsort(starts, kind="stable")
        ordered = starts[order]
        low, high = int(ordered[0]), int(ordered[-1]) + 1
        row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])
        if one_request(low, high, len(ordered), row_bytes):
            block = self.file.read(self.name, (slice(low, high), *rest), self.expect)
            return block[starts - low]
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        runs = [
            self.file.read(self.name, (slice(int(run[0]), int(run[-1]) + 1), *rest), self.expect)
            for run in np.split(ordered, breaks)
        ]
        out = np.empty_like(runs[0], shape=(len(starts), *runs[0].shape[1:]))
        out[order] = np.concatenate(runs)
        return out

    def __dask_tokenize__(self) -> Any:
        return (super().__dask_tokenize__(), self.refs, self.refs_expect)


def default_chunks(dataset: h5py.Dataset, target_bytes: int | None = None) -> tuple[int, ...]:
    """Rows per Dask block along axis 0: whole HDF5 chunks, about ``target_bytes`` a block.

    Other axes are whole. ``target_bytes`` defaults to ``h5bank.read.chunk-bytes``.
    """
    if dataset.ndim == 0:
        return ()
    target = int(config.get("read.chunk-bytes", target_bytes))
    n = dataset.shape[0]
    row_bytes = max(1, math.prod(dataset.shape[1:]) * dataset.dtype.itemsize)
    chunk_rows = dataset.chunks[0] if dataset.chunks else 1
    per_block = max(1, target // (chunk_rows * row_bytes)) * chunk_rows
    return (max(1, min(per_block, n)), *dataset.shape[1:])


def dask_array(
    lazy: LazyFile,
    dataset: h5py.Dataset,
    chunks: Any = None,
    refs: h5py.Dataset | None = None,
) -> Any:
    """A ``dask.array.Array`` over ``dataset`` (of the file ``lazy`` opens), reading nothing now.

    With ``refs`` (the column's refs table, one row of ``dataset`` per
    source), row ``i`` of the array is source ``i``'s (:class:`LazySourceRows`).
    ``chunks`` is anything ``dask.array.from_array`` takes; ``None`` is
    :func:`default_chunks`.
    """
    import dask.array as da
    from dask.base import tokenize

    expect = Expect.of(dataset)
    if refs is not None:
        array_like: LazyDataset = LazySourceRows(
            lazy, dataset.name, expect, refs.name, dataset.shape[0]
        )
    else:
        array_like = LazyDataset(lazy, dataset.name, expect)
    if chunks is None:
        chunks = default_chunks(dataset)
    label = f"h5bank-{os.path.basename(lazy.path)}{dataset.name}".replace("/", "-")
    return da.from_array(
        array_like,
        chunks=chunks,
        name=f"{label}-{tokenize(array_like, chunks)}",
        lock=False,
        asarray=True,
        fancy=False,
        meta=np.empty((0,) * array_like.ndim, dtype=array_like.dtype),
    )
