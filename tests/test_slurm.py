"""Builds on a real single-node Slurm (slurmctld, slurmd and munged from Debian's packages,
started by ``tests/slurm.sh``): through dask-jobqueue's SLURMCluster, inside one sbatch job,
and a batch job cancelled mid-build then resumed.

Each bank is compared, column by column, with the same sources built locally.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dask
import h5py
import pytest
from conftest import assert_same_contents, write_images
from slowbank import QuickBank

from pipeline import SourceError
from pipeline.demo import DemoBank, make_samples
from pipeline.format import layout
from pipeline.format.verify import bank_problems

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SBATCH = REPO / "configs" / "slurm" / "build.sbatch"
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def demo_sources(tmp_path_factory):
    """The demo's samples, and the bank a local build makes of them."""
    root = tmp_path_factory.mktemp("slurm-demo")
    make_samples(root / "samples")
    sources = [str(root / "samples" / "images"), str(root / "samples" / "sounds")]
    DemoBank.create(root / "local.h5", sources, scheduler="threads", progress=False).close()
    return {"sources": sources, "local": root / "local.h5"}


@pytest.fixture
def jobqueue(tmp_path):
    """jobqueue.slurm settings for this machine: loopback network, small jobs, files under
    ``tmp_path``, and a job name of this test's own (to find its jobs afterwards)."""
    name = f"h5bank-test-{uuid.uuid4().hex[:8]}"
    return name, {
        "jobqueue.slurm.name": name,
        "jobqueue.slurm.interface": "lo",
        "jobqueue.slurm.memory": "1GB",
        "jobqueue.slurm.walltime": "00:10:00",
        "jobqueue.slurm.local-directory": str(tmp_path / "workers"),
        "jobqueue.slurm.log-directory": str(tmp_path / "logs"),
    }


def job_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True
    ).stdout
    return dict(word.split("=", 1) for word in out.split() if "=" in word)


def jobs_named(name: str) -> dict[str, str]:
    """Job id -> state of every job still known to slurmctld whose name is ``name``."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o"], capture_output=True, text=True, check=True
    ).stdout
    found = {}
    for line in out.splitlines():
        fields = dict(word.split("=", 1) for word in line.split() if "=" in word)
        if fields.get("JobName") == name:
            found[fields["JobId"]] = fields["JobState"]
    return found


def wait_for_job(job_id: str, timeout: float = 240.0) -> dict[str, str]:
    """Poll ``scontrol show job`` (sbatch --wait polls too coarsely) until the job ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = job_fields(job_id)
        if fields.get("JobState") in FINISHED:
            return fields
        time.sleep(0.2)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"Slurm job {job_id} did not finish within {timeout} s: {fields}")


