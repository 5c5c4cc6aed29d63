"""What a bank file may make h5bank do: which pointers out of the file it may follow, and
which declared sizes it must back with stored bytes.

Banks are shared (downloaded from a bucket, passed between labs), so a bank is
untrusted input. HDF5 follows three kinds of pointers out of a file on its
own: external links (a path in the file names an object of another file),
external raw storage (a dataset's bytes live in another file, ``/etc/passwd``
as well as any) and virtual datasets (a dataset maps regions of datasets of
other files). A crafted bank could so make ``get()`` return another file's
bytes, or make ``h5bank info`` open a FIFO and hang. :func:`check_file`
refuses such a file when it is opened, before anything is read through a
pointer; the one thing a bank may point to is its own shard files: files
named in its root attribute :data:`~pipeline.format.layout.ATTR_SHARDS`,
plain names (no folder, no ``%`` substitution), so they resolve inside the
bank's own folder. ``allow_external=True`` (CLI: ``--allow-external``) lets
a caller who trusts a file follow its pointers anyway.

HDF5 also takes a file's word for its sizes: a dataset of 2^31 rows costs a
few hundred bytes of header when no chunk of it was ever written, and reading
it allocates the whole declared extent. h5bank writes every row of an id
table, a failure table and a ``data`` dataset, so a bank whose such dataset
declares more than its stored chunks can hold is damaged or crafted:
:func:`check_file` refuses it with the dataset and the numbers, before a
reader allocates anything. Chunks larger than :data:`MAX_CHUNK_BYTES` (HDF5
decompresses a chunk whole) and attributes declaring more than they store
are refused the same way. ``refs`` and ``shape`` tables may hold chunks never
written (they read ``-1``); readers read only their committed rows, which the
id table bounds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import NamedTuple

import h5py

from pipeline.errors import DamagedBankError, UnsafeBankError
from pipeline.format import layout

__all__ = [
    "MAX_CHUNK_BYTES",
    "Pointer",
    "attribute_problems",
    "check_file",
    "declared_problems",
    "outside_pointers",
    "own_shard",
    "table_problem",
]

# The largest chunk h5bank reads: HDF5 holds a chunk whole in memory to decompress it, and
# h5bank writes chunks of h5bank.build.chunk-bytes (1 MiB by default).
MAX_CHUNK_BYTES = 256 << 20

# Bytes a data or failure table may declare past its stored chunks: the tail a killed append
# resized but did not write (it reads as zeros, or empty strings, and is cut by the next writer).
SLACK = 256 << 20

# HDF5 stores a variable-length string as a 16-byte descriptor in the dataset's chunks.
_VLEN_BYTES = 16


class Pointer(NamedTuple):
    """A pointer out of a file: where it is, what kind, and the file it names."""

    where: str
    kind: str  # "external link", "external storage" or "virtual dataset"
    target: str

    def __str__(self) -> str:
        if self.kind == "external storage":
            return f"{self.where} keeps its bytes in another file, {self.target} (external storage)"
        return (
            f"{self.where} is {'an' if self.kind[0] == 'e' else 'a'} {self.kind} to {self.target}"
        )


def _links(f: h5py.File) -> tuple[list[Pointer], list[str], list[str]]:
    """Walk ``f``'s links without following any: its pointers out, its hard-linked datasets,
    and its link cycles (a group linked inside itself, which a reader walking the tree
    would descend forever)."""
    found: list[Pointer] = []
    hard: list[str] = []

    def visit(name: str, link: h5py.HardLink | h5py.SoftLink | h5py.ExternalLink) -> None:
        # Nothing here calls HDF5: h5py does not survive an error raised inside its walk.
        if isinstance(link, h5py.ExternalLink):
            found.append(Pointer(f"/{name}", "external link", f"{link.filename}:{link.path}"))
        elif isinstance(link, h5py.HardLink):
            hard.append(name)

    f.visititems_links(visit)
    datasets: list[str] = []
    addresses = {"": h5py.h5o.get_info(f.id).addr}
    cycles = []
    for name in hard:  # parents come before children in HDF5's walk
        info = h5py.h5o.get_info(f.id, name.encode())  # no object opened: cheap
        if info.type == h5py.h5o.TYPE_DATASET:
            datasets.append(name)
        elif info.type == h5py.h5o.TYPE_GROUP:
            parts = name.split("/")
            if info.addr in {addresses.get("/".join(parts[:i])) for i in range(len(parts))}:
                cycles.append(f"/{name}")
            addresses[name] = info.addr
    return found, datasets, cycles


def _pointers(f: h5py.File, datasets: list[str]) -> Iterator[Pointer]:
    """Every pointer out of ``f`` held by its ``datasets`` (external storage, virtual)."""
    for name in datasets:
        plist = h5py.h5d.open(f.id, name.encode()).get_create_plist()
        for i in range(plist.get_external_count()):
            target = plist.get_external(i)[0]
            yield Pointer(f"/{name}", "external storage", _text(target))
        if plist.get_layout() == h5py.h5d.VIRTUAL:
            for i in range(plist.get_virtual_count()):
                target = _text(plist.get_virtual_filename(i))
                if target != ".":  # "." is this file
                    yield Pointer(f"/{name}", "virtual dataset", target)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def own_shard(f: h5py.File, target: str) -> bool:
    """Whether ``target`` (a pointer's file) is one of the bank's own shard files: named in
    its shard index, a plain file name (so it resolves in the bank's folder)."""
    name = target.partition(":")[0] if target.count(":") == 1 else target
    plain = (
        name
        and name == os.path.basename(name)
        and name not in (".", "..")
        and "%" not in name
        and "\\" not in name
    )
    return bool(plain) and name in layout.shard_names(f)


Walk = tuple[list[Pointer], list[str], list[str]]


def outside_pointers(f: h5py.File, walk: Walk | None = None) -> list[Pointer]:
    """The pointers of ``f`` to anything but its own shard files (external raw storage is
    never allowed: h5bank never writes it). ``walk``: what :func:`_links` found, if known."""
    links, datasets, _ = walk or _links(f)
    pointers = [*links, *_pointers(f, datasets)]
    return [p for p in pointers if p.kind == "external storage" or not own_shard(f, p.target)]


def _stored_chunks_problem(
    dataset: h5py.Dataset, rows: int, row_bytes: int, slack: int = 0
) -> str | None:
    """Why the first ``rows`` rows of ``dataset`` (a table h5bank writes whole) cannot be
    what it stores, or ``None``; ``slack`` bytes may be missing (a tail a killed append
    resized but did not write, which reads as zeros)."""
    shape, chunks = dataset.shape, dataset.chunks
    rows = min(rows, shape[0]) if shape else 0
    if not rows or not math.prod(shape[1:]):
        return None
    declared = f"{dataset.name} declares {rows:,} rows ({rows * row_bytes:,} bytes)"
    if chunks is None:
        plist = dataset.id.get_create_plist()
        if plist.get_layout() == h5py.h5d.COMPACT:
            return None  # held in the object header, which HDF5 has read whole
        if plist.get_layout() == h5py.h5d.VIRTUAL:  # a sharded bank's data: mapped, not stored
            mapped = sum(
                plist.get_virtual_vspace(i).get_select_npoints()
                for i in range(plist.get_virtual_count())
            )
            if mapped < rows * math.prod(shape[1:]):
                return f"{declared} but maps {mapped:,} elements of its shards"
            return None
        stored = dataset.id.get_storage_size()
        if stored + slack < rows * row_bytes:
            return f"{declared} but stores {stored:,} bytes"
        return None
    chunk_bytes = math.prod(chunks) * dataset.dtype.itemsize
    if chunk_bytes > MAX_CHUNK_BYTES:
        return (
            f"{dataset.name} has chunks of {chunk_bytes:,} bytes; h5bank reads chunks of at "
            f"most {MAX_CHUNK_BYTES:,}"
        )
    needed = -(-rows // chunks[0]) * math.prod(
        -(-n // c) for n, c in zip(shape[1:], chunks[1:], strict=True)
    )
    stored = dataset.id.get_num_chunks()
    if (needed - stored) * chunk_bytes > slack:
        return f"{declared} in {needed:,} chunks, but stores {stored:,} of them"
    return None


def attribute_problems(node: h5py.Group | h5py.Dataset) -> Iterator[str]:
    """Attributes declaring more elements than they store (HDF5 reads an attribute whole),
    or that h5py cannot read (a damaged type)."""
    for name in node.attrs:
        attribute = h5py.h5a.open(node.id, name.encode())
        elements = math.prod(attribute.shape) if attribute.shape else 1
        if elements > 1:
            itemsize = min(attribute.dtype.itemsize, _VLEN_BYTES)
            if elements * itemsize > attribute.get_storage_size():
                yield (
                    f"{node.name} attribute {name!r} declares {elements:,} elements but stores "
                    f"{attribute.get_storage_size():,} bytes"
                )
                continue
        try:
            node.attrs[name]
        except Exception as error:
            yield f"{node.name} attribute {name!r} cannot be read ({type(error).__name__}: {error})"


def table_problem(f: h5py.File, name: str, rows: int) -> str | None:
    """Why the first ``rows`` rows of string table ``name`` (ids, failures) cannot be read
    as stored in ``f`` (``None`` if they can): pointers out of the file, or rows declared
    but not stored. For a reader of that one table (planning a build from a partial file),
    not a whole file's check."""
    pointer = next(_pointers(f, [name]), None)
    return str(pointer) if pointer else _stored_chunks_problem(f[name], rows, _VLEN_BYTES)


def declared_problems(f: h5py.File, walk: Walk | None = None) -> Iterator[str]:
    """Sizes the bank ``f`` declares but does not store, first found first (see the module
    docstring), and link cycles; for a plain HDF5 file, only cycles and attributes."""
    cycles = (walk or _links(f))[2]
    if cycles:
        yield f"{cycles[0]} is a link to a group that holds it (a cycle)"
        return
    yield from attribute_problems(f)
    if not layout.is_bank(f):
        return
    ids = f.get(layout.IDS)
    if not isinstance(ids, h5py.Dataset) or ids.ndim != 1:
        yield f"{layout.IDS} is missing or not a table"
        return
    problem = _stored_chunks_problem(ids, layout.committed(f), _VLEN_BYTES)
    for table in layout.failure_tables(f):
        problem = problem or _stored_chunks_problem(table, table.shape[0], _VLEN_BYTES, 1 << 20)
    if problem:
        yield problem
    for path in layout.iter_columns(f):
        group = f[path]
        yield from attribute_problems(group)
        for name in (layout.DATA, layout.REFS):
            if group.get(name, getclass=True) is not h5py.Dataset:
                yield f"{group.name}/{name} is missing or not a dataset"
                return
        if layout.SHAPE in group and group.get(layout.SHAPE, getclass=True) is not h5py.Dataset:
            yield f"{group.name}/{layout.SHAPE} is not a dataset"
            return
        data = group[layout.DATA]
        if data.ndim:
            row = math.prod(data.shape[1:]) * data.dtype.itemsize
            problem = _stored_chunks_problem(data, data.shape[0], row, SLACK)
            if problem:
                yield problem
        for name in (layout.REFS, layout.SHAPE):
            table = group.get(name)
            if table is not None:
                if table.ndim != 2 or table.shape[1] > 32:
                    yield f"{table.name} has shape {table.shape}; h5bank writes (sources, 2) refs and (sources, at most 32) shapes"
                elif (
                    table.chunks
                    and math.prod(table.chunks) * table.dtype.itemsize > MAX_CHUNK_BYTES
                ):
                    yield f"{table.name} has chunks of {table.chunks}; too large to read"


def check_file(f: h5py.File, shown: str, allow_external: bool = False, sizes: bool = True) -> None:
    """Refuse ``f`` (shown as ``shown``) if it points out of itself (unless
    ``allow_external``) or, with ``sizes``, declares sizes it does not store (a
    writer resuming a stopped build skips this: it cuts what was not committed).

    Raises
    ------
    UnsafeBankError
        A pointer to another file: the dataset or link, and the file it names.
    DamagedBankError
        A declared size with no stored bytes behind it.
    """
    try:
        _check(f, shown, allow_external, sizes)
    except (UnsafeBankError, DamagedBankError):
        raise
    except Exception as error:  # HDF5 could not read the structure it was asked about
        if not sizes:
            raise  # a writer: the writer chain reads HDF5's error on a damaged partial file
        message = " ".join(str(error).split())
        raise DamagedBankError(
            f"{shown} is damaged: HDF5 cannot read its structure ({type(error).__name__}: "
            f"{message}). `h5bank verify {shown}` checks it"
        ) from None


def _check(f: h5py.File, shown: str, allow_external: bool, sizes: bool) -> None:
    walk = _links(f)
    if not allow_external:
        outside = outside_pointers(f, walk)
        if outside:
            more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
            raise UnsafeBankError(
                f"{shown}: {outside[0]}{more}. h5bank does not follow pointers out of a bank "
                "(a crafted or damaged file could read other files this way); if you trust "
                "this file, open it with allow_external=True (CLI: --allow-external)"
            )
    problem = next(declared_problems(f, walk), None) if sizes else None
    if problem is not None:
        raise DamagedBankError(
            f"{shown} is damaged or crafted: {problem}. Nothing was read from it; "
            f"`h5bank verify {shown}` lists what is wrong"
        )
