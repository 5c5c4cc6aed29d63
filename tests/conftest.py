"""Shared fixtures: real Dask clusters, and generated sources.

Builds in tests run on real worker processes (``client``, a two-process
``LocalCluster``), except where a test is about the in-process schedulers.
``cli_client`` is a cluster started as separate ``dask scheduler`` /
``dask worker`` processes, for tests that must hold on any cluster.

Cloud servers (``moto``: S3, ``gcs``: the GCS emulator, ``http_server``:
``rangeserver.py``, ``fault_server``: ``faultserver.py``) are separate
processes started once per session and stopped by PID at its end; see
``servers.py``.
"""

from __future__ import annotations

import os

# gcsfs looks up each bucket's type over gRPC/TLS unless told not to (60 s per bucket
# against an emulator); it reads this when it is imported, so set it before anything can.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import subprocess
import sys
import time
from pathlib import Path

import h5py
import imageio.v3 as iio
import numpy as np
import pytest
import soundfile
from distributed import Client, LocalCluster
from servers import FaultServer, RangeServer, start_gcs, start_moto, stop

from pipeline.format import layout


@pytest.fixture(scope="session")
def cluster():
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def client(cluster):
    # Not the default client: tests of the embedded default must not find it.
    with Client(cluster, set_as_default=False) as client:
        yield client


