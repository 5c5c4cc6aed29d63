"""A build killed anywhere resumes to the bank an uninterrupted build makes; a full disk, a
dead decode worker and a second writer stop nothing that was committed.

The builds here run as users run them: ``h5bank build CONFIG`` in its own process group,
on the embedded local cluster (client, scheduler, nannies and worker processes), killed
with SIGKILL as a whole.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import yaml
from conftest import assert_same_contents, write_images
from distributed import Client, LocalCluster
from slowbank import QuickBank, SlowBank

from pipeline.errors import PartialSetAsideError
from pipeline.format import layout
from pipeline.format.partial import partial_path
from pipeline.format.verify import bank_problems

TESTS = Path(__file__).resolve().parent
N = 2000
KILL_POINTS = 9


def h5bank_command() -> list[str]:
    script = shutil.which("h5bank", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "pipeline.cli"]


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_", "SLURM_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def _no_delay(monkeypatch):
    """``SlowBank`` decodes at full speed in this process and the workers it starts; the
    builds run as commands say their own delay."""
    monkeypatch.setenv("H5BANK_TEST_DELAY", "0")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """2,000 small images in 4 classes (21 of them truncated), the bank an uninterrupted
    build makes of them, and a build config for ``slowbank:SlowBank`` (1 ms per source)
    into ``out.h5``."""
    root = tmp_path_factory.mktemp("crash")
    images = root / "images"
    paths = write_images(images, classes=("a", "b", "c", "d"), per_class=N // 4, sizes=(8, 24))
    for path in paths[7::97]:  # 21 broken files among them: failures must survive too
        path.write_bytes(path.read_bytes()[:40])
    QuickBank.create(root / "reference.h5", images, scheduler="threads", progress=False).close()
    config = root / "build.yaml"
    # On the embedded cluster ("auto" would pick threads for 2,000 files): the kill takes
    # the client, scheduler, nannies and workers at once.
    build = {"bank": "slowbank:SlowBank", "sources": str(images), "output": str(root / "out.h5"),
             "partition-size": 50, "scheduler": "local"}  # fmt: skip
    config.write_text(yaml.safe_dump({"h5bank": {"build": build}}))
    return {"root": root, "config": config, "reference": root / "reference.h5",
            "out": root / "out.h5", "images": images}  # fmt: skip


def clean(out: Path) -> None:
    for path in [*out.parent.glob(out.name + "*"), *out.parent.glob(out.stem + ".shard-*")]:
        path.unlink()


def build(config: Path, *args: str, log: Path, **env: str) -> subprocess.Popen:
    """Start ``h5bank build`` in a process group of its own, its stderr going to ``log``."""
    with open(log, "w") as stderr:
        return subprocess.Popen(
            [*h5bank_command(), "build", str(config), *args],
            stdout=subprocess.DEVNULL, stderr=stderr, env=environment(**env),
            start_new_session=True,
        )  # fmt: skip


def progress(log: Path) -> int:
    counts = re.findall(rf"(\d+)/{N}", log.read_text())
    return int(counts[-1]) if counts else 0


def living_members(group: int) -> list[int]:
    """The processes of a process group that are alive (zombies are dead: they only wait to
    be reaped, which PID 1 of a container may do late)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(entry))
    return members


