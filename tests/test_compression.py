"""Compressed banks: the decode tasks compress each source's row (one chunk each) and the
writer stores those chunks as they are; the bank stays a plain dataset with that filter
(gzip, lzf, hdf5plugin's Zstd, Blosc...)."""

from __future__ import annotations

import h5py
import hdf5plugin
import numpy as np
import pytest
from conftest import write_images

from features import DirLabels, Feature, Image
from pipeline import TypedFile
from pipeline.build import decode
from pipeline.format.filters import filter_pipeline, filter_rows, precompressed


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
    """The decode tasks here compress at level 9 while the dataset says 5: the stored chunk
    is theirs (level 9), so the writer did not compress again."""
    real = filter_rows

    def level9(rows, options):
        made = real(rows, options)
        made.chunks = real(rows, {**options, "compression_opts": 9}).chunks
        return made

    monkeypatch.setattr(decode, "filter_rows", level9)  # where the decode tasks call it
    Waves.create(tmp_path / "w.h5", ["w-3"], scheduler="threads", progress=False).close()
    row = expected_wave(3)
    options = Waves.__schema__["wave"].dataset_options
    nine, five = (real(row[None], {**options, "compression_opts": c}).chunks[0] for c in (9, 5))
    assert nine != five  # the test can tell them apart
    with h5py.File(tmp_path / "w.h5", "r") as f:
        data = f["wave/data"]
        _, stored = data.id.read_direct_chunk((0, 0, 0))
        assert stored == nine
        np.testing.assert_array_equal(data[0], row)


FILTERS = {
    "gzip": {"compression": "gzip", "compression_opts": 6},
    "gzip+shuffle": {"compression": "gzip", "compression_opts": 6, "shuffle": True},
    "gzip+fletcher32": {"compression": "gzip", "fletcher32": True},
    "lzf": {"compression": "lzf"},
    "zstd": dict(hdf5plugin.Zstd(clevel=3)),
    "blosc": dict(hdf5plugin.Blosc(cname="lz4", shuffle=hdf5plugin.Blosc.SHUFFLE)),
    "lz4": dict(hdf5plugin.LZ4()),
}


@pytest.mark.parametrize("name", list(FILTERS))
def test_filter_rows_makes_the_chunks_hdf5_stores(tmp_path, name):
    """Whatever the filter, each row comes out as HDF5 writing the dataset itself stores it."""
    rows = np.stack([expected_wave(k) for k in range(5)])
    made = filter_rows(rows, FILTERS[name])
    with h5py.File(tmp_path / "x.h5", "w") as f:
        data = f.create_dataset("x", data=rows, maxshape=(None, 64, 32), chunks=(1, 64, 32),
                                **FILTERS[name])  # fmt: skip
        assert made.pipeline == filter_pipeline(data)
        for k in range(5):
            mask, stored = data.id.read_direct_chunk((k, 0, 0))
            assert (made.masks[k], made.chunks[k]) == (mask, stored), k


def test_filtered_rows_of_other_dtypes_and_filters_have_other_pipelines():
    rows = np.stack([expected_wave(k) for k in range(2)])
    pipelines = {
        filter_rows(rows, {"compression": "gzip", "compression_opts": 4}).pipeline,
        filter_rows(rows, {"compression": "gzip", "compression_opts": 5}).pipeline,
        filter_rows(rows, {"compression": "gzip", "shuffle": True}).pipeline,
        filter_rows(rows.astype(np.float64), {"compression": "gzip"}).pipeline,
        filter_rows(rows[:, :32], {"compression": "gzip"}).pipeline,
        filter_rows(rows, dict(hdf5plugin.Zstd())).pipeline,
    }
    assert len(pipelines) == 6


@pytest.mark.parametrize(
    "options, taken",
    [
        ({"compression": "gzip"}, True),
        ({"compression": "gzip", "compression_opts": 9, "shuffle": True}, True),
        ({"compression": "gzip", "chunks": (10, 4)}, False),  # the user's chunks are kept
        ({"compression": "lzf"}, True),
        ({"compression": "gzip", "fletcher32": True}, True),
        (dict(hdf5plugin.Zstd()), True),
        ({"shuffle": True}, False),  # nothing compresses
        ({}, False),
    ],
)
def test_which_columns_the_decode_tasks_compress(options, taken):
    assert precompressed("item", options, 12288) is taken
    assert precompressed("rows", options, 12288) is False
    assert precompressed("item", options, 64) is False  # small rows keep larger chunks