@pytest.fixture(scope="session")
def cli_client(tmp_path_factory):
    """A client of a cluster started as separate processes with the ``dask`` command line.

    ``dask scheduler`` and ``dask worker --nworkers 2 --nthreads 1`` on
    127.0.0.1, found through a scheduler file. Workers import this directory
    (``PYTHONPATH``), so functions defined in test modules run on them. Both
    processes are stopped by PID at the end of the session.
    """
    folder = tmp_path_factory.mktemp("dask-cli")
    scheduler_file = folder / "scheduler.json"
    dask_cli = str(Path(sys.executable).with_name("dask"))
    tests = str(Path(__file__).resolve().parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p),
    }
    processes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        with open(folder / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(
                [dask_cli, name, *args, "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                cwd=folder,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        processes.append(process)
        return process

    try:
        scheduler = start("scheduler", "--host", "127.0.0.1", "--port", "0")
        deadline = time.monotonic() + 60
        while not (scheduler_file.exists() and scheduler_file.stat().st_size):
            if scheduler.poll() is not None or time.monotonic() > deadline:
                log = (folder / "scheduler.log").read_text(errors="replace")
                pytest.fail(f"dask scheduler did not start:\n{log[-2000:]}")
            time.sleep(0.05)
        start("worker", "--host", "127.0.0.1", "--nworkers", "2", "--nthreads", "1",
              "--local-directory", str(folder / "workers"))  # fmt: skip
        with Client(scheduler_file=str(scheduler_file), set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
            yield client
    finally:
        for process in reversed(processes):  # the workers first, then the scheduler
            stop(process)


def write_images(
    root: Path,
    classes: tuple[str, ...] = ("cats", "dogs"),
    per_class: int = 6,
    seed: int = 0,
    sizes: tuple[int, int] = (16, 40),
) -> list[Path]:
    """PNGs in class folders, cycling RGB / RGBA / grayscale, of varying sizes."""
    rng = np.random.default_rng(seed)
    paths = []
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
            shape = [(h, w, 3), (h, w, 4), (h, w)][i % 3]
            path = folder / f"{name}_{i:03d}.png"
            iio.imwrite(path, rng.integers(0, 256, size=shape, dtype=np.uint8))
            paths.append(path)
    return paths


def write_sounds(
    root: Path,
    classes: tuple[str, ...] = ("low", "high"),
    per_class: int = 2,
    seed: int = 0,
) -> list[Path]:
    """WAV and FLAC files in class folders, mono and stereo, at 8 and 16 kHz."""
    rng = np.random.default_rng(seed)
    paths = []
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            sr = (8000, 16000)[i % 2]
            n = int(sr * rng.uniform(0.05, 0.2))
            audio = rng.uniform(-0.5, 0.5, size=(n, 2) if i % 2 else n).astype(np.float32)
            extension = ".flac" if i % 2 else ".wav"
            path = folder / f"{name}_{i:02d}{extension}"
            soundfile.write(path, audio, sr)
            paths.append(path)
    return paths


def assert_same_contents(path, expected_path, failures: bool = False):
    """Two banks hold the same ids in the same order and, column by column, the same refs,
    shapes, label names and data; the first is a finished bank. Without ``failures`` the
    first has no failures; with it both record the same failures (id, feature, reason)."""

    with h5py.File(path, "r") as f, h5py.File(expected_path, "r") as g:
        assert layout.state(f) == layout.COMPLETE
        assert layout.read_strings(layout.ids_table(f)) == layout.read_strings(layout.ids_table(g))
        columns = sorted(layout.iter_columns(f))
        assert columns == sorted(layout.iter_columns(g))
        for column_path in columns:
            a, b = layout.Column.open(f, column_path), layout.Column.open(g, column_path)
            assert a.storage == b.storage, column_path
            np.testing.assert_array_equal(a.refs[:], b.refs[:], err_msg=column_path)
            np.testing.assert_array_equal(a.data[:], b.data[:], err_msg=column_path)
            if b.shape is not None:
                np.testing.assert_array_equal(a.shape[:], b.shape[:], err_msg=column_path)
            if b.storage == "category":
                assert layout.category_names(a) == layout.category_names(b)
        if not failures:
            assert all(table.shape[0] == 0 for table in layout.failure_tables(f))
        else:
            tables = [[layout.read_strings(t) for t in layout.failure_tables(h)] for h in (f, g)]
            assert sorted(zip(*tables[0], strict=True)) == sorted(zip(*tables[1], strict=True))


@pytest.fixture
def images(tmp_path) -> Path:
    """A folder of 12 mixed-depth PNGs in two class folders."""
    root = tmp_path / "images"
    write_images(root)
    return root


@pytest.fixture
def sounds(tmp_path) -> Path:
    root = tmp_path / "sounds"
    write_sounds(root)
    return root


@pytest.fixture(autouse=True)
def _no_default_client():
    """Fail loudly if a test leaves a default Client behind (it would change other tests)."""
    yield
    from distributed import default_client

    try:
        leftover = default_client()
    except ValueError:
        return
    leftover.close()
    pytest.fail("a test left a default distributed Client open")


@pytest.fixture
def env(tmp_path):
    """The environment a command (``h5bank``) runs in: no Dask settings, Slurm variables or
    home of the user's (a module that needs more overrides this fixture)."""
    home, dask_config = tmp_path / "home", tmp_path / "dask-config"
    home.mkdir()
    dask_config.mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_", "SLURM_"))}
    return {**clean, "HOME": str(home), "DASK_CONFIG": str(dask_config)}


@pytest.fixture
def chdir(tmp_path):
    old = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(old)


# -- cloud servers (separate processes on 127.0.0.1, stopped by PID) ------------------------


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    """A moto S3 server for the session; tests use buckets of their own."""
    yield from _serving(start_moto(tmp_path_factory.mktemp("moto")))


def _serving(server):
    """Yield a started server to the session, and stop it (by PID) when the session ends."""
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """The GCS emulator for the session, with the bucket ``gbucket``."""
    yield from _serving(start_gcs(tmp_path_factory.mktemp("gcs")))


@pytest.fixture(scope="session")
def http_server(tmp_path_factory):
    """``rangeserver.py`` serving a session folder (``http_server.root``)."""
    folder = tmp_path_factory.mktemp("http")
    root = folder / "root"
    root.mkdir()
    yield from _serving(RangeServer(root, folder))


@pytest.fixture(scope="session")
def fault_server(tmp_path_factory):
    """``faultserver.py``: S3 error XML, bare HTTP statuses and truncated bodies, by path."""
    yield from _serving(FaultServer(tmp_path_factory.mktemp("faults")))


# -- Slurm (a single-node cluster started by tests/slurm.sh, stopped by PID) -----------------


@pytest.fixture(scope="session")
def slurm():
    """A running single-node Slurm: the one ``tests/slurm.sh up`` started (``.ci/run`` does
    before the tests), else started here and stopped at the end of the session. Skips
    locally, and fails on CI, when it cannot run (not root, no apt, no Slurm)."""
    from servers import unavailable

    script = Path(__file__).with_name("slurm.sh")
    conf = (
        subprocess.run(["bash", script, "env"], capture_output=True, text=True, check=True)
        .stdout.split("=", 1)[1]
        .strip()
    )
    started = False
    if subprocess.run(["bash", script, "status"], capture_output=True).returncode != 0:
        up = subprocess.run(["bash", script, "up"], capture_output=True, text=True, timeout=600)
        if up.returncode != 0:  # slurm.sh stops what a failed bring-up started
            unavailable(f"no Slurm here: tests/slurm.sh up failed: {up.stderr.strip()[-600:]}")
        started = True
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf  # for sbatch/scontrol here and in dask-jobqueue
    try:
        yield conf
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if started:
            subprocess.run(["bash", script, "down"], capture_output=True, timeout=120)
