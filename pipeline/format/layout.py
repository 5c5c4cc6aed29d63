"""The on-disk format of a bank (version 1): names, attributes, commit and truncate rules.

This is the only module that knows dataset paths. A bank is a plain HDF5 file
that h5py alone can read:

- root attributes ``h5bank_format`` (``"h5bank"``), ``h5bank_version`` (1),
  ``h5bank_schema`` (JSON: each feature path's class, storage, attrs and
  dataset options), ``h5bank_provenance`` (JSON: library version, builds with
  their times, counts and source specification, credentials removed) and
  ``h5bank_state`` (``"building"`` or ``"complete"``) and ``h5bank_uuid`` (a
  random id given when the bank is created and kept by appends, so a reader
  can tell a bank from another one written at the same path);
- ``__sources__/id``: the committed source ids (UTF-8), in commit order; its
  length is the number of sources in the bank;
- ``__failures__/id``, ``/feature``, ``/error``: sources that failed, with the
  feature (``""`` if none accepted the source) and the reason;
- one HDF5 group per feature column, nested like the schema (``data/images``),
  with attributes ``h5bank_storage``, ``h5bank_feature`` and the feature's
  parameters, holding ``data`` (the concatenation along axis 0), ``refs``
  (``(n, 2)`` int64 ``[start, stop)`` rows into ``data``, ``-1, -1`` where a
  source has no data) and, for ``flat`` storage, ``shape`` (``(n, ndim)``
  int64, ``-1`` padded). A feature whose ``load`` returns a dict gets one
  column per key below its group (``feature/key``).

Commit order makes crashes cheap: a commit appends rows (and, first, new
label names or a new column's datasets, which nothing refers to yet), then
refs (and shapes), then the ids, then failures, then flushes; then it sets
the root attribute ``h5bank_committed`` to the number of ids and flushes
again. That counter is the commit record: a process killed during the first
flush may leave an id table that grew while its strings or the rows they
point to were not all written, and the counter, rewritten in place only once
all of that is on disk, says how many ids to trust. :func:`truncate` cuts
every table back to what it commits (banks written before the counter
existed: to the id table). HDF5 keeps no journal, so this ordering is what
makes a killed build resumable.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from pipeline.errors import DamagedBankError, FormatVersionError, NotABankError
from pipeline.format.filters import precompressed
from pipeline.format.rows import open_dataset, take_rows
from pipeline.format.storage import StorageKind
from pipeline.format.storage import kind as storage_kind
from pipeline.format.virtual import ATTR_SHARDS, ShardRows, is_virtual

FORMAT = "h5bank"
VERSION = 1

ATTR_FORMAT = "h5bank_format"
ATTR_VERSION = "h5bank_version"
ATTR_SCHEMA = "h5bank_schema"
ATTR_PROVENANCE = "h5bank_provenance"
ATTR_STATE = "h5bank_state"
ATTR_UUID = "h5bank_uuid"
ATTR_COMMITTED = "h5bank_committed"
ATTR_FAILURES_COMMITTED = "h5bank_failures_committed"
ATTR_STORAGE = "h5bank_storage"
ATTR_FEATURE = "h5bank_feature"
ATTR_NAMES = "names"  # category labels, code i is names[i]

IDS = "__sources__/id"
FAILURES = "__failures__"
FAILURE_FIELDS = ("id", "feature", "error")
DATA, REFS, SHAPE = "data", "refs", "shape"

BUILDING, COMPLETE = "building", "complete"
_STR = h5py.string_dtype("utf-8")
# Rows per chunk of the per-source tables (ids, failures, refs, shapes, label codes):
# a power of two from the sources the bank is expected to hold (see table_rows),
# at most 4096 (64 KiB of refs: a million-source table is 250 chunks), at least 64.
TABLE_ROWS = 4096
MIN_TABLE_ROWS = 64
# The smallest data chunk h5bank picks (see data_chunk_bytes).
MIN_CHUNK_BYTES = 4096


def _text(value: Any) -> Any:
    """An attribute's text: h5bank writes fixed-length UTF-8 bytes, older banks wrote str."""
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else value


