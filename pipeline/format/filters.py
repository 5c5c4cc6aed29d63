"""Compression filters: hdf5plugin's registration, chunks compressed by the decode tasks,
and how a dataset's filters are described.
"""

from __future__ import annotations

import contextlib
import functools
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from pipeline.format.storage import kind


def precompressed(storage: str, options: dict[str, Any], row_bytes: int) -> bool:
    """Whether a column's chunks are filtered (compressed) by the decode tasks.

    That is an ``item`` column (one row per source) of rows of at least
    :data:`PRECOMPRESSED_ROW_BYTES`, with a compression filter (gzip, lzf,
    or any of hdf5plugin's: Zstd, Blosc, LZ4...) and chunks h5bank picks:
    its chunks are one row each, so each source's row is a whole chunk, which
    a decode task filters (:func:`filter_rows`) in parallel with the others
    and the writer stores as it is (HDF5's direct chunk write). The bank is a
    plain dataset with that filter, which any HDF5 reader with the filter
    reads. Smaller rows keep larger chunks (a chunk per 64-byte row doubled a
    file and made a scan 60x slower) and are compressed by the writer.
    """
    return (
        kind(storage).row_chunks
        and options.get("chunks") in (None, True)
        and row_bytes >= PRECOMPRESSED_ROW_BYTES
        and options.get("compression") is not None
    )


# Rows at least this large are compressed by the decode tasks (see precompressed).
PRECOMPRESSED_ROW_BYTES = 4096


@dataclass
class FilteredRows:
    """Rows as the chunks HDF5 stores for a dataset of one-row chunks: each row's bytes after
    the filter ``pipeline`` (:func:`filter_pipeline`), and the mask of filters it skipped."""

    pipeline: tuple[Any, ...]
    chunks: list[bytes]
    masks: list[int]


def filter_rows(rows: np.ndarray, options: dict[str, Any]) -> FilteredRows:
    """Each of ``rows`` filtered as a one-row chunk of a column created with ``options``.

    HDF5 does the filtering itself, in a file held in memory, with the
    dataset options :func:`create_column` uses: every filter (and its
    parameters, computed from the dtype and the chunk shape) is the one the
    bank's column has, byte for byte. h5py lets one thread of a process into
    HDF5 at a time, so gzip (with or without shuffle), which zlib does the
    same way while letting other threads run, is done with zlib: a worker of
    several threads compresses on all of them.
    """
    pipeline = _pipeline(rows.dtype.str, rows.shape[1:], _hashable(options))
    filters = pipeline[2]
    if [f[0] for f in filters] in ([_DEFLATE], [_SHUFFLE, _DEFLATE]):
        level = filters[-1][2][0]
        size = rows.dtype.itemsize if len(filters) == 2 else 1
        flat = np.ascontiguousarray(rows).view(np.uint8).reshape(len(rows), -1, size)
        chunks = [zlib.compress(row.T.tobytes(), level) for row in flat]
        return FilteredRows(pipeline, chunks, [0] * len(chunks))
    with _memory_dataset(rows, options) as data:
        zeros = (0,) * (rows.ndim - 1)
        masks, chunks = [], []
        for i in range(len(rows)):
            mask, chunk = data.id.read_direct_chunk((i, *zeros))
            masks.append(mask)
            chunks.append(chunk)
        return FilteredRows(pipeline, chunks, masks)


_DEFLATE, _SHUFFLE = h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE


@contextlib.contextmanager
def _memory_dataset(rows: np.ndarray, options: dict[str, Any]) -> Iterator[h5py.Dataset]:
    """``rows`` in a dataset of one-row chunks made with ``options``, in a file in memory."""
    register_plugin_filters()  # a decode worker may never have opened a bank
    options = {k: v for k, v in options.items() if k != "chunks"}
    name = f"h5bank-filter-{uuid.uuid4().hex}"
    with h5py.File(name, "w", driver="core", backing_store=False) as f:
        yield f.create_dataset(
            "data", data=rows, maxshape=(None, *rows.shape[1:]), chunks=(1, *rows.shape[1:]),
            **options,
        )  # fmt: skip


@functools.lru_cache(maxsize=64)
def _pipeline(dtype: str, row_shape: tuple[int, ...], options: tuple[Any, ...]) -> tuple[Any, ...]:
    """The :func:`filter_pipeline` of a column of such rows, from a one-row dataset in memory."""
    with _memory_dataset(np.zeros((1, *row_shape), dtype), dict(options)) as data:
        return filter_pipeline(data)


def _hashable(options: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))


def filter_pipeline(dataset: h5py.Dataset) -> tuple[Any, ...]:
    """What decides a chunk's stored bytes: dtype, chunk shape, each filter and its values."""
    plist = dataset.id.get_create_plist()
    filters = tuple(plist.get_filter(i)[:3] for i in range(plist.get_nfilters()))
    return (dataset.dtype.str, dataset.chunks, filters)


def compression_of(dataset: h5py.Dataset) -> str:
    """A short description of a dataset's filters (``"gzip(4)"``, ``"lzf"``, ``"filter 32015"``)."""
    plist = dataset.id.get_create_plist()
    names = []
    for i in range(plist.get_nfilters()):
        code, _, values, name = plist.get_filter(i)
        label = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        if code == h5py.h5z.FILTER_DEFLATE:
            label = f"gzip({values[0]})" if values else "gzip"
        elif code == h5py.h5z.FILTER_SHUFFLE:
            label = "shuffle"
        elif code == h5py.h5z.FILTER_FLETCHER32:
            label = "fletcher32"
        elif code == 32000:
            label = "lzf"
        elif (
            label.startswith("HDF5 ") and " filter" in label
        ):  # hdf5plugin: "HDF5 zstd filter; see…"
            label = label[5 : label.index(" filter")]
        names.append(label or f"filter {code}")
    return "+".join(names) if names else "none"


@functools.cache
def register_plugin_filters() -> bool:
    """Register hdf5plugin's filters (Zstd, LZ4, Blosc, BZip2...) in this process, if installed.

    HDF5 finds a dynamically loaded filter only once ``hdf5plugin`` is imported;
    without it, data written with one cannot be read or written, in the client
    as in every Dask worker. Called before h5bank opens a file; ``True`` if
    hdf5plugin is there.
    """
    try:
        import hdf5plugin  # noqa: F401
    except ImportError:
        return False
    return True
