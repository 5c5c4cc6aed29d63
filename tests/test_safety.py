"""A bank is never lost, mixed or left inconsistent by a refused or failed operation."""

from __future__ import annotations

import os
import signal
import threading
import time

import h5py
import numpy as np
import pytest
from conftest import write_images
from distributed import Client, LocalCluster

from features import Array, DirLabels, Feature, Image, Sound
from pipeline import SchemaError, TypedFile, WriterError
from pipeline.format import layout
from pipeline.format.partial import partial_path
from pipeline.sources import EmptySourceWarning, expand


class Pictures(TypedFile):
    images = Image(mode="RGB")
    labels = DirLabels()


def test_append_refused_while_the_bank_is_open_leaves_it_in_place(images, tmp_path):
    path = tmp_path / "b.h5"
    bank = Pictures.create(path, images, scheduler="threads", progress=False)  # left open
    write_images(images, classes=("birds",), per_class=2)
    with pytest.raises(WriterError, match=r"open elsewhere.*nothing was changed"):
        Pictures.create(path, images, mode="a", scheduler="threads", progress=False)
    assert path.exists() and not os.path.exists(partial_path(path))
    assert len(bank) == 12
    bank.close()
    appended = Pictures.create(path, images, mode="a", scheduler="threads", progress=False)
    assert len(appended) == 14


def test_append_to_a_file_that_is_no_bank_moves_nothing(tmp_path, images):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(Exception, match="not an h5bank bank"):
        Pictures.create(plain, images, mode="a", scheduler="threads", progress=False)
    assert plain.exists() and not os.path.exists(partial_path(plain))
    with h5py.File(plain, "r") as f:
        assert f["x"][:].tolist() == [0, 1, 2]


def test_a_stopped_build_is_not_resumed_over_a_complete_bank(tmp_path):
    root = tmp_path / "images"
    write_images(root, classes=("a",), per_class=3)
    path = tmp_path / "b.h5"
    Pictures.create(path, root, scheduler="threads", progress=False).close()
    # A later build of other sources stopped half-way and left its partial file.
    os.link(path, partial_path(path))  # any partial file will do
    with pytest.raises(WriterError, match=r"both .* exist"):
        Pictures.create(path, root, mode="a", scheduler="threads", progress=False)
    with Pictures(path) as bank:
        assert len(bank) == 3


def test_appending_with_other_feature_parameters_is_refused(tmp_path):
    root = tmp_path / "images"
    write_images(root, classes=("a",), per_class=2)
    path = tmp_path / "b.h5"
    Pictures.create(path, root, scheduler="threads", progress=False).close()

    class Gray(TypedFile):
        images = Image(mode="L")
        labels = DirLabels()

    with pytest.raises(SchemaError, match=r"'images' differs .*mode"):
        Gray.create(path, root, mode="a", scheduler="threads", progress=False)
    with Pictures(path) as bank:  # untouched, still RGB
        assert len(bank) == 2 and bank.images.attrs["mode"] == "RGB"
    with pytest.raises(SchemaError, match="differs"), Gray(path, mode="r+") as gray:
        gray.add("new", {"images": np.zeros((2, 2), np.uint8)})


def test_features_may_not_hide_the_api():
    with pytest.raises(SchemaError, match="index"):

        class Clash(TypedFile):
            index = DirLabels()

    with pytest.raises(SchemaError, match="summary"):

        class Clash2(TypedFile):
            summary = Array()


def test_a_second_build_of_the_same_path_is_refused(tmp_path):
    class Slow(Feature):
        reads_bytes = False

        def load(self, source):
            time.sleep(0.02)
            return np.zeros(1)

    class Bank(TypedFile):
        x = Slow()

    path = tmp_path / "b.h5"
    errors = []
    first = threading.Thread(
        target=lambda: Bank.create(
            path, [f"id{i}" for i in range(60)], scheduler="threads", progress=False
        )
    )
    first.start()
    while not os.path.exists(partial_path(path)):
        time.sleep(0.01)
    try:
        Bank.create(path, ["other"], scheduler="threads", progress=False)
    except WriterError as error:
        errors.append(str(error))
    first.join()
    assert errors and "still writing it" in errors[0]
    with Bank(path) as bank:
        assert len(bank) == 60


