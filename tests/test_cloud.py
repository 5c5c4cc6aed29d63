"""Cloud sources and remote banks, against real servers on 127.0.0.1.

S3 is a moto server, HTTP is ``rangeserver.py`` (Range requests, keep-alive),
GCS is ``gcp-storage-emulator``: each a separate process (``conftest.py``,
``servers.py``). Builds that involve workers run on the session's 2-process
``LocalCluster`` (``client``). Every comparison is against the same build from
local files; no test depends on timing.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import re
import shutil
import signal
import ssl
import time
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import dask
import fsspec
import numpy as np
import pytest
from conftest import write_images
from fsspec.core import url_to_fs
from servers import RangeServer, free_port, refuses, start_moto

from features import Array, DirLabels, Feature, Image
from features.errors import SourceReadError
from pipeline import (
    BankChangedError,
    ReadOnlyError,
    SourceError,
    TypedFile,
    UnknownIdError,
    WriterError,
)
from pipeline.files import cache as file_cache
from pipeline.files.cache import release
from pipeline.files.remote import remote_identity
from pipeline.urls import is_url, options_for, transient

N_IMAGES = 500
CLASSES = ("c0", "c1", "c2", "c3", "c4")


class Pictures(TypedFile):
    images = Image(mode="RGB")
    labels = DirLabels()


class Thumbs(TypedFile):
    """Fixed-size images, larger than a remote bank's first cached block (2 MiB) in all."""

    images = Image(size=(48, 48), mode="RGB", chunks=(64, 48, 48, 3))
    labels = DirLabels()


# -- features that report from the workers (module level: workers import this module) ------


class WorkerPid(Array):
    """The process that loaded the source, after reading its bytes."""

    def load(self, source):
        source.read()
        return np.array([os.getpid()], dtype=np.int64)


class Sourced(TypedFile):
    images = Image(mode="RGB")
    labels = DirLabels()
    pid = WorkerPid(item=True, pattern=r"\.png$")


class NotUploaded(Feature):
    """Records, for each source, whether ``url`` already exists while the build runs (0: no)."""

    storage = "item"
    reads_bytes = False
    url: str | None = None
    storage_options: dict | None = None

    def load(self, source):
        if self.url is None:
            return None
        fs, path = url_to_fs(self.url, skip_instance_cache=True, **self.storage_options)
        return np.array([int(fs.exists(path))], dtype=np.int8)


class Watched(TypedFile):
    images = Image(mode="RGB")
    labels = DirLabels()
    uploaded = NotUploaded()


class Tripwire(Feature):
    """Stops a server by its PID while loading one source, and waits until its port refuses.

    ``armed`` is ``(source id, pid, port)``, or ``None``. Loads nothing.
    """

    reads_bytes = False
    armed: tuple[str, int, int] | None = None

    def load(self, source):
        if self.armed is not None and source.id == self.armed[0]:
            _, pid, port = self.armed
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 60  # a bound on waiting, not a measurement
            while not refuses(port):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server on port {port} did not stop")
                time.sleep(0.02)
        return None


class Outage(TypedFile):
    images = Image(mode="RGB")
    labels = DirLabels()
    trip = Tripwire()


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _collect_garbage():
    """Collect cycles on the main thread after each test (h5py objects must not be freed on
    fsspec's IO thread, see ``gc_paused``)."""
    yield
    gc.collect()


def s3_options(endpoint, **extra):
    """Options for moto: dummy credentials, and retries left to h5bank (as docs/cloud.md advises)."""
    return {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": "testing",
        "config_kwargs": {"connect_timeout": 5, "read_timeout": 30, "retries": {"total_max_attempts": 1}},
        **extra,
    }  # fmt: skip


@pytest.fixture(scope="session")
def s3(moto):
    return s3_options(moto.url)


@pytest.fixture
def bucket(s3):
    """A fresh, empty bucket for one test."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", **s3).mkdir(name)
    return name


def upload(fs, root, destination):
    """Copy the files under ``root`` to ``destination/<relative path>`` with ``fs``."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        fs.put_file(str(path), f"{destination}/{path.relative_to(root).as_posix()}")
    return files


