"""Sharded banks: N writer chains on real worker processes, one index that reads as one bank.

A sharded build must equal the single-file build of the same sources (ids, order,
arrays, label names, failures), read the same way through every reader, stay one dataset
per feature to plain h5py, move as a folder, and take new sources as new shards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import h5py
import numpy as np
import pytest
from conftest import assert_same_contents, write_images, write_sounds
from test_cloud import s3_options

from features import DirLabels, Feature, Image, Sound
from pipeline import (
    BuildInProgressError,
    ShardedWriteError,
    SourceError,
    TypedFile,
    UnsafeBankError,
)
from pipeline.build.shards import auto_shards
from pipeline.errors import DamagedBankError, WriterError
from pipeline.format import layout
from pipeline.format.shards import shard_files


class Photos(TypedFile):
    img = Image(size=(12, 12), mode="RGB")
    label = DirLabels()


class Clips(TypedFile):
    snd = Sound(sr=8000)
    label = DirLabels()


class Number(Feature):
    """Four floats made from the source's id: nothing to fetch."""

    reads_bytes = False
    storage = "item"

    def load(self, source):
        return np.full(4, float(source.id[1:]), np.float32)


def corpus(root: Path, per_class: int = 30) -> Path:
    """Images in three classes, two of them broken (failures must come through too)."""
    paths = write_images(root, classes=("a", "b", "c"), per_class=per_class, sizes=(8, 20))
    for path in paths[5::40]:
        path.write_bytes(b"not a png")
    return root


def shards_of(path: Path) -> list[str]:
    with h5py.File(path, "r") as f:
        return layout.shard_names(f)


def test_a_sharded_build_on_worker_processes_equals_the_single_file_build(client, tmp_path):
    images = corpus(tmp_path / "images")
    one = Photos.create(tmp_path / "one.h5", images, scheduler=client, progress=False)
    two = Photos.create(tmp_path / "two.h5", images, scheduler=client, shards=2, progress=False)
    assert two.summary.ok == one.summary.ok and two.summary.failed == one.summary.failed == 3
    names = shards_of(tmp_path / "two.h5")
    assert len(names) == 2 and all((tmp_path / n).is_file() for n in names)
    assert_same_contents(tmp_path / "two.h5", tmp_path / "one.h5", failures=True)
    for name in names:
        with h5py.File(tmp_path / name, "r") as f:
            assert layout.state(f) == layout.COMPLETE and layout.committed(f) > 0
    assert two.summary.writer_pid in client.run(os.getpid).values()
    # the readers: by id, batches, slices, dask, torch
    for id_ in one.ids[::7]:
        a, b = one.get(id_), two.get(id_)
        np.testing.assert_array_equal(a["img"], b["img"])
        assert a["label"] == b["label"]
    rows = [3, 17, 40, 41, 80]
    np.testing.assert_array_equal(one.img[rows], two.img[rows])
    np.testing.assert_array_equal(one.img.to_dask().sum(axis=0).compute(), two.img.to_dask().sum(axis=0).compute())  # fmt: skip
    assert one.failures() == two.failures()
    one.close()
    two.close()


def test_plain_h5py_reads_each_feature_as_one_dataset_and_the_folder_moves(tmp_path):
    images = corpus(tmp_path / "images")
    Photos.create(tmp_path / "one.h5", images, scheduler="threads", progress=False).close()
    (tmp_path / "b").mkdir()
    Photos.create(tmp_path / "b" / "bank.h5", images, scheduler="threads", shards=3, progress=False).close()  # fmt: skip
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "b", moved)
    script = (
        "import h5py, sys\n"
        "f = h5py.File(sys.argv[1], 'r')\n"
        "d = f['img/data']\n"
        "print(d.is_virtual, d.shape, int(d[:].sum()), f['img/refs'][-1].tolist())\n"
    )
    here = subprocess.run(
        [sys.executable, "-c", script, str(moved / "bank.h5")],
        capture_output=True, text=True, cwd="/", check=True,
    ).stdout.split(maxsplit=1)  # fmt: skip
    with h5py.File(tmp_path / "one.h5", "r") as f:
        expected = (
            f"{f['img/data'].shape} {int(f['img/data'][:].sum())} {f['img/refs'][-1].tolist()}"
        )
    assert here == ["True", expected + "\n"]
    with h5py.File(moved / "bank.h5", "r") as f:
        plist = f["img/data"].id.get_create_plist()
        files = {plist.get_virtual_filename(i) for i in range(plist.get_virtual_count())}
    assert files == set(shards_of(moved / "bank.h5")) and all("/" not in n for n in files)
    assert_same_contents(moved / "bank.h5", tmp_path / "one.h5", failures=True)


