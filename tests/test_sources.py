"""Sources: expanding paths, directories, globs and URLs into ids, and fetching their bytes."""

from __future__ import annotations

import math
import os
import pickle
import uuid
from pathlib import Path

import fsspec
import imageio.v3 as iio
import numpy as np
import pytest
from conftest import write_images
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from features import Bytes, DirLabels, Feature, Image, SourceReadError, String
from pipeline import DuplicateIdError, TypedFile
from pipeline import sources as sources_module
from pipeline.build.plan import PARTITION_SOURCES, partition_sources
from pipeline.sources import Source, SourceSpec, expand, fetch, route
from pipeline.urls import is_url, redact


def ids(specs) -> list[str]:
    return [spec.id for spec in specs]


@pytest.fixture
def tree(tmp_path) -> Path:
    """A small folder with class folders, a nested folder and hidden files and folders."""
    root = tmp_path / "data"
    files = {
        "dogs/b.png": b"dog b",
        "dogs/a.png": b"dog a",
        "cats/c.png": b"cat c",
        "cats/.DS_Store": b"mac",
        "deep/er/x.png": b"deep",
        "readme.txt": b"hello",
        ".hidden.png": b"hidden file",
        ".git/config": b"hidden folder",
        "cats/.thumbs/t.png": b"hidden nested folder",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


VISIBLE = ["cats/c.png", "deep/er/x.png", "dogs/a.png", "dogs/b.png", "readme.txt"]


# -- local paths ------------------------------------------------------------------


def test_a_directory_is_walked_into_sorted_posix_ids_relative_to_it(tree):
    specs = list(expand(str(tree)))
    assert ids(specs) == VISIBLE  # sorted, hidden files and folders skipped
    for spec in specs:
        assert os.path.isabs(spec.url)
        assert spec.url == os.path.join(str(tree), *spec.id.split("/"))
        assert Source(spec).read() == (tree / spec.id).read_bytes()


def test_a_relative_directory_gives_the_same_ids_and_absolute_urls(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    specs = list(expand("data/"))
    assert ids(specs) == VISIBLE
    assert all(spec.url == str(tree / spec.id) for spec in specs)


def test_pathlib_paths_work_alone_and_in_lists(tree):
    assert list(expand(tree)) == list(expand(str(tree)))
    listed = list(expand([tree / "dogs", tree / "cats" / "c.png"]))
    assert ids(listed) == ["a.png", "b.png", str(tree / "cats" / "c.png")]


def test_a_glob_gives_ids_relative_to_its_fixed_prefix(tree):
    assert ids(expand(f"{tree}/**/*.png")) == [
        "cats/c.png",
        "deep/er/x.png",
        "dogs/a.png",
        "dogs/b.png",
    ]
    assert ids(expand(f"{tree}/d*/*.png")) == ["dogs/a.png", "dogs/b.png"]
    specs = list(expand(f"{tree}/dogs/?.png"))
    assert ids(specs) == ["a.png", "b.png"]
    assert specs[0].url == str(tree / "dogs" / "a.png")


def test_a_relative_glob_gives_ids_relative_to_the_working_directory(tree, monkeypatch):
    monkeypatch.chdir(tree)
    assert ids(expand("**/*.png")) == ["cats/c.png", "deep/er/x.png", "dogs/a.png", "dogs/b.png"]


def test_an_explicit_file_keeps_the_string_as_given(tree, monkeypatch):
    (spec,) = expand(str(tree / "dogs" / "a.png"))
    assert spec == SourceSpec(str(tree / "dogs" / "a.png"), str(tree / "dogs" / "a.png"))
    monkeypatch.chdir(tree)
    (spec,) = expand("./dogs/a.png")
    assert spec.id == "./dogs/a.png" and spec.url == str(tree / "dogs" / "a.png")


def test_a_string_that_is_neither_a_file_nor_a_url_is_a_plain_id(tmp_path):
    (spec,) = expand(str(tmp_path / "gone.png"))
    assert spec == SourceSpec(str(tmp_path / "gone.png"), None)
    (spec,) = expand("run-0042")
    assert spec == SourceSpec("run-0042", None)
    with pytest.raises(SourceReadError, match="neither an existing file nor a URL"):
        Source(spec).read()


def test_source_specs_pass_through_unchanged():
    given = SourceSpec("my id", "memory://somewhere/else.png")
    assert list(expand([given, "x"])) == [given, SourceSpec("x", None)]


@pytest.mark.parametrize("bad", [42, b"bytes/path.png", None, {"a": 1}])
def test_a_source_that_is_not_a_string_or_path_raises_type_error(bad):
    with pytest.raises(TypeError, match="a source must be a path, a URL or an id string"):
        list(expand(["fine.png", bad]))


def test_expansion_streams_a_generator_item_by_item(tree):
    consumed = []

    def stream():
        for name in ["dogs", "readme.txt", "cats"]:
            consumed.append(name)
            yield tree / name

    specs = expand(stream())
    assert next(specs).id == "a.png"
    assert consumed == ["dogs"]  # nothing past the first item was read
    assert next(specs).id == "b.png"
    assert consumed == ["dogs"]
    assert next(specs).id == str(tree / "readme.txt")
    assert consumed == ["dogs", "readme.txt"]


def test_an_existing_file_with_glob_characters_in_its_name_is_that_file(tmp_path):
    (tmp_path / "a[1].png").write_bytes(b"the file I named")
    (tmp_path / "a1.png").write_bytes(b"another file")
    assert list(expand(str(tmp_path / "a[1].png"))) == [
        SourceSpec(str(tmp_path / "a[1].png"), str(tmp_path / "a[1].png"))
    ]


# -- URLs through fsspec ----------------------------------------------------------


@pytest.fixture
def memory_root():
    """A fresh folder on this process's memory:// filesystem, removed afterwards."""
    name = f"data-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    files = {
        "cats/1.png": b"cat 1",
        "cats/2.png": b"cat 2",
        "dogs/1.png": b"dog 1",
        "notes.txt": b"text",
        "cats/.hidden.png": b"hidden",
        ".cache/x.png": b"hidden folder",
    }
    for path, data in files.items():
        fs.pipe(f"/{name}/{path}", data)
    yield name
    fs.rm(f"/{name}", recursive=True)


def test_an_explicit_memory_url_keeps_its_spelling(memory_root):
    url = f"memory://{memory_root}/cats/1.png"
    (spec,) = expand(url)
    assert spec == SourceSpec(url, url)
    assert Source(spec).read() == b"cat 1"


def test_a_memory_url_ending_in_a_slash_is_walked(memory_root):
    specs = list(expand(f"memory://{memory_root}/"))
    assert ids(specs) == [
        f"memory://{memory_root}/cats/1.png",
        f"memory://{memory_root}/cats/2.png",
        f"memory://{memory_root}/dogs/1.png",
        f"memory://{memory_root}/notes.txt",
    ]
    assert all(spec.url == spec.id for spec in specs)
    sources = [Source(spec) for spec in specs]
    fetch(sources)
    assert [s.read() for s in sources] == [b"cat 1", b"cat 2", b"dog 1", b"text"]


def test_a_memory_glob_keeps_the_users_spelling(memory_root):
    assert ids(expand(f"memory://{memory_root}/**/*.png")) == [
        f"memory://{memory_root}/cats/1.png",
        f"memory://{memory_root}/cats/2.png",
        f"memory://{memory_root}/dogs/1.png",
    ]
    assert ids(expand(f"memory://{memory_root}/*/1.png")) == [
        f"memory://{memory_root}/cats/1.png",
        f"memory://{memory_root}/dogs/1.png",
    ]


@pytest.fixture
def count_calls(monkeypatch):
    """Count ``cat`` (batched) and ``cat_file`` (one file) calls of a filesystem class."""

    def install(cls):
        calls = {"cat": [], "cat_file": 0}
        cat, cat_file = cls.cat, cls.cat_file

        def counting_cat(self, path, *args, **kwargs):
            calls["cat"].append(list(path) if isinstance(path, list) else [path])
            return cat(self, path, *args, **kwargs)

        def counting_cat_file(self, *args, **kwargs):
            calls["cat_file"] += 1
            return cat_file(self, *args, **kwargs)

        monkeypatch.setattr(cls, "cat", counting_cat)
        monkeypatch.setattr(cls, "cat_file", counting_cat_file)
        return calls

    return install


def test_fetch_is_one_batched_call_and_reads_never_fetch_again(memory_root, count_calls):
    calls = count_calls(MemoryFileSystem)
    sources = [Source(spec) for spec in expand(f"memory://{memory_root}/cats/")]
    sources.append(Source(SourceSpec("plain id")))  # no URL: an error kept, nothing fetched
    fetch(sources)
    assert len(calls["cat"]) == 1 and len(calls["cat"][0]) == 2
    fetched = calls["cat_file"]
    assert [s.read() for s in sources[:2]] == [b"cat 1", b"cat 2"]
    assert [s.read() for s in sources[:2]] == [b"cat 1", b"cat 2"]
    fetch(sources)  # already fetched: nothing to do
    assert len(calls["cat"]) == 1 and calls["cat_file"] == fetched
    with pytest.raises(SourceReadError, match="neither an existing file nor a URL"):
        sources[2].read()


def test_a_source_read_twice_is_fetched_once(tree, count_calls, monkeypatch):
    calls = count_calls(LocalFileSystem)
    reads = []
    read_local = sources_module.read_local
    monkeypatch.setattr(sources_module, "read_local", lambda p: reads.append(p) or read_local(p))
    source = Source(next(expand(str(tree / "readme.txt"))))
    assert source.read() == b"hello"
    assert source.open().read() == b"hello"
    assert source.read() == b"hello"
    # Local files are read directly, once; fsspec's local layer is not used.
    assert reads == [str(tree / "readme.txt")]
    assert calls["cat_file"] == 0 and calls["cat"] == []


def test_fetch_keeps_each_failure_with_its_source(tree):
    (gone,) = expand(str(tree / "dogs" / "a.png"))
    (tree / "dogs" / "a.png").unlink()  # removed between expansion and fetch
    sources = [Source(gone), Source(next(expand(str(tree / "readme.txt"))))]
    fetch(sources)  # never raises
    assert sources[1].read() == b"hello"
    with pytest.raises(SourceReadError, match="no such file"):
        sources[0].read()
    assert str(tree / "dogs" / "a.png") in repr(sources[0])


def test_a_missing_memory_file_says_memory_files_live_in_one_process(memory_root):
    source = Source(SourceSpec("x", f"memory://{memory_root}/cats/9.png"))
    with pytest.raises(SourceReadError, match="scheduler='threads'"):
        source.read()


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_a_directory_read_as_a_file_says_how_to_walk_it(tree, as_url):
    url = f"file://{tree / 'dogs'}" if as_url else str(tree / "dogs")
    with pytest.raises(
        SourceReadError,
        match=r"it is a directory; to build the files in it, give the directory itself",
    ):
        Source(SourceSpec("dogs", url)).read()


def test_a_memory_directory_read_as_a_file_says_it_is_a_directory(memory_root):
    with pytest.raises(SourceReadError, match="directory"):
        Source(SourceSpec("cats", f"memory://{memory_root}/cats")).read()


def test_files_with_glob_characters_in_their_names_are_fetched_in_a_batch(tmp_path):
    (tmp_path / "a[1].png").write_bytes(b"bracketed")
    (tmp_path / "b.png").write_bytes(b"plain")
    sources = [Source(spec) for spec in expand(str(tmp_path))]
    assert ids(sources) == ["a[1].png", "b.png"]
    fetch(sources)
    assert [s.read() for s in sources] == [b"bracketed", b"plain"]


@pytest.mark.parametrize(
    ("url", "kept", "secrets"),
    [
        ("s3://AKIA:secret@bucket/cats/1.png", "s3://bucket/cats/1.png", ["AKIA", "secret"]),
        ("https://user:pw@host:8443/a.png", "https://host:8443/a.png", ["user", "pw@"]),
        ("https://host/a.png?X-Amz-Signature=abc123", "https://host/a.png", ["abc123"]),
        (
            "https://host/a.png?X-Amz-Credential=AKIA&X-Amz-Security-Token=tok&X-Amz-Signature=s1",
            "https://host/a.png",
            ["AKIA", "tok", "s1"],
        ),
        ("simplecache::s3://k:s@b/x.png?token=t", "simplecache::s3://b/x.png", ["k:s", "token"]),
    ],
)
def test_redact_removes_credentials_and_signed_queries_from_urls(url, kept, secrets):
    redacted = redact(url)
    assert redacted.split("?")[0] == kept
    for secret in secrets:
        assert secret not in redacted


@pytest.mark.parametrize(
    "text", ["memory://data/cats/1.png", "/plain/path/a.png", "relative/odd?name.png", "run-0042"]
)
def test_redact_leaves_paths_and_urls_without_credentials_alone(text):
    assert redact(text) == text


def test_url_ids_have_their_credentials_removed_but_urls_keep_them():
    url = "https://user:pw@example.com/cats/1.png?X-Amz-Signature=abc123"
    (spec,) = expand(url)
    assert spec.url == url  # to fetch the bytes
    assert spec.id == "https://example.com/cats/1.png"  # what the bank records
    assert "abc123" not in repr(Source(spec))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("s3://bucket/key.png", True),
        ("memory://data/", True),
        ("file:///tmp/a.png", True),
        ("simplecache::s3://b/k", True),
        ("/tmp/a.png", False),
        ("cats/01.png", False),
        ("C:\\photos\\a.png", False),
        ("run-0042", False),
    ],
)
def test_is_url(text, expected):
    assert is_url(text) is expected


