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

With ``h5bank.build.fsync`` on, each commit syncs its data before it writes
the commit record. ``sync_records`` (the default) syncs the record too, so
each write is on disk when it returns (``add``, ``set``); a build's chain
turns it off: a commit's record reaches the disk with the next commit's
sync, the last one with the sync before the bank is renamed into place. A
machine that dies then loses at most the last commit, never the bank's
consistency, for one sync a commit rather than two.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import time
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np

from features.base import Feature
from pipeline import config
from pipeline.build.decode import Packed, PackedColumn
from pipeline.build.summary import Failure, human_bytes
from pipeline.errors import (
    DiskFullError,
    SourceError,
)
from pipeline.files.handles import fsync_file
from pipeline.format import layout
from pipeline.format.filters import filter_pipeline
from pipeline.format.hdf5_errors import is_disk_full
from pipeline.format.ids import IdIndex
from pipeline.format.storage import Labels, split
from pipeline.schema import feature_for_column, feature_for_value, owner_path


class CommitWriter:
    """Appends partitions of sources to an open bank and commits them (see :class:`BankWriter`).

    Used by the build's writer chain and by ``TypedFile.add`` / ``set``.
    ``features`` maps feature paths to features; columns of features it does
    not know (added on the fly) are created as generic features.

    ``planned`` is how many sources this writer is planned to write: a
    build's new sources, or the sources a ``bank.map`` writes its output
    to. The chunks of the columns it creates are sized for them (see
    :func:`layout.create_column`); 0, the default (``add`` / ``set``), plans
    nothing past the write at hand, so a bank made by ``add`` starts with
    small chunks, and keeps them as it grows.
    ``sync_records``: see the module's docstring.
    """

    def __init__(
        self,
        f: h5py.File,
        features: dict[str, Feature],
        chunk_bytes: int = 1 << 20,
        target: str | None = None,
        fsync: bool | None = None,
        planned: int = 0,
        sync_records: bool = True,
    ) -> None:
        self.f = f
        self.sync_records = sync_records
        self.fsync = bool(config.get("build.fsync") if fsync is None else fsync)
        self.features = features  # shared with the caller: features added on the fly land in it
        self.target = target  # the bank's final path, for a build (f is its partial file)
        self.chunk_bytes = chunk_bytes
        self.planned = planned
        self._written = 0  # sources this writer committed or wrote to (of the planned ones)
        self.n = layout.ids_table(f).shape[0]
        self._opened_n = self.n
        self._failures_at_open = layout.failure_tables(f)[0].shape[0]
        self._failure_rows = self._failures_at_open  # the failure tables' length
        # What open_build returned, and each link's result: a task Dask runs again
        # (its result lost with a worker) gets them back instead of writing twice.
        self.opened: dict[str, Any] = {}
        self.links: dict[int, dict[str, Any]] = {}
        self._marks: list[int] = []  # self.n when each failure this writer recorded was
        self._index: IdIndex | None = None
        self._columns: dict[str, layout.Column] = {}
        self._listed = False
        self._labels: dict[str, Labels] = {}  # category columns' name -> code, per column
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
            owner = owner_path(key, self.features)
            if owner in self.features:
                out[key] = self.features[owner]
                continue
            node = self.f.get(key)
            if layout.is_column(node):
                out[key] = feature_for_column(
                    str(node.attrs[layout.ATTR_STORAGE]), node.attrs, path=key
                )
            else:
                out[key] = feature_for_value(value)
        return out

    def register(self, features: Mapping[str, Feature]) -> list[str]:
        """Add features to the ones this writer knows; return the paths that were new."""
        new = [path for path in features if owner_path(path, self.features) not in self.features]
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
        target = None if column is None else (column.data.shape[1:], column.data.dtype)
        exact = getattr(self.features.get(packed.feature), "exact_dtype", "")
        return packed.kind.rejected(packed.data, packed.rows, target, skip, exact)

    # -- the commit ----------------------------------------------------------

    def commit(self, packed: Packed, on_error: str = "skip") -> dict[str, int]:
        """Append a partition's sources, commit their ids, record its failures.

        Ids already committed are skipped (a re-run or an append), so a commit
        is idempotent. With ``on_error="raise"`` the first failure raises
        :class:`SourceError` before anything of the partition is written.
        """
        started = time.perf_counter()
        present = self.index.rows(packed.ids) >= 0
        skip = set(np.flatnonzero(present).tolist())
        failures = list(packed.failures)
        rejected = self._screen(packed, skip, failures, on_error)
        kept = ~present
        kept[list(rejected)] = False
        keep = np.flatnonzero(kept)
        n_new = self.n + len(keep)
        check_space(self, packed, len(keep))
        # Each kept source's bank row, by its position in the partition (-1: not kept).
        bank_row = np.full(len(packed.ids), -1, np.int64)
        bank_row[keep] = np.arange(self.n, n_new, dtype=np.int64)
        with self._rollback_on_error():
            touched = set()
            for key, column in packed.columns.items():
                rows = bank_row[np.asarray(column.rows, dtype=np.int64)]
                entries = np.flatnonzero(rows >= 0).tolist()
                if entries:
                    self._append(key, column, entries, rows[rows >= 0], n_new)
                    touched.add(key)
            for column in self.all_columns():
                if column.path not in touched:
                    layout.resize_sources(column, n_new)
            new_ids = (
                packed.ids
                if len(keep) == len(packed.ids)
                else [packed.ids[row] for row in keep.tolist()]
            )
            layout.append_strings(layout.ids_table(self.f), new_ids)
            self.index.add(new_ids, self.n)
            self.n = n_new
            self._record(failures)
            self._durable()
        self._written += len(keep)
        self.busy += time.perf_counter() - started
        return {"ok": len(keep), "failed": len(failures), "skipped": len(skip)}

    def _durable(self) -> None:
        """Make what was written durable, then record it as committed (see pipeline.format.layout)."""
        self.f.flush()
        self.sync()  # on disk, not only in the page cache, before the record says so
        layout.mark_committed(self.f, self.n, self._failure_rows)
        self.f.flush()
        if self.sync_records:
            self.sync()

    def sync(self) -> None:
        """``fsync`` the file, so a machine that dies (not only a process) keeps the commit.

        Skipped with ``h5bank.build.fsync: false``, or for HDF5 drivers with
        no file descriptor; an error of the sync itself (how NFS and quotas
        report writes that failed later) raises.
        """
        if self.fsync:
            fsync_file(self.f)

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

    @contextlib.contextmanager
    def _rollback_on_error(self) -> Any:
        """Cut the bank back to its last commit if writing fails half-way (I/O error, full disk)."""
        try:
            yield
        except BaseException as error:
            if is_disk_full(error):
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
            self._columns, self._listed, self._labels = {}, False, {}
            self._failure_rows = min(t.shape[0] for t in layout.failure_tables(self.f))
            recorded = self._failure_rows - self._failures_at_open
            self._marks = self._marks[: max(0, recorded)]
            raise

    def _append(
        self, key: str, packed: PackedColumn, entries: list[int], rows: np.ndarray, n_new: int
    ) -> None:
        """Append the chosen entries of a packed column and point their refs at them."""
        lengths = np.asarray(packed.lengths, dtype=np.int64)[entries]
        data, column = self._new_rows(key, packed, entries, rows)
        data = packed.kind.as_stored(data, column.data.dtype)
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
        if filtered is None or filtered.pipeline != filter_pipeline(column.data):
            return False
        zeros = (0,) * (column.data.ndim - 1)
        write = column.data.id.write_direct_chunk
        for i, j in enumerate(entries):
            write((start + i, *zeros), filtered.chunks[j], filter_mask=filtered.masks[j])
        return True

    def _new_rows(
        self, key: str, packed: PackedColumn, entries: list[int], rows: np.ndarray
    ) -> tuple[np.ndarray, layout.Column]:
        """The rows the chosen entries append (``rows``: their bank rows), and the column.

        The column is created if it is new, and label names the entries bring
        are saved to it first, so no code is written before its name.
        """
        labels = self._labels.get(key)
        if labels is None:
            labels = self._labels[key] = Labels(lambda: self._names(key))
        data = packed.kind.new_rows(packed.data, packed.lengths, entries, labels)
        column = self.column(key) or self._create(key, packed, data, rows)
        names = labels.unsaved()
        if names is not None:
            layout.set_category_names(column, names)
        return data, column

    def _names(self, key: str) -> list[str]:
        column = self.column(key)
        return layout.category_names(column) if column is not None else []

    def _record(self, failures: list[Failure]) -> None:
        if not failures:
            return
        self._marks.extend([self.n] * len(failures))
        self._failure_rows += len(failures)
        tables = layout.failure_tables(self.f)
        columns = zip(*[(f.id, f.feature, f.error) for f in failures], strict=True)
        for table, values in zip(tables, columns, strict=True):
            layout.append_strings(table, list(values))


