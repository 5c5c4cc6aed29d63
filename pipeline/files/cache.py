"""Per-process cache of open read-only files, and the picklable recipes Dask tasks open
them with.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing.util
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from pipeline import config
from pipeline.errors import BankChangedError
from pipeline.files.handles import (
    bank_identity,
    close_file,
    file_identity,
    handle_identity,
    open_for_reading,
)
from pipeline.files.remote import REMOTE_REVALIDATE, remote_identity
from pipeline.format import layout
from pipeline.format.storage import KINDS
from pipeline.format.virtual import ShardRows, is_virtual
from pipeline.urls import is_url, redact


def _shown(path: str) -> str:
    """``path`` as messages show it: a URL without its credentials."""
    return redact(path)


def _normal(path: str | os.PathLike[str]) -> str:
    """A local path made absolute; a URL as given."""
    text = os.fspath(path)
    return text if is_url(text) else os.path.abspath(text)


@dataclass(frozen=True)
class Expect:
    """What a dataset held when a Dask graph was made from it.

    A read checks it against the dataset as it is: at least ``rows`` rows
    (appends keep earlier rows), the same trailing shape and dtype, and label
    ``names`` that start with the recorded ones (codes keep their meaning).
    """

    shape: tuple[int, ...]
    dtype: str
    names: tuple[str, ...] | None = None

    @classmethod
    def of(cls, dataset: h5py.Dataset) -> Expect:
        return cls(tuple(dataset.shape), dataset.dtype.str, _names(dataset))

    def problem(self, now: Expect) -> str | None:
        """Why a dataset that is now ``now`` cannot serve this graph (``None`` if it can)."""
        if len(now.shape) != len(self.shape) or now.shape[1:] != self.shape[1:]:
            return f"its shape is {now.shape}, the graph was made for {self.shape}"
        if self.shape and now.shape[0] < self.shape[0]:
            return f"it has {now.shape[0]} rows, the graph was made for {self.shape[0]}"
        if now.dtype != self.dtype:
            return f"its dtype is {now.dtype}, the graph was made for {self.dtype}"
        if self.names is not None and (now.names or ())[: len(self.names)] != self.names:
            return "its label names changed (codes were renumbered)"
        return None


def _names(dataset: h5py.Dataset) -> tuple[str, ...] | None:
    """The label names of the category column ``dataset`` belongs to, if it is one."""
    group = dataset.parent
    storage = KINDS.get(str(group.attrs.get(layout.ATTR_STORAGE)))
    if storage is None or not storage.has_names or dataset.name != group.name + "/data":
        return None
    return tuple(str(n) for n in np.atleast_1d(group.attrs.get(layout.ATTR_NAMES, [])))


class _Entry:
    __slots__ = ("bank", "checked", "datasets", "file", "identity", "stale", "users")

    def __init__(self, file: h5py.File, identity: tuple[Any, ...]) -> None:
        self.file = file
        self.identity = identity  # the file's stat before opening: when to reopen
        self.checked = time.monotonic()  # when identity was last compared with the file
        self.bank = bank_identity(file)  # which bank was opened: what graphs check
        self.datasets: dict[str, tuple[h5py.Dataset, Expect]] = {}
        self.users = 0
        self.stale = False  # closed as soon as its last user is done


class FileCache:
    """Open read-only files of this process, reused by every task that reads them.

    At most ``max-open`` files stay open (least recently used closed first,
    config ``h5bank.read.max-open-files``). A file is reopened when it changed
    on disk since it was opened (rebuilt, appended to). A file in use by a
    task is never closed under it: :func:`release` and eviction mark it, and
    the last user closes it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[Any, ...], _Entry] = OrderedDict()
        self.opens = 0  # files opened by this process, for tests and curiosity

    @contextlib.contextmanager
    def acquire(self, lazy: LazyFile) -> Iterator[_Entry]:
        key = lazy.key
        with self._lock:
            entry = self._entries.get(key)
            fresh = entry is not None and time.monotonic() - entry.checked < lazy.revalidate
        if fresh:
            identity = entry.identity  # a remote file checked moments ago: no request
        else:
            try:
                identity = lazy.stat()
            except FileNotFoundError:
                lazy.open()  # raises the error that explains why
                raise
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.checked = time.monotonic()
            if entry is not None and entry.identity != identity:
                self._drop(key)
                entry = None
            if entry is None:
                entry = _Entry(lazy.open(), identity)
                self.opens += 1
                self._entries[key] = entry
                self._evict()
            self._entries.move_to_end(key)
            entry.users += 1
        try:
            yield entry
        finally:
            with self._lock:
                entry.users -= 1
                if entry.stale and entry.users == 0:
                    close_file(entry.file)

    def _drop(self, key: tuple[Any, ...]) -> None:
        entry = self._entries.pop(key)
        entry.stale = True
        if entry.users == 0:
            close_file(entry.file)

    def _evict(self) -> None:
        limit = max(1, int(config.get("read.max-open-files")))
        while len(self._entries) > limit:
            self._drop(next(iter(self._entries)))

    def release(self, path: str | None = None) -> int:
        """Close the cached files of ``path`` (every file if ``None``); return how many."""
        target = None if path is None else _normal(path)
        with self._lock:
            keys = [k for k in self._entries if target is None or k[0] == target]
            for key in keys:
                self._drop(key)
        return len(keys)


