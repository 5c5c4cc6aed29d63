"""Storage kinds: how a feature column is laid out, written, read back and checked.

A column's storage kind is the string recorded in its group's ``h5bank_storage``
attribute (a :class:`~features.base.Feature` has it as ``.storage``). Each kind
is one small class here, so that what varies by kind is said once instead of
in ``if storage == ...`` switches spread over the writer, the readers and the
checks. :func:`kind` gives the (stateless, shared) object for a name:

- :class:`Rows` (``"rows"``): an item is rows of the concatenated data;
- :class:`Item` (``"item"``): one row of a fixed shape per source;
- :class:`Flat` (``"flat"``): raveled, with a per-source ``shape`` table;
- :class:`Bytes` (``"bytes"``): ``uint8`` bytes;
- :class:`Category` (``"category"``): one ``int64`` code per source, the label
  names in the group's ``names`` attribute (:class:`Labels` while writing).

The interface of :class:`StorageKind`:

``name``
    the string recorded in the file.
``one_row_per_source``, ``has_shape_table``, ``has_names``
    what the layout holds: one row per source (dense reads, dask arrays by
    source, verify's extent check), a ``shape`` table, and label names.
``entry(value, producer)``
    the stored entry for one feature output (decode tasks).
``part(entry)``, ``concatenate(parts)``
    how a packed partition holds its entries.
``rejected(data, rows, target, skip)``, ``space_needed(...)``
    what the writer checks before it writes.
``new_rows(data, lengths, entries, labels)``, ``as_stored(rows, dtype)``, ``fits(rows, extent, dataset)``
    what the writer appends, or overwrites in place.
``chunk_rows(rows, table_rows)``
    rows per ``data`` chunk when h5bank picks them.
``value(feature, block, shape, id_)``, ``stacked_values(feature, block)``, ``ravel(value)``
    what reads return, and what writes through a slice store.

This is a leaf of ``pipeline.format``: it knows no dataset paths (those are
:mod:`pipeline.format.layout`'s) and imports nothing from the layers above.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from features.base import Feature
from pipeline.errors import FeatureTypeError, SchemaError

# What the writer compares an entry with: the column's trailing shape and dtype
# (None while the column does not exist: the first entry creates it).
Target = tuple[tuple[int, ...], np.dtype] | None


class Labels:
    """A category column's label names as codes (code ``i`` is name ``i``), grown as names come.

    The writer keeps one per column across commits, so a name is looked up
    in a dict, not in the file. The names are read (``load``) on first use
    only: columns of other kinds never touch them.

    Parameters
    ----------
    load
        Returns the names the column holds now (``[]`` for a new column).
    """

    def __init__(self, load: Callable[[], list[str]]) -> None:
        self._load = load
        self._codes: dict[str, int] | None = None
        self._added = False  # names were added since unsaved() last said so

    def codes(self, names: Sequence[str]) -> np.ndarray:
        """The ``int64`` code of each name, new names getting the next codes."""
        if self._codes is None:
            self._codes = {name: code for code, name in enumerate(self._load())}
        codes = self._codes
        before = len(codes)
        out = np.empty(len(names), dtype=np.int64)
        for i, name in enumerate(names):
            out[i] = codes.setdefault(name, len(codes))
        self._added = self._added or len(codes) != before
        return out

    def unsaved(self) -> list[str] | None:
        """Every name in code order if names were added since the last call, else ``None``.

        That is what the column's ``names`` attribute must hold before the new
        codes are written, so the file never has a code without its name.
        """
        if not self._added:
            return None
        self._added = False
        return list(self._codes or ())


class StorageKind:
    """How columns of one storage kind are laid out, written, read back and checked.

    The defaults are those of the array kinds (``rows``, ``item``, ``flat``,
    ``bytes``): an entry is an array whose axis 0 is appended to ``data``.
    :class:`Category`, whose entries are names, overrides the writing side.
    Instances hold no state; :func:`kind` hands out one per name.
    """

    name: ClassVar[str] = ""
    one_row_per_source: ClassVar[bool] = False
    """Each source with data has exactly one row of ``data``, so row ``i`` can be source ``i``."""
    has_shape_table: ClassVar[bool] = False
    """The column keeps a ``shape`` table: each source's shape, its rows raveled."""
    has_names: ClassVar[bool] = False
    """``data`` holds codes into the group's ``names`` attribute."""
    row_chunks: ClassVar[bool] = False
    """Large rows may be chunked one a chunk, each compressed by the decode tasks
    (:func:`pipeline.format.filters.precompressed`): one array row per source."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # -- decoding: one feature output, a packed partition ---------------------

    def entry(self, value: Any, producer: str) -> Any:
        """The stored entry of one feature output: ``(array, shape or None)``.

        Parameters
        ----------
        value
            What a feature's ``load`` (or a ``bank.map`` function) returned.
        producer
            Names what returned ``value`` in the error.

        Raises
        ------
        FeatureTypeError
            If the kind cannot store ``value``: found on the worker, so the
            source fails alone instead of the writer's commit.
        """
        raise NotImplementedError

    def part(self, entry: Any) -> tuple[Any, int, tuple[int, ...] | None]:
        """``(piece, rows, shape)`` of an entry: what a packed partition concatenates,
        how many rows of ``data`` it takes, and the shape the shape table keeps."""
        array, shape = entry
        return array, int(array.shape[0]), shape

    def concatenate(self, parts: list[Any]) -> Any:
        """A packed partition's data: one array when every part agrees in trailing shape
        and dtype (one write for the writer), else the list of parts (checked one by one)."""
        first = parts[0]
        if all(p.shape[1:] == first.shape[1:] and p.dtype == first.dtype for p in parts):
            return first if len(parts) == 1 else np.concatenate(parts)
        return parts

    # -- writing ----------------------------------------------------------------

    def rejected(
        self, data: Any, rows: Sequence[int], target: Target, skip: set[int], exact: str = ""
    ) -> dict[int, str]:
        """Rows (positions) of a packed partition whose entry cannot join the column, with why.

        Parameters
        ----------
        data
            The partition's data (:meth:`concatenate`).
        rows
            Each entry's position in the partition.
        target
            The column's trailing shape and dtype, ``None`` if it does not exist
            yet (the first entry then sets them).
        skip
            Positions not to check (already committed).
        exact
            If set, entries must have the column's dtype itself, not one that
            casts to it (a feature whose stored numbers mean different things
            in different types: ``Sound``'s int16 and float32 samples); the
            text says what to do instead.
        """
        if isinstance(data, np.ndarray):  # every entry shares one shape and dtype
            reason = _mismatch(data, target, exact)
            return {row: reason for row in rows if row not in skip} if reason else {}
        bad: dict[int, str] = {}
        for row, entry in zip(rows, data, strict=True):
            if row in skip:
                continue
            if target is None:
                target = (entry.shape[1:], entry.dtype)  # the first entry will create the column
            reason = _mismatch(entry, target, exact)
            if reason:
                bad[row] = reason
        return bad

    def space_needed(self, data: Any, sources: int, itemsize: int | None, chunk_bytes: int) -> int:
        """Bytes a partition's entries may take once written, for the writer's disk check.

        Generous on purpose (a full disk must stop a build before a commit,
        never half-way): the data as the column stores it (``itemsize``, if
        the column exists: float32 rows stored as float64 double), plus the
        chunk (``chunk_bytes``) the new rows start in.
        """
        entries = [data] if isinstance(data, np.ndarray) else list(data or [])
        needed = 0
        for entry in entries:
            size = getattr(entry, "size", None)
            if size is not None and itemsize:
                needed += int(size) * itemsize
            else:
                needed += int(getattr(entry, "nbytes", None) or len(entry))
        return needed + chunk_bytes

    def new_rows(
        self, data: Any, lengths: Sequence[int], entries: Sequence[int], labels: Labels
    ) -> np.ndarray:
        """The rows to append for the chosen ``entries`` (indices) of a packed partition.

        The whole packed array when every entry is chosen (no copy), else the
        chosen entries concatenated. ``labels`` serves :class:`Category` only.
        """
        if isinstance(data, np.ndarray) and len(entries) == len(lengths):
            return data
        parts = split(data, lengths)
        return np.concatenate([parts[j] for j in entries])

    def as_stored(self, rows: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """``rows`` as they are written to a ``data`` of ``dtype``: unchanged (h5py casts
        them as it writes, and the chunks decode tasks compressed stay valid)."""
        return rows

    def fits(self, rows: np.ndarray, extent: int, dataset: Any) -> bool:
        """Whether ``rows`` can replace a source's ``extent`` rows of ``dataset`` in place.

        Only rows of the same count, trailing shape and a castable dtype do:
        anything else is appended and the old rows are left unreferenced.
        """
        return (
            len(rows) == extent
            and rows.shape[1:] == dataset.shape[1:]
            and castable(rows.dtype, dataset.dtype)
        )

    def chunk_rows(self, rows: int, table_rows: int) -> int:
        """Rows per ``data`` chunk when h5bank picks them: ``rows`` (chosen by bytes) for
        data; ``table_rows`` for kinds chunked like a per-source table."""
        return rows

    # -- reading ----------------------------------------------------------------

    def value(
        self, feature: Feature, block: np.ndarray, shape: tuple[int, ...] | None, id_: str
    ) -> Any:
        """One source's value as reads return it, from its rows of ``data``.

        Parameters
        ----------
        feature
            The column's feature: its ``from_stored`` makes the value.
        block
            The source's rows, ``data[start:stop]``.
        shape
            The source's shape from the shape table (``None`` without one).
        id_
            The source's id, passed to ``from_stored``.
        """
        return feature.from_stored(block, id_)

    def stacked_values(self, feature: Feature, block: np.ndarray) -> list[Any]:
        """The value of each row of ``block``, each row one source's (one-row kinds): what
        a batch of sources read in one request returns."""
        return [self.value(feature, block[i : i + 1], None, "") for i in range(len(block))]

    def values(
        self,
        feature: Feature,
        rows: np.ndarray,
        bounds: Sequence[int],
        shapes: Sequence[tuple[int, ...] | None],
    ) -> list[Any]:
        """Each source's value from ``rows``, a batch of sources' rows one after the other
        (source ``i``'s are ``rows[bounds[i]:bounds[i + 1]]``, its shape ``shapes[i]``)."""
        return [
            self.value(feature, rows[a:b], shape, "")
            for a, b, shape in zip(bounds[:-1], bounds[1:], shapes, strict=True)
        ]

    def ravel(self, value: Any) -> Any:
        """``value`` as the column's rows, for a write through a slice of ``data``."""
        return value


class Rows(StorageKind):
    """``rows``: an entry is rows of ``data`` (sounds along time, logs along steps)."""

    name = "rows"

    def entry(self, value: Any, producer: str) -> Any:
        array = numeric(value, producer)
        return (array.reshape(1) if array.ndim == 0 else array, None)

    def values(
        self,
        feature: Feature,
        rows: np.ndarray,
        bounds: Sequence[int],
        shapes: Sequence[tuple[int, ...] | None],
    ) -> list[Any]:
        return feature.from_stored_rows(rows, bounds)


class Item(StorageKind):
    """``item``: one row of a fixed shape per source, so row ``i`` can be source ``i``."""

    name = "item"
    one_row_per_source = True
    row_chunks = True

    def entry(self, value: Any, producer: str) -> Any:
        return (numeric(value, producer)[np.newaxis], None)

    def value(
        self, feature: Feature, block: np.ndarray, shape: tuple[int, ...] | None, id_: str
    ) -> Any:
        return feature.from_stored(block[0], id_)

    def stacked_values(self, feature: Feature, block: np.ndarray) -> list[Any]:
        return [feature.from_stored(row, "") for row in block]


class Flat(StorageKind):
    """``flat``: arrays of varying shape, raveled; the shape table gives each its shape."""

    name = "flat"
    has_shape_table = True

    def entry(self, value: Any, producer: str) -> Any:
        array = numeric(value, producer)
        return (array.reshape(-1), tuple(array.shape))

    def value(
        self, feature: Feature, block: np.ndarray, shape: tuple[int, ...] | None, id_: str
    ) -> Any:
        return feature.from_stored(block.reshape(shape), id_)

    def ravel(self, value: Any) -> Any:
        """Raveled: a slice read back in its source's shape goes back as rows."""
        return np.asarray(value).reshape(-1)


class Bytes(StorageKind):
    """``bytes``: ``uint8`` rows; text is stored as UTF-8."""

    name = "bytes"

    def entry(self, value: Any, producer: str) -> Any:
        if isinstance(value, str):
            value = value.encode("utf-8")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return (np.frombuffer(bytes(value), dtype=np.uint8), None)
        if isinstance(value, np.ndarray) and value.dtype == np.uint8:
            return (value.reshape(-1), None)
        raise FeatureTypeError(f"{producer} returned {type(value).__name__}; expected bytes or str")

    def value(
        self, feature: Feature, block: np.ndarray, shape: tuple[int, ...] | None, id_: str
    ) -> Any:
        return feature.from_stored(block.tobytes(), id_)


class Category(StorageKind):
    """``category``: an entry is a label name; ``data`` holds one ``int64`` code per source.

    The names are only turned into codes by the writer (:class:`Labels`), which
    alone knows the column's names: a packed partition keeps the names.
    """

    name = "category"
    one_row_per_source = True
    has_names = True

    def entry(self, value: Any, producer: str) -> Any:
        if isinstance(value, str):
            return value
        raise FeatureTypeError(f"{producer} returned {type(value).__name__}; expected a str label")

    def part(self, entry: Any) -> tuple[Any, int, tuple[int, ...] | None]:
        return entry, 1, None

    def concatenate(self, parts: list[Any]) -> Any:
        return parts  # names: coded by the writer

    def rejected(
        self, data: Any, rows: Sequence[int], target: Target, skip: set[int], exact: str = ""
    ) -> dict[int, str]:
        return {}  # any name becomes a code

    def space_needed(self, data: Any, sources: int, itemsize: int | None, chunk_bytes: int) -> int:
        return 8 * sources  # a code each; codes share the per-source tables' small chunks

    def new_rows(
        self, data: Any, lengths: Sequence[int], entries: Sequence[int], labels: Labels
    ) -> np.ndarray:
        return labels.codes([data[j] for j in entries])

    def as_stored(self, rows: np.ndarray, dtype: np.dtype) -> np.ndarray:
        return rows.astype(dtype, copy=False)

    def fits(self, rows: np.ndarray, extent: int, dataset: Any) -> bool:
        return True  # one code replaces one code

    def chunk_rows(self, rows: int, table_rows: int) -> int:
        return table_rows  # one code per source: chunked like the other per-source tables

    def value(
        self, feature: Feature, block: np.ndarray, shape: tuple[int, ...] | None, id_: str
    ) -> Any:
        return int(block[0])

    def stacked_values(self, feature: Feature, block: np.ndarray) -> list[Any]:
        return [int(v) for v in block]


KINDS: dict[str, StorageKind] = {k.name: k for k in (Rows(), Item(), Flat(), Bytes(), Category())}


def kind(name: str) -> StorageKind:
    """The storage kind called ``name`` (a column's ``h5bank_storage``, a feature's ``storage``).

    Raises
    ------
    SchemaError
        For a name h5bank does not know, rather than store or read the column
        as some other kind.
    """
    found = KINDS.get(name)
    if found is None:
        known = ", ".join(repr(k) for k in KINDS)
        raise SchemaError(f"unknown storage kind {name!r}; h5bank stores {known}")
    return found


def numeric(value: Any, producer: str) -> np.ndarray:
    """``value`` as a numeric array, for the array kinds (``rows``, ``item``, ``flat``).

    Raises
    ------
    FeatureTypeError
        For anything but numbers: text and objects have kinds of their own.
    """
    if not isinstance(value, (np.ndarray, np.generic, int, float, complex)):
        raise FeatureTypeError(
            f"{producer} returned {type(value).__name__}; "
            "expected a numpy array, a dict of them, or None"
        )
    array = np.asarray(value)
    if array.dtype.kind in "OUSV":
        raise FeatureTypeError(
            f"{producer} returned an array of dtype {array.dtype}; "
            "store numbers in arrays, text with String, bytes with Bytes"
        )
    return array


def split(data: Any, lengths: Sequence[int]) -> list[Any]:
    """The entries of a packed partition's data, one per source (``lengths``: their rows)."""
    if not isinstance(data, np.ndarray):
        return list(data)
    bounds = np.cumsum([0, *lengths])
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def castable(source: np.dtype, target: np.dtype) -> bool:
    """Safe casts, plus float to float (the stored precision is chosen by the first source)."""
    return np.can_cast(source, target, "safe") or (source.kind == target.kind == "f")


def _mismatch(entry: np.ndarray, target: Target, exact: str = "") -> str | None:
    """Why ``entry`` cannot join a column storing ``target`` (trailing shape, dtype), if it
    cannot (``exact``: only in that very dtype, and what to do otherwise)."""
    if target is None:
        return None
    shape, dtype = target
    if entry.shape[1:] != shape:
        return f"trailing shape {entry.shape[1:]} does not match the shape {shape} this feature already stores"
    if entry.dtype != dtype if exact else not castable(entry.dtype, dtype):
        return (
            f"dtype {entry.dtype} does not match the dtype {dtype} this feature already stores "
            f"({exact or 'set dtype= on the feature to convert'})"
        )
    return None