def test_route_names_the_non_derived_features_accepting_an_id():
    features = {
        "images": Image(),
        "thumbs": Image(size=(8, 8), derived_from="images"),
        "labels": DirLabels(),
        "notes": String(),
    }
    assert route(features, "cats/01.png") == ["images", "labels"]
    assert route(features, "notes/a.txt") == ["labels", "notes"]
    assert route({"images": Image()}, "a.wav") == []


# -- partitions -------------------------------------------------------------------


def test_duplicate_ids_in_a_list_raise_before_anything_is_built():
    with pytest.raises(DuplicateIdError, match=r"2 duplicate source ids.*'a', 'b'"):
        partition_sources(["a", "b", "a", "c", "b"], None, None, 4, set())


def test_duplicate_ids_from_directories_collide(tree):
    # Two roots holding the same relative path give the same id.
    with pytest.raises(DuplicateIdError, match=r"readme\.txt"):
        partition_sources([tree, tree / "dogs", tree], None, None, 2, set())


def test_duplicates_in_a_stream_fail_the_later_one_and_keep_the_first():
    stream = (name for name in ["a", "b", "a", "c"])
    partitions, skipped = partition_sources(stream, None, 2, 4, set())
    assert skipped == 0
    assert [[s.id for s in p.specs] for p in partitions] == [["a", "b"], ["c"]]
    failures = [f for p in partitions for f in p.failures]
    assert [f.id for f in failures] == ["a"]
    assert "DuplicateIdError" in failures[0].error and "first one is kept" in failures[0].error