CACHE = FileCache()


# Close the cache when the process ends: atexit in a main process, and
# multiprocessing's exit hook in the child processes Dask's nannies spawn
# (they leave through os._exit, which skips atexit).
atexit.register(CACHE.release)


multiprocessing.util.Finalize(None, CACHE.release, exitpriority=10)


def release(path: str | None = None) -> int:
    """Close this process's cached read handles on ``path`` (all if ``None``).

    A writer needs the bank to itself: builds and ``bank.map`` call this on
    every worker (``client.run(release, path)``) before they open it.
    """
    return CACHE.release(path)


class LazyFile:
    """A picklable recipe for opening a bank read-only, opened once per process.

    Parameters
    ----------
    path
        The file, on a filesystem every worker that reads it can reach.
    identity
        Which bank the graph was made from (:func:`bank_identity`: its uuid);
        a task that finds another bank at ``path`` (rebuilt or replaced)
        raises :class:`BankChangedError` rather than read rows of a different
        bank. ``None`` skips the check. Appends keep the uuid: what a read
        then checks is that the dataset still holds the rows it was made with
        (:class:`Expect`).
    version
        What the file looked like when the graph was made (size, mtime);
        only part of the Dask token, so graphs made before and after a write
        get different keys and ``persist()`` never serves stale blocks.
    **options
        ``h5py.File`` options (``rdcc_nbytes``...); ``locking`` defaults to
        ``"best-effort"``.

    Notes
    -----
    Pickling keeps the recipe and drops nothing else: there is no file in it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        identity: str | None = None,
        version: Any = None,
        storage_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        self.path = _normal(path)
        self.identity = identity
        self.version = version
        self.storage_options = dict(storage_options or {})
        self.options = options

    def open(self) -> h5py.File:
        """Open the file (uncached): a local path, or any fsspec URL with ``storage_options``."""
        return open_for_reading(self.path, self.storage_options, **self.options)

    @property
    def revalidate(self) -> float:
        """Seconds a remote file's version check is trusted (each check is a request)."""
        return REMOTE_REVALIDATE if is_url(self.path) else 0.0

    def stat(self) -> tuple[Any, ...]:
        """The file's current version: local stat, or a remote object's size and ETag."""
        if is_url(self.path):
            return remote_identity(self.path, self.storage_options)
        return file_identity(self.path)

    @classmethod
    def of(cls, f: h5py.File, **options: Any) -> LazyFile:
        """A recipe for the bank ``f`` has open, as it is now."""
        f.flush()
        stat = handle_identity(f)
        return cls(f.filename, bank_identity(f), stat[1:] if stat else None, **options)

    @property
    def key(self) -> tuple[Any, ...]:
        return (
            self.path,
            repr(sorted(self.storage_options.items())),
            repr(sorted(self.options.items())),
        )

    @contextlib.contextmanager
    def _entry(self) -> Iterator[_Entry]:
        if self.revalidate:  # a remote handle trusted for a while may be of an older bank
            with CACHE.acquire(self) as entry:
                stale = self.identity is not None and entry.bank != self.identity
            if stale:
                CACHE.release(self.path)  # check the file itself, not the cached handle
        with CACHE.acquire(self) as entry:
            if self.identity is not None and entry.bank != self.identity:
                raise BankChangedError(
                    f"{_shown(self.path)} is not the file this Dask graph was made from (the bank was "
                    "rebuilt or replaced since): make the arrays again from the bank as it is now"
                )
            yield entry

    @contextlib.contextmanager
    def acquire(self) -> Iterator[h5py.File]:
        """This process's open handle (opened on first use), checked against ``identity``."""
        with self._entry() as entry:
            yield entry.file

    def read(self, name: str, selection: Any, expect: Expect | None = None) -> np.ndarray:
        """``file[name][selection]`` through the cached handle, checked against ``expect``."""
        with self._entry() as entry:
            cached = entry.datasets.get(name)
            if cached is None:
                dataset: Any = entry.file[name]
                if is_virtual(dataset):
                    dataset = ShardRows(dataset)  # a sharded bank's data: read from its shards
                cached = entry.datasets[name] = (dataset, Expect.of(dataset))
            dataset, now = cached
            problem = expect.problem(now) if expect is not None else None
            if problem:
                raise BankChangedError(
                    f"{_shown(self.path)}: {name} no longer holds what this Dask graph was made from "
                    f"({problem}): make the arrays again from the bank as it is now"
                )
            return dataset[selection]

    def __getstate__(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "identity": self.identity,
            "version": self.version,
            "storage_options": self.storage_options,  # credentials travel to the workers, in memory
            "options": self.options,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __dask_tokenize__(self) -> Any:
        return (type(self).__name__, self.path, self.identity, self.version, self.key)

    def __repr__(self) -> str:
        return f"LazyFile({redact(self.path)!r})"  # never the storage options
