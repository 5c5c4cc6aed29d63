"""Where builds run: the Slurm allocation a build runs inside, the embedded local cluster
sized to it (or to ``h5bank.local-cluster``), the Slurm plan and job script, and the check
that the writer's worker can write the bank's folder."""

from __future__ import annotations

import os
import subprocess
import sys

import dask
import pytest
from configbank import Pictures

from pipeline.run.local import Allocation, LocalSize, local_cluster_size, slurm_allocation
from pipeline.run.slurm import slurm_job_script, slurm_scaling

GiB = 2**30
MiB = 2**20


@pytest.fixture(autouse=True)
def _outside_slurm(monkeypatch):
    """This process outside any Slurm job (even when the tests run inside one), with no
    h5bank or jobqueue settings from the environment."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "DASK_H5BANK__", "DASK_JOBQUEUE__")):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _local_cluster_defaults():
    """The embedded cluster's packaged defaults, whatever the user's own Dask config says."""
    defaults = {
        "h5bank.local-cluster.n-workers": None,
        "h5bank.local-cluster.memory-limit": "auto",
        "h5bank.local-cluster.local-directory": None,
    }
    with dask.config.set(defaults):
        yield


# -- slurm_allocation ----------------------------------------------------------------------


def test_outside_a_job_there_is_no_allocation():
    assert slurm_allocation({}) is None
    # Size variables without a job id are not a job (a shell that exported them by hand).
    assert slurm_allocation({"SLURM_CPUS_ON_NODE": "8", "SLURM_MEM_PER_NODE": "1024"}) is None
    assert slurm_allocation() is None  # os.environ, cleared of SLURM_* by the fixture


def test_cpus_are_cpus_per_task_times_tasks():
    env = {"SLURM_JOB_ID": "41", "SLURM_CPUS_PER_TASK": "4", "SLURM_NTASKS": "2"}
    allocation = slurm_allocation(env)
    assert allocation == Allocation("41", 8, None, "SLURM_CPUS_PER_TASK=4, SLURM_NTASKS=2")


def test_cpus_are_capped_by_the_cpus_on_this_node():
    # 4 tasks of 4 CPUs over two nodes: this node has 8 of the 16.
    env = {
        "SLURM_JOB_ID": "42",
        "SLURM_CPUS_PER_TASK": "4",
        "SLURM_NTASKS": "4",
        "SLURM_CPUS_ON_NODE": "8",
    }
    allocation = slurm_allocation(env)
    assert allocation.cpus == 8
    assert allocation.basis == "SLURM_CPUS_PER_TASK=4, SLURM_NTASKS=4, SLURM_CPUS_ON_NODE=8"
    # ...and not raised by them: a node with more CPUs than the job asked for.
    assert slurm_allocation({**env, "SLURM_CPUS_ON_NODE": "64"}).cpus == 16


@pytest.mark.parametrize(
    ("env", "cpus"),
    [
        ({"SLURM_CPUS_PER_TASK": "6"}, 6),  # one task when NTASKS is not set
        ({"SLURM_CPUS_PER_TASK": "2", "SLURM_NPROCS": "3"}, 6),  # NPROCS: the older NTASKS
        ({"SLURM_CPUS_ON_NODE": "12"}, 12),  # no --cpus-per-task: what the node gave
        ({"SLURM_CPUS_PER_TASK": "0", "SLURM_CPUS_ON_NODE": "5"}, 5),  # 0 is not a size
        ({"SLURM_CPUS_PER_TASK": "many"}, None),  # nor is text
        ({}, None),
    ],
    ids=["no-ntasks", "nprocs", "on-node", "zero", "text", "none"],
)
def test_cpus_from_whichever_variables_the_job_has(env, cpus):
    assert slurm_allocation({"SLURM_JOBID": "7", **env}).cpus == cpus  # SLURM_JOBID: older name


def test_memory_is_per_node_else_per_cpu_times_cpus():
    job = {"SLURM_JOB_ID": "43", "SLURM_CPUS_PER_TASK": "4"}
    per_node = slurm_allocation({**job, "SLURM_MEM_PER_NODE": "16384"})
    assert per_node.memory == 16 * GiB
    assert per_node.basis == "SLURM_CPUS_PER_TASK=4, SLURM_MEM_PER_NODE=16384"
    per_cpu = slurm_allocation({**job, "SLURM_MEM_PER_CPU": "1500"})
    assert per_cpu.memory == 4 * 1500 * MiB
    assert per_cpu.basis == "SLURM_CPUS_PER_TASK=4, SLURM_MEM_PER_CPU=1500"
    both = slurm_allocation({**job, "SLURM_MEM_PER_NODE": "2048", "SLURM_MEM_PER_CPU": "1500"})
    assert both.memory == 2 * GiB
    unsized = slurm_allocation({"SLURM_JOB_ID": "44"})
    assert (unsized.cpus, unsized.memory, unsized.basis) == (None, None, "no size variables")


# -- the embedded local cluster's size -----------------------------------------------------


def in_job(monkeypatch, **variables):
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    for name, value in variables.items():
        monkeypatch.setenv(f"SLURM_{name}", str(value))


def test_outside_a_job_the_local_cluster_has_a_worker_per_core():
    size = local_cluster_size()
    assert size == LocalSize(os.cpu_count() or 1, "auto", None, None)
    assert str(size) == f"a local cluster of {os.cpu_count() or 1} worker processes"


def test_inside_a_job_the_local_cluster_fits_the_allocation(monkeypatch, tmp_path):
    in_job(monkeypatch, CPUS_PER_TASK=3, NTASKS=1, MEM_PER_NODE=3000)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the job's scratch
    size = local_cluster_size()
    assert size.n_workers == 3
    assert size.memory == int(3000 * MiB * 0.9 / 3)  # 90 % of the job's memory, split
    assert size.local_directory == str(tmp_path)
    assert size.allocation.job_id == "1234"
    assert str(size) == (
        f"a local cluster of 3 worker processes, {size.memory / GiB:.1f} GiB each (inside "
        "Slurm job 1234: SLURM_CPUS_PER_TASK=3, SLURM_NTASKS=1, SLURM_MEM_PER_NODE=3000)"
    )


def test_per_cpu_memory_is_split_between_the_workers(monkeypatch):
    in_job(monkeypatch, CPUS_ON_NODE=4, MEM_PER_CPU=2048)
    size = local_cluster_size()
    assert (size.n_workers, size.memory) == (4, int(4 * 2 * GiB * 0.9 / 4))


def test_the_setting_sizes_the_local_cluster_outside_a_job():
    with dask.config.set({"h5bank.local-cluster.n-workers": 3}):
        size = local_cluster_size()
    assert (size.n_workers, size.memory, size.allocation) == (3, "auto", None)


def test_the_setting_wins_over_the_allocation_and_shares_its_memory(monkeypatch, tmp_path):
    in_job(monkeypatch, CPUS_PER_TASK=8, MEM_PER_NODE=8192)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "job"))
    with dask.config.set({"h5bank.local-cluster.n-workers": 3}):
        size = local_cluster_size()
    assert size.n_workers == 3
    assert size.memory == int(8 * GiB * 0.9 / 3)
    assert size.allocation.cpus == 8
    settings = {
        "h5bank.local-cluster.memory-limit": "2GB",
        "h5bank.local-cluster.local-directory": str(tmp_path / "mine"),
    }
    with dask.config.set(settings):  # set limits and folders are kept, in a job or not
        size = local_cluster_size()
    assert (size.n_workers, size.memory) == (8, "2GB")
    assert size.local_directory == str(tmp_path / "mine")


def in_new_process(expression: str, **env: str) -> str:
    """``expression`` (over pipeline.run.local's names) printed by a new Python process whose
    environment adds ``env``: Dask reads ``DASK_*`` variables when it is imported."""
    code = (
        f"from pipeline.run.local import *; from pipeline.run.slurm import *; print({expression})"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=True,
    )
    return result.stdout.strip()


def test_an_environment_variable_sets_the_number_of_slurm_jobs():
    jobs = {"DASK_H5BANK__SLURM__JOBS": "4", "DASK_JOBQUEUE__SLURM__CORES": "1"}
    assert in_new_process("slurm_scaling()", **jobs) == ("('4 Slurm jobs of 1 core', 4)")


@pytest.mark.parametrize(
    ("env", "expression", "expected"),
    [
        ({"DASK_H5BANK__LOCAL_CLUSTER__N_WORKERS": "5"}, "local_cluster_size().n_workers", "5"),
        (
            {"DASK_H5BANK__SLURM__MINIMUM_JOBS": "2", "DASK_H5BANK__SLURM__MAXIMUM_JOBS": "5"},
            "slurm_scaling()",
            "('adaptive, 2 to 5 Slurm jobs of 1 core', 5)",
        ),
    ],
    ids=["local-cluster-n-workers", "slurm-adaptive-bounds"],
)
def test_an_environment_variable_sets_a_dashed_setting(env, expression, expected):
    assert in_new_process(expression, **env) == expected


# -- Slurm through dask-jobqueue: the plan and the job script, with no Slurm involved ------


def test_the_slurm_plan_follows_jobs_or_adaptive_bounds():
    fixed = {
        "h5bank.slurm.jobs": 1,
        "h5bank.slurm.minimum-jobs": None,
        "h5bank.slurm.maximum-jobs": None,
        "jobqueue.slurm.cores": 1,
    }
    with dask.config.set(fixed):
        assert slurm_scaling() == ("1 Slurm job of 1 core", 1)
        with dask.config.set({"h5bank.slurm.jobs": 4, "jobqueue.slurm.cores": 2}):
            assert slurm_scaling() == ("4 Slurm jobs of 2 cores", 8)
        with dask.config.set({"h5bank.slurm.minimum-jobs": 1, "h5bank.slurm.maximum-jobs": 6}):
            assert slurm_scaling() == ("adaptive, 1 to 6 Slurm jobs of 1 core", 6)


def test_the_job_script_comes_from_jobqueue_slurm():
    settings = {
        "jobqueue.slurm.name": "bank-worker",
        "jobqueue.slurm.queue": "short",
        "jobqueue.slurm.account": "lab7",
        "jobqueue.slurm.cores": 2,
        "jobqueue.slurm.memory": "8GB",
        "jobqueue.slurm.walltime": "00:30:00",
        "jobqueue.slurm.job-extra-directives": ["--qos=low"],
        "jobqueue.slurm.job-script-prologue": ["module load hdf5"],
    }
    with dask.config.set(settings):
        script = slurm_job_script().splitlines()
    for line in (
        "#SBATCH -J bank-worker",
        "#SBATCH -p short",
        "#SBATCH -A lab7",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --mem=8G",
        "#SBATCH -t 00:30:00",
        "#SBATCH --qos=low",
        "module load hdf5",
    ):
        assert line in script, line
    worker = next(line for line in script if "distributed.cli.dask_worker" in line)
    assert "tcp://<scheduler-address>:8786" in worker and "--nthreads 2" in worker


# -- the writer's worker must reach the bank's folder --------------------------------------


def test_a_bank_in_a_folder_the_writers_worker_lacks_fails_before_any_work(
    images, tmp_path, client
):
    missing = tmp_path / "missing"
    # The worker runs on this host, so the error is about the folder, not shared storage.
    with pytest.raises(FileNotFoundError) as raised:
        Pictures.create(missing / "x.h5", images, scheduler=client, progress=False)
    message = str(raised.value)
    assert f"there is no folder {missing} (create it first)" in message
    assert "shared filesystem" not in message
    assert not missing.exists()
    # The same words when the writer is this process.
    for scheduler in ("threads", "sync"):
        with pytest.raises(FileNotFoundError, match=r"there is no folder .*\(create it first\)"):
            Pictures.create(missing / "x.h5", images, scheduler=scheduler, progress=False)
    assert not missing.exists()
