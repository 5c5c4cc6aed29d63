"""Compressed banks: the decode tasks compress each source's row (one chunk each) and the
writer stores those chunks as they are; the bank stays a plain gzip dataset."""

from __future__ import annotations

import zlib

import h5py
import numpy as np
import pytest
from conftest import write_images

from features import DirLabels, Feature, Image
from pipeline import TypedFile, layout


class Wave(Feature):
    """A float32 (64, 32) array made from the id: structured enough to compress."""

    reads_bytes = False
    storage = "item"

    def load(self, source):
        k = int(source.id.split("-")[1])
        return np.sin(np.arange(2048, dtype=np.float32) * (k + 1) / 50).reshape(64, 32)


class Waves(TypedFile):
    wave = Wave(compression="gzip", compression_opts=5, shuffle=True)


class Gzipped(TypedFile):
    images = Image(size=(40, 40), mode="RGB", compression="gzip")
    labels = DirLabels()


def expected_wave(k: int) -> np.ndarray:
    return Wave().load(type("S", (), {"id": f"w-{k}"})())


def test_a_gzip_bank_built_on_workers_reads_with_plain_h5py(tmp_path, client):
    images = tmp_path / "images"
    paths = write_images(images, classes=("a", "b"), per_class=12, sizes=(40, 40))
    Gzipped.create(
        tmp_path / "g.h5", images, scheduler=client, partition_size=5, progress=False
    ).close()
    with h5py.File(tmp_path / "g.h5", "r") as f:  # no h5bank in the reading
        data = f["images/data"]
        assert data.compression == "gzip" and data.compression_opts == 4
        assert data.chunks == (1, 40, 40, 3)
        ids = [i.decode() for i in f["__sources__/id"][:]]
        refs = f["images/refs"][:]
        for id_, (start, stop) in zip(ids, refs, strict=True):
            with Gzipped(tmp_path / "g.h5") as bank:
                np.testing.assert_array_equal(data[start:stop][0], bank.images.get(id_))
    assert len(ids) == len(paths)


def test_shuffled_float_rows_round_trip(tmp_path, client):
    ids = [f"w-{k}" for k in range(30)]
    Waves.create(tmp_path / "w.h5", ids, scheduler=client, progress=False).close()
    with h5py.File(tmp_path / "w.h5", "r") as f:
        data = f["wave/data"]
        assert data.shuffle and data.compression_opts == 5 and data.chunks == (1, 64, 32)
        order = [i.decode() for i in f["__sources__/id"][:]]
        for row, id_ in enumerate(order):
            np.testing.assert_array_equal(data[row], expected_wave(int(id_.split("-")[1])))


def test_the_writer_stores_the_chunks_the_decode_tasks_made(tmp_path, monkeypatch):
    """The decode tasks here compress at level 9 while the dataset says 4: the stored chunk
    is theirs (level 9), so the writer did not compress again."""
    real = layout.compress_row
    monkeypatch.setattr(layout, "compress_row", lambda row, level, shuffle: real(row, 9, shuffle))
    Waves.create(tmp_path / "w.h5", ["w-3"], scheduler="threads", progress=False).close()
    with h5py.File(tmp_path / "w.h5", "r") as f:
        data = f["wave/data"]
        _, stored = data.id.read_direct_chunk((0, 0, 0))
        row = expected_wave(3)
        assert real(row, 9, True) != real(row, 5, True)  # the test can tell them apart
        assert stored == real(row, 9, True)
        np.testing.assert_array_equal(data[0], row)


def test_compress_row_matches_hdf5s_own_filters(tmp_path):
    row = expected_wave(7)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        for shuffle in (False, True):
            name = f"s{int(shuffle)}"
            f.create_dataset(name, data=row[None], chunks=(1, 64, 32), compression="gzip",
                             compression_opts=6, shuffle=shuffle)  # fmt: skip
            _, stored = f[name].id.read_direct_chunk((0, 0, 0))
            assert zlib.decompress(stored) == zlib.decompress(layout.compress_row(row, 6, shuffle))


@pytest.mark.parametrize(
    "options, taken",
    [
        ({"compression": "gzip"}, (4, False)),
        ({"compression": "gzip", "compression_opts": 9, "shuffle": True}, (9, True)),
        ({"compression": "gzip", "chunks": (10, 4)}, None),  # the user's chunks are kept
        ({"compression": "lzf"}, None),
        ({"compression": "gzip", "fletcher32": True}, None),
        ({}, None),
    ],
)
def test_which_columns_the_decode_tasks_compress(options, taken):
    assert layout.precompressed("item", options, 12288) == taken
    assert layout.precompressed("rows", options, 12288) is None
    assert layout.precompressed("item", options, 64) is None  # small rows keep larger chunks


class SmallRow(Feature):
    reads_bytes = False
    storage = "item"

    def load(self, source):
        return np.full(16, float(source.id.split("-")[1]), np.float32)


class Tiny(TypedFile):
    x = SmallRow(compression="gzip")


class Doubles(Feature):
    """float64 for one id, float32 for the others: the column is float32 (first value)."""

    reads_bytes = False
    storage = "item"

    def load(self, source):
        k = int(source.id.split("-")[1])
        return expected_wave(k).astype(np.float64 if k == 1 else np.float32)


class Mixed(TypedFile):
    x = Doubles(compression="gzip")


def test_small_rows_keep_chunks_of_many_rows(tmp_path):
    Tiny.create(tmp_path / "t.h5", [f"t-{k}" for k in range(50)], scheduler="threads",
                progress=False).close()  # fmt: skip
    with h5py.File(tmp_path / "t.h5", "r") as f:
        assert f["x/data"].chunks[0] > 1 and f["x/data"].compression == "gzip"
        np.testing.assert_array_equal(f["x/data"][7], np.full(16, 7.0, np.float32))


def test_rows_of_another_type_are_cast_not_stored_raw(tmp_path):
    Mixed.create(tmp_path / "m.h5", ["m-0", "m-1", "m-2"], scheduler="threads",
                 partition_size=1, progress=False).close()  # fmt: skip
    with Mixed(tmp_path / "m.h5") as bank:
        assert bank.x.dtype == np.float32
        for k in range(3):
            np.testing.assert_allclose(bank.x.get(f"m-{k}"), expected_wave(k), rtol=1e-6)


def test_a_dataset_chunked_otherwise_is_written_through_h5py(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        old = f.create_dataset("old", shape=(0, 4), dtype="f4", maxshape=(None, 4), chunks=(85, 4),
                               compression="gzip", compression_opts=4)  # fmt: skip
        new = f.create_dataset("new", shape=(0, 4), dtype="f4", maxshape=(None, 4), chunks=(1, 4),
                               compression="gzip", compression_opts=4)  # fmt: skip
        assert not layout.takes_direct_chunks(old, 4, False)
        assert layout.takes_direct_chunks(new, 4, False)
        assert not layout.takes_direct_chunks(new, 5, False)
        assert not layout.takes_direct_chunks(new, 4, True)