def test_a_second_build_is_refused_while_the_first_creates_its_partial_file(tmp_path, monkeypatch):
    class Zeros(Feature):
        reads_bytes = False

        def load(self, source):
            return np.zeros(1)

    class Bank(TypedFile):
        x = Zeros()

    # The first build holds still right after creating its partial file, before its writer
    # is registered: the moment a second build of the path used to take the file away.
    created, go_on = threading.Event(), threading.Event()
    init_bank = layout.init_bank

    def held(*args, **kwargs):
        init_bank(*args, **kwargs)
        created.set()
        go_on.wait(30)

    monkeypatch.setattr(layout, "init_bank", held)
    path = tmp_path / "b.h5"
    first = threading.Thread(
        target=lambda: Bank.create(path, ["a", "b"], scheduler="threads", progress=False)
    )
    first.start()
    try:
        assert created.wait(30)
        with pytest.raises(WriterError, match="still writing it"):
            Bank.create(path, ["other"], scheduler="threads", progress=False)
    finally:
        go_on.set()
        first.join()
    with Bank(path) as bank:
        assert bank.ids == ["a", "b"]


def test_a_failed_add_is_rolled_back(tmp_path, monkeypatch):
    path = tmp_path / "b.h5"
    with Pictures(path, mode="a") as bank:
        bank.add("one", {"images": np.zeros((2, 2, 3), np.uint8), "labels": "x"})

        def broken(dataset, values):
            raise OSError("disk full")

        monkeypatch.setattr(layout, "append_strings", broken)
        with pytest.raises(OSError, match="disk full"):
            bank.add("two", {"images": np.ones((3, 3, 3), np.uint8), "labels": "y"})
        monkeypatch.undo()
        assert bank.ids == ["one"]
        bank.add("three", {"images": np.full((1, 1, 3), 7, np.uint8), "labels": "z"})
    with h5py.File(path, "r") as f:
        n = f[layout.IDS].shape[0]
        assert n == 2
        for column in ("images", "labels"):
            assert f[column]["refs"].shape == (n, 2)
        assert f["images/data"].shape[0] == 2 * 2 * 3 + 3  # the rolled-back rows are gone
    with Pictures(path) as bank:
        assert bank.images.get("three").tolist() == [[[7, 7, 7]]]


def test_label_renumbering_interrupted_at_any_step_keeps_labels_right(tmp_path, monkeypatch):
    root = tmp_path / "images"
    write_images(root, classes=("zebra", "ant"), per_class=3)
    files = [str(p) for c in ("zebra", "ant") for p in sorted((root / c).iterdir())]
    path = tmp_path / "b.h5"
    reference = Pictures.create(path, files, scheduler="threads", progress=False)
    expected = {id_: os.path.basename(os.path.dirname(id_)) for id_ in reference.ids}
    reference.close()
    steps = ["before-move", "before-names"]
    for step in steps:
        # Rebuild the unsorted state: codes in first-seen order (zebra=0, ant=1).
        with h5py.File(path, "r+") as f:
            group = f["labels"]
            names = [str(n) for n in group.attrs["names"]]
            codes = group["data"][:]
            group["data"][:] = [1 - c for c in codes]
            group.attrs["names"] = np.array(names[::-1], dtype=h5py.string_dtype())
            column = layout.Column.open(f, "labels")
            if step == "before-move":
                original_move = h5py.Group.move
                monkeypatch.setattr(
                    h5py.Group, "move", lambda *a: (_ for _ in ()).throw(OSError("killed"))
                )
            else:
                monkeypatch.setattr(
                    layout, "adopt_names", lambda g: (_ for _ in ()).throw(OSError("killed"))
                )
            with pytest.raises(OSError, match="killed"):
                layout.renumber_category(column, sorted(names))
            monkeypatch.undo()
            if step == "before-move":
                assert h5py.Group.move is original_move
            layout.recover_renumbering(f)
            names = [str(n) for n in group.attrs["names"]]
            codes = group["data"][:]
            ids = f[layout.IDS].asstr()[:]
            assert {i: names[c] for i, c in zip(ids, codes, strict=True)} == expected, step


