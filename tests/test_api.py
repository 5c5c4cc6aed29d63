"""The public API on real banks: bank types, create, open, read and write by id, refs and slice.

Each test is a small example of use. Builds run on the real two-process Dask
cluster (``client``) unless a test needs the in-process scheduler.
"""

from __future__ import annotations

import os
import re

import h5py
import imageio.v3 as iio
import numpy as np
import pytest
from conftest import write_images

import pipeline
from features import Array, DirLabels, Feature, Image, Sound
from pipeline import Group, TypedFile
from pipeline.bank.proxies import DatasetProxy
from pipeline.format import layout
from pipeline.format.partial import partial_path


class Pictures(TypedFile):
    images = Image(mode="RGB")
    labels = DirLabels()


class Experiment(TypedFile):
    data = Group(images=Image(), labels=DirLabels())
    logs = Group(loss=Array())


class Nested(TypedFile):
    data = Group(
        raw=Group(images=Image(mode="L"), thumbs=Image(size=(4, 4), derived_from="images")),
        labels=DirLabels(),
    )


class ByteCount(Feature):
    """A custom feature: the size of each PNG, with a method of its own."""

    __re__ = r"\.png$"

    def __init__(self, scale: float = 1.0, **options) -> None:
        super().__init__(**options)
        self.scale = scale

    @property
    def attrs(self) -> dict:
        return {"scale": self.scale}

    def load(self, source) -> np.ndarray:
        return np.array([len(source.read()) * self.scale])

    def describe_batch(self, batch: np.ndarray) -> dict:
        return {"n": len(batch), "total": float(batch.sum())}


class Measured(TypedFile):
    images = Image(mode="RGB", compression="gzip")
    size = ByteCount(scale=2.0)


def build(bank_type, path, sources, client, **kwargs):
    return bank_type.create(path, sources, scheduler=client, progress=False, **kwargs)


def reopen(bank, mode="r+"):
    bank.close()
    return type(bank)(bank.path, mode)


def source_ids(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))


# -- bank types -------------------------------------------------------------------


def test_groups_nest_and_read_like_the_schema(images, tmp_path, client):
    bank = build(Nested, tmp_path / "b.h5", images, client)
    assert isinstance(bank.data, pipeline.GroupProxy)
    assert isinstance(bank.data.raw, pipeline.GroupProxy)
    assert isinstance(bank.data.raw.images, pipeline.FeatureProxy)
    first = bank.ids[0]
    record = bank.get(first)
    assert set(record) == {"data"}
    assert set(record["data"]) == {"raw", "labels"}
    assert set(record["data"]["raw"]) == {"images", "thumbs"}
    np.testing.assert_array_equal(
        record["data"]["raw"]["images"], iio.imread(images / first, mode="L")
    )
    assert record["data"]["raw"]["thumbs"].shape == (4, 4)
    assert bank.data.raw.get(first).keys() == record["data"]["raw"].keys()
    assert bank.feature("data/raw/thumbs").shape == (12, 4, 4)


# -- create -----------------------------------------------------------------------


def test_create_returns_the_bank_opened_for_reading_and_writable_on_demand(
    images, tmp_path, client
):
    bank = Pictures.create(
        tmp_path / "b.h5",
        images,
        mode="w",
        scheduler=client,
        partition_size=5,
        on_error="skip",
        progress=False,
        max_pending=2,
    )
    assert isinstance(bank, Pictures)
    assert bank.mode == "r"
    assert bank.h5.mode == "r"  # readable by the cluster's workers meanwhile
    assert bank.summary.ok == 12
    assert bank.images.to_dask().shape[0] > 0 and client.run(pipeline.release)
    # As h5mapper's create (which returns the file in "r+"): the first write reopens it.
    bank.add("extra", {"images": np.zeros((2, 2, 3), np.uint8)})
    assert bank.mode == "r+" and bank.h5.mode == "r+"
    assert len(bank) == 13 and bank.images.get("extra").shape == (2, 2, 3)
    with Pictures(tmp_path / "b.h5") as again, pytest.raises(pipeline.ReadOnlyError):
        again.add("more", {"images": np.zeros((2, 2, 3), np.uint8)})  # opened read-only: stays so
    bank.close()


