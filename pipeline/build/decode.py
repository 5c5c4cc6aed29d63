"""Decode tasks: turn a partition of sources into one packed result for the writer.

A decode task runs on any worker. For each source it runs every feature that
accepts it (and the features derived from those), checks that each returned
something storable, and lays it out for its storage kind (raveled for
``flat``, one leading axis for ``item``...). It then packs the partition: one
concatenated array per feature column, so the writer does one append per
column per partition and no CPU work beyond moving bytes.

A decode task never raises for a bad source (a failing ``load``, a failing
``accepts``, bytes that cannot be fetched): failures travel to the writer as
records, so the writer chain always runs and can close its file.
"""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from dask.sizeof import sizeof

from features.base import Feature
from pipeline.build.plan import Partition
from pipeline.build.summary import Failure
from pipeline.errors import FeatureTypeError, SourceError
from pipeline.files.cache import LazyFile
from pipeline.format import layout
from pipeline.format.filters import FilteredRows, filter_rows, precompressed
from pipeline.format.storage import StorageKind
from pipeline.format.storage import kind as storage_kind
from pipeline.read.records import ColumnSpec, RawRows, decode_rows, read_rows_lazily
from pipeline.schema import feature_for_value, owner_path
from pipeline.sources import Source, fetch, route

# Sources whose bytes are fetched (and held) together; bounds a task's memory
# for large files while still batching remote requests.
FETCH_BATCH = 64


@dataclass
class PackedColumn:
    """One column's data for the sources of a partition that have some.

    ``rows[j]`` is the position (in ``Packed.ids``) of the source whose data is
    entry ``j``, ``lengths[j]`` its number of rows (elements for ``flat``,
    bytes for ``bytes``). ``data`` is one concatenated array when every entry
    agrees in trailing shape and dtype, else the list of entries (the writer
    checks each); names for ``category``.
    """

    feature: str
    storage: str
    rows: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    data: Any = None
    shapes: list[tuple[int, ...]] | None = None
    filtered: FilteredRows | None = None  # each entry's row compressed (precompressed)

    @property
    def kind(self) -> StorageKind:
        """The column's storage kind: how its entries are packed, checked and appended."""
        return storage_kind(self.storage)


@dataclass
class Packed:
    """A decoded partition: the sources to commit, their columns, and the failures.

    ``features`` names features the writer may not know yet (the output of a
    ``bank.map`` whose feature was chosen from its first result).
    """

    index: int
    ids: list[str]
    columns: dict[str, PackedColumn]
    failures: list[Failure]
    features: dict[str, Feature] = field(default_factory=dict)


@sizeof.register(Packed)
def _packed_bytes(packed: Packed) -> int:
    """What a decoded partition weighs, for Dask's memory manager (spill, pause) and transfer
    costs: without it Dask counted a partition of 250 images (3 MB) as a few hundred bytes."""
    total = sizeof(packed.ids) + sizeof(packed.failures)
    for column in packed.columns.values():
        total += sizeof(column.data) + 16 * len(column.rows)
        total += sum(len(chunk) for chunk in column.filtered.chunks) if column.filtered else 0
    return total


def decode_partition(
    partition: Partition,
    features: Mapping[str, Feature],
    bases: Mapping[str, str],
    storage_options: Mapping[str, Any] | None = None,
    after: Any = None,
    fetch_settings: Mapping[str, Any] | None = None,
) -> Packed:
    """Decode every source of ``partition`` with ``features`` (ordered, bases first).

    ``bases`` maps each derived feature's path to the path it derives from.
    ``after`` is only a dependency: the writer task this decode must wait for
    (back-pressure); its value is ignored. ``fetch_settings`` are the
    ``h5bank.fetch`` settings where the build was made (workers of a running
    cluster do not see the client's ``dask.config.set``).
    """
    ids: list[str] = []
    values: list[dict[str, Any]] = []
    failures = list(partition.failures)
    specs = partition.specs
    for start in range(0, len(specs), FETCH_BATCH):
        batch = [Source(spec, storage_options) for spec in specs[start : start + FETCH_BATCH]]
        routes = [_route(features, source.id) for source in batch]
        wanted = [
            source
            for source, paths in zip(batch, routes, strict=True)
            if source.url is not None
            and isinstance(paths, list)
            and any(features[p].reads_bytes for p in paths)
        ]
        fetch(wanted, storage_options, fetch_settings)
        for source, paths in zip(batch, routes, strict=True):
            outcome = (
                paths if isinstance(paths, Failure) else load_source(source, features, bases, paths)
            )
            if isinstance(outcome, Failure):
                failures.append(outcome)
            else:
                ids.append(source.id)
                values.append(outcome)
        del batch, wanted
    return pack(partition.index, ids, values, features, failures)


def apply_function(
    func: Any, records: list[tuple[str, Any]], feature: str = "", on_error: str = "skip"
) -> tuple[list[tuple[str, Any]], list[Failure]]:
    """``func(data)`` for each ``(id, data)``: the results, and a failure for each call that raised.

    ``feature`` is what failures name (the output of ``bank.map``, if any);
    with ``on_error="raise"`` the first failing call raises ``SourceError``.
    """
    name = _name(func)
    results: list[tuple[str, Any]] = []
    failures: list[Failure] = []
    for id_, data in records:
        try:
            results.append((id_, func(data)))
        except Exception as error:
            failure = Failure(id_, feature, f"{type(error).__name__} in {name}(): {error}")
            if on_error == "raise":
                raise SourceError(failure.id, failure.feature, failure.error) from error
            failures.append(failure)
    return results, failures


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or type(func).__name__


