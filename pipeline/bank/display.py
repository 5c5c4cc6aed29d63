"""How a bank prints: the header of ``bank.tree()`` and one line per group, feature or dataset.

Every line is safe to print on a terminal: names, label names, parameters
and paths come from the bank, which someone else may have written, so their
control characters are shown escaped (:func:`pipeline.terminal.printable`).
"""

from __future__ import annotations

import h5py
import numpy as np

from features.base import Feature
from pipeline.build.summary import human_bytes
from pipeline.format import layout
from pipeline.format.filters import compression_of
from pipeline.terminal import printable


def bank_header(f: h5py.File, type_name: str, shown: str, sources: int, size: int) -> str:
    """``<Type 'path': n sources, k failed, size, format vN>`` (or ``plain HDF5``)."""
    if not layout.is_bank(f):
        return printable(f"<{type_name} {shown!r}: plain HDF5, {human_bytes(size)}>")
    failed = len(f[f"{layout.FAILURES}/id"]) if layout.FAILURES in f else 0
    return printable(
        f"<{type_name} {shown!r}: {sources} sources, {failed} failed, "
        f"{human_bytes(size)}, format v{int(f.attrs[layout.ATTR_VERSION])}>"
    )


def group_line(name: str) -> str:
    """A group of the tree: ``name/``."""
    return printable(f"{name}/")


def feature_line(name: str, feature: Feature, column: layout.Column | None, storage: str) -> str:
    """A feature column: class, storage, dtype, shape, compression, bytes, sources, parameters."""
    label = type(feature).__name__
    if column is None:
        return printable(f"{name:<14} {label:<10} {storage:<8} (no data)")
    refs = column.refs[: layout.committed(column.group.file)]  # rows past them are not read
    with_data = int((refs[:, 0] >= 0).sum()) if len(refs) else 0
    params = {k: v for k, v in column.group.attrs.items() if not k.startswith("h5bank_")}
    if "names" in params:
        names = [str(n) for n in np.atleast_1d(params["names"])]
        params["names"] = ",".join(names[:8]) + (",..." if len(names) > 8 else "")
    shown = " ".join(f"{k}={v}" for k, v in params.items() if v is not None and k != "decoder")
    return printable(
        f"{name:<14} {label:<10} {column.storage:<8} {column.data.dtype!s:<8} "
        f"{column.data.shape!s:<20} {compression_of(column.data):<10} "
        f"{human_bytes(layout.storage_bytes(column.group)):>9}  {with_data} "
        f"source{'s' * (with_data != 1)}  {shown}"
    ).rstrip()


def dataset_line(name: str, dataset: h5py.Dataset) -> str:
    """A plain HDF5 dataset: dtype, shape, compression, bytes."""
    return printable(
        f"{name:<14} {'dataset':<10} {'':<8} {dataset.dtype!s:<8} {dataset.shape!s:<20} "
        f"{compression_of(dataset):<10} {human_bytes(layout.storage_bytes(dataset)):>9}"
    )