def assert_same_bank(bank, local, prefix=""):
    """``bank`` holds what ``local`` holds: ids ``prefix + local id`` in the same order, the
    same pixels for each, the same labels."""
    assert bank.ids == [prefix + id_ for id_ in local.ids]
    assert bank.labels.names == local.labels.names
    np.testing.assert_array_equal(bank.labels[:], local.labels[:])
    for id_, local_id in zip(bank.ids, local.ids, strict=True):
        np.testing.assert_array_equal(bank.images.get(id_), local.images.get(local_id))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, moto, s3, http_server):
    """500 PNGs (5 classes, mixed sizes and modes): locally, in S3 (``s3://data500/imgs/``)
    and over HTTP (``<server>/data500/imgs/``), with the bank built from the local files."""
    folder = tmp_path_factory.mktemp("data500")
    root = folder / "imgs"
    write_images(root, classes=CLASSES, per_class=N_IMAGES // len(CLASSES))
    fs = fsspec.filesystem("s3", **s3)
    fs.mkdir("data500")
    fs.put(f"{root}/", "data500/imgs/", recursive=True)
    shutil.copytree(root, http_server.root / "data500" / "imgs")
    local = folder / "local.h5"
    Pictures.create(local, root, scheduler="threads", progress=False).close()
    return {"root": root, "local": local, "http": f"{http_server.url}/data500/imgs/"}


@pytest.fixture
def local_bank(dataset):
    with Pictures(dataset["local"]) as bank:
        yield bank


@pytest.fixture
def small(images, tmp_path):
    """The 12 PNGs of ``images`` and their bank built from the local files."""
    with Pictures.create(tmp_path / "local.h5", images, scheduler="threads", progress=False) as b:
        yield images, b


# -- 1. builds from S3, HTTP, chained URLs and GCS equal the local build ---------------------


def test_a_500_image_s3_prefix_walk_on_the_workers_equals_the_local_build(
    dataset, local_bank, s3, client, tmp_path
):
    bank = Pictures.create(
        tmp_path / "b.h5", "s3://data500/imgs/", storage_options=s3, scheduler=client, progress=False
    )  # fmt: skip
    with bank:
        assert (bank.summary.ok, bank.summary.failed) == (N_IMAGES, 0)
        assert bank.failures() == []
        assert_same_bank(bank, local_bank, "s3://data500/imgs/")


def test_an_s3_glob_equals_the_local_build(dataset, local_bank, s3, tmp_path):
    bank = Pictures.create(
        tmp_path / "b.h5", "s3://data500/imgs/**/*.png", storage_options=s3,
        scheduler="threads", progress=False,
    )  # fmt: skip
    with bank:
        assert (bank.summary.ok, bank.summary.failed) == (N_IMAGES, 0)
        assert_same_bank(bank, local_bank, "s3://data500/imgs/")


def test_a_500_image_http_directory_url_equals_the_local_build(
    dataset, local_bank, client, tmp_path
):
    url = dataset["http"]
    with Pictures.create(tmp_path / "b.h5", url, scheduler=client, progress=False) as bank:
        assert (bank.summary.ok, bank.summary.failed) == (N_IMAGES, 0)
        assert_same_bank(bank, local_bank, url)


def test_an_explicit_list_of_http_urls_equals_the_local_build(dataset, local_bank, tmp_path):
    urls = [dataset["http"] + id_ for id_ in local_bank.ids]
    with Pictures.create(tmp_path / "b.h5", urls, scheduler="threads", progress=False) as bank:
        assert (bank.summary.ok, bank.summary.failed) == (N_IMAGES, 0)
        assert bank.ids == urls  # explicit URLs are their own ids
        assert_same_bank(bank, local_bank, dataset["http"])


def test_chained_simplecache_urls_take_per_protocol_options_on_the_workers(
    small, s3, bucket, client, tmp_path
):
    root, local = small
    upload(fsspec.filesystem("s3", **s3), root, f"{bucket}/imgs")
    prefix = f"simplecache::s3://{bucket}/imgs/"
    cache = tmp_path / "cache"
    options = {"s3": s3, "simplecache": {"cache_storage": str(cache)}}
    with Pictures.create(
        tmp_path / "b.h5", [prefix + id_ for id_ in local.ids], storage_options=options,
        scheduler=client, progress=False,
    ) as bank:  # fmt: skip
        assert (bank.summary.ok, bank.summary.failed) == (12, 0)
        assert_same_bank(bank, local, prefix)
    # The workers fetched through the cache the options named.
    assert len([p for p in cache.iterdir() if p.is_file() and not p.name.startswith("cache")]) == 12


def test_a_gcs_build_equals_the_local_build(small, gcs, tmp_path):
    root, local = small
    # The emulator listens with a backlog of 5: fetch in batches of 4 (a storage option of
    # every async fsspec filesystem), or concurrent connections stall on dropped SYNs.
    options = {"endpoint_url": gcs.url, "token": "anon", "batch_size": 4}
    prefix = f"gs://gbucket/{uuid.uuid4().hex[:8]}/imgs/"
    upload(fsspec.filesystem("gs", **options), root, prefix[len("gs://") :].rstrip("/"))
    with Pictures.create(
        tmp_path / "b.h5", prefix, storage_options=options, scheduler="threads", progress=False
    ) as bank:  # fmt: skip
        assert (bank.summary.ok, bank.summary.failed) == (12, 0)
        assert_same_bank(bank, local, prefix)


# -- 2. storage_options reach the workers -----------------------------------------------------


def test_storage_options_reach_the_worker_processes_that_fetch(small, s3, bucket, client, tmp_path):
    root, local = small
    upload(fsspec.filesystem("s3", **s3), root, f"{bucket}/imgs")
    # Nothing in the workers' environment points s3fs at the moto server: only the options can.
    names = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3", "FSSPEC_S3_ENDPOINT_URL")
    environments = client.run(lambda: {n: os.environ.get(n) for n in names})
    assert all(v is None for env in environments.values() for v in env.values())
    with Sourced.create(
        tmp_path / "b.h5", f"s3://{bucket}/imgs/", storage_options=s3, scheduler=client,
        progress=False,
    ) as bank:  # fmt: skip
        assert (bank.summary.ok, bank.summary.failed) == (12, 0)
        assert_same_bank(bank, local, f"s3://{bucket}/imgs/")
        loaded_by = set(bank.pid[:].ravel().tolist())
    assert loaded_by <= set(client.run(os.getpid).values())
    assert os.getpid() not in loaded_by


# -- 3. faults ----------------------------------------------------------------------------


def test_a_missing_key_bucket_or_http_file_fails_that_source_at_once(
    small, s3, bucket, http_server, client, tmp_path
):
    root, local = small
    upload(fsspec.filesystem("s3", **s3), root, f"{bucket}/imgs")
    good = f"s3://{bucket}/imgs/{local.ids[0]}"
    missing = [
        f"s3://{bucket}/imgs/cats/missing.png",
        f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/cats/a.png",
        f"{http_server.url}/no/such/cats/file.png",
    ]
    with Pictures.create(
        tmp_path / "b.h5", [good, *missing], storage_options={"s3": s3}, scheduler=client,
        progress=False,
    ) as bank:  # fmt: skip
        assert bank.ids == [good]
        failures = {f.id: f for f in bank.failures()}
    assert sorted(failures) == sorted(missing)
    for url, failure in failures.items():
        assert failure.feature == "images"
        assert f"cannot read {url}: no such file" in failure.error
        assert "attempt" not in failure.error  # permanent: never retried


@pytest.mark.parametrize("protocol", ["s3", "http"])
def test_a_refused_connection_is_retried_as_configured_then_fails(protocol, tmp_path):
    port = free_port()
    url = f"{protocol}://bkt/cats/a.png" if protocol == "s3" else f"http://127.0.0.1:{port}/a.png"
    options = s3_options(f"http://127.0.0.1:{port}")  # nothing listens there
    with dask.config.set({"h5bank.fetch.retries": 1, "h5bank.fetch.backoff": 0.05}):
        bank = Pictures.create(
            tmp_path / "b.h5", [url], storage_options={"s3": options}, scheduler="threads",
            progress=False,
        )  # fmt: skip
    with bank:
        (failure,) = bank.failures()
        assert len(bank) == 0
    assert failure.id == url
    assert f"cannot read {url}: " in failure.error
    assert failure.error.endswith("(after 2 attempts)")


def test_fetch_retry_settings_apply_on_the_workers_of_a_running_cluster(client, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/cats/a.png"
    with dask.config.set({"h5bank.fetch.retries": 1, "h5bank.fetch.backoff": 0.05}):
        bank = Pictures.create(tmp_path / "b.h5", [url], scheduler=client, progress=False)
    with bank:
        (failure,) = bank.failures()
    assert failure.error.endswith("(after 2 attempts)"), failure.error


def test_an_s3_server_stopped_mid_build_fails_its_sources_and_an_append_finishes_the_bank(
    small, client, tmp_path
):
    root, local = small
    server = start_moto(tmp_path, port=free_port())  # its own: this test stops it
    settings = dask.config.set({"h5bank.fetch.retries": 1, "h5bank.fetch.backoff": 0.05})
    options = s3_options(server.url)
    fs = fsspec.filesystem("s3", **options)
    prefix = "s3://bkt/imgs/"
    urls = [prefix + id_ for id_ in local.ids]
    path = tmp_path / "b.h5"
    try:
        fs.mkdir("bkt")
        upload(fs, root, "bkt/imgs")
        # Partitions of 3; decode k + 1 waits for write k (max_pending=1). The server is
        # stopped while partition 0 loads (its bytes already fetched): it alone gets in.
        Outage.trip.armed = (urls[2], server.pid, server.port)
        with Outage.create(
            path, prefix, storage_options=options, scheduler=client, partition_size=3,
            max_pending=1, progress=False,
        ) as bank:  # fmt: skip
            Outage.trip.armed = None
            server.wait_gone()
            assert bank.ids == urls[:3]
            assert (bank.summary.ok, bank.summary.failed) == (3, 9)
            failures = {f.id: f.error for f in bank.failures()}
            for id_, local_id in zip(bank.ids, local.ids, strict=False):
                np.testing.assert_array_equal(bank.images.get(id_), local.images.get(local_id))
        assert sorted(failures) == urls[3:]
        for url, error in failures.items():
            assert f"cannot read {url}: " in error
            assert "Could not connect to the endpoint URL" in error
            assert error.endswith("(after 2 attempts)")

        server.start()  # the same port; moto starts empty
        fs.invalidate_cache()
        fs.mkdir("bkt")
        upload(fs, root, "bkt/imgs")
        with Outage.create(
            path, prefix, mode="a", storage_options=options, scheduler=client, progress=False
        ) as bank:  # fmt: skip
            assert (bank.summary.ok, bank.summary.failed, bank.summary.skipped) == (9, 0, 3)
            assert len(set(bank.ids)) == len(bank) == 12
            assert bank.failures() == []
            assert_same_bank(bank, local, prefix)
    finally:
        Outage.trip.armed = None
        settings.__exit__(None, None, None)
        server.stop()


# -- 4. no secrets on disk or in output -------------------------------------------------------


class SignedPictures(TypedFile):
    # A presigned URL keeps its non-secret query parameters (``?Expires=...``) in its id;
    # features match URL ids without the query string too.
    images = Image(mode="RGB")
    labels = DirLabels()


def test_secrets_in_options_and_signed_urls_are_never_written_or_printed(
    small, moto, bucket, http_server, client, tmp_path, capfd
):
    root, local = small
    key = f"AKIA{uuid.uuid4().hex[:16].upper()}"
    secret = f"h5bank-secret-{uuid.uuid4().hex}"
    other = f"h5bank-signature-{uuid.uuid4().hex}"
    options = s3_options(moto.url, key=key, secret=secret)
    fs = fsspec.filesystem("s3", **options)
    upload(fs, root, f"{bucket}/imgs")
    # Credentials in a URL's query string: a real presigned URL, fetched over plain HTTP.
    presigned = fs.sign(f"{bucket}/imgs/{local.ids[0]}", expiration=600)
    query = parse_qs(urlsplit(presigned).query)
    assert query["AWSAccessKeyId"] == [key]
    signature = query["Signature"][0]
    missing = f"{http_server.url}/{bucket}/cats/missing.png?X-Amz-Signature={other}"
    sources = [f"s3://{bucket}/imgs/", f"s3://{bucket}/imgs/cats/missing.png", presigned, missing]
    path = tmp_path / "b.h5"
    bank = SignedPictures.create(
        path, sources, storage_options={"s3": options}, scheduler=client, progress=True
    )
    with bank:
        assert (bank.summary.ok, bank.summary.failed) == (13, 2)
        clean = presigned.split("?")[0] + f"?Expires={query['Expires'][0]}"
        assert bank.ids[-1] == clean
        np.testing.assert_array_equal(bank.images.get(clean), local.images.get(local.ids[0]))
        texts = [str(f) for f in bank.failures()] + [str(bank.summary), repr(bank), *bank.ids]
    assert len(texts) == 2 + 2 + 13
    out, err = capfd.readouterr()
    assert "h5bank b.h5" in err and "2 failed" in err  # the progress bar and summary ran
    logs = str(client.get_worker_logs()) + str(client.get_scheduler_logs())
    on_disk = path.read_bytes()
    for text in (key, secret, signature, quote(signature, safe=""), other):
        assert text not in out and text not in err and text not in logs
        assert not any(text in t for t in texts)
        assert text.encode() not in on_disk


def test_a_presigned_url_is_read_by_the_feature_matching_its_extension(small, s3, bucket, tmp_path):
    root, local = small
    fs = fsspec.filesystem("s3", **s3)
    upload(fs, root, f"{bucket}/imgs")
    presigned = fs.sign(f"{bucket}/imgs/{local.ids[0]}", expiration=600)
    with Pictures.create(tmp_path / "b.h5", [presigned], scheduler="threads", progress=False) as b:
        assert b.summary.ok == 1
        np.testing.assert_array_equal(b.images.get(b.ids[0]), local.images.get(local.ids[0]))


# -- 5. remote banks --------------------------------------------------------------------


@pytest.fixture(scope="module")
def thumbs(dataset, tmp_path_factory):
    """A local bank of 500 48x48 RGB images (3.5 MB of pixels: beyond the first 2 MiB block)."""
    path = tmp_path_factory.mktemp("thumbs") / "thumbs.h5"
    Thumbs.create(path, dataset["root"], scheduler="threads", progress=False).close()
    return path


@pytest.fixture(params=["s3", "http", "gcs"])
def remote_thumbs(request, thumbs, http_server):
    """``thumbs`` uploaded to S3 / served over HTTP / uploaded to GCS: ``(url, options)``."""
    name = f"{uuid.uuid4().hex[:8]}/thumbs.h5"
    if request.param == "http":
        (http_server.root / name).parent.mkdir()
        shutil.copy(thumbs, http_server.root / name)
        return f"{http_server.url}/{name}", None
    if request.param == "s3":
        options = request.getfixturevalue("s3")
        fs = fsspec.filesystem("s3", **options)
        fs.makedirs("banks", exist_ok=True)
        url = f"s3://banks/{name}"
    else:
        options = {"endpoint_url": request.getfixturevalue("gcs").url, "token": "anon"}
        fs = fsspec.filesystem("gs", **options)
        url = f"gs://gbucket/{name}"
    fs.put_file(str(thumbs), url.split("://", 1)[1])
    return url, options


@pytest.mark.timeout(120, method="thread")
def test_a_remote_bank_opens_read_only_and_reads_like_the_local_one(remote_thumbs, thumbs, client):
    url, options = remote_thumbs
    with pytest.raises(ReadOnlyError):
        Thumbs(url, "r+", storage_options=options)
    with Thumbs(thumbs) as local, Thumbs(url, storage_options=options) as bank:
        assert bank.ids == local.ids and len(bank) == N_IMAGES
        for id_ in (local.ids[0], local.ids[250], local.ids[-1]):
            got, want = bank.get(id_), local.get(id_)
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
        np.testing.assert_array_equal(bank.images[100:164], local.images[100:164])
        spread = [499, 3, 250, 31, 3, 470, 120]  # ranges fetched together, in any order
        np.testing.assert_array_equal(bank.images[spread], local.images[spread])
        np.testing.assert_array_equal(bank.labels[:], local.labels[:])
        assert bank.labels.names == local.labels.names
        pixels = local.images[:]
        arrays = bank.to_dask()
        total = arrays["images"].sum(axis=0, dtype=np.int64)
        np.testing.assert_array_equal(
            total.compute(scheduler=client), pixels.sum(axis=0, dtype=np.int64)
        )
        with pytest.raises(ReadOnlyError):
            bank.map(np.mean, "images", output="means", scheduler=client, progress=False)
    with TypedFile(url, storage_options=options) as generic:  # any HDF5 file, without its type
        assert generic.ids == bank.ids
        np.testing.assert_array_equal(generic.images[-64:], pixels[-64:])


@pytest.mark.timeout(120, method="thread")
def test_opening_a_remote_bank_and_reading_one_source_over_http_takes_few_requests(
    thumbs, http_server
):
    name = f"{uuid.uuid4().hex[:8]}.h5"
    shutil.copy(thumbs, http_server.root / name)
    with Thumbs(thumbs) as local:
        last = local.ids[-1]  # its pixels lie beyond the first 2 MiB
        want = local.images.get(last)
    mark = http_server.mark()
    with Thumbs(f"{http_server.url}/{name}") as bank:
        np.testing.assert_array_equal(bank.images.get(last), want)
    requests = http_server.requests_since(mark)
    assert all(f"/{name} " in line for line in requests)
    assert 0 < len(requests) < 20, requests


@pytest.mark.timeout(120, method="thread")
def test_scattered_rows_of_a_remote_bank_are_fetched_as_their_own_ranges(thumbs, http_server):
    """A batch of rows far apart is one range request per row, each of that row's bytes: not
    a 2 MiB block of the file object's cache per row (a batch of 64 random 12 KB images over
    HTTP moved 144 MB that way)."""
    name = f"{uuid.uuid4().hex[:8]}.h5"
    shutil.copy(thumbs, http_server.root / name)
    rows = list(range(5, N_IMAGES, 30))  # 17 rows, 30 rows (200 KB) apart
    with Thumbs(thumbs) as local:
        want = local.images[rows]
    row_bytes = want[0].nbytes
    with Thumbs(f"{http_server.url}/{name}") as bank:
        bank.images[[0]]  # the column opened, its first chunk's address read
        mark = http_server.mark()
        np.testing.assert_array_equal(bank.images[rows], want)
        sizes = [int(line.split()[3]) for line in http_server.requests_since(mark)]
    assert sizes.count(row_bytes) == len(rows), sizes
    assert sum(sizes) < len(rows) * row_bytes + 2 * (2 << 20)  # and at most the index's blocks


@pytest.mark.timeout(120, method="thread")
def test_a_batch_of_remote_sounds_equals_the_local_banks(http_server, tmp_path):
    """``get_rows`` of sounds over HTTP (every clip's samples into one array through the
    range reader, then one conversion to floats) equals the local bank's, clip by clip."""
    from conftest import write_sounds

    from features import Sound

    class Tunes(TypedFile):
        audio = Sound(sr=8000, mono=True)

    write_sounds(tmp_path / "tunes", classes=("a", "b", "c"), per_class=6, seed=4)
    name = f"{uuid.uuid4().hex[:8]}.h5"
    local_path = tmp_path / name
    Tunes.create(local_path, tmp_path / "tunes", scheduler="threads", progress=False).close()
    shutil.copy(local_path, http_server.root / name)
    rows = [16, 3, 9, 0, 12, 3]  # any order, a repeat
    with Tunes(local_path) as local:
        want = local.audio.get_rows(rows)
    with Tunes(f"{http_server.url}/{name}") as bank:
        assert bank.audio.require_column().data._ranges is not None  # the range reader's path
        got = bank.audio.get_rows(rows)
    assert len(got) == len(rows)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b)


@pytest.mark.timeout(120, method="thread")
def test_a_chunk_read_densely_is_fetched_whole_once_and_kept(thumbs, http_server):
    """Rows drawn from a few chunks (``shuffle="blocks"``) fetch each chunk once, whole, and
    the next batches from it cost no request."""
    name = f"{uuid.uuid4().hex[:8]}.h5"
    shutil.copy(thumbs, http_server.root / name)
    with Thumbs(thumbs) as local:
        everything = local.images[:]
    with Thumbs(f"{http_server.url}/{name}") as bank:
        per_chunk = bank.images.require_column().data.chunks[0]  # chunks 0 and 2, far apart
        first = [*range(0, per_chunk, 4), *range(2 * per_chunk, 3 * per_chunk, 4)]
        later = [*range(2, per_chunk, 4), *range(2 * per_chunk + 2, 3 * per_chunk, 4)]
        bank.images[[0, 2 * per_chunk]]  # two rows, each its own range; addresses read
        mark = http_server.mark()
        np.testing.assert_array_equal(bank.images[first], everything[first])
        fetched = [int(line.split()[3]) for line in http_server.requests_since(mark)]
        mark = http_server.mark()
        np.testing.assert_array_equal(bank.images[later], everything[later])
        again = http_server.requests_since(mark)
    assert fetched == [per_chunk * everything[0].nbytes] * 2, fetched  # each chunk, whole
    assert again == []


@pytest.mark.timeout(180, method="thread")
def test_a_dataloader_over_http_with_block_shuffle_serves_every_item_once(thumbs, http_server):
    """Forked workers open the remote bank for themselves, with its range reader, and each
    fetches the chunks of its own blocks."""
    from pipeline import GetId, Input, Target

    name = f"{uuid.uuid4().hex[:8]}.h5"
    shutil.copy(thumbs, http_server.root / name)
    with Thumbs(thumbs) as local:
        expected = {
            i.tobytes(): int(y) for i, y in zip(local.images[:], local.labels[:], strict=True)
        }
    mark = http_server.mark()
    with Thumbs(f"{http_server.url}/{name}") as bank:
        spec = dict(x=Input("images", GetId()), y=Target("labels", GetId()))
        loader = bank.serve(spec, batch_size=32, shuffle="blocks", num_workers=2)
        served = [
            (image.numpy().tobytes(), int(label))
            for batch in loader
            for image, label in zip(batch["x"], batch["y"], strict=True)
        ]
    assert len(served) == len(expected) == N_IMAGES
    assert dict(served) == expected  # every item once, with its label
    ranged = [line for line in http_server.requests_since(mark) if f"/{name} 206 " in line]
    assert 0 < len(ranged) < N_IMAGES // 4  # whole chunks, not a request an item
    # Each worker reads blocks of its own: no chunk is fetched whole by both (16 when it was).
    whole_chunks = [line for line in ranged if line.split()[3] == str(64 * 48 * 48 * 3)]
    assert 0 < len(whole_chunks) <= -(-N_IMAGES // 64), whole_chunks


# -- 6. create() to a URL uploads only a complete bank ---------------------------------------


@pytest.mark.timeout(120, method="thread")
def test_create_to_s3_uploads_the_bank_only_once_it_is_complete(
    small, s3, bucket, client, tmp_path
):
    root, local = small
    upload(fsspec.filesystem("s3", **s3), root, f"{bucket}/imgs")
    url = f"s3://{bucket}/banks/b.h5"
    Watched.uploaded.url, Watched.uploaded.storage_options = url, s3
    try:
        bank = Watched.create(
            url, f"s3://{bucket}/imgs/", storage_options=s3, scheduler=client, progress=False
        )
    finally:
        Watched.uploaded.url = Watched.uploaded.storage_options = None
    with bank:
        assert bank.remote and bank.summary.ok == 12
        # Every source, while it was built on a worker, found no object at the URL yet.
        np.testing.assert_array_equal(bank.uploaded[:], np.zeros((12, 1)))
        assert_same_bank(bank, local, f"s3://{bucket}/imgs/")
    assert fsspec.filesystem("s3", skip_instance_cache=True, **s3).exists(url)


def test_a_build_to_s3_that_fails_uploads_nothing(small, s3, bucket, client, tmp_path):
    root, local = small
    upload(fsspec.filesystem("s3", **s3), root, f"{bucket}/imgs")
    url = f"s3://{bucket}/banks/b.h5"
    sources = [f"s3://{bucket}/imgs/{id_}" for id_ in local.ids] + [f"s3://{bucket}/x/gone.png"]
    with pytest.raises(SourceError, match=r"gone\.png"):
        Pictures.create(
            url, sources, storage_options=s3, scheduler=client, on_error="raise", progress=False
        )
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3)
    assert not fs.exists(url)
    assert fs.find(f"{bucket}/banks") == []


# -- 5. where endpoints and credentials come from ---------------------------------------------


def test_storage_options_from_the_dask_config_per_protocol(small, s3, bucket, tmp_path):
    """No storage_options argument: ``h5bank.storage-options`` (as a YAML file or the
    environment would set it) gives the S3 endpoint and keys, for the build and for
    reading the bank back from S3."""
    root, local = small
    upload(fsspec.filesystem("s3", **s3), root, f"{bucket}/imgs")
    prefix = f"s3://{bucket}/imgs/"
    with dask.config.set({"h5bank.storage-options": {"s3": s3}}):
        with Pictures.create(tmp_path / "b.h5", prefix, scheduler="threads", progress=False) as b:
            assert b.failures() == []
            assert_same_bank(b, local, prefix)
        remote = f"s3://{bucket}/banks/b.h5"
        Pictures.create(remote, prefix, scheduler="threads", progress=False).close()
        with Pictures(remote) as bank:
            assert_same_bank(bank, local, prefix)


# -- 7. review fixes: what is retried, options, secrets, uploads, remote banks, listings ------
#
# These tests failed before the fixes they cover (commit 0190333), except the guards that
# say what must not change (per-protocol options, a plain missing file, an S3 404 asked
# once) and the xfail ones, which mark bugs still open. The fault server (``fault_server``,
# ``faultserver.py``) answers by path: ``s3-503`` / ``s3-500`` / ``s3-404`` with S3's error
# XML, ``status-NNN`` with a bare status, ``truncated`` with a body shorter than its
# Content-Length; its log counts the requests it saw.

RETRY_TWICE = {"h5bank.fetch.retries": 2, "h5bank.fetch.backoff": 0.01}


def requests_for(server, mark, path):
    """The requests ``server`` logged after ``mark`` for exactly ``path`` (query ignored)."""
    return [line for line in server.requests_since(mark) if line.split()[1].split("?")[0] == path]


@pytest.mark.parametrize("first", ["head", "get"])
def test_s3_503_and_500_are_retried_as_configured_and_a_404_is_asked_once(
    first, fault_server, tmp_path
):
    options = s3_options(fault_server.url)
    if first == "get":
        # s3fs asks for the size (HEAD, no body) before a GET unless it fetches in one
        # request: then the error comes from S3's XML body.
        options["max_concurrency"] = 1
    tag = uuid.uuid4().hex[:8]
    attempts = {"s3-503": 3, "s3-500": 3, "s3-404": 1}
    urls = {name: f"s3://bkt/{tag}/{name}/a.png" for name in attempts}
    mark = fault_server.mark()
    with dask.config.set(RETRY_TWICE):
        bank = Pictures.create(
            tmp_path / "b.h5", list(urls.values()), storage_options={"s3": options},
            scheduler="threads", progress=False,
        )  # fmt: skip
    with bank:
        assert len(bank) == 0
        failures = {f.id: f.error for f in bank.failures()}
    assert sorted(failures) == sorted(urls.values())
    seen = {
        name: len(requests_for(fault_server, mark, f"/bkt/{tag}/{name}/a.png")) for name in urls
    }
    assert seen == attempts
    for name in ("s3-503", "s3-500"):
        assert f"cannot read {urls[name]}: " in failures[urls[name]]
    assert [f for f in failures.values() if f.endswith("(after 3 attempts)")] == [
        failures[urls["s3-503"]],
        failures[urls["s3-500"]],
    ]
    error = failures[urls["s3-404"]]
    assert error.endswith(f"cannot read {urls['s3-404']}: no such file"), error


def test_a_truncated_http_body_408_and_429_are_retried_and_a_403_is_not(fault_server, tmp_path):
    tag = uuid.uuid4().hex[:8]
    attempts = {"truncated": 3, "status-408": 3, "status-429": 3, "status-403": 1}
    urls = {name: f"{fault_server.url}/{tag}/{name}/a.png" for name in attempts}
    mark = fault_server.mark()
    with dask.config.set(RETRY_TWICE):
        bank = Pictures.create(
            tmp_path / "b.h5", list(urls.values()), scheduler="threads", progress=False
        )
    with bank:
        assert len(bank) == 0
        failures = {f.id: f.error for f in bank.failures()}
    assert sorted(failures) == sorted(urls.values())
    seen = {name: len(requests_for(fault_server, mark, f"/{tag}/{name}/a.png")) for name in urls}
    assert seen == attempts
    retried = {name for name in urls if failures[urls[name]].endswith("(after 3 attempts)")}
    assert retried == {"truncated", "status-408", "status-429"}
    assert all(f"cannot read {url}: " in failures[url] for url in urls.values())
    assert "403" in failures[urls["status-403"]] and "attempt" not in failures[urls["status-403"]]


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("s3://b/k.png", {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}),
        ("https://h/a.png", {"headers": {"Authorization": "Bearer t"}}),
        ("s3://b/k.png", {"config_kwargs": {"retries": {"total_max_attempts": 1}}}),
        (
            "s3://b/k.png",
            {"client_kwargs": {"region_name": "x"}, "config_kwargs": {"connect_timeout": 5}},
        ),
    ],
)
def test_flat_options_whose_values_are_all_mappings_are_passed_as_they_are(url, options):
    assert options_for(url, options) == options