def test_a_failing_accepts_fails_that_source_only(tmp_path, images, client):
    class Picky(Feature):
        def accepts(self, source_id):
            if "dogs_001" in source_id:
                raise RuntimeError("cannot decide")
            return True

        def load(self, source):
            return np.zeros(1)

    class Bank(TypedFile):
        x = Picky()

    bank = Bank.create(tmp_path / "b.h5", images, scheduler=client, progress=False)
    assert len(bank) == 11
    (failure,) = bank.failures()
    assert failure.id == "dogs/dogs_001.png" and "RuntimeError" in failure.error


def test_signed_urls_never_reach_the_failure_table(tmp_path):
    class Leaky(Feature):
        reads_bytes = False

        def load(self, source):
            raise OSError(
                "403 Forbidden for https://host/b/x.png?X-Amz-Signature=SECRET123&X-Amz-Credential=AKIAX"
            )

    class Bank(TypedFile):
        x = Leaky()

    path = tmp_path / "b.h5"
    bank = Bank.create(path, ["a"], scheduler="threads", progress=False)
    (failure,) = bank.failures()
    assert "https://host/b/x.png" in failure.error
    assert b"SECRET123" not in path.read_bytes() and b"AKIAX" not in path.read_bytes()


def test_sources_without_any_data_and_empty_roots_are_reported(chdir):
    empty = chdir / "empty"
    empty.mkdir()
    with pytest.warns(EmptySourceWarning, match="empty"):
        bank = Pictures.create("b.h5", [empty, "photoz/"], scheduler="threads", progress=False)
    assert len(bank) == 0
    (failure,) = bank.failures()  # a typo: a plain id no feature has data for
    assert failure.id == "photoz/" and "no feature produced data" in failure.error
    with pytest.warns(EmptySourceWarning, match=r"\*\.nothing"):
        assert list(expand(str(chdir / "*.nothing"))) == []


def _kill_after_commits(partial: str, pid: int, commits: int = 8) -> None:
    """SIGKILL ``pid`` once the build writing ``partial`` has committed ``commits`` sources
    (read from its commit record, as the writer flushes it), or after 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with h5py.File(partial, "r", locking=False) as f:
                if int(f.attrs.get(layout.ATTR_COMMITTED, 0)) >= commits:
                    break
        except (OSError, KeyError, ValueError, RuntimeError):
            pass  # not there yet, or caught mid-flush
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)


def test_a_dead_writer_worker_fails_the_build_and_it_resumes(tmp_path):
    class Slow(Feature):
        reads_bytes = False

        def load(self, source):
            time.sleep(0.03)
            return np.array([int(source.id)])

    class Bank(TypedFile):
        x = Slow()

    ids = [str(i) for i in range(240)]
    path = tmp_path / "b.h5"
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        writer = sorted(client.scheduler_info()["workers"])[0]  # the runner's choice
        pid = client.run(os.getpid, workers=[writer])[writer]
        killer = threading.Thread(target=_kill_after_commits, args=(partial_path(path), pid))
        killer.start()
        started = time.monotonic()
        with pytest.raises(WriterError, match="left the cluster"):
            Bank.create(path, ids, scheduler=client, partition_size=4, progress=False)
        assert time.monotonic() - started < 60
        assert not path.exists() and os.path.exists(partial_path(path))
        bank = Bank.create(path, ids, mode="a", scheduler=client, partition_size=4, progress=False)
    assert bank.ids == ids
    assert bank.x[:].tolist() == list(range(240))
    assert 0 < bank.summary.skipped < 240, bank.summary.notes  # the commits before the kill


def test_sounds_at_other_rates_cannot_be_appended(tmp_path, sounds):
    class Audio(TypedFile):
        audio = Sound(sr=8000)

    class Audio16(TypedFile):
        audio = Sound(sr=16000)

    path = tmp_path / "b.h5"
    Audio.create(path, sounds, scheduler="threads", progress=False).close()
    with pytest.raises(SchemaError, match="sr"):
        Audio16.create(path, sounds, mode="a", scheduler="threads", progress=False)