def map_rows(
    func: Any, lazy: LazyFile, columns: list[ColumnSpec], rows: Any, on_error: str = "skip"
) -> tuple[list[tuple[str, Any]], list[Failure]]:
    """A ``bank.map`` task without an output: read the sources at ``rows`` and call ``func``."""
    return apply_function(func, read_rows_lazily(lazy, columns, rows), on_error=on_error)


def map_partition(
    func: Any,
    columns: list[ColumnSpec],
    raw: RawRows | None,
    output: str,
    feature: Feature | None,
    index: int,
) -> Packed:
    """A ``bank.map`` task with an output: decode the inputs, run ``func``, pack the results.

    Without ``feature``, the first result chooses one (``Array`` for arrays,
    ``String`` for text, ``Bytes`` for bytes) and the writer registers it (a
    partition whose results chose another storage fails in the writer). A
    result of ``None`` means no data for that source.
    """
    results, failures = apply_function(func, decode_rows(columns, raw), output)
    producer = f"{_name(func)}()"
    ids: list[str] = []
    values: list[dict[str, Any]] = []
    for id_, result in results:
        if result is None:
            continue
        try:
            chosen = feature if feature is not None else feature_for_value(result)
            values.append(to_stored(result, chosen.storage, output, producer=producer))
        except (FeatureTypeError, TypeError, ValueError) as error:
            failures.append(Failure(id_, output, f"{type(error).__name__}: {error}"))
            continue
        feature = chosen
        ids.append(id_)
    features = {output: feature} if feature is not None else {}
    packed = pack(index, ids, values, features, failures)
    packed.features = features
    return packed


def _route(features: Mapping[str, Feature], source_id: str) -> list[str] | Failure:
    try:
        paths = route(features, source_id)
    except Exception as error:  # a feature's accepts() itself failed
        return Failure(source_id, "", f"{type(error).__name__} while choosing features: {error}")
    return paths or Failure(source_id, "", _unmatched(features))


def load_source(
    source: Any, features: Mapping[str, Feature], bases: Mapping[str, str], paths: list[str]
) -> dict[str, Any] | Failure:
    """Run the accepting features (then their derived ones) on one source.

    Returns the stored layout of each column (``{column path: entry}``) or the
    first failure.
    """
    raw: dict[str, Any] = {}
    stored: dict[str, Any] = {}
    accepted = set(paths)
    for path, feature in features.items():
        base = bases.get(path)
        if base is None and path not in accepted:
            continue
        if base is not None and raw.get(base) is None:
            continue
        try:
            given = features[base].as_read(raw[base]) if base is not None else source
            output = feature.load(given)
            raw[path] = output
            stored.update(to_stored(output, feature.storage, path, type(feature).__name__))
        except Exception as error:
            return Failure(source.id, path, f"{type(error).__name__}: {error}")
    if not stored:
        return Failure(
            source.id, "", f"no feature produced data for it (accepted by {', '.join(paths)})"
        )
    return stored


def to_stored(
    value: Any, storage: str, path: str, feature_name: str = "", producer: str | None = None
) -> dict[str, Any]:
    """``{column path: entry}`` for one feature output, laid out for ``storage``.

    An entry is an array whose axis 0 is what gets concatenated (plus its
    original shape for ``flat``), or a name for ``category``. A dict output
    gets one column per key. Raises :class:`FeatureTypeError` for anything
    the bank cannot store; ``producer`` names what returned ``value`` in that
    error (default ``"<feature_name>.load()"``).
    """
    producer = producer or f"{feature_name}.load()"
    if value is None:
        return {}
    kind = storage_kind(storage)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            problem = (
                "it is not a str"
                if not isinstance(key, str)
                else ("it holds '/'" if "/" in key else layout.column_path_problem(key))
            )
            if problem:
                raise FeatureTypeError(
                    f"load() returned a dict with key {key!r}: {problem}; keys must be plain names"
                )
            if item is not None:
                out[posixpath.join(path, key)] = kind.entry(item, producer)
        return out
    return {path: kind.entry(value, producer)}


def pack(
    index: int,
    ids: list[str],
    values: list[dict[str, Any]],
    features: Mapping[str, Feature],
    failures: list[Failure],
) -> Packed:
    """Gather the entries of ``values`` (one dict per id) into one column each."""
    columns: dict[str, PackedColumn] = {}
    pieces: dict[str, list[Any]] = {}
    for row, entries in enumerate(values):
        for key, entry in entries.items():
            column = columns.get(key)
            if column is None:
                feature = owner_path(key, features)
                column = columns[key] = PackedColumn(feature, features[feature].storage)
                if column.kind.has_shape_table:
                    column.shapes = []
                pieces[key] = []
            piece, length, shape = column.kind.part(entry)
            column.rows.append(row)
            column.lengths.append(length)
            pieces[key].append(piece)
            if column.shapes is not None:
                column.shapes.append(shape)
    for key, column in columns.items():
        column.data = column.kind.concatenate(pieces[key])
        if isinstance(column.data, np.ndarray) and len(column.data):
            options = features[column.feature].dataset_options
            if precompressed(column.storage, options, column.data[0].nbytes):
                # Compressed here, on every worker, not in the single writer. Only a speed-up:
                # if it fails (a filter this worker lacks), the writer filters the rows.
                with contextlib.suppress(Exception):
                    column.filtered = filter_rows(column.data, options)
    return Packed(index, ids, columns, failures)


def _unmatched(features: Mapping[str, Feature]) -> str:
    patterns = [
        f"{path} {feature.__re__!r}"
        for path, feature in features.items()
        if feature.derived_from is None
    ]
    shown = ", ".join(patterns[:6]) + (" ..." if len(patterns) > 6 else "")
    return f"no feature accepts this source (features and the patterns searched in ids: {shown})"