def job_env(**extra: str) -> dict[str, str]:
    """The environment jobs inherit (sbatch's default --export=ALL): this interpreter's
    ``h5bank`` first on PATH, the test helpers importable."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def write_config(path: Path, bank: str, sources, output: Path, **build) -> Path:
    lines = [
        "h5bank:",
        "  build:",
        f"    bank: {bank}",
        "    sources:",
        *(f"      - {s}" for s in sources),
        f"    output: {output}",
        *(f"    {key}: {value}" for key, value in build.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_build_through_slurm_cluster_equals_local_build(
    slurm, demo_sources, jobqueue, tmp_path, capsys
):
    # Three one-core jobs on a two-core node: two run, one waits for resources.
    name, settings = jobqueue
    with dask.config.set({**settings, "h5bank.slurm.jobs": 3}):
        bank = DemoBank.create(
            tmp_path / "slurm.h5", demo_sources["sources"], scheduler="slurm", progress=True
        )
    with bank:
        assert bank.summary.ok == len(bank) == 138
    assert_same_contents(tmp_path / "slurm.h5", demo_sources["local"])
    err = capsys.readouterr().err
    assert "submitted 3 Slurm jobs of 1 core" in err
    seconds = re.search(r"first Slurm worker connected ([\d.]+) s after starting", err)
    assert seconds is not None, err
    # Every job was cancelled when the build ended, the one still pending included (a
    # pending job cannot end any other way).
    jobs = jobs_named(name)
    assert len(jobs) == 3, jobs
    ended = {job: wait_for_job(job, timeout=60) for job in jobs}
    assert {fields["JobState"] for fields in ended.values()} == {"CANCELLED"}, ended
    never_ran = [job for job, fields in ended.items() if fields.get("StartTime") in (None, "None")
                 or fields.get("RunTime") == "00:00:00"]  # fmt: skip
    assert never_ran, f"no job was still pending: {ended}"


def test_a_sharded_build_on_slurm_jobs_equals_the_local_build(
    slurm, demo_sources, jobqueue, tmp_path
):
    """Two one-core jobs, a shard each: the build waits for both workers before placing a
    writer on each, and the bank equals the single-file build made here."""
    _, settings = jobqueue
    with dask.config.set({**settings, "h5bank.slurm.jobs": 2}):
        bank = DemoBank.create(
            tmp_path / "sharded.h5", demo_sources["sources"], scheduler="slurm", shards=2,
            progress=False,
        )  # fmt: skip
    with bank:
        assert bank.summary.ok == len(bank) == 138
        assert "2 shards written by 2 writers" in bank.summary.notes[-1]
    assert_same_contents(tmp_path / "sharded.h5", demo_sources["local"])
    with h5py.File(tmp_path / "sharded.h5", "r") as f:
        assert len(layout.shard_names(f)) == 2


def test_cli_build_on_slurm_adaptive_equals_local_build(slurm, demo_sources, jobqueue, tmp_path):
    name, settings = jobqueue
    env = job_env(
        **{
            "DASK_" + key.upper().replace(".", "__").replace("-", "_"): value
            for key, value in settings.items()
        }
    )
    config = write_config(
        tmp_path / "build.yaml", "pipeline.demo:DemoBank", demo_sources["sources"],
        tmp_path / "cli.h5", scheduler="slurm",
    )  # fmt: skip
    result = subprocess.run(
        ["h5bank", "build", str(config), "--jobs", "1:2"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "submitted adaptive, 1 to 2 Slurm jobs of 1 core" in result.stderr
    assert "first Slurm worker connected" in result.stderr
    assert "Dask dashboard at http://" in result.stderr
    assert_same_contents(tmp_path / "cli.h5", demo_sources["local"])
    jobs = jobs_named(name)
    assert 1 <= len(jobs) <= 2, jobs  # adaptive between 1 and 2
    assert {wait_for_job(job, timeout=60)["JobState"] for job in jobs} == {"CANCELLED"}


def test_slurm_refuses_a_wrong_partition_before_submitting(slurm, demo_sources, jobqueue, tmp_path):
    name, _ = jobqueue
    env = job_env(DASK_JOBQUEUE__SLURM__QUEUE="nosuch", DASK_JOBQUEUE__SLURM__NAME=name)
    config = write_config(
        tmp_path / "build.yaml", "pipeline.demo:DemoBank", demo_sources["sources"],
        tmp_path / "never.h5",
    )  # fmt: skip
    result = subprocess.run(
        ["h5bank", "build", str(config), "--scheduler", "slurm"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "Slurm refused the worker job script" in line
    assert "invalid partition specified: nosuch" in line
    assert jobs_named(name) == {}
    assert not list(tmp_path.glob("never.h5*"))


def test_sbatch_job_builds_the_same_bank(slurm, demo_sources, tmp_path):
    config = write_config(
        tmp_path / "build.yaml", "pipeline.demo:DemoBank", demo_sources["sources"],
        tmp_path / "batch.h5",
    )  # fmt: skip
    job = subprocess.run(
        ["sbatch", "--parsable", "-c", "2", "--mem=2G", "-t", "10",
         "-o", str(tmp_path / "job-%j.out"), "-e", str(tmp_path / "job-%j.err"),
         str(SBATCH), str(config)],
        capture_output=True, text=True, env=job_env(), cwd=tmp_path, check=True,
    ).stdout.strip()  # fmt: skip
    fields = wait_for_job(job)
    err = (tmp_path / f"job-{job}.err").read_text()
    assert fields["JobState"] == "COMPLETED", err
    assert (
        f"inside Slurm job {job}: SLURM_CPUS_PER_TASK=2, SLURM_NTASKS=1, SLURM_MEM_PER_NODE=2048"
        in err
    )
    assert "a local cluster of 2 worker processes, 0.9 GiB each" in err
    assert_same_contents(tmp_path / "batch.h5", demo_sources["local"])


def test_scancel_mid_build_leaves_a_resumable_bank(slurm, tmp_path):
    images = tmp_path / "images"
    write_images(images, per_class=120)  # 240 sources, 0.05 s each on 2 workers: about 6 s
    config = write_config(
        tmp_path / "slow.yaml", "slowbank:SlowBank", [images], tmp_path / "slow.h5",
        **{"partition-size": 8},
    )  # fmt: skip
    job = subprocess.run(
        ["sbatch", "--parsable", "-c", "2", "--mem=2G", "-t", "10",
         "-o", str(tmp_path / "job.out"), "-e", str(tmp_path / "job.err"),
         str(SBATCH), str(config)],
        capture_output=True, text=True, env=job_env(H5BANK_TEST_DELAY="0.05"), cwd=tmp_path,
        check=True,
    ).stdout.strip()  # fmt: skip
    # Cancel once the progress bar shows a few partitions written, well before the end.
    deadline, done = time.monotonic() + 180, 0
    while time.monotonic() < deadline and done < 24:
        err = (tmp_path / "job.err").read_text() if (tmp_path / "job.err").exists() else ""
        counts = re.findall(r"(\d+)/240", err)
        done = int(counts[-1]) if counts else 0
        assert job_fields(job)["JobState"] in ("PENDING", "RUNNING"), err
        time.sleep(0.1)
    assert 24 <= done < 240, f"the build was not caught midway ({done}/240)"
    subprocess.run(["scancel", job], check=True)
    fields = wait_for_job(job, timeout=60)
    assert fields["JobState"] == "CANCELLED"
    # Slurm says CANCELLED at once, while the job's processes still have KillWait (5 s here)
    # to stop before SIGKILL: h5bank says at once that it stops, closes its cluster, then says
    # what it kept (0.7-0.8 s on an idle machine; once in CI the SIGKILL came first).
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        err = (tmp_path / "job.err").read_text()
        if "stopped by SIGTERM before the build finished" in err:
            break
        time.sleep(0.1)
    partial = tmp_path / "slow.h5.partial"
    assert f"h5bank: SIGTERM received: stopping the build; what it committed stays in {partial}" in err, err  # fmt: skip
    assert not (tmp_path / "slow.h5").exists()

    # What the killed build committed checks out, and a resume keeps it.
    check = subprocess.run(
        ["h5bank", "verify", "--data", str(tmp_path / "slow.h5.partial")],
        capture_output=True, text=True, env=job_env(),
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    committed = int(re.search(r": (\d+) sources committed by a stopped build", check.stdout)[1])
    assert 0 < committed < 240

    resumed = subprocess.run(
        ["h5bank", "build", str(config), "--resume", "--quiet", "--scheduler", "threads"],
        capture_output=True, text=True, env=job_env(H5BANK_TEST_DELAY="0"), cwd=tmp_path,
        timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"{240 - committed} sources ok, 0 failed, {committed} already in the bank" in (
        resumed.stdout
    )
    QuickBank.create(tmp_path / "quick.h5", images, scheduler="threads", progress=False).close()
    assert_same_contents(tmp_path / "slow.h5", tmp_path / "quick.h5")


def test_a_failed_slurm_build_cancels_its_jobs_and_keeps_what_it_committed(
    slurm, jobqueue, tmp_path
):
    images = tmp_path / "images"
    write_images(images, per_class=8)
    (images / "dogs" / "broken.png").write_bytes(b"not a png at all")
    name, settings = jobqueue
    with (
        dask.config.set({**settings, "h5bank.slurm.jobs": 2}),
        pytest.raises(SourceError, match=r"broken\.png"),
    ):
        QuickBank.create(
            tmp_path / "bank.h5", images, scheduler="slurm", progress=False, on_error="raise"
        )
    jobs = jobs_named(name)
    assert len(jobs) == 2, jobs
    assert {wait_for_job(job, timeout=60)["JobState"] for job in jobs} == {"CANCELLED"}
    assert not (tmp_path / "bank.h5").exists()
    with h5py.File(tmp_path / "bank.h5.partial", "r") as f:
        assert list(bank_problems(f, stopped=True)) == []