def test_committed_ids_are_counted_and_left_out():
    partitions, skipped = partition_sources(["a", "b", "c", "d"], None, 1, 4, {"b", "d"})
    assert skipped == 2
    assert [[s.id for s in p.specs] for p in partitions] == [["a"], ["c"]]
    assert [p.index for p in partitions] == [0, 1]


@pytest.mark.parametrize(("n", "threads"), [(20, 4), (3, 8), (100, 2)])
def test_automatic_partition_size_spreads_small_lists_over_threads(n, threads):
    partitions, _ = partition_sources([f"s{i}" for i in range(n)], None, None, threads, set())
    assert sum(len(p) for p in partitions) == n
    assert len(partitions) >= min(n, threads)
    assert [p.index for p in partitions] == list(range(len(partitions)))


def test_automatic_partition_size_is_capped_for_large_lists_and_streams():
    cap = PARTITION_SOURCES
    partitions, _ = partition_sources([f"s{i}" for i in range(8 * cap)], None, None, 1, set())
    assert max(len(p) for p in partitions) == cap
    stream = (f"s{i}" for i in range(2 * cap + 88))
    partitions, _ = partition_sources(stream, None, None, 64, set())
    assert [len(p) for p in partitions] == [cap, cap, 88]


def test_an_explicit_partition_size_is_used():
    partitions, _ = partition_sources([f"s{i}" for i in range(7)], None, 3, 16, set())
    assert [len(p) for p in partitions] == [3, 3, 1]


