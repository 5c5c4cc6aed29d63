"""End-to-end builds: real worker processes, one writer, determinism, append, graphs."""

from __future__ import annotations

import os

import dask
import imageio.v3 as iio
import numpy as np
import pytest
from conftest import write_images
from distributed import Client

from features import DirLabels, Image, Sound
from features.sound import to_float
from pipeline import Group, SchedulerError, TypedFile
from pipeline.build.graph import Build
from pipeline.format.partial import partial_path


class Pictures(TypedFile):
    images = Image(mode="RGB")
    labels = DirLabels()


class Media(TypedFile):
    data = Group(
        images=Image(mode="RGBA"),
        thumbs=Image(size=(8, 8), mode="RGB", derived_from="images"),
        labels=DirLabels(),
    )
    audio = Sound(sr=8000)


def expected_pixels(path, mode="RGB"):
    return iio.imread(path, mode=mode)


def test_build_on_two_worker_processes(images, tmp_path, client):
    bank = Pictures.create(tmp_path / "b.h5", images, scheduler=client, progress=False)
    workers = client.run(os.getpid)
    # The writer chain ran in one worker process, not in this one.
    assert bank.summary.writer_pid in workers.values()
    assert bank.summary.writer_pid != os.getpid()
    assert len(bank) == 12
    assert bank.summary.ok == 12 and bank.summary.failed == 0
    for id_ in bank.ids:
        np.testing.assert_array_equal(bank.images.get(id_), expected_pixels(images / id_))
    assert bank.labels.names == ["cats", "dogs"]
    assert bank.labels[:].tolist() == [0] * 6 + [1] * 6


def test_writer_tasks_are_pinned_to_one_worker(images, tmp_path, client):
    build = Pictures.graph(tmp_path / "b.h5", images, scheduler=client, partition_size=1)
    assert build.writer in client.scheduler_info()["workers"]
    assert len(build.partitions) == 12
    from distributed import get_task_stream

    with get_task_stream(client) as stream:
        summary = client.compute(build).result()
    assert summary.ok == 12
    ran = {str(t["key"]): t["worker"] for t in stream.data}
    chain = [k for k in ran if k.startswith(("h5bank-open", "h5bank-write", "h5bank-finalize"))]
    assert len(chain) == 14 and {ran[k] for k in chain} == {build.writer}

    # Every writer key carried the same hard worker restriction; decode tasks a loose one.
    (layer,) = build.__dask_graph__().layers.values()

    def annotation(name: str, key: str) -> object:
        value = layer.annotations[name]
        return value(key) if callable(value) else value

    keys = [str(k) for k in layer]
    pinned = [k for k in keys if k.startswith(("h5bank-open", "h5bank-write", "h5bank-finalize"))]
    assert len(pinned) == 14
    assert all(annotation("workers", k) == [build.writer] for k in pinned)
    assert all(annotation("allow_other_workers", k) is False for k in pinned)
    decodes = [k for k in keys if k.startswith("h5bank-decode")]
    assert len(decodes) == 12 and all(annotation("allow_other_workers", k) is True for k in decodes)


def test_back_pressure_bounds_pending_partitions(images, tmp_path):
    build = Pictures.graph(tmp_path / "b.h5", images, partition_size=1, max_pending=3)
    graph = dict(build.__dask_graph__())
    for k in range(len(build.partitions)):
        decode = graph[f"h5bank-decode-{k}-{build.token}"]
        deps = {str(d) for d in decode.dependencies}
        if k >= 3:
            assert f"h5bank-write-{k - 3}-{build.token}" in deps
        else:
            assert not any(d.startswith("h5bank-write") for d in deps)


def test_on_a_cluster_decode_tasks_spread_over_every_worker_within_the_window(tmp_path, client):
    """Decode task k+W waits for write k (memory stays bounded) yet runs on its own worker,
    round robin, not where that dependency's result lives (the writer's worker)."""
    from distributed import get_task_stream

    images = tmp_path / "images"
    write_images(images, classes=("a", "b"), per_class=40, seed=5)
    build = Pictures.graph(tmp_path / "b.h5", images, scheduler=client, partition_size=2)
    graph = dict(build.__dask_graph__())
    window = 2 * sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
    for k in range(40):
        deps = {str(d) for d in graph[f"h5bank-decode-{k}-{build.token}"].dependencies}
        assert (f"h5bank-write-{k - window}-{build.token}" in deps) == (k >= window)
        assert not any(d.startswith("h5bank-decode") for d in deps)  # no lanes: data would move
    with get_task_stream(client) as stream:
        client.compute(build).result()
    ran = [t["worker"] for t in stream.data if str(t["key"]).startswith("h5bank-decode")]
    assert len(ran) == 40 and len(set(ran)) == len(client.scheduler_info()["workers"]) == 2
    assert min(ran.count(w) for w in set(ran)) >= 15  # about half each, not all on the writer's
    with Pictures(tmp_path / "b.h5") as bank:
        assert len(bank) == 80