def kill_whole_build(process: subprocess.Popen) -> None:
    """SIGKILL every process of the build at once: client, scheduler, nannies, workers."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while living := living_members(process.pid):  # a worker spawned just then, if any
        for pid in living:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert time.monotonic() < deadline, living
        time.sleep(0.02)


def test_a_build_killed_at_random_points_resumes_to_the_uninterrupted_bank(corpus, tmp_path):
    rng = random.Random(20261121)
    # Kill points: two during start-up (before or while the partial file is made), the
    # rest when the progress bar reaches a random count, plus a random few milliseconds so
    # the kill lands anywhere in a commit.
    points = [("seconds", rng.uniform(0.05, 0.8)) for _ in range(2)]
    points += [("sources", rng.randrange(50, N)) for _ in range(KILL_POINTS - 2)]
    seen = []
    for kind, where in points:
        clean(corpus["out"])
        log = tmp_path / "build.log"
        process = build(corpus["config"], log=log, H5BANK_TEST_DELAY="0.001")
        deadline = time.monotonic() + 120
        if kind == "seconds":
            time.sleep(where)
        else:
            while progress(log) < where and process.poll() is None:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.03))
        kill_whole_build(process)

        # Whatever the moment, the bank's path holds nothing that passes for a bank.
        out, partial = corpus["out"], Path(partial_path(corpus["out"]))
        if out.exists():
            with h5py.File(out, "r") as f:  # the build had finished and renamed it
                assert layout.state(f) == layout.COMPLETE
        committed = None
        if partial.exists():
            check = subprocess.run(
                [*h5bank_command(), "verify", str(partial)], capture_output=True, text=True,
                env=environment(),
            )  # fmt: skip
            if check.returncode == 0:
                found = re.search(r"(\d+) sources committed", check.stdout)
                committed = int(found[1]) if found else None
            else:  # killed before the file was a bank: the resume must cope
                assert "not an h5bank bank" in check.stderr, check.stderr
        seen.append((kind, where, "done" if out.exists() else committed))

        if kind == "sources" and rng.random() < 0.5 and not out.exists():
            # and kill the resume too, somewhere further on
            again = build(corpus["config"], "--resume", log=log, H5BANK_TEST_DELAY="0.001")
            target = rng.randrange(max(where, 50), N)
            while progress(log) < target and again.poll() is None:
                assert time.monotonic() < deadline + 120, log.read_text()
                time.sleep(0.005)
            kill_whole_build(again)
            seen.append(("resume killed", target, None))
            committed = None
        resumed = subprocess.run(
            [*h5bank_command(), "build", str(corpus["config"]), "--resume", "--quiet"],
            capture_output=True, text=True, env=environment(H5BANK_TEST_DELAY="0"), timeout=300,
        )  # fmt: skip
        assert resumed.returncode == 0, (kind, where, resumed.stderr)
        if isinstance(committed, int):
            assert f"{committed} already in the bank" in resumed.stdout or committed == 0
        assert_same_contents(out, corpus["reference"], failures=True)
    mid_build = [s for s in seen if isinstance(s[2], int) and 0 < s[2] < N - 21]
    print("kill points (kind, where, committed when killed):", seen)  # shown with -s
    assert len(mid_build) >= KILL_POINTS // 2, seen


# -- partial files a killed build can leave ------------------------------------------------


def finished_build(corpus, tmp_path) -> Path:
    path = tmp_path / "bank.h5"
    SlowBank.create(path, corpus["images"], scheduler="threads", progress=False).close()
    return path


def test_ids_written_past_the_commit_record_are_not_trusted(corpus, tmp_path):
    """A process killed in the first flush of a commit may leave an id table that grew while
    what its new rows point to was not all written: the commit counter decides."""
    path = finished_build(corpus, tmp_path)
    partial = Path(partial_path(path))
    with h5py.File(path, "r+") as f:
        n = f.attrs[layout.ATTR_COMMITTED]
        assert n == N - 21  # the truncated files are failures, not sources
        f.attrs.modify(layout.ATTR_COMMITTED, 1500)  # the last 500 never got their record
        layout.set_state(f, layout.BUILDING)
        column = layout.Column.open(f, "pixels")
        column.data.resize(column.data.shape[0] + 7, axis=0)  # rows of a commit cut short
        layout.append_strings(layout.ids_table(f), ["ghost-1", "ghost-2"])
    path.rename(partial)
    assert list(bank_problems(h5py.File(partial, "r"), stopped=True)) == []
    bank = SlowBank.create(path, corpus["images"], mode="a", scheduler="threads", progress=False)
    with bank:
        assert bank.summary.skipped == 1500
        assert bank.summary.ok + bank.summary.failed == N - 1500
        assert "ghost-1" not in bank
    assert_same_contents(path, corpus["reference"], failures=True)


def test_a_partial_file_hdf5_cannot_resume_is_set_aside_and_built_again(corpus, tmp_path):
    """The ids read fine (the build is planned to skip 1,500 of them), but a column's object
    header is damaged, as a kill in the middle of an HDF5 flush can leave it: the writer
    sets the file aside and ``create`` plans again, building every source."""
    path = finished_build(corpus, tmp_path)
    partial = Path(partial_path(path))
    with h5py.File(path, "r+") as f:
        f.attrs.modify(layout.ATTR_COMMITTED, 1500)
        layout.set_state(f, layout.BUILDING)
        address = h5py.h5o.get_info(layout.Column.open(f, "pixels").refs.id).addr
    with open(path, "r+b") as raw:  # scribble over the refs table's object header
        raw.seek(address)
        raw.write(b"\xff" * 16)
    path.rename(partial)
    with h5py.File(partial, "r") as f:
        assert len(layout.ids_table(f)) >= 1500  # the client can still plan from it
    bank = SlowBank.create(path, corpus["images"], mode="a", scheduler="threads", progress=False)
    with bank:
        assert bank.summary.skipped == 0
        assert bank.summary.ok + bank.summary.failed == N
        (note,) = bank.summary.notes
        assert str(partial) in note and "could not be resumed" in note
    (aside,) = partial.parent.glob(partial.name + ".unreadable-*")
    assert aside.stat().st_size > 0 and not partial.exists()
    assert_same_contents(path, corpus["reference"], failures=True)


def test_a_streamed_source_list_is_not_planned_twice(corpus, tmp_path):
    path = finished_build(corpus, tmp_path)
    partial = Path(partial_path(path))
    with h5py.File(path, "r+") as f:
        layout.set_state(f, layout.BUILDING)
        address = h5py.h5o.get_info(layout.Column.open(f, "pixels").refs.id).addr
    with open(path, "r+b") as raw:
        raw.seek(address)
        raw.write(b"\xff" * 16)
    path.rename(partial)
    streamed = iter([str(corpus["images"])])  # an iterator: it cannot be listed twice
    with pytest.raises(PartialSetAsideError, match="Run the build again"):
        SlowBank.create(path, streamed, mode="a", scheduler="threads", progress=False)
    assert not partial.exists() and not path.exists()
    assert list(partial.parent.glob(partial.name + ".unreadable-*"))


@pytest.mark.parametrize("content", ["empty", "not-a-bank", "garbage"])
def test_a_partial_file_killed_before_it_was_a_bank_is_replaced(corpus, tmp_path, content):
    path = tmp_path / "bank.h5"
    partial = Path(partial_path(path))
    if content == "empty":
        partial.write_bytes(b"")
    elif content == "not-a-bank":
        with h5py.File(partial, "w") as f:  # HDF5 file created, bank attributes not yet
            f.create_group("__sources__")
    else:
        partial.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(3000))
    bank = SlowBank.create(path, corpus["images"], mode="a", scheduler="threads", progress=False)
    with bank:
        assert bank.summary.ok == N - 21
        (note,) = bank.summary.notes
        assert str(partial) in note
    assert_same_contents(path, corpus["reference"], failures=True)
    if content == "not-a-bank":
        assert "was not a bank yet" in note and not partial.exists()
    else:  # HDF5 cannot read it: kept aside, not deleted
        assert "is not an HDF5 file HDF5 can read" in note
        (aside,) = partial.parent.glob(partial.name + ".unreadable-*")
        assert aside.stat().st_size > 0 or content == "empty"


# -- a full disk ------------------------------------------------------------------------------


def _file_size_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_stops_the_build_and_a_resume_finishes_it(corpus, tmp_path):
    """The writer's file-size limit (``ulimit -f``) stands in for a full disk: the build runs
    on the threaded scheduler, so the writer is the limited process."""
    clean(corpus["out"])
    env = environment(H5BANK_TEST_DELAY="0")
    stopped = subprocess.run(
        [*h5bank_command(), "build", str(corpus["config"]), "--scheduler", "threads", "--quiet"],
        capture_output=True, text=True, env=env, preexec_fn=_file_size_limit(8_000_000),
        timeout=300,
    )  # fmt: skip
    assert stopped.returncode == 1
    (line,) = stopped.stderr.strip().splitlines()
    # A partition of 50 sources, less the broken file it may hold (where the limit falls
    # depends on the bank's chunk sizes).
    assert re.match(r"h5bank: error: DiskFullError: no room to commit (49|50) more sources", line)
    assert "a file-size limit of 8.0 MB (ulimit -f)" in line and "resume" in line
    partial = Path(partial_path(corpus["out"]))
    assert not corpus["out"].exists()
    with h5py.File(partial, "r") as f:
        assert list(bank_problems(f, data=True, stopped=True)) == []
        committed = layout.committed(f)
    assert 0 < committed < N

    resumed = subprocess.run(
        [*h5bank_command(), "build", str(corpus["config"]), "--resume", "--quiet",
         "--scheduler", "threads"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"{N - 21 - committed} sources ok, 21 failed, {committed} already in the bank" in (
        resumed.stdout
    )
    assert_same_contents(corpus["out"], corpus["reference"], failures=True)


# -- dead workers ------------------------------------------------------------------------------


def test_a_decode_worker_killed_mid_build_loses_and_duplicates_nothing(
    corpus, tmp_path, monkeypatch
):
    monkeypatch.setenv("H5BANK_TEST_DELAY", "0.002")  # workers (and their restarts) inherit it
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        build = SlowBank.graph(
            tmp_path / "bank.h5", corpus["images"], scheduler=client, partition_size=50
        )
        decoder = next(w for w in client.scheduler_info()["workers"] if w != build.writer)
        future = client.compute(build)
        deadline = time.monotonic() + 60
        while not any(
            k.startswith("h5bank-decode") for k in client.has_what().get(decoder, ())
        ):  # the decoder holds results the writer has not taken yet
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pid = client.run(os.getpid, workers=[decoder])[decoder]
        os.kill(pid, signal.SIGKILL)
        summary = future.result(timeout=120)
    assert summary.ok == N - 21 and summary.failed == 21
    assert_same_contents(tmp_path / "bank.h5", corpus["reference"], failures=True)


def test_workers_dying_on_one_source_stop_the_build_with_what_to_do(tmp_path):
    images = tmp_path / "images"
    write_images(images, per_class=20)
    shutil.copy(images / "cats" / "cats_000.png", images / "cats" / "crash.png")
    config = tmp_path / "crash.yaml"
    build = {"bank": "slowbank:CrashingBank", "sources": str(images),
             "output": str(tmp_path / "crash.h5"), "partition-size": 4,
             "scheduler": "local"}  # fmt: skip
    config.write_text(yaml.safe_dump({"h5bank": {"build": build}}))
    result = subprocess.run(
        [*h5bank_command(), "build", str(config), "--quiet"], capture_output=True, text=True,
        env=environment(), timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("h5bank: error")]
    (line,) = lines
    partial = f"{tmp_path / 'crash.h5.partial'}"
    if "WriterLostError" in line:  # the source was decoded on the writer's worker: it took it down
        assert f"the writer of {tmp_path / 'crash.h5'} ran on worker" in line, line
        assert "a decoder crashed it on a source" in line, line
        assert f"{partial} is consistent up to its last commit: resume" in line, line
    else:
        assert line.startswith("h5bank: error: WorkerDiedError:"), result.stderr
        assert "run out of memory" in line and f"{partial} keeps what was committed" in line
        assert "resume with" in line
    with h5py.File(partial, "r") as f:
        assert list(bank_problems(f, stopped=True)) == []


# -- two writers, and readers during a build ---------------------------------------------------


def test_a_second_build_of_a_bank_being_built_is_refused_and_readers_are_told(corpus, tmp_path):
    clean(corpus["out"])
    log = tmp_path / "first.log"
    # Slow enough that no number of cores finishes it during the checks: it is stopped
    # (SIGTERM, as scancel does) after them and resumed.
    first = build(corpus["config"], log=log, H5BANK_TEST_DELAY="0.1")
    try:
        deadline = time.monotonic() + 120
        while progress(log) < 50:
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        env = environment(H5BANK_TEST_DELAY="0")
        for flag in ("--resume", "--overwrite"):
            second = subprocess.run(
                [*h5bank_command(), "build", str(corpus["config"]), flag, "--quiet",
                 "--scheduler", "threads"],
                capture_output=True, text=True, env=env, timeout=300,
            )  # fmt: skip
            assert second.returncode == 1, second.stderr
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1, second.stderr
            (line,) = lines
            assert line.startswith("h5bank: error: WriterError:"), line
            assert "being written by another build" in line or "open elsewhere" in line, line
        info = subprocess.run(
            [*h5bank_command(), "info", str(corpus["out"])],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        assert info.returncode != 0
        assert "is being written" in info.stderr or "does not exist" in info.stderr, info.stderr
        assert first.poll() is None, "the first build must still be running"
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=300)
    assert first.returncode == 128 + signal.SIGTERM, log.read_text()
    resumed = subprocess.run(
        [*h5bank_command(), "build", str(corpus["config"]), "--resume", "--quiet"],
        capture_output=True, text=True, env=environment(H5BANK_TEST_DELAY="0"), timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert_same_contents(corpus["out"], corpus["reference"], failures=True)


SHARDED_KILL_POINTS = 5


def test_a_sharded_build_killed_at_random_points_resumes_to_the_uninterrupted_bank(
    corpus, tmp_path
):
    """The seeded kill test, with 2 shards on the embedded cluster's 2 workers: each shard
    resumes from its own commit record with the rest of its own block, and the index is
    written when both are done."""
    rng = random.Random(20261207)
    config = tmp_path / "sharded.yaml"
    settings = yaml.safe_load(corpus["config"].read_text())
    settings["h5bank"]["build"]["shards"] = 2
    config.write_text(yaml.safe_dump(settings))
    out = corpus["out"]
    seen = []
    for _ in range(SHARDED_KILL_POINTS):
        clean(out)
        log = tmp_path / "build.log"
        where = rng.randrange(50, N)
        process = build(config, log=log, H5BANK_TEST_DELAY="0.001")
        deadline = time.monotonic() + 120
        while progress(log) < where and process.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.03))
        kill_whole_build(process)
        if out.exists():  # only the index makes the bank: it is written last, whole
            with h5py.File(out, "r") as f:
                assert layout.state(f) == layout.COMPLETE and len(layout.shard_names(f)) == 2
        shards = sorted(out.parent.glob(out.stem + ".shard-*"))
        seen.append((where, out.exists(), [p.name.split("-")[-1] for p in shards]))
        resumed = subprocess.run(
            [*h5bank_command(), "build", str(config), "--resume", "--quiet"],
            capture_output=True, text=True, env=environment(H5BANK_TEST_DELAY="0"), timeout=300,
        )  # fmt: skip
        assert resumed.returncode == 0, (where, resumed.stderr)
        assert_same_contents(out, corpus["reference"], failures=True)
        with h5py.File(out, "r") as f:
            listed = layout.shard_names(f)
        assert sorted(p.name for p in out.parent.glob(out.stem + ".shard-*")) == sorted(listed)
    print("kill points (progress, bank there, shard files):", seen)  # shown with -s
    assert sum(1 for _, done, files in seen if not done and files) >= SHARDED_KILL_POINTS // 2, seen


def test_a_shard_writer_killed_mid_build_is_resumed_on_another_worker(
    corpus, tmp_path, monkeypatch
):
    """Killing the worker process that writes one of two shards: create() plans the build
    again on the workers there are (the nanny restarts the killed one) and resumes that
    shard from its commit record; nothing is lost or written twice."""
    monkeypatch.setenv("H5BANK_TEST_DELAY", "0.002")  # workers (and their restarts) inherit it
    out = tmp_path / "bank.h5"
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        workers = sorted(client.scheduler_info()["workers"])
        victim = workers[1]  # the writer of shard 1 (chain k on worker k, in address order)
        pid = client.run(os.getpid, workers=[victim])[victim]

        def kill_when_shard_1_commits() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                partials = list(tmp_path.glob("bank.shard-*-00001.h5.partial"))
                if partials:
                    with (
                        contextlib.suppress(Exception),  # caught mid-commit: look again
                        h5py.File(partials[0], "r", locking=False) as f,
                    ):
                        if layout.committed(f) >= 100:
                            break
                time.sleep(0.01)
            os.kill(pid, signal.SIGKILL)

        import threading

        killer = threading.Thread(target=kill_when_shard_1_commits)
        killer.start()
        bank = SlowBank.create(
            out, corpus["images"], scheduler=client, shards=2, partition_size=50, progress=False
        )
        killer.join()
    notes = "\n".join(bank.summary.notes)
    assert f"ran on worker {victim}" in notes and "resumed on another worker" in notes, notes
    bank.close()
    assert_same_contents(out, corpus["reference"], failures=True)
