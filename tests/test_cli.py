"""The ``h5bank`` command, run as users run it: the installed console script."""

from __future__ import annotations

import shutil
import subprocess
import sys

import h5py
import pytest

from pipeline import TypedFile


def h5bank(*args: str, cwd=None) -> subprocess.CompletedProcess:
    script = shutil.which("h5bank", path=str(__import__("pathlib").Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "pipeline.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def demo_bank(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = h5bank("demo", "--out", str(out))
    return out, result


def test_demo_builds_a_bank_on_the_embedded_default(demo_bank):
    out, result = demo_bank
    assert result.returncode == 0, result.stderr
    # The tree on stdout, the progress bar and summary on stderr.
    assert (
        "<DemoBank" in result.stdout and "images/" in result.stdout and "sounds/" in result.stdout
    )
    assert "138/138" in result.stderr
    assert "138 sources ok, 0 failed" in result.stderr
    # 138 files: "auto" builds them on threads (a cluster's start-up would cost more)
    assert "building on threads in this process (138 local files" in result.stderr
    with TypedFile(out / "demo.h5") as bank:
        assert len(bank) == 138
        assert bank.images.labels.names == ["circles", "squares", "stripes"]
        assert bank.sounds.labels.names == ["chirps", "noise", "tones"]
        assert bank.images.pixels.shape == (120, 64, 64, 3)
        assert bank.sounds.audio.attrs["sr"] == 16000


def test_demo_samples_mix_depths_and_formats(demo_bank):
    import imageio.v3 as iio

    out, _ = demo_bank
    images = sorted((out / "samples" / "images").rglob("*.*"))
    shapes = {iio.imread(p).shape[2:] for p in images}
    assert shapes == {(), (3,), (4,)}  # grayscale, RGB, RGBA
    assert {p.suffix for p in images} == {".png", ".jpg"}
    assert {p.suffix for p in (out / "samples" / "sounds").rglob("*.*")} == {".wav", ".flac"}


def test_demo_is_deterministic(demo_bank, tmp_path):
    out, _ = demo_bank
    result = h5bank("demo", "--out", str(tmp_path), "--scheduler", "threads", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "138 sources ok" in result.stdout  # --quiet prints the summary on stdout
    with h5py.File(out / "demo.h5", "r") as a, h5py.File(tmp_path / "demo.h5", "r") as b:
        for name in (
            "images/pixels/data",
            "images/labels/data",
            "sounds/audio/data",
            "__sources__/id",
        ):
            assert (a[name][:] == b[name][:]).all(), name


def test_info_prints_the_tree(demo_bank):
    out, _ = demo_bank
    result = h5bank("info", str(out / "demo.h5"))
    assert result.returncode == 0, result.stderr
    assert "138 sources" in result.stdout
    assert "pixels" in result.stdout and "(120, 64, 64, 3)" in result.stdout
    assert "sr=16000" in result.stdout


def test_ls_lists_ids_matching_a_pattern(demo_bank):
    out, _ = demo_bank
    result = h5bank("ls", str(out / "demo.h5"), "tones/*")
    assert result.returncode == 0
    ids = result.stdout.split()
    assert len(ids) == 6 and all(i.startswith("tones/") for i in ids)


def test_exit_codes(tmp_path):
    assert h5bank("--help").returncode == 0
    assert h5bank("info", "--help").returncode == 0
    assert h5bank("no-such-command").returncode == 2
    assert h5bank("info", str(tmp_path / "missing.h5")).returncode == 2  # usage: no such file
    not_hdf5 = tmp_path / "text.h5"
    not_hdf5.write_text("hello")
    result = h5bank("info", str(not_hdf5))
    assert result.returncode == 1
    assert (
        result.stderr.startswith("h5bank: error: ") and len(result.stderr.strip().splitlines()) == 1
    )