def test_the_writers_worker_decodes_one_share_less():
    from pipeline.build.graph import decode_schedule

    schedule = decode_schedule(["a", "b"], "a")
    assert schedule.count("a") == 7 and schedule.count("b") == 8
    assert schedule[:4] == ["a", "b", "a", "b"]  # interleaved, so neighbouring tasks spread
    assert decode_schedule(["a"], "a") == ["a"] * 8  # a lone worker keeps every turn
    assert decode_schedule(["a", "a", "b"], "a").count("a") == 14


def test_threads_and_cluster_builds_are_identical(images, tmp_path, client):
    a = Media.create(tmp_path / "a.h5", images, scheduler="threads", progress=False)
    b = Media.create(tmp_path / "b.h5", images, scheduler=client, partition_size=2, progress=False)
    assert a.ids == b.ids
    for feature in ("data/images", "data/thumbs", "data/labels"):
        np.testing.assert_array_equal(a.feature(feature)[:], b.feature(feature)[:])
        np.testing.assert_array_equal(a.feature(feature).refs[:], b.feature(feature).refs[:])


def test_one_and_two_workers_give_identical_banks(tmp_path, client):
    images = tmp_path / "images"
    write_images(images, classes=("a", "b", "c"), per_class=9, seed=3)
    with Client(
        n_workers=1, threads_per_worker=1, dashboard_address=":0", set_as_default=False
    ) as one:
        a = Pictures.create(
            tmp_path / "one.h5", images, scheduler=one, partition_size=4, progress=False
        )
    b = Pictures.create(
        tmp_path / "two.h5", images, scheduler=client, partition_size=3, progress=False
    )
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.images[:], b.images[:])
    np.testing.assert_array_equal(a.labels[:], b.labels[:])
    assert a.labels.names == b.labels.names == ["a", "b", "c"]


def test_labels_are_sorted_whatever_the_order_sources_arrive_in(tmp_path, client):
    root = tmp_path / "images"
    write_images(root, classes=("zebra", "ant", "moose"), per_class=2)
    sources = [root / "zebra", root / "moose", root / "ant"]
    # Three roots give ids relative to each; the class is lost, so use explicit files instead.
    files = [str(p) for folder in sources for p in sorted(folder.iterdir())]
    bank = Pictures.create(
        tmp_path / "b.h5", files, scheduler=client, partition_size=1, progress=False
    )
    assert bank.labels.names == ["ant", "moose", "zebra"]
    for id_ in bank.ids:
        label = bank.labels.get(id_)
        assert bank.labels.names[label] == os.path.basename(os.path.dirname(id_))


def test_sounds_concatenate_along_time(sounds, tmp_path, client):
    bank = Media.create(tmp_path / "b.h5", sounds, scheduler=client, progress=False)
    assert bank.audio.attrs["sr"] == 8000
    refs = bank.audio.refs[:]
    assert refs[0, 0] == 0 and (refs[1:, 0] == refs[:-1, 1]).all()
    assert refs[-1, 1] == len(bank.audio)
    for i, id_ in enumerate(bank.ids):
        assert bank.audio[bank.audio.refs[i]].ndim == 1  # mono
        stored = bank.audio[bank.audio.refs[i]]
        assert stored.dtype == np.int16  # the fixture's 16-bit WAVs, as they hold their samples
        np.testing.assert_array_equal(bank.audio.get(id_), to_float(stored))


def test_append_mode_adds_only_new_sources(tmp_path, client):
    root = tmp_path / "images"
    write_images(root, classes=("cats",), per_class=4)
    path = tmp_path / "b.h5"
    first = Pictures.create(path, root, scheduler=client, progress=False)
    before = first.images[:]
    first.close()
    write_images(
        root, classes=("cats", "dogs"), per_class=6, seed=1
    )  # rewrites cats 0-3, adds more
    second = Pictures.create(path, root, mode="a", scheduler=client, progress=False)
    assert second.summary.skipped == 4
    assert second.summary.ok == 8
    assert len(second) == 12
    assert second.ids[:4] == [
        "cats/cats_000.png",
        "cats/cats_001.png",
        "cats/cats_002.png",
        "cats/cats_003.png",
    ]
    # Committed sources were not re-read: their pixels are the first build's.
    np.testing.assert_array_equal(second.images[: len(before)], before)
    assert second.labels.names == ["cats", "dogs"]
    assert not os.path.exists(partial_path(path))


