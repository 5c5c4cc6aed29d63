"""The wheel ships both packages, the console script and h5bank's default config."""

from __future__ import annotations

import subprocess
import sys
import zipfile


def test_wheel_contents_and_packaged_config(tmp_path):
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(repo),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("h5bank-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "h5bank = pipeline.cli:main" in archive.read(entry_points).decode()
        archive.extractall(tmp_path / "unpacked")
    for required in (
        "pipeline/__init__.py",
        "features/__init__.py",
        "pipeline/configs/h5bank.yaml",
        "pipeline/configs/local-cluster.yaml",
        "pipeline/configs/jobqueue.yaml",
    ):
        assert required in names, required
    assert not any(n.startswith("tests/") for n in names)
    # Imported from the unpacked wheel (not the source tree), the defaults still load.
    code = (
        "import pipeline, dask.config; from pipeline import config; "
        "print(config.defaults_file()); print(dask.config.get('h5bank.build.chunk-bytes')); "
        "print(config.defaults_file('jobqueue.yaml')); config.load_jobqueue_defaults(); "
        "print(dask.config.get('jobqueue.slurm.cores')); "
        "print(config.defaults_file('local-cluster.yaml')); "
        "print(dask.config.get('h5bank.local-cluster.threads-per-worker'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "unpacked"), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    where, chunk, jobqueue, cores, local, threads = result.stdout.split()
    configs = tmp_path / "unpacked" / "pipeline" / "configs"
    assert where == str(configs / "h5bank.yaml")
    assert chunk == "1048576"
    assert jobqueue == str(configs / "jobqueue.yaml")
    assert cores == "1"  # h5bank's default, over dask-jobqueue's unset cores
    assert local == str(configs / "local-cluster.yaml")
    assert threads == "1"
