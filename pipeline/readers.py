"""Dask readers over a bank, and the picklable lazy file handles they are built on.

An ``h5py.File`` cannot cross a process boundary, and opening one costs a few
hundred microseconds plus the metadata reads. So a Dask graph over a bank never
holds a file: it holds a :class:`LazyFile`, the *recipe* for opening one (the
path, h5py's open options, and what the file looked like when the graph was
made). Each process opens a recipe at most once and keeps the handle in a
small per-process cache (:class:`FileCache`), closed when the process exits or
when a writer needs the file (:func:`release`).

Readers are read-only and take HDF5's shared file lock where the filesystem
has one ("best-effort"), so a process writing the bank (a build, ``add``,
``bank.map(output=...)``) and a reader refuse each other with a clear error
instead of one seeing the other's half-written metadata. h5bank does not use
HDF5's SWMR mode; see docs/reading.md, "Reading while a bank changes".

- :func:`dask_array`: a ``dask.array.Array`` over a dataset, in blocks that
  are whole multiples of its HDF5 chunks along axis 0 (config
  ``h5bank.read.chunk-bytes``). Making one reads metadata only.
- :func:`source_bag`: a ``dask.bag`` of ``(id, value)`` per source,
  partitioned by contiguous source rows: one task per partition, never one per
  source, however many millions there are.
- :func:`read_rows`: what both the bag and ``bank.map`` use to read sources'
  data by row, through any open ``h5py.File``.

A bank at a URL (``s3://``, ``https://``, any fsspec protocol) opens through
:func:`open_remote`: an fsspec file with a block cache, garbage collection
paused during each read (the h5py / async-fsspec deadlock), read-only. A
``LazyFile`` carries the URL and its ``storage_options`` to the workers, each
of which opens its own handle.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import io
import math
import multiprocessing.util
import os
import socket
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from features.base import Feature
from pipeline import config, layout
from pipeline.errors import BankBusyError, BankChangedError, BuildInProgressError

# What a reader opens with unless told otherwise: HDF5's shared lock where the
# filesystem supports locks, none where it does not (NFS, Lustre often refuse).
READ_OPTIONS: dict[str, Any] = {"locking": "best-effort"}

# Sources per partition of a per-source bag at most: each becomes a Python
# object in the partition's list, so bytes alone would make label bags huge.
MAX_PARTITION_SOURCES = 10_000


def _shown(path: str) -> str:
    """``path`` as messages show it: a URL without its credentials."""
    from pipeline.sources import redact

    return redact(path)


def _normal(path: str | os.PathLike[str]) -> str:
    """A local path made absolute; a URL as given."""
    from pipeline.sources import is_url

    text = os.fspath(path)
    return text if is_url(text) else os.path.abspath(text)


def file_identity(path: str | int) -> tuple[int, int, int]:
    """What tells one version of a file from another: inode, size, modification time.

    ``path`` may be an open file descriptor, to name the file a handle holds
    even if another file has been renamed onto its path since.
    """
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def handle_identity(f: h5py.File) -> tuple[int, int, int] | None:
    """:func:`file_identity` of the file an open ``h5py.File`` reads (``None`` if not a plain file)."""
    try:
        return file_identity(int(f.id.get_vfd_handle()))
    except (TypeError, ValueError, OSError):
        return None


def bank_identity(f: h5py.File) -> str | None:
    """Which bank ``f`` is: its ``h5bank_uuid``, else (plain HDF5 files) its inode.

    Filesystems reuse inodes (a bank rebuilt twice can get its first inode
    back), so banks carry a uuid given at creation and kept by appends.
    """
    uuid = layout.bank_uuid(f)
    if uuid is not None:
        return uuid
    identity = handle_identity(f)
    return None if identity is None else f"inode:{identity[0]}"


# Remote banks are read through an fsspec file object that caches blocks of
# this size (at most REMOTE_BLOCKS of them, least recently used dropped):
# metadata scattered through a bank (id, refs and shape tables) then costs a
# request per block, not per object. Measured on a 2,000-image bank over HTTP:
# open + one read by id took 9 requests (16 keeping only the first block), 21
# more random reads 4 (20). s3fs's default 50 MiB readahead moves up to 40x
# the bytes random reads need.
REMOTE_BLOCK = 2 << 20
REMOTE_BLOCKS = 32
# A remote bank's version (size, ETag) is checked at most this often per
# process: each check is a HEAD request; local files are checked on every read.
REMOTE_REVALIDATE = 5.0
# HDF5's chunk cache for remote banks: partial-chunk reads without it become
# thousands of small requests.
REMOTE_CHUNK_CACHE = 32 << 20

_gc_lock = threading.Lock()
_gc_paused = 0
_gc_restore = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a remote read is in flight.

    h5py holds its global lock while it reads through a Python file object;
    an async fsspec filesystem does the read on its IO thread. If a collection
    starts on that thread and frees an h5py object, the free waits for the
    lock the reading thread holds: both wait for ever (h5py #2019, measured
    here). Collections are paused only for the duration of each read; a
    ``gc.disable()`` made by other code while a read is in flight is undone
    when the last read ends.
    """
    global _gc_paused, _gc_restore
    with _gc_lock:
        if _gc_paused == 0:
            _gc_restore = gc.isenabled()
            gc.disable()
        _gc_paused += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_paused -= 1
            if _gc_paused == 0 and _gc_restore:
                gc.enable()