def test_more_shards_than_workers_and_ragged_sounds(tmp_path):
    sounds = tmp_path / "sounds"
    write_sounds(sounds)
    one = Clips.create(tmp_path / "one.h5", sounds, scheduler="threads", progress=False)
    many = Clips.create(tmp_path / "many.h5", sounds, scheduler="threads", shards=4, progress=False)
    assert len(shards_of(tmp_path / "many.h5")) == min(4, len(one.ids))
    assert_same_contents(tmp_path / "many.h5", tmp_path / "one.h5", failures=True)
    for id_ in one.ids:
        np.testing.assert_array_equal(one.snd.get(id_), many.snd.get(id_))
    one.close()
    many.close()


def test_appending_adds_new_shards_and_a_rebuild_replaces_the_old_ones(tmp_path):
    first = corpus(tmp_path / "first", per_class=10)
    second = tmp_path / "second"
    write_images(second, classes=("d", "a"), per_class=8, sizes=(8, 12))
    one = tmp_path / "one.h5"
    Photos.create(one, first, scheduler="threads", progress=False).close()
    Photos.create(one, second, mode="a", scheduler="threads", progress=False).close()
    bank = tmp_path / "bank.h5"
    made = Photos.create(bank, first, scheduler="threads", shards=2, progress=False)
    uuid = layout.bank_uuid(made.h5)
    made.close()
    old = shards_of(bank)
    added = Photos.create(bank, second, mode="a", shards=2, scheduler="threads", progress=False)
    assert layout.bank_uuid(added.h5) == uuid  # the same bank, grown
    added.close()
    now = shards_of(bank)
    assert now[:2] == old and len(now) == 4
    assert_same_contents(bank, one, failures=True)
    # nothing left to add: the same index, the same shards
    Photos.create(bank, second, mode="a", shards=2, scheduler="threads", progress=False).close()
    assert shards_of(bank) == now
    # a new build replaces the shards: only the new ones stay in the folder
    Photos.create(bank, first, scheduler="threads", shards=3, progress=False).close()
    assert sorted(os.path.basename(p) for p in shard_files(str(bank))) == sorted(shards_of(bank))
    assert not set(shards_of(bank)) & set(now)
    # and a single-file build of the path removes them all
    Photos.create(bank, first, scheduler="threads", progress=False).close()
    assert shard_files(str(bank)) == [] and shards_of(bank) == []


def test_add_and_set_by_id_write_into_the_shards_and_the_index(tmp_path):
    images = corpus(tmp_path / "images", per_class=6)
    made = {}
    for name, shards in (("one", 1), ("bank", 2)):
        bank = Photos.create(tmp_path / f"{name}.h5", images, scheduler="threads", shards=shards, progress=False)  # fmt: skip
        first, last = bank.ids[0], bank.ids[-1]
        bank.img.add("new/one.png", np.full((12, 12, 3), 7, np.uint8))  # a new source
        bank.add("new/two.png", {"img": np.full((12, 12, 3), 9, np.uint8), "label": "z"})
        bank.img.set(first, np.full((12, 12, 3), 1, np.uint8))  # in the first shard
        bank.label.set(last, "y")  # in the last shard
        assert bank.img.get("new/one.png")[0, 0, 0] == 7 and bank.img.get(first)[0, 0, 0] == 1
        made[name] = bank.ids
        bank.close()
    assert made["bank"] == made["one"]
    with Photos(tmp_path / "bank.h5") as bank, Photos(tmp_path / "one.h5") as one:
        for id_ in one.ids:
            np.testing.assert_array_equal(bank.img.get(id_), one.img.get(id_))
            assert bank.get(id_).get("label") == one.get(id_).get("label")
        assert bank.label.names == one.label.names == ["a", "b", "c", "z", "y"]
    assert len(shards_of(tmp_path / "bank.h5")) == 2
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "verify", "--data", str(tmp_path / "bank.h5")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # a bank opened for writing takes writes by id; an assignment into its data by slice cannot
    # say which shard it means, and is refused
    with Photos(tmp_path / "bank.h5", mode="r+") as bank:
        bank.img.add("new/three.png", np.zeros((12, 12, 3), np.uint8))
        with pytest.raises(ShardedWriteError, match="sharded"):
            bank.img[0:1] = np.zeros((1, 12, 12, 3), np.uint8)
    with Photos(tmp_path / "bank.h5") as bank:
        assert bank.ids[-1] == "new/three.png"