class BankWriter(CommitWriter):
    """A :class:`CommitWriter` that also writes single sources by id (``add``, ``set``),
    attaches ``bank.map`` results to sources in the bank, and finishes a build."""

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
            feature = owner_path(key, self.features)
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
        entry = split(packed.data, packed.lengths)[0]
        if not packed.kind.fits(entry, stop - start, column.data):
            return False  # appended instead; the old rows are left unreferenced
        data, column = self._new_rows(key, packed, [0], np.array([row]))
        column.data[start:stop] = packed.kind.as_stored(data, column.data.dtype)
        if column.shape is not None and packed.shapes is not None:
            layout.write_shapes(column, np.array([row]), packed.shapes)
        return True

    def add_source(self, id_: str, values: Mapping[str, Any]) -> None:
        """Commit a new source with the given column entries."""
        packed_columns = {}
        for key, entry in values.items():
            feature = owner_path(key, self.features)
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
            if column.kind.has_names:
                names = layout.category_names(column)
                if names != sorted(names):
                    self._columns[column.path] = layout.renumber_category(column, sorted(names))
                    self._labels.pop(column.path, None)

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
                sync=self.sync,
            )
            self._marks = []
            self._failure_rows = len(kept)
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


def check_space(writer: CommitWriter, packed: Packed, sources: int) -> None:
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
        column = writer.column(key)
        itemsize = column.data.dtype.itemsize if column is not None else None
        needed += packed_column.kind.space_needed(
            packed_column.data, len(packed_column.rows), itemsize, writer.chunk_bytes
        )
    folder = os.path.dirname(os.path.abspath(writer.f.filename))
    free = shutil.disk_usage(folder).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    room = free
    if limit != resource.RLIM_INFINITY:
        room = min(room, limit - writer.f.id.get_filesize())
    if needed > room:
        what = (
            f"{human_bytes(free)} free in {folder}"
            if room == free
            else f"a file-size limit of {human_bytes(limit)} (ulimit -f)"
        )
        raise DiskFullError(
            f"no room to commit {sources} more sources to {writer.f.filename}: {what}, about "
            f"{human_bytes(needed)} needed. Nothing of them was written; the {writer.n} "
            "sources committed are kept: free space, then retry (a build: resume it with "
            "mode='a' or h5bank build --resume)"
        )


def _single(feature: str, storage: str, entry: Any) -> PackedColumn:
    """A packed column of one entry (``add``, ``set``): what a decode task packs for one source."""
    column = PackedColumn(feature, storage, [0])
    piece, length, shape = column.kind.part(entry)
    column.lengths = [length]
    column.data = column.kind.concatenate([piece])
    column.shapes = [shape] if column.kind.has_shape_table else None
    return column


# -- the writer chain of a build ---------------------------------------------------


# Anything else (an odd filesystem that cannot list) is left to the upload itself.
