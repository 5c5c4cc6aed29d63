"""Reading rows of a dataset fast: run by run, or one span when close, or straight from
the file at their offsets.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import h5py
import numpy as np

# Reads ranges of a remote file at once: ``read(starts, stops)`` gives each range's bytes.
RangeReader = Callable[[Sequence[int], Sequence[int]], Sequence[bytes]]


# The range readers of remote files open here, by HDF5 file number (see register_ranges).
_RANGES: dict[int, RangeReader] = {}


def register_ranges(f: h5py.File, read: RangeReader) -> None:
    """Read the rows of ``f`` (a remote file, open read-only) with ``read``: a batch of rows is
    then one call for every range it needs, not a block of the file object's cache per row."""
    _RANGES[f.id.fileno] = read


def forget_ranges(f: h5py.File) -> None:
    """``f`` is closing: forget its range reader."""
    _RANGES.pop(f.id.fileno, None)


# Ranges of a remote file closer than this are fetched as one (the bytes between are dropped).
MERGE_GAP = 64 << 10


# A remote chunk is fetched whole, and kept, when a read wants at least this share of its rows;
# a column keeps at most REMOTE_CHUNKS_KEPT bytes of such chunks (least recently used dropped).
WHOLE_CHUNK_SHARE = 1 / 8
REMOTE_CHUNKS_KEPT = 32 << 20