def set_text(f: h5py.File, name: str, text: str) -> None:
    """Write a root text attribute as fixed-length UTF-8 bytes, kept in the object header.

    A variable-length string would live in HDF5's global heap, where a
    process killed in a flush can leave the attribute pointing at heap data
    that was never written, and the file could not be resumed. Same-length
    rewrites (the state) happen in place.
    """
    data = np.bytes_(text.encode("utf-8"))
    old = f.attrs.get(name)
    if isinstance(old, np.bytes_) and len(old) == len(data) and old.dtype == data.dtype:
        f.attrs.modify(name, data)
    else:
        f.attrs[name] = data


def state(f: h5py.File) -> str | None:
    """``"building"`` or ``"complete"`` (``None`` for files h5bank did not write)."""
    return _text(f.attrs.get(ATTR_STATE))


def set_state(f: h5py.File, value: str) -> None:
    set_text(f, ATTR_STATE, value)


def shard_names(f: h5py.File) -> list[str]:
    """The file names of the bank's own shards (:data:`ATTR_SHARDS`; none for one file)."""
    raw = f.attrs.get(ATTR_SHARDS)
    if raw is None:
        return []
    try:
        names = json.loads(_text(raw))
    except (TypeError, ValueError):
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def is_bank(f: h5py.File) -> bool:
    return _text(f.attrs.get(ATTR_FORMAT)) == FORMAT


def check_format(f: h5py.File) -> int:
    """The bank's format version; raises if the file is no bank or a newer one."""
    if not is_bank(f):
        raise NotABankError(
            f"{f.filename} is not an h5bank bank (no {ATTR_FORMAT!r} attribute); "
            "open it with pipeline.TypedFile to browse any HDF5 file"
        )
    version = int(f.attrs.get(ATTR_VERSION, 0))
    if version > VERSION or version < 1:
        raise FormatVersionError(
            f"{f.filename} has bank format version {version}; this h5bank reads version "
            f"{VERSION} and older: upgrade h5bank to read it"
        )
    return version


def init_bank(
    f: h5py.File, schema: dict[str, Any], provenance: dict[str, Any], expected: int = 0
) -> None:
    """Write the root attributes and empty bookkeeping tables of a new bank.

    ``expected`` is the number of sources the bank is expected to hold (a
    build's planned sources; 0, the default, when nothing is planned: a bank
    made to ``add`` to). The id and failure tables are chunked for it
    (:func:`table_rows`), and keep those chunks however the bank grows.
    """
    set_text(f, ATTR_FORMAT, FORMAT)
    f.attrs[ATTR_VERSION] = VERSION
    write_json_attr(f, ATTR_SCHEMA, schema)
    write_json_attr(f, ATTR_PROVENANCE, provenance)
    set_state(f, BUILDING)
    set_text(f, ATTR_UUID, uuid.uuid4().hex)
    rows = table_rows(expected)
    _string_table(f, IDS, rows)
    for field in FAILURE_FIELDS:
        _string_table(f, f"{FAILURES}/{field}", rows)
    mark_committed(f)


def bank_uuid(f: h5py.File) -> str | None:
    """The bank's ``h5bank_uuid`` (``None`` for files h5bank did not create, or older banks)."""
    value = _text(f.attrs.get(ATTR_UUID))
    return None if value is None else str(value)


def table_rows(sources: int) -> int:
    """Rows per chunk of a per-source table of a bank expected to hold ``sources``.

    The power of two at or above ``sources``, from :data:`MIN_TABLE_ROWS` to
    :data:`TABLE_ROWS`. HDF5 allocates a chunked dataset's chunks whole, so
    4096-row chunks made the tables of a bank of five photos take 350 KB.
    A table's chunk shape is fixed when it is created (HDF5 cannot change
    it): a bank that grows far past what was expected (one made by ``add``,
    which starts at 64 rows) keeps its small chunks, which cost more chunks
    to index, not more bytes.
    """
    wanted = 1 << max(0, int(sources) - 1).bit_length()
    return min(TABLE_ROWS, max(MIN_TABLE_ROWS, wanted))


def _string_table(f: h5py.File, name: str, rows: int) -> h5py.Dataset:
    return f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=_STR, chunks=(rows,))


def read_json_attr(f: h5py.File, name: str) -> dict[str, Any]:
    """The JSON object in attribute ``name`` (``{}`` if absent); a damaged one raises
    :class:`DamagedBankError`."""
    try:
        raw = _text(f.attrs.get(name))
        value = json.loads(raw) if raw else {}
    except (TypeError, ValueError) as error:
        raise DamagedBankError(
            f"{f.filename} is damaged: its {name} attribute is not JSON ({error})"
        ) from None
    if not isinstance(value, dict):
        raise DamagedBankError(f"{f.filename} is damaged: its {name} attribute is not an object")
    return value