def test_per_protocol_options_still_select_by_protocol():
    s3, https = {"key": "a", "secret": "b"}, {"headers": {"Authorization": "Bearer t"}}
    options = {"s3": s3, "https": https}
    assert options_for("s3://b/k.png", options) == s3
    assert options_for("s3a://b/k.png", options) == s3
    assert options_for("http://h/a.png", options) == https
    assert options_for("gs://b/k.png", options) == {}
    assert options_for("simplecache::s3://b/k.png", options) == options  # fsspec reads chains


def test_an_s3_build_with_only_client_kwargs_and_credentials_from_the_environment(
    small, s3, moto, bucket, monkeypatch, tmp_path
):
    root, local = small
    upload(fsspec.filesystem("s3", **s3), root, f"{bucket}/imgs")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # without the endpoint: fail fast, not for minutes
    prefix = f"s3://{bucket}/imgs/"
    with Pictures.create(
        tmp_path / "b.h5", prefix, storage_options={"client_kwargs": {"endpoint_url": moto.url}},
        scheduler="threads", progress=False,
    ) as bank:  # fmt: skip
        assert bank.failures() == []
        assert_same_bank(bank, local, prefix)


def pixel_sum(values):
    return int(values["images"].sum())


def test_credentials_in_a_remote_banks_url_never_appear_in_messages_or_output(
    small, tmp_path, capfd
):
    _, local = small
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(local.path, served / "bank.h5")
    server = RangeServer(served, tmp_path)  # its own: this test stops it
    signature = f"SIG{uuid.uuid4().hex}"
    credential = f"AKIA{uuid.uuid4().hex[:16].upper()}"
    url = f"{server.url}/bank.h5?X-Amz-Signature={signature}&X-Amz-Credential={credential}"
    texts = {}
    bank = Pictures(url)
    try:
        with pytest.raises(UnknownIdError) as missing_id:
            bank.get("nope")
        with pytest.raises(AttributeError) as missing_feature:
            _ = bank.nope
        texts["unknown id"], texts["no feature"] = str(missing_id.value), str(missing_feature.value)
        texts["repr"], texts["tree"] = repr(bank), bank.tree()
        capfd.readouterr()
        sums = bank.map(pixel_sum, "images", scheduler="threads", progress=True)
        texts["map stdout"], texts["map stderr"] = capfd.readouterr()
        assert len(sums) == 12 and "h5bank map bank.h5" in texts["map stderr"]  # the bar ran
        array = bank.images.to_dask()
        server.stop()
        assert refuses(server.port)
        down = {
            "to_dask, server down": bank.images.to_dask,
            "tree, server down": bank.tree,
            "compute, server down": lambda: array.compute(scheduler="threads"),
            "open, server down": lambda: Pictures(url),
        }
        for label, call in down.items():
            with pytest.raises(OSError) as raised:
                call()
            texts[label] = str(raised.value)
    finally:
        bank.close()
        server.stop()
    texts["closed repr"] = repr(bank)
    named = ("unknown id", "no feature", "closed repr", *down)
    assert all(f"127.0.0.1:{server.port}/bank.h5" in texts[k] for k in named), texts
    leaks = [k for k, text in texts.items() if signature in text or credential in text]
    assert leaks == [], {k: texts[k] for k in leaks}