class RemoteFile(io.RawIOBase):
    """A read-only fsspec file for h5py, with collections paused during each read."""

    def __init__(self, f: Any) -> None:
        super().__init__()
        self._f = f

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with gc_paused():
            data = self._f.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._f.close()
        super().close()


def remote_fs(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    from pipeline.sources import options_for

    return url_to_fs(url, **options_for(url, storage_options))


def remote_identity(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, ...]:
    """What tells one version of a remote file from another: size and ETag / modification time."""
    fs, path = remote_fs(url, storage_options)
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)
    try:
        info = fs.info(path)
    except Exception as error:
        raise _remote_error(url, error) from None
    tags = ("ETag", "etag", "LastModified", "Last-Modified", "last_modified", "mtime", "updated")
    return (info.get("size"), *(str(info[k]) for k in tags if info.get(k) is not None))


def _remote_error(url: str, error: BaseException) -> OSError:
    """An error about the remote bank ``url`` that tells a missing bank from an outage."""
    from pipeline.sources import error_chain, http_status, redact, scrub, transient

    chain = error_chain(error)
    status = next((s for s in map(http_status, chain) if s is not None), None)
    if status in (401, 403) or any(isinstance(e, PermissionError) for e in chain):
        return PermissionError(
            f"access to the bank at {redact(url)} was denied"
            + (f" (HTTP {status})" if status else "")
            + ": check the credentials; a presigned URL's signature may have expired"
        )
    if isinstance(error, FileNotFoundError) and not transient(error):
        return FileNotFoundError(f"no bank at {redact(url)} (no such object)")
    cause = error.__cause__ or error
    return OSError(
        f"cannot reach the bank at {redact(url)}: {type(cause).__name__}: {scrub(str(cause))}"
    )


def open_remote(url: str, storage_options: Mapping[str, Any] | None, **options: Any) -> h5py.File:
    """A remote bank (any fsspec URL) opened read-only, tuned for HDF5's access pattern."""
    fs, path = remote_fs(url, storage_options)
    try:
        raw = fs.open(
            path,
            "rb",
            cache_type="blockcache",
            block_size=REMOTE_BLOCK,
            cache_options={"maxblocks": REMOTE_BLOCKS},
        )
    except Exception as error:
        raise _remote_error(url, error) from None
    handle = RemoteFile(raw)
    try:
        with gc_paused():
            f = h5py.File(handle, "r", **{"rdcc_nbytes": REMOTE_CHUNK_CACHE, **options})
    except BaseException:
        handle.close()
        raise
    f._h5bank_raw = handle  # type: ignore[attr-defined]  # closed with the file
    return f


