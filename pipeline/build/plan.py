"""Planning a build: the plan the writer chain carries, and sources cut into partitions."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from features.base import Feature
from pipeline.build.summary import Failure
from pipeline.errors import (
    DuplicateIdError,
    H5BankError,
)
from pipeline.format import layout
from pipeline.format.partial import partial_path
from pipeline.format.trust import table_problem
from pipeline.sources import SourceSpec, expand
from pipeline.urls import is_url, redact


@dataclass
class BuildPlan:
    """What every task of a build's writer chain needs; picklable and small."""

    token: str
    path: str
    mode: str
    features: dict[str, Feature]
    on_error: str
    provenance: dict[str, Any]
    chunk_bytes: int
    skipped: int = 0
    pinned: bool = False
    fsync: bool = True  # h5bank.build.fsync where the build was made
    # Sources the chain is planned to write (the sum of its partition sizes): a build's new
    # sources, a map's existing ones. The chunks of the tables and columns it creates are
    # sized for them (layout.create_column); 0: nothing planned, small chunks.
    planned: int = 0
    # A shard's chain: {"last": the last source id of its block}, recorded in the shard when
    # it is created (pipeline.format.shards); None for a bank of one file.
    block: dict[str, Any] | None = None


class Partition:
    """The sources of one decode task, held compactly, and sources of it already known to fail.

    A build's graph holds every source spec, and a running cluster holds it
    twice more (the pickled graph, the scheduler's copy). As
    :class:`SourceSpec` objects 200,000 sources cost the client 250 MB. So a
    partition keeps each URL as a flag when it is the partition's ``root``
    followed by the id (a file found under a directory or glob, an explicit
    path) or ``None`` (a plain id), else as text of its own; and ids, URLs
    and flags as one zlib-compressed block (sorted ids share most of their
    characters): a few bytes a source, unpacked by the decode task.

    A plain class, not a dataclass: Dask walks dataclass arguments of tasks
    looking for collections.
    """

    __slots__ = ("_blob", "_n", "_root", "failures", "index")

    _NONE, _UNDER_ROOT, _OWN = 0, 1, 2  # how a source's URL is kept

    def __init__(
        self, index: int, specs: Iterable[SourceSpec] = (), failures: list[Failure] | None = None
    ):
        self.index = index
        self.failures = failures if failures is not None else []
        specs = list(specs)
        root = next(
            (s.url[: len(s.url) - len(s.id)] for s in specs if s.url and s.url.endswith(s.id)), ""
        )
        kinds = [
            self._NONE if s.url is None else self._UNDER_ROOT if s.url == root + s.id else self._OWN
            for s in specs
        ]
        own = [s.url for s, kind in zip(specs, kinds, strict=True) if kind == self._OWN]
        ids = [s.id for s in specs]
        self._n, self._root = len(specs), root
        self._blob = zlib.compress(
            np.array(kinds, np.uint8).tobytes()
            + np.array([len(t) for t in ids + own], "<u4").tobytes()  # type: ignore[operator]
            + "".join(ids + own).encode("utf-8", "surrogatepass"),  # type: ignore[operator]
            1,
        )

    @property
    def specs(self) -> list[SourceSpec]:
        """The sources, as :class:`SourceSpec`, in order."""
        raw = zlib.decompress(self._blob)
        n = self._n
        kinds = np.frombuffer(raw, np.uint8, n).tolist()
        texts = n + kinds.count(self._OWN)
        bounds = [0, *np.cumsum(np.frombuffer(raw, "<u4", texts, offset=n)).tolist()]
        text = raw[n + 4 * texts :].decode("utf-8", "surrogatepass")
        pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
        urls = iter(pieces[n:])
        return [
            SourceSpec(
                id_,
                None if kind == self._NONE else self._root + id_ if kind == self._UNDER_ROOT else next(urls),
            )
            for id_, kind in zip(pieces[:n], kinds, strict=True)
        ]  # fmt: skip

    def __len__(self) -> int:
        return self._n + len(self.failures)


def committed_ids(path: str) -> set[str]:
    """Ids already in the bank at ``path`` (or its partial file), if this process can see it.

    Only an optimisation (skip decoding what is there): the writer skips
    committed ids itself, so a bank only the writer can reach still appends
    correctly.
    """
    for candidate in (partial_path(path), path):
        if not os.path.exists(candidate):
            continue
        try:
            with h5py.File(candidate, "r") as f:
                if not layout.is_bank(f):
                    continue
                n = layout.committed(f)  # only what the bank commits: a killed commit wrote more
                if table_problem(f, layout.IDS, n):  # crafted or damaged: the writer decides
                    return set()
                return set(layout.read_strings(layout.ids_table(f), 0, n))
        except (OSError, H5BankError):
            continue
    return set()


