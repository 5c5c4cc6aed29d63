"""The on-disk format, version 1: a bank is a plain HDF5 file any reader can use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from features import Array, DirLabels, Image, Sound
from pipeline import FormatVersionError, Group, TypedFile
from pipeline.format import layout
from pipeline.format.rows import open_dataset


class Corpus(TypedFile):
    data = Group(
        pixels=Image(mode="RGB"),
        thumbs=Image(size=(10, 12), mode="L"),
        labels=DirLabels(pattern=Image.__re__),
    )
    audio = Sound(sr=8000)
    vectors = Array()


@pytest.fixture
def corpus(tmp_path, images, sounds):
    np.save(tmp_path / "vec.npy", np.arange(6, dtype=np.float32).reshape(3, 2))
    # A text file no feature accepts, and one that is not an image, to fill the failure table.
    (images / "cats" / "notes.md").write_text("no feature for me")
    (images / "dogs" / "fake.png").write_text("not a png")
    return [images, sounds, str(tmp_path / "vec.npy")]


PLAIN_READER = textwrap.dedent(
    """
    import json, sys
    import h5py, numpy as np, imageio.v3 as iio

    bank, images_root = sys.argv[1], sys.argv[2]
    with h5py.File(bank, "r") as f:
        assert f.attrs["h5bank_format"] == b"h5bank" and f.attrs["h5bank_version"] == 1
        schema = json.loads(f.attrs["h5bank_schema"])
        ids = [i.decode() for i in f["__sources__/id"][:]]
        group = f["data/pixels"]
        assert group.attrs["h5bank_storage"] == "flat"
        data, refs, shapes = group["data"], group["refs"], group["shape"]
        assert len(refs) == len(ids) and len(shapes) == len(ids)
        checked = 0
        for row, id_ in enumerate(ids):
            start, stop = refs[row]
            if start < 0:
                continue
            shape = tuple(int(s) for s in shapes[row] if s >= 0)
            pixels = data[start:stop].reshape(shape)
            expected = iio.imread(images_root + "/" + id_, mode="RGB")
            assert np.array_equal(pixels, expected), id_
            checked += 1
        names = [str(n) for n in f["data/labels"].attrs["names"]]
        labels = f["data/labels/data"][:]
        label_refs = f["data/labels/refs"][:]
        for row, id_ in enumerate(ids):
            start, stop = label_refs[row]
            if id_.endswith(".png"):
                assert names[labels[start]] == id_.split("/")[0], id_
        failed = [i.decode() for i in f["__failures__/id"][:]]
    assert "pipeline" not in sys.modules and "features" not in sys.modules
    print("checked", checked, "failed", len(failed), "schema", ",".join(sorted(schema)))
    """
)


def test_plain_h5py_finds_every_source_through_ids_and_refs(corpus, tmp_path, client, images):
    path = tmp_path / "bank.h5"
    Corpus.create(path, corpus, scheduler=client, progress=False).close()
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_READER, str(path), str(images)],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the repository: nothing of h5bank importable by accident
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "checked", "12", "failed", "2", "schema", "audio,data/labels,data/pixels,data/thumbs,vectors",
    ]  # fmt: skip


def test_tables_have_one_row_per_committed_source(corpus, tmp_path, client):
    path = tmp_path / "bank.h5"
    Corpus.create(path, corpus, scheduler=client, progress=False).close()
    with h5py.File(path, "r") as f:
        n = f[layout.IDS].shape[0]
        assert n == 12 + 4 + 1  # images, sounds, the .npy (notes.md and fake.png failed)
        columns = list(layout.iter_columns(f))
        assert sorted(columns) == ["audio", "data/labels", "data/pixels", "data/thumbs", "vectors"]
        for path_ in columns:
            refs = f[path_]["refs"][:]
            assert refs.shape == (n, 2) and refs.dtype == np.int64
            has = refs[:, 0] >= 0
            assert (refs[~has] == -1).all()
            # refs of sources with data are [start, stop) ranges, in order, without overlap
            starts, stops = refs[has, 0], refs[has, 1]
            assert (stops >= starts).all()
            assert (starts[1:] >= stops[:-1]).all()
            assert stops.max() == f[path_]["data"].shape[0]
        ids = [i.decode() for i in f[layout.IDS][:]]
        audio = f["audio/refs"][:]
        assert [ids[i] for i in np.flatnonzero(audio[:, 0] >= 0)] == [
            i for i in ids if i.endswith((".wav", ".flac"))
        ]
        # Item storage: one (10, 12) grayscale row per image.
        assert f["data/thumbs/data"].shape == (12, 10, 12)
        assert f["vectors/data"].shape == (3, 2)


def test_attributes_record_schema_parameters_and_provenance(corpus, tmp_path, client):
    path = tmp_path / "bank.h5"
    Corpus.create(path, corpus, scheduler=client, progress=False).close()
    with h5py.File(path, "r") as f:
        assert layout.state(f) == layout.COMPLETE
        schema = json.loads(f.attrs[layout.ATTR_SCHEMA])
        assert schema["data/pixels"]["class"] == "features.image.Image"
        assert schema["data/pixels"]["storage"] == "flat"
        assert schema["data/thumbs"]["attrs"] == {"mode": "L", "size": [10, 12], "draft": True}
        assert f["audio"].attrs["sr"] == 8000
        assert f["data/thumbs"].attrs["mode"] == "L"
        assert [str(n) for n in f["data/labels"].attrs["names"]] == ["cats", "dogs"]
        provenance = json.loads(f.attrs[layout.ATTR_PROVENANCE])
        assert provenance["library"].startswith("h5bank ")
        (build,) = provenance["builds"]
        assert build["ok"] == 17 and build["failed"] == 2 and build["mode"] == "w"
        # Local paths outside the current directory lose the folders above what was given.
        assert build["sources"] == [f".../{os.path.basename(s)}" for s in corpus]
        assert build["started"] <= build["finished"]


def test_failures_are_recorded_with_feature_and_reason(corpus, tmp_path, client):
    path = tmp_path / "bank.h5"
    Corpus.create(path, corpus, scheduler=client, progress=False).close()
    with h5py.File(path, "r") as f:
        tables = [f[f"{layout.FAILURES}/{name}"].asstr()[:] for name in layout.FAILURE_FIELDS]
        rows = list(zip(*tables, strict=True))
    failures = {id_: (feature, error) for id_, feature, error in rows}
    assert set(failures) == {"cats/notes.md", "dogs/fake.png"}
    assert failures["cats/notes.md"][0] == ""
    assert "no feature accepts" in failures["cats/notes.md"][1]
    assert failures["dogs/fake.png"][0] == "data/pixels"
    assert failures["dogs/fake.png"][1].startswith("DecodeError:")


def test_provenance_never_holds_credentials(tmp_path):
    class Named(TypedFile):
        vectors = Array()

    np.save(tmp_path / "v.npy", np.zeros(3))
    path = tmp_path / "bank.h5"
    sources = [
        str(tmp_path / "v.npy"),
        "https://alice:hunter2@example.invalid/x.npy?X-Amz-Signature=s3cr3t",
    ]
    Named.create(path, sources, scheduler="threads", progress=False).close()
    raw = path.read_bytes()
    assert b"hunter2" not in raw and b"s3cr3t" not in raw
    with h5py.File(path, "r") as f:
        recorded = json.loads(f.attrs[layout.ATTR_PROVENANCE])["builds"][0]["sources"]
    assert recorded[1] == "https://example.invalid/x.npy"
    with Named(path) as bank:
        assert [f.id for f in bank.failures()] == ["https://example.invalid/x.npy"]


def test_a_newer_format_version_is_refused(tmp_path):
    class Named(TypedFile):
        vectors = Array()

    path = tmp_path / "bank.h5"
    with Named(path, mode="a") as bank:
        bank.add("x", {"vectors": np.zeros(2)})
    with h5py.File(path, "r+") as f:
        f.attrs[layout.ATTR_VERSION] = layout.VERSION + 1
    with pytest.raises(FormatVersionError, match="upgrade h5bank"):
        Named(path)
    with pytest.raises(FormatVersionError):
        TypedFile(path)


def test_truncate_cuts_back_to_the_committed_sources(tmp_path, images):
    """A commit that died after appending rows and refs, before its ids, leaves nothing behind."""

    class Pictures(TypedFile):
        pixels = Image(size=(8, 8), mode="RGB")
        labels = DirLabels()

    path = tmp_path / "bank.h5"
    Pictures.create(path, images, scheduler="threads", progress=False).close()
    with h5py.File(path, "r") as f:
        before = {name: f[name][:] for name in ("pixels/data", "pixels/refs", "labels/data")}
    with h5py.File(path, "r+") as f:
        # Half a commit: rows and refs of two more sources, but no ids.
        data, refs = f["pixels/data"], f["pixels/refs"]
        data.resize(14, axis=0)
        data[12:] = 7
        refs.resize((14, 2))
        refs[12:] = [[12, 13], [13, 14]]
        failures = f[f"{layout.FAILURES}/id"]
        failures.resize((1,))
        failures[0] = "half-recorded"
        assert layout.truncate(f) == 12
    with h5py.File(path, "r") as f:
        for name, value in before.items():
            np.testing.assert_array_equal(f[name][:], value)
        assert f[f"{layout.FAILURES}/id"].shape == (0,)


def test_a_bank_compressed_with_an_hdf5plugin_filter_reads_in_a_fresh_process(tmp_path):
    """h5bank registers hdf5plugin's filters itself: a process (a Dask worker, a script) that
    never imports hdf5plugin still reads a Zstd bank, and the tree names the filter briefly."""
    import hdf5plugin

    from pipeline import TypedFile

    class Zstd(TypedFile):
        x = Array(**hdf5plugin.Zstd(clevel=3))

    path = tmp_path / "zstd.h5"
    with Zstd(path, mode="a") as bank:
        bank.add("a", {"x": np.arange(1000.0)})
    script = textwrap.dedent(
        f"""
        import sys
        from pipeline import TypedFile
        with TypedFile({str(path)!r}) as bank:
            assert "hdf5plugin" in sys.modules
            print(float(bank.x.get("a").sum()))
            print(bank.tree())
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    total, tree = done.stdout.split("\n", 1)
    assert float(total) == np.arange(1000.0).sum()
    assert " zstd " in tree and "https://" not in tree


