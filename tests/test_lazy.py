"""Lazy computing: Dask arrays, bags and ``bank.map`` over real worker processes and real files.

Two real clusters: the session's 2-process ``LocalCluster`` (``client``) and
one started as separate ``dask scheduler`` / ``dask worker`` processes
(``cli_client``); refusals are checked against real subprocesses that hold
the bank open.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import subprocess
import sys
import threading
import time
import warnings

import cloudpickle
import dask
import dask.array as da
import dask.bag as db
import h5py
import numpy as np
import pytest
from conftest import write_images, write_sounds
from distributed import Client, default_client

from features import Array, Bytes, DirLabels, Feature, Image, Sound
from pipeline import (
    BankBusyError,
    BankChangedError,
    BuildInProgressError,
    Group,
    SourceError,
    TypedFile,
)
from pipeline.bank.mapping import MapResult
from pipeline.files.cache import CACHE, release
from pipeline.format import layout
from pipeline.format.partial import partial_path
from pipeline.read.arrays import default_chunks

H, W = 16, 16
CHUNK_ROWS = 4  # HDF5 chunk rows of the images column
ROW_BYTES = H * W * 3
PER_CLASS = 7
CLASSES = ("cats", "dogs", "owls")


class Pictures(TypedFile):
    images = Image(size=(H, W), mode="RGB", chunks=(CHUNK_ROWS, H, W, 3))
    labels = DirLabels()


class Media(TypedFile):
    images = Image()  # unsized: each image in its own shape and mode, stored flat
    audio = Sound(sr=8000)
    labels = DirLabels()


class Sounds(TypedFile):
    audio = Sound(sr=8000)


class Grouped(TypedFile):
    data = Group(images=Image(size=(H, W), mode="RGB"), labels=DirLabels())


# -- functions run on the workers (module level: workers import this module) ---------------


def thumbnail(data):
    return data["images"][::2, ::2]


def rms_envelope(data, frame=64):
    """RMS of each frame of ``frame`` samples (the last one zero-padded): one value per frame."""
    audio = data["audio"]
    frames = -(-len(audio) // frame)
    padded = np.zeros(frames * frame, dtype=audio.dtype)
    padded[: len(audio)] = audio
    return np.sqrt((padded.reshape(frames, frame) ** 2).mean(axis=1))


def channel_means(data):
    image = data["images"]
    return image.reshape(-1, image.shape[-1] if image.ndim == 3 else 1).mean(axis=0)


def cache_opens() -> int:
    return CACHE.opens


# -- helpers ------------------------------------------------------------------------------


def rchar() -> int:
    """Bytes this process has read through read()/pread() so far (``/proc/self/io``)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def eager(bank, id_, inputs):
    """What ``bank.map`` hands ``func`` for ``id_``, read eagerly through ``bank.get``."""
    data = bank.get(id_)
    return {name: data[name] for name in inputs}


@pytest.fixture(params=["local-cluster", "cli-cluster"])
def any_client(request):
    """The session LocalCluster's client, then the client of the dask-CLI cluster."""
    return request.getfixturevalue("client" if request.param == "local-cluster" else "cli_client")


@pytest.fixture
def pictures(tmp_path):
    """21 RGB 16x16 images in three class folders, 4 rows per HDF5 chunk."""
    root = tmp_path / "images"
    write_images(root, classes=CLASSES, per_class=PER_CLASS)
    bank = Pictures.create(tmp_path / "pictures.h5", root, scheduler="threads", progress=False)
    yield bank
    bank.close()


@pytest.fixture
def media(tmp_path):
    """Unsized images and sounds, interleaved, with folder labels."""
    images = write_images(tmp_path / "images", per_class=4)
    sounds = write_sounds(tmp_path / "sounds", per_class=3)
    files = []
    for i in range(max(len(images), len(sounds))):
        files += [str(p) for p in (images[i : i + 1] + sounds[i : i + 1])]
    bank = Media.create(tmp_path / "media.h5", files, scheduler="threads", progress=False)
    yield bank
    bank.close()


# -- statistics on two real clusters -------------------------------------------------------


def test_statistics_on_a_cluster_equal_numpy(pictures, any_client):
    images, labels = pictures.images[:], pictures.labels[:]
    with dask.config.set({"h5bank.read.chunk-bytes": 2 * CHUNK_ROWS * ROW_BYTES}):
        arrays = pictures.to_dask()
    x, y = arrays["images"], arrays["labels"]
    assert x.shape == (len(pictures), H, W, 3) and y.shape == (len(pictures),)
    assert x.numblocks[0] >= 3  # several blocks, so the reductions combine partial results
    dogs = pictures.labels.names.index("dogs")
    local_opens = CACHE.opens
    worker_opens = sum(any_client.run(cache_opens).values())

    mean, histogram, dog_mean = dask.compute(
        x.mean(axis=(0, 1, 2)),
        da.bincount(y, minlength=len(pictures.labels.names)),
        x[y == dogs].mean(axis=0),
        scheduler=any_client,
    )

    np.testing.assert_allclose(mean, images.mean(axis=(0, 1, 2)))
    np.testing.assert_array_equal(histogram, np.bincount(labels, minlength=3))
    assert histogram.tolist() == [PER_CLASS] * 3
    np.testing.assert_allclose(dog_mean, images[labels == dogs].mean(axis=0))
    # It was the workers that read the bank, not this process.
    assert CACHE.opens == local_opens
    assert sum(any_client.run(cache_opens).values()) > worker_opens