@pytest.mark.parametrize("size", [0, -5])
def test_a_partition_size_below_one_raises_value_error(size):
    with pytest.raises(ValueError, match="partition_size must be at least 1"):
        partition_sources(["a", "b"], None, size, 4, set())


# -- end to end -------------------------------------------------------------------


class Pictures(TypedFile):
    images = Image(mode="RGB")
    labels = DirLabels()


class Originals(Pictures):
    raw = Bytes()


def test_a_build_from_memory_urls_on_threads(memory_root, tmp_path, count_calls):
    fs = fsspec.filesystem("memory")
    rng = np.random.default_rng(5)
    pixels = {}
    for name in ("cats/a.png", "cats/b.png", "dogs/c.png"):
        array = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
        fs.pipe(f"/{memory_root}/photos/{name}", iio.imwrite("<bytes>", array, extension=".png"))
        pixels[f"memory://{memory_root}/photos/{name}"] = array
    calls = count_calls(MemoryFileSystem)
    # memory:// lives in this process, so the build must run here.
    bank = Originals.create(
        tmp_path / "b.h5",
        f"memory://{memory_root}/photos/",
        scheduler="threads",
        partition_size=3,
        progress=False,
    )
    assert bank.summary.failed == 0, bank.failures()
    # One batched fetch for the partition; each file read once for both features reading it.
    assert len(calls["cat"]) == 1 and sorted(calls["cat"][0]) == [
        f"/{memory_root}/photos/{name}" for name in ("cats/a.png", "cats/b.png", "dogs/c.png")
    ]
    assert calls["cat_file"] == 3
    assert bank.raw.get(bank.ids[0]) == fs.cat_file(f"/{memory_root}/photos/cats/a.png")
    assert bank.ids == sorted(pixels)
    for id_, array in pixels.items():
        np.testing.assert_array_equal(bank.images.get(id_), array)
    assert bank.labels.names == ["cats", "dogs"]
    assert [bank.labels.names[bank.labels.get(i)] for i in bank.ids] == ["cats", "cats", "dogs"]


