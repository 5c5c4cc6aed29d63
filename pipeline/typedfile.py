"""``TypedFile``, and the proxies that read and write a bank by id, by refs and by slice.

A bank type is a subclass of :class:`TypedFile` whose class attributes are
features or :class:`~pipeline.schema.Group`\\ s of them::

    class Experiment(TypedFile):
        data = Group(images=Image(size=(64, 64), mode="RGB"), labels=DirLabels())
        logs = Group(loss=Array())

    exp = Experiment.create("exp.h5", sources=["photos/"])
    exp.logs.add("train", {"loss": losses})           # populate on the fly
    exp.data.images[exp.data.images.refs[0]]          # source 0's rows
    exp.data.labels[:32]                              # a slice of the concatenation

On an open bank, a feature attribute reads as a :class:`FeatureProxy` and a
group as a :class:`GroupProxy`. ``TypedFile(path)`` itself opens any HDF5
file, mapping its groups and datasets to proxies.

Lazily, on any Dask cluster: ``proxy.to_dask()`` / ``bank.to_dask()`` (dask
arrays), ``proxy.to_dask_sources()`` (a bag of ``(id, value)``) and
``bank.map(func, inputs, output)`` (a function over every source, its results
returned or written back as a feature through the build's single writer);
see :mod:`pipeline.read`.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import posixpath
import shutil
import sys
import time
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, TypeVar

import h5py
import numpy as np

from features.base import Feature
from pipeline import config
from pipeline.build.chain import check_schema
from pipeline.build.decode import to_stored
from pipeline.build.summary import BuildSummary, Failure, human_bytes
from pipeline.build.writer import BankWriter
from pipeline.errors import (
    BankBusyError,
    BuildInProgressError,
    NotABankError,
    PartialSetAsideError,
    ReadOnlyError,
    SchemaError,
    UnknownIdError,
)
from pipeline.files.cache import LazyFile, release
from pipeline.files.handles import READ_OPTIONS, bank_identity, close_file, open_for_reading, track
from pipeline.files.remote import remote_identity
from pipeline.format import layout
from pipeline.format.filters import compression_of, register_plugin_filters
from pipeline.format.partial import partial_path
from pipeline.format.rows import absolute_rows, take_rows
from pipeline.read.arrays import dask_array
from pipeline.read.records import (
    ColumnSpec,
    columns_for,
    partition_rows,
    rows_per_partition,
    source_bag,
    stored_value,
)
from pipeline.schema import Group, Schema, feature_for_column, feature_of
from pipeline.urls import is_url, redact
from pipeline.version import __version__

T = TypeVar("T", bound="TypedFile")

# What pickling a bank leaves behind: the open file and what was read from it.
_NOT_PICKLED = frozenset(
    {"_file", "_pid", "_features", "_columns", "_refs_cache", "_dense", "_ids", "_index",
     "_writer", "summary", "_evicted", "_writable"}
)  # fmt: skip

# Every bank object of this process, so one opening a file for writing can close the
# read-only handles the others hold on it (HDF5 refuses a writer while they are open).
_LIVE: weakref.WeakSet[TypedFile] = weakref.WeakSet()

# Set on every TypedFile instance; a feature of the same name would hide them.
_INSTANCE_ATTRIBUTES = frozenset({"path", "mode", "summary"})


class TypedFile:
    """A bank (or any HDF5 file) opened through its type.

    Parameters
    ----------
    path
        The ``.h5`` file.
    mode
        ``"r"`` (read only, the default), ``"r+"`` (read and write an existing
        bank) or ``"a"`` (read and write, creating an empty bank if the file is
        missing). Use :meth:`create` to build a bank from sources.
    keep_open
        Accepted for h5mapper code, and changes nothing: h5bank keeps a bank's
        file open from opening to :meth:`close` (h5mapper reopened it for every
        access unless ``keep_open=True``).
    storage_options
        fsspec options when ``path`` is a URL (``s3://...``, ``https://...``):
        the bank then opens read-only through fsspec, reading its metadata in
        a few requests and each chunk in about one.
    **h5py_options
        Passed to ``h5py.File`` (``rdcc_nbytes``, ``locking``...).
    """

    __schema__: ClassVar[Schema] = Schema({})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__schema__ = Schema.from_class(cls)
        top = {path.split("/")[0] for path in cls.__schema__}
        clash = sorted(n for n in top if hasattr(TypedFile, n) or n in _INSTANCE_ATTRIBUTES)
        if clash:
            raise SchemaError(
                f"{cls.__name__}: feature or group names {clash} would hide TypedFile's own "
                "attributes; rename them (e.g. 'labels' rather than 'index')"
            )

    def __init__(
        self,
        path: str | os.PathLike[str],
        mode: str = "r",
        keep_open: bool | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        **h5py_options: Any,
    ) -> None:
        if mode not in ("r", "r+", "a"):
            raise ValueError(
                f"mode must be 'r', 'r+' or 'a', got {mode!r}; build a new bank with "
                f"{type(self).__name__}.create(path, sources)"
            )
        self.path = os.fspath(path)
        self.mode = mode
        self._evicted = False  # another bank object of this process took the file for writing
        self._writable = mode != "r"  # create() makes its bank writable on demand
        self.summary: BuildSummary | None = None
        self.remote = is_url(self.path)
        self._storage_options = config.storage_options(storage_options)
        if self.remote and mode != "r":
            raise ReadOnlyError(
                f"{self._shown} is a remote bank: it opens read-only. Build or change it "
                "locally (create() to a URL builds locally and uploads it when complete)"
            )
        if (
            not self.remote
            and not os.path.exists(self.path)
            and os.path.exists(partial_path(self.path))
        ):
            raise BuildInProgressError(
                f"{self._shown} is being built, or its build stopped: only "
                f"{partial_path(self.path)} exists. Wait for the build, or resume it "
                "with create(..., mode='a')"
            )
        new = mode == "a" and not self.remote and not os.path.exists(self.path)
        self._options = {**READ_OPTIONS, **h5py_options}
        self._h5 = self._open()
        try:
            if new:
                layout.init_bank(
                    self._h5,
                    type(self).__schema__.describe(),
                    {"library": f"h5bank {__version__}", "builds": []},
                )
                layout.set_state(self._h5, layout.COMPLETE)
            self._check_file()
        except BaseException:
            close_file(self._h5)
            raise
        self._forget()

    # -- one process's file handle ------------------------------------------------------

    @property
    def _h5(self) -> h5py.File:
        """The open file, reopened first if this object crossed into another process.

        A forked child (a ``DataLoader`` worker, a multiprocessing pool) gets a
        copy of this object with the parent's HDF5 handle in it; HDF5 handles
        must not be shared across processes, so the child opens the file again
        on its first read (read-only banks only: a writable one refuses).
        """
        if self._pid != os.getpid():
            self._adopt()
        elif self._evicted:  # closed for another object of this process that writes the file
            self._evicted = False
            self._reopen()
        return self._file

    @_h5.setter
    def _h5(self, f: h5py.File) -> None:
        self._file, self._pid = f, os.getpid()
        track(f)  # a forked child gets its own descriptor (track)

    def _adopt(self) -> None:
        if self.mode != "r":
            raise BankBusyError(
                f"{self._shown} is open with mode {self.mode!r} in process {self._pid}; another "
                f"process ({os.getpid()}) cannot use that handle. Open the bank read-only "
                "(mode='r') in the process that shares it"
            )
        with contextlib.suppress(Exception):
            close_file(self._file)  # this process's copy of the parent's handle only
        self._h5 = self._open()
        self._check_file()
        self._forget()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the recipe (path, storage and h5py options, the instance's own attributes),
        not the open file.

        This is what lets a bank type that is also a ``torch.utils.data.Dataset``
        go to ``DataLoader`` workers started with ``spawn`` or ``forkserver``:
        each unpickled copy opens the bank read-only for itself.
        """
        if self.mode != "r":
            raise TypeError(
                f"{self._shown} is open with mode {self.mode!r}: only read-only banks can be "
                "sent to other processes; open it with mode='r'"
            )
        # The recipe, and what a subclass set on the instance (self.split = "val"), not the
        # file, nor what was read from it.
        return {k: v for k, v in vars(self).items() if k not in _NOT_PICKLED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.mode, self.summary = "r", None
        self._evicted = self._writable = False
        self._h5 = self._open()
        self._check_file()
        self._forget()

    def _forget(self) -> None:
        """Drop everything read from the file (it was reopened, or changed under us)."""
        _LIVE.add(self)
        self._features = self._known_features()
        self._columns: dict[str, layout.Column] = {}
        self._refs_cache: dict[str, np.ndarray] = {}
        self._dense: dict[str, bool] = {}
        self._ids: list[str] | None = None
        self._index: dict[str, int] | None = None
        self._writer: BankWriter | None = None

    def _check_file(self) -> None:
        if layout.is_bank(self._h5):
            layout.check_format(self._h5)
            if layout.state(self._h5) != layout.COMPLETE:
                raise BuildInProgressError(
                    f"{self._shown} is a bank whose build has not finished; resume the build "
                    "with create(..., mode='a') on its final path"
                )
        elif type(self) is not TypedFile:
            raise NotABankError(
                f"{self._shown} is not an h5bank bank, so it cannot open as {type(self).__name__}; "
                "pipeline.TypedFile(path) opens any HDF5 file"
            )

    def _known_features(self) -> dict[str, Feature]:
        """The class's features, plus generic ones for columns only the file has."""
        features: dict[str, Feature] = dict(type(self).__schema__)
        if layout.is_bank(self._h5):
            records = layout.read_json_attr(self._h5, layout.ATTR_SCHEMA)
            for path in layout.iter_columns(self._h5):
                owner = feature_of(path, features)
                if owner not in features:
                    attrs = self._h5[path].attrs
                    owner = path if path in records else feature_of(path, records)
                    features[owner] = feature_for_column(
                        str(attrs[layout.ATTR_STORAGE]), attrs, records.get(owner)
                    )
        return features

    # -- building ------------------------------------------------------------

    @classmethod
    def create(
        cls: type[T],
        path: str | os.PathLike[str],
        sources: Any,
        mode: str = "w",
        scheduler: Any = None,
        partition_size: int | None = None,
        on_error: str | None = None,
        progress: bool | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        max_pending: int | None = None,
        n_workers: int | None = None,
        parallelism: str | None = None,
        keep_open: bool | None = None,
    ) -> T:
        """Build a bank from ``sources`` and return it, open for reading and writable on demand.

        Parameters
        ----------
        path
            The bank to write. The build writes ``path + ".partial"`` and
            renames it onto ``path`` when it finishes, so ``path`` never holds
            a half-built bank.
        sources
            Paths, directories (walked), globs, fsspec URLs or plain ids, or
            an iterable of them (streamed); see :func:`pipeline.sources.expand`.
        mode
            ``"w"`` builds a new bank (replacing ``path`` when done); ``"a"``
            appends the sources not in the bank yet, and resumes a build that
            stopped.
        scheduler
            Where the build runs; ``None`` is an embedded local cluster (or
            the current default client). See :mod:`pipeline.run.runner`.
        partition_size
            Sources per decode task (config ``h5bank.build.partition-size``).
        on_error
            ``"skip"`` (default) records a failed source and goes on;
            ``"raise"`` stops at the first with :class:`~pipeline.errors.SourceError`.
        progress
            Show a progress bar and print the summary (to stderr).
        storage_options
            fsspec options for URL sources (flat, or per protocol), passed
            through untouched; default ``h5bank.storage-options`` (config).
        max_pending
            Decoded partitions allowed to wait for the writer (config
            ``h5bank.build.max-pending``; default: 2 x threads, none on a
            cluster still growing; see :mod:`pipeline.build.graph`).
        n_workers
            h5mapper's argument: the number of worker processes of the
            embedded local cluster (or of threads, with
            ``scheduler="threads"``). A running cluster is sized where it was
            started: with a client or an address it is refused.
        parallelism
            h5mapper's argument: ``"mp"`` (the embedded local cluster),
            ``"threads"`` or ``"none"`` (one thread); the same as
            ``scheduler="local"``, ``"threads"`` or ``"sync"``.
        keep_open
            Accepted for h5mapper code; changes nothing (see :class:`TypedFile`).

        Notes
        -----
        The bank returned reads like one opened with ``mode="r"`` (so Dask
        workers and ``DataLoader`` workers can open it too) and, as h5mapper's
        does, takes writes: the first ``add``, ``set`` or item assignment
        reopens it with ``mode="r+"``.
        """
        from pipeline.run.runner import runner_for, scheduler_for

        scheduler = scheduler_for(scheduler, parallelism, n_workers)
        storage_options = config.storage_options(storage_options)
        if is_url(os.fspath(path)):
            return cls._create_remote(
                os.fspath(path), sources, mode, scheduler, partition_size, on_error, progress,
                storage_options, max_pending, n_workers,
            )  # fmt: skip
        progress = config.get("build.progress", progress)
        started = time.perf_counter()
        notes: list[str] = []
        with runner_for(scheduler, progress=progress, n_workers=n_workers) as runner:
            while True:
                build = cls.graph(
                    path,
                    sources,
                    mode=mode,
                    scheduler=runner,
                    partition_size=partition_size,
                    on_error=on_error,
                    storage_options=storage_options,
                    max_pending=max_pending,
                )
                try:
                    summary = runner.run(build, progress=progress)
                    break
                except PartialSetAsideError as error:
                    # The partial file was planned around but could not be resumed: it is
                    # set aside now, so planning again builds every source (once).
                    if notes or isinstance(sources, Iterator):
                        raise
                    notes.append(f"{str(error).split('. Run the build again')[0]}; built again")
                    if progress:
                        print(f"h5bank: {notes[-1]}", file=sys.stderr)
        summary.notes[:0] = notes
        summary.seconds = time.perf_counter() - started
        if progress:
            print(summary, file=sys.stderr)
        bank = cls(path, "r")
        bank.summary = summary
        bank._writable = True  # as h5mapper's create: writes reopen it with mode="r+"
        return bank

    @classmethod
    def _create_remote(
        cls: type[T],
        url: str,
        sources: Any,
        mode: str,
        scheduler: Any,
        partition_size: int | None,
        on_error: str | None,
        progress: bool | None,
        storage_options: Mapping[str, Any] | None,
        max_pending: int | None,
        n_workers: int | None = None,
    ) -> T:
        """Build a bank into a local temporary file, then upload it to ``url`` whole."""
        import tempfile

        from pipeline.build.upload import check_upload_target, upload_bank

        if mode != "w":
            raise ValueError(
                f"cannot append to the remote bank {redact(url)}: copy it to a local path, "
                "create(local, sources, mode='a'), and create or upload it again"
            )
        check_upload_target(url, storage_options)  # before hours of building, not after
        name = posixpath.basename(url.split("::")[0].split("?")[0]) or "bank.h5"
        scratch = tempfile.mkdtemp(prefix="h5bank-", dir=config.get("build.scratch"))
        local = os.path.join(scratch, name)
        try:
            built = cls.create(
                local, sources, "w", scheduler, partition_size, on_error, progress,
                storage_options=storage_options, max_pending=max_pending, n_workers=n_workers,
            )  # fmt: skip
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        summary = built.summary
        built.close()
        try:
            upload_bank(local, url, storage_options)
        except BaseException as error:
            error.add_note(f"h5bank: the built bank is kept at {local}; upload it, or delete it")
            raise
        shutil.rmtree(scratch, ignore_errors=True)
        bank = cls(url, storage_options=storage_options)
        if summary is not None:
            summary.path = redact(url)
        bank.summary = summary
        return bank

    @classmethod
    def graph(
        cls,
        path: str | os.PathLike[str],
        sources: Any,
        mode: str = "w",
        scheduler: Any = None,
        partition_size: int | None = None,
        on_error: str | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        max_pending: int | None = None,
    ) -> Any:
        """The build as a Dask collection (:class:`pipeline.build.graph.Build`), not yet run.

        ``client.compute(Bank.graph(path, sources, scheduler=client))`` submits
        a build without blocking. ``scheduler`` tells which cluster the writer
        chain is pinned to (``None``: the default client if any, else none, for
        the threaded scheduler).
        """
        from pipeline.build.graph import build_graph
        from pipeline.run.runner import placement

        if is_url(os.fspath(path)):
            raise ValueError(
                f"a build graph writes a local file; build {redact(os.fspath(path))} with "
                "create(), which builds locally and uploads the bank when it is complete"
            )
        writer, threads, decoders = placement(scheduler)
        storage_options = config.storage_options(storage_options)
        return build_graph(
            cls.__schema__,
            cls.__schema__.bases,
            path,
            sources,
            mode=mode,
            on_error=on_error,
            partition_size=partition_size,
            max_pending=max_pending,
            storage_options=storage_options,
            writer=writer,
            threads=threads,
            decoders=decoders,
        )

    @property
    def _shown(self) -> str:
        """The path as messages show it: a URL without its credentials."""
        return redact(self.path)

    # -- ids -----------------------------------------------------------------

    @property
    def h5(self) -> h5py.File:
        """The underlying ``h5py.File``, for what the proxies do not cover."""
        return self._h5

    @property
    def ids(self) -> list[str]:
        """Source ids in commit order."""
        self._h5  # noqa: B018 (reopened first where another object took the file: caches drop)
        if self._ids is None:
            table = self._h5.get(layout.IDS)
            # only what the bank commits: an add() killed halfway may have written more
            self._ids = layout.read_strings(table, 0, len(self)) if table is not None else []
        return self._ids

    def index(self, id_: str) -> int:
        """The row of source ``id_`` in every refs table."""
        if not isinstance(id_, str):
            raise UnknownIdError(f"source ids are str; got {type(id_).__name__} {id_!r}")
        self._h5  # noqa: B018 (reopened first where another object took the file: caches drop)
        if self._index is None:
            self._index = {value: row for row, value in enumerate(self.ids)}
        try:
            return self._index[id_]
        except KeyError:
            sample = ", ".join(repr(i) for i in self.ids[:3])
            raise UnknownIdError(
                f"no source {id_!r} in {self._shown} ({len(self)} sources"
                + (f"; ids look like {sample}" if sample else "")
                + ")"
            ) from None

    def __len__(self) -> int:
        self._h5  # noqa: B018 (reopened first where another object took the file: caches drop)
        if self._ids is not None:
            return len(self._ids)
        table = self._h5.get(layout.IDS)  # its length, without reading millions of ids
        return 0 if table is None else layout.committed(self._h5)

    def __contains__(self, id_: object) -> bool:
        try:
            self.index(id_)  # type: ignore[arg-type]
        except UnknownIdError:
            return False
        return True

    def failures(self) -> list[Failure]:
        """Sources the builds of this bank could not load, with the feature and the reason."""
        if layout.FAILURES not in self._h5:
            return []
        columns = [layout.read_strings(t) for t in layout.failure_tables(self._h5)]
        return [Failure(*row) for row in zip(*columns, strict=True)]

    # -- the tree of proxies ------------------------------------------------------

    @property
    def root(self) -> GroupProxy:
        return GroupProxy(self, "")

    def feature(self, path: str) -> FeatureProxy | GroupProxy | DatasetProxy:
        """The proxy at ``path`` (``"data/images"``), for names that are not identifiers."""
        return self._node(path.strip("/"))

    def _child(self, name: str) -> Any:
        return self._node(name)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self.root.children():
            return self._node(name)
        raise AttributeError(
            f"{type(self).__name__} {self._shown!r} has no feature or group {name!r}"
        )

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self.root.children()))

    def _node(self, path: str) -> Any:
        node = self._h5.get(path) if path else self._h5
        if path in self._features:
            if isinstance(node, h5py.Group) and not layout.is_column(node) and len(node):
                return GroupProxy(self, path, self._features[path])  # a dict-valued feature
            return FeatureProxy(self, path)
        if layout.is_column(node):
            return FeatureProxy(self, path)
        if path in type(self).__schema__.groups() or isinstance(node, h5py.Group):
            return GroupProxy(self, path)
        if isinstance(node, h5py.Dataset):
            return DatasetProxy(self, path)
        raise AttributeError(f"{self._shown} has no feature or group {path!r}")

    def _refs_index(self, column: layout.Column) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A column's refs sorted by start (starts, source rows, stops), read once and cached."""
        self._h5  # noqa: B018 (in a forked child: reopen first, which drops the caches)
        cached = self._refs_cache.get(column.path)
        if cached is None:
            refs = column.refs[:]
            order = np.argsort(refs[:, 0], kind="stable")
            cached = self._refs_cache[column.path] = (refs[order, 0], order, refs[order, 1])
        return cached

    def _is_dense(self, column: layout.Column) -> bool:
        """Whether source ``i``'s data is exactly row ``i`` of a one-row-a-source column (item,
        category) for every source: a batch then reads its rows without the refs. Read once
        (16 bytes a source), and forgotten when this bank writes."""
        self._h5  # noqa: B018 (in a forked child: reopen first, which drops the caches)
        dense = self._dense.get(column.path)
        if dense is None:
            dense = False
            n = column.refs.shape[0]
            if column.storage in ("item", "category") and n == column.data.shape[0]:
                dense = True
                for start in range(0, n, 1 << 20):  # in blocks: 16 MB at most held at once
                    refs = column.refs[start : start + (1 << 20)]
                    rows = np.arange(start, start + len(refs) + 1, dtype=refs.dtype)
                    if not (
                        np.array_equal(refs[:, 0], rows[:-1])
                        and np.array_equal(refs[:, 1], rows[1:])
                    ):
                        dense = False
                        break
            self._dense[column.path] = dense
        return dense

    def _column(self, path: str) -> layout.Column | None:
        self._h5  # noqa: B018 (in a forked child: reopen first, which drops the cached columns)
        column = self._columns.get(path)
        if column is None and layout.is_column(self._h5.get(path)):
            column = self._columns[path] = layout.Column.open(self._h5, path)
        return column

    def _require_column(self, path: str) -> layout.Column:
        column = self._column(path)
        if column is None:
            raise ValueError(f"{path!r} is not a feature column of {self._shown}")
        return column

    def feature_of(self, path: str) -> Feature:
        return self._features[feature_of(path, self._features)]

    # -- reading and writing by id -------------------------------------------------

    def get(self, id_: str) -> dict[str, Any]:
        """Every feature's data for source ``id_``, nested like the schema (no-data features left out)."""
        return self.root.get(id_)

    def add(self, id_: str, data: Mapping[str, Any]) -> None:
        """Add data for ``id_`` (new ids and new features are created on first write).

        ``data`` is nested like the schema (``{"logs": {"loss": losses}}``).
        Features the bank type does not declare become ``Array`` (arrays),
        ``String`` (str) or ``Bytes`` (bytes) features. An existing source that
        already has data for a feature raises ``ValueError``; use :meth:`set`.
        """
        self._write(id_, data, replace=False)

    def set(self, id_: str, data: Mapping[str, Any]) -> None:
        """Write data for ``id_``, replacing what the source has (in place when the size matches)."""
        self._write(id_, data, replace=True)

    def _require_writable(self) -> None:
        if self.mode != "r":
            return
        if not self._writable or self.remote:
            raise ReadOnlyError(
                f"{self._shown} is open read-only; open it with mode='r+' or 'a' to write"
            )
        # The bank create() returned: reopen it for writing, as h5mapper's create gives "r+".
        close_file(self._file)
        self.mode = "r+"
        try:
            self._reopen()
        except BaseException:
            self.mode = "r"
            self._reopen()
            raise

    def _write(self, id_: str, data: Mapping[str, Any], replace: bool, prefix: str = "") -> None:
        self._require_writable()
        if not isinstance(id_, str) or not id_:
            raise TypeError(f"a source id must be a non-empty str, got {id_!r}")
        values = self._flatten(data, prefix)
        if not values:
            raise ValueError(f"nothing to write for {id_!r}: {data!r}")
        writer = self._open_writer()
        features = writer.features_for(values)
        entries: dict[str, Any] = {}
        for path, value in values.items():
            feature = features[path]
            entries.update(to_stored(value, feature.storage, path, type(feature).__name__))
        new = writer.register(features)  # the writer shares self._features
        try:
            if id_ in self:
                writer.update(id_, entries, replace=replace)
            else:
                writer.add_source(id_, entries)
                self.ids.append(id_)
                if self._index is not None:
                    self._index[id_] = len(self.ids) - 1
        except BaseException:
            writer.forget(new)
            raise
        finally:
            self._refs_cache.clear()
            self._dense.clear()
            if layout.committed(self._h5) != len(self.ids):
                self._ids = self._index = None  # a failed commit was rolled back

    def _open_writer(self) -> BankWriter:
        """The writer of a bank opened for writing, checked against the bank type on first use."""
        if self._writer is None:
            if not layout.is_bank(self._h5):
                raise NotABankError(
                    f"{self._shown} is a plain HDF5 file; h5bank writes sources only to banks "
                    f"(build one with {type(self).__name__}.create, or open a new path with mode='a')"
                )
            check_schema(self._h5, type(self).__schema__)
            if not layout.consistent(self._h5):  # a writer that died in add() left a half commit
                layout.truncate(self._h5)
            self._writer = BankWriter(
                self._h5, self._features, int(config.get("build.chunk-bytes"))
            )
        return self._writer

    def _flatten(self, data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        """``{feature path: value}`` from data nested like the schema."""
        if not isinstance(data, Mapping):
            raise TypeError(
                f"data must be a dict of feature name to value, got {type(data).__name__}"
            )
        out: dict[str, Any] = {}
        for name, value in data.items():
            path = posixpath.join(prefix, str(name))
            if path in self._features or not isinstance(value, Mapping):
                out[path] = value
            else:
                out.update(self._flatten(value, path))
        return out

    # -- lazy computing ------------------------------------------------------------------

    def lazy_file(self) -> LazyFile:
        """The picklable recipe Dask tasks open this bank with, once per worker process.

        It names this bank (its uuid), so a task that finds another bank at
        the path (rebuilt, replaced) raises ``BankChangedError``.
        """
        if self.remote:
            return LazyFile(
                self.path,
                bank_identity(self._h5),
                remote_identity(self.path, self._storage_options),
                self._storage_options,
            )
        return LazyFile.of(self._h5)

    def to_dask(self, chunks: Any = None) -> dict[str, Any]:
        """Every feature column as a ``dask.array.Array``, by path (see :meth:`FeatureProxy.to_dask`).

        ``x, y = arrays["images"], arrays["labels"]`` then ``x[y == 3].mean(axis=0)``
        runs lazily: with fixed-shape features and labels, row ``i`` of each
        array is source ``i`` when every source has data for both.
        """
        return self.root.to_dask(chunks)

    def serve(self, batch: Any = None, **dataloader_kwargs: Any) -> Any:
        """A PyTorch ``DataLoader`` over this bank, its batches shaped like ``batch``.

        ``batch`` is a spec of :class:`~pipeline.serve.Input` /
        :class:`~pipeline.serve.Target` items (``dict(x=Input("images", GetId()),
        y=Target("labels", GetId()))``); ``dataloader_kwargs`` go to the
        ``DataLoader`` (``batch_size``, ``shuffle``, ``num_workers``...). Each
        worker opens the bank for itself. See :mod:`pipeline.serve`.
        """
        from pipeline.serve import serve

        return serve(self, batch, **dataloader_kwargs)

    def map(
        self,
        func: Any,
        inputs: str | list[str] | None = None,
        output: str | None = None,
        *,
        feature: Feature | None = None,
        scheduler: Any = None,
        partition_size: int | None = None,
        on_error: str | None = None,
        progress: bool | None = None,
        max_pending: int | None = None,
    ) -> Any:
        """Apply ``func`` to each source's data in parallel, on the cluster.

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
        from pipeline.run.runner import runner_for

        on_error = config.get("build.on-error", on_error)
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        progress = config.get("build.progress", progress)
        keys = self._map_inputs(inputs)
        columns = columns_for(self._features, self._h5, keys)
        have = np.ones(len(self), dtype=bool)
        for path in keys.values():
            have &= self._require_column(path).refs[:, 0] >= 0
        skipped = 0
        if output is not None:
            output = self._map_output(output, keys)
            existing = self._column(output)
            if existing is not None:
                done = existing.refs[:, 0] >= 0
                skipped = int((have & done).sum())
                have &= ~done
            if feature is None and (existing is not None or output in self._features):
                feature = self.feature_of(output)
        if output is not None and self.remote:
            raise ReadOnlyError(
                f"{self._shown} is a remote bank: map its sources without output=, or "
                "copy it to a local path to write a feature into it"
            )
        rows = np.flatnonzero(have)
        per_partition = partition_size or rows_per_partition(
            self._h5, list(keys.values()), len(self)
        )
        started = time.perf_counter()
        with runner_for(scheduler, progress=progress) as runner:
            if partition_size is None:
                spread = math.ceil(len(rows) / (4 * runner.threads)) if len(rows) else 1
                per_partition = max(1, min(per_partition, spread))
            parts = partition_rows(rows, per_partition)
            lazy = self.lazy_file()
            self.close()
            try:
                if output is None:
                    result = self._map_collect(
                        runner, func, lazy, columns, parts, on_error, progress
                    )
                else:
                    result = self._map_write(
                        runner, func, columns, parts, output, feature, on_error, skipped,
                        max_pending, progress,
                    )  # fmt: skip
            except BaseException:
                with contextlib.suppress(Exception):
                    runner.release(self.path)
                    self._reopen()
                raise
            runner.release(self.path)  # the workers' read handles would refuse a writable reopen
            self._reopen()
        if output is None:
            return result
        summary = result
        summary.seconds = time.perf_counter() - started
        if progress:
            print(summary, file=sys.stderr)
        self.summary = summary
        return summary

    def _map_inputs(self, inputs: str | list[str] | None) -> dict[str, str]:
        """``{key: column path}`` for ``map``'s ``inputs``."""
        available = list(layout.iter_columns(self._h5)) if layout.is_bank(self._h5) else []
        if inputs is None:
            if not available:
                raise ValueError(f"{self._shown} has no feature columns to map over")
            return {path: path for path in available}
        names = [inputs] if isinstance(inputs, str) else list(inputs)
        out: dict[str, str] = {}
        for name in names:
            path = str(name).strip("/")
            if path not in available:
                raise ValueError(
                    f"map input {name!r} is not a feature column of {self._shown}; "
                    f"its columns are {available}"
                )
            out[str(name)] = path
        if not out:
            raise ValueError("map needs at least one input feature")
        return out

    def _map_output(self, output: str, inputs: Mapping[str, str]) -> str:
        path = str(output).strip("/")
        if not path or any(part.startswith("__") or not part for part in path.split("/")):
            raise ValueError(f"map output {output!r} is not a usable feature path")
        if path in inputs.values():
            raise ValueError(f"map output {output!r} is also an input; write to a new feature")
        node = self._h5.get(path)
        if node is not None and not layout.is_column(node):
            raise ValueError(
                f"map output {output!r} is already a group or dataset of {self._shown} that is not "
                "a feature column; choose another path"
            )
        parts = path.split("/")
        inside = [
            p
            for i in range(1, len(parts))
            if layout.is_column(self._h5.get(p := "/".join(parts[:i])))
        ]
        if inside:
            raise ValueError(
                f"map output {output!r} would be inside the column {inside[0]!r}; choose a path "
                "beside it (e.g. 'derived/...')"
            )
        return path

    def _map_collect(
        self,
        runner: Any,
        func: Any,
        lazy: LazyFile,
        columns: list[ColumnSpec],
        parts: list[np.ndarray],
        on_error: str,
        progress: bool,
    ) -> MapResult:
        from dask.delayed import delayed

        from pipeline.build.decode import map_rows

        func_task = delayed(func, traverse=False)
        tasks = [
            delayed(map_rows, pure=False)(func_task, lazy, columns, rows, on_error)
            for rows in parts
        ]
        done = runner.gather(
            tasks,
            [len(p) for p in parts],
            f"h5bank map {posixpath.basename(self._shown)}",
            progress,
        )
        result = MapResult()
        for pairs, failures in done:
            result.update(pairs)
            result.failures.extend(failures)
        return result

    def _map_write(
        self,
        runner: Any,
        func: Any,
        columns: list[ColumnSpec],
        parts: list[np.ndarray],
        output: str,
        feature: Feature | None,
        on_error: str,
        skipped: int,
        max_pending: int | None,
        progress: bool,
    ) -> BuildSummary:
        from pipeline.build.chain import restore_after_failure
        from pipeline.build.graph import map_graph

        build = map_graph(
            self.path,
            func,
            columns,
            parts,
            output,
            feature,
            on_error=on_error,
            skipped=skipped,
            max_pending=max_pending,
            writer=runner.writer_worker(),
            threads=runner.threads,
            decoders=runner.decode_workers(),
        )
        try:
            return runner.run(build, progress=progress)
        except BaseException as error:
            restore_after_failure(build.path, error)
            raise

    def _reopen(self) -> None:
        """Open the file again in this bank's mode (after ``map`` closed it), if it is there."""
        if not self.remote and not os.path.exists(self.path):
            return
        self._h5 = self._open()
        self._check_file()
        self._forget()

    def _open(self) -> h5py.File:
        if self.remote:
            options = {k: v for k, v in self._options.items() if k != "locking"}
            return open_for_reading(self.path, self._storage_options, **options)
        if self.mode == "r":
            return open_for_reading(self.path, **self._options)
        release(self.path)  # this process's cached read handles would refuse a writer
        register_plugin_filters()
        tried: set[str] = set()
        while True:
            try:
                return h5py.File(self.path, self.mode, **self._options)
            except OSError as error:
                refusal = next((r for r in _WRITE_REFUSALS if r in str(error)), None)
                if refusal is None:
                    raise
                if refusal in tried:
                    raise BankBusyError(
                        f"cannot open {self._shown} with mode {self.mode!r}: "
                        + _WRITE_REFUSALS[refusal]
                    ) from None
                tried.add(refusal)
                self._release_readers(refusal)

    def _release_readers(self, refusal: str) -> None:
        """Close the read handles h5bank holds on the file that made HDF5 refuse a writer.

        ``"already open for read-only"``: other bank objects of this process
        read it (``exp = Bank.create(...)``, then ``Bank(path, mode="r+")``);
        their handles are closed and each reopens on its next use (then
        sharing the writable handle, as HDF5 does within a process).
        ``"lock"``: other processes read it, maybe the workers of the default
        Dask client, whose cached handles h5bank can close. Anyone else has
        to close theirs.
        """
        if refusal == "already open for read-only":
            _evict(self, _identity(self.path))
            return
        from pipeline.run.runner import _default_client

        client = _default_client()
        if client is not None:
            client.run(release, self.path)

    # -- display ----------------------------------------------------------------------

    def tree(self) -> str:
        """The bank as a tree: groups, features, shapes, dtypes, compression, bytes, sources."""
        out = io.StringIO()
        n_failed = len(self._h5[f"{layout.FAILURES}/id"]) if layout.FAILURES in self._h5 else 0
        size = self._size()
        if layout.is_bank(self._h5):
            head = (
                f"<{type(self).__name__} {self._shown!r}: {len(self)} sources, {n_failed} failed, "
                f"{human_bytes(size)}, format v{int(self._h5.attrs[layout.ATTR_VERSION])}>"
            )
        else:
            head = f"<{type(self).__name__} {self._shown!r}: plain HDF5, {human_bytes(size)}>"
        print(head, file=out)
        self.root._print_tree(out, "")
        return out.getvalue().rstrip("\n")

    def _size(self) -> int:
        if self.remote:
            return int(remote_identity(self.path, self._storage_options)[0] or 0)
        return os.path.getsize(self.path)

    def info(self, file: Any = None) -> None:
        """Print :meth:`tree`."""
        print(self.tree(), file=file or sys.stdout)

    def __repr__(self) -> str:
        if not self._file and not self._evicted:
            return f"<{type(self).__name__} {self._shown!r} (closed)>"
        return self.tree()

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Close the bank, and this process's cached Dask read handles on it (they would hold its lock).

        Closing a bank open for writing also closes the handles other bank
        objects of this process opened on the file meanwhile (HDF5 made them
        share this writable one): each reopens read-only on its next use, so
        the file is left unlocked for other processes.
        """
        writable = self.mode != "r" and bool(self._file)
        if self._pid == os.getpid() and self._file:  # a copy of a parent's handle is not ours
            close_file(self._file)
        release(self.path)
        if writable and not self.remote:
            _evict(self, _identity(self.path))

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# What HDF5 says when it refuses to open a file for writing, and what the user must do once
# h5bank has closed its own read handles (TypedFile._release_readers) and it still refuses.
_WRITE_REFUSALS = {
    "already open for read-only": "this process has it open read-only outside h5bank (an "
    "h5py.File, or a Dask array computing on threads); close that first",
    "lock": "another process has it open. Dask workers that computed arrays of it keep it open "
    "until client.run(pipeline.release, path); other programs must close it",
}


def _evict(bank: TypedFile, identity: tuple[int, int] | None) -> None:
    """Close the handles other bank objects of this process hold on the file ``identity``;
    each reopens on its next use (:attr:`TypedFile._h5`)."""
    if identity is None:
        return
    for other in list(_LIVE):
        if (
            other is not bank
            and other._file
            and other._pid == os.getpid()
            and not other.remote
            and _identity(other.path) == identity
        ):
            close_file(other._file)
            other._evicted = True


def _identity(path: str) -> tuple[int, int] | None:
    """The file at ``path`` (device, inode), ``None`` if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _row_list(item: Any) -> bool:
    """Whether ``item`` is a 1-D list or array of row numbers (not a mask, not a tuple)."""
    if isinstance(item, list):  # not bools: [True, False] is a mask
        return bool(item) and all(
            isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_)) for i in item
        )
    return isinstance(item, np.ndarray) and item.ndim == 1 and item.dtype.kind in "iu" and len(item)