def partition_sources(
    sources: Any,
    storage_options: Mapping[str, Any] | None,
    partition_size: int | None,
    threads: int,
    skip: set[str],
    reads_bytes: bool = True,
) -> tuple[list[Partition], int]:
    """Expand ``sources`` into partitions; return them and how many ids were skipped.

    The default size is at most 512 sources a task when sources are fetched,
    fewer when the first files are large (about ``PARTITION_BYTES`` of
    source bytes a task, so that the partitions waiting for the writer stay
    small). Each task and commit costs a few milliseconds whatever its size:
    20,000 PNGs of 64x64 built in 2.1-2.3 s in tasks of 256, 1.9-2.0 s in
    tasks of about 500, 1.8 s in tasks of 1,024, for 20-60 MB more memory.
    At most
    4,096 when no feature reads bytes (sources made from their ids cost
    microseconds each, and Dask's per-task cost would dominate: a million
    16-float sources went at 24,000/s in tasks of 256, 62,000/s in tasks of
    2,048). A list known up front is spread over at least 4 tasks per worker
    thread.

    Sources are listed once, lazily: only the first ``4 x threads x size``
    specs are held to choose the size, and partitions are compact
    (:class:`Partition`).

    Duplicate ids in a list known up front raise :class:`DuplicateIdError`
    before anything is built; in a stream, the later duplicate becomes a
    failure and the first one is kept.
    """
    known = isinstance(sources, (str, os.PathLike, list, tuple))
    specs = iter(expand(sources, storage_options))
    if partition_size is None:
        partition_size = PARTITION_SOURCES if reads_bytes else 4096
        head = list(itertools.islice(specs, 4 * max(threads, 1) * partition_size))
        if reads_bytes:
            partition_size = min(partition_size, _size_for_bytes(head))
        if known and len(head) < 4 * max(threads, 1) * partition_size:
            partition_size = max(1, math.ceil(len(head) / (4 * max(threads, 1))))
        specs = itertools.chain(head, specs)
        del head
    if partition_size < 1:
        raise ValueError(f"partition_size must be at least 1, got {partition_size}")
    skipped = 0
    partitions: list[Partition] = []
    hashes: list[np.ndarray] = []  # each partition's ids, hashed: duplicates are found at the end
    current: list[SourceSpec] = []
    for spec in specs:
        if spec.id in skip:
            skipped += 1
            continue
        current.append(spec)
        if len(current) >= partition_size:
            hashes.append(np.fromiter((hash(s.id) for s in current), np.int64, len(current)))
            partitions.append(Partition(len(partitions), current))
            current = []
    if current:
        hashes.append(np.fromiter((hash(s.id) for s in current), np.int64, len(current)))
        partitions.append(Partition(len(partitions), current))
    duplicates = _duplicates(partitions, hashes)
    if duplicates and known:
        shown = ", ".join(
            f"{later.id!r}"
            + (f" ({redact(first.url)} and {redact(later.url)})" if first.url and later.url else "")
            for _, later, first in duplicates[:10]
        )
        more = f" and {len(duplicates) - 10} more" if len(duplicates) > 10 else ""
        raise DuplicateIdError(
            f"{len(duplicates)} duplicate source ids, nothing was written: {shown}{more}. Files "
            "found under a directory or glob get ids relative to it, so two roots holding the same "
            "relative path collide; build them into separate banks, or list the files explicitly "
            "(an explicit path keeps the string as given for its id)"
        )
    if duplicates:
        _fail_duplicates(partitions, duplicates)
    return partitions, skipped


def _duplicates(
    partitions: list[Partition], hashes: list[np.ndarray]
) -> list[tuple[int, SourceSpec, SourceSpec]]:
    """Each source whose id an earlier one has: ``(position, it, the first)``, in source order.

    Ids are compared by hash (8 bytes a source, where a set of 200,000 ids
    held 30 MB); sources whose hashes agree are then compared by id.
    """
    flat = np.concatenate(hashes) if hashes else np.empty(0, np.int64)
    order = np.argsort(flat, kind="stable")
    same = np.flatnonzero(flat[order][1:] == flat[order][:-1])
    if not len(same):
        return []
    candidates = np.unique(np.concatenate([order[same], order[same + 1]]))
    starts = np.cumsum([0, *(len(h) for h in hashes)])
    where = np.searchsorted(starts, candidates, side="right") - 1
    specs: dict[int, SourceSpec] = {}
    for k in np.unique(where).tolist():
        listed = partitions[k].specs
        for position in candidates[where == k].tolist():
            specs[position] = listed[position - int(starts[k])]
    first: dict[str, SourceSpec] = {}
    found = []
    for position in candidates.tolist():
        spec = specs[position]
        if spec.id in first:
            found.append((position, spec, first[spec.id]))
        else:
            first[spec.id] = spec
    return found


