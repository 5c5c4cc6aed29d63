"""Small banks are small: chunk shapes follow the size of the bank being built.

HDF5 allocates a chunked dataset's chunks whole, so chunks sized for a big bank
(1 MiB of data, 4096 rows of refs) made a bank of five photos twice the size of
the same arrays written with h5py. The per-source tables get 64 to 4096 rows a
chunk from the sources the bank is expected to hold, and data a sixteenth of its
expected bytes (4 KiB to ``h5bank.build.chunk-bytes``); a bank big enough keeps
the 1 MiB chunks reads and builds were tuned on, and a column keeps its chunks
however it grows.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import imageio.v3 as iio
import numpy as np
import pytest

from features import Array, DirLabels, Feature, Image
from pipeline import TypedFile
from pipeline.format import layout
from pipeline.format.verify import bank_problems

# -- sources made from their ids ------------------------------------------------------------


class Tiny(Feature):
    """One int64 per source, made from its id (``class/x-<k>``): no bytes read."""

    reads_bytes = False
    storage = "rows"

    def load(self, source):
        return np.array([int(source.id.rsplit("-", 1)[1])], dtype=np.int64)


class Thumb(Feature):
    """A 64x64 RGB ``uint8`` image (12 KiB) made from its id."""

    reads_bytes = False
    storage = "item"

    def load(self, source):
        k = int(source.id.rsplit("-", 1)[1])
        return np.full((64, 64, 3), k % 251, dtype=np.uint8)


class Counts(TypedFile):
    tiny = Tiny()
    labels = DirLabels()


class Thumbs(TypedFile):
    images = Thumb()
    labels = DirLabels()


class Photos(TypedFile):
    images = Image()
    labels = DirLabels()


def ids(n: int, start: int = 0) -> list[str]:
    return [f"c{k % 3}/x-{k:06d}" for k in range(start, start + n)]


def chunk_rows(path: Path) -> dict[str, int]:
    """Rows per chunk of every dataset of the bank at ``path``."""
    rows: dict[str, int] = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, node: (
                rows.__setitem__(name, node.chunks[0]) if isinstance(node, h5py.Dataset) else None
            )
        )
    return rows


TABLES = ("__sources__/id", "__failures__/id", "tiny/refs", "labels/data", "labels/refs")


# -- five photos, as a notebook would save them -----------------------------------------------


def write_photos(root: Path) -> list[Path]:
    """Five 240x320 photos (three RGB, two RGBA) in two folders, PNGs of noisy gradients."""
    rng = np.random.default_rng(0)
    paths = []
    x = np.mgrid[0:240, 0:320][1]
    for k in range(5):
        folder = root / ("TheYo" if k < 3 else "Beru")
        folder.mkdir(parents=True, exist_ok=True)
        depth = 3 if k < 3 else 4
        image = np.stack([(x + 40 * c + 7 * k) % 256 for c in range(depth)], axis=-1)
        image = np.clip(image + rng.integers(0, 30, image.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"im_{k}.png")
        iio.imwrite(paths[-1], image)
    return paths


def test_five_photos_take_about_what_h5py_takes(tmp_path):
    paths = write_photos(tmp_path / "photos")
    notebook = tmp_path / "notebook.h5"
    with h5py.File(notebook, "w") as f:  # one contiguous dataset per image
        for path in paths:
            f.create_dataset(f"{path.parent.name}/{path.stem}", data=iio.imread(path))
    bank = Photos.create(
        tmp_path / "bank.h5", [str(tmp_path / "photos")], scheduler="threads", progress=False
    )
    for path in paths:
        np.testing.assert_array_equal(bank.images.get(f"{path.parent.name}/{path.name}"),
                                      iio.imread(path))  # fmt: skip
    bank.close()
    size, plain = os.path.getsize(tmp_path / "bank.h5"), os.path.getsize(notebook)
    assert size <= 1.1 * plain, (size, plain)  # was 2.49 MB against 1.31 MB


def test_an_empty_bank_is_a_few_kilobytes(tmp_path):
    Photos(tmp_path / "empty.h5", mode="a").close()
    assert os.path.getsize(tmp_path / "empty.h5") < 8192
    with h5py.File(tmp_path / "empty.h5", "r") as f:
        assert f[layout.IDS].chunks == (layout.MIN_TABLE_ROWS,)


# -- the rule -------------------------------------------------------------------------------


def test_table_rows_are_the_next_power_of_two_from_64_to_4096():
    assert [layout.table_rows(n) for n in (0, 1, 5, 64, 65, 300, 4096, 5000, 10**7)] == [
        64, 64, 64, 64, 128, 512, 4096, 4096, 4096,
    ]  # fmt: skip


def test_data_chunks_aim_at_a_sixteenth_of_the_expected_bytes():
    mib = 1 << 20
    assert layout.data_chunk_bytes(12288, 100_000, mib) == mib  # big: exactly chunk-bytes
    assert layout.data_chunk_bytes(1, 16 * mib, mib) == mib  # from 16 x chunk-bytes on
    assert layout.data_chunk_bytes(1, 16 * mib - 16, mib) == mib // 2
    assert layout.data_chunk_bytes(230_400, 5, mib) == 64 * 1024  # 1.15 MB / 16, rounded down
    assert layout.data_chunk_bytes(8, 5, mib) == layout.MIN_CHUNK_BYTES
    assert layout.data_chunk_bytes(8, 5, 1000) == 1000  # a chunk-bytes below the floor wins
    assert layout.data_chunk_bytes(1, 16_000_000, 1_000_000) == 1_000_000  # any chunk-bytes
    assert layout.data_chunk_bytes(1, 15_999_984, 1_000_000) == 512 * 1024


# -- builds ----------------------------------------------------------------------------------


def test_table_chunks_grow_with_the_sources_a_build_plans(tmp_path):
    rows = {}
    for n in (5, 300, 5000):
        path = tmp_path / f"{n}.h5"
        bank = Counts.create(path, ids(n), scheduler="threads", progress=False)
        assert len(bank) == n
        np.testing.assert_array_equal(bank.tiny[:], np.arange(n))
        bank.close()
        rows[n] = chunk_rows(path)
        assert {rows[n][name] for name in TABLES} == {layout.table_rows(n)}, rows[n]
    assert [rows[n]["tiny/refs"] for n in (5, 300, 5000)] == [64, 512, 4096]
    # Data too: 8 bytes a source, 40 KB for 5,000 sources: 2 KiB chunks but for the 4 KiB floor.
    assert rows[5]["tiny/data"] == rows[5000]["tiny/data"] == layout.MIN_CHUNK_BYTES // 8
    assert os.path.getsize(tmp_path / "5.h5") < 40_000


def test_a_big_enough_build_keeps_chunks_of_chunk_bytes(tmp_path):
    """1,500 images of 12 KiB (18 MB, over 16 x 1 MiB): 85-row chunks of 1 MiB, as always."""
    path = tmp_path / "big.h5"
    Thumbs.create(path, ids(1500), scheduler="threads", progress=False).close()
    rows = chunk_rows(path)
    assert rows["images/data"] == (1 << 20) // (64 * 64 * 3) == 85
    assert rows["images/refs"] == rows["labels/data"] == rows["__sources__/id"] == 2048


def test_a_small_build_of_the_same_images_gets_small_chunks(tmp_path):
    path = tmp_path / "small.h5"
    Thumbs.create(path, ids(20), scheduler="threads", progress=False).close()
    rows = chunk_rows(path)
    # 20 x 12 KiB / 16 = 15 KiB -> 8 KiB: one 12 KiB row a chunk
    assert rows["images/data"] == 1 and rows["images/refs"] == 64
    assert os.path.getsize(path) < 1.1 * 20 * 64 * 64 * 3 + 40_000


def test_add_to_a_new_bank_makes_small_chunks(tmp_path):
    path = tmp_path / "added.h5"
    with Counts(path, mode="a") as bank:
        bank.add("c0/x-7", {"tiny": np.array([7]), "labels": "c0"})
        bank.add("log", {"loss": np.linspace(0, 1, 10)})  # a column added on the fly
    rows = chunk_rows(path)
    assert {rows[name] for name in TABLES} == {64}
    assert rows["tiny/data"] * 8 == rows["loss/data"] * 8 == layout.MIN_CHUNK_BYTES
    with h5py.File(path, "r") as f:
        assert layout.storage_bytes(f) < 16_000  # was 420 KB of chunks of 32 and 64 KiB
    assert os.path.getsize(path) < 64_000  # most of it HDF5's headers and chunk indexes


def test_a_small_bank_keeps_its_chunks_as_it_grows_and_reads_back_exactly(tmp_path):
    """A 5-source build, appended to by a 3,000-source build and by add(): the chunks stay
    those the first build chose (HDF5 cannot change them), and every value reads back."""
    path = tmp_path / "grown.h5"
    Counts.create(path, ids(5), scheduler="threads", progress=False).close()
    before = chunk_rows(path)
    Counts.create(path, ids(3000, start=5), mode="a", scheduler="threads", progress=False).close()
    with Counts(path, mode="a") as bank:
        bank.add("c1/x-9000", {"tiny": np.array([9000]), "labels": "c1"})
        bank.add("c1/x-9001", {"tiny": np.array([9001])})
    assert chunk_rows(path) == before
    with Counts(path) as bank:
        assert len(bank) == 3007
        expected = [*range(3005), 9000, 9001]
        np.testing.assert_array_equal(bank.tiny[:], expected)
        assert [bank.tiny.get(i)[0] for i in ("c0/x-000000", "c2/x-002999", "c1/x-9001")] == [
            0, 2999, 9001,
        ]  # fmt: skip
        names = bank.labels.names
        assert [names[code] for code in bank.labels[:]] == [
            *(f"c{k % 3}" for k in range(3005)), "c1",
        ]  # fmt: skip
        assert bank.labels.get("c1/x-9000") == names.index("c1")
        assert bank.labels.get("c1/x-9001") is None
    with h5py.File(path, "r") as f:
        assert list(bank_problems(f, data=True)) == []


def test_a_map_output_is_chunked_for_the_sources_it_is_written_to(tmp_path):
    path = tmp_path / "mapped.h5"
    Counts.create(path, ids(5), scheduler="threads", progress=False).close()
    with Counts(path, mode="a") as bank:
        bank.map(_double, "tiny", output="derived/double", feature=Array(),
                 scheduler="threads", progress=False)  # fmt: skip
        np.testing.assert_array_equal(bank.derived.double[:], 2 * np.arange(5))
    rows = chunk_rows(path)
    assert rows["derived/double/refs"] == 64
    assert rows["derived/double/data"] * 8 == layout.MIN_CHUNK_BYTES


def _double(values):
    return 2 * values["tiny"]


@pytest.mark.parametrize(("chunks", "rows"), [((3,), 3), (True, 8192)])
def test_a_feature_s_own_chunks_are_kept(tmp_path, chunks, rows):
    """``chunks=(3,)`` is the feature's; ``chunks=True`` lets h5bank pick: 200,000 sources of
    8 bytes, 1.6 MB / 16 -> 64 KiB chunks."""

    class Own(TypedFile):
        tiny = Tiny(chunks=chunks)

    path = tmp_path / "own.h5"
    Own.create(path, ids(200_000), scheduler="threads", progress=False).close()
    assert chunk_rows(path)["tiny/data"] == rows
