"""Batches of rows: ``RowsDataset.read_rows`` (rows read at their chunk's byte offset),
``take_rows`` (any order, repeats, negatives; small spans read as one slice) and
dense columns (source ``i`` is row ``i``: a batch reads no refs).

Datasets are made here with h5py, their chunks written in a shuffled order so that
chunks next to each other in the dataset are not next to each other in the file (a run
of rows read across a chunk's edge as one read would come back wrong), then reopened
read-only and opened with ``open_dataset`` as a bank's item column is. What
comes back is compared with plain h5py reading one row at a time.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_images

from features import DirLabels, Image
from pipeline import TypedFile
from pipeline.format.rows import (
    SPAN_BYTES,
    RowsDataset,
    absolute_rows,
    open_dataset,
    read_spans,
    take_rows,
)


class Big(TypedFile):
    """64x64 RGB rows of 12 KiB, read directly (85-row chunks in a big bank, smaller in a
    small one)."""

    images = Image(size=(64, 64), mode="RGB")
    labels = DirLabels()


class Evens(TypedFile):
    """Only sources whose file name ends in an even digit have an image."""

    images = Image(size=(64, 64), mode="RGB", pattern=r"[02468]\.png$")
    labels = DirLabels()


# -- helpers ------------------------------------------------------------------------------------


def write_dataset(path: Path, data: np.ndarray, chunks: tuple[int, ...], **file_options) -> None:
    """``data`` as dataset ``x`` of a new file, written a chunk's rows at a time in a
    shuffled order (so chunk ``k + 1`` is not right after chunk ``k`` in the file)."""
    per = chunks[0]
    starts = np.random.default_rng(3).permutation(range(0, len(data), per)).tolist()
    with h5py.File(path, "w", **file_options) as f:
        ds = f.create_dataset("x", shape=data.shape, dtype=data.dtype, chunks=chunks)
        for start in starts:
            ds[start : start + per] = data[start : start + per]
        zeros = (0,) * (data.ndim - 1)
        offsets = [ds.id.get_chunk_info_by_coord((s, *zeros)).byte_offset for s in sorted(starts)]
    assert offsets != sorted(offsets), "the chunks should be out of order in the file"


@contextlib.contextmanager
def reopened(path: Path):
    """``x`` of the file at ``path`` open read-only: as ``open_dataset`` gives it, and as
    plain h5py does (``f["x"]``, HDF5's chunk cache, h5py's selections)."""
    with h5py.File(path, "r") as f:
        yield open_dataset(f, "x"), f["x"]


def row_by_row(plain: h5py.Dataset, rows) -> np.ndarray:
    """``plain[i]`` for each of ``rows``, one h5py read per distinct row."""
    rows = [int(r) for r in np.asarray(rows).reshape(-1)]
    if not rows:
        return np.empty((0, *plain.shape[1:]), dtype=plain.dtype)
    read = {r: plain[r] for r in set(rows)}
    return np.stack([read[r] for r in rows])


def edge_rows(n: int, per: int) -> list[int]:
    """Rows on both sides of chunk edges, the first and last chunk, the last partial chunk."""
    last = (n - 1) // per * per
    rows = {0, 1, per - 1, per, per + 1, 2 * per - 1, 2 * per, last - 1, last, n - 2, n - 1}
    return sorted(r for r in rows if 0 <= r < n)


def batches(n: int, per: int, seed: int = 0) -> list[list[int]]:
    """Index lists of every kind a loader sends: random (with repeats and negative rows, in
    any order), chunk edges, a run crossing several chunks, the last partial chunk."""
    rng = np.random.default_rng(seed)
    edges = edge_rows(n, per)
    last = (n - 1) // per * per
    run = list(range(per - 3, min(n, 3 * per + 4)))  # crosses at least two chunk edges
    out = [
        edges,
        edges[::-1],
        [r - n for r in edges],  # the same rows counted from the end
        [*edges, *edges[:4], edges[2] - n],  # repeats, and one row twice by two names
        [0, *run, n - 1],
        [*run[::-1], *rng.integers(0, n, 5).tolist()],
        [*range(last, n), 0],  # the whole last partial chunk
        [n - 1],
        [-n],
    ]
    for size in (1, 5, 64, 300):
        out.append(rng.integers(-n, n, size).tolist())
    picked = rng.integers(0, n, 40).tolist()
    out.append(picked + picked[::3])  # certain repeats
    return out


def check_reads(ds: h5py.Dataset, plain: h5py.Dataset) -> None:
    """``take_rows`` and ``read_rows`` of ``ds`` give what h5py gives row by row."""
    n, per = ds.shape[0], ds.chunks[0]
    for rows in batches(n, per):
        expected = row_by_row(plain, absolute_rows(rows, n))
        got = take_rows(ds, rows)
        assert got.shape == expected.shape and got.dtype == ds.dtype
        np.testing.assert_array_equal(got, expected, err_msg=f"take_rows {rows[:12]}...")
        wanted = np.unique(absolute_rows(rows, n))
        np.testing.assert_array_equal(
            ds.read_rows(wanted), row_by_row(plain, wanted), err_msg=f"read_rows {wanted[:12]}"
        )
        check_spans(ds, plain, absolute_rows(rows, n).tolist())


def check_spans(ds: h5py.Dataset, plain: h5py.Dataset, starts: list[int]) -> None:
    """``read_spans`` (a batch of sources' rows in one array) gives h5py's slices one after
    the other, for spans from each of ``starts`` across chunk edges, empty ones, repeats."""
    n, per = ds.shape[0], ds.chunks[0]
    spans = [(a, min(n, a + (i % 3) * per // 2 + i % 2)) for i, a in enumerate(starts)]
    got, bounds = read_spans(ds, spans)
    assert got.dtype == ds.dtype and bounds[0] == 0 and len(bounds) == len(spans) + 1
    for (a, b), lo, hi in zip(spans, bounds[:-1], bounds[1:], strict=True):
        np.testing.assert_array_equal(got[lo:hi], plain[a:b], err_msg=f"read_spans {a}:{b}")
    assert bounds[-1] == len(got) == sum(b - a for a, b in spans)


def random_data(shape: tuple[int, ...], dtype, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    native = dtype.newbyteorder("=")
    info = np.iinfo(native)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=native).astype(dtype)


# -- RowsDataset and take_rows on datasets made here ------------------------------------------

SWAPPED_I4 = np.dtype("i4").newbyteorder("S")  # '>i4' on a little-endian machine

CASES = {
    # name: (dtype, row shape, rows a chunk, rows, read at offsets)
    "uint8-rgb": (np.uint8, (64, 64, 3), 85, 1000, True),
    "float32": (np.float32, (32, 32), 70, 1000, True),
    "int16": (np.int16, (128, 9), 120, 1000, True),
    "int64-1d": (np.int64, (), 32768, 300_000, True),  # chunks of exactly 256 KiB
    "swapped-int32": (SWAPPED_I4, (64, 64), 20, 1000, False),  # not native: through h5py
}


@pytest.mark.parametrize("case", list(CASES))
def test_take_rows_of_a_rows_dataset_equals_h5py_row_by_row(tmp_path, case):
    dtype, row_shape, per, n, direct = CASES[case]
    data = random_data((n, *row_shape), dtype)
    path = tmp_path / f"{case}.h5"
    write_dataset(path, data, (per, *row_shape))
    with reopened(path) as (ds, plain):
        assert isinstance(ds, RowsDataset)
        assert ds.dtype == np.dtype(dtype) and ds.chunks == (per, *row_shape)
        assert ds._direct() is direct
        np.testing.assert_array_equal(row_by_row(plain, [0, n - 1]), data[[0, -1]])
        check_reads(ds, plain)

        for nothing in ([], np.array([], dtype=np.int64), np.empty((0,), dtype=np.int32)):
            empty = take_rows(ds, nothing)
            assert empty.shape == (0, *row_shape) and empty.dtype == ds.dtype
        for bad, shown in (
            ([0, n], n),
            ([n + 5, 3], n + 5),
            ([-n - 1], -n - 1),
            ([2, -n - 9], -n - 9),
        ):
            with pytest.raises(IndexError, match=rf"row {shown} out of range for {n} rows"):
                take_rows(ds, bad)


def test_rows_of_chunks_never_written_are_the_fill_value(tmp_path):
    shape, per = (1000, 64, 64, 3), 85
    data = random_data(shape, np.uint8, seed=5)
    path = tmp_path / "sparse.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset(
            "x", shape=shape, dtype=np.uint8, chunks=(per, 64, 64, 3), fillvalue=7
        )
        ds[500:601] = data[500:601]  # chunks 5 (425-509), 6 and 7 (595-679), partly
        ds[0:85] = data[0:85]  # chunk 0
    expected = np.full(shape, 7, dtype=np.uint8)
    expected[0:85], expected[500:601] = data[0:85], data[500:601]
    with reopened(path) as (ds, plain):
        assert isinstance(ds, RowsDataset) and ds._direct()
        assert [ds._address(k) is not None for k in range(12)] == [
            True, False, False, False, False, True, True, True, False, False, False, False,
        ]  # fmt: skip
        edges = [0, 84, 85, 86, 200, 424, 425, 499, 500, 509, 510]  # chunk edges, written rows
        edges += [594, 595, 600, 601, 679, 680, 999]
        rng = np.random.default_rng(2)
        for rows in (
            edges,
            [*edges[::-1], -1, -500, -916],
            [*range(80, 90), 999],  # a run from a written chunk into one never written
            [*range(420, 430), *range(590, 690), 0],  # and from unwritten rows of written chunks
            rng.integers(-1000, 1000, 64).tolist(),
        ):
            got = take_rows(ds, rows)
            np.testing.assert_array_equal(got, expected[rows], err_msg=str(rows))
            np.testing.assert_array_equal(got, row_by_row(plain, absolute_rows(rows, 1000)))
            wanted = np.unique(absolute_rows(rows, 1000))
            np.testing.assert_array_equal(ds.read_rows(wanted), expected[wanted])


def test_chunks_that_do_not_span_whole_rows_are_read_through_h5py(tmp_path):
    data = random_data((1000, 64, 64, 3), np.uint8, seed=6)
    path = tmp_path / "halves.h5"
    write_dataset(path, data, (85, 32, 64, 3))  # each row is in two chunks
    with reopened(path) as (ds, plain):
        assert isinstance(ds, RowsDataset)  # large, unfiltered chunks
        assert ds._direct() is False
        check_reads(ds, plain)
        np.testing.assert_array_equal(take_rows(ds, [999, 84, 85, 0]), data[[999, 84, 85, 0]])


def test_a_file_with_a_user_block_is_read_through_h5py(tmp_path):
    data = random_data((1000, 64, 64, 3), np.uint8, seed=7)
    path = tmp_path / "userblock.h5"
    write_dataset(path, data, (85, 64, 64, 3), userblock_size=512)
    with reopened(path) as (ds, plain):
        assert ds.file.userblock_size == 512
        assert isinstance(ds, RowsDataset)
        assert ds._direct() is False
        check_reads(ds, plain)
        np.testing.assert_array_equal(take_rows(ds, [999, 84, 85, 0]), data[[999, 84, 85, 0]])


# -- the direct reads themselves --------------------------------------------------------------


@pytest.fixture
def rgb_file(tmp_path) -> tuple[Path, np.ndarray]:
    data = random_data((1000, 64, 64, 3), np.uint8, seed=8)
    path = tmp_path / "rgb.h5"
    write_dataset(path, data, (85, 64, 64, 3))
    return path, data


def test_direct_reads_are_one_preadv_per_run_in_a_chunk_at_its_offset(rgb_file, monkeypatch):
    path, data = rgb_file
    rows = [999, 3, 4, 5, 200, 201, 850, 4, -1, 84, 85]
    real = os.preadv
    calls: list[tuple[int, int]] = []

    def counting(fd, buffers, offset, *rest):
        calls.append((offset, sum(memoryview(b).nbytes for b in buffers)))
        return real(fd, buffers, offset, *rest)

    def refuse(self, item):
        raise AssertionError(f"h5py read {item!r} of a dataset read directly")

    with reopened(path) as (ds, _):
        assert ds._direct()
        row = 64 * 64 * 3
        chunk = [ds.id.get_chunk_info_by_coord((85 * k, 0, 0, 0)).byte_offset for k in range(12)]
        monkeypatch.setattr(os, "preadv", counting)
        monkeypatch.setattr(RowsDataset, "__getitem__", refuse)
        got = take_rows(ds, rows)
        monkeypatch.undo()
    np.testing.assert_array_equal(got, data[rows])
    # Runs cut at chunk edges: 3-5, 84 | 85, 200-201, 850 (chunk 10's first), 999 (chunk 11).
    assert sorted(calls) == sorted(
        [
            (chunk[0] + 3 * row, 3 * row),
            (chunk[0] + 84 * row, row),
            (chunk[1], row),
            (chunk[2] + (200 - 170) * row, 2 * row),
            (chunk[10], row),
            (chunk[11] + (999 - 935) * row, row),
        ]
    )


def test_a_short_read_falls_back_to_h5py(rgb_file, monkeypatch):
    path, data = rgb_file
    rows = [999, 3, 4, 5, 200, 201, 850, 84, 85]
    real = os.preadv

    def short(fd, buffers, offset, *rest):
        """Read half the bytes asked, leave garbage in the rest (as at the end of a file)."""
        (target,) = buffers
        half = len(target) // 2
        got = real(fd, [target[:half]], offset)
        target[half:] = b"\xab" * (len(target) - half)
        return got

    h5py_reads = []
    getitem = RowsDataset.__getitem__

    def counted(self, item):
        h5py_reads.append(item)
        return getitem(self, item)

    with reopened(path) as (ds, plain):
        assert ds._direct()
        monkeypatch.setattr(os, "preadv", short)
        monkeypatch.setattr(RowsDataset, "__getitem__", counted)
        got = take_rows(ds, rows)
        direct = ds.read_rows(np.array([0, 1, 2, 500]))
        monkeypatch.undo()
        expected = row_by_row(plain, rows)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, data[rows])
    np.testing.assert_array_equal(direct, data[[0, 1, 2, 500]])
    assert len(h5py_reads) == 8  # every piece, once each: 3-5, 84, 85, 200-201, 850, 999, 0-2, 500


# -- banks: forked readers, dense columns -------------------------------------------------------


@pytest.fixture(scope="module")
def big_bank(tmp_path_factory) -> Path:
    """A bank of 90 64x64 RGB images in three class folders (a small bank: 5-row chunks)."""
    folder = tmp_path_factory.mktemp("rows")
    write_images(folder / "images", classes=("a", "b", "c"), per_class=30, seed=4)
    path = folder / "big.h5"
    Big.create(path, [str(folder / "images")], scheduler="sync", progress=False).close()
    return path


BANK_ROWS = [89, 3, 3, 40, 84, 85, -1, 0, 61]  # spans many chunks, > 1 MiB: read directly


def _read_in_child(bank, data, rows, queue) -> None:
    try:
        preadv_calls = os.preadv.calls  # the parent's counter, copied into this process
        before = len(preadv_calls)
        direct = take_rows(data, rows)  # the parent's dataset, its inherited descriptor
        through_parent_dataset = len(preadv_calls) - before
        stacked = bank.images.stacked_rows(rows)  # the bank reopens itself in this process
        listed = np.stack(bank.images.get_rows(rows))
        labels = bank.labels.get_rows(rows)
        through_bank = len(preadv_calls) - before - through_parent_dataset
        queue.put(("ok", direct, stacked, listed, labels, through_parent_dataset, through_bank))
    except BaseException as error:  # what the child got, for the parent to show
        queue.put(("error", repr(error)))


def test_a_forked_child_reads_rows_of_a_bank_opened_in_the_parent(big_bank, monkeypatch):
    real = os.preadv
    calls: list[int] = []

    def counting(fd, buffers, offset, *rest):
        calls.append(offset)
        return real(fd, buffers, offset, *rest)

    counting.calls = calls  # type: ignore[attr-defined]
    monkeypatch.setattr(os, "preadv", counting)

    bank = TypedFile(big_bank)
    child = None
    try:
        expected = np.stack([bank.images.get(bank.ids[r]) for r in BANK_ROWS])
        labels = [bank.labels.get(bank.ids[r]) for r in BANK_ROWS]
        data = bank.images.column.data
        assert isinstance(data, RowsDataset) and data._direct()
        np.testing.assert_array_equal(bank.images.stacked_rows(BANK_ROWS), expected)  # cached
        assert calls, "the parent read its rows directly"

        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_read_in_child, args=(bank, data, BANK_ROWS, queue))
        child.start()
        result = queue.get(timeout=120)
        child.join(60)
        assert result[0] == "ok", result[1]
        _, direct, stacked, listed, child_labels, through_parent_dataset, through_bank = result
        np.testing.assert_array_equal(direct, expected)
        np.testing.assert_array_equal(stacked, expected)
        np.testing.assert_array_equal(listed, expected)
        assert child_labels == labels
        pieces = 7  # 0, 3, 40, 61, 84 | 85, 89: one read each
        assert through_parent_dataset == pieces and through_bank == 2 * pieces

        # The child closing its handles left the parent's alone.
        np.testing.assert_array_equal(take_rows(data, BANK_ROWS), expected)
        np.testing.assert_array_equal(bank.images.stacked_rows(BANK_ROWS), expected)
        assert bank.labels.get_rows(BANK_ROWS) == labels
    finally:
        if child is not None and child.is_alive():
            child.kill()  # it hung: this test's own child, by its handle
            child.join()
        bank.close()


class Unreadable:
    """Stands in for a refs dataset that must not be read: its shape, no rows."""

    def __init__(self, dataset: h5py.Dataset) -> None:
        self.shape, self.dtype, self.name = dataset.shape, dataset.dtype, dataset.name

    def __getitem__(self, item):
        raise AssertionError(f"the refs {self.name} were read ({item!r}) for a dense column")

    def __len__(self) -> int:
        return self.shape[0]


def test_a_dense_column_is_read_without_its_refs(big_bank, monkeypatch):
    with Big(big_bank) as bank:
        rows = BANK_ROWS
        ids = [bank.ids[r] for r in rows]
        images = [bank.images.get(i) for i in ids]
        labels = [bank.labels.get(i) for i in ids]
        columns = [bank.images.column, bank.labels.column]
        assert bank.images.dense and bank.labels.dense  # the refs read once, here
        for column in columns:
            monkeypatch.setattr(column, "refs", Unreadable(column.refs))
        stacked = bank.images.stacked_rows(rows)
        assert stacked.shape == (len(rows), 64, 64, 3)
        np.testing.assert_array_equal(stacked, np.stack(images))
        got = bank.images.get_rows(rows)
        assert len(got) == len(rows)
        for a, b in zip(got, images, strict=True):
            np.testing.assert_array_equal(a, b)
        assert bank.labels.get_rows(rows) == labels
        assert bank.images.get_rows([]) == []
        with pytest.raises(IndexError, match="row 90 out of range for 90 rows"):
            bank.images.stacked_rows([0, 90])
        with pytest.raises(IndexError, match="row -91 out of range for 90 rows"):
            bank.images.get_rows([-91])
        assert bank.images.dense and bank.labels.dense


def test_a_column_some_sources_lack_is_not_dense(tmp_path):
    write_images(tmp_path / "images", classes=("a", "b", "c"), per_class=10, seed=11)
    sources = [str(tmp_path / "images")]
    with Evens.create(tmp_path / "evens.h5", sources, scheduler="sync", progress=False) as bank:
        images = bank.images.column
        refs = images.refs[:]
        having = np.flatnonzero(refs[:, 0] >= 0)
        lacking = np.flatnonzero(refs[:, 0] < 0)
        assert len(having) == 15 and len(lacking) == 15 and having[1] == 2  # every other source

        rows = [*having[::-1].tolist(), int(having[3]), int(having[-1]) - 30, *having[:4].tolist()]
        expected = [bank.images.get(bank.ids[r]) for r in rows]
        np.testing.assert_array_equal(bank.images.stacked_rows(rows), np.stack(expected))
        for a, b in zip(bank.images.get_rows(rows), expected, strict=True):
            np.testing.assert_array_equal(a, b)
        assert bank.labels.get_rows(lacking) == [bank.labels.get(bank.ids[r]) for r in lacking]

        missing = int(lacking[2])
        assert bank.images.stacked_rows([int(having[0]), missing]) is None
        with pytest.raises(
            ValueError, match=re.escape(f"source {bank.ids[missing]!r} has no data")
        ):
            bank.images.get_rows([int(having[0]), missing, int(lacking[0])])
        assert not bank.images.dense
        assert bank.labels.dense


def test_the_dense_flag_is_recomputed_after_add_and_set(big_bank, tmp_path):
    path = tmp_path / "written.h5"
    shutil.copy(big_bank, path)
    image = np.random.default_rng(12).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with Big(path, mode="a") as bank:
        first, last = bank.images.get(bank.ids[0]), bank.images.get(bank.ids[89])
        assert bank.images.dense
        np.testing.assert_array_equal(bank.images.stacked_rows([89, 0]), [last, first])

        bank.add("extra", {"score": np.array([0.5])})  # a source without an image
        assert bank.images.stacked_rows([0, 90]) is None
        np.testing.assert_array_equal(bank.images.stacked_rows([89, 0]), [last, first])
        with pytest.raises(ValueError, match="source 'extra' has no data for feature 'images'"):
            bank.images.get_rows([0, 90])
        with pytest.raises(ValueError, match="source 'extra' has no data for feature 'labels'"):
            bank.labels.get_rows([90])
        assert not bank.images.dense
        assert not bank.labels.dense

        bank.set("extra", {"images": image})  # now every source has one: row i is source i
        np.testing.assert_array_equal(bank.images.stacked_rows([90, 0]), [image, first])
        assert bank.images.dense

        # Sources whose images went in out of order: as many rows as sources, not row i.
        bank.add("late", {"score": np.array([0.1])})
        bank.add("later", {"images": 255 - image})
        bank.set("late", {"images": image // 2})
        refs = bank.images.column.refs[:]
        assert len(refs) == bank.images.column.data.shape[0] == 93
        assert refs[91].tolist() == [92, 93] and refs[92].tolist() == [91, 92]
        np.testing.assert_array_equal(
            bank.images.stacked_rows([91, 92, 0]), [image // 2, 255 - image, first]
        )
        got = bank.images.get_rows([92, 91])
        np.testing.assert_array_equal(np.stack(got), [255 - image, image // 2])
        assert not bank.images.dense

    with Big(path) as bank:  # read-only: the item column is read directly
        assert isinstance(bank.images.column.data, RowsDataset)
        np.testing.assert_array_equal(
            bank.images.stacked_rows([91, 92, 0, 90]), [image // 2, 255 - image, first, image]
        )
        assert not bank.images.dense


# -- take_rows: one slice for small spans, one per run otherwise --------------------------------


@pytest.fixture
def counted_reads(monkeypatch) -> list[tuple[str, object]]:
    """Every h5py ``Dataset.__getitem__`` from here on, as (dataset name, item)."""
    reads: list[tuple[str, object]] = []
    getitem = h5py.Dataset.__getitem__

    def counted(self, item, *args, **kwargs):
        reads.append((self.name, item))
        return getitem(self, item, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counted)
    return reads


def runs(rows) -> int:
    wanted = np.unique(rows)
    return int(np.count_nonzero(np.diff(wanted) != 1)) + 1


def test_small_rows_spanning_at_most_span_bytes_are_read_as_one_slice(tmp_path, counted_reads):
    n = 100_000
    data = np.arange(2 * n, dtype=np.int64).reshape(n, 2) * 3 + 1
    path = tmp_path / "small.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=data, chunks=(4096, 2))
    span = SPAN_BYTES // data[0].nbytes  # rows in SPAN_BYTES: 65536
    rng = np.random.default_rng(13)
    with reopened(path) as (ds, _):
        assert not isinstance(ds, RowsDataset)  # small chunks keep HDF5's cache
        low = 1000
        rows = [*rng.integers(low, low + span, 62).tolist(), low, low + span - 1]
        rows = [*rows, rows[5], -(n - low - 7)]  # a repeat, and a row counted from the end
        counted_reads.clear()
        got = take_rows(ds, rows)
        assert len(counted_reads) == 1, counted_reads  # rows low..low + span - 1: one slice
        np.testing.assert_array_equal(got, data[rows])

        everywhere = [*rng.integers(0, n, 62).tolist(), 0, n - 1]  # a 1.6 MB span: by run
        assert runs(everywhere) > 50
        counted_reads.clear()
        got = take_rows(ds, everywhere)
        assert len(counted_reads) == runs(everywhere)
        np.testing.assert_array_equal(got, data[everywhere])


def test_big_rows_are_read_run_by_run_unless_they_fill_half_their_span(tmp_path, counted_reads):
    data = random_data((1000, 64, 64, 3), np.uint8, seed=14)
    path = tmp_path / "big.h5"
    write_dataset(path, data, (85, 64, 64, 3))
    rng = np.random.default_rng(15)
    spread = [*rng.choice(1000, 40, replace=False).tolist(), 998, 999, 4, 5]
    crowded = [r for r in range(300, 400) if r % 7] + [300, 399]  # 86 of 100 rows: 1.2 MB span
    with h5py.File(path, "r") as f:
        for ds in (f["x"], open_dataset(f, "x")):  # h5py's reads, then direct ones
            direct = isinstance(ds, RowsDataset)
            counted_reads.clear()
            np.testing.assert_array_equal(take_rows(ds, spread), data[spread])
            assert len(counted_reads) == (0 if direct else runs(spread)), counted_reads

            counted_reads.clear()
            got = take_rows(ds, crowded)
            assert 100 * data[0].nbytes > SPAN_BYTES  # more, but under twice the rows
            assert [item for _, item in counted_reads] == [slice(300, 400)]
            np.testing.assert_array_equal(got, data[crowded])

            few = list(range(300, 400, 3))  # 34 of 100 rows: run by run
            counted_reads.clear()
            np.testing.assert_array_equal(take_rows(ds, few), data[few])
            assert len(counted_reads) == (0 if direct else len(few))


def test_take_rows_reads_any_sequence_like_dataset():
    """take_rows needs only ``shape``, ``dtype`` and slicing: a NumPy array works as well."""
    data = random_data((5000, 3), np.int32, seed=16)
    rows = [4999, -5000, 17, 17, 2500, -1]
    np.testing.assert_array_equal(take_rows(data, rows), data[rows])
    assert take_rows(data, []).shape == (0, 3)
