r"""``TypedFile``: a bank type (a subclass whose class attributes are features and
:class:`~pipeline.schema.Group`\ s), and the bank objects it opens.

``TypedFile(path)`` itself opens any HDF5 file. It is a facade: its file
handle is a :class:`~pipeline.bank.handle.BankFile`, what it read from the
file a :class:`~pipeline.bank.catalog.Catalog`, its features and groups read as
:mod:`~pipeline.bank.proxies`, writes go through :class:`~pipeline.bank.writes.Writes`;
building, ``map`` and serving live in :mod:`pipeline.bank.building`,
:mod:`pipeline.bank.mapping` and :mod:`pipeline.bank.serve`.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import h5py

from features.base import Feature
from pipeline.bank import building, serve
from pipeline.bank.catalog import Catalog
from pipeline.bank.display import bank_header
from pipeline.bank.handle import BankFile
from pipeline.bank.mapping import map_bank
from pipeline.bank.proxies import BankParts, DatasetProxy, FeatureProxy, GroupProxy, node_at
from pipeline.bank.writes import Writes
from pipeline.build.graph import Build
from pipeline.build.options import BuildOptions
from pipeline.build.summary import BuildSummary, Failure
from pipeline.errors import SchemaError
from pipeline.files.cache import LazyFile
from pipeline.run.runner import scheduler_for
from pipeline.schema import Schema
from pipeline.urls import is_url

T = TypeVar("T", bound="TypedFile")

_INSTANCE_ATTRIBUTES = frozenset({"summary"})  # set on every instance: no feature may hide it
_NOT_PICKLED = frozenset({"summary"})  # the handle (_file) and _parts pickle as recipes


class TypedFile:
    """A bank (or any HDF5 file) opened through its type.

    Parameters
    ----------
    path
        The ``.h5`` file, or an fsspec URL (``s3://...``): opened read-only,
        metadata in a few requests and each chunk in about one.
    mode
        ``"r"`` (read only, the default), ``"r+"`` (read and write a bank) or
        ``"a"`` (creating an empty bank if the file is missing). Use
        :meth:`create` to build a bank from sources.
    keep_open
        Accepted for h5mapper code; changes nothing (h5bank keeps the file
        open until :meth:`close`).
    storage_options
        fsspec options when ``path`` is a URL.
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
        self._file = BankFile(
            os.fspath(path), mode, storage_options, h5py_options,
            owner=type(self).__name__, any_hdf5=type(self) is TypedFile,
        )  # fmt: skip
        self.summary: BuildSummary | None = None
        self._file.open(type(self).__schema__.describe())
        catalog = Catalog(self._file, type(self).__schema__)
        self._parts = BankParts(catalog, Writes(catalog))

    path = property(lambda self: self._file.path, doc="The bank's path or URL.")
    mode = property(lambda self: self._file.mode, doc="``'r'``, ``'r+'`` or ``'a'``.")
    remote = property(lambda self: self._file.remote, doc="Whether the bank is at a URL.")

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the recipe (the handle's) and what a subclass set on the instance
        (``self.split = "val"``): a bank type that is also a ``torch.utils.data.Dataset``
        goes to ``spawn`` workers, each opening the bank read-only for itself."""
        return {k: v for k, v in vars(self).items() if k not in _NOT_PICKLED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.summary = None

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
        shards: int | str | None = None,
        n_workers: int | None = None,
        parallelism: str | None = None,
        keep_open: bool | None = None,
    ) -> T:
        """Build a bank from ``sources`` and return it, open for reading and writable on demand.

        The bank returned reads like one opened with ``mode="r"`` (Dask and
        ``DataLoader`` workers can open it too) and, as h5mapper's does, takes
        writes: the first ``add``, ``set`` or item assignment reopens it ``"r+"``.

        Parameters
        ----------
        path
            The bank to write (``path + ".partial"`` until the build finishes; a
            URL is built locally, then uploaded whole).
        sources
            Paths, directories (walked), globs, fsspec URLs or plain ids, or an
            iterable of them (streamed); see :func:`pipeline.sources.expand`.
        mode
            ``"w"`` builds a new bank (replacing ``path`` when done); ``"a"``
            appends the sources not in the bank yet, and resumes a stopped build.
        scheduler
            Where the build runs; ``None`` is an embedded local cluster (or the
            current default client). See :mod:`pipeline.run.runner`.
        partition_size, on_error, progress, storage_options, max_pending
            Sources per decode task; ``"skip"`` (record a failed source, go on) or
            ``"raise"`` (:class:`~pipeline.errors.SourceError`); a progress bar and
            summary on stderr; fsspec options for URL sources (flat or per
            protocol); decoded partitions waiting for the writer. ``None`` reads
            ``h5bank.build.*`` (:class:`~pipeline.build.options.BuildOptions`).
        shards
            Writer chains (shard files, on their own workers) joined by the bank file
            (``docs/scaling.md``); ``"auto"``: one per worker; default 1, one file.
        n_workers, parallelism, keep_open
            h5mapper's arguments: worker processes of the embedded cluster (or
            threads with ``scheduler="threads"``; refused for a running cluster);
            ``"mp"``, ``"threads"`` or ``"none"`` (``scheduler="local"``,
            ``"threads"``, ``"sync"``); accepted, changes nothing.
        """
        scheduler = scheduler_for(scheduler, parallelism, n_workers)
        options = BuildOptions.resolve(
            mode, on_error, progress, partition_size, max_pending, storage_options, shards
        )
        path = os.fspath(path)
        if is_url(path):
            summary = building.build_remote(
                cls.__schema__, path, sources, options, scheduler, n_workers
            )
            bank = cls(path, storage_options=options.storage_options)
        else:
            summary = building.build(cls.__schema__, path, sources, options, scheduler, n_workers)
            bank = cls(path, "r")
            bank._file.writable = True  # as h5mapper's create: writes reopen it with mode="r+"
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
        shards: int | str | None = None,
    ) -> Build:
        """The build as a Dask collection (:class:`pipeline.build.graph.Build`), not yet run:
        ``client.compute(Bank.graph(path, sources, scheduler=client))`` submits it without
        blocking. ``scheduler`` is the cluster the writer chain is pinned to (``None``: the
        default client if any, else none, for the threaded scheduler)."""
        options = BuildOptions.resolve(
            mode, on_error, None, partition_size, max_pending, storage_options, shards
        )
        return building.graph(cls.__schema__, os.fspath(path), sources, options, scheduler)

    # -- ids -----------------------------------------------------------------

    @property
    def h5(self) -> h5py.File:
        """The underlying ``h5py.File``, for what the proxies do not cover."""
        return self._parts.catalog.file

    @property
    def ids(self) -> list[str]:
        """Source ids in commit order."""
        return self._parts.catalog.ids

    def index(self, id_: str) -> int:
        """The row of source ``id_`` in every refs table."""
        return self._parts.catalog.row(id_)

    def __len__(self) -> int:
        return self._parts.catalog.count()

    def __contains__(self, id_: object) -> bool:
        return self._parts.catalog.has(id_)

    def failures(self) -> list[Failure]:
        """Sources the builds of this bank could not load, with the feature and the reason."""
        return self._parts.catalog.failures()

    # -- the tree of proxies ------------------------------------------------------

    @property
    def root(self) -> GroupProxy:
        return GroupProxy(self, self._parts, "")

    def feature(self, path: str) -> FeatureProxy | GroupProxy | DatasetProxy:
        """The proxy at ``path`` (``"data/images"``), for names that are not identifiers."""
        return node_at(self, self._parts, path.strip("/"))

    def _child(self, name: str) -> Any:  # a declared feature or group (features.base.BankMember)
        return node_at(self, self._parts, name)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self.root.children():
            return node_at(self, self._parts, name)
        raise AttributeError(
            f"{type(self).__name__} {self._file.shown!r} has no feature or group {name!r}"
        )

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *self.root.children()})

    def feature_of(self, path: str) -> Feature:
        """The feature that owns the column at ``path``."""
        return self._parts.catalog.feature_of(path)

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
        self._parts.writes.write(id_, data, replace=False)

    def set(self, id_: str, data: Mapping[str, Any]) -> None:
        """Write data for ``id_``, replacing what the source has (in place when the size matches)."""
        self._parts.writes.write(id_, data, replace=True)

    # -- lazy computing ------------------------------------------------------------------

    def lazy_file(self) -> LazyFile:
        """The picklable recipe Dask tasks open this bank with, once per worker process; a
        task that finds another bank at the path raises ``BankChangedError``."""
        return self._file.lazy_file()

    def to_dask(self, chunks: Any = None) -> dict[str, Any]:
        """Every feature column as a ``dask.array.Array``, by path (see
        :meth:`~pipeline.bank.proxies.FeatureProxy.to_dask`): ``x[y == 3].mean(axis=0)``
        runs lazily, row ``i`` of each array being source ``i`` where every source has data."""
        return self.root.to_dask(chunks)

    def serve(self, batch: Any = None, **dataloader_kwargs: Any) -> Any:
        """A PyTorch ``DataLoader`` over this bank, batches shaped like ``batch`` (a spec of
        :class:`~pipeline.serve.Input` / :class:`~pipeline.serve.Target` items), with
        ``dataloader_kwargs``; each worker opens the bank for itself. See :mod:`pipeline.serve`."""
        return serve.serve(self, batch, **dataloader_kwargs)

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

        ``func({input: value})`` runs once per source with data for every
        input (``inputs``: column paths, default all), on any worker. With
        ``output=None`` the results come back as a :class:`~pipeline.bank.mapping.MapResult`
        (``{id: result}``, and ``failures``); with an ``output`` path they are
        written into this bank as a new feature (``feature`` says how it is
        stored) through a build's single writer, and the
        :class:`~pipeline.build.summary.BuildSummary` is returned. Every
        parameter is described at :func:`pipeline.bank.mapping.map_bank`.

        Notes
        -----
        The bank is closed while the map runs and reopened in its mode after.
        If a map with an output fails, the bank is put back as of its last
        commit before the error is raised: the results written so far stay.
        """
        options = BuildOptions.resolve("a", on_error, progress, max_pending=max_pending)
        result = map_bank(
            self._parts.catalog, self.close, func, inputs, output, feature, scheduler,
            partition_size, options, open_shard=type(self),
        )  # fmt: skip
        if output is not None:
            self.summary = result
        return result

    # -- display ----------------------------------------------------------------------

    def tree(self) -> str:
        """The bank as a tree: groups, features, shapes, dtypes, compression, bytes, sources."""
        out = io.StringIO()
        f = self.h5
        head = bank_header(f, type(self).__name__, self._file.shown, len(self), self._file.size())
        print(head, file=out)
        self.root.print_tree(out, "")
        return out.getvalue().rstrip("\n")

    def info(self, file: Any = None) -> None:
        """Print :meth:`tree`."""
        print(self.tree(), file=file or sys.stdout)

    def __repr__(self) -> str:
        if not self._file.is_open:
            return f"<{type(self).__name__} {self._file.shown!r} (closed)>"
        return self.tree()

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Close the bank, and this process's cached Dask read handles on it (they would hold
        its lock); see :meth:`pipeline.bank.handle.BankFile.close`."""
        self._file.close()

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["TypedFile"]
