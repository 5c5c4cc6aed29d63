"""Builds on a cluster of several hosts that share only the output folder.

The scheduler and two workers each run on their own "host" (:mod:`hosts`: network,
mount and UTS namespaces on this machine): their own address on a private bridge, their
own host name, their own ``/tmp`` in which only the output folder of this machine's is
mounted. Sources come from an HTTP server on the bridge. A build with 1 and with 2 shards
there must equal the build made here; a local source path, or an output folder, that the
workers cannot see must be refused up front, naming the host and the path.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import h5py
import pytest
from conftest import assert_same_contents, write_images
from distributed import Client
from hosts import Hosts, available
from servers import RangeServer, unavailable
from slowbank import QuickBank

from pipeline.errors import SchedulerError
from pipeline.format import layout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler host and two worker hosts; the output folder shared; sources over HTTP."""
    reason = available()
    if reason:
        unavailable(f"multi-host cluster: {reason}")
    root = tmp_path_factory.mktemp("multihost")
    shared, logs, served = root / "shared", root / "logs", root / "served"
    for folder in (shared, logs, served):
        folder.mkdir()
    images = served / "images"
    write_images(images, classes=("a", "b", "c"), per_class=40, sizes=(8, 24))
    (images / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    hosts = Hosts(shared, ["scheduler", "w1", "w2"], logs).up()
    server = None
    try:
        server = RangeServer(served, logs, host=hosts.bridge)
        address = hosts.scheduler("scheduler")
        hosts.worker("w1", address)
        hosts.worker("w2", address)
        client = Client(address, timeout=60, set_as_default=False)
        client.wait_for_workers(2, timeout=120)
        url = f"{server.url}/images/"
        reference = root / "reference.h5"  # built here, in this process, from the same URL
        QuickBank.create(reference, url, scheduler="threads", progress=False).close()
        yield {"client": client, "shared": shared, "images": images, "root": root,
               "url": url, "reference": reference, "hosts": hosts}  # fmt: skip
        client.close()
    finally:
        if server is not None:
            server.stop()
        hosts.down()


def _host_and_sees(path: str) -> tuple[str, bool]:
    return socket.gethostname(), os.path.exists(path)


def test_the_workers_are_hosts_of_their_own(cluster):
    client = cluster["client"]
    seen = client.run(_host_and_sees, str(cluster["images"]))
    assert sorted(host for host, _ in seen.values()) == ["h5-w1", "h5-w2"]
    assert not any(sees for _, sees in seen.values())  # this machine's /tmp is not theirs
    shared = client.run(os.path.isdir, str(cluster["shared"]))
    assert all(shared.values())


@pytest.mark.parametrize("shards", [1, 2])
def test_a_build_over_http_on_two_hosts_equals_the_local_build(cluster, shards):
    out = cluster["shared"] / f"bank-{shards}.h5"
    started = time.monotonic()
    bank = QuickBank.create(out, cluster["url"], scheduler=cluster["client"], shards=shards,
                            progress=False)  # fmt: skip
    assert time.monotonic() - started < 120
    assert bank.summary.failed == 1
    bank.close()
    assert_same_contents(out, cluster["reference"], failures=True)
    with h5py.File(out, "r") as f:
        names = layout.shard_names(f)
    assert len(names) == (0 if shards == 1 else 2)
    for name in names:  # complete banks, in the shared folder, named by the index
        with h5py.File(out.parent / name, "r") as f:
            assert layout.state(f) == layout.COMPLETE and layout.committed(f) > 0


def test_a_local_source_path_the_workers_cannot_see_is_refused_naming_host_and_path(cluster):
    out = cluster["shared"] / "local.h5"
    with pytest.raises(SchedulerError) as caught:
        QuickBank.create(out, cluster["images"], scheduler=cluster["client"], shards=2,
                         progress=False)  # fmt: skip
    message = str(caught.value)
    assert "on host h5-w" in message and str(cluster["images"]) in message
    assert not out.exists() and not list(out.parent.glob("local.shard-*"))


def test_an_output_folder_the_workers_cannot_see_is_refused_naming_host_and_folder(cluster):
    out = cluster["root"] / "not-shared" / "bank.h5"
    out.parent.mkdir()
    with pytest.raises(SchedulerError) as caught:
        QuickBank.create(out, cluster["url"], scheduler=cluster["client"], progress=False)
    message = str(caught.value)
    assert "on host h5-w" in message and str(out.parent) in message
    assert not Path(out).exists()