def test_large_unfiltered_chunks_are_read_without_a_chunk_cache(tmp_path):
    """A random row then costs that row, not its whole chunk; compressed data, small chunks
    (refs) and files open for writing keep HDF5's cache."""

    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        for name, options in (("plain", {}), ("gzip", {"compression": "gzip"})):
            group = f.create_group(name)
            group.create_dataset(
                "data", data=np.ones((100, 64, 64, 3), np.uint8), chunks=(85, 64, 64, 3), **options
            )
            group.create_dataset(
                "refs", data=np.zeros((100, 2), np.int64), chunks=(4096, 2), maxshape=(None, 2)
            )
    with h5py.File(path, "r") as f:
        plain, gzip, refs = (
            open_dataset(f[g], n)
            for g, n in (("plain", "data"), ("gzip", "data"), ("plain", "refs"))
        )
        assert plain.id.get_access_plist().get_chunk_cache()[1] == 0
        assert gzip.id.get_access_plist().get_chunk_cache()[1] > 0
        assert refs.id.get_access_plist().get_chunk_cache()[1] > 0
        np.testing.assert_array_equal(plain[[3, 90]], np.ones((2, 64, 64, 3), np.uint8))
    with h5py.File(path, "r+") as f:
        assert open_dataset(f["plain"], "data").id.get_access_plist().get_chunk_cache()[1] > 0
