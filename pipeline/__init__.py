"""h5bank: many small raw files into one HDF5 bank, built with Dask, read back fast.

The public API: :class:`TypedFile` (a bank type is a subclass of it) and
:class:`Group`; the features (``Image``, ``Sound``, ``Array``, ``DirLabels``,
``String``, ``Bytes`` and the ``Feature`` base class) live in the ``features``
package and are re-exported here, so code written for h5mapper runs with one
import changed (``import pipeline as h5m``); serving to PyTorch with
:class:`Input` / :class:`Target` batch specs is in :mod:`pipeline.serve`;
:func:`local_cluster` keeps the embedded Dask cluster open for several calls.
"""

from features import Array, Bytes, DirLabels, Feature, Image, Sound, String
from pipeline import config
from pipeline.bank.proxies import FeatureProxy, GroupProxy, RefsView
from pipeline.bank.typedfile import TypedFile
from pipeline.build.summary import BuildSummary
from pipeline.errors import (
    BankBusyError,
    BankChangedError,
    BuildInProgressError,
    ConfigError,
    DamagedBankError,
    DiskFullError,
    DuplicateIdError,
    FeatureTypeError,
    FormatVersionError,
    H5BankError,
    NoDataError,
    NotABankError,
    ReadOnlyError,
    SchedulerError,
    SchemaError,
    ShardedWriteError,
    SourceError,
    UnknownIdError,
    UnsafeBankError,
    WorkerDiedError,
    WriterError,
)
from pipeline.files.cache import release
from pipeline.schema import Group
from pipeline.serve import (
    AsSlice,
    BankDataset,
    BlockShuffle,
    GetId,
    GetIndex,
    Getter,
    Input,
    Target,
    serve,
)
from pipeline.version import __version__

__all__ = [
    "Array",
    "AsSlice",
    "BankBusyError",
    "BankChangedError",
    "BankDataset",
    "BlockShuffle",
    "BuildInProgressError",
    "BuildSummary",
    "Bytes",
    "ConfigError",
    "DamagedBankError",
    "DirLabels",
    "DiskFullError",
    "DuplicateIdError",
    "Feature",
    "FeatureProxy",
    "FeatureTypeError",
    "FormatVersionError",
    "GetId",
    "GetIndex",
    "Getter",
    "Group",
    "GroupProxy",
    "H5BankError",
    "Image",
    "Input",
    "NoDataError",
    "NotABankError",
    "ReadOnlyError",
    "RefsView",
    "SchedulerError",
    "SchemaError",
    "ShardedWriteError",
    "Sound",
    "SourceError",
    "String",
    "Target",
    "TypedFile",
    "UnknownIdError",
    "UnsafeBankError",
    "WorkerDiedError",
    "WriterError",
    "__version__",
    "config",
    "local_cluster",
    "release",
    "serve",
]


def __getattr__(name: str) -> object:
    # local_cluster lives with the schedulers (pipeline.run.local), imported on first use:
    # importing pipeline stays cheap (no tqdm, no graph code).
    if name == "local_cluster":
        from pipeline.run.local import local_cluster

        return local_cluster
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