def test_a_build_refuses_duplicate_ids_in_a_list_before_writing(tmp_path):
    root = tmp_path / "images"
    write_images(root, per_class=2)
    with pytest.raises(DuplicateIdError, match=r"cats/cats_000\.png"):
        Pictures.create(tmp_path / "b.h5", [root, root / "cats", root], scheduler="threads")
    assert not (tmp_path / "b.h5").exists()


def test_a_build_keeps_the_first_of_duplicate_ids_in_a_stream(tmp_path):
    root = tmp_path / "images"
    write_images(root, per_class=2)
    # The second walk of dogs/ repeats its ids (ids are relative to the folder walked).
    stream = iter([root / "dogs", root / "cats", root / "dogs"])
    bank = Pictures.create(tmp_path / "s.h5", stream, scheduler="threads", progress=False)
    assert bank.ids == ["dogs_000.png", "dogs_001.png", "cats_000.png", "cats_001.png"]
    assert bank.summary.ok == 4 and bank.summary.failed == 2


def test_the_later_duplicate_of_a_stream_is_recorded_as_a_failure(tmp_path):
    root = tmp_path / "images"
    write_images(root, per_class=2)
    stream = iter([root / "dogs", root / "cats", root / "dogs"])
    bank = Pictures.create(tmp_path / "s.h5", stream, scheduler="threads", progress=False)
    failures = bank.failures()
    assert [f.id for f in failures] == ["dogs_000.png", "dogs_001.png"]
    assert all("DuplicateIdError" in f.error for f in failures)


class RunNumber(Feature):
    """Data computed from the id alone: ``"run-0042"`` gives ``[42]``. Reads no bytes."""

    __re__ = r"^run-\d+$"
    reads_bytes = False

    def load(self, source):
        return np.array([int(source.id.split("-")[1])], dtype=np.int64)


class Runs(TypedFile):
    images = Image(mode="L")
    run = RunNumber()


def test_plain_ids_build_on_worker_processes_for_features_that_read_no_bytes(tmp_path, client):
    root = tmp_path / "images"
    write_images(root, classes=("cats",), per_class=2)
    sources = [root, "run-0007", "run-0042", str(tmp_path / "gone.png")]
    bank = Runs.create(tmp_path / "b.h5", sources, scheduler=client, progress=False)
    assert bank.summary.writer_pid in client.run(os.getpid).values()
    assert bank.ids == ["cats/cats_000.png", "cats/cats_001.png", "run-0007", "run-0042"]
    assert bank.run.get("run-0007").tolist() == [7]
    assert bank.run.get("run-0042").tolist() == [42]
    assert bank.run.get("cats/cats_000.png") is None
    np.testing.assert_array_equal(
        bank.images.get("cats/cats_001.png"), iio.imread(root / "cats" / "cats_001.png", mode="L")
    )
    # A missing file is a plain id too; an Image needs its bytes, so that source fails.
    (failure,) = bank.failures()
    assert failure.id == str(tmp_path / "gone.png") and failure.feature == "images"
    assert "SourceReadError" in failure.error and "neither an existing file" in failure.error