class MapResult(dict):
    """What ``bank.map(func)`` without an output returns: ``{id: func(data)}`` in bank order.

    ``failures`` lists the sources whose call raised (id, ``""``, the error).
    """

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[Failure] = []

    def __repr__(self) -> str:
        return f"<MapResult: {len(self)} results, {len(self.failures)} failures>"


class _Proxy:
    def __init__(self, bank: TypedFile, path: str) -> None:
        self.bank = bank
        self.path = path

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)


class GroupProxy(_Proxy):
    """A group of a bank: ``group[id]`` / ``group.get(id)`` give its features' data for a source.

    Children are attributes (``group.images``). A feature whose ``load``
    returns a dict also reads as a group, one child per key, and its methods
    stay reachable through it.
    """

    def __init__(self, bank: TypedFile, path: str, feature: Feature | None = None) -> None:
        super().__init__(bank, path)
        self._feature = feature

    def children(self) -> list[str]:
        """Names of the features and groups directly below this group."""
        names: dict[str, None] = {}
        depth = self.path.count("/") + 1 if self.path else 0
        for path in [*self.bank._features, *sorted(type(self.bank).__schema__.groups())]:
            parts = path.split("/")
            if (not self.path or path.startswith(self.path + "/")) and len(parts) > depth:
                names[parts[depth]] = None
        node = self.bank._h5.get(self.path) if self.path else self.bank._h5
        if isinstance(node, h5py.Group) and not layout.is_column(node):
            for name in node:
                if not name.startswith("__"):
                    names[name] = None
        return list(names)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self.children():
            return self.bank._node(posixpath.join(self.path, name))
        if self._feature is not None:
            return getattr(self._feature, name)
        raise AttributeError(
            f"group {self.path or '/'!r} of {self.bank._shown} has no member {name!r}"
        )

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self.children()))

    def get(self, id_: str) -> dict[str, Any]:
        """``{child: data}`` for source ``id_``, nested; children without data are left out."""
        row = self.bank.index(id_)
        return self._get_row(row, id_)

    def _get_row(self, row: int, id_: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.children():
            child = self.bank._node(posixpath.join(self.path, name))
            if isinstance(child, DatasetProxy):
                continue
            value = child._get_row(row, id_)
            if value is not None and not (isinstance(value, dict) and not value):
                out[name] = value
        return out

    def __getitem__(self, id_: str) -> dict[str, Any]:
        return self.get(id_)

    def to_dask(self, chunks: Any = None) -> dict[str, Any]:
        """``{path below this group: dask array}`` for every feature column (and plain dataset)."""
        out: dict[str, Any] = {}
        for name in self.children():
            child = self.bank._node(posixpath.join(self.path, name))
            if isinstance(child, GroupProxy):
                out.update({f"{name}/{k}": v for k, v in child.to_dask(chunks).items()})
            elif child.shape is not None:
                out[name] = child.to_dask(chunks)
                if (
                    isinstance(child, FeatureProxy)
                    and child.storage in ("item", "category")
                    and child.shape[0] != len(self.bank)
                ):
                    warnings.warn(
                        f"{child.path!r} has data for {child.shape[0]} of the bank's "
                        f"{len(self.bank)} sources, so its rows are not the bank's sources "
                        "and do not line up with other features' (use to_dask_sources())",
                        stacklevel=2,
                    )
        return out

    def add(self, id_: str, data: Mapping[str, Any]) -> None:
        """Add ``data`` (``{child: value}``) for ``id_``; see :meth:`TypedFile.add`."""
        self.bank._write(id_, data, replace=False, prefix=self.path)

    def set(self, id_: str, data: Mapping[str, Any]) -> None:
        """Write ``data`` for ``id_``, replacing what is there; see :meth:`TypedFile.set`."""
        self.bank._write(id_, data, replace=True, prefix=self.path)

    def _print_tree(self, out: Any, indent: str) -> None:
        for name in self.children():
            child = self.bank._node(posixpath.join(self.path, name))
            if isinstance(child, GroupProxy):
                print(f"{indent}{name}/", file=out)
                child._print_tree(out, indent + "  ")
            else:
                print(f"{indent}{child._describe()}", file=out)

    def __repr__(self) -> str:
        out = io.StringIO()
        print(f"<group {self.path or '/'!r} of {self.bank._shown!r}>", file=out)
        self._print_tree(out, "  ")
        return out.getvalue().rstrip("\n")


class FeatureProxy(_Proxy):
    """One feature column of a bank: the concatenated data, its refs, and the feature's methods.

    ``proxy[item]`` indexes the concatenation of every source's data like
    h5py does; ``proxy.refs[i]`` is a ``slice`` so ``proxy[proxy.refs[i]]``
    is source ``i``'s rows (reshaped, for features stored flattened);
    ``proxy.get(id)`` is source ``id``'s data as the feature returned it.
    """

    @property
    def feature(self) -> Feature:
        return self.bank.feature_of(self.path)

    @property
    def column(self) -> layout.Column | None:
        return self.bank._column(self.path)

    def _require(self) -> layout.Column:
        column = self.column
        if column is None:
            raise IndexError(f"feature {self.path!r} of {self.bank._shown} has no data yet")
        return column

    @property
    def storage(self) -> str:
        column = self.column
        return column.storage if column is not None else self.feature.storage

    @property
    def shape(self) -> tuple[int, ...] | None:
        column = self.column
        return None if column is None else column.data.shape

    @property
    def dtype(self) -> np.dtype | None:
        column = self.column
        return None if column is None else column.data.dtype

    @property
    def attrs(self) -> Any:
        """The attributes of the feature's group (its parameters: ``sr``, ``mode``, ``names``...)."""
        return self._require().group.attrs

    @property
    def names(self) -> list[str]:
        """Label names of a category feature: label ``i`` is ``names[i]``."""
        column = self.column
        return [] if column is None else layout.category_names(column)

    @property
    def refs(self) -> RefsView:
        return RefsView(self)

    def __len__(self) -> int:
        column = self.column
        return 0 if column is None else column.data.shape[0]

    def __getitem__(self, item: Any) -> Any:
        column = self._require()
        # A slice that is exactly a source's ref comes back in that source's shape.
        if column.storage == "flat" and isinstance(item, slice) and item.step in (None, 1):
            row = self._ref_row(column, item)
            if row is not None:
                return column.data[item].reshape(layout.stored_shape(column, row))
        if _row_list(item):  # proxy[[3, 70, 512]]: run by run, in any order (h5py: slow, sorted)
            return take_rows(column.data, item)
        return column.data[item]

    def _stacked(self, column: layout.Column, refs: np.ndarray) -> np.ndarray | None:
        """The sources' rows as one array, when each has exactly one row (item, category)."""
        if column.storage in ("item", "category") and bool(np.all(refs[:, 1] - refs[:, 0] == 1)):
            return take_rows(column.data, refs[:, 0])
        return None

    def stacked_rows(self, rows: Any) -> np.ndarray | None:
        """``get_rows(rows)`` as one array ``(len(rows), ...)``, or ``None`` when the feature's
        sources are not one stored row each, unchanged by reads (ragged images, text...)."""
        column = self._require()
        if type(self.feature).from_stored is not Feature.from_stored:
            return None
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self.bank._is_dense(column):
            return take_rows(column.data, rows)
        refs = take_rows(column.refs, rows)
        return None if (refs[:, 0] < 0).any() else self._stacked(column, refs)

    def get_rows(self, rows: Any) -> list[Any]:
        """The data of the sources at ``rows`` (positions in :attr:`TypedFile.ids`), as ``get``
        returns each: ``proxy.get_rows([bank.index(i) for i in ids])``. The refs, and the data
        of a fixed-shape feature, are read in one pass of slices; other data source by source.

        Every one of those sources must have data for this feature.
        """
        column = self._require()
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if not len(rows):
            return []
        if self.bank._is_dense(column):
            starts = absolute_rows(rows, column.refs.shape[0])
            refs = np.stack([starts, starts + 1], axis=1)
        else:
            refs = take_rows(column.refs, rows)
        missing = np.flatnonzero(refs[:, 0] < 0)
        if len(missing):
            source = self.bank.ids[int(rows[missing[0]])]
            raise ValueError(
                f"source {source!r} has no data for feature {self.path!r}: GetId serves "
                "sources that all have it (build the bank so they do, or use GetIndex)"
            )
        feature = self.feature
        block = self._stacked(column, refs)
        if block is not None:
            if column.storage == "category":
                return [int(v) for v in block]
            return [feature.from_stored(row, "") for row in block]
        values = []
        for row, (start, stop) in zip(rows.tolist(), refs.tolist(), strict=True):
            shape = layout.stored_shape(column, row) if column.storage == "flat" else None
            block = column.data[start:stop]
            values.append(stored_value(feature, column.storage, block, shape, ""))
        return values

    def _ref_row(self, column: layout.Column, item: slice) -> int | None:
        """The source whose ref is exactly ``item``, if any."""
        if item.start is None or item.stop is None:
            return None
        starts, order, stops = self.bank._refs_index(column)
        first = int(np.searchsorted(starts, item.start))
        for i in range(first, len(starts)):
            if starts[i] != item.start:
                break
            if stops[i] == item.stop:
                return int(order[i])
        return None

    def __setitem__(self, item: Any, value: Any) -> None:
        self.bank._require_writable()
        column = self._require()
        if column.storage == "flat":
            value = np.asarray(value).reshape(-1)  # what a ref read reshaped goes back raveled
        column.data[item] = value

    def get(self, id_: str) -> Any:
        """Source ``id_``'s data (``None`` if it has none for this feature)."""
        return self._get_row(self.bank.index(id_), id_)

    def _get_row(self, row: int, id_: str) -> Any:
        column = self.column
        if column is None or row >= column.refs.shape[0]:
            return None
        start, stop = (int(v) for v in column.refs[row])
        if start < 0:
            return None
        shape = layout.stored_shape(column, row) if column.storage == "flat" else None
        return stored_value(self.feature, column.storage, column.data[start:stop], shape, id_)

    def to_dask(self, chunks: Any = None) -> Any:
        """The concatenated data as a ``dask.array.Array``, read lazily on any worker.

        Fixed-shape features (``Image(size=...)``, ``Array(item=True)``) come
        out as ``(n, H, W, C)`` and labels as ``(n,)``. When every source of
        the bank has data for such a feature, row ``i`` is source ``i``
        (whatever order the rows were written in), so arrays of two features
        line up: ``x[y == 3]``. Otherwise, and for features stored ``rows``
        or ``flat``, it is the concatenation in the order of ``data``; use
        :meth:`to_dask_sources` for one array per source.

        ``chunks`` is anything ``dask.array.from_array`` takes. The default
        cuts axis 0 in whole HDF5 chunks, about ``h5bank.read.chunk-bytes``
        (64 MiB) a block. Making the array reads metadata only; its tasks
        open the bank once per worker process (a :class:`~pipeline.files.cache.LazyFile`),
        so the bank must be on storage every worker reaches.
        """
        column = self._require()
        by_source = column.storage in ("item", "category") and column.data.shape[0] == len(
            self.bank
        )
        refs = column.refs if by_source else None
        return dask_array(self.bank.lazy_file(), column.data, chunks, refs)

    def to_dask_sources(self, partition_size: int | None = None) -> Any:
        """A ``dask.bag`` of ``(id, value)``, one item per source with data, in bank order.

        ``value`` is what :meth:`get` returns (each image in its own shape,
        each sound its own length). Partitions are ranges of consecutive
        sources, ``partition_size`` of them (default: about
        ``h5bank.read.chunk-bytes`` of data, at most 10,000), so a bank of
        millions of sources makes hundreds of tasks, not millions. Making it
        reads metadata only.
        """
        self._require()
        n = len(self.bank)
        size = partition_size or rows_per_partition(self.bank._h5, [self.path], n)
        specs = columns_for(self.bank._features, self.bank._h5, {self.path: self.path})
        return source_bag(self.bank.lazy_file(), specs, range(n), size, single=True)

    def add(self, id_: str, value: Any) -> None:
        """Add this feature's data for ``id_`` (which has none yet)."""
        self.bank._write(
            id_, {self.name: value}, replace=False, prefix=posixpath.dirname(self.path)
        )

    def set(self, id_: str, value: Any) -> None:
        """Replace this feature's data for ``id_``."""
        self.bank._write(id_, {self.name: value}, replace=True, prefix=posixpath.dirname(self.path))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.feature, name)

    def _describe(self) -> str:
        feature = self.feature
        column = self.column
        label = type(feature).__name__
        if column is None:
            return f"{self.name:<14} {label:<10} {self.storage:<8} (no data)"
        refs = column.refs[:]
        with_data = int((refs[:, 0] >= 0).sum()) if len(refs) else 0
        params = {k: v for k, v in column.group.attrs.items() if not k.startswith("h5bank_")}
        if "names" in params:
            names = [str(n) for n in np.atleast_1d(params["names"])]
            params["names"] = ",".join(names[:8]) + (",..." if len(names) > 8 else "")
        shown = " ".join(f"{k}={v}" for k, v in params.items() if v is not None and k != "decoder")
        return (
            f"{self.name:<14} {label:<10} {column.storage:<8} {column.data.dtype!s:<8} "
            f"{column.data.shape!s:<20} {compression_of(column.data):<10} "
            f"{human_bytes(layout.storage_bytes(column.group)):>9}  {with_data} source{'s' * (with_data != 1)}  {shown}"
        ).rstrip()

    def __repr__(self) -> str:
        return f"<feature {self.path!r} of {self.bank._shown!r}: {self._describe().strip()}>"