def test_append_writer_skips_committed_ids_it_was_not_told_about(tmp_path, client, monkeypatch):
    """The writer itself skips committed ids (a client that cannot see the bank still appends right)."""
    root = tmp_path / "images"
    write_images(root, classes=("cats",), per_class=3)
    path = tmp_path / "b.h5"
    Pictures.create(path, root, scheduler="threads", progress=False).close()
    import pipeline.build.graph

    monkeypatch.setattr(pipeline.build.graph, "committed_ids", lambda path: set())
    bank = Pictures.create(path, root, mode="a", scheduler="threads", progress=False)
    assert len(bank) == 3
    assert bank.summary.skipped == 3 and bank.summary.ok == 0


def test_graph_submits_without_blocking(images, tmp_path, client):
    path = tmp_path / "b.h5"
    build = Pictures.graph(path, images, scheduler=client)
    assert isinstance(build, Build)
    assert dask.is_dask_collection(build)
    assert not path.exists()  # building the graph writes nothing
    future = client.compute(build)
    summary = future.result()
    assert summary.ok == 12
    assert path.exists()
    with Pictures(path) as bank:
        assert len(bank) == 12


def test_in_process_decodes_run_lane_by_lane(images, tmp_path):
    """On threads, decode k+T waits for decode k (T threads) as well as for write k-W. Dask's
    threaded scheduler runs the task made ready last first: decodes the window freed together
    ran newest first and the writer waited for the oldest (a thread idle a quarter of a build
    of 5,000 JPEGs). With lanes, each thread's next decode is the one due."""
    build = Pictures.graph(tmp_path / "b.h5", images, partition_size=1, max_pending=5)
    graph = dict(build.__dask_graph__())
    lanes = os.cpu_count() or 1
    for k in range(len(build.partitions)):
        deps = {str(d) for d in graph[f"h5bank-decode-{k}-{build.token}"].dependencies}
        expected = {f"h5bank-write-{k - 5}-{build.token}"} if k >= 5 else set()
        expected |= {f"h5bank-decode-{k - lanes}-{build.token}"} if k >= lanes else set()
        assert {d for d in deps if "-decode-" in d or "-write-" in d} == expected
    (summary,) = dask.compute(build, scheduler="threads")
    assert summary.ok == 12


def test_graph_computes_on_the_threaded_scheduler(images, tmp_path):
    build = Pictures.graph(tmp_path / "b.h5", images)
    assert build.writer is None
    (summary,) = dask.compute(build)
    assert summary.ok == 12
    assert len(Pictures(tmp_path / "b.h5")) == 12


def test_the_local_scheduler_starts_and_closes_a_local_cluster(images, tmp_path):
    """scheduler="local" (what "auto", the default, picks for many small files: test_auto)."""
    import multiprocessing

    before = {p.pid for p in multiprocessing.active_children()}
    bank = Pictures.create(tmp_path / "b.h5", images, scheduler="local", progress=False)
    assert len(bank) == 12
    assert bank.summary.writer_pid != os.getpid()  # ran on a worker process...
    assert bank.summary.writer_pid not in before  # ...of a cluster of its own
    after = {p.pid for p in multiprocessing.active_children()}
    assert after <= before  # whose worker processes are gone


def test_default_client_is_used_when_set(images, tmp_path, cluster):
    with Client(cluster) as default:  # set_as_default=True
        bank = Pictures.create(tmp_path / "b.h5", images, progress=False)
        assert bank.summary.writer_pid in default.run(os.getpid).values()


def test_scheduler_address(images, tmp_path, cluster):
    bank = Pictures.create(
        tmp_path / "b.h5", images, scheduler=cluster.scheduler_address, progress=False
    )
    assert len(bank) == 12


def test_sync_scheduler(images, tmp_path):
    bank = Pictures.create(tmp_path / "b.h5", images, scheduler="sync", progress=False)
    assert bank.summary.writer_pid == os.getpid()
    assert len(bank) == 12


