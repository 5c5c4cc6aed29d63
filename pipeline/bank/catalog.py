"""What a bank object has read from its file: features, columns, ids, and the read caches.

A :class:`Catalog` reads lazily and keeps what it read until its handle
reopens the file (another process, another writer): then everything is read
again. The proxies and the facade share one catalog per bank object.
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np

from features.base import Feature
from pipeline.bank.handle import BankFile
from pipeline.build.summary import Failure
from pipeline.errors import DamagedBankError, UnknownIdError
from pipeline.format import layout
from pipeline.schema import Schema, feature_for_column, owner_path


class Catalog:
    """The features, columns and ids of the file ``handle`` opens, read once per open.

    ``schema`` is the bank type's (its declared features); columns only the
    file has get features rebuilt from their records.
    """

    def __init__(self, handle: BankFile, schema: Schema) -> None:
        self.handle = handle
        self.schema = schema
        self._generation = -1
        self._features: dict[str, Feature] = {}
        self._columns: dict[str, layout.Column] = {}
        self._refs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._dense: dict[str, int] = {}  # a dense column's rows, -1 for one that is not
        self._members: dict[str, list[str]] = {}  # a group's names in the file
        self._ids: list[str] | None = None
        self._index: dict[str, int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """The handle (a recipe) and the schema: what was read is read again after unpickling."""
        return {"handle": self.handle, "schema": self.schema}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["handle"], state["schema"])  # type: ignore[misc]

    @property
    def file(self) -> h5py.File:
        """The open file; what was read from an earlier open is dropped first."""
        f = self.handle.file
        if self._generation != self.handle.generation:
            self._generation = self.handle.generation
            self._features = self._known_features(f)
            self._columns, self._refs, self._dense, self._members = {}, {}, {}, {}
            self._ids = self._index = None
        return f

    def _known_features(self, f: h5py.File) -> dict[str, Feature]:
        """The declared features, plus generic ones for columns only the file has."""
        features: dict[str, Feature] = dict(self.schema)
        if layout.is_bank(f):
            records = layout.read_json_attr(f, layout.ATTR_SCHEMA)
            for path in layout.iter_columns(f):
                owner = owner_path(path, features)
                if owner not in features:
                    attrs = f[path].attrs
                    owner = path if path in records else owner_path(path, records) or path
                    features[owner] = feature_for_column(
                        str(attrs[layout.ATTR_STORAGE]), attrs, records.get(owner), owner
                    )
        return features

    @property
    def features(self) -> dict[str, Feature]:
        """Feature path -> feature; writes add the features they create."""
        self.file  # noqa: B018 (read from the file as it is now)
        return self._features

    def feature_of(self, path: str) -> Feature:
        """The feature that owns column ``path``."""
        features = self.features
        owner = owner_path(path, features)
        if owner == "" and "" not in features:  # a column no record or declaration owns
            raise DamagedBankError(
                f"{self.handle.shown} is damaged: its column {path!r} belongs to no feature"
            )
        return features[owner]

    # -- ids ----------------------------------------------------------------------------

    @property
    def ids(self) -> list[str]:
        """Source ids in commit order (only what the bank commits)."""
        f = self.file
        if self._ids is None:
            table = f.get(layout.IDS)
            self._ids = layout.read_strings(table, 0, self.count()) if table is not None else []
        return self._ids

    def count(self) -> int:
        """The number of sources, without reading millions of ids."""
        f = self.file
        if self._ids is not None:
            return len(self._ids)
        return 0 if f.get(layout.IDS) is None else layout.committed(f)

    def row(self, id_: str) -> int:
        """The row of source ``id_`` in every refs table."""
        if not isinstance(id_, str):
            raise UnknownIdError(f"source ids are str; got {type(id_).__name__} {id_!r}")
        self.file  # noqa: B018 (read from the file as it is now)
        if self._index is None:
            self._index = {value: row for row, value in enumerate(self.ids)}
        try:
            return self._index[id_]
        except KeyError:
            sample = ", ".join(repr(i) for i in self.ids[:3])
            raise UnknownIdError(
                f"no source {id_!r} in {self.handle.shown} ({self.count()} sources"
                + (f"; ids look like {sample}" if sample else "")
                + ")"
            ) from None

    def has(self, id_: object) -> bool:
        """Whether ``id_`` is a source of the bank."""
        try:
            self.row(id_)  # type: ignore[arg-type]
        except UnknownIdError:
            return False
        return True

    def added(self, id_: str) -> None:
        """Record that ``id_`` was committed after the ids were read."""
        self.ids.append(id_)
        if self._index is not None:
            self._index[id_] = len(self.ids) - 1

    def written(self) -> None:
        """Forget the read caches a write makes stale (and the ids, if a commit rolled back)."""
        self._refs.clear()
        self._dense.clear()
        self._members.clear()  # a write can add a column
        if layout.committed(self.file) != len(self.ids):
            self._ids = self._index = None

    def failures(self) -> list[Failure]:
        """Sources the builds of this bank could not load, with the feature and the reason."""
        f = self.file
        if layout.FAILURES not in f:
            return []
        columns = [layout.read_strings(t) for t in layout.failure_tables(f)]
        return [Failure(*row) for row in zip(*columns, strict=True)]

    # -- columns ------------------------------------------------------------------------

    def column(self, path: str) -> layout.Column | None:
        """The column at ``path``, ``None`` if it has no data yet (or is no column)."""
        f = self.file
        column = self._columns.get(path)
        if column is None and layout.is_column(f.get(path)):
            column = self._columns[path] = layout.Column.open(f, path)
        return column

    def require_column(self, path: str) -> layout.Column:
        column = self.column(path)
        if column is None:
            raise ValueError(f"{path!r} is not a feature column of {self.handle.shown}")
        return column

    def refs_index(self, column: layout.Column) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A column's refs sorted by start (starts, source rows, stops), read once."""
        self.file  # noqa: B018 (in a forked child: reopen first, which drops the caches)
        cached = self._refs.get(column.path)
        if cached is None:
            refs = column.refs[: self.count()]
            order = np.argsort(refs[:, 0], kind="stable")
            cached = self._refs[column.path] = (refs[order, 0], order, refs[order, 1])
        return cached

    def is_dense(self, column: layout.Column) -> bool:
        """Whether source ``i``'s data is exactly row ``i`` of a one-row-a-source column (item,
        category) for every source: a batch then reads its rows without the refs. Read once
        (16 bytes a source), and forgotten when this bank writes."""
        return self.dense_rows(column) >= 0

    def dense_rows(self, column: layout.Column) -> int:
        """The rows of a dense column (see :meth:`is_dense`), ``-1`` for one that is not."""
        self.file  # noqa: B018 (in a forked child: reopen first, which drops the caches)
        rows_known = self._dense.get(column.path)
        if rows_known is None:
            dense = False
            n = column.refs.shape[0]
            if column.kind.one_row_per_source and n == column.data.shape[0]:
                dense = True
                for start in range(0, n, 1 << 20):  # in blocks: 16 MB at most held at once
                    refs = column.refs[start : start + (1 << 20)]
                    rows = np.arange(start, start + len(refs) + 1, dtype=refs.dtype)
                    if not (
                        np.array_equal(refs[:, 0], rows[:-1])
                        and np.array_equal(refs[:, 1], rows[1:])
                    ):
                        dense = False
                        break
            rows_known = self._dense[column.path] = n if dense else -1
        return rows_known

    def members(self, path: str) -> list[str]:
        """The names in the file's group ``path`` (none for a column or no group), read once
        per open and write; h5bank's own (``__ids__``...) left out."""
        f = self.file
        names = self._members.get(path)
        if names is None:
            node = f.get(path) if path else f
            names = []
            if isinstance(node, h5py.Group) and not layout.is_column(node):
                names = [name for name in node if not name.startswith("__")]
            self._members[path] = names
        return names

    def node(self, path: str) -> Any:
        """What is at ``path`` in the file (the root for ``""``), ``None`` if nothing."""
        f = self.file
        return f.get(path) if path else f
