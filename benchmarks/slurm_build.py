"""The same bank built on this machine and through Slurm; how long Slurm takes to give workers.

    bash tests/slurm.sh up && eval "$(bash tests/slurm.sh env)"
    python benchmarks/slurm_build.py [--files 4000] [--jobs 2] [--repeat 3]

Needs a Slurm cluster this machine can submit to (``tests/slurm.sh up``
starts a single-node one). Prints one JSON line per figure, best of
``--repeat`` runs each:

- ``seconds_to_first_worker``: from starting the ``SLURMCluster`` (the
  ``sbatch --test-only`` check and the submission included) to the first
  worker connected, as ``h5bank build --scheduler slurm`` reports it;
- ``build_seconds`` on the embedded local cluster (``--jobs`` worker
  processes, its start-up included), through Slurm (``--jobs`` jobs of one
  core, their start-up included), and inside one sbatch job (``-c --jobs``,
  from submission to the job's end, Python's start-up included), with each
  one's ratio to the local build.

Before printing, it checks that the three banks hold identical arrays.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dask
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from build_images import Pictures, make_corpus  # noqa: E402


def emit(figure: str, value: float, unit: str, **extra) -> None:
    print(json.dumps({"figure": figure, "value": round(value, 3), "unit": unit, **extra}))


def slurm_build(path: Path, root: Path, jobs: int, logs: Path) -> tuple[float, float]:
    """Build through SLURMCluster; return (seconds to the first worker, build seconds)."""
    settings = {
        "h5bank.slurm.jobs": jobs,
        "jobqueue.slurm.interface": "lo",
        "jobqueue.slurm.memory": "2GB",
        "jobqueue.slurm.log-directory": str(logs),
    }
    import contextlib
    import io

    err = io.StringIO()
    started = time.perf_counter()
    with dask.config.set(settings), contextlib.redirect_stderr(err):
        Pictures.create(path, root, scheduler="slurm", progress=True).close()
    seconds = time.perf_counter() - started
    first = re.search(r"first Slurm worker connected ([\d.]+) s", err.getvalue())
    return float(first[1]) if first else float("nan"), seconds


def sbatch_build(path: Path, root: Path, jobs: int, work: Path) -> float:
    config = work / "build.yaml"
    config.write_text(
        "h5bank:\n  build:\n    bank: build_images:Pictures\n"
        f"    sources: [{root}]\n    output: {path}\n    progress: false\n"
    )
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "benchmarks"), str(REPO)])
    path.unlink(missing_ok=True)  # the example script resumes; this measures a whole build
    started = time.perf_counter()
    job = subprocess.run(
        ["sbatch", "--parsable", "-c", str(jobs), "--mem=4G", "-o", str(work / "job-%j.out"),
         str(REPO / "configs" / "slurm" / "build.sbatch"), str(config)],
        capture_output=True, text=True, env=env, check=True, cwd=work,
    ).stdout.strip()  # fmt: skip
    while True:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job], capture_output=True, text=True
        ).stdout
        state = re.search(r"JobState=(\w+)", out)[1]
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            break
        time.sleep(0.1)
    if state != "COMPLETED":
        raise RuntimeError(f"sbatch job {job} ended {state}: see {work}/job-{job}.out")
    return time.perf_counter() - started


def same(a: Path, b: Path) -> None:
    with Pictures(a) as x, Pictures(b) as y:
        assert x.ids == y.ids
        np.testing.assert_array_equal(x.labels[:], y.labels[:])
        np.testing.assert_array_equal(x.images[:], y.images[:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=4000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="Scratch folder (default: a temporary one).")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="h5bank-slurm-bench-"))
    root = work / "images"
    make_corpus(root, args.files, 4)
    local, firsts, through, batch = [], [], [], []
    for _ in range(args.repeat):
        with dask.config.set({"h5bank.local-cluster.n-workers": args.jobs}):
            started = time.perf_counter()
            Pictures.create(work / "local.h5", root, progress=False).close()
            local.append(time.perf_counter() - started)
        first, seconds = slurm_build(work / "slurm.h5", root, args.jobs, work / "logs")
        firsts.append(first)
        through.append(seconds)
        batch.append(sbatch_build(work / "batch.h5", root, args.jobs, work))
    same(work / "slurm.h5", work / "local.h5")
    same(work / "batch.h5", work / "local.h5")
    common = {"files": args.files, "workers": args.jobs, "best_of": args.repeat}
    emit("seconds_to_first_worker", min(firsts), "s", **common, all=[round(x, 2) for x in firsts])
    emit("build_seconds", min(local), "s", where="local cluster", **common)
    for where, times in (("SLURMCluster", through), ("one sbatch job", batch)):
        emit("build_seconds", min(times), "s", where=where, **common)
        emit("ratio_to_local", min(times) / min(local), "x", where=where, **common)


if __name__ == "__main__":
    main()