def test_a_bank_open_in_this_process_does_not_stop_opening_it_for_writing(images, tmp_path):
    bank = Pictures.create(tmp_path / "b.h5", images, scheduler="threads", progress=False)
    reader = Pictures(tmp_path / "b.h5")
    first = reader.ids[0]
    with Pictures(tmp_path / "b.h5", mode="r+") as writer:  # HDF5 alone: "already open"
        writer.add("new", {"labels": "cats"})
        assert len(bank) == 13 and "new" in reader  # the readers reopened, and see it
    assert reader.get(first)["labels"] == bank.get(first)["labels"]
    plain = h5py.File(tmp_path / "b.h5", "r")  # not h5bank's to close: the writer says so
    bank.close(), reader.close()
    with pytest.raises(pipeline.BankBusyError, match="outside h5bank"):
        Pictures(tmp_path / "b.h5", mode="r+")
    plain.close()


def test_create_prints_a_summary_with_progress(images, tmp_path, capsys):
    Pictures.create(tmp_path / "b.h5", images, scheduler="threads", progress=True)
    assert "12 sources ok, 0 failed" in capsys.readouterr().err


# -- opening ----------------------------------------------------------------------


def test_open_modes(images, tmp_path, client):
    build(Pictures, tmp_path / "b.h5", images, client).close()
    with Pictures(tmp_path / "b.h5") as bank:
        assert bank.mode == "r" and len(bank) == 12
    with Pictures(tmp_path / "b.h5", mode="r+") as bank:
        bank.add("extra", {"images": np.zeros((2, 2, 3), np.uint8)})
    with Pictures(tmp_path / "b.h5", mode="a") as bank:
        assert len(bank) == 13 and bank.ids[-1] == "extra"


def test_mode_a_on_a_missing_path_creates_an_empty_bank(tmp_path):
    path = tmp_path / "new.h5"
    with Pictures(path, mode="a") as bank:
        assert len(bank) == 0 and bank.ids == []
        bank.add("first", {"images": np.full((3, 2, 3), 9, np.uint8)})
    with Pictures(path) as bank:
        assert bank.ids == ["first"]
        np.testing.assert_array_equal(bank.images.get("first"), np.full((3, 2, 3), 9, np.uint8))
        assert bank.labels.get("first") is None