class RefsView:
    """A feature's ``[start, stop)`` table: ``refs[i]`` is a ``slice`` (``None`` for no data).

    ``refs[:]`` (or any non-integer item) returns rows of the ``(n, 2)`` int64 table.
    """

    def __init__(self, proxy: FeatureProxy) -> None:
        self._proxy = proxy

    def _table(self) -> h5py.Dataset | None:
        column = self._proxy.column
        return None if column is None else column.refs

    def __len__(self) -> int:
        return len(self._proxy.bank)

    def __getitem__(self, item: Any) -> Any:
        table = self._table()
        n = len(self)
        if isinstance(item, (int, np.integer)):
            row = int(item) + n if item < 0 else int(item)
            if not 0 <= row < n:
                raise IndexError(f"refs index {item} out of range for {n} sources")
            if table is None or row >= table.shape[0]:
                return None
            start, stop = (int(v) for v in table[row])
            return None if start < 0 else slice(start, stop)
        if table is None:
            return np.full((n, 2), -1, dtype=np.int64)[item]
        return table[item]

    def __iter__(self) -> Iterator[slice | None]:
        table = self._table()
        rows = table[:] if table is not None else np.full((len(self), 2), -1)
        for start, stop in rows.tolist():
            yield None if start < 0 else slice(start, stop)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        table = self[:]
        return table if dtype is None else table.astype(dtype)

    def __repr__(self) -> str:
        return f"<refs of {self._proxy.path!r}: {len(self)} sources>"


