"""The partial-file policy, in one place: what is on disk for a bank path, and what a build,
a reader or the command line does with it.

A build writes ``path + ".partial"`` and renames it onto ``path`` when it
finishes, so ``path`` never holds a half-built bank. :meth:`BankFiles.at`
looks at a path once; the build's writer asks it how to start
(:meth:`BankFiles.start`: resume the partial file, append to the bank, or
write a new one, setting aside a partial file that cannot be resumed), the
command line asks whether it may replace what is there
(:meth:`BankFiles.refuse_to_replace`), and readers ask whether only a build
is there (:attr:`BankFiles.only_building`).
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass, field

import h5py

from pipeline.errors import WriterError
from pipeline.format import layout
from pipeline.format.hdf5_errors import is_broken, is_locked

PARTIAL_SUFFIX = ".partial"

# How a build starts (BankFiles.start).
RESUME, APPEND, NEW = "resume", "append", "new"


def partial_path(path: str | os.PathLike[str]) -> str:
    """Where a build writes until it finishes; renamed onto ``path`` at the end."""
    return os.fspath(path) + PARTIAL_SUFFIX


def shard_stem(path: str) -> str:
    """``/data/photos.h5`` -> ``/data/photos.shard-``: what every shard file name of the
    bank at ``path`` starts with."""
    root, ext = os.path.splitext(path)
    return f"{root if ext else path}.shard-"


def shard_path(path: str, tag: str, k: int) -> str:
    """The path of shard ``k`` of a set of shards tagged ``tag`` (one set per build)."""
    return f"{shard_stem(path)}{tag}-{k:05d}.h5"


def shard_files(path: str) -> list[str]:
    """Every shard file beside ``path``, complete or partial, in name order."""
    stem = glob.escape(shard_stem(path))
    found = glob.glob(f"{stem}*.h5") + glob.glob(f"{stem}*.h5{PARTIAL_SUFFIX}")
    return sorted(found)


def complete_path(shard: str) -> str:
    """A shard file's path once its build finished (without ``.partial``)."""
    return shard[: -len(PARTIAL_SUFFIX)] if shard.endswith(PARTIAL_SUFFIX) else shard


def listed_shards(path: str) -> list[str]:
    """The shard files the bank at ``path`` lists (full paths); none for a single file."""
    if not os.path.exists(path):
        return []
    try:
        with h5py.File(path, "r") as f:
            names = layout.shard_names(f)
    except OSError:
        return []
    folder = os.path.dirname(os.path.abspath(path))
    return [os.path.join(folder, name) for name in names]