# Object-header attributes must stay under 64 KiB: a provenance that grew past
# this keeps its first build and its latest ones.
_ATTR_LIMIT = 48_000


def write_json_attr(f: h5py.File, name: str, value: dict[str, Any]) -> None:
    text = json.dumps(value, sort_keys=True)
    builds = value.get("builds")
    while len(text.encode()) > _ATTR_LIMIT and isinstance(builds, list) and len(builds) > 2:
        del builds[1]  # the oldest but the first
        value["builds_dropped"] = int(value.get("builds_dropped", 0)) + 1
        text = json.dumps(value, sort_keys=True)
    set_text(f, name, text)


def read_strings(dataset: h5py.Dataset, start: int = 0, stop: int | None = None) -> list[str]:
    """Rows ``[start, stop)`` of a string table (ids, failures), as ``str``; text that is not
    UTF-8 (h5bank writes UTF-8) raises :class:`DamagedBankError`."""
    if dataset.shape[0] == 0:
        return []
    try:
        return dataset.asstr()[start:stop].tolist()
    except UnicodeDecodeError as error:
        raise DamagedBankError(
            f"{dataset.file.filename} is damaged: {dataset.name} holds text that is not UTF-8 "
            f"({error.reason}) in rows {start} to {stop if stop is not None else dataset.shape[0]}"
        ) from None