class FakeCertificateError(ConnectionError):
    """What a client library raises for a certificate it does not trust (aiohttp's
    ``ClientConnectorCertificateError`` is also a connection error)."""


def _raised_from(error, cause):
    try:
        raise error from cause
    except BaseException as raised:
        return raised


def _with(error, **attributes):
    for name, value in attributes.items():
        setattr(error, name, value)
    return error


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ssl.SSLError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"), False),
        (FakeCertificateError("certificate verify failed"), False),
        (_raised_from(OSError("cannot connect"), FakeCertificateError("bad cert")), False),
        (_with(Exception("Service Unavailable"), code=503), True),  # gcsfs HttpError
        (_with(Exception("Request Timeout"), status=408), True),
        (OSError(errno.EBUSY, "Service Unavailable"), True),  # s3fs's S3 503
        (_raised_from(FileNotFoundError("http://h/a.png"), ConnectionRefusedError()), True),
        (FileNotFoundError("http://h/a.png"), False),
    ],
    ids=[
        "ssl",
        "certificate",
        "certificate-cause",
        "code-503",
        "status-408",
        "ebusy",
        "not-found-from-refused",
        "not-found",
    ],
)
def test_transient_classifies_constructed_errors(error, expected):
    assert transient(error) is expected


def test_a_local_name_with_double_colons_is_not_a_url(images, tmp_path):
    assert not is_url("run::2.h5")
    assert not is_url(str(tmp_path / "run::2.h5"))
    assert is_url("simplecache::s3://b/k")
    assert is_url("zip://a.png::s3://b/k.zip")
    path = tmp_path / "run::2.h5"
    with Pictures.create(path, images, scheduler="threads", progress=False) as bank:
        assert not bank.remote and len(bank) == 12
    assert path.is_file()
    with TypedFile(tmp_path / "new::1.h5", "a") as created:
        assert not created.remote
    assert (tmp_path / "new::1.h5").is_file()
    with Pictures(path) as bank:
        assert len(bank) == 12


