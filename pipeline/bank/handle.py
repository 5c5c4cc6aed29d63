"""One bank object's file handle: opened once per process, pickled as a recipe.

HDF5 handles must not cross a process boundary, so :class:`BankFile` keeps
the recipe (path, mode, h5py and fsspec options) and the handle it opened in
this process. A forked child (a ``DataLoader`` worker) that finds the
parent's handle opens the file again on first use; pickling sends the recipe
and the unpickled copy opens the file read-only for itself.

HDF5 also refuses to open a file for writing while this process holds a
read-only handle on it. So every handle of the process is registered
(``LIVE``): one opening a file for writing closes the others' handles on it,
and each of those reopens on its next use. ``generation`` counts the opens,
so caches built on a handle (:class:`~pipeline.bank.catalog.Catalog`) know
when to drop what they read.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Mapping
from typing import Any

import h5py

from pipeline import config
from pipeline.clients import default_client
from pipeline.errors import (
    BankBusyError,
    BuildInProgressError,
    NotABankError,
    ReadOnlyError,
)
from pipeline.files.cache import LazyFile, release
from pipeline.files.handles import (
    READ_OPTIONS,
    bank_identity,
    checked,
    close_file,
    open_for_reading,
    track,
)
from pipeline.files.remote import remote_identity
from pipeline.format import layout
from pipeline.format.filters import register_plugin_filters
from pipeline.format.hdf5_errors import LOCKED, READ_ONLY_HERE, lock_refusal
from pipeline.format.partial import BankFiles, listed_shards
from pipeline.urls import is_url, redact
from pipeline.version import __version__

# This process's id, kept current in forked children: os.getpid() is a system call, and a
# read looks its bank's file up several times (about a tenth of a get(id) of a small image).
_PROCESS = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PROCESS.__setitem__(0, os.getpid()))

# Every handle of this process, so one opening a file for writing can close the read-only
# handles the others hold on it (HDF5 refuses a writer while they are open).
LIVE: weakref.WeakSet[BankFile] = weakref.WeakSet()

# What HDF5 says when it refuses to open a file for writing, and what the user must do once
# h5bank has closed its own read handles (BankFile.release_readers) and it still refuses.
WRITE_REFUSALS = {
    READ_ONLY_HERE: "this process has it open read-only outside h5bank (an "
    "h5py.File, or a Dask array computing on threads); close that first",
    LOCKED: "another process has it open. Dask workers that computed arrays of it keep it open "
    "until client.run(pipeline.release, path); other programs must close it",
}


class BankFile:
    """The file of one bank object, in this process.

    Parameters
    ----------
    path
        A local path or an fsspec URL (read-only).
    mode
        ``"r"``, ``"r+"`` or ``"a"`` (``"a"`` creates an empty bank, with
        ``new_bank``, when the file is missing).
    storage_options, options
        fsspec options for a URL; ``h5py.File`` options.
    owner
        The bank type's name, for messages.
    any_hdf5
        Whether a plain HDF5 file (no bank) may be opened (``TypedFile``
        itself), or only banks (a bank type).
    """

    def __init__(
        self,
        path: str,
        mode: str,
        storage_options: Mapping[str, Any] | None,
        options: Mapping[str, Any],
        *,
        owner: str,
        any_hdf5: bool,
    ) -> None:
        self.path = path
        self.mode = mode
        self.remote = is_url(path)
        self.storage_options = config.storage_options(storage_options)
        self.options = {**READ_OPTIONS, **options}
        self.owner = owner
        self.any_hdf5 = any_hdf5
        self.writable = mode != "r"  # create()'s bank turns writable on demand
        self.evicted = False  # another handle of this process took the file for writing
        self.generation = 0
        self._file: h5py.File | None = None
        self._pid = os.getpid()

    @property
    def shown(self) -> str:
        """The path as messages show it: a URL without its credentials."""
        return redact(self.path)

    def open(self, schema: dict[str, Any] | None = None) -> None:
        """Open the file for this object; mode ``"a"`` creates a missing bank, with ``schema``
        (the bank type's feature records)."""
        if self.remote and self.mode != "r":
            raise ReadOnlyError(
                f"{self.shown} is a remote bank: it opens read-only. Build or change it "
                "locally (create() to a URL builds locally and uploads it when complete)"
            )
        files = None if self.remote else BankFiles.at(self.path)
        if files is not None and files.only_building:
            raise BuildInProgressError(
                f"{self.shown} is being built, or its build stopped: only "
                f"{files.in_progress} exists. Wait for the build, or resume it "
                "with create(..., mode='a')"
            )
        new = self.mode == "a" and not self.remote and not os.path.exists(self.path)
        self._set(self._open())
        try:
            if new:
                provenance = {"library": f"h5bank {__version__}", "builds": []}
                layout.init_bank(self._file, schema or {}, provenance)
                layout.set_state(self._file, layout.COMPLETE)
            self.check()
        except BaseException:
            close_file(self._file)
            raise

    @property
    def file(self) -> h5py.File:
        """The open file, reopened first if this object crossed into another process.

        A forked child (a ``DataLoader`` worker, a multiprocessing pool) gets a
        copy of this object with the parent's HDF5 handle in it; HDF5 handles
        must not be shared across processes, so the child opens the file again
        on its first read (read-only banks only: a writable one refuses).
        """
        if self._pid != _PROCESS[0]:
            self._adopt()
        elif self.evicted:  # closed for another object of this process that writes the file
            self.evicted = False
            self.reopen()
        return self._file

    @property
    def is_open(self) -> bool:
        return bool(self._file) or self.evicted

    def _set(self, f: h5py.File) -> None:
        self._file, self._pid = f, os.getpid()
        self.generation += 1
        track(f)  # a forked child gets its own descriptor (pipeline.files.handles.track)
        LIVE.add(self)

    def _adopt(self) -> None:
        if self.mode != "r":
            raise BankBusyError(
                f"{self.shown} is open with mode {self.mode!r} in process {self._pid}; another "
                f"process ({os.getpid()}) cannot use that handle. Open the bank read-only "
                "(mode='r') in the process that shares it"
            )
        with contextlib.suppress(Exception):
            close_file(self._file)  # this process's copy of the parent's handle only
        self._set(self._open())
        self.check()

    def check(self) -> None:
        """Refuse a bank whose build has not finished, a newer format, or (for a bank type)
        a plain HDF5 file."""
        f = self._file
        if layout.is_bank(f):
            layout.check_format(f)
            if layout.state(f) != layout.COMPLETE:
                raise BuildInProgressError(
                    f"{self.shown} is a bank whose build has not finished; resume the build "
                    "with create(..., mode='a') on its final path"
                )
        elif not self.any_hdf5:
            raise NotABankError(
                f"{self.shown} is not an h5bank bank, so it cannot open as {self.owner}; "
                "pipeline.TypedFile(path) opens any HDF5 file"
            )

    def reopen(self) -> None:
        """Open the file again in this object's mode (after ``map`` closed it), if it is there."""
        if not self.remote and not os.path.exists(self.path):
            return
        self._set(self._open())
        self.check()

    def require_writable(self) -> None:
        """Raise unless writes are allowed; the bank ``create`` returned reopens with ``"r+"``."""
        if self.mode != "r":
            return
        if not self.writable or self.remote:
            raise ReadOnlyError(
                f"{self.shown} is open read-only; open it with mode='r+' or 'a' to write"
            )
        # The bank create() returned: reopen it for writing, as h5mapper's create gives "r+".
        close_file(self._file)
        self.mode = "r+"
        try:
            self.reopen()
        except BaseException:
            self.mode = "r"
            self.reopen()
            raise

    def _open(self) -> h5py.File:
        if self.remote:
            options = {k: v for k, v in self.options.items() if k != "locking"}
            return open_for_reading(self.path, self.storage_options, **options)
        if self.mode == "r":
            return open_for_reading(self.path, **self.options)
        release(self.path)  # this process's cached read handles would refuse a writer
        register_plugin_filters()
        tried: set[str] = set()
        options = dict(self.options)
        allow_external = bool(options.pop("allow_external", False))
        while True:
            try:
                f = checked(h5py.File(self.path, self.mode, **options), self.path, allow_external)
                if layout.shard_names(f):
                    # A sharded bank takes writes in its shards (pipeline.bank.writes): the index
                    # is only read, and written again whole after each write.
                    close_file(f)
                    return open_for_reading(self.path, allow_external=allow_external, **options)
                return f
            except OSError as error:
                refusal = lock_refusal(error)
                if refusal not in WRITE_REFUSALS:
                    raise
                if refusal in tried:
                    raise BankBusyError(
                        f"cannot open {self.shown} with mode {self.mode!r}: "
                        + WRITE_REFUSALS[refusal]
                    ) from None
                tried.add(refusal)
                self.release_readers(refusal)

    def release_readers(self, refusal: str) -> None:
        """Close the read handles h5bank holds on the file that made HDF5 refuse a writer.

        :data:`~pipeline.format.hdf5_errors.READ_ONLY_HERE`: other bank objects of this process
        read it (``exp = Bank.create(...)``, then ``Bank(path, mode="r+")``);
        their handles are closed and each reopens on its next use (then
        sharing the writable handle, as HDF5 does within a process).
        :data:`~pipeline.format.hdf5_errors.LOCKED`: other processes read it, maybe the workers of the default
        Dask client, whose cached handles h5bank can close. Anyone else has
        to close theirs.
        """
        if refusal == READ_ONLY_HERE:
            evict_others(self)
            return
        client = default_client()
        if client is not None:
            client.run(release, self.path)

    def lazy_file(self) -> LazyFile:
        """The picklable recipe Dask tasks open this bank with (see :class:`LazyFile`)."""
        trust = {"allow_external": True} if self.options.get("allow_external") else {}
        if self.remote:
            return LazyFile(
                self.path,
                bank_identity(self.file),
                remote_identity(self.path, self.storage_options),
                self.storage_options,
                **trust,
            )
        return LazyFile.of(self.file, **trust)

    def size(self) -> int:
        """The file's size in bytes (with its shard files, for a sharded bank)."""
        if self.remote:
            return int(remote_identity(self.path, self.storage_options)[0] or 0)
        return sum(os.path.getsize(p) for p in [self.path, *listed_shards(self.path)])

    def close(self) -> None:
        """Close the file, and this process's cached Dask read handles on it.

        Closing a file open for writing also closes the handles other objects
        of this process opened on it meanwhile (HDF5 made them share this
        writable one): each reopens read-only on its next use, so the file is
        left unlocked for other processes.
        """
        writable = self.mode != "r" and bool(self._file)
        if self._pid == os.getpid() and self._file:  # a copy of a parent's handle is not ours
            close_file(self._file)
        release(self.path)
        if writable and not self.remote:
            evict_others(self)

    def __getstate__(self) -> dict[str, Any]:
        """The recipe: only read-only files can be opened by another process."""
        if self.mode != "r":
            raise TypeError(
                f"{self.shown} is open with mode {self.mode!r}: only read-only banks can be "
                "sent to other processes; open it with mode='r'"
            )
        keep = ("path", "remote", "storage_options", "options", "owner", "any_hdf5")
        return {name: getattr(self, name) for name in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.mode, self.writable, self.evicted, self.generation = "r", False, False, 0
        self._set(self._open())
        self.check()


def evict_others(handle: BankFile) -> None:
    """Close the handles other objects of this process hold on ``handle``'s file; each
    reopens on its next use (:attr:`BankFile.file`)."""
    identity = file_identity(handle.path)
    if identity is None:
        return
    for other in list(LIVE):
        if (
            other is not handle
            and other._file
            and other._pid == os.getpid()
            and not other.remote
            and file_identity(other.path) == identity
        ):
            close_file(other._file)
            other.evicted = True


def file_identity(path: str) -> tuple[int, int] | None:
    """The file at ``path`` (device, inode), ``None`` if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