# Local HDF5 files open in this process: id(file) -> (descriptor, path, writable, (dev, ino)).
_OPEN: dict[int, tuple[int, str, bool, tuple[int, int]]] = {}


def track(f: h5py.File) -> None:
    """Remember ``f``'s descriptor, for :func:`_after_fork` (no-op for a remote file)."""
    try:
        fd = f.id.get_vfd_handle()
        if not isinstance(fd, int):
            return
        st = os.fstat(fd)
    except Exception:  # a remote bank (fsspec file object): no descriptor, no lock
        return
    key = id(f)
    _OPEN[key] = (fd, f.filename, f.mode != "r", (st.st_dev, st.st_ino))
    weakref.finalize(f, _OPEN.pop, key, None)


def _after_fork() -> None:
    """In a forked child, give each HDF5 file the parent has open a descriptor of its own.

    HDF5's file lock is a ``flock`` on the open file description, which a
    forked child shares: a ``DataLoader`` worker (``persistent_workers=True``)
    kept a bank the parent opened for writing locked after the parent closed
    it. So each inherited descriptor is replaced: by a fresh read-only open of
    the same file for a file open read-only (HDF5 in the child, and every
    handle sharing that file, go on reading correct bytes), by ``/dev/null``
    for a writable one (the child must not write; its bank refuses to be
    used). A descriptor that no longer is that file is left alone. HDF5 is not
    called here.
    """
    for fd, path, writable, identity in list(_OPEN.values()):
        with contextlib.suppress(OSError):
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != identity:
                continue
            fresh = os.open(os.devnull, os.O_RDWR) if writable else os.open(path, os.O_RDONLY)
            if not writable and (os.fstat(fresh).st_dev, os.fstat(fresh).st_ino) != identity:
                os.close(fresh)  # the path is another file now (rebuilt): read nothing
                fresh = os.open(os.devnull, os.O_RDWR)
            os.dup2(fresh, fd)
            os.close(fresh)


os.register_at_fork(after_in_child=_after_fork)


def close_file(f: h5py.File) -> None:
    """Close ``f`` and, for a remote bank, its file object."""
    _OPEN.pop(id(f), None)
    f.close()
    raw = getattr(f, "_h5bank_raw", None)
    if raw is not None:
        raw.close()


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
    if (high - low) * row_bytes <= max(SPAN_BYTES, 2 * len(wanted) * row_bytes):
        return data[low:high][wanted[where] - low]
    if isinstance(data, layout.RowsDataset):
        return data.read_rows(wanted)[where]
    return layout.read_runs(data, wanted)[where]


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


def open_for_reading(
    path: str, storage_options: Mapping[str, Any] | None = None, **options: Any
) -> h5py.File:
    """``h5py.File(path, "r")``, with errors that say what is going on with a bank.

    A path whose build has not finished raises :class:`BuildInProgressError`;
    a file another process has open for writing raises :class:`BankBusyError`.
    An fsspec URL opens through :func:`open_remote`.
    """
    from pipeline.sources import is_url

    register_plugin_filters()
    if is_url(path):
        return open_remote(path, storage_options, **options)
    try:
        f = h5py.File(path, "r", **{**READ_OPTIONS, **options})
        track(f)
        return f
    except FileNotFoundError:
        if os.path.exists(layout.partial_path(path)):
            raise BuildInProgressError(
                f"{path} is being written (a build, an append or bank.map with output is "
                f"running, or one stopped and left {layout.partial_path(path)}); read it when "
                "that finishes, or resume a stopped build with create(..., mode='a')"
            ) from None
        raise FileNotFoundError(
            f"{path} does not exist here (process {os.getpid()} on {socket.gethostname()}): Dask "
            "tasks read a bank from its path, so it must be on storage every worker reaches"
        ) from None
    except OSError as error:
        if "lock" in str(error):
            raise BankBusyError(
                f"{path} is open for writing in another process (a bank opened with mode 'r+' or "
                "'a', or a writer that has not finished): h5bank readers do not read a bank "
                f"while it is written. Close the writer and retry ({error})"
            ) from None
        raise


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
    if group.attrs.get(layout.ATTR_STORAGE) != "category" or dataset.name != group.name + "/data":
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
        from pipeline.sources import is_url

        return REMOTE_REVALIDATE if is_url(self.path) else 0.0

    def stat(self) -> tuple[Any, ...]:
        """The file's current version: local stat, or a remote object's size and ETag."""
        from pipeline.sources import is_url

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
                dataset = entry.file[name]
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
        from pipeline.sources import redact

        return f"LazyFile({redact(self.path)!r})"  # never the storage options


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
            raise ValueError(
                f"{_shown(self.file.path)}: source row {row} has no data in {self.name}; read this "
                "feature with to_dask_sources(), which skips such sources"
            )
        # Read each run of consecutive rows once, then put the rows in source order.
        order = np.argsort(starts, kind="stable")
        ordered = starts[order]
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