class LoadRecorder(Feature):
    """Records the ids of the sources it loads (in this process: use the threaded scheduler)."""

    reads_bytes = False
    loaded: list[str] = []

    def load(self, source):
        self.loaded.append(source.id)
        return None


class BucketDropper(Feature):
    """Deletes the (empty) bucket ``armed = (source id, bucket, s3 options)`` names while
    loading that source: the build goes on, its upload fails. Loads nothing."""

    reads_bytes = False
    armed: tuple[str, str, dict] | None = None

    def load(self, source):
        if self.armed is not None and source.id == self.armed[0]:
            _, bucket, options = self.armed
            fsspec.filesystem("s3", skip_instance_cache=True, **options).rmdir(bucket)
        return None


class Recorded(TypedFile):
    images = Image(mode="RGB")
    labels = DirLabels()
    seen = LoadRecorder()
    drop = BucketDropper()


def test_create_to_a_missing_bucket_fails_before_loading_any_source(images, s3, tmp_path):
    LoadRecorder.loaded.clear()
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/b.h5"
    with pytest.raises(WriterError, match=r"does not exist"):
        Recorded.create(url, images, storage_options=s3, scheduler="threads", progress=False)
    assert LoadRecorder.loaded == []


def test_create_to_a_bucket_its_credentials_cannot_list_still_uploads(small, tmp_path):
    import boto3  # moto[server] depends on it

    root, local = small
    server = start_moto(tmp_path)  # its own: this test turns on moto's IAM checks
    try:
        admin = {"endpoint_url": server.url, "aws_access_key_id": "testing",
                 "aws_secret_access_key": "testing", "region_name": "us-east-1"}  # fmt: skip
        boto3.client("s3", **admin).create_bucket(Bucket="objects-only")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="uploader")
        # AWS authorizes HeadObject (which opening the uploaded bank sends first) with
        # s3:GetObject. moto 5.2.6 names it s3:HeadObject instead (its requests are now named
        # after botocore's operations: a regression of getmoto/moto#8334), so the policy also
        # grants that name, which AWS does not have. Listing stays denied: what this tests.
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
                  "Action": ["s3:GetObject", "s3:PutObject", "s3:HeadObject"],
                  "Resource": "arn:aws:s3:::objects-only/*"}]}  # fmt: skip
        iam.put_user_policy(
            UserName="uploader", PolicyName="objects", PolicyDocument=json.dumps(policy)
        )
        key = iam.create_access_key(UserName="uploader")["AccessKey"]
        # From now on moto authenticates every request and applies the users' policies.
        request = urllib.request.Request(
            f"{server.url}/moto-api/reset-auth", data=b"0", method="POST",
            headers={"Content-Type": "text/plain"},
        )  # fmt: skip
        urllib.request.urlopen(request, timeout=30).close()
        options = s3_options(server.url, key=key["AccessKeyId"], secret=key["SecretAccessKey"])
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
        with pytest.raises(PermissionError):
            fs.ls("objects-only")  # the policy is in force: no listing
        with Pictures.create(
            "s3://objects-only/b.h5", root, storage_options=options, scheduler="threads",
            progress=False,
        ) as bank:  # fmt: skip
            assert bank.remote
            assert_same_bank(bank, local)
    finally:
        server.stop()


