"""The exceptions h5bank raises, all subclasses of :class:`H5BankError`.

| exception | raised when |
| --- | --- |
| ``SchemaError`` | a bank type has no features, a derived feature names no feature, or an append's schema does not match the bank's |
| ``FeatureTypeError`` | a feature's ``load`` returned something other than an array, a dict of arrays, or ``None`` |
| ``DuplicateIdError`` | the same id appears twice in a source list known up front (found before writing) |
| ``SourceError`` | a source failed with ``on_error="raise"``: names the source, the feature and why |
| ``UnknownIdError`` | an id is not in the bank (also a ``KeyError``) |
| ``ReadOnlyError`` | a write to a bank opened with ``mode="r"`` |
| ``ShardedWriteError`` | an assignment by slice or ref into a sharded bank's data (``bank.images[3:5] = ...``); ``add`` and ``set`` by id work |
| ``NotABankError`` | a bank type opened a file h5bank did not write |
| ``FormatVersionError`` | a bank written by a newer h5bank (unknown format version) |
| ``BuildInProgressError`` | opening a path whose build has not finished |
| ``BankBusyError`` | opening a bank another process has open for writing (or, for writing, one others read) |
| ``BankChangedError`` | a Dask graph made from a bank runs after the bank was rebuilt, or its rows rewritten |
| ``WriterError`` | the single-writer chain could not go on (its process changed or died) |
| ``WriterLostError`` | the worker of a writer chain left the cluster (a sharded build resumes that shard on another worker by itself) |
| ``PartialSetAsideError`` | a stopped build's partial file HDF5 could not resume was set aside after the build was planned without its sources (``create`` plans again by itself) |
| ``DiskFullError`` | a commit would not fit on the disk (or under ``ulimit -f``): nothing of it was written |
| ``SchedulerError`` | ``scheduler=`` names nothing h5bank can run a build on, or the embedded cluster cannot start |
| ``ConfigError`` | a build config is missing a setting or holds a wrong one |
| ``WorkerDiedError`` | worker processes kept dying on one task (memory, a decoder that crashes) |
| ``DecodeError`` | a source's bytes are not what its feature reads (recorded as a failure) |
| ``SourceReadError`` | a source's bytes could not be fetched (recorded as a failure) |
"""

from __future__ import annotations

from features.errors import DecodeError, H5BankError, SourceReadError

__all__ = [
    "BankBusyError",
    "BankChangedError",
    "BuildInProgressError",
    "ConfigError",
    "DamagedBankError",
    "DecodeError",
    "DiskFullError",
    "DuplicateIdError",
    "FeatureTypeError",
    "FormatVersionError",
    "H5BankError",
    "NoDataError",
    "NotABankError",
    "PartialSetAsideError",
    "ReadOnlyError",
    "SchedulerError",
    "SchemaError",
    "ShardedWriteError",
    "SourceError",
    "SourceReadError",
    "UnknownIdError",
    "UnsafeBankError",
    "WorkerDiedError",
    "WriterError",
    "WriterLostError",
]


class SchemaError(H5BankError, TypeError):
    """A bank type's features are unusable, or do not match the bank on disk."""


class FeatureTypeError(H5BankError, TypeError):
    """A feature's ``load`` returned a type the bank cannot store."""


class DuplicateIdError(H5BankError, ValueError):
    """Two sources of one build have the same id."""


class SourceError(H5BankError):
    """A source failed to load and the build was asked to stop (``on_error="raise"``).

    Attributes ``id``, ``feature`` and ``reason`` say which source, which
    feature (``""`` when no feature accepted the source) and why.
    """

    def __init__(self, id: str, feature: str, reason: str) -> None:
        super().__init__(id, feature, reason)
        self.id, self.feature, self.reason = id, feature, reason

    def __str__(self) -> str:
        where = f" (feature {self.feature})" if self.feature else ""
        return f"{self.id!r}{where}: {self.reason}"


class UnknownIdError(H5BankError, KeyError):
    """No source with this id is in the bank."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ReadOnlyError(H5BankError):
    """A write was attempted on a bank opened read-only."""


class ShardedWriteError(ReadOnlyError):
    """An assignment by slice or ref into a sharded bank's data (write by id instead)."""


class NotABankError(H5BankError):
    """The file is not an h5bank bank (no format attributes)."""


class FormatVersionError(H5BankError):
    """The bank's format version is newer than this h5bank knows."""


class NoDataError(H5BankError, ValueError):
    """A source has no data in a feature a reader needs it in (its refs row is empty)."""


class UnsafeBankError(H5BankError):
    """The file points out of itself (an external link, external storage, a virtual dataset
    over another file): refused unless the caller opts in with ``allow_external=True``."""


class DamagedBankError(H5BankError):
    """The file is damaged or crafted: it declares sizes it does not store, or HDF5 could
    not read it."""


class BuildInProgressError(H5BankError, FileNotFoundError):
    """The bank is being built (or its build stopped); only its partial file exists."""


class BankBusyError(H5BankError, OSError):
    """Another process has the bank open for writing (raised at once, not waited for); or, opening
    it for writing, other processes have it open."""


class BankChangedError(H5BankError, RuntimeError):
    """The bank no longer holds the rows a Dask graph (``to_dask``...) was made from.

    Raised when the file at the bank's path is another one (rebuilt, replaced),
    or a dataset the graph reads lost rows, changed shape or dtype, or had its
    label codes renumbered. Appends keep earlier rows, so graphs survive them.
    """


class WriterError(H5BankError, RuntimeError):
    """The single writer could not continue the build."""


class WriterLostError(WriterError):
    """The worker a writer chain was pinned to left the cluster during the build."""


class PartialSetAsideError(WriterError):
    """A stopped build's partial file could not be resumed and was set aside.

    The build had been planned to skip the sources that file committed, so it
    must be planned again; ``create`` (and ``h5bank build``) do that by
    themselves when the sources can be listed again.
    """


class DiskFullError(WriterError):
    """The bank's disk (or the writer's file-size limit) has no room for the next commit.

    The build stops at its last commit; free space and resume it.
    """


class SchedulerError(H5BankError, ValueError):
    """``scheduler=`` is not something a build can run on."""


class ConfigError(H5BankError, ValueError):
    """A build config (``h5bank build CONFIG``) is missing a setting or holds a wrong one."""


class WorkerDiedError(H5BankError, RuntimeError):
    """Worker processes kept dying on the same task (memory, or a crashing decoder)."""
