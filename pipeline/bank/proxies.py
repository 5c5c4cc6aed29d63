"""The proxies of an open bank: groups, feature columns, refs and plain datasets.

``bank.images`` is a :class:`FeatureProxy` and ``bank.data`` a
:class:`GroupProxy`; they read through the bank object's
:class:`~pipeline.bank.catalog.Catalog` (what was read from the file) and
write through its :class:`~pipeline.bank.writes.Writes`, the two
:class:`BankParts` every proxy of a bank shares.
"""

from __future__ import annotations

import io
import posixpath
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from features.base import Feature
from pipeline.bank.catalog import Catalog
from pipeline.bank.display import dataset_line, feature_line, group_line
from pipeline.bank.writes import Writes
from pipeline.errors import DamagedBankError
from pipeline.format import layout
from pipeline.format.rows import absolute_rows, read_span, read_spans, take_rows
from pipeline.format.storage import kind
from pipeline.read.arrays import dask_array
from pipeline.read.records import columns_for, rows_per_partition, source_bag


@dataclass(frozen=True)
class BankParts:
    """What the proxies of one bank object share: what it read, and how it writes."""

    catalog: Catalog
    writes: Writes


def node_at(bank: Any, parts: BankParts, path: str) -> Any:
    """The proxy for ``path`` of ``bank`` (``""``: its root group)."""
    catalog = parts.catalog
    if path in catalog.features and catalog.column(path) is not None:  # no more file lookups
        return FeatureProxy(bank, parts, path)
    node = catalog.node(path)
    features = catalog.features
    if path in features:
        if isinstance(node, h5py.Group) and not layout.is_column(node) and len(node):
            return GroupProxy(bank, parts, path, features[path])  # a dict-valued feature
        return FeatureProxy(bank, parts, path)
    if layout.is_column(node):
        return FeatureProxy(bank, parts, path)
    if path in catalog.schema.groups() or isinstance(node, h5py.Group):
        return GroupProxy(bank, parts, path)
    if isinstance(node, h5py.Dataset):
        return DatasetProxy(bank, parts, path)
    raise AttributeError(f"{catalog.handle.shown} has no feature or group {path!r}")


def _row_list(item: Any) -> bool:
    """Whether ``item`` is a 1-D list or array of row numbers (not a mask, not a tuple)."""
    if isinstance(item, list):  # not bools: [True, False] is a mask
        return bool(item) and all(
            isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_)) for i in item
        )
    return isinstance(item, np.ndarray) and item.ndim == 1 and item.dtype.kind in "iu" and len(item)


class _Proxy:
    def __init__(self, bank: Any, parts: BankParts, path: str) -> None:
        self.bank = bank  # the bank object (a TypedFile) this proxy belongs to
        self.parts = parts
        self.path = path

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)