def test_a_failed_upload_keeps_the_built_bank_and_says_where(small, s3, bucket, tmp_path):
    root, local = small
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    LoadRecorder.loaded.clear()
    BucketDropper.armed = (local.ids[-1], bucket, s3)
    try:
        with (
            dask.config.set({"h5bank.build.scratch": str(scratch)}),
            pytest.raises(WriterError, match=r"could not be uploaded") as failed,
        ):
            Recorded.create(
                f"s3://{bucket}/banks/b.h5", root, storage_options=s3, scheduler="threads",
                progress=False,
            )  # fmt: skip
    finally:
        BucketDropper.armed = None
    assert sorted(LoadRecorder.loaded) == sorted(local.ids)  # the build ran to its end
    notes = getattr(failed.value, "__notes__", [])
    kept = [m.group(1) for m in map(re.compile(r"kept at (\S+?);").search, notes) if m]
    assert len(kept) == 1, notes
    assert os.path.isfile(kept[0]) and scratch in Path(kept[0]).parents
    with Pictures(kept[0]) as bank:
        assert bank.summary is None or bank.summary.ok == 12
        assert bank.failures() == []
        assert_same_bank(bank, local)


def test_opening_a_remote_bank_while_its_server_is_down_says_it_cannot_reach_it(http_server):
    url = f"http://127.0.0.1:{free_port()}/bank.h5"  # nothing listens there
    with pytest.raises(OSError, match=r"cannot reach the bank at ") as down:
        Thumbs(url)
    assert "no such object" not in str(down.value)
    missing = f"{http_server.url}/{uuid.uuid4().hex[:8]}/bank.h5"
    with pytest.raises(FileNotFoundError, match=r"no bank at .* \(no such object\)"):
        Thumbs(missing)


