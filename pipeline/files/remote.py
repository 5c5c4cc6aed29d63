"""Banks at URLs: fsspec files tuned for HDF5, read with garbage collection paused."""

from __future__ import annotations

import contextlib
import gc
import io
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import h5py

from pipeline.format.rows import register_ranges
from pipeline.urls import error_chain, http_status, options_for, redact, scrub, transient

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
    register_ranges(f, _range_reader(fs, path))
    return f


def _range_reader(fs: Any, path: str) -> Any:
    """Byte ranges of ``path``, fetched together (concurrently where ``fs`` is asynchronous,
    as HTTP, S3 and GCS are), with collections paused as for every remote read."""

    def read(starts: Any, stops: Any) -> Any:
        with gc_paused():
            return fs.cat_ranges([path] * len(starts), list(starts), list(stops), on_error="raise")

    return read