def test_an_index_pointing_past_its_own_shards_is_refused(tmp_path):
    images = corpus(tmp_path / "images", per_class=6)
    Photos.create(tmp_path / "bank.h5", images, scheduler="threads", shards=2, progress=False).close()  # fmt: skip
    # a file beside it that the index does not list
    (tmp_path / "other.h5").write_bytes(
        (tmp_path / shards_of(tmp_path / "bank.h5")[0]).read_bytes()
    )
    with h5py.File(tmp_path / "bank.h5", "r+") as f:
        data = f["img/data"]
        virtual = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
        virtual[:] = h5py.VirtualSource("other.h5", "img/data", shape=data.shape)
        del f["img/data"]
        f["img"].create_virtual_dataset("data", virtual)
    with pytest.raises(UnsafeBankError, match=r"other\.h5"):
        Photos(tmp_path / "bank.h5")
    # an index declaring more rows than it maps
    Photos.create(tmp_path / "b2.h5", images, scheduler="threads", shards=2, progress=False).close()
    name = shards_of(tmp_path / "b2.h5")[0]
    with h5py.File(tmp_path / "b2.h5", "r+") as f:
        data = f["img/data"]
        virtual = h5py.VirtualLayout(shape=(1 << 34, *data.shape[1:]), dtype=data.dtype)
        virtual[:5] = h5py.VirtualSource(name, "img/data", shape=data.shape)[:5]
        del f["img/data"]
        f["img"].create_virtual_dataset("data", virtual)
    with pytest.raises(DamagedBankError, match="maps"):
        Photos(tmp_path / "b2.h5")


def test_a_stopped_replacement_is_not_appended_to_the_bank_it_replaces(tmp_path):
    images = corpus(tmp_path / "images", per_class=6)
    bank = tmp_path / "bank.h5"
    Photos.create(bank, images, scheduler="threads", shards=2, progress=False).close()
    # what a killed `mode="w"` rebuild leaves: a shard of a new bank, not listed
    listed = tmp_path / shards_of(bank)[0]
    stray = tmp_path / listed.name.replace(listed.name.split("-")[1], "abcdef")
    shutil.copy(listed, stray)
    with h5py.File(stray, "r+") as f:
        from pipeline.format.shards import set_block

        set_block(f, {"last": None, "base": None})
    with pytest.raises(WriterError, match="replacing"):
        Photos.create(bank, images, mode="a", scheduler="threads", progress=False)


def test_the_shards_setting_and_auto(client, tmp_path):
    import dask

    from pipeline.build.options import BuildOptions

    with dask.config.set({"h5bank.build.shards": 2}):
        assert BuildOptions.resolve().shards == 2
    for wrong in (0, -1, "many", True):
        with pytest.raises(ValueError, match="shards"):
            BuildOptions.resolve(shards=wrong)
    images = corpus(tmp_path / "images", per_class=6)
    Photos.create(tmp_path / "here.h5", images, scheduler="threads", shards="auto", progress=False).close()  # fmt: skip
    assert shards_of(tmp_path / "here.h5") == []  # in process: one writer, one file
    Photos.create(tmp_path / "two.h5", images, scheduler=client, shards="auto", progress=False).close()  # fmt: skip
    assert shards_of(tmp_path / "two.h5") == []  # 18 sources: too few to be worth a shard
    assert (auto_shards(2, 2048), auto_shards(2, 2047), auto_shards(64, 10**6)) == (2, 1, 64)
    ids = [f"s{i:05d}" for i in range(2048)]
    Numbers.create(tmp_path / "n.h5", ids, scheduler=client, shards="auto", progress=False).close()
    assert len(shards_of(tmp_path / "n.h5")) == len(client.scheduler_info()["workers"]) == 2
    with Numbers(tmp_path / "n.h5") as bank:
        assert bank.ids == ids and float(bank.x.get("s01234")[0]) == 1234.0


class Numbers(TypedFile):
    x = Number()


