"""Writing sources by id into an open bank: ``add``, ``set`` and item assignment.

Each write goes through the bank's single :class:`~pipeline.build.writer.BankWriter`,
opened on the first write and checked against the bank type then; the
writer commits like a build does (rows, refs, then the id), so a write killed
halfway leaves the bank as of its last commit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np

from pipeline import config
from pipeline.bank.catalog import Catalog
from pipeline.build.chain import check_schema
from pipeline.build.decode import to_stored
from pipeline.build.writer import BankWriter
from pipeline.errors import NotABankError
from pipeline.files.handles import open_for_writing
from pipeline.format import layout
from pipeline.format.shards import listed_shards, write_index


class Writes:
    """The writes of one bank object: its handle must be writable (or turn writable)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._writer: BankWriter | None = None
        self._generation = -1

    def __getstate__(self) -> dict[str, Any]:
        return {"catalog": self.catalog}  # no writer: only read-only banks pickle

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["catalog"])  # type: ignore[misc]

    def write(self, id_: str, data: Mapping[str, Any], replace: bool, prefix: str = "") -> None:
        """Write ``data`` (nested like the schema, below ``prefix``) for source ``id_``.

        A new id is committed as a new source; an existing one gets the
        columns it has no data in (``replace=False``, else ``ValueError``) or
        any (``replace=True``).
        """
        catalog = self.catalog
        catalog.handle.require_writable()
        if not isinstance(id_, str) or not id_:
            raise TypeError(f"a source id must be a non-empty str, got {id_!r}")
        values = self.flatten(data, prefix)
        if not values:
            raise ValueError(f"nothing to write for {id_!r}: {data!r}")
        if layout.shard_names(catalog.file):
            self._write_sharded(id_, values, replace)
            return
        self._write_with(self.writer(), id_, values, replace, catalog.has(id_))

    def _write_with(
        self,
        writer: BankWriter,
        id_: str,
        values: dict[str, Any],
        replace: bool,
        exists: bool,
        record: bool = True,
    ) -> None:
        """Write ``values`` for ``id_`` (a source of the bank if ``exists``) with ``writer``
        (the bank's, or a shard's); ``record`` it in the catalog (not while it is closed)."""
        catalog = self.catalog
        features = writer.features_for(values)
        entries: dict[str, Any] = {}
        for path, value in values.items():
            feature = features[path]
            stored = to_stored(value, feature.storage, path, type(feature).__name__)
            for column in stored:  # a dict value's keys name columns too
                _check_column(column, column.rpartition("/")[2] if column != path else path)
            entries.update(stored)
        new = writer.register(features)  # the writer shares the catalog's features
        try:
            if exists:
                writer.update(id_, entries, replace=replace)
            else:
                writer.add_source(id_, entries)
                if record:
                    catalog.added(id_)
        except BaseException:
            writer.forget(new)
            raise
        finally:
            if record:
                catalog.written()

    def _write_sharded(self, id_: str, values: dict[str, Any], replace: bool) -> None:
        """A write into a sharded bank: into the shard holding ``id_`` (a new id: the last
        shard), committed there as in any bank, then the index written again over the shards
        (every reader then sees the write) and this bank reopened on it.

        The index is rewritten whole, about 0.8 s per million sources: fine for the few
        writes a large bank takes after its build, slow for a loop of many into one.
        """
        catalog = self.catalog
        handle = catalog.handle
        f = catalog.file
        index = handle.path
        provenance = layout.read_json_attr(f, layout.ATTR_PROVENANCE)
        identity = layout.bank_uuid(f)
        names = {}  # label codes handed out keep their meaning, as add / set keep them
        for path in layout.iter_columns(f):
            column = layout.Column.open(f, path)
            if column.kind.has_names:
                names[path] = layout.category_names(column)
        shards = listed_shards(index)
        target = shards[-1]
        exists = catalog.has(id_)
        if exists:
            ends = np.cumsum([_committed(shard) for shard in shards])
            target = shards[int(np.searchsorted(ends, catalog.row(id_), side="right"))]
        handle.close()  # and the shards it read: the shard's writer needs it alone
        try:
            shard = open_for_writing(target, "r+")
            try:
                layout.check_format(shard)
                check_schema(shard, catalog.schema)
                if not layout.consistent(shard):  # a writer that died in add() left a half commit
                    layout.truncate(shard)
                writer = BankWriter(
                    shard, dict(catalog.schema), int(config.get("build.chunk-bytes"))
                )
                self._write_with(writer, id_, values, replace, exists, record=False)
            finally:
                shard.close()
        finally:
            write_index(index, shards, provenance, identity, names)
            handle.reopen()

    def writer(self) -> BankWriter:
        """The writer of the bank, checked against the bank type on first use."""
        catalog = self.catalog
        f = catalog.file
        if self._writer is None or self._generation != catalog.handle.generation:
            if not layout.is_bank(f):
                raise NotABankError(
                    f"{catalog.handle.shown} is a plain HDF5 file; h5bank writes sources only to "
                    f"banks (build one with {catalog.handle.owner}.create, or open a new path "
                    "with mode='a')"
                )
            check_schema(f, catalog.schema)
            if not layout.consistent(f):  # a writer that died in add() left a half commit
                layout.truncate(f)
            self._writer = BankWriter(f, catalog.features, int(config.get("build.chunk-bytes")))
            self._generation = catalog.handle.generation
        return self._writer

    def flatten(self, data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        """``{feature path: value}`` from data nested like the schema.

        Raises ``ValueError`` for a key that cannot name a column as it is
        (see :func:`~pipeline.format.layout.column_path_problem`): HDF5 would
        write ``{"x\\0y": ...}`` as column ``x``.
        """
        if not isinstance(data, Mapping):
            raise TypeError(
                f"data must be a dict of feature name to value, got {type(data).__name__}"
            )
        out: dict[str, Any] = {}
        features = self.catalog.features
        for name, value in data.items():
            path = f"{prefix}/{name}" if prefix else str(name)
            _check_column(path, name)
            if path in features or not isinstance(value, Mapping):
                out[path] = value
            else:
                out.update(self.flatten(value, path))
        return out


def _check_column(path: str, key: Any) -> None:
    """Raise ``ValueError`` naming ``key`` if ``path`` cannot name a column as it is."""
    problem = layout.column_path_problem(path)
    if problem is not None:
        raise ValueError(f"cannot write key {key!r} (column {path!r}): {problem}")


def _committed(path: str) -> int:
    with h5py.File(path, "r") as f:
        return layout.committed(f)