@pytest.mark.parametrize("scheduler", ["processes", "nonsense", 42])
def test_unusable_schedulers_are_refused(images, tmp_path, scheduler):
    with pytest.raises(SchedulerError):
        Pictures.create(tmp_path / "b.h5", images, scheduler=scheduler, progress=False)
    assert not (tmp_path / "b.h5").exists()


def test_progress_bar_and_summary(images, tmp_path, capsys):
    bank = Pictures.create(tmp_path / "b.h5", images, scheduler="threads", progress=True)
    err = capsys.readouterr().err
    assert "12/12" in err  # the bar reached the total
    assert "src/s" in err  # with a rate
    assert "12 sources ok, 0 failed" in err
    assert "images" in err and "sources/s" in err
    summary = bank.summary
    assert summary.columns["images"]["rows"] == len(bank.images)
    assert summary.columns["images"]["bytes"] > 0
    assert summary.seconds > 0 and summary.rate > 0


def test_progress_false_is_silent(images, tmp_path, capsys):
    Pictures.create(tmp_path / "b.h5", images, scheduler="threads", progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_streamed_sources(tmp_path, client):
    root = tmp_path / "images"
    paths = write_images(root, per_class=5)
    stream = (str(p) for p in paths)  # a generator: can only be listed once
    bank = Pictures.create(
        tmp_path / "b.h5", stream, scheduler=client, partition_size=3, progress=False
    )
    assert bank.ids == [str(p) for p in paths]


def test_build_replaces_target_only_when_finished(images, tmp_path):
    path = tmp_path / "b.h5"
    path.write_bytes(b"old")
    build = Pictures.graph(path, images)
    assert path.read_bytes() == b"old"
    dask.compute(build)
    with Pictures(path) as bank:
        assert len(bank) == 12
    assert not os.path.exists(partial_path(path))


# -- h5mapper's arguments: n_workers, parallelism ----------------------------------------------


def test_parallelism_names_h5mappers_three_ways_to_run(images, tmp_path):
    threads = Pictures.create(tmp_path / "t.h5", images, parallelism="threads", progress=False)
    one = Pictures.create(tmp_path / "s.h5", images, parallelism="none", progress=False)
    assert threads.summary.writer_pid == one.summary.writer_pid == os.getpid()  # in here
    processes = Pictures.create(tmp_path / "p.h5", images, parallelism="mp", progress=False)
    assert processes.summary.writer_pid != os.getpid()  # on the embedded cluster's workers
    for bank in (threads, one):
        np.testing.assert_array_equal(bank.labels[:], processes.labels[:])
    with pytest.raises(ValueError, match=r"parallelism must be one of \['mp', 'none', 'threads'\]"):
        Pictures.create(tmp_path / "x.h5", images, parallelism="processes", progress=False)
    with pytest.raises(ValueError, match="give scheduler= or parallelism=, not both"):
        Pictures.create(tmp_path / "x.h5", images, scheduler="sync", parallelism="mp")


def test_n_workers_sizes_what_h5bank_starts_and_is_refused_for_a_running_cluster(
    images, tmp_path, cluster
):
    from pipeline import local_cluster

    with local_cluster(n_workers=1) as client:
        assert len(client.scheduler_info()["workers"]) == 1
    bank = Pictures.create(
        tmp_path / "t.h5", images, scheduler="threads", n_workers=3, progress=False
    )
    assert bank.summary.ok == 12
    with (
        Client(cluster, set_as_default=False) as client,
        pytest.raises(
            ValueError,
            match=r"n_workers=8 sizes a cluster h5bank starts.*"
            r"pass scheduler='local' to build on a local cluster of 8 workers",
        ),
    ):
        Pictures.create(tmp_path / "c.h5", images, scheduler=client, n_workers=8)
    assert not (tmp_path / "c.h5").exists()
    with pytest.raises(ValueError, match="n_workers must be a whole number"):
        Pictures.create(tmp_path / "c.h5", images, n_workers=0)


def test_a_local_source_is_a_path_for_h5mapper_style_load_code(tmp_path):
    from pipeline.sources import Source, SourceSpec

    (tmp_path / "a.txt").write_text("1 2 3")
    local = Source(SourceSpec("a.txt", str(tmp_path / "a.txt")))
    with open(local) as f:
        assert f.read() == "1 2 3" and np.loadtxt(local).tolist() == [1, 2, 3]
    for spec in (SourceSpec("b", "https://user:secret@host/b.txt"), SourceSpec("plain")):
        with pytest.raises(TypeError, match=r"not a local file.*source\.read\(\)") as error:
            os.fspath(Source(spec))
        assert "secret" not in str(error.value)