@dataclass
class BankFiles:
    """What is on disk for the bank ``path``: the bank, and a build's partial file."""

    path: str
    partial: str
    bank: bool
    building: bool  # the partial file exists: a build runs, or one stopped
    # Shard files beside the path that its bank does not list: a sharded build runs, or
    # one stopped (pipeline.format.shards).
    stopped_shards: list[str] = field(default_factory=list)

    @classmethod
    def at(cls, path: str | os.PathLike[str]) -> BankFiles:
        path = os.fspath(path)
        partial = partial_path(path)
        bank = os.path.exists(path)
        shards = shard_files(path)
        if shards and bank:
            listed = set(listed_shards(path))
            shards = [s for s in shards if complete_path(s) not in listed]
        return cls(path, partial, bank, os.path.exists(partial), shards)

    @property
    def only_building(self) -> bool:
        """Only a build's files are there (the partial file, or shards no bank lists): the
        bank is being built, or its build stopped."""
        return (self.building or bool(self.stopped_shards)) and not self.bank

    def start(self, mode: str, notes: list[str]) -> str:
        """How a build in ``mode`` starts here: :data:`RESUME` (the partial file),
        :data:`APPEND` (to the bank) or :data:`NEW`.

        With ``mode="a"``, a partial file that cannot be resumed is set aside
        first (:func:`unusable_partial`, its note added to ``notes``), and a
        partial file beside a bank is refused (resuming it would replace the
        bank). A new build removes a stale partial file (:func:`remove_stale_partial`).
        """
        if mode == "a" and self.building:
            unusable = unusable_partial(self.partial)
            if unusable:
                notes.append(unusable)
                self.building = False
        if mode == "a" and self.building and self.bank:
            raise WriterError(
                f"both {self.path} and {self.partial} exist: the partial file is a build that "
                f"stopped, and resuming it would replace the bank. Delete {self.partial} to "
                "append to the bank, or move the bank away to resume the stopped build"
            )
        if mode == "a" and self.building:
            return RESUME
        if mode == "a" and self.bank:
            return APPEND
        if os.path.exists(self.partial):
            remove_stale_partial(self.partial)
        self.building = False
        return NEW

    @property
    def in_progress(self) -> str:
        """The files of the build there (or that stopped), for a message."""
        if self.stopped_shards:
            more = len(self.stopped_shards) - 1
            return self.stopped_shards[0] + (f" and {more} more shard files" if more else "")
        return self.partial

    def refuse_to_replace(self, resume: bool, overwrite: bool) -> None:
        """Refuse (``FileExistsError``) to replace the bank or a stopped build unless told to:
        the command line's ``--resume`` / ``--overwrite``."""
        if self.bank and self.building and not overwrite:
            raise FileExistsError(
                f"both {self.path} and {self.partial} (a build that stopped) exist: delete the "
                "partial file to keep the bank (--resume then adds what it lacks), move the bank "
                "away to resume the stopped build, or --overwrite to build again"
            )
        if not (resume or overwrite):
            if self.stopped_shards:
                raise FileExistsError(
                    f"{self.stopped_shards[0]} (and {len(self.stopped_shards) - 1} more shard "
                    "files) hold a sharded build that stopped: --resume continues it, "
                    "--overwrite starts again"
                )
            if self.building:
                raise FileExistsError(
                    f"{self.partial} holds a build that stopped: --resume continues it, "
                    "--overwrite starts again"
                )
            if self.bank:
                raise FileExistsError(
                    f"{self.path} exists: --resume adds the sources it lacks, --overwrite builds "
                    "it again"
                )


def set_aside(partial: str) -> str:
    """Rename a partial file HDF5 cannot read to ``PARTIAL.unreadable-<time>`` (kept, never
    deleted); return its new path."""
    aside = f"{partial}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}"
    os.replace(partial, aside)
    return aside


def unusable_partial(partial: str) -> str | None:
    """Why a stopped build's partial file cannot be resumed (it was set aside), or ``None``.

    A build killed while it created the file leaves one that is no bank yet
    (nothing was committed): it is deleted. A file HDF5 cannot read as HDF5
    (cut short, overwritten) is set aside (:func:`set_aside`) and the build
    starts again. Any other error opening it (too many open files, I/O,
    permissions) raises: nothing is touched.
    """
    try:
        with h5py.File(partial, "r", locking="best-effort") as f:
            if layout.is_bank(f):
                return None
    except OSError as error:
        if is_locked(error):
            return None  # a live writer: opening it for writing says so
        if not is_broken(error):
            raise WriterError(
                f"cannot open {partial} to resume the build it holds ({error}); nothing was "
                "changed: fix that and resume again"
            ) from None
        aside = set_aside(partial)
        return f"{partial} is not an HDF5 file HDF5 can read ({error}): moved to {aside}, building again"
    os.remove(partial)
    return f"{partial} was not a bank yet (its build stopped while creating it): removed"


def remove_stale_partial(partial: str) -> None:
    """Delete a stopped build's partial file, unless a live writer holds it."""
    try:
        with h5py.File(partial, "r+"):
            pass
    except OSError as error:
        if is_locked(error):
            raise WriterError(
                f"{partial} is being written by another build; wait for it or stop it first"
            ) from None
    os.remove(partial)