class Zstandard(TypedFile):
    wave = Wave(compression=hdf5plugin.Zstd(clevel=5))


class Blosced(TypedFile):
    wave = Wave(compression=hdf5plugin.Blosc(cname="zstd", clevel=4))


@pytest.mark.parametrize("bank_type", [Zstandard, Blosced])
def test_hdf5plugin_banks_are_compressed_by_the_decode_tasks(tmp_path, client, bank_type):
    """Built on worker processes; the chunks stored are those the decode tasks made (the
    writer did not filter them), and a plain h5py with hdf5plugin reads the bank."""
    ids = [f"w-{k}" for k in range(24)]
    bank_type.create(tmp_path / "z.h5", ids, scheduler=client, partition_size=5,
                     progress=False).close()  # fmt: skip
    options = bank_type.__schema__["wave"].dataset_options
    with h5py.File(tmp_path / "z.h5", "r") as f:
        data = f["wave/data"]
        assert data.chunks == (1, 64, 32)
        order = [i.decode() for i in f["__sources__/id"][:]]
        assert sorted(order) == sorted(ids)
        for row, id_ in enumerate(order):
            wave = expected_wave(int(id_.split("-")[1]))
            np.testing.assert_array_equal(data[row], wave)
            _, stored = data.id.read_direct_chunk((row, 0, 0))
            assert stored == filter_rows(wave[None], options).chunks[0]


def test_the_writer_refuses_chunks_made_for_another_pipeline(tmp_path, monkeypatch):
    """Chunks filtered otherwise than the column (here: level 1 for a level-5 column) are not
    stored raw: h5py writes the rows, which HDF5 filters as the column says."""
    real = filter_rows
    monkeypatch.setattr(
        decode, "filter_rows", lambda rows, options: real(rows, {**options, "compression_opts": 1})
    )
    Waves.create(tmp_path / "w.h5", ["w-2"], scheduler="threads", progress=False).close()
    row = expected_wave(2)
    options = Waves.__schema__["wave"].dataset_options
    with h5py.File(tmp_path / "w.h5", "r") as f:
        _, stored = f["wave/data"].id.read_direct_chunk((0, 0, 0))
        assert stored == real(row[None], options).chunks[0]
        assert stored != real(row[None], {**options, "compression_opts": 1}).chunks[0]


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
    """A column of many rows a chunk (a bank made before one-row chunks) has another pipeline
    than the decode tasks' rows: the writer writes those through h5py."""
    rows = np.stack([expected_wave(k) for k in range(3)])
    made = filter_rows(rows, {"compression": "gzip"})
    with h5py.File(tmp_path / "x.h5", "w") as f:
        old = f.create_dataset("old", shape=(0, 64, 32), dtype="f4", maxshape=(None, 64, 32),
                               chunks=(85, 64, 32), compression="gzip")  # fmt: skip
        new = f.create_dataset("new", shape=(0, 64, 32), dtype="f4", maxshape=(None, 64, 32),
                               chunks=(1, 64, 32), compression="gzip")  # fmt: skip
        assert filter_pipeline(old) != made.pipeline
        assert filter_pipeline(new) == made.pipeline


def test_rows_the_decode_tasks_cannot_filter_are_filtered_by_the_writer(tmp_path, monkeypatch):
    """Filtering in the decode tasks is only a speed-up: when it fails there (a filter a worker
    lacks), the build goes on and the writer filters the rows through h5py."""

    def broken(rows, options):
        raise ValueError("Unknown compression filter number: 32015")

    monkeypatch.setattr(decode, "filter_rows", broken)
    ids = [f"w-{k}" for k in range(6)]
    with Waves.create(tmp_path / "w.h5", ids, scheduler="threads", progress=False) as bank:
        assert bank.summary.ok == 6 and not bank.failures()
        for id_ in ids:
            np.testing.assert_array_equal(bank.wave.get(id_), expected_wave(int(id_[2:])))
    with h5py.File(tmp_path / "w.h5", "r") as f:
        assert f["wave/data"].compression == "gzip" and f["wave/data"].chunks == (1, 64, 32)