# -- per source --------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnSpec:
    """What a task needs to read one column per source: its path, storage, feature.

    ``expect`` is what the column's ``data`` held when the task was planned
    (checked on read, like a dask array's blocks); ``None`` skips the check.
    """

    key: str  # the name the value gets in the dict handed out (the path the caller used)
    path: str
    storage: str
    feature: Feature
    expect: Expect | None = None


def stored_value(
    feature: Feature, storage: str, block: np.ndarray, shape: tuple[int, ...] | None, id_: str
) -> Any:
    """One source's value as reads return it, from its rows of a column's ``data``."""
    if storage == "category":
        return int(block[0])
    if storage == "bytes":
        return feature.from_stored(block.tobytes(), id_)
    if storage == "item":
        return feature.from_stored(block[0], id_)
    if storage == "flat":
        return feature.from_stored(block.reshape(shape), id_)
    return feature.from_stored(block, id_)


@dataclass
class RawRows:
    """Sources' data as stored, read for :func:`decode_rows`: ids, and per column each
    source's rows and shape (``None`` where it has no data)."""

    ids: list[str]
    columns: list[list[tuple[np.ndarray, tuple[int, ...] | None] | None]]


def read_raw(f: h5py.File, columns: Sequence[ColumnSpec], rows: Sequence[int]) -> RawRows:
    """The stored data of the sources at ``rows`` (sorted) that have data in every column.

    Each column is read in one request spanning the rows' data when their
    data is about contiguous (a built bank), else source by source. Nothing
    is decoded: :func:`decode_rows` does that, wherever it runs.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return RawRows([], [[] for _ in columns])
    first, last = int(rows[0]), int(rows[-1]) + 1
    ids = layout.read_strings(layout.ids_table(f), first, last)
    offsets = rows - first
    blocks: list[list[Any]] = []
    keep = np.ones(len(rows), dtype=bool)
    for spec in columns:
        column = layout.Column.open(f, spec.path)
        problem = spec.expect.problem(Expect.of(column.data)) if spec.expect else None
        if problem:
            raise BankChangedError(
                f"{_shown(f.filename)}: {spec.path} no longer holds what this Dask graph was made from "
                f"({problem}): make it again from the bank as it is now"
            )
        refs = column.refs[first:last][offsets]
        keep &= refs[:, 0] >= 0
        shapes = column.shape[first:last][offsets] if column.shape is not None else None
        blocks.append(_read_column(column, refs, shapes))
    chosen = np.flatnonzero(keep)
    return RawRows(
        [ids[offsets[i]] for i in chosen], [[column[i] for i in chosen] for column in blocks]
    )


def _read_column(
    column: layout.Column, refs: np.ndarray, shapes: np.ndarray | None
) -> list[tuple[np.ndarray, tuple[int, ...] | None] | None]:
    have = refs[:, 0] >= 0
    out: list[Any] = [None] * len(refs)
    if not have.any():
        return out
    starts, stops = refs[have, 0], refs[have, 1]
    low, high = int(starts.min()), int(stops.max())
    needed = int((stops - starts).sum())
    block = column.data[low:high] if high - low <= 2 * needed + 1024 else None
    for i in np.flatnonzero(have):
        start, stop = int(refs[i, 0]), int(refs[i, 1])
        rows = block[start - low : stop - low] if block is not None else column.data[start:stop]
        shape = None if shapes is None else tuple(int(s) for s in shapes[i] if s >= 0)
        out[i] = (rows, shape)
    return out


def decode_rows(
    columns: Sequence[ColumnSpec], raw: RawRows | None
) -> list[tuple[str, dict[str, Any]]]:
    """``(id, {key: value})`` for each source of ``raw``, values as ``proxy.get`` returns them."""
    if raw is None:
        return []
    out = []
    for i, id_ in enumerate(raw.ids):
        values = {}
        for spec, column in zip(columns, raw.columns, strict=True):
            block, shape = column[i]
            values[spec.key] = stored_value(spec.feature, spec.storage, block, shape, id_)
        out.append((id_, values))
    return out


def read_rows(
    f: h5py.File, columns: Sequence[ColumnSpec], rows: Sequence[int]
) -> list[tuple[str, dict[str, Any]]]:
    """``(id, {key: value})`` of the sources at ``rows`` (sorted) with data in every column."""
    return decode_rows(columns, read_raw(f, columns, rows))


def read_rows_lazily(
    lazy: LazyFile, columns: Sequence[ColumnSpec], rows: Sequence[int]
) -> list[tuple[str, dict[str, Any]]]:
    """:func:`read_rows` through this process's cached handle of ``lazy``."""
    with lazy.acquire() as f:
        return read_rows(f, columns, rows)


