"""The single writer: append, commit, resume, finalize.

HDF5 takes one writer per file, so every append to a bank goes through one
:class:`BankWriter` in one process. During a build that process runs the
writer chain (``open_build`` -> ``write_partition`` x N -> ``finalize_build``,
each task depending on the previous); the open writer lives in this module's
registry, keyed by the build's token, so the file is opened once per build,
and a second build of the same path in the process is refused. A task of the
chain that runs in another process refuses with :class:`WriterError` rather
than open a second writer. If the writer's worker dies, its pinned tasks can
no longer run: ``create`` notices and raises ``WriterError``; a graph computed
directly with ``client.compute`` waits (see ``Build``). Either way the partial
bank is consistent up to its last commit, and ``create(..., mode="a")`` resumes it.

The writer only moves bytes: decode tasks have already decoded, converted and
concatenated each partition, so one commit is one resize and one write per
column, then refs, then ids (the commit record), then failures, then a flush.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import itertools
import os
import posixpath
import resource
import shutil
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from features.base import Feature
from pipeline import config, layout
from pipeline.decode import Failure, Packed, PackedColumn
from pipeline.errors import (
    DiskFullError,
    PartialSetAsideError,
    SchemaError,
    SourceError,
    WriterError,
)
from pipeline.ids import IdIndex
from pipeline.readers import ColumnSpec, RawRows, read_raw, register_plugin_filters
from pipeline.schema import feature_for_column, feature_for_value, feature_of

# Link results a writer keeps for tasks Dask may run again: a link's result is
# needed by the decode task ``window`` partitions later, so only the last few
# can be lost with a worker (the window is 2 x the cluster's threads).
_LINKS_KEPT = 4096

# Writers open in this process, by build token.
_OPEN: dict[str, BankWriter] = {}
# Paths whose build is opening here (token by path), from before its partial file exists to
# when its writer is in _OPEN: a second build of the path must not take that file meanwhile.
_OPENING: dict[str, str] = {}
_LOCK = threading.Lock()
# Builds whose writer this process closed after an error (their later tasks say so).
_ABORTED: set[str] = set()


def library_version() -> str:
    from pipeline import __version__

    return __version__


class BankWriter:
    """Appends sources to an open bank and keeps its tables consistent.

    Used by the build's writer chain and by ``TypedFile.add`` / ``set``.
    ``features`` maps feature paths to features; columns of features it does
    not know (added on the fly) are created as generic features.

    ``planned`` is how many sources this writer is planned to write: a
    build's new sources, or the sources a ``bank.map`` writes its output
    to. The chunks of the columns it creates are sized for them (see
    :func:`layout.create_column`); 0, the default (``add`` / ``set``), plans
    nothing past the write at hand, so a bank made by ``add`` starts with
    small chunks, and keeps them as it grows.
    """

    def __init__(
        self,
        f: h5py.File,
        features: dict[str, Feature],
        chunk_bytes: int = 1 << 20,
        target: str | None = None,
        fsync: bool | None = None,
        planned: int = 0,
    ) -> None:
        self.f = f
        self.fsync = bool(config.get("build.fsync") if fsync is None else fsync)
        self.features = features  # shared with the caller: features added on the fly land in it
        self.target = target  # the bank's final path, for a build (f is its partial file)
        self.chunk_bytes = chunk_bytes
        self.planned = planned
        self._written = 0  # sources this writer committed or wrote to (of the planned ones)
        self.n = layout.ids_table(f).shape[0]
        self._opened_n = self.n
        self._failures_at_open = layout.failure_tables(f)[0].shape[0]
        # What open_build returned, and each link's result: a task Dask runs again
        # (its result lost with a worker) gets them back instead of writing twice.
        self.opened: dict[str, Any] = {}
        self.links: dict[int, dict[str, Any]] = {}
        self._marks: list[int] = []  # self.n when each failure this writer recorded was
        self._index: IdIndex | None = None
        self._columns: dict[str, layout.Column] = {}
        self._listed = False
        self._codes: dict[str, dict[str, int]] = {}
        self.busy = 0.0
        self.started = time.time()

    # -- ids ----------------------------------------------------------------

    @property
    def index(self) -> IdIndex:
        """Committed id -> row, read from the id table on first use."""
        if self._index is None:
            self._index = IdIndex(layout.ids_table(self.f), self.n)
        return self._index

    # -- columns ------------------------------------------------------------

    def column(self, key: str) -> layout.Column | None:
        if key not in self._columns:
            node = self.f.get(key)
            if not layout.is_column(node):
                return None
            self._columns[key] = layout.Column.open(self.f, key)
        return self._columns[key]

    def all_columns(self) -> list[layout.Column]:
        """Every column of the bank (read from the file once; later ones are created here)."""
        if not self._listed:
            for key in layout.iter_columns(self.f):
                self.column(key)
            self._listed = True
        return list(self._columns.values())

    def _create(
        self, key: str, packed: PackedColumn, sample: np.ndarray, rows: np.ndarray
    ) -> layout.Column:
        """Create column ``key`` for its first write, ``sample``: the data of the sources at
        bank rows ``rows``, which are new sources (a commit) or ones in the bank (a map)."""
        feature = self.features[packed.feature]
        cls = type(feature)
        planned = max(len(rows), self.planned - self._written)
        adds = bool(len(rows)) and int(rows.max()) >= self.n
        column = layout.create_column(
            self.f,
            key,
            packed.storage,
            sample,
            self.n,
            feature.dataset_options,
            feature.attrs,
            f"{cls.__module__}.{cls.__qualname__}",
            self.chunk_bytes,
            sources=len(rows),
            planned=planned,
            expected=self.n + planned if adds else self.n,
        )
        self._columns[key] = column
        schema = layout.read_json_attr(self.f, layout.ATTR_SCHEMA)
        if packed.feature not in schema:
            schema[packed.feature] = feature.describe()
            layout.write_json_attr(self.f, layout.ATTR_SCHEMA, schema)
        return column

    def features_for(self, values: Mapping[str, Any]) -> dict[str, Feature]:
        """The feature of each path in ``values``: declared, rebuilt from the file, or new.

        A path neither declared nor in the file gets a generic feature chosen
        from its first value (not registered: see :meth:`register`).
        """
        out: dict[str, Feature] = {}
        for key, value in values.items():
            owner = feature_of(key, self.features)
            if owner in self.features:
                out[key] = self.features[owner]
                continue
            node = self.f.get(key)
            if layout.is_column(node):
                out[key] = feature_for_column(str(node.attrs[layout.ATTR_STORAGE]), node.attrs)
            else:
                out[key] = feature_for_value(value)
        return out

    def register(self, features: Mapping[str, Feature]) -> list[str]:
        """Add features to the ones this writer knows; return the paths that were new."""
        new = [path for path in features if feature_of(path, self.features) not in self.features]
        self.features.update({path: features[path] for path in new})
        return new

    def forget(self, paths: list[str]) -> None:
        """Drop features registered for a write that did not happen (they have no column)."""
        for path in paths:
            if self.column(path) is None:
                self.features.pop(path, None)

    # -- checking a packed column against its dataset -----------------------

    def _check(self, key: str, packed: PackedColumn, skip: set[int]) -> dict[int, str]:
        """Rows (positions) whose entry cannot go into column ``key``, with the reason."""
        column = self.column(key)
        if column is not None and column.storage != packed.storage:
            reason = (
                f"stored as {packed.storage!r} but the column stores {column.storage!r} (its "
                "feature is fixed by the first data written; give the feature explicitly)"
            )
            return {row: reason for row in packed.rows if row not in skip}
        if packed.storage == "category":
            return {}
        target = None if column is None else (column.data.shape[1:], column.data.dtype)
        if isinstance(packed.data, np.ndarray):  # every entry shares one shape and dtype
            reason = _mismatch(packed.data, target)
            return {row: reason for row in packed.rows if row not in skip} if reason else {}
        bad: dict[int, str] = {}
        for row, entry in zip(packed.rows, packed.data, strict=True):
            if row in skip:
                continue
            if target is None:
                target = (entry.shape[1:], entry.dtype)  # the first entry will create the column
            reason = _mismatch(entry, target)
            if reason:
                bad[row] = reason
        return bad

    # -- the commit ----------------------------------------------------------

    def commit(self, packed: Packed, on_error: str = "skip") -> dict[str, int]:
        """Append a partition's sources, commit their ids, record its failures.

        Ids already committed are skipped (a re-run or an append), so a commit
        is idempotent. With ``on_error="raise"`` the first failure raises
        :class:`SourceError` before anything of the partition is written.
        """
        started = time.perf_counter()
        skip = set(np.flatnonzero(self.index.rows(packed.ids) >= 0).tolist())
        failures = list(packed.failures)
        rejected = self._screen(packed, skip, failures, on_error)
        keep = [row for row in range(len(packed.ids)) if row not in skip and row not in rejected]
        bank_row = {row: self.n + k for k, row in enumerate(keep)}
        n_new = self.n + len(keep)
        self._check_space(packed, len(keep))
        with self._rollback_on_error():
            touched = set()
            for key, column in packed.columns.items():
                entries = [j for j, row in enumerate(column.rows) if row in bank_row]
                if entries:
                    rows = np.array([bank_row[column.rows[j]] for j in entries], dtype=np.int64)
                    self._append(key, column, entries, rows, n_new)
                    touched.add(key)
            for column in self.all_columns():
                if column.path not in touched:
                    layout.resize_sources(column, n_new)
            new_ids = [packed.ids[row] for row in keep]
            layout.append_strings(layout.ids_table(self.f), new_ids)
            self.index.add(new_ids, self.n)
            self.n = n_new
            self._record(failures)
            self._durable()
        self._written += len(keep)
        self.busy += time.perf_counter() - started
        return {"ok": len(keep), "failed": len(failures), "skipped": len(skip)}

    def _durable(self) -> None:
        """Make what was written durable, then record it as committed (see pipeline.layout)."""
        self.f.flush()
        self._sync()  # on disk, not only in the page cache, before the record says so
        layout.mark_committed(self.f)
        self.f.flush()
        self._sync()

    def _sync(self) -> None:
        """``fsync`` the file, so a machine that dies (not only a process) keeps the commit.

        Skipped with ``h5bank.build.fsync: false``, or for HDF5 drivers with
        no file descriptor; an error of the sync itself (how NFS and quotas
        report writes that failed later) raises.
        """
        if self.fsync:
            _fsync(self.f)

    def _screen(
        self, packed: Packed, skip: set[int], failures: list[Failure], on_error: str
    ) -> dict[int, Failure]:
        """The entries (positions) the columns cannot take, added to ``failures``.

        With ``on_error="raise"``, the first failure raises :class:`SourceError`
        before anything is written.
        """
        rejected: dict[int, Failure] = {}
        for key, column in packed.columns.items():
            for row, reason in self._check(key, column, skip).items():
                rejected.setdefault(
                    row, Failure(packed.ids[row], column.feature, f"ValueError: {reason}")
                )
        failures.extend(rejected[row] for row in sorted(rejected))
        if on_error == "raise" and failures:
            first = failures[0]
            raise SourceError(first.id, first.feature, first.error)
        return rejected

    def _check_space(self, packed: Packed, sources: int) -> None:
        """Refuse a commit the disk (or the process's file-size limit) has no room for.

        Checked before anything of the commit is written, so a full disk stops
        the build at its last commit instead of halfway through one (HDF5 can
        neither finish nor undo a write that failed for space). The estimate
        is generous: the data uncompressed, plus two chunks per column and a
        MiB for the bookkeeping.
        """
        if not sources:
            return
        needed = 1 << 20  # the bookkeeping: refs, ids, failures, HDF5's metadata
        for key, packed_column in packed.columns.items():
            entries = (
                [packed_column.data]
                if isinstance(packed_column.data, np.ndarray)
                else list(packed_column.data or [])
            )
            column = self.column(key)
            if packed_column.storage == "category":
                needed += 8 * len(packed_column.rows)
                continue
            for entry in entries:
                size = getattr(entry, "size", None)
                itemsize = column.data.dtype.itemsize if column is not None else None
                if size is not None and itemsize:  # as the column stores it (float32 -> float64)
                    needed += int(size) * itemsize
                else:
                    needed += int(getattr(entry, "nbytes", None) or len(entry))
            needed += self.chunk_bytes  # the chunk the new rows start in
        folder = os.path.dirname(os.path.abspath(self.f.filename))
        free = shutil.disk_usage(folder).free
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        room = free
        if limit != resource.RLIM_INFINITY:
            room = min(room, limit - self.f.id.get_filesize())
        if needed > room:
            what = (
                f"{human_bytes(free)} free in {folder}"
                if room == free
                else f"a file-size limit of {human_bytes(limit)} (ulimit -f)"
            )
            raise DiskFullError(
                f"no room to commit {sources} more sources to {self.f.filename}: {what}, about "
                f"{human_bytes(needed)} needed. Nothing of them was written; the {self.n} "
                "sources committed are kept: free space, then retry (a build: resume it with "
                "mode='a' or h5bank build --resume)"
            )

    @contextlib.contextmanager
    def _rollback_on_error(self) -> Any:
        """Cut the bank back to its last commit if writing fails half-way (I/O error, full disk)."""
        try:
            yield
        except BaseException as error:
            if _disk_full(error):
                # HDF5 cannot write anything more to this file: the truncate below
                # would fail again. Its last commit is on disk; a resume cuts the rest.
                raise DiskFullError(
                    f"the disk filled up while writing {self.f.filename} ({error}). The "
                    f"{self.n} sources committed before are kept: free space, then resume "
                    "(mode='a', h5bank build --resume)"
                ) from error
            with contextlib.suppress(Exception):  # the file itself may be what broke
                layout.truncate(self.f)
                self.f.flush()
            self.n = layout.ids_table(self.f).shape[0]
            self._index = None
            self._columns, self._listed, self._codes = {}, False, {}
            recorded = layout.failure_tables(self.f)[0].shape[0] - self._failures_at_open
            self._marks = self._marks[: max(0, recorded)]
            raise

    def _append(
        self, key: str, packed: PackedColumn, entries: list[int], rows: np.ndarray, n_new: int
    ) -> None:
        """Append the chosen entries of a packed column and point their refs at them."""
        lengths = np.array([packed.lengths[j] for j in entries], dtype=np.int64)
        if packed.storage == "category":
            data = self._codes_for(key, packed, entries, rows)
        elif isinstance(packed.data, np.ndarray) and len(entries) == len(packed.rows):
            data = packed.data  # the whole packed array: no copy
        else:
            parts = _split(packed)
            data = np.concatenate([parts[j] for j in entries])
        column = self.column(key) or self._create(key, packed, data, rows)
        if packed.storage == "category":
            data = data.astype(column.data.dtype, copy=False)
        start = column.data.shape[0]
        if len(data):
            column.data.resize(start + len(data), axis=0)
            if not self._store_compressed(column, packed, entries, start):
                column.data[start:] = data
        stops = start + np.cumsum(lengths)
        refs = np.stack([stops - lengths, stops], axis=1)
        layout.resize_sources(column, n_new)
        layout.write_refs(column, rows, refs)
        if column.shape is not None and packed.shapes is not None:
            layout.write_shapes(column, rows, [packed.shapes[j] for j in entries])

    def _store_compressed(
        self, column: layout.Column, packed: PackedColumn, entries: list[int], start: int
    ) -> bool:
        """Store the rows a decode task filtered as they are (HDF5 direct chunk writes), if
        the dataset's filters made them; ``False`` to write ``data`` through h5py instead
        (a bank made before one-row chunks, rows of another dtype that h5py casts)."""
        filtered = packed.filtered
        if filtered is None or filtered.pipeline != layout.filter_pipeline(column.data):
            return False
        zeros = (0,) * (column.data.ndim - 1)
        write = column.data.id.write_direct_chunk
        for i, j in enumerate(entries):
            write((start + i, *zeros), filtered.chunks[j], filter_mask=filtered.masks[j])
        return True

    def _codes_for(
        self, key: str, packed: PackedColumn, entries: list[int], rows: np.ndarray
    ) -> np.ndarray:
        """The label codes of the chosen entries (``rows``: their bank rows); new names are
        added to the column (created if it is new)."""
        column = self.column(key)
        codes = self._codes.get(key)
        if codes is None:
            names = layout.category_names(column) if column is not None else []
            codes = self._codes[key] = {name: code for code, name in enumerate(names)}
        before = len(codes)
        out = np.empty(len(entries), dtype=np.int64)
        for i, j in enumerate(entries):
            out[i] = codes.setdefault(packed.data[j], len(codes))
        if len(codes) != before:
            column = self.column(key) or self._create(key, packed, out, rows)
            layout.set_category_names(column, list(codes))
        return out

    def _record(self, failures: list[Failure]) -> None:
        if not failures:
            return
        self._marks.extend([self.n] * len(failures))
        tables = layout.failure_tables(self.f)
        columns = zip(*[(f.id, f.feature, f.error) for f in failures], strict=True)
        for table, values in zip(tables, columns, strict=True):
            layout.append_strings(table, list(values))

    # -- single sources, on the fly --------------------------------------------

    def update(self, id_: str, values: Mapping[str, Any], replace: bool) -> None:
        """Write the columns of an existing source (``add``: only where it has none; ``set``: any).

        Every column is checked before any is written, so a refused update
        writes nothing.
        """
        row = self.index[id_]
        started = time.perf_counter()
        planned = []
        for key, entry in values.items():
            feature = feature_of(key, self.features)
            packed = _single(feature, self.features[feature].storage, entry)
            column = self.column(key)
            has_data = (
                column is not None and row < column.refs.shape[0] and column.refs[row][0] >= 0
            )
            if has_data and not replace:
                raise ValueError(
                    f"source {id_!r} already has data in {key!r}; use set() to replace it"
                )
            bad = self._check(key, packed, set())
            if bad:
                raise ValueError(f"cannot write {key!r} of {id_!r}: {bad[0]}")
            planned.append((key, packed, column if has_data else None))
        with self._rollback_on_error():
            for key, packed, column in planned:
                if column is None or not self._overwrite(column, key, packed, row):
                    self._append(key, packed, [0], np.array([row]), self.n)
            self._durable()
        self.busy += time.perf_counter() - started

    def _overwrite(self, column: layout.Column, key: str, packed: PackedColumn, row: int) -> bool:
        """Replace a source's data in place when the new data has the same extent."""
        start, stop = (int(v) for v in column.refs[row])
        if packed.storage == "category":
            column.data[start] = self._codes_for(key, packed, [0], np.array([row]))[0]
            return True
        entry = _split(packed)[0]
        if stop - start != len(entry) or entry.shape[1:] != column.data.shape[1:]:
            return False  # appended instead; the old rows are left unreferenced
        if not _castable(entry.dtype, column.data.dtype):
            return False
        column.data[start:stop] = entry
        if column.shape is not None and packed.shapes is not None:
            layout.write_shapes(column, np.array([row]), packed.shapes)
        return True

    def add_source(self, id_: str, values: Mapping[str, Any]) -> None:
        """Commit a new source with the given column entries."""
        packed_columns = {}
        for key, entry in values.items():
            feature = feature_of(key, self.features)
            packed_columns[key] = _single(feature, self.features[feature].storage, entry)
        try:
            self.commit(Packed(0, [id_], packed_columns, []), on_error="raise")
        except SourceError as error:
            raise ValueError(f"cannot add {id_!r}: {error.reason}") from None

    def attach(self, packed: Packed, on_error: str = "skip") -> dict[str, int]:
        """Write new column data for sources already in the bank (``bank.map`` with ``output``).

        Each entry goes to the row of its (committed) id; a source that has
        data in a column already is skipped, so a re-run only fills the gaps.
        Rows are appended first and refs written second, so a crash between
        the two leaves rows no ref points to, which :func:`layout.truncate`
        drops. Failures are recorded like a build's.
        """
        started = time.perf_counter()
        self.register(packed.features)
        failures = list(packed.failures)
        rows = self.index.rows(packed.ids)
        unknown = set(np.flatnonzero(rows < 0).tolist())
        failures.extend(
            Failure(packed.ids[p], "", "UnknownIdError: the source is not in the bank")
            for p in sorted(unknown)
        )
        skip = set(unknown)
        for key, column in packed.columns.items():
            skip |= self._rows_with_data(key, column, rows)
        rejected = self._screen(packed, skip, failures, on_error)
        keep = {
            position: int(rows[position])
            for position in range(len(packed.ids))
            if position not in skip and position not in rejected
        }
        with self._rollback_on_error():
            for key, column in packed.columns.items():
                entries = sorted(
                    (j for j, position in enumerate(column.rows) if position in keep),
                    key=lambda j: keep[column.rows[j]],
                )
                if entries:
                    rows = np.array([keep[column.rows[j]] for j in entries], dtype=np.int64)
                    self._append(key, column, entries, rows, self.n)
            self._record(failures)
            self._durable()
        self._written += len(keep)
        self.busy += time.perf_counter() - started
        return {"ok": len(keep), "failed": len(failures), "skipped": len(skip - unknown)}

    def _rows_with_data(self, key: str, packed: PackedColumn, bank_rows: np.ndarray) -> set[int]:
        """Positions (in the partition) of the sources that already have data in column ``key``;
        ``bank_rows`` is each position's row in the bank (``-1``: not in it)."""
        column = self.column(key)
        positions = [p for p in packed.rows if bank_rows[p] >= 0]
        if column is None or not positions:
            return set()
        rows = bank_rows[positions]
        low = int(rows.min())
        starts = column.refs[low : int(rows.max()) + 1, 0]
        return {p for p, row in zip(positions, rows, strict=True) if starts[row - low] >= 0}

    def _has_data(self, feature: str, row: int) -> bool:
        """Whether source ``row`` has data in ``feature``'s column (or any column below it)."""
        return any(
            (column.path == feature or column.path.startswith(feature + "/"))
            and row < column.refs.shape[0]
            and column.refs[row, 0] >= 0
            for column in self.all_columns()
        )

    # -- finishing a build -------------------------------------------------------

    def sort_categories(self) -> None:
        """Renumber every category column so its names are sorted (label i is names[i])."""
        for column in self.all_columns():
            if column.storage == "category":
                names = layout.category_names(column)
                if names != sorted(names):
                    self._columns[column.path] = layout.renumber_category(column, sorted(names))
                    self._codes.pop(column.path, None)

    def compact_failures(self) -> list[Failure]:
        """Keep the latest failure per id (per id and feature for sources in the bank).

        A failure is dropped when its id was committed after the failure was
        recorded (a retry that worked), or when the feature it names has data
        for the source now (a ``bank.map`` that failed for a source, re-run).
        A duplicate of a committed id failed after its id was committed, so
        it is kept. Returns the failures kept that this writer recorded (what
        its build's summary lists: the bank's earlier ones are not news).
        """
        tables = layout.failure_tables(self.f)
        rows = list(zip(*[layout.read_strings(t) for t in tables], strict=True))
        # Sources committed when each failure was recorded: this writer's own failures
        # carry the count; earlier ones happened before it opened the bank.
        marks = [self._opened_n] * (len(rows) - len(self._marks)) + self._marks
        # A source not in the bank keeps its latest failure; a source in the bank keeps
        # one per feature (maps into different outputs fail independently).
        latest: dict[tuple[str, str | None], tuple[int, Failure]] = {}
        bank_rows = self.index.rows([id_ for id_, _, _ in rows]).tolist()
        for i, ((id_, feature, error), mark, row) in enumerate(
            zip(rows, marks, bank_rows, strict=True)
        ):
            key = (id_, feature if 0 <= row < mark else None)
            latest.pop(key, None)
            if row >= mark:
                continue  # committed since it failed
            if row >= 0 and feature and self._has_data(feature, row):
                continue  # a map over the bank that failed for it has worked since
            latest[key] = (i, Failure(id_, feature, error))
        kept = [failure for _, failure in latest.values()]
        mine = len(rows) - len(self._marks)  # the failures from here on are this writer's
        recorded = [failure for i, failure in latest.values() if i >= mine]
        if len(kept) != len(rows):
            # Rewritten in fresh storage, never in place (see layout.replace_failures).
            self.f.flush()
            layout.replace_failures(
                self.f,
                [(failure.id, failure.feature or "", failure.error) for failure in kept],
                sync=self._sync,
            )
            self._marks = []
        return recorded

    def summary_columns(self) -> dict[str, dict[str, Any]]:
        return {
            column.path: {
                "rows": int(column.data.shape[0]),
                "bytes": layout.storage_bytes(column.group),
                "shape": list(column.data.shape),
                "dtype": str(column.data.dtype),
            }
            for column in sorted(self.all_columns(), key=lambda c: c.path)
        }


def _split(packed: PackedColumn) -> list[Any]:
    """The entries of a packed column, one per source."""
    if not isinstance(packed.data, np.ndarray):
        return list(packed.data)
    bounds = np.cumsum([0, *packed.lengths])
    return [packed.data[a:b] for a, b in itertools.pairwise(bounds)]


def _mismatch(entry: np.ndarray, target: tuple[tuple[int, ...], np.dtype] | None) -> str | None:
    """Why ``entry`` cannot join a column storing ``target`` (trailing shape, dtype), if it cannot."""
    if target is None:
        return None
    shape, dtype = target
    if entry.shape[1:] != shape:
        return f"trailing shape {entry.shape[1:]} does not match the shape {shape} this feature already stores"
    if not _castable(entry.dtype, dtype):
        return (
            f"dtype {entry.dtype} does not match the dtype {dtype} this feature already stores "
            "(set dtype= on the feature to convert)"
        )
    return None


def _castable(source: np.dtype, target: np.dtype) -> bool:
    """Safe casts, plus float to float (stored precision chosen by the first source)."""
    return np.can_cast(source, target, "safe") or (source.kind == target.kind == "f")


def _single(feature: str, storage: str, entry: Any) -> PackedColumn:
    if storage == "category":
        return PackedColumn(feature, storage, [0], [1], [entry])
    array, shape = entry
    return PackedColumn(
        feature, storage, [0], [len(array)], array, [shape] if shape is not None else None
    )


# -- the writer chain of a build ---------------------------------------------------


@dataclass
class BuildPlan:
    """What every task of a build's writer chain needs; picklable and small."""

    token: str
    path: str
    mode: str
    features: dict[str, Feature]
    on_error: str
    provenance: dict[str, Any]
    chunk_bytes: int
    skipped: int = 0
    pinned: bool = False
    fsync: bool = True  # h5bank.build.fsync where the build was made
    # Sources the chain is planned to write (the sum of its partition sizes): a build's new
    # sources, a map's existing ones. The chunks of the tables and columns it creates are
    # sized for them (layout.create_column); 0: nothing planned, small chunks.
    planned: int = 0


@dataclass
class BuildSummary:
    """What a build did: counts, per-column rows and bytes, time, and the failures it recorded
    (``failures``; the bank keeps every build's in ``bank.failures()``)."""

    path: str
    ok: int
    failed: int
    skipped: int
    sources: int
    columns: dict[str, dict[str, Any]]
    failures: list[Failure] = field(default_factory=list)
    writer_seconds: float = 0.0
    seconds: float = 0.0
    writer_pid: int = 0
    action: str = "built"  # or "mapped f() into thumbs of", for bank.map
    notes: list[str] = field(default_factory=list)  # what the build did besides building

    @property
    def _had(self) -> str:
        return "in the bank" if self.action == "built" else "done"

    @property
    def rate(self) -> float:
        """Sources committed per second of wall time."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        lines = [
            f"{self.action} {self.path}: {self.ok} sources ok, {self.failed} failed"
            + (f", {self.skipped} already {self._had}" if self.skipped else "")
            + f"; {self.sources} in the bank",
            f"  {self.seconds:.2f} s, {self.rate:,.0f} sources/s, writer busy {self.writer_seconds:.2f} s",
        ]
        for path, info in self.columns.items():
            lines.append(
                f"  {path:<24} {info['rows']:>10,} rows  {human_bytes(info['bytes']):>9}  "
                f"{info['dtype']} {tuple(info['shape'])}"
            )
        lines.extend(f"  note: {note}" for note in self.notes)
        for failure in self.failures[:10]:
            lines.append(f"  failed: {failure}")
        if len(self.failures) > 10:
            lines.append(f"  ... and {len(self.failures) - 10} more failures (bank.failures())")
        return "\n".join(lines)


def human_bytes(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, as file managers show sizes)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{int(n)} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def open_build(plan: BuildPlan) -> dict[str, Any]:
    """First task of the chain: open (or resume) the partial bank in this process.

    Nothing on disk changes until the bank to append to has opened for
    writing and passed its checks; only then is it renamed to the partial path.
    """
    if not plan.pinned:
        _refuse_on_a_worker(plan)
    with _LOCK:
        mine = _OPEN.get(plan.token)
        other = next((t for t, w in _OPEN.items() if w.target == plan.path), None)
        other = other or _OPENING.get(plan.path)
        if mine is None and other is None:
            _OPENING[plan.path] = plan.token
    if mine is not None:  # Dask ran this task again (its result was lost): it is open here
        return mine.opened
    if other is not None:
        raise WriterError(
            f"a build of {plan.path} (build {other}) is still writing it in this process; wait "
            "for it, or abort it (Build.abort()) if it was cancelled"
        )
    try:
        return _open_build(plan)
    finally:
        with _LOCK:
            _OPENING.pop(plan.path, None)


def _open_build(plan: BuildPlan) -> dict[str, Any]:
    """:func:`open_build` once this process holds the path (``_OPENING``)."""
    partial = layout.partial_path(plan.path)
    has_partial, has_bank = os.path.exists(partial), os.path.exists(plan.path)
    notes: list[str] = []
    if plan.mode == "a" and has_partial:
        unusable = _unusable_partial(partial)
        if unusable:
            notes.append(unusable)
            has_partial = False
    if plan.mode == "a" and has_partial and has_bank:
        raise WriterError(
            f"both {plan.path} and {partial} exist: the partial file is a build that stopped, and "
            f"resuming it would replace the bank. Delete {partial} to append to the bank, or move "
            "the bank away to resume the stopped build"
        )
    resuming = plan.mode == "a" and (has_partial or has_bank)
    if resuming and has_partial:
        try:
            f = _resume_partial(partial, plan)
        except (OSError, RuntimeError, KeyError, ValueError) as error:
            if not _broken(error):
                raise
            # HDF5 cannot make sense of what the killed build left (its flushes are not
            # atomic): keep the file aside and build again, rather than never resuming.
            aside = f"{partial}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}"
            os.replace(partial, aside)
            if plan.skipped:
                # This build was planned without the sources the partial file said it
                # committed: building now would leave them out. The next run plans anew.
                raise PartialSetAsideError(
                    f"{partial} could not be resumed ({error}); it was moved to {aside}. "
                    "Run the build again (mode='a', h5bank build --resume): it will build "
                    "every source anew"
                ) from None
            notes.append(
                f"{partial} could not be resumed ({error}): moved to {aside}, building again"
            )
            resuming = has_partial = False
    if resuming and not has_partial:
        f = _open_for_writing(plan.path, "r+")
        try:
            layout.check_format(f)
            _merge_schema(f, plan.features)
            layout.truncate(f)
        except BaseException:
            f.close()
            raise
    elif not resuming:
        if os.path.exists(partial):
            _remove_stale_partial(partial)
        f = _open_for_writing(partial, "w-")
    try:
        if not resuming:
            schema = {path: feature.describe() for path, feature in plan.features.items()}
            layout.init_bank(
                f,
                schema,
                {"library": f"h5bank {library_version()}", "builds": []},
                expected=plan.planned,
            )
        layout.set_state(f, layout.BUILDING)
        f.flush()
        if resuming and not has_partial:
            os.replace(plan.path, partial)  # the bank is open: POSIX renames it under us
        writer = BankWriter(
            f,
            plan.features,
            plan.chunk_bytes,
            target=plan.path,
            fsync=plan.fsync,
            planned=plan.planned,
        )
    except BaseException:
        f.close()
        raise
    writer.opened = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "ok": 0,
        "failed": 0,
        "skipped": plan.skipped,
        "notes": notes,
    }
    with _LOCK:
        _OPEN[plan.token] = writer
    return writer.opened


def _fsync(f: h5py.File) -> None:
    """``fsync`` ``f`` when its HDF5 driver has a file descriptor."""
    try:
        handle = f.id.get_vfd_handle()
    except Exception:
        return
    if isinstance(handle, int):
        os.fsync(handle)


def _disk_full(error: BaseException) -> bool:
    """Whether ``error`` is a write refused for space (HDF5 reports the errno in its text)."""
    text = str(error)
    return any(
        marker in text
        for marker in ("errno = 28", "errno = 27", "errno = 122", "No space left", "File too large",
                       "Disk quota exceeded")
    ) or getattr(error, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # fmt: skip


def _locked(error: OSError) -> bool:
    text = str(error)
    return "unable to lock file" in text or "already open" in text


# What HDF5 says of a file that is not (or no longer) an HDF5 file it can read.
_BROKEN = ("signature not found", "truncated file", "superblock", "bad object header", "bad heap",
           "bad symbol table", "bad B-tree", "not an HDF5 file", "addr overflow",
           "not aligned", "global heap", "len not positive", "doesn't exist",
           "past end of allocation", "bad local heap", "free list", "link count",
           "delete link", "header version")  # fmt: skip


def _broken(error: BaseException) -> bool:
    """Whether HDF5 says a file's structure is damaged (not a lock, I/O or permission)."""
    return not (isinstance(error, OSError) and _locked(error)) and any(
        word in str(error) for word in _BROKEN
    )


def _resume_partial(partial: str, plan: BuildPlan) -> h5py.File:
    """Open a stopped build's partial file and cut it back to its last commit."""
    f = _open_for_writing(partial, "r+")
    try:
        layout.check_format(f)
        _merge_schema(f, plan.features)
        layout.truncate(f, rebuild=True, sync=(lambda: _fsync(f)) if plan.fsync else None)
    except BaseException:
        with contextlib.suppress(Exception):
            f.close()
        raise
    return f


def _unusable_partial(partial: str) -> str | None:
    """Why a stopped build's partial file cannot be resumed (it was set aside), or ``None``.

    A build killed while it created the file leaves one that is no bank yet
    (nothing was committed): it is deleted. A file HDF5 cannot read as HDF5
    (cut short, overwritten) is renamed to ``PARTIAL.unreadable-<time>``,
    kept and not deleted, and the build starts again. Any other error
    opening it (too many open files, I/O, permissions) raises: nothing is
    touched.
    """
    try:
        with h5py.File(partial, "r", locking="best-effort") as f:
            if layout.is_bank(f):
                return None
    except OSError as error:
        if _locked(error):
            return None  # a live writer: opening it for writing says so
        if not _broken(error):
            raise WriterError(
                f"cannot open {partial} to resume the build it holds ({error}); nothing was "
                "changed: fix that and resume again"
            ) from None
        aside = f"{partial}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}"
        os.replace(partial, aside)
        return f"{partial} is not an HDF5 file HDF5 can read ({error}): moved to {aside}, building again"
    os.remove(partial)
    return f"{partial} was not a bank yet (its build stopped while creating it): removed"


def _open_for_writing(path: str, mode: str) -> h5py.File:
    register_plugin_filters()  # the bank's features may use hdf5plugin's filters
    try:
        return h5py.File(path, mode, locking="best-effort")
    except OSError as error:
        if _locked(error):
            raise WriterError(
                f"cannot open {path} for writing: it is open elsewhere ({error}). Close every "
                "handle on it (another build, a program, or a bank this process opened: the bank "
                "create() returned counts; Dask workers that read it keep it open until "
                "client.run(pipeline.readers.release, path)) and retry; nothing was changed"
            ) from None
        raise WriterError(f"cannot open {path} as an HDF5 file for writing: {error}") from None


def _remove_stale_partial(partial: str) -> None:
    """Delete a stopped build's partial file, unless a live writer holds it."""
    try:
        with h5py.File(partial, "r+"):
            pass
    except OSError as error:
        if _locked(error):
            raise WriterError(
                f"{partial} is being written by another build; wait for it or stop it first"
            ) from None
    os.remove(partial)


def _refuse_on_a_worker(plan: BuildPlan) -> None:
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return  # not on a distributed worker: an in-process scheduler runs the whole chain
    raise WriterError(
        f"the build of {plan.path} was made without a cluster, so its writer chain is not pinned "
        "to one worker, and it is running on a distributed worker: make the graph with "
        "Bank.graph(path, sources, scheduler=client)"
    )


def check_schema(f: h5py.File, features: Mapping[str, Feature]) -> dict[str, Any]:
    """The bank's schema records merged with ``features``; raises if a feature differs.

    A feature the bank already has must match its record (storage, parameters,
    dataset options): appending ``Image(mode="L")`` to a bank of RGB images, or
    sounds at another rate, would mix incompatible data in one column.
    """
    stored = layout.read_json_attr(f, layout.ATTR_SCHEMA)
    for path, feature in features.items():
        old, new = stored.get(path), feature.describe()
        if old is None:
            stored[path] = new
            continue
        differ = [k for k in ("storage", "attrs", "dataset") if old.get(k) != new.get(k)]
        if differ:
            detail = "; ".join(f"{k}: bank {old.get(k)!r}, now {new.get(k)!r}" for k in differ)
            raise SchemaError(
                f"{f.filename}: feature {path!r} differs from the one the bank was built with "
                f"({detail}); use the bank's settings, or build into a new file (mode='w')"
            )
    return stored


def _merge_schema(f: h5py.File, features: Mapping[str, Feature]) -> None:
    merged = check_schema(f, features)
    if merged != layout.read_json_attr(f, layout.ATTR_SCHEMA):
        layout.write_json_attr(f, layout.ATTR_SCHEMA, merged)


def _writer_here(plan: BuildPlan, state: dict[str, Any]) -> BankWriter:
    writer = _OPEN.get(plan.token)
    if writer is None and plan.token in _ABORTED:
        raise WriterError(
            f"the build of {plan.path} stopped after an error (raised by an earlier task); "
            "its writer is closed. The partial bank is consistent up to its last commit"
        )
    if writer is None or state["pid"] != os.getpid() or state["host"] != socket.gethostname():
        raise WriterError(
            f"the writer of {plan.path} was opened by process {state['pid']} on {state['host']}, but "
            f"its next task ran in process {os.getpid()} on {socket.gethostname()}: the writer's "
            "process died or the chain was not pinned to one worker (build through "
            "Bank.create, or pass scheduler= to Bank.graph). The partial bank is consistent up to "
            "its last commit; resume with mode='a'"
        )
    return writer


def write_partition(
    plan: BuildPlan, packed: Packed, state: dict[str, Any], k: int = -1
) -> dict[str, Any]:
    """Link ``k`` of the chain: commit one decoded partition."""
    return _link(plan, state, lambda writer: writer.commit(packed, plan.on_error), k)


def _link(plan: BuildPlan, state: dict[str, Any], write: Any, k: int = -1) -> dict[str, Any]:
    """Run ``write(writer)`` in this build's writer; add its counts to ``state``.

    A failing write closes the writer (the partial bank stays, consistent up
    to its last commit) before the error goes on. Link ``k`` runs once per
    build: Dask runs a task again when a worker holding its only result dies
    (a decode worker that had received it as a dependency), and the commit it
    made is already on disk, so the re-run returns what the first run did.
    """
    writer = _writer_here(plan, state)
    if k in writer.links:
        return writer.links[k]
    try:
        counts = write(writer)
    except BaseException:
        abort_build(plan.token)
        raise
    result = {**state, **{key: state[key] + v for key, v in counts.items()}}
    if k >= 0:
        writer.links[k] = result
        while len(writer.links) > _LINKS_KEPT:  # only recent links can be run again
            del writer.links[next(iter(writer.links))]
    return result


def read_partition(
    plan: BuildPlan, state: dict[str, Any], columns: list[ColumnSpec], rows: Any, after: Any = None
) -> RawRows | None:
    """A link beside the chain (``bank.map``): read sources' inputs through the writer's handle.

    The bank is open for writing in this process only, so its inputs are read
    here, as stored, and handed to the tasks that run the function on any
    worker, which also turn them into values (decoders run there, not here).
    ``after`` is only a dependency (back-pressure).
    """
    if plan.token in _ABORTED:
        return None  # the chain stopped on an error; that error is the one to report
    return read_raw(_writer_here(plan, state).f, columns, rows)


def attach_partition(
    plan: BuildPlan, packed: Packed, state: dict[str, Any], k: int = -1
) -> dict[str, Any]:
    """Link ``k`` of a ``bank.map`` chain: write a partition's results to existing sources."""
    return _link(plan, state, lambda writer: writer.attach(packed, plan.on_error), k)


def finalize_build(plan: BuildPlan, state: dict[str, Any]) -> BuildSummary:
    """Last task of the chain: sort labels, compact failures, close, rename into place."""
    writer = _writer_here(plan, state)
    f = writer.f
    try:
        writer.sort_categories()
        failures = writer.compact_failures()
        provenance = layout.read_json_attr(f, layout.ATTR_PROVENANCE)
        provenance["library"] = f"h5bank {library_version()}"
        provenance.setdefault("builds", []).append(
            {
                **plan.provenance,
                "started": dt.datetime.fromtimestamp(writer.started, dt.timezone.utc).isoformat(),
                "finished": dt.datetime.now(dt.timezone.utc).isoformat(),
                "ok": state["ok"],
                "failed": state["failed"],
                "skipped": state["skipped"],
            }
        )
        layout.write_json_attr(f, layout.ATTR_PROVENANCE, provenance)
        summary = BuildSummary(
            path=plan.path,
            ok=state["ok"],
            failed=state["failed"],
            skipped=state["skipped"],
            sources=writer.n,
            columns=writer.summary_columns(),
            failures=failures,
            writer_seconds=writer.busy,
            seconds=time.time() - writer.started,  # create() replaces it with its wall time
            writer_pid=os.getpid(),
            action=_action(plan.provenance),
            notes=list(state.get("notes", [])),
        )
        layout.mark_committed(f)  # the failure tables were compacted
        layout.set_state(f, layout.COMPLETE)
        f.flush()
    except BaseException:
        abort_build(plan.token)
        raise
    with _LOCK:
        _OPEN.pop(plan.token, None)
    f.close()
    os.replace(layout.partial_path(plan.path), plan.path)
    return summary


def upload_bank(local: str, url: str, storage_options: Mapping[str, Any] | None) -> None:
    """Copy a finished bank to ``url``; never a partially written object at ``url``.

    Object stores (S3, GCS, Azure) show an object only once its upload has
    completed, so the bank is put there directly. Elsewhere it is uploaded
    under a temporary name and moved onto ``url``.
    """
    from pipeline.readers import remote_fs
    from pipeline.sources import redact, scrub

    fs, path = remote_fs(url, storage_options)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    try:
        if protocols & _OBJECT_STORES:
            fs.put_file(local, path)
        else:
            staging = path + layout.PARTIAL_SUFFIX
            fs.put_file(local, staging)
            fs.mv(staging, path)
    except Exception as error:
        raise WriterError(
            f"the bank was built but could not be uploaded to {redact(url)}: "
            f"{type(error).__name__}: {scrub(str(error))}"
        ) from None


_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"}


def check_upload_target(url: str, storage_options: Mapping[str, Any] | None) -> None:
    """Fail now, not after the build, when ``url``'s bucket (or folder) cannot be reached."""
    from pipeline.readers import remote_fs
    from pipeline.sources import redact, scrub, transient

    fs, path = remote_fs(url, storage_options)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    parent = path.split("/")[0] if protocols & _OBJECT_STORES else posixpath.dirname(path)
    if not parent:
        return
    try:
        # Listing tells a missing bucket (FileNotFoundError) from one these credentials may
        # not list but may write to (PermissionError: a least-privilege put-only policy).
        fs.ls(parent, detail=False)
    except PermissionError:
        return
    except FileNotFoundError as error:
        if transient(error):
            raise WriterError(
                f"cannot reach {redact(url)} to upload the bank to ({scrub(str(error))}); "
                "nothing was built"
            ) from None
        raise WriterError(
            f"{redact(url)}: {parent!r} does not exist, so the bank could not be uploaded there; "
            "create it first. Nothing was built"
        ) from None
    except Exception as error:
        if transient(error):
            raise WriterError(
                f"cannot reach {redact(url)} to upload the bank to: {type(error).__name__}: "
                f"{scrub(str(error))}; nothing was built"
            ) from None
        # Anything else (an odd filesystem that cannot list) is left to the upload itself.


def restore_after_failure(path: str, error: BaseException) -> None:
    """Put back a complete bank whose ``bank.map`` failed, as of its last commit.

    A map renames the bank to its partial path while it writes; when the map
    fails (a function error with ``on_error="raise"``, a dead writer), this
    reopens the partial bank in this process, cuts it to its last commit and
    renames it back. If it cannot (the writer is still open somewhere), a
    note on ``error`` says how to resume by hand.
    """
    partial = layout.partial_path(path)
    if os.path.exists(path) or not os.path.exists(partial):
        return
    plan = BuildPlan(
        token=f"restore-{os.getpid()}-{time.time_ns()}",
        path=path,
        mode="a",
        features={},
        on_error="skip",
        provenance={"mode": "map stopped", "error": f"{type(error).__name__}: {error}"[:500]},
        chunk_bytes=1 << 20,
    )
    try:
        finalize_build(plan, open_build(plan))
    except Exception as failure:
        error.add_note(
            f"h5bank: {path} is left at {partial} ({failure}); resume with "
            "create(path, [], mode='a') once nothing else writes it"
        )
    else:
        error.add_note(
            f"h5bank: {path} was put back as of its last commit (results written so far are "
            "kept); nothing needs resuming: run the map again to fill in the rest"
        )


def _action(provenance: Mapping[str, Any]) -> str:
    if provenance.get("mode") == "map":
        return f"mapped {provenance.get('function')}() into {provenance.get('output')} of"
    return "built"


def abort_build(token: str) -> bool:
    """Close the writer of build ``token`` if this process holds it; the partial bank stays."""
    with _LOCK:
        writer = _OPEN.pop(token, None)
        if writer is not None:
            _ABORTED.add(token)
    if writer is None:
        return False
    with contextlib.suppress(Exception):  # the file may already be unusable; closing is best effort
        writer.f.close()
    return True
