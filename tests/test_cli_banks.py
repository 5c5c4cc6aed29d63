"""``h5bank image-bank``, ``h5bank sound-bank`` and ``h5bank show``, run as users run them: the
installed console script, in a folder of the test's own, with an environment of its own (no
DASK_* settings from outside, an empty Dask config folder)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import imageio.v3 as iio
import numpy as np
import pytest
import soundfile
from conftest import assert_same_contents, write_images, write_sounds
from PIL import Image as PILImage

from features import Image, Sound
from pipeline import TypedFile
from pipeline.format import layout

COMMANDS = ("image-bank", "sound-bank", "show")


@pytest.fixture
def run(tmp_path, env):
    """``run("image-bank", ...)``: the console script, in ``tmp_path``."""

    def run(*args: object) -> subprocess.CompletedProcess:
        script = shutil.which("h5bank", path=str(Path(sys.executable).parent))
        command = [script] if script else [sys.executable, "-m", "pipeline.cli"]
        return subprocess.run(
            [*command, *map(str, args)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=300,
        )

    return run


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def photos(tmp_path) -> Path:
    """``photos/``: 12 PNGs (RGB, RGBA, grayscale; 16 to 40 px) in ``cats/`` and ``dogs/``,
    a JPEG in ``dogs/``, and files that are not images (left out of the bank)."""
    root = tmp_path / "photos"
    write_images(root)
    rng = np.random.default_rng(5)
    iio.imwrite(root / "dogs" / "snapshot.JPG", rng.integers(0, 256, (30, 20, 3), np.uint8),
                extension=".jpg")  # fmt: skip
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("# photos")
    return root


def image_files(root: Path) -> dict[str, Path]:
    return {
        p.relative_to(root).as_posix(): p
        for p in root.rglob("*")
        if p.suffix.lower() in (".png", ".jpg")
    }


# -- image-bank ----------------------------------------------------------------------------


def test_image_bank_holds_every_image_in_its_shape_labelled_by_folder(photos, tmp_path, run):
    result = run("image-bank", "photos", "photos.h5", "--scheduler", "threads")
    assert result.returncode == 0, result.stderr
    assert "13 sources ok, 0 failed" in result.stderr  # the summary, under the progress bar
    assert result.stdout.startswith(f"<ImageBank {'photos.h5'!r}: 13 sources, 0 failed")
    files = image_files(photos)
    assert len(files) == 13
    with TypedFile(tmp_path / "photos.h5") as bank:
        assert sorted(bank.ids) == sorted(files)  # every image; notes.txt and README.md not
        assert bank.labels.names == ["cats", "dogs"]
        assert bank.images.storage == "flat"  # no --size: each image in its own shape
        for id_, path in files.items():
            expected = iio.imread(path)
            np.testing.assert_array_equal(bank.images.get(id_), expected, err_msg=id_)
            assert bank.labels.names[bank.labels.get(id_)] == id_.split("/")[0]
        assert {bank.images.get(i).ndim for i in files} == {2, 3}  # mixed depths kept


def test_size_mode_and_compression_take_effect(photos, tmp_path, run):
    result = run("image-bank", "photos", "small.h5", "--size", "8x12", "--mode", "RGB",
                 "--compression", "gzip-4", "--scheduler", "threads", "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""  # --quiet, and nothing failed
    with TypedFile(tmp_path / "small.h5") as bank:
        assert bank.images.shape == (13, 8, 12, 3)
        expected = Image(size=(8, 12), mode="RGB").decode(
            (photos / "cats" / "cats_001.png").read_bytes(), "cats_001.png"
        )
        np.testing.assert_array_equal(bank.images.get("cats/cats_001.png"), expected)
    with h5py.File(tmp_path / "small.h5", "r") as f:
        data = f["images/data"]
        assert (data.compression, data.compression_opts) == ("gzip", 4)
        assert f["labels/data"].compression is None  # the option is the images' only
        assert f["images"].attrs["draft"]  # large JPEGs decoded at reduced scale: the default

    result = run("image-bank", "photos", "gray.h5", "--size", "10", "--mode", "l", "--exact",
                 "--compression", "lzf", "--scheduler", "threads", "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    with TypedFile(tmp_path / "gray.h5") as bank:
        row = bank.index("dogs/snapshot.JPG")
    with h5py.File(tmp_path / "gray.h5", "r") as f:
        assert f["images/data"].shape == (13, 10, 10)
        assert f["images/data"].compression == "lzf"
        assert f["images"].attrs["mode"] == "L"
        assert not f["images"].attrs["draft"]
        exact = Image(size=(10, 10), mode="L", draft=False).decode(
            (photos / "dogs" / "snapshot.JPG").read_bytes(), "snapshot.JPG"
        )  # 30 x 20 px: twice 10 x 10, so the default would have drafted it
        np.testing.assert_array_equal(f["images/data"][row], exact)


def test_a_plugin_filter_compresses_and_show_reads_it_back(photos, tmp_path, run):
    hdf5plugin = pytest.importorskip("hdf5plugin")
    result = run("image-bank", "photos", "z.h5", "--size", "16", "--mode", "RGB",
                 "--compression", "zstd-5", "--scheduler", "threads", "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    with h5py.File(tmp_path / "z.h5", "r") as f:
        plist = f["images/data"].id.get_create_plist()
        filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
        assert hdf5plugin.ZSTD_ID in filters
    # A new process reads zstd data only with hdf5plugin's filters registered.
    result = run("show", "z.h5", "cats/cats_000.png", "--out", "z.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "z.png").stat().st_size > 0


def test_image_bank_on_the_embedded_local_cluster_equals_the_threaded_build(photos, tmp_path, run):
    # The bank type is made on the fly; its decode tasks run in worker processes. The default
    # ("auto") builds a folder's 13 listed files on threads, as it would the folder itself.
    local = run("image-bank", "photos", "local.h5", "--size", "16x16", "--mode", "RGBA",
                "--scheduler", "local")  # fmt: skip
    assert local.returncode == 0, local.stderr
    assert "dashboard" in local.stderr  # a distributed cluster ran it
    auto = run("image-bank", "photos", "auto.h5", "--size", "16x16", "--mode", "RGBA")
    assert auto.returncode == 0, auto.stderr
    assert "building on threads in this process (13 local files" in auto.stderr
    threads = run("image-bank", "photos", "threads.h5", "--size", "16x16", "--mode", "RGBA",
                  "--scheduler", "threads", "--quiet")  # fmt: skip
    assert threads.returncode == 0, threads.stderr
    assert_same_contents(tmp_path / "local.h5", tmp_path / "threads.h5")


def test_an_existing_bank_is_kept_unless_overwrite_and_resume_adds_files(photos, tmp_path, run):
    assert run("image-bank", "photos", "p.h5", "--scheduler", "threads", "--quiet").returncode == 0
    before = (tmp_path / "p.h5").read_bytes()
    result = run("image-bank", "photos", "p.h5", "--scheduler", "threads")
    assert result.returncode == 1
    assert error_line(result) == (
        f"h5bank: error: FileExistsError: {tmp_path / 'p.h5'} exists: --resume adds the "
        "sources it lacks, --overwrite builds it again"
    )
    assert (tmp_path / "p.h5").read_bytes() == before

    iio.imwrite(photos / "cats" / "new.png", np.zeros((9, 9, 3), np.uint8))
    result = run("image-bank", "photos", "p.h5", "--scheduler", "threads", "--resume")
    assert result.returncode == 0, result.stderr
    assert "1 sources ok, 0 failed, 13 already in the bank; 14 in the bank" in result.stderr
    result = run("image-bank", "photos", "p.h5", "--scheduler", "threads", "--overwrite",
                 "--size", "4", "--mode", "L", "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    with TypedFile(tmp_path / "p.h5") as bank:
        assert bank.images.shape == (14, 4, 4)


def test_image_bank_usage_errors_exit_2_and_failures_exit_1(photos, tmp_path, run):
    result = run("image-bank", "missing", "x.h5")
    assert result.returncode == 2 and "'missing' does not exist" in result.stderr
    for option, value, says in [
        ("--size", "12xq", "give HxW"),
        ("--size", "0x4", "at least 1"),
        ("--mode", "CMYK", "'CMYK' is not one of"),
        ("--compression", "gzip-12", "gzip takes a level from 0 to 9"),
        ("--compression", "brotli", "use one of none, gzip, lzf"),
    ]:
        result = run("image-bank", "photos", "x.h5", option, value)
        assert result.returncode == 2, (option, value, result.stderr)
        assert says in result.stderr, (option, value, result.stderr)
    result = run("image-bank", "photos", "x.h5", "--resume", "--overwrite")
    assert result.returncode == 2 and "exclude each other" in result.stderr

    (tmp_path / "empty" / "cats").mkdir(parents=True)
    (tmp_path / "empty" / "cats" / "a.txt").write_text("no image here")
    result = run("image-bank", "empty", "x.h5", "--scheduler", "threads")
    assert result.returncode == 1
    assert error_line(result).startswith(
        "h5bank: error: FileNotFoundError: empty holds no image files"
    )
    assert not (tmp_path / "x.h5").exists()


def test_image_bank_of_a_url_folder(tmp_path):
    """DIR may be an fsspec URL (memory:// files exist in this process only: run the command
    in it, on the threaded scheduler)."""
    import fsspec
    from click.testing import CliRunner

    from pipeline.cli import main

    fs = fsspec.filesystem("memory")
    for name in ("cats/a.png", "dogs/b.png", "dogs/c.txt"):
        with fs.open(f"/cli-url/{name}", "wb") as f:
            f.write(iio.imwrite("<bytes>", np.full((5, 7, 3), 40, np.uint8), extension=".png"))
    try:
        out = tmp_path / "url.h5"
        result = CliRunner().invoke(
            main, ["image-bank", "memory://cli-url", str(out), "--scheduler", "threads", "--quiet"]
        )
        assert result.exit_code == 0, result.output
        with TypedFile(out) as bank:
            assert bank.ids == ["memory://cli-url/cats/a.png", "memory://cli-url/dogs/b.png"]
            assert bank.labels.names == ["cats", "dogs"]
    finally:
        fs.rm("/cli-url", recursive=True)


# -- sound-bank ----------------------------------------------------------------------------


@pytest.fixture
def recordings(tmp_path) -> Path:
    """``recordings/``: WAV and FLAC files in ``low/`` and ``high/`` (mono WAVs at 8 kHz,
    stereo FLACs at 16 kHz), and a text file."""
    root = tmp_path / "recordings"
    write_sounds(root, per_class=3)
    (root / "low" / "notes.txt").write_text("not a sound")
    return root


def test_sound_bank_resamples_to_sr_in_mono_labelled_by_folder(recordings, tmp_path, run):
    result = run("sound-bank", "recordings", "s.h5", "--sr", "11025", "--scheduler", "threads")
    assert result.returncode == 0, result.stderr
    assert "6 sources ok, 0 failed" in result.stderr
    assert result.stdout.startswith("<SoundBank 's.h5': 6 sources, 0 failed")
    files = {p.relative_to(recordings).as_posix(): p for p in recordings.rglob("*.*")}
    files.pop("low/notes.txt")
    mono = Sound(sr=11025, mono=True)
    with TypedFile(tmp_path / "s.h5") as bank:
        assert sorted(bank.ids) == sorted(files)
        assert bank.sound.attrs["sr"] == 11025 and bool(bank.sound.attrs["mono"]) is True
        assert bank.labels.names == ["high", "low"]
        for id_, path in files.items():
            audio = bank.sound.get(id_)
            assert audio.ndim == 1, id_
            np.testing.assert_array_equal(
                audio, mono.from_stored(mono.decode(path.read_bytes(), id_))
            )
            expected_seconds = soundfile.info(path).duration
            assert len(audio) == pytest.approx(expected_seconds * 11025, abs=1)
            assert bank.labels.names[bank.labels.get(id_)] == id_.split("/")[0]


def test_sound_bank_stereo_keeps_the_channels(recordings, tmp_path, run):
    stereo = tmp_path / "stereo"
    for path in recordings.rglob("*.flac"):  # write_sounds' stereo files
        target = stereo / path.relative_to(recordings)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    result = run("sound-bank", "stereo", "st.h5", "--stereo", "--sr", "8000",
                 "--compression", "gzip", "--scheduler", "threads", "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    with TypedFile(tmp_path / "st.h5") as bank:
        assert bank.sound.shape[1:] == (2,) and bool(bank.sound.attrs["mono"]) is False
        for id_ in bank.ids:
            data, _ = soundfile.read(stereo / id_, always_2d=True)
            audio = bank.sound.get(id_)
            assert audio.shape == (pytest.approx(len(data) / 2, abs=1), 2)  # 16 kHz to 8 kHz
            assert not np.allclose(audio[:, 0], audio[:, 1])  # two channels, not one copied
    with h5py.File(tmp_path / "st.h5", "r") as f:
        assert f["sound/data"].compression == "gzip"

    # Mono files cannot join stereo ones: they fail as sources, and --quiet says so.
    result = run("sound-bank", "recordings", "mixed.h5", "--stereo", "--scheduler", "threads",
                 "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert error_line(result).startswith("h5bank: warning: ")
    with TypedFile(tmp_path / "mixed.h5") as bank:
        assert len(bank) + len(bank.failures()) == 6
        assert bank.failures() and all("shape" in f.error for f in bank.failures())


def test_sound_bank_usage_errors(recordings, run):
    for args, says in [
        (("--sr", "0"), "0 is not in the range x>=1"),
        (("--sr", "fast"), "'fast' is not a valid integer"),
        (("--mono", "--bogus"), "No such option"),
    ]:
        result = run("sound-bank", "recordings", "x.h5", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert says in result.stderr, (args, result.stderr)


# -- show ----------------------------------------------------------------------------------


@pytest.fixture
def both(photos, recordings, run, tmp_path) -> tuple[Path, Path]:
    """An image bank and a sound bank, built by the commands."""
    for command, folder, bank in [
        ("image-bank", "photos", "img.h5"),
        ("sound-bank", "recordings", "snd.h5"),
    ]:
        result = run(command, folder, bank, "--scheduler", "threads", "--quiet")
        assert result.returncode == 0, result.stderr
    return tmp_path / "img.h5", tmp_path / "snd.h5"


def opened(path: Path) -> tuple[str, tuple[int, int]]:
    with PILImage.open(path) as image:
        image.load()
        return image.format, image.size


def test_show_writes_an_image_sources_thumbnail_named_after_its_id(both, tmp_path, run):
    result = run("show", "img.h5", "cats/cats_002.png")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "cats_cats_002.png.png\n"  # the path written, alone on stdout
    assert result.stderr == "h5bank: plotting images (Image) of 'cats/cats_002.png'\n"
    fmt, (width, height) = opened(tmp_path / "cats_cats_002.png.png")
    assert fmt == "PNG" and width > 100 and height > 100


def test_show_writes_a_sounds_waveform_where_out_says(both, tmp_path, run):
    result = run("show", "snd.h5", "high/high_01.flac", "--out", "plots/wave.png")
    assert result.returncode == 1  # plots/ does not exist
    (tmp_path / "plots").mkdir()
    result = run("show", "snd.h5", "high/high_01.flac", "--out", "plots/wave.png",
                 "--feature", "sound")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "plots/wave.png\n"
    fmt, (width, height) = opened(tmp_path / "plots" / "wave.png")
    assert fmt == "PNG" and width > 2 * height  # one wide row: a waveform, not a thumbnail

    import matplotlib.image

    pdf = run("show", "snd.h5", "low/low_00.wav", "--out", "wave.pdf")
    assert pdf.returncode == 0, pdf.stderr
    assert (tmp_path / "wave.pdf").read_bytes().startswith(b"%PDF")
    assert matplotlib.image.imread(tmp_path / "plots" / "wave.png").ndim == 3


def test_show_an_unknown_id_names_similar_ones(both, run):
    result = run("show", "img.h5", "cats/cats_2.png")
    assert result.returncode == 1
    line = error_line(result)
    assert line.startswith("h5bank: error: UnknownIdError: no source 'cats/cats_2.png' in ")
    assert "similar ids: 'cats/cats_002.png'" in line
    result = run("show", "img.h5", "zzz")
    assert "ids look like 'cats/cats_000.png'" in error_line(result)


def test_show_usage_errors(both, run, tmp_path):
    for args, says in [
        (("--feature", "labels"), "'labels': DirLabels cannot plot; features that plot: images"),
        (("--feature", "nope"), "'nope': no feature; features that plot: images"),
        (("--out", "x.xyz"), "the extension says the format"),
        ((), None),
    ]:
        result = run("show", "img.h5", *(("cats/cats_000.png", *args) if args else ()))
        assert result.returncode == 2, (args, result.stderr)
        assert says is None or says in result.stderr, (args, result.stderr)
    assert run("show", tmp_path / "missing.h5", "a").returncode == 2


def test_show_says_when_the_source_has_no_data_to_plot(both, tmp_path, run):
    with TypedFile(tmp_path / "img.h5", mode="r+") as bank:
        bank.labels.add("cats/extra", "cats")  # a source with a label and no image
    result = run("show", "img.h5", "cats/extra")
    assert result.returncode == 1
    assert "has no data in a feature that plots" in error_line(result)


# -- every command -------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, run):
    result = run(command, "--help")
    assert result.returncode == 0 and f"Usage: h5bank {command}" in result.stdout


def test_a_closed_pipe_ends_ls_quietly(tmp_path, env):
    """``h5bank ls BANK | head`` stops when head does, without an error of its own."""
    from features import DirLabels

    class Ids(TypedFile):
        labels = DirLabels()

    ids = [f"folder/source-{i:06d}" for i in range(20_000)]  # plain ids: labels need no bytes
    Ids.create(tmp_path / "ids.h5", ids, scheduler="threads", progress=False).close()
    script = shutil.which("h5bank", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "pipeline.cli"]
    process = subprocess.Popen(
        [*command, "ls", "ids.h5"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout.readline() == b"folder/source-000000\n"
    process.stdout.close()  # far more than a pipe's buffer is still to come
    _, stderr = process.communicate(timeout=300)
    assert stderr == b""
    assert process.returncode == 1


def test_layout_reads_back_what_image_bank_wrote(photos, tmp_path, run):
    """The bank is a finished h5bank bank that plain h5py reads."""
    assert run("image-bank", "photos", "v.h5", "--scheduler", "threads", "--quiet").returncode == 0
    assert run("verify", "v.h5", "--data").returncode == 0
    with h5py.File(tmp_path / "v.h5", "r") as f:
        assert layout.state(f) == layout.COMPLETE
