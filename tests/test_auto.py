"""The embedded default's choice (scheduler="auto"): threads or a local cluster, from the
features and a bounded sample of the sources."""

from __future__ import annotations

import os

import dask
import pytest
from servebank import Code

from features import Array, DirLabels, Feature, Image, Sound
from pipeline import TypedFile
from pipeline.run import auto
from pipeline.sources import SourceSpec, expand


class Pictures(TypedFile):
    images = Image(mode="RGB")
    labels = DirLabels()


def features(bank_type: type[TypedFile]) -> dict[str, Feature]:
    schema = bank_type.__schema__
    return {path: schema[path] for path in schema}


def files(root, count: int, size: int, suffix: str = ".png") -> None:
    """``count`` files of ``size`` bytes in two folders (sparse: nothing is written)."""
    for i in range(count):
        folder = root / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"f{i:05d}{suffix}", "wb") as f:
            f.truncate(size)


def test_few_local_files_build_on_threads(images):
    choice = auto.choose(features(Pictures), images)
    assert choice.scheduler == "threads" and "12 local files" in choice.why
    assert auto.choose(features(Pictures), [images / "cats"]).scheduler == "threads"
    one = next(images.rglob("*.png"))
    assert "1 local file:" in auto.choose(features(Pictures), one).why
    listed = list(expand(images))  # as h5bank image-bank lists a folder's images
    assert "12 local files" in auto.choose(features(Pictures), listed).why


class Vectors(TypedFile):
    """A feature whose decoding is Python work (``np.load``)."""

    x = Array(item=True)
    labels = DirLabels()


@pytest.mark.parametrize(("size", "expected"), [(8 << 10, "local"), (64 << 10, "threads")])
def test_many_files_of_python_decoding_build_where_their_size_says(tmp_path, size, expected):
    files(tmp_path / "corpus", auto.SMALL + 5, size, ".npy")
    for sources in (tmp_path / "corpus", str(tmp_path / "corpus" / "*" / "*.npy")):
        choice = auto.choose(features(Vectors), sources)
        assert choice.scheduler == expected, choice
        assert f"{size // 1024} KB on average" in choice.why


def test_many_images_or_sounds_build_on_threads_whatever_their_size(tmp_path):
    """Pillow and libsndfile decode with the GIL released: threads, however many files."""

    class Both(TypedFile):
        images = Image(mode="RGB", pattern=r"\.png$")
        audio = Sound(pattern=r"\.wav$")
        labels = DirLabels()

    files(tmp_path / "corpus", auto.SMALL + 5, 8 << 10)
    for bank_type in (Pictures, Both):
        choice = auto.choose(features(bank_type), tmp_path / "corpus")
        assert choice.scheduler == "threads", choice
        assert f"{auto.SMALL:,}+ local files" in choice.why and "releases the GIL" in choice.why
    mixed = auto.choose({**features(Pictures), **features(Vectors)}, tmp_path / "corpus")
    assert mixed.scheduler == "local"  # one feature of Python work: by size (8 KB: a cluster)


def test_the_walk_stops_at_the_sample(tmp_path, monkeypatch):
    """A big folder is not listed whole: the walk stops after SMALL files."""
    files(tmp_path / "corpus", 50, 100)
    monkeypatch.setattr(auto, "SMALL", 10)
    seen = []
    walk = auto.walk_files  # counted as the choice walks

    def counted(root):
        for path in walk(root):
            seen.append(path)
            yield path

    monkeypatch.setattr(auto, "walk_files", counted)
    assert auto.choose(features(Vectors), tmp_path / "corpus").scheduler == "local"
    assert len(seen) == 10


def test_ids_urls_streams_and_slurm_jobs_take_a_local_cluster(images, monkeypatch):
    class Made(TypedFile):
        x = Code()  # made from the source's id: no bytes read

    assert auto.choose(features(Made), ["a", "b"]).scheduler == "local"
    assert auto.choose(features(Pictures), [SourceSpec("a")]).scheduler == "local"  # an id
    assert auto.choose(features(Pictures), ["https://example.org/a.png"]).scheduler == "local"
    assert auto.choose(features(Pictures), iter([str(images)])).scheduler == "local"
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert "Slurm" in auto.choose(features(Pictures), images).why


def test_a_build_with_no_scheduler_runs_where_auto_says(images, sounds, tmp_path, capfd):
    class Sounds(TypedFile):
        audio = Sound(sr=8000)

    bank = Pictures.create(tmp_path / "p.h5", images, progress=True)
    assert bank.summary.writer_pid == os.getpid()  # threads: the writer is this process
    assert "building on threads in this process (12 local files" in capfd.readouterr().err
    bank.close()
    with dask.config.set({"h5bank.build.scheduler": "local"}):
        bank = Sounds.create(tmp_path / "s.h5", sounds, progress=False)
    assert bank.summary.writer_pid != os.getpid()  # the setting still picks a cluster
    bank.close()