class DatasetProxy(_Proxy):
    """A plain HDF5 dataset (not a bank feature), indexed like h5py."""

    @property
    def dataset(self) -> h5py.Dataset:
        return self.bank._h5[self.path]

    shape = property(lambda self: self.dataset.shape)
    dtype = property(lambda self: self.dataset.dtype)
    attrs = property(lambda self: self.dataset.attrs)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Any) -> Any:
        return self.dataset[item]

    def __setitem__(self, item: Any, value: Any) -> None:
        self.bank._require_writable()
        self.dataset[item] = value

    def to_dask(self, chunks: Any = None) -> Any:
        """The dataset as a ``dask.array.Array``; see :meth:`FeatureProxy.to_dask`."""
        return dask_array(self.bank.lazy_file(), self.dataset, chunks)

    def _get_row(self, row: int, id_: str) -> None:
        return None

    def _describe(self) -> str:
        ds = self.dataset
        return (
            f"{self.name:<14} {'dataset':<10} {'':<8} {ds.dtype!s:<8} {ds.shape!s:<20} "
            f"{compression_of(ds):<10} {human_bytes(layout.storage_bytes(ds)):>9}"
        )

    def __repr__(self) -> str:
        return f"<dataset {self.path!r} of {self.bank._shown!r}: {self._describe().strip()}>"


__all__ = [
    "DatasetProxy",
    "FeatureProxy",
    "Group",
    "GroupProxy",
    "MapResult",
    "RefsView",
    "TypedFile",
]
