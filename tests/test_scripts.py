"""The first script a user writes: no ``if __name__ == "__main__":`` guard, run every way Python
runs code, on the embedded default (a local Dask cluster of worker processes).

Each way runs the same code: build a bank, map a function over it (results returned, and
results written back), compute a Dask array on :func:`pipeline.local_cluster`. It appends its
pid to ``runs.log`` first thing, so a worker process that imported the user's ``__main__``
again (what ``multiprocessing``'s spawn does by default) would show up there. Afterwards no
process of the run may be left: each run's processes carry a marker in their environment,
looked for in ``/proc``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from servers import marked_processes

CODE = """\
import os
import sys

from features import Array, DirLabels, Image
from pipeline import TypedFile, local_cluster
from pipeline.demo import make_samples

with open("runs.log", "a") as log:
    print(os.getpid(), file=log)

make_samples("samples", images_per_class=8, sounds_per_class=1)


class Photos(TypedFile):
    images = Image(size=(32, 32), mode="RGB")
    labels = DirLabels()


def brightness(data):
    return float(data["images"].mean())


bank = Photos.create("photos.h5", "samples/images/", scheduler="local", progress=False)
assert bank.summary.writer_pid != os.getpid(), "built in this process, not on a worker"
means = bank.map(brightness, inputs="images", progress=False)
bank.map(lambda d: d["images"][::2, ::2], inputs="images", output="thumbs",
         feature=Array(item=True), progress=False)
with local_cluster(n_workers=2) as client:
    workers = set(client.run(os.getpid).values())
    mean = float(bank.images.to_dask().mean().compute())
assert os.getpid() not in workers and len(workers) == 2
print("RESULT", len(bank), len(means), bank.thumbs.shape[1:], round(mean, 3), flush=True)
"""

EXPECTED = "RESULT 24 24 (16, 16, 3)"


def environment(marker: str) -> dict[str, str]:
    env = dict(os.environ, H5BANK_SCRIPT_RUN=marker)
    env.pop("PYTHONPATH", None)  # as a user's shell: only the installed package
    return env


def leftovers(marker: str) -> list[int]:
    return marked_processes("H5BANK_SCRIPT_RUN", marker)


def check_run(folder: Path, result: subprocess.CompletedProcess[str], marker: str) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert EXPECTED in result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    runs = (folder / "runs.log").read_text().split()
    assert len(runs) == 1, f"the top-level code ran {len(runs)} times: {runs}"
    deadline = time.monotonic() + 10
    while leftovers(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers(marker) == [], "processes of the run are still there"


def run(folder: Path, argv: list[str], stdin: str | None = None) -> None:
    marker = uuid.uuid4().hex
    result = subprocess.run(
        argv, cwd=folder, input=stdin, capture_output=True, text=True, timeout=600,
        env=environment(marker),
    )  # fmt: skip
    check_run(folder, result, marker)


def test_python_script_py(tmp_path):
    (tmp_path / "build.py").write_text(CODE)
    run(tmp_path, [sys.executable, "build.py"])


def test_python_dash_c(tmp_path):
    run(tmp_path, [sys.executable, "-c", CODE])


def test_python_dash_m_module(tmp_path):
    (tmp_path / "buildbank.py").write_text(CODE)
    run(tmp_path, [sys.executable, "-m", "buildbank"])


def test_piped_on_stdin(tmp_path):
    run(tmp_path, [sys.executable, "-"], stdin=CODE)


def test_a_jupyter_kernel(tmp_path):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = {
        "cells": [{"cell_type": "code", "metadata": {}, "source": CODE, "outputs": [],
                   "execution_count": None}],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                    "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5,
    }  # fmt: skip
    (tmp_path / "build.ipynb").write_text(json.dumps(notebook))
    # The kernel runs the notebook's code; its output comes back in the notebook.
    runner = (
        "import nbformat, sys\n"
        "from nbclient import NotebookClient\n"
        "nb = nbformat.read('build.ipynb', as_version=4)\n"
        "NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': '.'}}).execute()\n"
        "out = nb.cells[0].outputs\n"
        "print(''.join(o.get('text', '') for o in out if o.get('name') == 'stdout'))\n"
        "print(''.join(o.get('text', '') for o in out if o.get('name') == 'stderr'), file=sys.stderr)\n"
    )  # fmt: skip
    run(tmp_path, [sys.executable, "-c", runner])


def test_a_script_whose_cluster_cannot_start_says_what_to_do_in_one_line(tmp_path):
    code = (
        "import dask\nfrom pipeline import TypedFile\nfrom features import Array\n"
        "class Bank(TypedFile):\n    x = Array()\n"
        # worker processes that cannot start: a Python home that is not there
        "dask.config.set({'distributed.nanny.pre-spawn-environ': {'PYTHONHOME': '/nonexistent'}})\n"
        "Bank.create('b.h5', ['a', 'b'], scheduler='local', progress=False)\n"
    )
    (tmp_path / "broken.py").write_text(code)
    marker = uuid.uuid4().hex
    result = subprocess.run(
        [sys.executable, "broken.py"], cwd=tmp_path, capture_output=True, text=True,
        timeout=300, env=environment(marker),
    )  # fmt: skip
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pipeline.errors.SchedulerError: the embedded local cluster could "), (
        last
    )
    assert "scheduler='threads'" in last
    assert "distributed" not in result.stderr.replace("a Dask cluster", ""), result.stderr