def test_a_sharded_bank_reads_from_a_url_like_the_local_one(http_server, moto, client, tmp_path):
    """Over HTTP and S3 the shards are fetched beside the index (HDF5 cannot follow a virtual
    dataset from a remote file; h5bank reads the shards itself), by the client and workers."""
    images = corpus(tmp_path / "images", per_class=10)
    folder = http_server.root / f"sharded-{tmp_path.name}"
    folder.mkdir()
    local = Photos.create(folder / "bank.h5", images, scheduler="threads", shards=3, progress=False)
    ids, pixels = local.ids, local.img[:]
    local.close()
    options = s3_options(moto.url)
    s3 = fsspec.filesystem("s3", **options)
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    s3.mkdir(bucket)
    for path in folder.iterdir():
        s3.put(str(path), f"{bucket}/{folder.name}/{path.name}")
    for url, storage_options in (
        (f"{http_server.url}/{folder.name}/bank.h5", None),
        (f"s3://{bucket}/{folder.name}/bank.h5", options),
    ):
        remote = Photos(url, storage_options=storage_options)
        assert remote.ids == ids
        np.testing.assert_array_equal(remote.img[:], pixels)
        rows = [0, 5, len(ids) - 1, 11]
        np.testing.assert_array_equal(remote.img[rows], pixels[rows])
        np.testing.assert_array_equal(remote.img.get(ids[7]), pixels[7])
        total = client.compute(remote.img.to_dask().sum(axis=0)).result()
        np.testing.assert_array_equal(total, pixels.sum(axis=0))
        remote.close()


def test_a_stopped_sharded_build_is_named_to_readers_and_the_command_line(tmp_path):
    """A sharded build stopped by an error leaves its shards' partial files: readers are told
    a build is there, `h5bank build` refuses to start over without --resume or --overwrite,
    and --resume finishes it with every shard continuing its own block."""
    images = corpus(tmp_path / "images", per_class=20)  # 3 broken files among 60
    out = tmp_path / "bank.h5"
    with pytest.raises(SourceError):
        Photos.create(out, images, scheduler="threads", shards=2, on_error="raise",
                      partition_size=4, progress=False)  # fmt: skip
    assert not out.exists() and shard_files(str(out))
    with pytest.raises(BuildInProgressError, match=r"shard-.*partial"):
        Photos(out)
    config = tmp_path / "build.yaml"
    config.write_text(
        f"h5bank:\n  build:\n    bank: test_shards:Photos\n    sources: [{images}]\n"
        f"    output: {out}\n    scheduler: threads\n"
    )
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "build",
        str(config),
        "--shards",
        "2",
        "--quiet",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    refused = subprocess.run(command, capture_output=True, text=True, env=env)
    assert refused.returncode == 1 and "--resume continues it" in refused.stderr, refused.stderr
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    reference = tmp_path / "one.h5"
    Photos.create(reference, images, scheduler="threads", progress=False).close()
    assert_same_contents(out, reference, failures=True)
    # the shards that had started when the error stopped the build (one or both) took it all
    assert 1 <= len(shards_of(out)) <= 2
    assert sorted(os.path.basename(p) for p in shard_files(str(out))) == sorted(shards_of(out))


def brightness(values):
    return np.float32(np.asarray(values["img"]).mean())


def test_map_with_an_output_writes_each_shard_then_the_index(tmp_path):
    images = corpus(tmp_path / "images", per_class=8)
    one = Photos.create(tmp_path / "one.h5", images, scheduler="threads", progress=False)
    one.map(brightness, "img", output="bright", scheduler="threads", progress=False)
    one.close()
    bank = Photos.create(tmp_path / "bank.h5", images, scheduler="threads", shards=2, progress=False)  # fmt: skip
    summary = bank.map(brightness, "img", output="bright", scheduler="threads", progress=False)
    assert summary.ok == len(bank) and bank.bright.get(bank.ids[3]) == brightness({"img": bank.img.get(bank.ids[3])})  # fmt: skip
    bank.close()
    assert_same_contents(tmp_path / "bank.h5", tmp_path / "one.h5", failures=True)
    for name in shards_of(tmp_path / "bank.h5"):  # each shard has its part of the column
        with h5py.File(tmp_path / name, "r") as f:
            assert "bright" in f and layout.state(f) == layout.COMPLETE
    # again: nothing left to do, nothing written twice
    again = Photos(tmp_path / "bank.h5")
    assert (
        again.map(brightness, "img", output="bright", scheduler="threads", progress=False).ok == 0
    )
    again.close()
    assert_same_contents(tmp_path / "bank.h5", tmp_path / "one.h5", failures=True)
