"""What HDF5's errors mean: a lock, a damaged file, a full disk."""

from __future__ import annotations

import errno
import re


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` is a write refused for space (HDF5 reports the errno in its text)."""
    text = str(error)
    return any(
        marker in text
        for marker in ("errno = 28", "errno = 27", "errno = 122", "No space left", "File too large",
                       "Disk quota exceeded")
    ) or getattr(error, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # fmt: skip


# Why HDF5 refused a file that is open elsewhere (lock_refusal).
READ_ONLY_HERE = "open read-only in this process"  # HDF5 refuses a writer beside it
OPEN_HERE = "open in this process"
LOCKED = "locked by another process"  # HDF5's file lock


def lock_refusal(error: BaseException) -> str | None:
    """Why HDF5 refused to open a file because it is open elsewhere (:data:`READ_ONLY_HERE`,
    :data:`OPEN_HERE`, :data:`LOCKED`), or ``None`` when that is not why: the one place
    that reads HDF5's words for it."""
    text = str(error)
    if "already open for read-only" in text:
        return READ_ONLY_HERE
    if "already open" in text:
        return OPEN_HERE
    if re.search(r"\block", text):  # "unable to lock file", "file locking": not "superblock"
        return LOCKED
    return None


def is_locked(error: BaseException) -> bool:
    """Whether HDF5 refused a file because it is open elsewhere (see :func:`lock_refusal`)."""
    return lock_refusal(error) is not None


# What HDF5 says of a file that is not (or no longer) an HDF5 file it can read.
BROKEN = ("signature not found", "truncated file", "superblock", "bad object header", "bad heap",
           "bad symbol table", "bad B-tree", "not an HDF5 file", "addr overflow",
           "not aligned", "global heap", "len not positive", "doesn't exist",
           "past end of allocation", "bad local heap", "free list", "link count",
           "delete link", "header version", "bad byte number")  # fmt: skip


def is_broken(error: BaseException) -> bool:
    """Whether HDF5 says a file's structure is damaged (not a lock, I/O or permission)."""
    return not (isinstance(error, OSError) and is_locked(error)) and any(
        word in str(error) for word in BROKEN
    )
