"""h5bank: many small raw files into one HDF5 bank, built with Dask, read back fast.

The public API: :class:`TypedFile` (a bank type is a subclass of it) and
:class:`Group`; features live in the ``features`` package; serving to PyTorch
with :class:`Input` / :class:`Target` batch specs is in :mod:`pipeline.serve`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("h5bank")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from pipeline import config
from pipeline.errors import (
    BankBusyError,
    BankChangedError,
    BuildInProgressError,
    ConfigError,
    DiskFullError,
    DuplicateIdError,
    FeatureTypeError,
    FormatVersionError,
    H5BankError,
    NotABankError,
    ReadOnlyError,
    SchedulerError,
    SchemaError,
    SourceError,
    UnknownIdError,
    WorkerDiedError,
    WriterError,
)
from pipeline.schema import Group
from pipeline.serve import AsSlice, BankDataset, GetId, GetIndex, Getter, Input, Target, serve
from pipeline.typedfile import FeatureProxy, GroupProxy, RefsView, TypedFile
from pipeline.writer import BuildSummary

__all__ = [
    "AsSlice",
    "BankBusyError",
    "BankChangedError",
    "BankDataset",
    "BuildInProgressError",
    "BuildSummary",
    "ConfigError",
    "DiskFullError",
    "DuplicateIdError",
    "FeatureProxy",
    "FeatureTypeError",
    "FormatVersionError",
    "GetId",
    "GetIndex",
    "Getter",
    "Group",
    "GroupProxy",
    "H5BankError",
    "Input",
    "NotABankError",
    "ReadOnlyError",
    "RefsView",
    "SchedulerError",
    "SchemaError",
    "SourceError",
    "Target",
    "TypedFile",
    "UnknownIdError",
    "WorkerDiedError",
    "WriterError",
    "__version__",
    "config",
    "serve",
]