def test_memory_urls_on_worker_processes_fail_with_a_hint_to_use_threads(
    memory_root, tmp_path, client
):
    urls = [f"memory://{memory_root}/cats/1.png", f"memory://{memory_root}/cats/2.png"]
    bank = Pictures.create(tmp_path / "b.h5", urls, scheduler=client, progress=False)
    assert len(bank) == 0
    failures = bank.failures()
    assert [f.id for f in failures] == urls
    assert all("scheduler='threads'" in f.error for f in failures)


# -- compact partitions, sorted walks, partition sizes, duplicates (how a build holds sources) --

ROOT = "/r/"
MIXED = [
    SourceSpec("a.png", ROOT + "a.png"),  # a file under the partition's root
    SourceSpec("http://h/x.png", "http://h/x.png?X-Amz-Signature=abc"),  # a URL not its id
    SourceSpec("run-7"),  # a plain id
    SourceSpec("bad\udcff.png", ROOT + "bad\udcff.png"),  # a name holding a stray byte
    SourceSpec("é/ü.png", ROOT + "é/ü.png"),
    SourceSpec(""),  # an empty plain id
    SourceSpec("", "/elsewhere/"),  # an empty id whose URL ends with it
    SourceSpec("x.png", "/other/x.png"),  # ends with its id, but under another root
    SourceSpec("sub/b.png", ROOT + "sub/b.png"),
    SourceSpec("http://h/y.png", "http://h/y.png"),  # an explicit URL kept as its id
    SourceSpec("plain/é"),
]


@pytest.mark.parametrize(
    "specs",
    [
        MIXED,
        MIXED[::-1],
        [MIXED[k] for k in np.random.default_rng(3).permutation(len(MIXED))],
        [MIXED[5], *MIXED],  # the empty id first: its URL must not become the root
        [MIXED[6], *MIXED],
        *([spec] for spec in MIXED),
        [],
    ],
    ids=lambda specs: f"{len(specs)}-specs",
)
def test_a_partition_gives_back_exactly_the_specs_it_was_given_in_order(specs):
    from pipeline.build.plan import Partition
    from pipeline.build.summary import Failure

    partition = Partition(5, specs)
    assert partition.specs == specs
    assert [type(s) for s in partition.specs] == [SourceSpec] * len(specs)
    assert partition.index == 5 and partition.failures == [] and len(partition) == len(specs)
    failures = [Failure("gone", "images", "no such file"), Failure("a", "", "DuplicateIdError")]
    failing = Partition(2, specs, failures)
    assert failing.specs == specs and failing.failures == failures
    assert len(failing) == len(specs) + 2
    restored = pickle.loads(pickle.dumps(failing))
    assert restored.specs == specs and restored.index == 2
    assert restored.failures == failures and len(restored) == len(specs) + 2


def test_an_empty_partition_has_no_specs():
    from pipeline.build.plan import Partition

    assert Partition(0, []).specs == [] and len(Partition(0, [])) == 0
    assert Partition(0).specs == [] and pickle.loads(pickle.dumps(Partition(0))).specs == []


def test_a_partition_of_files_under_one_root_pickles_smaller_than_its_ids():
    """The memory guarantee: a build holds its sources in a few bytes each, not as specs."""
    from pipeline.build.plan import Partition

    names = sorted(f"class_{i % 8}/image_{i:06d}.png" for i in range(256))
    root = "/data/some/long/root/of/the/images/"
    specs = [SourceSpec(name, root + name) for name in names]
    partition = Partition(0, specs)
    assert partition.specs == specs
    pickled = len(pickle.dumps(partition))
    assert pickled < sum(len(name) for name in names) / 4, pickled
    plain = Partition(1, [SourceSpec(name) for name in names])
    assert len(pickle.dumps(plain)) < sum(len(name) for name in names) / 4


