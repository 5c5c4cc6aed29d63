"""Slurm through dask-jobqueue."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import dask

from pipeline import config
from pipeline.clients import cluster_workers
from pipeline.errors import SchedulerError
from pipeline.run.local import closing, say


def slurm_job_script() -> str:
    """The worker job script ``scheduler="slurm"`` would submit, from ``jobqueue.slurm``.

    Rendered without starting a scheduler (its address is a placeholder), so
    it works on a machine without Slurm: ``--dry-run`` prints it.
    """
    from dask_jobqueue.slurm import SLURMJob

    config.load_jobqueue_defaults()
    return SLURMJob(
        "tcp://<scheduler-address>:8786",
        name="<worker-name>",
        interface=dask.config.get("jobqueue.slurm.interface", None),
    ).job_script()


def slurm_scaling() -> tuple[str, int]:
    """How ``scheduler="slurm"`` scales (for messages), and the threads it will have."""
    config.load_jobqueue_defaults()
    settings = config.section("slurm")
    cores = int(dask.config.get("jobqueue.slurm.cores") or 1)
    low, high = settings.get("minimum-jobs"), settings.get("maximum-jobs")
    if low is not None and high is not None:
        return f"adaptive, {low} to {high} Slurm jobs of {_cores(cores)}", int(high) * cores
    jobs = int(settings.get("jobs") or 1)
    return f"{jobs} Slurm job{'s' if jobs != 1 else ''} of {_cores(cores)}", jobs * cores


def _cores(n: int) -> str:
    return f"{n} core{'s' if n != 1 else ''}"


def _test_submit(script: str) -> None:
    """``sbatch --test-only`` the job script: a wrong partition or size fails now, with Slurm's words."""
    if shutil.which("sbatch") is None:
        raise SchedulerError(
            "scheduler 'slurm' needs Slurm's sbatch on this machine's PATH (run the build on a "
            "login node of the cluster), or set h5bank.slurm.test-submit: false"
        )
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="h5bank-job-") as f:
        f.write(script)
        f.flush()
        result = subprocess.run(
            ["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=120
        )
    if result.returncode != 0:
        reason = "; ".join(line.strip() for line in result.stderr.splitlines() if line.strip())
        raise SchedulerError(
            f"Slurm refused the worker job script: {reason or f'sbatch exit {result.returncode}'}. "
            "Fix jobqueue.slurm (configs/jobqueue.yaml: queue, account, cores, memory, "
            "walltime); `h5bank build CONFIG --scheduler slurm --dry-run` prints the script"
        )


@contextlib.contextmanager
def start_slurm_cluster(progress: bool = False) -> Iterator[tuple[Any, int]]:
    """A client to a ``SLURMCluster`` with its jobs submitted and one worker connected."""
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    settings = config.section("slurm")
    scaling, threads = slurm_scaling()
    started = time.perf_counter()
    cluster = SLURMCluster()  # everything from jobqueue.slurm
    with closing(cluster):
        if settings.get("test-submit", True):
            _test_submit(cluster.job_script())
        if settings.get("minimum-jobs") is not None and settings.get("maximum-jobs") is not None:
            cluster.adapt(  # at least one job: the build waits for a worker before it starts
                minimum_jobs=max(1, int(settings["minimum-jobs"])),
                maximum_jobs=max(1, int(settings["maximum-jobs"])),
            )
        else:
            cluster.scale(jobs=int(settings.get("jobs") or 1))
        say(progress, f"submitted {scaling}")
        with closing(Client(cluster)) as client:
            _wait_for_first_worker(client, cluster, float(settings.get("wait-timeout") or 600))
            say(
                progress,
                f"first Slurm worker connected {time.perf_counter() - started:.1f} s after "
                f"starting the cluster (jobs {', '.join(_job_ids(cluster)) or '?'})",
            )
            yield client, threads


def _job_ids(cluster: Any) -> list[str]:
    return [str(job.job_id) for job in cluster.workers.values() if getattr(job, "job_id", None)]


# Slurm job states after which a job will not start a worker any more.
_ENDED = frozenset(
    {
        "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
        "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "TIMEOUT", "GONE",
    }
)  # fmt: skip


def _wait_for_first_worker(client: Any, cluster: Any, timeout: float) -> None:
    """Wait until a worker connects; fail with the jobs' Slurm states when none does."""
    deadline, next_check = time.monotonic() + timeout, time.monotonic() + 5
    while not cluster_workers(client):
        now = time.monotonic()
        if now > deadline:
            raise SchedulerError(
                f"no Slurm worker connected within {timeout:g} s (h5bank.slurm.wait-timeout); "
                f"the jobs: {_shown_states(_job_states(_job_ids(cluster)))}. Their output is "
                "in jobqueue.slurm.log-directory (default: the working directory)"
            )
        if now > next_check:  # every job ended without a worker: no point waiting
            next_check = now + 5
            states = _job_states(_job_ids(cluster))
            if states and all(state in _ENDED for state, _ in states.values()):
                raise SchedulerError(
                    f"every Slurm worker job ended before its worker connected: "
                    f"{_shown_states(states)}. Their output is in jobqueue.slurm.log-directory "
                    "(default: the working directory)"
                )
        with contextlib.suppress(Exception):
            client.wait_for_workers(1, timeout=1)


def _job_states(ids: list[str]) -> dict[str, tuple[str, str]]:
    """Job id -> (state, reason), in one ``squeue`` call; jobs it no longer lists are GONE."""
    if not ids or shutil.which("squeue") is None:
        return {}
    result = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    states = {job: ("GONE", "None") for job in ids}
    for line in result.stdout.splitlines():
        job, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        if job in states:
            states[job] = (state, reason or "None")
    return states


def _shown_states(states: dict[str, tuple[str, str]]) -> str:
    """``"12 PENDING (Resources), 13 RUNNING"``."""
    if not states:
        return "none submitted"
    return ", ".join(
        f"{job} {state}" + (f" ({reason})" if reason != "None" else "")
        for job, (state, reason) in states.items()
    )