def test_a_remote_bank_url_answering_403_is_not_called_missing(fault_server):
    url = f"{fault_server.url}/status-403/bank.h5?X-Amz-Expires=60&X-Amz-Signature=expired"
    with pytest.raises(OSError) as denied:
        Thumbs(url)
    assert "no such object" not in str(denied.value), str(denied.value)
    assert "403" in str(denied.value), str(denied.value)


def test_a_remote_banks_identity_includes_last_modified(thumbs, http_server):
    name = f"{uuid.uuid4().hex[:8]}.h5"
    shutil.copy(thumbs, http_server.root / name)
    url = f"{http_server.url}/{name}"
    request = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(request, timeout=30) as response:
        last_modified = response.headers["Last-Modified"]
    assert last_modified
    identity = remote_identity(url, None)
    assert identity[0] == os.path.getsize(thumbs)
    assert last_modified in identity


def test_a_warm_remote_array_is_not_revalidated_on_every_compute(thumbs, http_server, monkeypatch):
    # Within REMOTE_REVALIDATE seconds of a check there is no other; made long here, so the
    # test does not depend on how fast the two computes run.
    monkeypatch.setattr(file_cache, "REMOTE_REVALIDATE", 3600.0)
    name = f"{uuid.uuid4().hex[:8]}.h5"
    shutil.copy(thumbs, http_server.root / name)
    url = f"{http_server.url}/{name}"
    try:
        with Thumbs(url) as bank:
            array = bank.images.to_dask()[:64]
            first = array.compute(scheduler="threads")
            mark = http_server.mark()
            np.testing.assert_array_equal(array.compute(scheduler="threads"), first)
        heads = [r for r in http_server.requests_since(mark) if r.startswith("HEAD ")]
        assert heads == []
    finally:
        release(url)


