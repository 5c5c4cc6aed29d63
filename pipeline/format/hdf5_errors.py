"""What HDF5's errors mean: a lock, a damaged file, a full disk."""

from __future__ import annotations

import errno


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` is a write refused for space (HDF5 reports the errno in its text)."""
    text = str(error)
    return any(
        marker in text
        for marker in ("errno = 28", "errno = 27", "errno = 122", "No space left", "File too large",
                       "Disk quota exceeded")
    ) or getattr(error, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # fmt: skip


def is_locked(error: OSError) -> bool:
    text = str(error)
    return "unable to lock file" in text or "already open" in text


# What HDF5 says of a file that is not (or no longer) an HDF5 file it can read.
BROKEN = ("signature not found", "truncated file", "superblock", "bad object header", "bad heap",
           "bad symbol table", "bad B-tree", "not an HDF5 file", "addr overflow",
           "not aligned", "global heap", "len not positive", "doesn't exist",
           "past end of allocation", "bad local heap", "free list", "link count",
           "delete link", "header version")  # fmt: skip


def is_broken(error: BaseException) -> bool:
    """Whether HDF5 says a file's structure is damaged (not a lock, I/O or permission)."""
    return not (isinstance(error, OSError) and is_locked(error)) and any(
        word in str(error) for word in BROKEN
    )