def _fail_duplicates(
    partitions: list[Partition], duplicates: list[tuple[int, SourceSpec, SourceSpec]]
) -> None:
    """Replace each later duplicate of a stream by a failure in its partition; keep the first."""
    starts = np.cumsum([0, *(len(p) for p in partitions)])
    by_partition: dict[int, dict[int, Failure]] = {}
    for position, later, first in duplicates:
        k = int(np.searchsorted(starts, position, side="right") - 1)
        which = f" ({redact(first.url)})" if first.url else ""
        by_partition.setdefault(k, {})[position - int(starts[k])] = Failure(
            later.id,
            "",
            f"DuplicateIdError: an earlier source of this build{which} has the same id; the "
            "first one is kept" + (f", this one ({redact(later.url)}) is not" if later.url else ""),
        )
    for k, failed in by_partition.items():
        listed = partitions[k].specs
        kept = [spec for j, spec in enumerate(listed) if j not in failed]
        partitions[k] = Partition(k, kept, list(failed.values()))


# Sources a decode task holds at most, by default, when its sources are fetched.
PARTITION_SOURCES = 512


# Source bytes a decode task aims at when the default partition size is chosen: the decoded
# partitions waiting for the writer (2 per worker thread) stay tens of MB even for large images.
# A compressed image decodes to 1.5-3x its bytes, held twice while a task packs it: on 2
# cores, 4 MiB took a threaded build's peak memory to 192-198 MB for 2,000 ragged PNGs and
# 224-247 MB for 5,000 JPEGs to 224 px, 2 MiB to 161-165 and 172-175 MB at the same rates.
PARTITION_BYTES = 2 << 20


def _size_for_bytes(head: list[SourceSpec], sample: int = 32) -> int:
    """Sources a partition of about ``PARTITION_BYTES`` holds, from the sizes of up to ``sample``
    local files among the first sources (any number when none is a local file)."""
    sizes = []
    for spec in head:
        if len(sizes) >= sample:
            break
        if spec.url and not is_url(spec.url):
            with contextlib.suppress(OSError):
                sizes.append(os.stat(spec.url).st_size)
    if not sizes:
        return 1 << 62
    return max(16, PARTITION_BYTES * len(sizes) // max(1, sum(sizes)))


def describe_sources(sources: Any, limit: int = 50) -> Any:
    """The source specification recorded in the bank's provenance, credentials removed.

    What the build was given, so that a reader sees what it was built from and
    its builder can build it again, without what the bank should not carry
    away from the machine it was built on: URLs lose their credentials
    (:func:`~pipeline.urls.redact`), and local paths the folders above them.
    A path under the current directory is recorded relative to it, as given
    (``photos/``, ``data/**/*.png``), as a build config's relative paths are;
    any other local path from the folder or file given on
    (``/home/alice/photos/**/*.png`` as ``.../photos/**/*.png``). A listed
    source (:class:`SourceSpec`) found under a folder is recorded as that
    folder and its id (``.../photos/cats/01.png``). Plain ids are kept.
    """
    if isinstance(sources, (str, os.PathLike)):
        return [_recorded(os.fspath(sources))]
    if isinstance(sources, (list, tuple)):
        shown = [
            _recorded_spec(s) if isinstance(s, SourceSpec) else _recorded(os.fspath(s))
            for s in sources[:limit]
            if isinstance(s, (str, os.PathLike, SourceSpec))
        ]
        if len(sources) > limit:
            shown.append(f"... and {len(sources) - limit} more")
        return shown
    return f"<{type(sources).__name__} streamed>"


def _recorded_spec(spec: SourceSpec) -> str:
    if spec.url is None:
        return spec.id  # a plain id
    if is_url(spec.url):
        return redact(spec.url)
    # A file found under a folder: its URL is the folder's path followed by its id.
    folder = spec.url[: len(spec.url) - len(spec.id)]
    if spec.id and spec.url.endswith(spec.id) and folder.endswith(("/", os.sep)):
        return _local(folder) + spec.id
    return _local(spec.url)


def _recorded(text: str) -> str:
    """A source string as provenance records it: a URL redacted, a local path or glob without
    the folders above it, a plain id (neither) as given."""
    if is_url(text):
        return redact(text)
    expanded = os.path.expanduser(text)
    if not (os.path.lexists(expanded) or any(c in expanded for c in "*?[")):
        return text  # a plain id
    return _local(text)


def _local(text: str) -> str:
    """A local path or glob relative to the current directory when it is under it, else from
    the last folder (or the file) before any wildcard on, as ``.../photos/**/*.png``."""
    expanded = os.path.expanduser(text)
    parts = expanded.replace(os.sep, "/").split("/")
    if not os.path.isabs(expanded) and ".." not in parts:
        return text  # relative to the current directory, as given
    absolute = os.path.abspath(expanded)
    here = os.getcwd()
    if absolute == here:
        return "."
    if absolute.startswith(here.rstrip(os.sep) + os.sep):
        relative = os.path.relpath(absolute, here).replace(os.sep, "/")
        return relative + ("/" if text.endswith(("/", os.sep)) else "")
    parts = absolute.replace(os.sep, "/").split("/")
    wild = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
    if wild <= 2:
        return absolute.replace(os.sep, "/")  # "/", "/data": no folder above it to hide
    kept = "/".join(parts[wild - 1 :])
    return f".../{kept}" + ("/" if text.endswith(("/", os.sep)) and wild == len(parts) else "")