def _single_values(
    lazy: LazyFile, columns: Sequence[ColumnSpec], rows: Sequence[int]
) -> list[tuple[str, Any]]:
    (spec,) = columns
    return [(id_, values[spec.key]) for id_, values in read_rows_lazily(lazy, columns, rows)]


def partition_rows(rows: Sequence[int], size: int) -> list[Sequence[int]]:
    """``rows`` (an array or a ``range``) cut into consecutive pieces of at most ``size``."""
    size = max(1, int(size))
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def rows_per_partition(f: h5py.File, paths: Sequence[str], n_sources: int) -> int:
    """Sources per partition so that one partition reads about ``h5bank.read.chunk-bytes``."""
    target = int(config.get("read.chunk-bytes"))
    per_source = 0.0
    for path in paths:
        data = f[path][layout.DATA]
        per_source += data.shape[0] * max(1, math.prod(data.shape[1:])) * data.dtype.itemsize
    per_source = per_source / max(1, n_sources)
    by_bytes = target // max(1, int(per_source)) if per_source else MAX_PARTITION_SOURCES
    return int(max(1, min(MAX_PARTITION_SOURCES, by_bytes)))


def source_bag(
    lazy: LazyFile,
    columns: Sequence[ColumnSpec],
    rows: Sequence[int],
    partition_size: int,
    single: bool = False,
) -> Any:
    """A ``dask.bag`` of ``(id, value)`` (``single``) or ``(id, {key: value})`` for ``rows``.

    One partition per ``partition_size`` consecutive rows; a partition is one
    task that opens the bank once (per process) and reads each column's span.
    """
    import dask.bag as db
    from dask.delayed import delayed

    reader = _single_values if single else read_rows_lazily
    parts = [
        delayed(reader, pure=True, traverse=False)(lazy, list(columns), piece)
        for piece in partition_rows(rows, partition_size)
    ]
    if not parts:
        return db.from_sequence([], npartitions=1)
    return db.from_delayed(parts)


def columns_for(
    features: Mapping[str, Feature], f: h5py.File, paths: Mapping[str, str]
) -> list[ColumnSpec]:
    """A :class:`ColumnSpec` for each ``{key: column path}``, from the bank's features."""
    from pipeline.schema import feature_of

    specs = []
    for key, path in paths.items():
        column = layout.Column.open(f, path)
        owner = feature_of(path, features)
        specs.append(ColumnSpec(key, path, column.storage, features[owner], Expect.of(column.data)))
    return specs