def test_a_bank_replaced_by_one_of_the_same_size_reads_anew_and_old_graphs_fail(
    images, tmp_path, http_server
):
    other = tmp_path / "other"
    write_images(other, seed=1)
    first, second = tmp_path / "a.h5", tmp_path / "b.h5"
    Thumbs.create(first, images, scheduler="threads", progress=False).close()
    Thumbs.create(second, other, scheduler="threads", progress=False).close()
    assert first.stat().st_size == second.stat().st_size
    with Thumbs(second) as new_local:
        want = new_local.images[:]
    name = f"{uuid.uuid4().hex[:8]}.h5"
    served = http_server.root / name
    shutil.copy(first, served)
    url = f"{http_server.url}/{name}"
    old_bank = Thumbs(url)  # kept open: closing a bank closes this process's cached handles
    try:
        old_array = old_bank.images.to_dask()
        old_array.compute(scheduler="threads")  # this process now caches the old bank
        old_identity = remote_identity(url, None)
        before = served.stat()
        shutil.copy(second, served.with_suffix(".tmp"))
        os.replace(served.with_suffix(".tmp"), served)
        # The same size and Last-Modified: only the bank's uuid tells the two apart.
        os.utime(served, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert remote_identity(url, None) == old_identity
        with Thumbs(url) as new_bank:
            np.testing.assert_array_equal(new_bank.images[:], want)
            new_array = new_bank.to_dask()["images"]
            np.testing.assert_array_equal(new_array.compute(scheduler="threads"), want)
            # The old graph finds the new bank's handle cached: it checks the file again, which
            # holds another bank.
            with pytest.raises(BankChangedError, match=r"is not the file this Dask graph"):
                old_array.compute(scheduler="threads")
    finally:
        old_bank.close()
        release(url)


@pytest.mark.parametrize("where", ["http-refused", "http-503", "s3-stopped"])
def test_a_listing_that_cannot_be_reached_fails_the_build(where, fault_server, tmp_path):
    port = free_port()  # nothing listens there: a server that is not running
    options = None
    if where == "http-refused":
        url = f"http://127.0.0.1:{port}/photos/"
    elif where == "http-503":
        url = f"{fault_server.url}/status-503/photos/"
    else:
        url = "s3://bkt/photos/"
        options = {"s3": s3_options(f"http://127.0.0.1:{port}")}
    with (
        dask.config.set(RETRY_TWICE),
        pytest.raises(SourceReadError, match=r"^cannot list ") as failed,
    ):
        Pictures.create(
            tmp_path / "b.h5", url, storage_options=options, scheduler="threads", progress=False
        )
    assert url in str(failed.value)
    assert not (tmp_path / "b.h5").exists()
