"""Opening bank files: read and write, local and remote, which file a handle holds, and
fork safety.
"""

from __future__ import annotations

import contextlib
import os
import socket
import weakref
from collections.abc import Mapping
from typing import Any

import h5py

from pipeline.errors import (
    BankBusyError,
    BuildInProgressError,
    WriterError,
)
from pipeline.files.remote import open_remote
from pipeline.format import layout
from pipeline.format.filters import register_plugin_filters
from pipeline.format.hdf5_errors import LOCKED, is_locked, lock_refusal
from pipeline.format.partial import BankFiles
from pipeline.format.rows import forget_ranges
from pipeline.format.trust import check_file
from pipeline.format.virtual import forget_opener, register_opener
from pipeline.urls import is_url, redact, sibling

# What a reader opens with unless told otherwise: HDF5's shared lock where the
# filesystem supports locks, none where it does not (NFS, Lustre often refuse).
READ_OPTIONS: dict[str, Any] = {"locking": "best-effort"}


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
    except (TypeError, ValueError, OSError, RuntimeError):  # RuntimeError: no descriptor
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
    if f.id.valid:
        forget_opener(f)
        forget_ranges(f)
    f.close()
    raw = getattr(f, "_h5bank_raw", None)
    if raw is not None:
        raw.close()


def checked(f: h5py.File, path: str, allow_external: bool | None, sizes: bool = True) -> h5py.File:
    """``f``, once :func:`~pipeline.format.trust.check_file` found nothing to refuse (else
    ``f`` is closed and the refusal raised); ``allow_external=None`` checks nothing."""
    if allow_external is None:  # open_for_reading(unchecked=True)
        return f
    identity = None if is_url(path) else handle_identity(f)  # checked once while unchanged
    key = None if identity is None else (path, identity, allow_external, sizes)
    if key in _CHECKED:
        return f
    try:
        check_file(f, redact(path), allow_external, sizes)
    except BaseException:
        close_file(f)
        raise
    if key is not None:
        if len(_CHECKED) > 4096:
            _CHECKED.clear()
        _CHECKED.add(key)
    return f


# Local files check_file found fine in this process: (path, (inode, size, mtime), options).
# Reopening the same unchanged file (a Dask worker's cache, a reopen after map) skips the walk.
_CHECKED: set[tuple[Any, ...]] = set()


def open_for_reading(
    path: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    allow_external: bool = False,
    unchecked: bool = False,
    **options: Any,
) -> h5py.File:
    """``h5py.File(path, "r")``, with errors that say what is going on with a bank.

    A path whose build has not finished raises :class:`BuildInProgressError`;
    a file another process has open for writing raises :class:`BankBusyError`.
    An fsspec URL opens through :func:`open_remote`. A file that points out
    of itself raises :class:`UnsafeBankError` unless ``allow_external``, one
    that declares sizes it does not store :class:`DamagedBankError`
    (:mod:`pipeline.format.trust`); ``unchecked`` skips both, for ``verify``,
    which reports them as problems.
    """
    register_plugin_filters()
    if is_url(path):
        trust = None if unchecked else allow_external
        f = checked(open_remote(path, storage_options, **options), path, trust)
        return _with_shards(f, path, storage_options, options)
    try:
        f = h5py.File(path, "r", **{**READ_OPTIONS, **options})
        track(f)
        f = checked(f, path, None if unchecked else allow_external)
        return _with_shards(f, path, storage_options, options)
    except FileNotFoundError:
        files = BankFiles.at(path)
        if files.only_building:
            raise BuildInProgressError(
                f"{path} is being written (a build, an append or bank.map with output is "
                f"running, or one stopped and left {files.in_progress}); read it when "
                "that finishes, or resume a stopped build with create(..., mode='a')"
            ) from None
        raise FileNotFoundError(
            f"{path} does not exist here (process {os.getpid()} on {socket.gethostname()}): Dask "
            "tasks read a bank from its path, so it must be on storage every worker reaches"
        ) from None
    except OSError as error:
        if lock_refusal(error) == LOCKED:
            raise BankBusyError(
                f"{path} is open for writing in another process (a bank opened with mode 'r+' or "
                "'a', or a writer that has not finished): h5bank readers do not read a bank "
                f"while it is written. Close the writer and retry ({error})"
            ) from None
        raise


def _with_shards(
    f: h5py.File, path: str, storage_options: Mapping[str, Any] | None, options: dict[str, Any]
) -> h5py.File:
    """``f``; when it is a sharded bank's index, its shards open as it did: the same storage,
    options and checks (:mod:`pipeline.format.virtual`), named beside it."""
    if layout.shard_names(f):

        def open_shard(name: str) -> h5py.File:
            return open_for_reading(sibling(path, name), storage_options, **options)

        register_opener(f, open_shard)
    return f


def open_for_writing(path: str, mode: str) -> h5py.File:
    """``h5py.File(path, mode)`` for a writer: a refusal says who holds the file; a file that
    points out of itself is refused (:mod:`pipeline.format.trust`)."""
    register_plugin_filters()  # the bank's features may use hdf5plugin's filters
    try:
        f = h5py.File(path, mode, locking="best-effort")
    except OSError as error:
        if is_locked(error):
            raise WriterError(
                f"cannot open {path} for writing: it is open elsewhere ({error}). Close every "
                "handle on it (another build, a program, or a bank this process opened: the bank "
                "create() returned counts; Dask workers that read it keep it open until "
                "client.run(pipeline.release, path)) and retry; nothing was changed"
            ) from None
        raise WriterError(f"cannot open {path} as an HDF5 file for writing: {error}") from None
    return f if mode == "w-" else checked(f, path, allow_external=False, sizes=False)


def fsync_file(f: h5py.File) -> None:
    """``fsync`` ``f`` when its HDF5 driver has a file descriptor."""
    try:
        handle = f.id.get_vfd_handle()
    except Exception:
        return
    if isinstance(handle, int):
        os.fsync(handle)