class RowsDataset(h5py.Dataset):
    """An unfiltered chunked dataset of a file open read-only, whose rows can be read
    straight from the file: :meth:`read_rows`.

    A chunk of a dataset without filters is its rows' bytes as they are in
    memory, at the address HDF5's chunk index gives (``get_chunk_info``): a
    row is ``os.preadv`` at that address plus its place in the chunk, into
    the array being filled. That skips h5py's selection machinery, which cost
    about 20 us a read; 64 random rows of 12 KB took 1.4 ms through h5py and
    0.2 ms this way. In a remote bank (a range reader registered for its
    file, :func:`register_ranges`) the same offsets are fetched together,
    ranges closer than :data:`MERGE_GAP` merged: through the file object's
    2 MiB blocks, a batch of 64 random 12 KB images over HTTP moved 144 MB.
    A chunk of which a read wants at least :data:`WHOLE_CHUNK_SHARE` of the
    rows is fetched whole and kept for the next reads (batches drawn from a
    few blocks of neighbouring sources, ``serve(..., shuffle="blocks")``).
    Rows of chunks HDF5 never wrote, and datasets whose chunks do not span
    whole rows, are read through h5py.
    """

    _ranges: RangeReader | None = None

    def read_rows(self, wanted: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``wanted`` (sorted, unique, in range) as one array (``out``, if given)."""
        if not self._direct():
            return read_runs(self, wanted, out)
        per_chunk, _, trailing, _ = self._layout
        if out is None:
            out = np.empty((len(wanted), *trailing), dtype=self.dtype)
        rows = wanted.tolist()
        pieces = []
        a = 0
        while a < len(rows):  # a run of consecutive rows within one chunk, read at once
            first = rows[a]
            end = min(len(rows), a + per_chunk - first % per_chunk)
            b = a + 1
            while b < end and rows[b] == first + (b - a):
                b += 1
            pieces.append((first, a, b))
            a = b
        self._fill(out, pieces)
        return out

    def read_span(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` (in range) as one array: one read per chunk they touch (a
        sound's samples, a source's rows), not h5py's selection machinery."""
        if not self._direct() or stop - start < 1:
            return self[start:stop]
        return self.read_spans([(start, stop)])

    def read_spans(self, spans: Sequence[tuple[int, int]]) -> np.ndarray:
        """The rows of every ``(start, stop)`` of ``spans`` (in range), one span after the
        other in one array: a batch of sources' rows in one allocation, with one read per
        chunk piece (all of a remote file's ranges in one call of its range reader)."""
        spans = [(int(a), int(b)) for a, b in spans]
        out = np.empty((sum(b - a for a, b in spans), *self.shape[1:]), dtype=self.dtype)
        if not self._direct():
            at = 0
            for start, stop in spans:
                if stop > start:
                    self.read_direct(out, np.s_[start:stop], np.s_[at : at + stop - start])
                at += stop - start
            return out
        per_chunk = self._layout[0]
        pieces, at = [], 0
        for start, stop in spans:
            row = start
            while row < stop:
                end = min(stop, (row // per_chunk + 1) * per_chunk)
                pieces.append((row, at + row - start, at + end - start))
                row = end
            at += stop - start
        self._fill(out, pieces)
        return out

    def _fill(self, out: np.ndarray, pieces: list[tuple[int, int, int]]) -> None:
        """For each ``(first, a, b)``: rows ``first`` to ``first + b - a`` into ``out[a:b]``,
        at their offsets (through h5py where a chunk was never written or a read is short)."""
        per_chunk, row_bytes, _, fd = self._layout
        located = []
        for first, a, b in pieces:
            address = self._address(first // per_chunk)
            if address is None:
                out[a:b] = self[first : first + b - a]
            else:
                located.append((address + (first % per_chunk) * row_bytes, first, a, b))
        if fd is None:
            self._fetch(out, located)
            return
        for offset, first, a, b in located:
            if os.preadv(fd, [memoryview(out[a:b]).cast("B")], offset) != (b - a) * row_bytes:
                out[a:b] = self[first : first + b - a]

    def _fetch(self, out: np.ndarray, located: list[tuple[int, int, int, int]]) -> None:
        """``located`` (``(offset, first, a, b)``) of a remote file, with one call of its
        range reader for every range, ranges less than :data:`MERGE_GAP` apart merged; rows
        of kept chunks copied, chunks wanted densely fetched whole and kept (threads reading
        the same column share what is kept, under a lock)."""
        per_chunk, row_bytes = self._layout[0], self._layout[1]
        kept, lock = self._kept()
        wanted: dict[int, int] = {}
        for _, first, a, b in located:
            wanted[first // per_chunk] = wanted.get(first // per_chunk, 0) + b - a
        with lock:
            dense = [c for c, n in wanted.items() if n >= per_chunk * WHOLE_CHUNK_SHARE]
            have = {c: kept[c] for c in wanted if c in kept}
            for c in have:
                kept.move_to_end(c)
        whole = sorted(c for c in dense if c not in have)
        if whole:
            spans = [self._chunks[c] for c in whole]
            blobs = self._ranges([o for o, _ in spans], [o + n for o, n in spans])  # type: ignore[misc]
            fetched = dict(zip(whole, blobs, strict=True))
            have.update(fetched)
            with lock:
                kept.update(fetched)
                while sum(map(len, kept.values())) > REMOTE_CHUNKS_KEPT and len(kept) > 1:
                    kept.popitem(last=False)
        rest = []
        for piece in located:
            offset, first, a, b = piece
            blob = have.get(first // per_chunk)
            start = 0 if blob is None else offset - self._chunks[first // per_chunk][0]  # type: ignore[index]
            if blob is None or len(blob) < start + (b - a) * row_bytes:
                rest.append(piece)
                continue
            memoryview(out[a:b]).cast("B")[:] = blob[start : start + (b - a) * row_bytes]
        if rest:
            self._fetch_ranges(out, rest)

    def _kept(self) -> tuple[OrderedDict[int, bytes], threading.Lock]:
        kept = getattr(self, "_kept_chunks", None)
        if kept is None:
            kept = self._kept_chunks = (OrderedDict(), threading.Lock())
        return kept

    def _fetch_ranges(self, out: np.ndarray, located: list[tuple[int, int, int, int]]) -> None:
        """``located`` with one call of the range reader, ranges under :data:`MERGE_GAP` apart
        merged."""
        row_bytes = self._layout[1]
        merged: list[list[Any]] = []  # [start, stop, members]
        for piece in sorted(located):
            offset, _, a, b = piece
            if merged and offset - merged[-1][1] <= MERGE_GAP:
                merged[-1][1] = max(merged[-1][1], offset + (b - a) * row_bytes)
                merged[-1][2].append(piece)
            else:
                merged.append([offset, offset + (b - a) * row_bytes, [piece]])
        blobs = self._ranges([m[0] for m in merged], [m[1] for m in merged])  # type: ignore[misc]
        for (start, _, members), blob in zip(merged, blobs, strict=True):
            for offset, first, a, b in members:
                piece = blob[offset - start : offset - start + (b - a) * row_bytes]
                if len(piece) == (b - a) * row_bytes:
                    memoryview(out[a:b]).cast("B")[:] = piece
                else:
                    out[a:b] = self[first : first + b - a]

    def _direct(self) -> bool:
        """Whether rows can be read at their offsets: chunks of whole rows, plain numbers in
        this machine's byte order, no user block, and a way to read the file (its descriptor,
        or a remote file's range reader). If so, ``_layout`` holds what a read needs (rows a
        chunk, bytes a row, a row's shape, the descriptor or ``None``), asked of h5py once."""
        known = getattr(self, "_direct_ok", None)
        if known is None:
            chunks = self.chunks
            self._chunks: dict[int, tuple[int, int] | None] = {}
            trailing = tuple(self.shape[1:])
            fd = None if self._ranges is not None else self.file.id.get_vfd_handle()
            known = self._direct_ok = bool(
                chunks is not None
                and tuple(chunks[1:]) == tuple(self.shape[1:])
                and self.dtype.kind in "biuf"
                and self.dtype.isnative
                and self.file.userblock_size == 0
                and (self._ranges is not None or (isinstance(fd, int) and hasattr(os, "preadv")))
            )
            if known:
                row_bytes = self.dtype.itemsize * math.prod(trailing)
                self._layout = (chunks[0], row_bytes, trailing, fd)
        return known

    def _address(self, chunk: int) -> int | None:
        """Where chunk ``chunk`` starts in the file (``None``: never written); its offset and
        stored size are kept in ``_chunks``."""
        known = self._chunks
        if chunk not in known:
            coord = (chunk * self.chunks[0],) + (0,) * (len(self.shape) - 1)
            info = self.id.get_chunk_info_by_coord(coord)
            known[chunk] = (info.byte_offset, info.size) if info.size else None
        found = known[chunk]
        return None if found is None else found[0]


def read_runs(dataset: Any, wanted: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows ``wanted`` (sorted, unique) of ``dataset``, one h5py slice per run of consecutive
    rows, into one array (``out``, if given)."""
    if out is None:
        out = np.empty((len(wanted), *dataset.shape[1:]), dtype=dataset.dtype)
    breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
    for a, b in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(wanted)].tolist(), strict=True):
        start = int(wanted[a])
        out[a:b] = dataset[start : start + b - a]
    return out


def _cache_set(f: h5py.File) -> bool:
    """Whether ``f`` was opened with a chunk cache other than HDF5's default (``rdcc_nbytes``)."""
    default = h5py.h5p.create(h5py.h5p.FILE_ACCESS).get_cache()[1:]
    return f.id.get_access_plist().get_cache()[1:] != default


# Unfiltered chunks at least this large are read without a chunk cache (see open_dataset).
_UNCACHED_CHUNK_BYTES = 256 * 1024


# ... and so are rows at least this large, in chunks of any size.
_UNCACHED_ROW_BYTES = 4096


def open_dataset(group: h5py.Group, name: str) -> h5py.Dataset:
    """``group[name]``; read-only, local, unfiltered, with large chunks or large rows and
    the file's default cache, a :class:`RowsDataset`: no chunk cache, rows read at their
    offsets.

    Then a read of a few rows reads those rows, not their whole chunk: with
    HDF5's default 1 MiB cache and 1 MiB chunks, each random row of a 64x64
    RGB image column cost about 60 us (its chunk read into the cache, then
    evicted by the next); without, about 20 us through h5py, 3 us with
    :meth:`RowsDataset.read_rows`. Rows of a page or more are read so in
    smaller chunks too (a small bank's, or one that grew by ``add``: see
    :func:`create_column`): 64 random 64x64 RGB rows of 3,000 in 5-row
    chunks took about 1.2 ms through the cache and 0.5 ms this way.
    Compressed datasets keep the file's cache (a chunk must be decompressed
    whole), and so does a file open for writing.
    """
    ranges = _RANGES.get(group.file.id.fileno)
    if ranges is not None and group.file.mode == "r":  # a remote bank: rows fetched as ranges
        dataset = group[name]
        if dataset.chunks is not None and not dataset.id.get_create_plist().get_nfilters():
            dataset = RowsDataset(dataset.id)
            dataset._ranges = ranges
        return dataset
    if group.file.mode != "r" or group.file.driver != "sec2" or _cache_set(group.file):
        return group[name]  # writing, a remote file, or a cache the caller chose: keep it
    # The cache is made when HDF5 first opens the dataset: open it without one, then check.
    access = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    access.set_chunk_cache(0, 0, 1.0)  # slots, bytes, w0: no cache
    dataset = RowsDataset(h5py.h5d.open(group.id, name.encode(), access))
    chunks = dataset.chunks
    row_bytes = math.prod(dataset.shape[1:]) * dataset.dtype.itemsize
    if (
        chunks is not None
        and not dataset.id.get_create_plist().get_nfilters()
        and (
            math.prod(chunks) * dataset.dtype.itemsize >= _UNCACHED_CHUNK_BYTES
            or row_bytes >= _UNCACHED_ROW_BYTES
        )
    ):
        return dataset
    dataset.id.close()  # small chunks of small rows (refs tables) gain from the cache
    return group[name]


def read_span(data: Any, start: int, stop: int) -> np.ndarray:
    """``data[start:stop]`` (in range), straight from the file where ``data`` can
    (:meth:`RowsDataset.read_span`): a ref's rows, a window of samples."""
    if hasattr(data, "read_span"):
        return data.read_span(start, stop)
    return data[start:stop]


def read_spans(data: Any, spans: Sequence[tuple[int, int]]) -> tuple[np.ndarray, list[int]]:
    """The rows of ``spans`` (each ``(start, stop)``, in range) of ``data`` one after the
    other in one array, and the bounds of each span in it (``len(spans) + 1`` of them):
    :meth:`RowsDataset.read_spans` where ``data`` can, else a read a span."""
    bounds = [0]
    for start, stop in spans:
        bounds.append(bounds[-1] + int(stop) - int(start))
    if hasattr(data, "read_spans"):
        return data.read_spans(spans), bounds
    if not spans:
        return np.empty((0, *data.shape[1:]), dtype=data.dtype), bounds
    return np.concatenate([data[int(a) : int(b)] for a, b in spans]), bounds


def absolute_rows(indices: Any, n: int, unit: str = "row") -> np.ndarray:
    """``indices`` of ``n`` rows (or items, ``unit``) as non-negative int64 (negative ones
    count from the end); ``IndexError`` naming the first one out of range."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(indices) and (indices.min() < -n or indices.max() >= n):
        bad = indices[(indices < -n) | (indices >= n)][0]
        raise IndexError(f"{unit} {int(bad)} out of range for {n} {unit}s")
    return np.where(indices < 0, indices + n, indices)


# A batch's rows are read as one slice from the first to the last when that slice is at most
# this big (refs, labels: a few bytes a row), else one slice per run of consecutive rows.
SPAN_BYTES = 1 << 20


def one_request(low: int, high: int, needed: int, row_bytes: int) -> bool:
    """Whether rows ``[low, high)`` are read as one slice rather than run by run, when only
    ``needed`` of them are wanted (rows of ``row_bytes``).

    The one rule for scattered rows, for every reader of a bank: the span is
    read at once when it is at most :data:`SPAN_BYTES` or twice what is
    wanted. A request costs tens of microseconds locally (more remotely), so
    a small span, or one mostly wanted, beats several requests.
    """
    return (high - low) * row_bytes <= max(SPAN_BYTES, 2 * needed * row_bytes)


def take_rows(data: Any, indices: Any) -> np.ndarray:
    """``data[indices]`` along axis 0, in the order asked, read as one slice per run of rows.

    h5py's fancy indexing (``data[[3, 70, 512]]``) builds an HDF5 union of
    hyperslabs, which cost about 40 ms for 64 rows of a chunked dataset here,
    and wants the rows sorted and unique; reading each run of consecutive rows
    as a plain slice into one array cost about 0.4 ms, and small rows (refs,
    labels) spanning at most ``SPAN_BYTES`` are read as one slice. Any order
    and repeats are fine; negative rows count from the end.
    """
    wanted, where = np.unique(absolute_rows(indices, data.shape[0]), return_inverse=True)
    if not len(wanted):
        return np.empty((0, *data.shape[1:]), dtype=data.dtype)
    low, high = int(wanted[0]), int(wanted[-1]) + 1
    row_bytes = data.dtype.itemsize * math.prod(data.shape[1:])
    if one_request(low, high, len(wanted), row_bytes):
        return data[low:high][wanted[where] - low]
    if hasattr(data, "read_rows"):  # a RowsDataset, or a sharded bank's ShardRows
        return data.read_rows(wanted)[where]
    return read_runs(data, wanted)[where]
