"""The partial-file policy: where a build writes until it finishes, and what a stopped
build's file becomes.
"""

from __future__ import annotations

import os
import time

import h5py

from pipeline.errors import (
    WriterError,
)
from pipeline.format import layout
from pipeline.format.hdf5_errors import is_broken, is_locked

PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | os.PathLike[str]) -> str:
    """Where a build writes until it finishes; renamed onto ``path`` at the end."""
    return os.fspath(path) + PARTIAL_SUFFIX


def unusable_partial(partial: str) -> str | None:
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
        if is_locked(error):
            return None  # a live writer: opening it for writing says so
        if not is_broken(error):
            raise WriterError(
                f"cannot open {partial} to resume the build it holds ({error}); nothing was "
                "changed: fix that and resume again"
            ) from None
        aside = f"{partial}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}"
        os.replace(partial, aside)
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