def storable(text: str) -> str:
    """``text`` as UTF-8 can hold it: stray bytes a file name held (which Python decodes as
    lone surrogates) are written as ``\\xNN``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text


def storable_all(texts: Sequence[str]) -> list[str]:
    """:func:`storable` of each of ``texts``: one encode of them all when they all encode (a
    writer's commit of thousands of ids), one by one otherwise."""
    texts = list(texts)
    try:
        "".join(texts).encode("utf-8")
    except UnicodeEncodeError:
        return [storable(text) for text in texts]
    return texts


def append_strings(dataset: h5py.Dataset, values: list[str]) -> None:
    if not values:
        return
    n = dataset.shape[0]
    dataset.resize((n + len(values),))
    dataset[n:] = np.array(storable_all(values), dtype=object)


def rebuild_string_table(
    f: h5py.File, name: str, n: int, sync: Any = None, rows: list[str] | None = None
) -> None:
    """Rewrite the string table ``name`` in fresh storage: its first ``n`` rows, or ``rows``.

    A killed commit can leave, past a table's end, slots that point at
    global-heap data that was never written; HDF5 reads a slot before it
    overwrites it, so the next rows written there would fail ("bad heap
    index"). A resume rebuilds the id and failure tables to be rid of them,
    and the last step of a build rewrites the failure table this way rather
    than in place: the new table is written and made durable (``sync()``,
    after a flush) under a temporary name before it replaces the old one (a
    table left only under the temporary name is taken back first).
    """
    temporary = f"{name}__rebuilt"
    if name not in f and temporary in f:  # a rebuild killed between unlink and rename
        f.move(temporary, name)
    if rows is None:
        rows = read_strings(f[name], 0, n) if n else []
    if temporary in f:
        del f[temporary]
    table = _string_table(f, temporary, f[name].chunks[0])  # the table's chunks stay as they were
    append_strings(table, rows)
    f.flush()
    if sync is not None:
        sync()
    del f[name]
    f.move(temporary, name)
    f.flush()
    if sync is not None:
        sync()


def replace_failures(f: h5py.File, failures: list[tuple[str, str, str]], sync: Any = None) -> None:
    """Replace the failure tables with ``failures`` (rows of id, feature, error).

    The failures counter is set to 0 first: a kill while the three tables
    are swapped one by one leaves them empty (a resume records the failures
    of the sources it retries again), never with rows of one table next to
    rows of another.
    """
    if ATTR_FAILURES_COMMITTED in f.attrs:
        f.attrs.modify(ATTR_FAILURES_COMMITTED, np.int64(0))
    else:
        f.attrs[ATTR_FAILURES_COMMITTED] = np.int64(0)
    f.flush()
    if sync is not None:
        sync()
    columns = list(zip(*failures, strict=True)) if failures else [(), (), ()]
    for field, column in zip(FAILURE_FIELDS, columns, strict=True):
        rebuild_string_table(f, f"{FAILURES}/{field}", 0, sync, rows=list(column))
    mark_committed(f)
    f.flush()
    if sync is not None:
        sync()


def ids_table(f: h5py.File) -> h5py.Dataset:
    return f[IDS]


def failure_tables(f: h5py.File) -> list[h5py.Dataset]:
    return [f[f"{FAILURES}/{field}"] for field in FAILURE_FIELDS]


# -- feature columns --------------------------------------------------------


def column_path_problem(path: str) -> str | None:
    """Why ``path`` cannot name a column h5bank writes (``None`` if it can).

    HDF5 ends a name at its first NUL (``"x\\0y"`` would be written as ``x``),
    reads ``.`` as the group itself and keeps ``..`` as a plain name, joins
    ``//``; and names starting with ``__`` are the bank's own tables.
    """
    if not isinstance(path, str):
        return f"a column path is a str, not {type(path).__name__}"
    if "\0" in path:
        return "it holds a NUL character, where HDF5 would cut the name"
    bad = [part for part in path.split("/") if part in ("", ".", "..") or part.startswith("__")]
    if bad:
        return (
            f"its part {bad[0]!r} is not a usable name (parts of a column path may not be "
            "empty, '.' or '..', or start with '__')"
        )
    return None


@dataclass
class Column:
    """The datasets of one feature column: ``data``, ``refs`` and, for flat storage, ``shape``.

    ``storage`` is the kind's name as the file records it; :attr:`kind` is
    the object that knows what it means.
    """

    path: str
    storage: str
    group: h5py.Group
    data: h5py.Dataset  # or, for a sharded bank, a ShardRows reading its shards
    refs: h5py.Dataset
    shape: h5py.Dataset | None

    @property
    def kind(self) -> StorageKind:
        """The column's storage kind (raises ``SchemaError`` for a kind h5bank does not know)."""
        return storage_kind(self.storage)

    @classmethod
    def open(cls, f: h5py.File, path: str) -> Column:
        group = f[path]
        storage = str(group.attrs[ATTR_STORAGE])
        # Unfiltered data is read without a chunk cache, straight from the file (see
        # open_dataset): a random clip of 200 KB read through HDF5's 1 MiB cache cost the
        # chunks it touches, 2.2x the time of a plain h5py loop's read.
        data: Any = group[DATA]
        data = ShardRows(data) if is_virtual(data) else open_dataset(group, DATA)
        return cls(path, storage, group, data, group[REFS], group.get(SHAPE))


def is_column(node: Any) -> bool:
    """A complete feature column: marked, with its data and refs (the mark is written last)."""
    return (
        isinstance(node, h5py.Group)
        and ATTR_STORAGE in node.attrs
        and DATA in node
        and REFS in node
    )


def iter_columns(f: h5py.File) -> Iterator[str]:
    """Paths of every feature column in the bank, in HDF5's (alphabetical) order."""
    found: list[str] = []

    def visit(name: str, node: Any) -> None:
        if not name.startswith("__") and is_column(node):
            found.append(name)

    f.visititems(visit)
    yield from found


def create_column(
    f: h5py.File,
    path: str,
    storage: str,
    sample: np.ndarray,
    n_sources: int,
    options: dict[str, Any],
    attrs: dict[str, Any],
    feature_class: str,
    chunk_bytes: int,
    *,
    sources: int = 1,
    expected: int = 0,
    planned: int = 0,
) -> Column:
    """Create the datasets of a new column, shaped after ``sample`` (its first write).

    ``refs`` (and ``shape``) start with ``n_sources`` rows of ``-1``: the
    sources committed before this column existed have no data in it.

    Chunk shapes follow the size of the bank being built, because HDF5
    allocates a chunked dataset's chunks whole (a bank of five photos took
    twice their size in 1 MiB chunks). ``sample`` holds the data of
    ``sources`` sources; ``planned`` sources (at least ``sources``) are
    expected to get data in this column, and the bank is expected to hold
    ``expected`` sources (at least ``n_sources`` + ``sources``). The defaults
    expect nothing more than this write (``TypedFile.add``):

    - ``refs``, ``shape`` and the codes of a ``category`` column (one per
      source): :func:`table_rows` of the sources expected, 64 to 4096 rows;
    - ``data``, unless the feature gives ``chunks=`` or the column is
      :func:`precompressed` (one row a chunk): rows of about
      :func:`data_chunk_bytes`, a sixteenth of the bytes expected (bytes per
      source of ``sample`` x ``planned``), at most ``chunk_bytes``
      (``h5bank.build.chunk-bytes``). A column of 16 MiB or more gets
      exactly the chunks of ``chunk_bytes`` that reads and builds were tuned
      on (85 rows of 64x64 RGB ``uint8`` for 1 MiB).

    A column keeps these chunk shapes for good: HDF5 cannot change a
    dataset's chunks, so appends, ``add`` and resumed builds write into the
    shapes the column was created with, however far the bank grows past
    what was expected.
    """
    kind = storage_kind(storage)
    group = f.require_group(path)
    for name in (DATA, REFS, SHAPE):  # left by a crash before the column was marked complete
        if name in group:
            del group[name]
    options = dict(options)
    row_shape = sample.shape[1:]
    sources = max(1, sources)
    rows_per_table = table_rows(max(expected, n_sources + sources))
    chunks = options.pop("chunks", None)
    if chunks in (None, True):
        row_bytes = max(1, math.prod(row_shape) * sample.dtype.itemsize)
        target = data_chunk_bytes(sample.nbytes / sources, max(planned, sources), chunk_bytes)
        rows = kind.chunk_rows(max(1, target // row_bytes), rows_per_table)
        if precompressed(storage, options, sample[:1].nbytes):
            rows = 1  # a chunk per source, compressed by the decode tasks
        chunks = (rows, *row_shape)
    data = group.create_dataset(
        DATA,
        shape=(0, *row_shape),
        maxshape=(None, *row_shape),
        dtype=sample.dtype,
        chunks=tuple(chunks),
        **options,
    )
    refs = group.create_dataset(
        REFS,
        shape=(n_sources, 2),
        maxshape=(None, 2),
        dtype="i8",
        chunks=(rows_per_table, 2),
        fillvalue=-1,
    )
    shape = None
    if kind.has_shape_table:
        shape = group.create_dataset(
            SHAPE,
            shape=(n_sources, 1),
            maxshape=(None, None),
            dtype="i8",
            chunks=(rows_per_table, 4),
            fillvalue=-1,
        )
    if kind.has_names:
        group.attrs[ATTR_NAMES] = np.array([], dtype=_STR)
    group.attrs[ATTR_FEATURE] = feature_class
    for key, value in attrs.items():
        if value is not None:
            group.attrs[key] = _attribute(value)
    group.attrs[ATTR_STORAGE] = storage  # last: marks the column complete
    return Column(path, storage, group, data, refs, shape)


def data_chunk_bytes(source_bytes: float, planned: int, chunk_bytes: int) -> int:
    """Target bytes of a data chunk h5bank picks for a column expected to hold ``planned``
    sources of ``source_bytes`` each.

    A sixteenth of those bytes, rounded down to a power of two, from
    :data:`MIN_CHUNK_BYTES` to ``chunk_bytes``: a small bank wastes at most
    a sixteenth of a column in its last chunk, and a column of ``16 x
    chunk_bytes`` or more gets chunks of exactly ``chunk_bytes``.
    """
    sixteenth = int(source_bytes * max(1, planned)) // 16
    if sixteenth >= chunk_bytes:
        return chunk_bytes
    target = 1 << (sixteenth.bit_length() - 1) if sixteenth else 1
    return min(chunk_bytes, max(MIN_CHUNK_BYTES, target))


def _attribute(value: Any) -> Any:
    """``value`` as an HDF5 attribute: lists of numbers or strings as arrays, dicts as JSON."""
    if isinstance(value, (list, tuple)):
        array = np.asarray(value)
        if array.dtype.kind in "iufb":
            return array
        if array.dtype.kind == "U":
            return array.astype(_STR)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return value


def category_names(column: Column) -> list[str]:
    names = column.group.attrs.get(ATTR_NAMES)
    return [] if names is None else [str(n) for n in np.atleast_1d(names)]


def set_category_names(column: Column, names: list[str]) -> None:
    column.group.attrs[ATTR_NAMES] = np.array(names, dtype=_STR)


SORTED_CODES = "data.sorted"  # a category column's renumbered codes, until they replace data


def renumber_category(column: Column, order: list[str]) -> Column:
    """Renumber a category column's codes so that its names become ``order``; crash-safe.

    The new codes are written to a second dataset that carries the new names;
    only when it is complete does it replace ``data`` (delete, then move), and
    the names move to the group last. :func:`recover_renumbering` finishes or
    drops an interrupted renumbering, so codes and names never disagree.
    """
    position = {name: code for code, name in enumerate(order)}
    remap = np.array([position[name] for name in category_names(column)], dtype=np.int64)
    group, old = column.group, column.data
    if SORTED_CODES in group:
        del group[SORTED_CODES]
    space = h5py.h5s.create_simple(old.shape, (h5py.h5s.UNLIMITED,))
    new = h5py.Dataset(
        h5py.h5d.create(
            group.id, SORTED_CODES.encode(), old.id.get_type(), space, old.id.get_create_plist()
        )
    )
    step = 1 << 20
    for start in range(0, old.shape[0], step):
        new[start : start + step] = remap[old[start : start + step]]
    new.attrs[ATTR_NAMES] = np.array(order, dtype=_STR)
    group.file.flush()
    del group[DATA]
    group.move(SORTED_CODES, DATA)
    adopt_names(group)
    group.file.flush()
    return Column.open(group.file, column.path)


def adopt_names(group: h5py.Group) -> None:
    data = group[DATA]
    if ATTR_NAMES in data.attrs:
        group.attrs[ATTR_NAMES] = data.attrs[ATTR_NAMES]
        del data.attrs[ATTR_NAMES]


def recover_renumbering(f: h5py.File) -> None:
    """Finish a label renumbering whose new codes replaced ``data``, or drop one that had not."""
    groups: list[h5py.Group] = []

    def visit(name: str, node: Any) -> None:
        storage = node.attrs.get(ATTR_STORAGE) if isinstance(node, h5py.Group) else None
        if storage is not None and storage_kind(str(storage)).has_names:
            groups.append(node)

    f.visititems(visit)
    for group in groups:
        if SORTED_CODES in group:
            if DATA in group:
                del group[SORTED_CODES]  # maybe incomplete; the old codes and names still agree
            else:
                group.move(SORTED_CODES, DATA)
        if DATA in group:
            adopt_names(group)


def resize_sources(column: Column, n: int) -> None:
    """Give ``refs`` (and ``shape``) exactly ``n`` rows; new rows read ``-1``."""
    column.refs.resize((n, 2))
    if column.shape is not None:
        column.shape.resize((n, column.shape.shape[1]))


def write_shapes(column: Column, rows: np.ndarray, shapes: list[tuple[int, ...]]) -> None:
    """Record each source's shape (``rows`` index the sources) in the ``-1``-padded shape table."""
    assert column.shape is not None
    width = max([len(s) for s in shapes] + [column.shape.shape[1]])
    if width > column.shape.shape[1]:
        column.shape.resize((column.shape.shape[0], width))
    table = np.full((len(shapes), width), -1, dtype="i8")
    for i, shape in enumerate(shapes):
        table[i, : len(shape)] = shape
    _write_rows(column.shape, rows, table)


def write_refs(column: Column, rows: np.ndarray, refs: np.ndarray) -> None:
    _write_rows(column.refs, rows, refs)


def _write_rows(dataset: h5py.Dataset, rows: np.ndarray, values: np.ndarray) -> None:
    if len(rows) == 0:
        return
    start, stop = int(rows[0]), int(rows[-1]) + 1
    if stop - start == len(rows):  # contiguous: one write
        dataset[start:stop] = values
    else:  # rows are sorted: one read and one write of the range they span
        block = dataset[start:stop]
        block[rows - start] = values
        dataset[start:stop] = block


def stored_shape(column: Column, row: int) -> tuple[int, ...]:
    assert column.shape is not None
    return _trimmed(column.shape[row])


def stored_shapes(column: Column, rows: Sequence[int]) -> list[tuple[int, ...]]:
    """:func:`stored_shape` of each of ``rows``, the shape table read once for them all."""
    assert column.shape is not None
    return [_trimmed(row) for row in take_rows(column.shape, rows)]


def _trimmed(row: Any) -> tuple[int, ...]:
    """A shape table row as a shape (its unused trailing entries are negative)."""
    return tuple(int(s) for s in row if s >= 0)


# -- commit and truncate ----------------------------------------------------


def consistent(f: h5py.File) -> bool:
    """Whether every table agrees with the id table (cheap: lengths only, no data read).

    Rows a crashed commit appended past the last ref are not detected: they
    are unreferenced, and only :func:`truncate` (run when a build resumes)
    reclaims them.
    """
    n = ids_table(f).shape[0]
    if committed(f) != n:
        return False
    for path in iter_columns(f):
        column = Column.open(f, path)
        if column.refs.shape[0] != n or (column.shape is not None and column.shape.shape[0] != n):
            return False
        if column.kind.has_names and SORTED_CODES in column.group:
            return False
    lengths = {t.shape[0] for t in failure_tables(f)}
    return len(lengths) == 1 and _committed_failures(f) in lengths


def committed(f: h5py.File) -> int:
    """How many sources the bank commits: ``h5bank_committed``, at most the id table's rows."""
    rows = ids_table(f).shape[0]
    counter = f.attrs.get(ATTR_COMMITTED)
    return rows if counter is None else min(rows, int(counter))


def mark_committed(f: h5py.File, sources: int | None = None, failures: int | None = None) -> None:
    """Record the id and failure tables' lengths as committed (after a flush; flush after).

    A writer that knows them (it wrote them) passes them: the tables are not looked up.
    """
    if sources is None:
        sources = ids_table(f).shape[0]
    if failures is None:
        failures = min(t.shape[0] for t in failure_tables(f))
    counts = {ATTR_COMMITTED: np.int64(sources), ATTR_FAILURES_COMMITTED: np.int64(failures)}
    for name, value in counts.items():
        if name in f.attrs:
            f.attrs.modify(name, value)  # in place: the root header keeps its size
        else:
            f.attrs[name] = value


def _committed_failures(f: h5py.File) -> int:
    for field in FAILURE_FIELDS:  # a rebuild killed between unlink and rename
        name = f"{FAILURES}/{field}"
        if name not in f and f"{name}__rebuilt" in f:
            f.move(f"{name}__rebuilt", name)
    shortest = min(t.shape[0] for t in failure_tables(f))
    counter = f.attrs.get(ATTR_FAILURES_COMMITTED)
    return shortest if counter is None else min(shortest, int(counter))


def truncate(f: h5py.File, rebuild: bool = False, sync: Any = None) -> int:
    """Cut every table back to what the bank commits; return the number of sources.

    The id table is cut to :func:`committed`; refs and shape tables get
    exactly one row per committed id; ``data`` is cut after the last row a
    committed ref points to (rows a crashed commit appended are dropped);
    the failure tables are cut to the failures committed. With ``rebuild``
    (resuming a build that was killed), the string tables are rewritten in
    fresh storage (:func:`rebuild_string_table`).
    """
    recover_renumbering(f)
    if rebuild and IDS not in f and f"{IDS}__rebuilt" in f:
        f.move(f"{IDS}__rebuilt", IDS)  # a rebuild killed between unlink and rename
    n = committed(f)
    if rebuild:
        rebuild_string_table(f, IDS, n, sync)
    elif ids_table(f).shape[0] > n:
        ids_table(f).resize((n,))
    for path in iter_columns(f):
        column = Column.open(f, path)
        resize_sources(column, n)
        stops = column.refs[:, 1] if n else np.zeros(0, dtype="i8")
        end = int(stops.max()) if stops.size and stops.max() > 0 else 0
        if column.data.shape[0] > end:
            column.data.resize(end, axis=0)
    kept = _committed_failures(f)
    for field in FAILURE_FIELDS:
        if rebuild:
            rebuild_string_table(f, f"{FAILURES}/{field}", kept, sync)
        else:
            f[f"{FAILURES}/{field}"].resize((kept,))
    mark_committed(f)
    return n


def storage_bytes(node: h5py.Group | h5py.Dataset) -> int:
    """Bytes a dataset, or every dataset below a group, takes in the file (a sharded bank's
    virtual data: the bytes it maps)."""
    if isinstance(node, h5py.Dataset):
        return _stored(node)
    total = 0

    def visit(_: str, child: Any) -> None:
        nonlocal total
        if isinstance(child, h5py.Dataset):
            total += _stored(child)

    node.visititems(visit)
    return total


def _stored(dataset: h5py.Dataset) -> int:
    if dataset.id.get_create_plist().get_layout() == h5py.h5d.VIRTUAL:
        return int(math.prod(dataset.shape)) * dataset.dtype.itemsize  # what its shards hold
    return int(dataset.id.get_storage_size())