def _visible_files(root: str) -> list[str]:
    """Every visible file under ``root`` as ``os.walk`` finds them (hidden names skipped,
    symbolic links to directories not followed), relative, in POSIX form, unsorted."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        relative = os.path.relpath(folder, root)
        for name in files:
            if not name.startswith("."):
                path = name if relative == "." else os.path.join(relative, name)
                found.append(path.replace(os.sep, "/"))
    return found


def test_a_directory_walk_yields_exactly_the_sorted_list_of_its_files(tmp_path):
    """Walking one directory at a time must agree with sorting the whole tree, where names
    sort before, between and after directories of the same prefix."""
    root = tmp_path / "tree"
    names = ["a-b/x", "a.png", "a/x", "a/y/z", "a/y0", "a/y.png", "ab", "Z/1", "c d/e",
             "é/1", "e/1", ".h", "b/.hid/q", ".hidden/a", "a/.h2", "0", "a0/x", "a_/x"]  # fmt: skip
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())
    (root / "link").symlink_to(root / "a", target_is_directory=True)  # not followed
    (root / "alias.png").symlink_to(root / "a.png")  # a link to a file is a file
    (root / "empty").mkdir()
    expected = sorted(_visible_files(str(root)))
    assert "a/y/z" in expected and "alias.png" in expected and "link/x" not in expected
    assert not any(part.startswith(".") for name in expected for part in name.split("/"))
    assert expected != sorted(expected, key=lambda n: n.split("/"))  # the walks disagree
    specs = list(expand(str(root)))
    assert ids(specs) == expected
    assert [s.url for s in specs] == [os.path.join(str(root), n) for n in expected]
    assert list(expand(str(root) + "/")) == specs
    from pipeline.sources import walk_sorted

    assert list(walk_sorted(str(root))) == expected
    assert list(walk_sorted(str(root), "a")) == [n for n in expected if n.startswith("a/")]


def _write_files(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"f{i:04d}.bin").write_bytes(rng.bytes(size))
    return folder


@pytest.fixture(scope="module")
def large_files(tmp_path_factory) -> Path:
    """128 files of 256 KiB of random bytes."""
    return _write_files(tmp_path_factory.mktemp("large") / "files", 128, 256 << 10)


@pytest.mark.parametrize(
    ("n", "threads", "stream"), [(64, 1, True), (64, 8, True), (128, 1, False)]
)
def test_the_default_partition_size_follows_file_sizes(large_files, n, threads, stream):
    """About PARTITION_BYTES of files a partition (at least 16) when files are large.

    A list of 64 files is already spread to 16 a partition on one thread, so a list known up
    front is checked with 128 (the spread rule alone would give 32)."""
    from pipeline.build.plan import PARTITION_BYTES

    files = sorted(str(p) for p in large_files.iterdir())[:n]
    limit = max(16, PARTITION_BYTES // (256 << 10))
    sources = iter(files) if stream else files
    partitions, _ = partition_sources(sources, None, None, threads, set())
    sizes = [len(p) for p in partitions]
    assert sum(sizes) == n and max(sizes) <= limit, sizes
    assert [s.url for p in partitions for s in p.specs] == files
    if stream:
        assert sizes == [limit] * (n // limit)
    # Features that read no bytes do not care how large the files are.
    partitions, _ = partition_sources(iter(files), None, None, threads, set(), reads_bytes=False)
    assert [len(p) for p in partitions] == [n]


def test_a_streamed_directory_of_large_files_is_partitioned_by_bytes(large_files):
    from pipeline.build.plan import PARTITION_BYTES

    limit = max(16, PARTITION_BYTES // (256 << 10))
    partitions, _ = partition_sources(iter([str(large_files)]), None, None, 1, set())
    assert [len(p) for p in partitions] == [limit] * (128 // limit)
    partitions, _ = partition_sources(str(large_files), None, None, 1, set())
    assert max(len(p) for p in partitions) <= limit


@pytest.mark.parametrize(("n", "threads"), [(100, 2), (20, 4), (3000, 1), (700, 1)])
def test_tiny_files_keep_the_count_based_default_partition_size(tmp_path, n, threads):
    folder = _write_files(tmp_path / "tiny", n, 10)
    (folder / "empty").write_bytes(b"")
    n += 1
    expected = min(PARTITION_SOURCES, math.ceil(n / (4 * threads)))
    for sources in (str(folder), [str(folder)]):
        partitions, _ = partition_sources(sources, None, None, threads, set())
        assert [len(p) for p in partitions][:-1] == [expected] * (len(partitions) - 1)
        assert sum(len(p) for p in partitions) == n
    partitions, _ = partition_sources(iter([str(folder)]), None, None, threads, set())
    cap = PARTITION_SOURCES
    assert [len(p) for p in partitions] == [cap] * (n // cap) + ([n % cap] if n % cap else [])


@pytest.mark.parametrize(("n", "threads"), [(64, 1), (100, 2), (5000, 1)])
def test_plain_ids_keep_the_count_based_default_partition_size(tmp_path, n, threads):
    """Ids that are no files (even if they look like large files' names) are not sized by bytes."""
    names = [str(tmp_path / f"missing-{i:05d}.png") for i in range(n)]
    partitions, _ = partition_sources(names, None, None, threads, set())
    assert [s.url for p in partitions for s in p.specs] == [None] * n
    expected = min(PARTITION_SOURCES, math.ceil(n / (4 * threads)))
    assert [len(p) for p in partitions][:-1] == [expected] * (len(partitions) - 1)
    partitions, _ = partition_sources(iter(names), None, None, threads, set())
    cap = PARTITION_SOURCES
    assert [len(p) for p in partitions] == [cap] * (n // cap) + ([n % cap] if n % cap else [])


def test_duplicates_of_a_stream_in_other_partitions_fail_where_they_appear():
    stream = (name for name in ["a", "b", "c", "a", "d", "b", "e", "a"])
    partitions, _ = partition_sources(stream, None, 2, 4, set())
    assert [p.index for p in partitions] == [0, 1, 2, 3]
    assert [[s.id for s in p.specs] for p in partitions] == [["a", "b"], ["c"], ["d"], ["e"]]
    assert [[f.id for f in p.failures] for p in partitions] == [[], ["a"], ["b"], ["a"]]
    assert [len(p) for p in partitions] == [2, 2, 2, 2]
    kept = [s.id for p in partitions for s in p.specs]
    assert sorted(kept) == sorted(set(kept)) == ["a", "b", "c", "d", "e"]
    for p in partitions:
        for failure in p.failures:
            assert "DuplicateIdError" in failure.error and "first one is kept" in failure.error
            assert failure.feature == ""


def test_a_duplicate_file_of_a_stream_names_both_files(tmp_path):
    first, later = tmp_path / "one", tmp_path / "two"
    for folder, names in ((first, ["x.png", "y.png"]), (later, ["w.png", "x.png", "z.png"])):
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(name.encode())
    partitions, _ = partition_sources(iter([str(first), str(later)]), None, 2, 4, set())
    assert [[s.url for s in p.specs] for p in partitions] == [
        [str(first / "x.png"), str(first / "y.png")],
        [str(later / "w.png")],
        [str(later / "z.png")],
    ]
    (failure,) = [f for p in partitions for f in p.failures]
    assert partitions[1].failures == [failure] and failure.id == "x.png"
    assert f"an earlier source of this build ({first / 'x.png'}) has the same id" in failure.error
    assert f"this one ({later / 'x.png'}) is not" in failure.error


def test_duplicate_ids_of_a_list_are_listed_in_source_order():
    names = [f"k{i}" for i in range(12)]
    order = [names[k] for k in np.random.default_rng(7).permutation(12)]
    sources = names + order
    with pytest.raises(DuplicateIdError) as caught:
        partition_sources(sources, None, None, 4, set())
    shown = ", ".join(repr(name) for name in order[:10])
    assert f"12 duplicate source ids, nothing was written: {shown} and 2 more." in str(caught.value)
    with pytest.raises(DuplicateIdError, match=r"2 duplicate source ids.*: 'c', 'b'\. "):
        partition_sources(["a", "b", "c", "c", "b"], None, 1, 4, set())


def test_duplicate_files_of_a_list_name_both_files(tmp_path):
    first, later = tmp_path / "one", tmp_path / "two"
    for folder in (first, later):
        folder.mkdir()
        (folder / "x.png").write_bytes(b"x")
    with pytest.raises(DuplicateIdError) as caught:
        partition_sources([str(first), str(later)], None, None, 4, set())
    assert f"'x.png' ({first / 'x.png'} and {later / 'x.png'})" in str(caught.value)


def test_a_large_stream_finds_exactly_its_duplicates():
    def stream():
        for i in range(20_000):
            yield f"source-{i:05d}"
            if i == 9_000:
                yield "source-00003"
            elif i == 14_500:
                yield "source-12000"
            elif i == 19_999:
                yield "source-00000"

    partitions, _ = partition_sources(stream(), None, None, 4, set())
    kept = [s.id for p in partitions for s in p.specs]
    assert kept == [f"source-{i:05d}" for i in range(20_000)]
    failed = [(p.index, f.id) for p in partitions for f in p.failures]
    # Positions 9,001, 14,502 and 20,002 of the stream, in partitions of the default size.
    where = [(position // PARTITION_SOURCES, id_) for position, id_ in
             [(9_001, "source-00003"), (14_502, "source-12000"), (20_002, "source-00000")]]  # fmt: skip
    assert failed == where
    assert sum(len(p) for p in partitions) == 20_003