def test_map_writes_thumbnails_on_a_cluster(pictures, any_client):
    images = pictures.images[:]
    # The workers read the bank first and keep it open: the map must close those handles.
    before = sum(any_client.run(cache_opens).values())
    np.testing.assert_array_equal(pictures.images.to_dask().compute(scheduler=any_client), images)
    assert sum(any_client.run(cache_opens).values()) > before
    summary = pictures.map(
        thumbnail,
        "images",
        "thumbs",
        feature=Array(item=True),
        scheduler=any_client,
        partition_size=4,
        progress=False,
    )
    assert summary.ok == len(pictures) and summary.failed == 0 and summary.skipped == 0
    assert summary.writer_pid in any_client.run(os.getpid).values()
    assert "thumbs" in summary.action
    assert not os.path.exists(partial_path(pictures.path))
    assert pictures.thumbs.shape == (len(pictures), H // 2, W // 2, 3)
    assert pictures.thumbs.storage == "item"
    for id_ in pictures.ids:
        np.testing.assert_array_equal(
            pictures.thumbs.get(id_), thumbnail(eager(pictures, id_, ["images"]))
        )
    lazy = pictures.thumbs.to_dask().compute(scheduler=any_client)
    np.testing.assert_array_equal(lazy, images[:, ::2, ::2])
    assert pictures.failures() == []


def test_map_writes_rms_envelopes_of_sounds_on_a_cluster(tmp_path, any_client):
    write_sounds(tmp_path / "sounds", per_class=3)
    bank = Sounds.create(
        tmp_path / "s.h5", tmp_path / "sounds", scheduler="threads", progress=False
    )
    summary = bank.map(
        rms_envelope, "audio", "rms", scheduler=any_client, partition_size=2, progress=False
    )
    assert summary.ok == len(bank) == 6 and summary.failed == 0
    assert bank.feature("rms").storage == "rows"  # chosen from the first result: Array()
    lengths = set()
    for id_ in bank.ids:
        expected = rms_envelope(eager(bank, id_, ["audio"]))
        got = bank.feature("rms").get(id_)
        np.testing.assert_array_equal(got, expected)
        assert got.dtype == expected.dtype
        lengths.add(len(got))
    assert len(lengths) > 1  # the sounds, hence their envelopes, differ in length
    bank.close()


# -- pickling, and a large bank read lazily --------------------------------------------------

FRESH_PROCESS = """
import pickle, sys
import dask
import numpy as np

from pipeline.files.cache import CACHE

with open(sys.argv[1], "rb") as f:
    graphs = pickle.load(f)
(values,) = dask.compute(graphs, scheduler="sync")
np.savez(sys.argv[2], opens=CACHE.opens, **values)
"""


def test_a_pickled_array_computes_in_a_fresh_process(pictures, tmp_path):
    images, labels = pictures.images[:], pictures.labels[:]
    with dask.config.set({"h5bank.read.chunk-bytes": CHUNK_ROWS * ROW_BYTES}):
        x, y = pictures.images.to_dask(), pictures.labels.to_dask()
    owls = pictures.labels.names.index("owls")
    graphs = {"images": x, "labels": y, "owl_mean": x[y == owls].mean(axis=0)}
    # The array itself pickles with plain pickle: its graph holds a recipe, never an h5py object.
    assert np.array_equal(pickle.loads(pickle.dumps(x)).compute(scheduler="sync"), images)
    payload, out = tmp_path / "graphs.pkl", tmp_path / "values.npz"
    payload.write_bytes(cloudpickle.dumps(graphs))
    pictures.close()  # the fresh process opens the file on its own

    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(payload), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    values = np.load(out)
    np.testing.assert_array_equal(values["images"], images)
    np.testing.assert_array_equal(values["labels"], labels)
    np.testing.assert_allclose(values["owl_mean"], images[labels == owls].mean(axis=0))
    assert int(values["opens"]) == 1  # many blocks, one open in that process


class Frames(Feature):
    """1 MiB of float32 per source, made from its id (``"s-12"`` -> all 12): no bytes to read."""

    reads_bytes = False
    storage = "item"

    def load(self, source):
        return np.full((256, 1024), int(source.id.rpartition("-")[2]), dtype=np.float32)


class Big(TypedFile):
    frames = Frames()
    copies = Frames()


def test_making_arrays_of_a_large_bank_reads_no_data(tmp_path):
    n = 56  # two 1 MiB columns: about 117 MB of data
    path = tmp_path / "big.h5"
    Big.create(path, [f"s-{i}" for i in range(n)], scheduler="threads", progress=False).close()
    assert os.path.getsize(path) > 100_000_000
    bank = Big(path)
    opens = CACHE.opens

    before = rchar()
    with dask.config.set({"h5bank.read.chunk-bytes": 4 << 20}):
        arrays = bank.to_dask()
        frames = bank.frames.to_dask()
        bag = bank.frames.to_dask_sources()
    read = rchar() - before

    assert read < 1_000_000, f"making the arrays read {read} bytes"
    assert CACHE.opens == opens  # nothing went through a lazy handle
    assert set(arrays) == {"frames", "copies"}
    assert frames.shape == (n, 256, 1024) and frames.chunks[0] == (4,) * (n // 4)
    assert bag.npartitions == n // 4

    # Computing one block does read (so the counters above could have moved).
    before = rchar()
    block = frames.blocks[3].compute(scheduler="sync")
    assert rchar() - before >= block.nbytes == 4 << 20
    assert CACHE.opens == opens + 1
    np.testing.assert_array_equal(block[:, 0, 0], [12, 13, 14, 15])
    before = rchar()
    (part,) = dask.compute(bag.to_delayed()[5], scheduler="sync")
    assert [id_ for id_, _ in part] == ["s-20", "s-21", "s-22", "s-23"]
    assert 4 << 20 <= rchar() - before < 3 * (4 << 20)  # its own rows, not the bank
    assert CACHE.opens == opens + 1  # the same handle
    bank.close()
    release(str(path))


# -- blocks and handles ------------------------------------------------------------------------


def test_default_blocks_are_whole_hdf5_chunks_of_about_chunk_bytes(pictures):
    n = len(pictures)
    data = pictures.images.column.data
    assert data.chunks[0] == CHUNK_ROWS
    assert dask.config.get("h5bank.read.chunk-bytes") == 64 * 2**20
    chunk = CHUNK_ROWS * ROW_BYTES
    for per_block in (1, 2, 3):
        target = per_block * chunk + chunk // 2  # rounds down to whole chunks
        with dask.config.set({"h5bank.read.chunk-bytes": target}):
            x = pictures.images.to_dask()
            assert default_chunks(data)[0] == per_block * CHUNK_ROWS
        rows = per_block * CHUNK_ROWS
        assert x.chunks[0] == (rows,) * (n // rows) + ((n % rows,) if n % rows else ())
        assert all(c % CHUNK_ROWS == 0 for c in x.chunks[0][:-1])
        assert x.chunks[1:] == ((H,), (W,), (3,))
        np.testing.assert_array_equal(x.compute(scheduler="sync"), pictures.images[:])
    with dask.config.set({"h5bank.read.chunk-bytes": 1}):  # less than a chunk: one chunk a block
        assert pictures.images.to_dask().chunks[0][:-1] == (CHUNK_ROWS,) * (n // CHUNK_ROWS)
    assert pictures.images.to_dask().chunks[0] == (n,)  # 64 MiB holds the whole column
    assert default_chunks(data, 2 * chunk)[0] == 2 * CHUNK_ROWS  # an explicit target wins
    # Labels (one int64 per source) are chunked like the bank's tables: one block here.
    assert pictures.labels.to_dask().chunks == ((n,),)
    # chunks= is anything from_array takes.
    x = pictures.images.to_dask(chunks=(5, H, 8, 3))
    assert x.chunks == ((5, 5, 5, 5, 1), (H,), (8, 8), (3,))
    np.testing.assert_array_equal(x.compute(scheduler="sync"), pictures.images[:])


def test_a_many_block_compute_opens_the_bank_once_per_worker(pictures, any_client):
    with dask.config.set({"h5bank.read.chunk-bytes": 1}):
        x = pictures.images.to_dask()
    assert x.numblocks[0] == math.ceil(len(pictures) / CHUNK_ROWS) == 6
    before = any_client.run(cache_opens)
    total = x.sum(dtype="i8").compute(scheduler=any_client)
    after = any_client.run(cache_opens)
    assert total == pictures.images[:].sum(dtype="i8")
    opened = {worker: after[worker] - before[worker] for worker in after}
    assert sum(opened.values()) >= 1  # the workers read it...
    assert max(opened.values()) <= 1  # ...each opening it at most once for 6 blocks
    # Computing again reuses the open handles.
    np.testing.assert_array_equal(x.compute(scheduler=any_client), pictures.images[:])
    assert any_client.run(cache_opens) == after


def test_group_and_bank_to_dask(tmp_path, client):
    write_images(tmp_path / "images", classes=CLASSES, per_class=2)
    bank = Grouped.create(
        tmp_path / "g.h5", tmp_path / "images", scheduler="threads", progress=False
    )
    arrays = bank.to_dask()
    assert set(arrays) == {"data/images", "data/labels"}
    group = bank.data.to_dask()
    assert set(group) == {"images", "labels"}
    x, y = dask.compute(group["images"], arrays["data/labels"], scheduler=client)
    np.testing.assert_array_equal(x, bank.data.images[:])
    np.testing.assert_array_equal(y, bank.data.labels[:])
    bank.close()


def test_rows_and_flat_columns_come_out_as_their_concatenation(media, client):
    audio, images = dask.compute(media.audio.to_dask(), media.images.to_dask(), scheduler=client)
    np.testing.assert_array_equal(audio, media.audio[:])  # sounds, along time
    np.testing.assert_array_equal(images, media.images[:])  # unsized images, raveled
    assert audio.ndim == images.ndim == 1
    # Labels, one per source, line up with the ids.
    labels = media.labels.to_dask().compute(scheduler=client)
    assert [media.labels.names[label] for label in labels] == [
        os.path.basename(os.path.dirname(id_)) for id_ in media.ids
    ]


def test_plain_hdf5_datasets_to_dask(tmp_path, client):
    path = tmp_path / "plain.h5"
    a = np.arange(100.0).reshape(50, 2)
    with h5py.File(path, "w") as f:
        f.create_dataset("a", data=a, chunks=(8, 2))
        f.create_dataset("c", data=np.arange(30))  # contiguous: no chunks
        f.create_dataset("g/e", data=np.arange(12).reshape(4, 3), chunks=(2, 3))
    plain = TypedFile(path)
    with dask.config.set({"h5bank.read.chunk-bytes": 2 * 8 * a.itemsize * 2}):
        x = plain.feature("a").to_dask()
    assert x.chunks == ((16, 16, 16, 2), (2,))
    np.testing.assert_array_equal(x.compute(scheduler=client), a)
    arrays = plain.to_dask()
    assert set(arrays) == {"a", "c", "g/e"}
    np.testing.assert_array_equal(arrays["c"].compute(scheduler="sync"), np.arange(30))
    np.testing.assert_array_equal(plain.g.to_dask()["e"].compute(), np.arange(12).reshape(4, 3))
    plain.close()


def test_plain_file_with_a_scalar_dataset_to_dask(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("a", data=np.arange(10))
        f.create_dataset("version", data=3)  # a scalar, as many HDF5 files have
    with TypedFile(path) as plain:
        arrays = plain.to_dask()
        assert set(arrays) == {"a", "version"}
        assert int(arrays["version"].compute()) == 3


# -- per-source bags -----------------------------------------------------------------------------


def test_to_dask_sources_gives_what_get_gives_in_row_range_partitions(media, client):
    ids = media.ids
    for name in ("images", "audio", "labels"):
        proxy = media.feature(name)
        with_data = [id_ for id_ in ids if proxy.get(id_) is not None]
        bag = proxy.to_dask_sources(partition_size=3)
        assert isinstance(bag, db.Bag)
        assert bag.npartitions == math.ceil(len(ids) / 3)

        pairs = bag.compute(scheduler=client)
        assert [id_ for id_, _ in pairs] == with_data  # bank order, sources with data only
        for id_, value in pairs:
            expected = proxy.get(id_)
            if name == "labels":
                assert value == expected and isinstance(value, int)
            else:
                assert value.shape == expected.shape and value.dtype == expected.dtype
                np.testing.assert_array_equal(value, expected)
        # Each partition is a range of consecutive source rows.
        parts = dask.compute(*bag.to_delayed(), scheduler="sync")
        for k, part in enumerate(parts):
            window = ids[3 * k : 3 * k + 3]
            assert [id_ for id_, _ in part] == [id_ for id_ in window if id_ in with_data]
    images = dict(media.images.to_dask_sources().compute(scheduler=client))
    assert len({image.shape for image in images.values()}) > 2  # sizes and modes differ
    assert {image.ndim for image in images.values()} == {2, 3}
    sounds = dict(media.audio.to_dask_sources().compute(scheduler=client))
    assert len({len(sound) for sound in sounds.values()}) > 1
    # Default partitions: about chunk-bytes of data each.
    assert media.audio.to_dask_sources().npartitions == 1
    with dask.config.set({"h5bank.read.chunk-bytes": 1}):
        assert media.audio.to_dask_sources().npartitions == len(ids)


# -- bank.map ------------------------------------------------------------------------------------


@pytest.fixture(params=["threads", "scheduler-address"])
def map_scheduler(request):
    """Where a map without output runs: this process's threads, or the LocalCluster's workers.

    The cluster is named by its address (``bank.map`` makes a client of it)
    because a non-default ``Client`` object fails here: see the xfail below.
    """
    if request.param == "threads":
        return "threads"
    return request.getfixturevalue("cluster").scheduler_address


def test_map_without_output_equals_eager(media, map_scheduler, client):
    result = media.map(
        channel_means,
        ["images", "labels"],
        scheduler=map_scheduler,
        partition_size=2,
        progress=False,
    )
    assert isinstance(result, MapResult)
    with_images = [id_ for id_ in media.ids if media.images.get(id_) is not None]
    assert list(result) == with_images  # bank order; sounds have no image, so no call
    for id_, value in result.items():
        np.testing.assert_array_equal(value, channel_means(eager(media, id_, ["images"])))
    assert result.failures == []
    # The bank was closed while the map ran and is open again.
    assert media.labels.get(with_images[0]) == media.labels[0]
    if map_scheduler != "threads":  # it really ran on the worker processes
        pids = media.map(
            lambda data: os.getpid(), "images", scheduler=map_scheduler, progress=False
        )
        assert set(pids.values()) <= set(client.run(os.getpid).values())


def test_map_without_output_records_failures(media, map_scheduler):
    high = media.labels.names.index("high")

    def loud_only(data):
        if data["labels"] != high:
            raise ValueError("not a high sound")
        return float(np.abs(data["audio"]).max())

    result = media.map(
        loud_only, ["audio", "labels"], scheduler=map_scheduler, partition_size=2, progress=False
    )
    sounds = [id_ for id_ in media.ids if media.audio.get(id_) is not None]
    highs = [id_ for id_ in sounds if media.labels.get(id_) == high]
    assert list(result) == highs
    for id_ in highs:
        assert result[id_] == float(np.abs(media.audio.get(id_)).max())
    assert sorted(f.id for f in result.failures) == sorted(set(sounds) - set(highs))
    assert all("ValueError" in f.error and "not a high sound" in f.error for f in result.failures)
    with pytest.raises(SourceError) as raised:
        media.map(
            loud_only,
            ["audio", "labels"],
            scheduler=map_scheduler,
            on_error="raise",
            progress=False,
        )
    assert raised.value.id in set(sounds) - set(highs)


def test_map_without_output_on_a_client_object(media, client):
    result = media.map(channel_means, "images", scheduler=client, progress=False)
    assert len(result) == sum(media.images.get(id_) is not None for id_ in media.ids)


def test_map_failures_are_recorded_and_a_rerun_fills_only_the_gaps(pictures, client):
    cats = pictures.labels.names.index("cats")
    cat_ids = [id_ for id_ in pictures.ids if pictures.labels.get(id_) == cats]
    assert len(cat_ids) == PER_CLASS

    def thumbs_but_not_cats(data):
        if data["labels"] == cats:
            raise ValueError("no cats yet")
        return thumbnail(data)

    def thumbs_of_cats_only(data):
        if data["labels"] != cats:
            raise AssertionError("called for a source that already has a thumbnail")
        return thumbnail(data)

    def run(func):
        return pictures.map(
            func,
            ["images", "labels"],
            "thumbs",
            feature=Array(item=True),
            scheduler=client,
            partition_size=3,
            progress=False,
        )

    first = run(thumbs_but_not_cats)
    assert (first.ok, first.failed, first.skipped) == (2 * PER_CLASS, PER_CLASS, 0)
    failures = pictures.failures()
    assert sorted(f.id for f in failures) == sorted(cat_ids)
    assert all(f.feature == "thumbs" and "no cats yet" in f.error for f in failures)
    assert all(pictures.thumbs.get(id_) is None for id_ in cat_ids)

    second = run(thumbs_of_cats_only)
    assert (second.ok, second.failed, second.skipped) == (PER_CLASS, 0, 2 * PER_CLASS)
    assert pictures.failures() == []  # the sources that failed have data now
    for id_ in pictures.ids:
        np.testing.assert_array_equal(
            pictures.thumbs.get(id_), thumbnail(eager(pictures, id_, ["images"]))
        )

    third = run(thumbs_of_cats_only)  # nothing left to do
    assert (third.ok, third.failed, third.skipped) == (0, 0, 3 * PER_CLASS)
    with Pictures(pictures.path) as reopened:
        assert reopened.failures() == [] and reopened.thumbs.shape[0] == 3 * PER_CLASS


def test_item_rows_written_out_of_order_come_out_by_source(pictures, client):
    images, labels = pictures.images[:], pictures.labels[:]
    dogs = pictures.labels.names.index("dogs")

    def thumbs_but_not_dogs(data):
        return None if data["labels"] == dogs else thumbnail(data)  # None: no data

    def run(func, inputs):
        return pictures.map(
            func, inputs, "thumbs", feature=Array(item=True), scheduler="threads", progress=False
        )

    assert run(thumbs_but_not_dogs, ["images", "labels"]).ok == 2 * PER_CLASS
    # Not every source has a thumbnail: the array is the concatenation of what there is.
    np.testing.assert_array_equal(
        pictures.thumbs.to_dask().compute(), images[labels != dogs][:, ::2, ::2]
    )
    assert run(thumbnail, "images").ok == PER_CLASS  # fills in the dogs, appended last
    starts = pictures.thumbs.refs[:][:, 0]
    assert sorted(starts.tolist()) == list(range(len(pictures)))
    assert not (np.diff(starts) > 0).all()  # the dogs' rows were appended last

    expected = images[:, ::2, ::2]
    for chunks in (None, (5, 3, 8, 3), (1, H // 2, W // 2, 3)):
        t = pictures.thumbs.to_dask(chunks=chunks)
        np.testing.assert_array_equal(t.compute(scheduler=client), expected)
    t, y = pictures.thumbs.to_dask(chunks=(4, H // 2, W // 2, 3)), pictures.labels.to_dask()
    (dog_mean,) = dask.compute(t[y == dogs].mean(axis=0), scheduler=client)
    np.testing.assert_allclose(dog_mean, expected[labels == dogs].mean(axis=0))
    np.testing.assert_array_equal(pictures.to_dask()["thumbs"].compute(), expected)


def thumbnail_failing_on(image):
    """``thumbnail``, raising ``ValueError("the last one")`` for the source whose image is ``image``."""

    def thumbnail_or_fail(data):
        if np.array_equal(data["images"], image):
            raise ValueError("the last one")
        return thumbnail(data)

    return thumbnail_or_fail


def test_on_error_raise_stops_the_map_and_puts_the_bank_back(pictures, client):
    path, ids = pictures.path, list(pictures.ids)
    images, labels = pictures.images[:], pictures.labels[:]
    thumbs_until_the_last = thumbnail_failing_on(images[-1])

    with pytest.raises(SourceError) as raised:
        pictures.map(
            thumbs_until_the_last,
            "images",
            "thumbs",
            feature=Array(item=True),
            scheduler=client,
            partition_size=1,
            on_error="raise",
            progress=False,
        )
    assert raised.value.id == ids[-1] and raised.value.feature == "thumbs"
    assert "the last one" in raised.value.reason
    assert os.path.exists(path) and not os.path.exists(partial_path(path))
    with Pictures(path) as bank:  # complete and readable by anyone
        assert bank.ids == ids
        np.testing.assert_array_equal(bank.images[:], images)
        np.testing.assert_array_equal(bank.labels[:], labels)
        # The writer chain commits in order: every source before the failing one kept its result.
        for i, id_ in enumerate(ids[:-1]):
            np.testing.assert_array_equal(bank.thumbs.get(id_), images[i, ::2, ::2])
        assert bank.thumbs.get(ids[-1]) is None
    np.testing.assert_array_equal(pictures.images[:], images)  # the same object reads again


# -- refusals: another writer, a running map, a changed bank --------------------------------------

HOLD_FOR_WRITING = """
import sys
from pipeline import TypedFile

bank = TypedFile(sys.argv[1], "r+")
print("open", flush=True)
sys.stdin.readline()
bank.close()
"""


@contextlib.contextmanager
def held_for_writing(path):
    """Another process holds the bank open with ``TypedFile(path, "r+")`` until the block ends."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_FOR_WRITING, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if process.stdout.readline().strip() != "open":
            process.kill()
            process.wait()
            pytest.fail(f"the writer process did not open the bank: {process.stderr.read()}")
        yield process
    finally:
        with contextlib.suppress(OSError):
            process.stdin.close()  # its readline returns: it closes the bank and exits
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


def test_a_bank_open_for_writing_in_another_process_is_refused(pictures, client):
    path = pictures.path
    images = pictures.images[:]
    x = pictures.images.to_dask()
    pictures.close()  # its shared lock would refuse the other process's writer

    with held_for_writing(path) as writer:
        with pytest.raises(BankBusyError):
            TypedFile(path)
        with pytest.raises(BankBusyError):
            Pictures(path)
        with pytest.raises(BankBusyError):
            x.compute(scheduler="sync")
        with pytest.raises(BankBusyError):
            dask.compute(x, scheduler=client)
        assert writer.poll() is None  # still holding it

    with Pictures(path) as bank:  # the writer is gone: readers open it again
        np.testing.assert_array_equal(bank.images.to_dask().compute(scheduler=client), images)


def test_an_array_made_before_a_writer_that_wrote_nothing_still_computes(pictures):
    path = pictures.path
    images = pictures.images[:]
    x = pictures.images.to_dask()
    pictures.close()
    with held_for_writing(path), pytest.raises(BankBusyError):
        x.compute(scheduler="sync")
    np.testing.assert_array_equal(x.compute(scheduler="sync"), images)  # retry once it closed


READ_ONLY = """
import sys
from pipeline import TypedFile

try:
    print(len(TypedFile(sys.argv[1])))
except Exception as error:
    print(type(error).__name__)
"""


def test_closing_a_writable_bank_after_computing_it_here_lets_others_read(pictures):
    path = pictures.path
    images = pictures.images[:]
    pictures.close()
    bank = Pictures(path, "r+")
    try:
        np.testing.assert_array_equal(bank.images.to_dask().compute(scheduler="sync"), images)
        bank.close()
        done = subprocess.run(
            [sys.executable, "-c", READ_ONLY, path], capture_output=True, text=True, timeout=120
        )
        assert done.stdout.strip() == str(len(images)), done.stdout + done.stderr
    finally:
        bank.close()
        release(path)


@contextlib.contextmanager
def map_in_progress(bank):
    """A ``bank.map(..., output="thumbs")`` running in a thread, held until the block ends.

    Its function waits for an event, so the map is certainly still writing
    (the bank renamed to its partial path) while the block runs.
    """
    go = threading.Event()
    outcome = {}

    def waiting_thumbnail(data):
        go.wait()
        return thumbnail(data)

    def run():
        try:
            outcome["summary"] = bank.map(
                waiting_thumbnail,
                "images",
                "thumbs",
                feature=Array(item=True),
                scheduler="threads",
                progress=False,
            )
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    partial = partial_path(bank.path)
    thread.start()
    try:
        deadline = time.monotonic() + 60  # only so a broken map cannot hang the suite
        while not os.path.exists(partial):
            assert thread.is_alive(), f"the map ended before writing: {outcome}"
            assert time.monotonic() < deadline, "the map never started writing"
            time.sleep(0.01)
        assert not os.path.exists(bank.path)
        yield
    finally:
        go.set()
        thread.join(timeout=120)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome
    assert outcome["summary"].ok == len(bank)


def test_readers_are_refused_while_a_map_with_output_runs(pictures, client):
    path = pictures.path
    images = pictures.images[:]
    before = pictures.images.to_dask()
    with map_in_progress(pictures):
        with pytest.raises(BuildInProgressError):
            TypedFile(path)
        with pytest.raises(BuildInProgressError):
            Pictures(path)
    with Pictures(path) as bank:
        np.testing.assert_array_equal(bank.thumbs[:], images[:, ::2, ::2])
        np.testing.assert_array_equal(bank.images.to_dask().compute(scheduler=client), images)
    # The map only added a column: an array made before it still reads the same rows.
    np.testing.assert_array_equal(before.compute(scheduler="sync"), images)


def test_a_dask_array_computed_while_a_map_with_output_runs_says_build_in_progress(pictures):
    x = pictures.images.to_dask()
    with map_in_progress(pictures), pytest.raises(BuildInProgressError):
        x.compute(scheduler="sync")


def test_arrays_made_before_a_rebuild_raise_bank_changed(pictures, client, tmp_path):
    path = pictures.path
    old = pictures.images[:]
    x = pictures.images.to_dask()
    np.testing.assert_array_equal(x.compute(scheduler=client), old)  # workers cache a handle
    pictures.close()
    other = tmp_path / "other"
    write_images(other, classes=CLASSES, per_class=PER_CLASS, seed=5)
    rebuilt = Pictures.create(path, other, mode="w", scheduler="threads", progress=False)
    new = rebuilt.images[:]
    assert new.shape == old.shape and not np.array_equal(new, old)

    with pytest.raises(BankChangedError):
        x.compute(scheduler="sync")
    with pytest.raises(BankChangedError):
        dask.compute(x, scheduler=client)
    # Arrays made from the bank as it is now read the new data, on the workers too.
    np.testing.assert_array_equal(rebuilt.images.to_dask().compute(scheduler=client), new)
    np.testing.assert_array_equal(rebuilt.images.to_dask().compute(scheduler="sync"), new)
    rebuilt.close()


def test_an_append_after_computing_on_the_cluster_works(tmp_path, any_client):
    root = tmp_path / "images"
    write_images(root, classes=("cats", "dogs"), per_class=4)
    path = tmp_path / "b.h5"
    bank = Pictures.create(path, root, scheduler=any_client, progress=False)
    before = sum(any_client.run(cache_opens).values())
    x = bank.to_dask()
    np.testing.assert_array_equal(x["images"].compute(scheduler=any_client), bank.images[:])
    assert sum(any_client.run(cache_opens).values()) > before  # the workers hold it open now
    bank.close()

    # A new first folder: the append renumbers every existing label.
    write_images(root, classes=("ants", "cats", "dogs"), per_class=6, seed=1)
    appended = Pictures.create(path, root, mode="a", scheduler=any_client, progress=False)
    assert (appended.summary.ok, appended.summary.skipped) == (10, 8)
    assert len(appended) == 18 and appended.labels.names == ["ants", "cats", "dogs"]
    arrays = appended.to_dask()
    images, labels = dask.compute(arrays["images"], arrays["labels"], scheduler=any_client)
    np.testing.assert_array_equal(images, appended.images[:])
    np.testing.assert_array_equal(labels, appended.labels[:])
    assert [appended.labels.names[label] for label in labels] == [
        id_.split("/")[0] for id_ in appended.ids
    ]
    # Arrays made before the append: the images still read their 8 rows, but the
    # labels were renumbered, so reading them would give codes of other names.
    np.testing.assert_array_equal(
        x["images"].compute(scheduler=any_client), appended.images.to_dask()[:8].compute()
    )
    with pytest.raises(BankChangedError, match="label names changed"):
        x["labels"].compute(scheduler=any_client)
    appended.close()


# -- review regressions ---------------------------------------------------------------------------


class ProcessDecoder(Image):
    """Decodes any bytes to the id of the process the decoding ran in."""

    def decode(self, data, name=""):
        return np.array([os.getpid()], dtype=np.int64)


class RawBytes(TypedFile):
    raw = Bytes(decoder=ProcessDecoder())


def decoded_in_and_called_in(data):
    """Where the input was decoded and where this call runs: two process ids."""
    return np.array([data["raw"][0], os.getpid()], dtype=np.int64)


def label_value(data):
    return np.float64(data["labels"])


def as_list(data):
    return [1, 2]


def uuid_of(bank) -> str:
    return str(layout.bank_uuid(bank.h5))


def test_arrays_made_before_rebuilds_raise_bank_changed_even_if_the_inode_comes_back(
    pictures, client, tmp_path
):
    path, root = pictures.path, tmp_path / "images"
    x = pictures.images.to_dask()
    np.testing.assert_array_equal(x.compute(scheduler=client), pictures.images[:])
    pictures.close()
    client.run(release, path)  # as a build on the cluster does: the inode is free again

    # Rebuilt twice over the same path, then deleted and created again: the filesystem is
    # free to hand the first inode back (it often does), yet each is another bank.
    for seed in (1, 2, 3):
        write_images(root, classes=CLASSES, per_class=PER_CLASS, seed=seed)
        if seed == 3:
            os.remove(path)
        Pictures.create(path, root, mode="w", scheduler="threads", progress=False).close()
        with pytest.raises(BankChangedError):
            x.compute(scheduler="sync")
        release(path)  # nothing holds this version open when the next one is written
    with pytest.raises(BankChangedError):
        dask.compute(x, scheduler=client)
    with Pictures(path) as bank:  # an array of the bank as it is now reads it
        np.testing.assert_array_equal(
            bank.images.to_dask().compute(scheduler="sync"), bank.images[:]
        )


def test_the_bank_uuid_is_kept_by_appends_and_maps_and_new_after_a_rebuild(pictures, tmp_path):
    path, root = pictures.path, tmp_path / "images"
    first = uuid_of(pictures)
    assert len(first) >= 16
    summary = pictures.map(
        thumbnail, "images", "thumbs", feature=Array(item=True), scheduler="threads", progress=False
    )
    assert summary.ok == len(pictures)
    assert uuid_of(pictures) == first
    pictures.close()
    write_images(root, classes=("zebras",), per_class=2, seed=3)
    with Pictures.create(path, root, mode="a", scheduler="threads", progress=False) as appended:
        assert appended.summary.ok == 2 and len(appended) == len(CLASSES) * PER_CLASS + 2
        assert uuid_of(appended) == first
    with Pictures.create(path, root, mode="w", scheduler="threads", progress=False) as rebuilt:
        assert uuid_of(rebuilt) != first and len(uuid_of(rebuilt)) >= 16


def test_failures_of_maps_into_different_outputs_are_kept_apart(pictures):
    cats = pictures.labels.names.index("cats")
    cat_ids = [id_ for id_ in pictures.ids if pictures.labels.get(id_) == cats]

    def fails_for_cats(data):
        if data["labels"] == cats:
            raise ValueError("no cats")
        return label_value(data)

    def run(func, output):
        return pictures.map(func, "labels", output, scheduler="threads", progress=False)

    assert run(fails_for_cats, "x").failed == PER_CLASS
    assert run(fails_for_cats, "y").failed == PER_CLASS
    both = sorted((id_, output) for id_ in cat_ids for output in ("x", "y"))
    assert sorted((f.id, f.feature) for f in pictures.failures()) == both
    assert all("no cats" in f.error for f in pictures.failures())
    # Failing again keeps one failure per (id, feature), not one per run.
    assert run(fails_for_cats, "y").failed == PER_CLASS
    assert sorted((f.id, f.feature) for f in pictures.failures()) == both
    # A re-run of "y" that works drops the failures of "y" only.
    again = run(label_value, "y")
    assert (again.ok, again.failed, again.skipped) == (PER_CLASS, 0, 2 * PER_CLASS)
    assert sorted((f.id, f.feature) for f in pictures.failures()) == [
        (i, "x") for i in sorted(cat_ids)
    ]
    with Pictures(pictures.path) as reopened:
        assert sorted(f.feature for f in reopened.failures()) == ["x"] * PER_CLASS


def test_results_stored_differently_from_the_column_are_failures(pictures):
    cats = pictures.labels.names.index("cats")

    def scalar_for_cats(data):
        return np.float64(data["labels"]) if data["labels"] == cats else np.arange(3.0)

    # One partition per class: the cats' (first committed) chooses the column's storage.
    summary = pictures.map(
        scalar_for_cats,
        "labels",
        "out",
        scheduler="threads",
        partition_size=PER_CLASS,
        progress=False,
    )
    assert (summary.ok, summary.failed) == (PER_CLASS, 2 * PER_CLASS)
    storage = pictures.out.storage
    failed = {f.id: f.error for f in pictures.failures()}
    assert len(failed) == 2 * PER_CLASS
    for id_ in pictures.ids:
        value = pictures.out.get(id_)  # every stored value reads back
        if pictures.labels.get(id_) == cats:
            assert id_ not in failed
            np.testing.assert_array_equal(value, scalar_for_cats({"labels": cats}))
        else:
            assert value is None
            assert "stor" in failed[id_] and repr(storage) in failed[id_]
    np.testing.assert_array_equal(
        pictures.out.to_dask().compute(scheduler="sync").ravel(), [cats] * PER_CLASS
    )


def test_map_without_output_on_a_non_default_client_leaves_a_writable_bank_usable(pictures, client):
    path = pictures.path
    images = pictures.images[:]
    pictures.close()
    bank = Pictures(path, "r+")
    try:
        result = bank.map(channel_means, "images", scheduler=client, progress=False)
        assert list(result) == bank.ids and result.failures == []
        for i, id_ in enumerate(bank.ids):
            np.testing.assert_allclose(result[id_], images[i].reshape(-1, 3).mean(axis=0))
        # The workers read the bank: the map released their handles, so it is writable again.
        assert len(bank) == len(images)
        np.testing.assert_array_equal(bank.images[:], images)
        bank.add("extra", {"images": np.zeros((H, W, 3), np.uint8)})
        assert len(bank) == len(images) + 1 and bank.images.get("extra").shape == (H, W, 3)
    finally:
        bank.close()


def test_persisted_blocks_are_not_served_for_an_array_made_after_a_set(pictures, client):
    path, first = pictures.path, pictures.ids[0]
    old = pictures.images[:]
    x1 = client.persist(pictures.images.to_dask())
    np.testing.assert_array_equal(x1.compute(scheduler=client), old)
    pictures.close()
    client.run(release, path)  # the workers' cached handles would refuse the writer
    with Pictures(path, "r+") as bank:
        bank.images.set(first, 255 - old[0])  # same size: rewritten in place
    with Pictures(path) as bank:
        new = bank.images[:]
        x2 = bank.images.to_dask()
    assert not np.array_equal(new[0], old[0]) and np.array_equal(new[1:], old[1:])
    assert x1.name != x2.name
    np.testing.assert_array_equal(client.persist(x2).compute(scheduler=client), new)


def test_bags_made_before_an_append_that_renumbers_labels(pictures, tmp_path):
    path, ids = pictures.path, pictures.ids
    images = pictures.images[:]
    labels_bag = pictures.labels.to_dask_sources()
    images_bag = pictures.images.to_dask_sources()
    pictures.close()
    write_images(tmp_path / "images", classes=("aardvarks",), per_class=2, seed=5)
    with Pictures.create(
        path, tmp_path / "images", mode="a", scheduler="threads", progress=False
    ) as appended:
        assert appended.labels.names == ["aardvarks", *CLASSES]  # every earlier code moved up
    with pytest.raises(BankChangedError, match="label names changed"):
        labels_bag.compute(scheduler="sync")
    old_rows = dict(images_bag.compute(scheduler="sync"))
    assert list(old_rows) == ids
    for i, id_ in enumerate(ids):
        np.testing.assert_array_equal(old_rows[id_], images[i])


def test_map_inputs_are_decoded_where_the_function_runs(pictures, client, tmp_path):
    bank = RawBytes.create(
        tmp_path / "raw.h5", tmp_path / "images", scheduler="threads", progress=False
    )
    workers = client.run(os.getpid)
    # The writer is pinned to the first worker (address order); keeping the function's
    # tasks on the other one makes sure the writer is not where the function runs.
    other = sorted(workers)[-1]
    try:
        with dask.annotate(workers=[other], allow_other_workers=False):
            summary = bank.map(
                decoded_in_and_called_in,
                "raw",
                "pids",
                scheduler=client,
                partition_size=2,
                progress=False,
            )
        assert summary.ok == len(bank) == len(CLASSES) * PER_CLASS
        assert summary.writer_pid in workers.values() and summary.writer_pid != workers[other]
        for id_ in bank.ids:
            decoded_in, called_in = (int(v) for v in bank.pids.get(id_))
            assert called_in == workers[other]
            assert decoded_in == called_in, (id_, decoded_in, called_in, summary.writer_pid)
    finally:
        bank.close()


def called_in(data):
    """The process this call runs in."""
    return np.array([os.getpid()], dtype=np.int64)


def test_map_functions_spread_over_every_worker(pictures, client):
    """The function tasks go round robin over the workers, like a build's decode tasks, not
    all where their inputs were read (the writer's worker)."""
    from distributed import get_task_stream

    workers = client.run(os.getpid)
    assert len(workers) == 2
    with get_task_stream(client) as stream:
        summary = pictures.map(
            called_in, "labels", "pid", scheduler=client, partition_size=1, progress=False
        )
    n = len(CLASSES) * PER_CLASS
    assert summary.ok == len(pictures) == n
    ran = [t["worker"] for t in stream.data if str(t["key"]).startswith("h5bank-map-")]
    assert len(ran) == n and set(ran) == set(workers)
    assert min(ran.count(w) for w in workers) >= n // 3, [ran.count(w) for w in workers]
    # The inputs are read where the results are written: one worker.
    reads = {t["worker"] for t in stream.data if str(t["key"]).startswith("h5bank-read-")}
    writes = {t["worker"] for t in stream.data if str(t["key"]).startswith("h5bank-write-")}
    assert len(reads) == 1 and reads == writes
    pids = [int(pictures.pid.get(id_)[0]) for id_ in pictures.ids]
    assert set(pids) == set(workers.values())


def test_to_dask_warns_when_item_or_category_rows_are_not_the_sources(pictures):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pictures.to_dask()  # every source has data in every column: no warning
    dogs = pictures.labels.names.index("dogs")

    def thumbs_but_not_dogs(data):
        return None if data["labels"] == dogs else thumbnail(data)

    pictures.map(
        thumbs_but_not_dogs,
        ["images", "labels"],
        "thumbs",
        feature=Array(item=True),
        scheduler="threads",
        progress=False,
    )
    n = len(pictures)
    with pytest.warns(UserWarning) as caught:
        arrays = pictures.to_dask()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages  # the thumbs only: images and labels cover every source
    assert f"'thumbs' has data for {n - PER_CLASS} of the bank's {n} sources" in messages[0]
    assert arrays["thumbs"].shape[0] == n - PER_CLASS
    path = pictures.path
    pictures.close()
    with Pictures(path, "r+") as bank:  # a source with an image and no label
        bank.add("unlabelled", {"images": np.zeros((H, W, 3), np.uint8)})
        with pytest.warns(UserWarning) as caught:
            arrays = bank.to_dask()
    labels = [str(w.message) for w in caught if "'labels'" in str(w.message)]
    assert len(labels) == 1 and f"data for {n} of the bank's {n + 1} sources" in labels[0]
    assert arrays["labels"].shape == (n,) and arrays["images"].shape[0] == n + 1


def test_an_unstorable_result_is_a_failure_of_its_source_only(pictures):
    cats = pictures.labels.names.index("cats")
    cat_ids = [id_ for id_ in pictures.ids if pictures.labels.get(id_) == cats]

    def ragged_for_cats(data):
        return [[1], [1, 2]] if data["labels"] == cats else np.zeros(2)

    summary = pictures.map(
        ragged_for_cats, "labels", "r", on_error="skip", scheduler="threads", progress=False
    )
    assert (summary.ok, summary.failed) == (2 * PER_CLASS, PER_CLASS)
    assert sorted(f.id for f in pictures.failures()) == sorted(cat_ids)
    assert all(f.feature == "r" for f in pictures.failures())
    for id_ in pictures.ids:
        value = pictures.r.get(id_)
        if id_ in cat_ids:
            assert value is None
        else:
            np.testing.assert_array_equal(value, np.zeros(2))


def test_threads_after_computing_on_the_default_client(pictures, cluster, tmp_path):
    path = pictures.path
    images = pictures.images[:]
    with Client(cluster) as default:
        assert default_client() is default
        before = sum(default.run(cache_opens).values())
        total = pictures.images.to_dask().sum().compute()  # on the default client's workers
        assert int(total) == int(images.sum(dtype=np.int64))
        assert sum(default.run(cache_opens).values()) > before  # they hold the bank open
        summary = pictures.map(label_value, "labels", "one", scheduler="threads", progress=False)
        assert summary.ok == len(images)
        pictures.close()
        write_images(tmp_path / "images", classes=("zebras",), per_class=2, seed=3)
        with Pictures.create(
            path, tmp_path / "images", mode="a", scheduler="threads", progress=False
        ) as appended:
            assert (appended.summary.ok, len(appended)) == (2, len(images) + 2)
            np.testing.assert_array_equal(appended.images[: len(images)], images)


def test_on_error_raise_without_output_stops_at_the_first_failure(pictures):
    calls = []

    def fails(data):
        calls.append(1)
        raise ValueError("boom")

    with pytest.raises(SourceError, match="boom"):
        pictures.map(
            fails, "images", scheduler="sync", partition_size=1, on_error="raise", progress=False
        )
    assert len(calls) == 1 < len(pictures)  # not one call per source before raising
    assert len(pictures) == len(CLASSES) * PER_CLASS  # reopened


def test_a_failed_map_with_output_says_the_bank_was_put_back(pictures):
    path = pictures.path
    last = pictures.ids[-1]
    fails_on_the_last = thumbnail_failing_on(pictures.images[-1])

    with pytest.raises(SourceError) as raised:
        pictures.map(
            fails_on_the_last,
            "images",
            "thumbs",
            feature=Array(item=True),
            scheduler="threads",
            partition_size=1,
            on_error="raise",
            progress=False,
        )
    assert raised.value.id == last
    notes = getattr(raised.value, "__notes__", [])
    assert any(path in note and "put back" in note for note in notes), notes
    assert os.path.exists(path) and not os.path.exists(partial_path(path))


def test_a_map_result_of_the_wrong_kind_names_the_function(pictures):
    summary = pictures.map(
        as_list, "labels", "lst", feature=Array(), scheduler="threads", progress=False
    )
    assert summary.failed == len(pictures) and summary.ok == 0
    errors = [f.error for f in pictures.failures()]
    assert len(errors) == len(pictures)
    assert all("as_list() returned list" in e and "load()" not in e for e in errors), errors[0]


def test_a_map_output_inside_a_column_is_refused_before_writing(pictures):
    path = pictures.path
    columns = list(layout.iter_columns(pictures.h5))
    attrs = dict(pictures.h5.attrs)
    mtime = os.stat(path).st_mtime_ns
    with pytest.raises(ValueError, match="inside the column 'images'"):
        pictures.map(channel_means, "images", "images/mean", scheduler="threads", progress=False)
    assert os.stat(path).st_mtime_ns == mtime and not os.path.exists(partial_path(path))
    with Pictures(path) as bank:
        assert list(layout.iter_columns(bank.h5)) == columns
        assert bank.h5.attrs[layout.ATTR_SCHEMA] == attrs[layout.ATTR_SCHEMA]
        assert bank.failures() == []


def test_a_summary_lists_the_failures_of_its_own_run_only(images, tmp_path):
    (images / "cats" / "broken.png").write_text("<html>not a png</html>")
    bank = Pictures.create(tmp_path / "b.h5", images, scheduler="threads", progress=False)
    assert [f.id for f in bank.summary.failures] == ["cats/broken.png"]
    summary = bank.map(
        lambda d: d["images"][::2, ::2], inputs="images", output="thumbs",
        feature=Array(item=True), scheduler="threads", progress=False,
    )  # fmt: skip
    assert summary.failed == 0 and summary.failures == [] and "failed:" not in str(summary)
    assert [f.id for f in bank.failures()] == ["cats/broken.png"]  # the bank still has it