class GroupProxy(_Proxy):
    """A group of a bank: ``group[id]`` / ``group.get(id)`` give its features' data for a source.

    Children are attributes (``group.images``). A feature whose ``load``
    returns a dict also reads as a group, one child per key, and its methods
    stay reachable through it.
    """

    def __init__(
        self, bank: Any, parts: BankParts, path: str, feature: Feature | None = None
    ) -> None:
        super().__init__(bank, parts, path)
        self._feature = feature

    def children(self) -> list[str]:
        """Names of the features and groups directly below this group."""
        names: dict[str, None] = {}
        depth = self.path.count("/") + 1 if self.path else 0
        for path in [*self.parts.catalog.features, *sorted(self.parts.catalog.schema.groups())]:
            parts = path.split("/")
            inside = not self.path or path.startswith(self.path + "/")
            if inside and len(parts) > depth and parts[depth]:  # "a//b" (damaged) names none
                names[parts[depth]] = None
        names.update(dict.fromkeys(self.parts.catalog.members(self.path)))
        return list(names)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self.children():
            return node_at(self.bank, self.parts, posixpath.join(self.path, name))
        if self._feature is not None:
            return getattr(self._feature, name)
        raise AttributeError(
            f"group {self.path or '/'!r} of {self.parts.catalog.handle.shown} has no member {name!r}"
        )

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self.children()))

    def get(self, id_: str) -> dict[str, Any]:
        """``{child: data}`` for source ``id_``, nested; children without data are left out."""
        row = self.parts.catalog.row(id_)
        return self._get_row(row, id_)

    def _get_row(self, row: int, id_: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.children():
            child = node_at(self.bank, self.parts, posixpath.join(self.path, name))
            if isinstance(child, DatasetProxy):
                continue
            value = child._get_row(row, id_)
            if value is not None and not (isinstance(value, dict) and not value):
                out[name] = value
        return out

    def __getitem__(self, id_: str) -> dict[str, Any]:
        return self.get(id_)

    def to_dask(self, chunks: Any = None) -> dict[str, Any]:
        """``{path below this group: dask array}`` for every feature column (and plain dataset)."""
        out: dict[str, Any] = {}
        for name in self.children():
            child = node_at(self.bank, self.parts, posixpath.join(self.path, name))
            if isinstance(child, GroupProxy):
                out.update({f"{name}/{k}": v for k, v in child.to_dask(chunks).items()})
            elif child.shape is not None:
                out[name] = child.to_dask(chunks)
                if (
                    isinstance(child, FeatureProxy)
                    and kind(child.storage).one_row_per_source
                    and child.shape[0] != self.parts.catalog.count()
                ):
                    warnings.warn(
                        f"{child.path!r} has data for {child.shape[0]} of the bank's "
                        f"{self.parts.catalog.count()} sources, so its rows are not the bank's sources "
                        "and do not line up with other features' (use to_dask_sources())",
                        stacklevel=2,
                    )
        return out

    def add(self, id_: str, data: Mapping[str, Any]) -> None:
        """Add ``data`` (``{child: value}``) for ``id_``; see :meth:`TypedFile.add`."""
        self.parts.writes.write(id_, data, replace=False, prefix=self.path)

    def set(self, id_: str, data: Mapping[str, Any]) -> None:
        """Write ``data`` for ``id_``, replacing what is there; see :meth:`TypedFile.set`."""
        self.parts.writes.write(id_, data, replace=True, prefix=self.path)

    def print_tree(self, out: Any, indent: str) -> None:
        for name in self.children():
            child = node_at(self.bank, self.parts, posixpath.join(self.path, name))
            if isinstance(child, GroupProxy):
                print(f"{indent}{group_line(name)}", file=out)
                child.print_tree(out, indent + "  ")
            else:
                print(f"{indent}{child._describe()}", file=out)

    def __repr__(self) -> str:
        out = io.StringIO()
        print(f"<group {self.path or '/'!r} of {self.parts.catalog.handle.shown!r}>", file=out)
        self.print_tree(out, "  ")
        return out.getvalue().rstrip("\n")


class FeatureProxy(_Proxy):
    """One feature column of a bank: the concatenated data, its refs, and the feature's methods.

    ``proxy[item]`` indexes the concatenation of every source's data like
    h5py does; ``proxy.refs[i]`` is a ``slice`` so ``proxy[proxy.refs[i]]``
    is source ``i``'s rows (reshaped, for features stored flattened);
    ``proxy.get(id)`` is source ``id``'s data as the feature returned it.
    """

    @property
    def feature(self) -> Feature:
        return self.parts.catalog.feature_of(self.path)

    @property
    def column(self) -> layout.Column | None:
        return self.parts.catalog.column(self.path)

    @property
    def dense(self) -> bool:
        """Whether source ``i``'s data is row ``i`` of the column for every source (one-row
        kinds, every source with data): batches then read rows without the refs."""
        return self.parts.catalog.is_dense(self.require_column())

    @property
    def dataset(self) -> h5py.Dataset:
        """The column's concatenated ``data`` (``IndexError`` if the feature has no data yet)."""
        return self.require_column().data

    def require_column(self) -> layout.Column:
        """The feature's column (``IndexError`` if it has no data yet)."""
        column = self.column
        if column is None:
            raise IndexError(
                f"feature {self.path!r} of {self.parts.catalog.handle.shown} has no data yet"
            )
        return column

    @property
    def storage(self) -> str:
        column = self.column
        return column.storage if column is not None else self.feature.storage

    @property
    def shape(self) -> tuple[int, ...] | None:
        column = self.column
        return None if column is None else column.data.shape

    @property
    def dtype(self) -> np.dtype | None:
        column = self.column
        return None if column is None else column.data.dtype

    @property
    def attrs(self) -> Any:
        """The attributes of the feature's group (its parameters: ``sr``, ``mode``, ``names``...)."""
        return self.require_column().group.attrs

    @property
    def names(self) -> list[str]:
        """Label names of a category feature: label ``i`` is ``names[i]``."""
        column = self.column
        return [] if column is None else layout.category_names(column)

    @property
    def refs(self) -> RefsView:
        return RefsView(self)

    def __len__(self) -> int:
        column = self.column
        return 0 if column is None else column.data.shape[0]

    def __getitem__(self, item: Any) -> Any:
        column = self.require_column()
        # A slice that is exactly a source's ref comes back in that source's shape.
        if column.kind.has_shape_table and isinstance(item, slice) and item.step in (None, 1):
            row = self._ref_row(column, item)
            if row is not None:
                return column.data[item].reshape(layout.stored_shape(column, row))
        if _row_list(item):  # proxy[[3, 70, 512]]: run by run, in any order (h5py: slow, sorted)
            return take_rows(column.data, item)
        return column.data[item]

    def _stacked(self, column: layout.Column, refs: np.ndarray) -> np.ndarray | None:
        """The sources' rows as one array, when each has exactly one row (item, category)."""
        if column.kind.one_row_per_source and bool(np.all(refs[:, 1] - refs[:, 0] == 1)):
            return take_rows(column.data, refs[:, 0])
        return None

    def stacked_rows(self, rows: Any) -> np.ndarray | None:
        """``get_rows(rows)`` as one array ``(len(rows), ...)``, or ``None`` when the feature's
        sources are not one stored row each, unchanged by reads (ragged images, text...)."""
        column = self.require_column()
        if type(self.feature).from_stored is not Feature.from_stored:
            return None
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self.parts.catalog.is_dense(column):
            return take_rows(column.data, rows)
        refs = take_rows(column.refs, rows)
        return None if (refs[:, 0] < 0).any() else self._stacked(column, refs)

    def get_rows(self, rows: Any) -> list[Any]:
        """The data of the sources at ``rows`` (positions in :attr:`TypedFile.ids`), as ``get``
        returns each: ``proxy.get_rows([bank.index(i) for i in ids])``. The refs, and the data
        of a fixed-shape feature, are read in one pass of slices; other data source by source.

        Every one of those sources must have data for this feature.
        """
        column = self.require_column()
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if not len(rows):
            return []
        if self.parts.catalog.is_dense(column):
            starts = absolute_rows(rows, column.refs.shape[0])
            refs = np.stack([starts, starts + 1], axis=1)
        else:
            refs = take_rows(column.refs, rows)
        missing = np.flatnonzero(refs[:, 0] < 0)
        if len(missing):
            source = self.parts.catalog.ids[int(rows[missing[0]])]
            raise ValueError(
                f"source {source!r} has no data for feature {self.path!r}: GetId serves "
                "sources that all have it (build the bank so they do, or use GetIndex)"
            )
        feature = self.feature
        block = self._stacked(column, refs)
        if block is not None:
            return column.kind.stacked_values(feature, block)
        data, bounds = read_spans(column.data, refs.tolist())  # one array for the batch
        if column.kind.has_shape_table:
            shapes = layout.stored_shapes(column, rows)
        else:
            shapes = [None] * len(rows)
        return column.kind.values(feature, data, bounds, shapes)

    def _ref_row(self, column: layout.Column, item: slice) -> int | None:
        """The source whose ref is exactly ``item``, if any."""
        if item.start is None or item.stop is None:
            return None
        starts, order, stops = self.parts.catalog.refs_index(column)
        first = int(np.searchsorted(starts, item.start))
        for i in range(first, len(starts)):
            if starts[i] != item.start:
                break
            if stops[i] == item.stop:
                return int(order[i])
        return None

    def __setitem__(self, item: Any, value: Any) -> None:
        self.parts.catalog.handle.require_writable()
        column = self.require_column()
        column.data[item] = column.kind.ravel(value)  # what a ref read reshaped goes back raveled

    def get(self, id_: str) -> Any:
        """Source ``id_``'s data (``None`` if it has none for this feature)."""
        return self._get_row(self.parts.catalog.row(id_), id_)

    def _get_row(self, row: int, id_: str) -> Any:
        column = self.column
        if column is None:
            return None
        dense = self.parts.catalog.dense_rows(column)
        if dense >= 0:  # source i is row i: no refs to read
            if row >= dense:
                return None
            return column.kind.value(self.feature, read_span(column.data, row, row + 1), None, id_)
        if row >= column.refs.shape[0]:
            return None
        start, stop = (int(v) for v in column.refs[row])
        if start < 0:
            return None
        if not start <= stop <= column.data.shape[0] or (
            column.kind.one_row_per_source and stop - start != 1
        ):
            raise DamagedBankError(
                f"{self.parts.catalog.handle.shown} is damaged: {column.path}/refs row {row} "
                f"({id_!r}) is [{start}, {stop}), not a span of its {column.data.shape[0]} rows "
                "this storage can hold; `h5bank verify` lists what is wrong"
            )
        shape = layout.stored_shape(column, row) if column.kind.has_shape_table else None
        return column.kind.value(self.feature, read_span(column.data, start, stop), shape, id_)

    def to_dask(self, chunks: Any = None) -> Any:
        """The concatenated data as a ``dask.array.Array``, read lazily on any worker.

        Fixed-shape features (``Image(size=...)``, ``Array(item=True)``) come
        out as ``(n, H, W, C)`` and labels as ``(n,)``. When every source of
        the bank has data for such a feature, row ``i`` is source ``i``
        (whatever order the rows were written in), so arrays of two features
        line up: ``x[y == 3]``. Otherwise, and for features stored ``rows``
        or ``flat``, it is the concatenation in the order of ``data``; use
        :meth:`to_dask_sources` for one array per source.

        ``chunks`` is anything ``dask.array.from_array`` takes. The default
        cuts axis 0 in whole HDF5 chunks, about ``h5bank.read.chunk-bytes``
        (64 MiB) a block. Making the array reads metadata only; its tasks
        open the bank once per worker process (a :class:`~pipeline.files.cache.LazyFile`),
        so the bank must be on storage every worker reaches.
        """
        column = self.require_column()
        by_source = column.kind.one_row_per_source and column.data.shape[0] == len(self.bank)
        refs = column.refs if by_source else None
        return dask_array(self.parts.catalog.handle.lazy_file(), column.data, chunks, refs)

    def to_dask_sources(self, partition_size: int | None = None) -> Any:
        """A ``dask.bag`` of ``(id, value)``, one item per source with data, in bank order.

        ``value`` is what :meth:`get` returns (each image in its own shape,
        each sound its own length). Partitions are ranges of consecutive
        sources, ``partition_size`` of them (default: about
        ``h5bank.read.chunk-bytes`` of data, at most 10,000), so a bank of
        millions of sources makes hundreds of tasks, not millions. Making it
        reads metadata only.
        """
        self.require_column()
        n = self.parts.catalog.count()
        size = partition_size or rows_per_partition(self.parts.catalog.file, [self.path], n)
        specs = columns_for(
            self.parts.catalog.features, self.parts.catalog.file, {self.path: self.path}
        )
        return source_bag(self.parts.catalog.handle.lazy_file(), specs, range(n), size, single=True)

    def add(self, id_: str, value: Any) -> None:
        """Add this feature's data for ``id_`` (which has none yet)."""
        self.parts.writes.write(
            id_, {self.name: value}, replace=False, prefix=posixpath.dirname(self.path)
        )

    def set(self, id_: str, value: Any) -> None:
        """Replace this feature's data for ``id_``."""
        self.parts.writes.write(
            id_, {self.name: value}, replace=True, prefix=posixpath.dirname(self.path)
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.feature, name)

    def _describe(self) -> str:
        return feature_line(self.name, self.feature, self.column, self.storage)

    def __repr__(self) -> str:
        return f"<feature {self.path!r} of {self.parts.catalog.handle.shown!r}: {self._describe().strip()}>"


class RefsView:
    """A feature's ``[start, stop)`` table: ``refs[i]`` is a ``slice`` (``None`` for no data).

    ``refs[:]`` (or any non-integer item) returns rows of the ``(n, 2)`` int64 table.
    """

    def __init__(self, proxy: FeatureProxy) -> None:
        self._proxy = proxy

    def _table(self) -> h5py.Dataset | None:
        column = self._proxy.column
        return None if column is None else column.refs

    def __len__(self) -> int:
        return self._proxy.parts.catalog.count()

    def __getitem__(self, item: Any) -> Any:
        table = self._table()
        n = len(self)
        if isinstance(item, (int, np.integer)):
            row = int(item) + n if item < 0 else int(item)
            if not 0 <= row < n:
                raise IndexError(f"refs index {item} out of range for {n} sources")
            if table is None or row >= table.shape[0]:
                return None
            start, stop = (int(v) for v in table[row])
            return None if start < 0 else slice(start, stop)
        if table is None:
            return np.full((n, 2), -1, dtype=np.int64)[item]
        return table[item]

    def __iter__(self) -> Iterator[slice | None]:
        table = self._table()
        rows = table[:] if table is not None else np.full((len(self), 2), -1)
        for start, stop in rows.tolist():
            yield None if start < 0 else slice(start, stop)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        table = self[:]
        return table if dtype is None else table.astype(dtype)

    def __repr__(self) -> str:
        return f"<refs of {self._proxy.path!r}: {len(self)} sources>"


class DatasetProxy(_Proxy):
    """A plain HDF5 dataset (not a bank feature), indexed like h5py."""

    @property
    def dataset(self) -> h5py.Dataset:
        return self.parts.catalog.file[self.path]

    shape = property(lambda self: self.dataset.shape)
    dtype = property(lambda self: self.dataset.dtype)
    attrs = property(lambda self: self.dataset.attrs)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Any) -> Any:
        return self.dataset[item]

    def __setitem__(self, item: Any, value: Any) -> None:
        self.parts.catalog.handle.require_writable()
        self.dataset[item] = value

    def to_dask(self, chunks: Any = None) -> Any:
        """The dataset as a ``dask.array.Array``; see :meth:`FeatureProxy.to_dask`."""
        return dask_array(self.parts.catalog.handle.lazy_file(), self.dataset, chunks)

    def _get_row(self, row: int, id_: str) -> None:
        return None

    def _describe(self) -> str:
        return dataset_line(self.name, self.dataset)

    def __repr__(self) -> str:
        return f"<dataset {self.path!r} of {self.parts.catalog.handle.shown!r}: {self._describe().strip()}>"