def test_typedfile_opens_any_hdf5_file(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("run/metrics/loss", data=np.arange(12.0).reshape(3, 4))
        f["run/metrics/loss"].attrs["unit"] = "nats"
        f.create_dataset("weights", data=np.ones(5, np.float32))
    with TypedFile(path) as f:
        assert isinstance(f.run, pipeline.GroupProxy)
        assert isinstance(f.run.metrics, pipeline.GroupProxy)
        loss = f.run.metrics.loss
        assert isinstance(loss, DatasetProxy)
        assert loss.shape == (3, 4)
        assert loss.dtype == np.float64
        assert loss.attrs["unit"] == "nats"
        np.testing.assert_array_equal(loss[1:, ::2], [[4.0, 6.0], [8.0, 10.0]])
        np.testing.assert_array_equal(loss[...], np.arange(12.0).reshape(3, 4))
        assert len(f.weights) == 5 and f.weights.dtype == np.float32
        np.testing.assert_array_equal(f.feature("weights")[[0, 4]], [1.0, 1.0])
        tree = repr(f)
        assert "run/" in tree and "metrics/" in tree and "loss" in tree and "(3, 4)" in tree


def test_a_bank_type_refuses_a_plain_hdf5_file(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(3))
    with pytest.raises(pipeline.NotABankError, match="plain\\.h5"):
        Pictures(path)


def test_plain_typedfile_opens_a_bank(images, tmp_path, client):
    bank = build(Pictures, tmp_path / "b.h5", images, client)
    expected = bank.images.get(bank.ids[3])
    bank.close()
    with TypedFile(tmp_path / "b.h5") as f:
        assert f.ids == bank.ids
        np.testing.assert_array_equal(f.images.get(f.ids[3]), expected)
        assert f.labels.names == ["cats", "dogs"]


def test_plain_typedfile_opens_a_bank_of_fixed_size_images(images, tmp_path, client):
    bank = build(Nested, tmp_path / "b.h5", images, client)
    thumbs = bank.data.raw.thumbs[:]
    bank.close()
    with TypedFile(tmp_path / "b.h5") as f:
        np.testing.assert_array_equal(f.data.raw.thumbs[:], thumbs)


def test_context_manager_closes_the_file(images, tmp_path, client):
    build(Pictures, tmp_path / "b.h5", images, client).close()
    with Pictures(tmp_path / "b.h5") as bank:
        h5 = bank.h5
        assert h5
    assert not h5  # h5py files are falsy once closed
    assert "(closed)" in repr(bank)
    with h5py.File(tmp_path / "b.h5", "r+"):  # nothing holds the file any more
        pass


# -- ids, get and add ---------------------------------------------------------------


def test_ids_len_and_membership(images, tmp_path, client):
    bank = build(Pictures, tmp_path / "b.h5", images, client, partition_size=2)
    assert len(bank) == 12
    assert bank.ids == source_ids(images)  # commit order is source order
    assert "cats/cats_000.png" in bank
    assert "cats/cats_999.png" not in bank
    assert 3 not in bank


def test_get_leaves_out_features_without_data(images, tmp_path, client):
    bank = reopen(build(Experiment, tmp_path / "b.h5", images, client))
    bank.logs.add("train", {"loss": np.arange(4.0)})
    image_record = bank.get("dogs/dogs_002.png")
    assert set(image_record) == {"data"}
    assert set(image_record["data"]) == {"images", "labels"}
    assert image_record["data"]["labels"] == 1
    train = bank.get("train")
    assert set(train) == {"logs"} and set(train["logs"]) == {"loss"}
    np.testing.assert_array_equal(train["logs"]["loss"], np.arange(4.0))


def test_add_creates_ids_and_features_on_first_write(images, tmp_path, client):
    path = tmp_path / "b.h5"
    bank = reopen(build(Pictures, path, images, client))
    losses = np.linspace(1.0, 0.1, 10)
    bank.add("train", {"logs": {"loss": losses}})  # Pictures has no logs group
    bank.add(
        "epoch-3",
        {
            "checkpoint": {"w": np.ones((3, 4)), "b": np.zeros(4), "step": np.array([3])},
            "metric": np.float64(0.75),
            "note": "lr dropped",
            "blob": b"\x00\x01\xff",
        },
    )
    assert bank.ids[-2:] == ["train", "epoch-3"]
    assert len(bank) == 14

    def check(f):
        assert f.ids[-2:] == ["train", "epoch-3"]
        np.testing.assert_array_equal(f.logs.loss.get("train"), losses)
        ckpt = f.get("epoch-3")["checkpoint"]
        assert {k: v.shape for k, v in ckpt.items()} == {"w": (3, 4), "b": (4,), "step": (1,)}
        np.testing.assert_array_equal(ckpt["w"], np.ones((3, 4)))
        assert f.metric.get("epoch-3").item() == 0.75
        assert f.note.get("epoch-3") == "lr dropped"
        assert f.blob.get("epoch-3") == b"\x00\x01\xff"
        assert f.logs.loss.refs[0] is None  # an image source has no logs

    check(bank)
    bank.close()
    with Pictures(path) as again:
        check(again)
        assert type(again.note.feature).__name__ == "String"
        assert type(again.blob.feature).__name__ == "Bytes"
    with TypedFile(path) as plain:
        check(plain)


def test_add_a_python_float_metric(tmp_path):
    with Pictures(tmp_path / "b.h5", mode="a") as bank:
        bank.add("epoch-1", {"accuracy": 0.93})
        assert bank.accuracy.get("epoch-1").item() == 0.93


def test_add_to_an_id_that_has_data_asks_for_set(images, tmp_path, client):
    bank = reopen(build(Pictures, tmp_path / "b.h5", images, client))
    first = bank.ids[0]
    with pytest.raises(ValueError, match=r"set\(\)") as raised:
        bank.add(first, {"images": np.zeros((2, 2, 3), np.uint8)})
    assert first in str(raised.value)
    with pytest.raises(ValueError, match=r"set\(\)"):
        bank.images.add(first, np.zeros((2, 2, 3), np.uint8))
    np.testing.assert_array_equal(bank.images.get(first), iio.imread(images / first, mode="RGB"))
    bank.add(first, {"score": np.array([0.5])})  # a feature it has no data for yet is fine
    assert bank.score.get(first).item() == 0.5


def test_a_refused_add_writes_nothing(images, tmp_path, client):
    bank = reopen(build(Pictures, tmp_path / "b.h5", images, client))
    first = bank.ids[0]
    with pytest.raises(ValueError, match=r"set\(\)"):
        bank.add(first, {"extra": np.ones(3), "images": np.zeros((2, 2, 3), np.uint8)})
    assert "extra" not in bank.get(first)


def test_a_refused_new_feature_leaves_no_trace(tmp_path):
    with Pictures(tmp_path / "b.h5", mode="a") as bank:
        with pytest.raises(pipeline.FeatureTypeError):
            bank.add("run", {"comment": [1, 2]})  # a list is not storable
        assert "comment" not in repr(bank)
        bank.add("run", {"comment": "fine"})
        assert bank.comment.get("run") == "fine"


# -- group proxies ----------------------------------------------------------------


def test_group_proxy_reads_and_writes_by_id(tmp_path):
    with Experiment(tmp_path / "b.h5", mode="a") as bank:
        bank.logs.add("run-1", {"loss": np.arange(5.0)})
        np.testing.assert_equal(bank.logs["run-1"], bank.logs.get("run-1"))
        np.testing.assert_array_equal(bank.logs["run-1"]["loss"], np.arange(5.0))
        bank.logs.set("run-1", {"loss": np.arange(5.0) * 2})  # same size: in place
        np.testing.assert_array_equal(bank.logs.get("run-1")["loss"], np.arange(5.0) * 2)
        bank.logs.set("run-1", {"loss": np.ones(8)})  # new size: appended
        np.testing.assert_array_equal(bank.logs.get("run-1")["loss"], np.ones(8))
        bank.data.add("run-1", {"images": np.full((2, 3), 4, np.uint8)})
        assert set(bank.get("run-1")) == {"logs", "data"}
        with pytest.raises(pipeline.UnknownIdError, match="run-2"):
            bank.logs["run-2"]


# -- feature proxies ----------------------------------------------------------------


def test_feature_proxy_indexes_the_concatenation(images, tmp_path, client):
    bank = build(Pictures, tmp_path / "b.h5", images, client)
    with h5py.File(bank.path, "r") as f:
        data = f["images/data"][:]
    proxy = bank.images
    assert proxy.shape == data.shape and proxy.dtype == np.uint8 and len(proxy) == len(data)
    assert proxy[5] == data[5]
    np.testing.assert_array_equal(proxy[10:20], data[10:20])
    np.testing.assert_array_equal(proxy[...], data)
    np.testing.assert_array_equal(proxy[[0, 3, 7]], data[[0, 3, 7]])
    np.testing.assert_array_equal(bank.labels[:], [0] * 6 + [1] * 6)


def test_refs_find_each_source(images, tmp_path, client):
    bank = reopen(build(Experiment, tmp_path / "b.h5", images, client))
    bank.logs.add("train", {"loss": np.arange(3.0)})
    images_proxy = bank.data.images
    for i, id_ in enumerate(bank.ids[:12]):
        ref = images_proxy.refs[i]
        assert isinstance(ref, slice)
        # Image() without size is stored flat; its refs give each image back in its shape.
        np.testing.assert_array_equal(images_proxy[ref], iio.imread(images / id_))
    table = images_proxy.refs[:]
    assert table.shape == (13, 2) and table.dtype == np.int64
    assert table[12].tolist() == [-1, -1]
    assert images_proxy.refs[12] is None and images_proxy.refs[-1] is None
    assert bank.logs.loss.refs[:][:12].tolist() == [[-1, -1]] * 12
    assert bank.logs.loss.refs[12] == slice(0, 3)
    np.testing.assert_array_equal(bank.logs.loss[bank.logs.loss.refs[12]], np.arange(3.0))


def test_fixed_size_features_index_one_item_per_source(images, tmp_path, client):
    bank = build(Nested, tmp_path / "b.h5", images, client)
    thumbs = bank.data.raw.thumbs
    assert thumbs.refs[4] == slice(4, 5)
    np.testing.assert_array_equal(thumbs[thumbs.refs[4]][0], thumbs.get(bank.ids[4]))
    np.testing.assert_array_equal(thumbs[4], thumbs.get(bank.ids[4]))


def test_feature_proxy_set_in_place_and_appended(images, tmp_path, client):
    bank = reopen(build(Pictures, tmp_path / "b.h5", images, client))
    first = bank.ids[0]
    image = bank.images.get(first)
    ref, rows = bank.images.refs[0], len(bank.images)

    bank.images.set(first, 255 - image)  # same size: rewritten where it was
    assert bank.images.refs[0] == ref and len(bank.images) == rows
    np.testing.assert_array_equal(bank.images.get(first), 255 - image)

    turned = np.ascontiguousarray(np.swapaxes(image, 0, 1))
    bank.images.set(first, turned)  # same size, another shape: in place, shape recorded
    assert bank.images.refs[0] == ref and len(bank.images) == rows
    np.testing.assert_array_equal(bank.images[bank.images.refs[0]], turned)

    small = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    bank.images.set(first, small)  # another size: appended, ref moved
    assert bank.images.refs[0] == slice(rows, rows + small.size)
    assert len(bank.images) == rows + small.size
    np.testing.assert_array_equal(bank.images.get(first), small)
    np.testing.assert_array_equal(bank.images[bank.images.refs[0]], small)
    second = bank.ids[1]
    np.testing.assert_array_equal(bank.images.get(second), iio.imread(images / second, mode="RGB"))
    bank.close()
    with Pictures(tmp_path / "b.h5") as again:
        np.testing.assert_array_equal(again.images.get(first), small)


def test_a_flat_feature_writes_back_what_its_refs_read(images, tmp_path, client):
    bank = reopen(build(Pictures, tmp_path / "b.h5", images, client))
    ref = bank.images.refs[0]
    image = bank.images[ref]
    bank.images[ref] = 255 - image
    np.testing.assert_array_equal(bank.images.get(bank.ids[0]), 255 - image)


def test_feature_proxy_setitem(tmp_path):
    with Experiment(tmp_path / "b.h5", mode="a") as bank:
        bank.logs.add("a", {"loss": np.arange(4.0)})
        bank.logs.add("b", {"loss": np.arange(4.0, 6.0)})
        bank.logs.loss[0:2] = [-1.0, -2.0]
        np.testing.assert_array_equal(bank.logs.loss[:], [-1.0, -2.0, 2.0, 3.0, 4.0, 5.0])
        bank.logs.loss[...] = 0.5
        np.testing.assert_array_equal(bank.logs.get("b")["loss"], [0.5, 0.5])


def test_feature_parameters_and_methods_through_the_proxy(images, tmp_path, client):
    bank = build(Measured, tmp_path / "b.h5", images, client)
    assert bank.images.attrs["mode"] == "RGB"
    assert bank.size.attrs["scale"] == 2.0
    assert bank.size.scale == 2.0
    sizes = [os.path.getsize(images / id_) * 2.0 for id_ in bank.ids[:2]]
    assert bank.size.describe_batch(bank.size[:2]) == {"n": 2, "total": sum(sizes)}


def test_sample_rate_is_an_attribute(sounds, tmp_path, client):
    class Sounds(TypedFile):
        audio = Sound(sr=8000)

    bank = build(Sounds, tmp_path / "b.h5", sounds, client)
    assert bank.audio.attrs["sr"] == 8000
    assert bank.audio.sr == 8000
    assert bank.audio.dtype == np.int16 and bank.audio.shape == (len(bank.audio),)
    assert bank.audio.get(bank.ids[0]).dtype == np.float32  # reads scale them


def test_label_names_are_attributes(images, tmp_path, client):
    bank = build(Pictures, tmp_path / "b.h5", images, client)
    assert list(bank.labels.attrs["names"]) == ["cats", "dogs"]
    assert bank.labels.names == ["cats", "dogs"]


# -- display ------------------------------------------------------------------------


def test_info_and_repr_show_the_tree(images, tmp_path, client, capsys):
    bank = build(Measured, tmp_path / "b.h5", images, client)
    bank.info()
    printed = capsys.readouterr().out
    assert printed.strip() == repr(bank)
    head, *lines = printed.strip().splitlines()
    assert "12 sources" in head and "format v1" in head
    assert re.search(r"\d+(\.\d)? (B|KB|MB)", head)  # bytes on disk
    images_line = next(line for line in lines if line.strip().startswith("images"))
    assert "gzip" in images_line and "uint8" in images_line
    assert re.search(r"\d+(\.\d)? (B|KB|MB)", images_line)
    assert str(bank.images.shape) in images_line and "12 sources" in images_line
    size_line = next(line for line in lines if line.strip().startswith("size"))
    assert "gzip" not in size_line and "none" in size_line and "float64" in size_line


def test_repr_shows_groups(images, tmp_path, client):
    bank = build(Nested, tmp_path / "b.h5", images, client)
    lines = repr(bank).splitlines()
    assert "data/" in lines
    assert "  raw/" in lines
    assert any(line.startswith("    thumbs") and "(12, 4, 4)" in line for line in lines)
    assert any(line.startswith("  labels") and "names=cats,dogs" in line for line in lines)


# -- errors -------------------------------------------------------------------------


class NoFeatures(TypedFile):
    pass


class ReturnsAList(Feature):
    __re__ = r"\.png$"

    def load(self, source):
        return [1, 2, 3]


class Broken(TypedFile):
    images = Image()
    broken = ReturnsAList()


def test_an_empty_schema_is_refused(images, tmp_path, client):
    with pytest.raises(pipeline.SchemaError, match="no features"):
        build(NoFeatures, tmp_path / "b.h5", images, client)
    assert not (tmp_path / "b.h5").exists()


def test_derived_from_a_missing_feature_is_refused_at_class_definition():
    with pytest.raises(pipeline.SchemaError, match="pictures"):

        class Thumbs(TypedFile):
            images = Image()
            thumbs = Image(size=(8, 8), derived_from="pictures")


def test_a_feature_returning_a_wrong_type_names_the_source(images, tmp_path, client):
    with pytest.raises(pipeline.SourceError) as raised:
        build(Broken, tmp_path / "b.h5", images, client, on_error="raise")
    error = raised.value
    assert error.id == "cats/cats_000.png" and error.feature == "broken"
    assert "cats/cats_000.png" in str(error) and "broken" in str(error)
    assert "list" in str(error)


def test_unknown_id(images, tmp_path, client):
    bank = build(Pictures, tmp_path / "b.h5", images, client)
    for read in (bank.get, bank.root.get, bank.images.get, bank.labels.get):
        with pytest.raises(pipeline.UnknownIdError, match=r"cats/nope\.png"):
            read("cats/nope.png")
    with pytest.raises(KeyError):
        bank.get("cats/nope.png")


def test_writes_to_a_read_only_bank_are_refused(images, tmp_path, client):
    build(Experiment, tmp_path / "b.h5", images, client).close()
    bank = Experiment(tmp_path / "b.h5")  # mode="r" (create's bank takes writes: see above)
    first = bank.ids[0]
    before = bank.data.images[:]
    image = np.zeros((2, 2), np.uint8)
    writes = [
        lambda: bank.add("new", {"logs": {"loss": np.ones(2)}}),
        lambda: bank.set(first, {"data": {"images": image}}),
        lambda: bank.data.add("new", {"images": image}),
        lambda: bank.data.set(first, {"images": image}),
        lambda: bank.data.images.set(first, image),
        lambda: bank.data.images.__setitem__(slice(0, 2), 0),
    ]
    for write in writes:
        with pytest.raises(pipeline.ReadOnlyError):
            write()
    np.testing.assert_array_equal(bank.data.images[:], before)
    assert len(bank) == 12 and "new" not in bank
    bank.close()
    with Experiment(bank.path) as again:
        assert len(again) == 12 and len(again.logs.loss) == 0


def test_an_unknown_format_version_is_refused(images, tmp_path, client):
    build(Pictures, tmp_path / "b.h5", images, client).close()
    with h5py.File(tmp_path / "b.h5", "r+") as f:
        f.attrs["h5bank_version"] = 99
    for bank_type in (Pictures, TypedFile):
        with pytest.raises(pipeline.FormatVersionError, match="99"):
            bank_type(tmp_path / "b.h5")


def test_an_unfinished_build_is_refused(tmp_path):
    path = tmp_path / "b.h5"
    with h5py.File(partial_path(path), "w") as f:
        f.create_dataset("x", data=np.arange(3))
    for mode in ("r", "r+", "a"):
        with pytest.raises(pipeline.BuildInProgressError, match="partial"):
            Pictures(path, mode=mode)
    assert not path.exists()


def test_on_error_skip_records_the_failure(images, tmp_path, client):
    (images / "cats" / "cats_002.png").write_bytes(b"not a png")
    bank = build(Pictures, tmp_path / "b.h5", images, client, on_error="skip")
    assert len(bank) == 11 and "cats/cats_002.png" not in bank
    (failure,) = bank.failures()
    assert failure.id == "cats/cats_002.png" and failure.feature == "images"


def test_a_failed_build_resumes_with_mode_a(images, tmp_path, client):
    path = tmp_path / "b.h5"
    bad = images / "dogs" / "dogs_001.png"
    bad.write_text("<html>not an image</html>")
    with pytest.raises(pipeline.SourceError) as raised:
        build(Pictures, path, images, client, on_error="raise", partition_size=2)
    assert raised.value.id == "dogs/dogs_001.png"
    assert raised.value.feature == "images"
    assert not path.exists()
    committed = []  # sources the stopped build committed before the bad one
    if os.path.exists(partial_path(path)):
        with h5py.File(partial_path(path), "r") as f:
            committed = layout.read_strings(f[layout.IDS])
    assert committed == source_ids(images)[: len(committed)]

    bad.unlink()
    bank = build(Pictures, path, images, client, mode="a", on_error="raise", partition_size=2)
    assert bank.ids == source_ids(images)  # each good source once, in source order
    assert len(bank) == 11
    assert bank.summary.skipped == len(committed)
    assert bank.summary.ok == 11 - len(committed)
    assert bank.failures() == []
    assert not os.path.exists(partial_path(path))
    for id_ in bank.ids:
        np.testing.assert_array_equal(bank.images.get(id_), iio.imread(images / id_, mode="RGB"))
    assert len(bank.images) == sum(bank.images.get(id_).size for id_ in bank.ids)


# -- h5mapper's example ---------------------------------------------------------------


def test_h5mapper_example(images, tmp_path, client):
    exp = Experiment.create(
        tmp_path / "experiment.h5", sources=images, scheduler=client, progress=False
    )
    exp = reopen(exp)  # create() returns the bank read-only
    losses = np.random.default_rng(0).random(100)
    exp.logs.add("train", dict(loss=losses))
    np.testing.assert_array_equal(exp.logs.get("train")["loss"], losses)
    np.testing.assert_array_equal(exp.logs["train"]["loss"], losses)
    first = exp.ids[0]
    assert exp.data.images[exp.data.images.refs[0]].shape == iio.imread(images / first).shape
    np.testing.assert_array_equal(exp.data.labels[:32], [0] * 6 + [1] * 6)


def test_a_list_of_rows_reads_in_the_order_asked_with_repeats(tmp_path):
    class Thumbs(TypedFile):
        thumbs = Image(size=(4, 4), mode="RGB")
        labels = DirLabels()

    images = tmp_path / "images"
    write_images(images, classes=("a", "b"), per_class=20, seed=9)
    bank = Thumbs.create(tmp_path / "t.h5", images, scheduler="threads", progress=False)
    with bank:
        everything = bank.thumbs[:]
        rows = [31, 2, 2, 39, -1, 0, 17]
        np.testing.assert_array_equal(bank.thumbs[rows], everything[rows])
        np.testing.assert_array_equal(bank.thumbs[np.array(rows)], everything[rows])
        np.testing.assert_array_equal(bank.labels[[5, 1]], bank.labels[:][[5, 1]])
        with pytest.raises(IndexError, match="row 40 out of range for 40 rows"):
            bank.thumbs[[0, 40]]
        mask = np.zeros(40, bool)
        mask[[3, 4]] = True  # a boolean mask is h5py's business, not a row list
        np.testing.assert_array_equal(bank.thumbs[mask], everything[mask])
        np.testing.assert_array_equal(bank.thumbs[mask.tolist()], everything[mask])
        ids = [bank.ids[i] for i in (7, 3, 7)]
        got = bank.thumbs.get_rows([bank.index(i) for i in ids])
        assert all(np.array_equal(g, bank.thumbs.get(i)) for g, i in zip(got, ids, strict=True))
        assert bank.labels.get_rows([7, 3]) == [
            bank.labels.get(bank.ids[7]),
            bank.labels.get(bank.ids[3]),
        ]


def test_get_rows_reads_sources_for_every_feature_kind(tmp_path):
    """One batch read by source for every kind: ``get_rows(rows)`` is ``get`` of each source,
    whether a source is one stored row (sized images, labels) or many (sounds in time, images
    in their own shape, bytes, text)."""
    from conftest import write_sounds

    from features import Bytes, Sound, String

    class Louder(Sound):
        """A sound read back twice as loud: its own from_stored, so a batch is not converted
        in one pass (Sound.from_stored_rows) but source by source."""

        def from_stored(self, value, name=""):
            return super().from_stored(value, name) * 2

    class Everything(TypedFile):
        sized = Image(size=(6, 5), mode="RGB")
        own = Image(mode="RGB")
        raw = Bytes(pattern=r"\.png$")
        text = String()
        sound = Sound(sr=8000)
        loud = Louder(sr=8000)
        labels = DirLabels()

    root = tmp_path / "media"
    write_images(root / "pics", per_class=4, seed=2)
    write_sounds(root / "tunes")
    for i, words in enumerate(["a cat", "deux chats", "drei Katzen, é"]):
        (root / "notes").mkdir(exist_ok=True)
        (root / "notes" / f"n{i}.txt").write_text(words, encoding="utf-8")
    bank = Everything.create(tmp_path / "e.h5", root, scheduler="threads", progress=False)
    with bank:
        for name in ("sized", "own", "raw", "text", "sound", "loud", "labels"):
            proxy = getattr(bank, name)
            rows = [r for r in range(len(bank)) if proxy.refs[r] is not None][::-1][:5]
            rows += rows[:1]  # in any order, with repeats
            got = proxy.get_rows(rows)
            assert len(got) == len(rows) >= 2, name
            for row, value in zip(rows, got, strict=True):
                want = proxy.get(bank.ids[row])
                if isinstance(want, np.ndarray):
                    assert value.dtype == want.dtype and np.array_equal(value, want), name
                else:
                    assert value == want, name
        tunes = [r for r in range(len(bank)) if bank.sound.refs[r] is not None]
        sound, loud = bank.sound.get_rows(tunes), bank.loud.get_rows(tunes)
        assert len(sound) == len(loud) >= 2
        assert all(np.array_equal(a * 2, b) for a, b in zip(sound, loud, strict=True))
