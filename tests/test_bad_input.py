"""Bad input gets a clear error, is recorded, and loses nothing good."""

from __future__ import annotations

import io
import os

import imageio.v3 as iio
import numpy as np
import pytest
import soundfile
from conftest import write_images, write_sounds

from features import DirLabels, Image, Sound
from pipeline import DuplicateIdError, Group, SourceError, TypedFile
from pipeline.format.partial import partial_path


class Media(TypedFile):
    data = Group(images=Image(mode="RGB"), labels=DirLabels(pattern=Image.__re__))
    audio = Sound(sr=8000)


def _wav_bytes(seconds: float = 0.2) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(int(8000 * seconds), np.float32), 8000, format="WAV")
    return buffer.getvalue()


@pytest.fixture
def hostile(tmp_path):
    """Good images and sounds, with broken files among them."""
    root = tmp_path / "corpus"
    good = write_images(root / "pics", per_class=4) + write_sounds(root / "snd")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    png = iio.imwrite("<bytes>", noise, extension=".png")
    bad = {
        "pics/cats/corrupt.png": png[:16] + b"\x00garbage" * 20,  # valid signature, broken body
        "pics/cats/truncated.png": png[: len(png) // 2],
        "pics/dogs/empty.png": b"",
        "pics/dogs/page.png": b"<!DOCTYPE html><html><body>404</body></html>",
        "snd/low/truncated.wav": _wav_bytes()[:1000],
        "snd/high/empty.flac": b"",
    }
    for relative, data in bad.items():
        (root / relative).write_bytes(data)
    return root, good, bad


def test_bad_sources_are_recorded_and_good_ones_kept(hostile, tmp_path, client):
    root, good, bad = hostile
    bank = Media.create(tmp_path / "b.h5", [root], scheduler=client, progress=False)
    good_ids = sorted(os.path.relpath(p, root) for p in good)
    assert sorted(bank.ids) == good_ids
    failures = {f.id: f for f in bank.failures()}
    assert set(failures) == set(bad)
    assert bank.summary.failed == len(bad) and bank.summary.ok == len(good)
    for id_, failure in failures.items():
        expected_feature = "audio" if id_.startswith("snd/") else "data/images"
        assert failure.feature == expected_feature, failure
        assert failure.error.startswith("DecodeError: "), failure
        assert id_ in str(failure) and expected_feature in str(failure)
    assert "empty file" in failures["pics/dogs/empty.png"].error
    assert "3c 21 44 4f" in failures["pics/dogs/page.png"].error  # shows the first bytes: "<!DO"
    assert "truncated" in failures["pics/cats/truncated.png"].error
    assert "truncated" in failures["snd/low/truncated.wav"].error
    # Every good source's pixels are intact.
    for path in good:
        id_ = os.path.relpath(path, root)
        if id_.endswith(".png"):
            np.testing.assert_array_equal(bank.data.images.get(id_), iio.imread(path, mode="RGB"))


def test_on_error_raise_names_the_source_and_leaves_no_bank(hostile, tmp_path, client):
    root, _, _ = hostile
    path = tmp_path / "b.h5"
    with pytest.raises(SourceError) as caught:
        Media.create(path, [root], scheduler=client, on_error="raise", progress=False)
    error = caught.value
    assert error.id.endswith((".png", ".wav", ".flac")) and error.feature in (
        "data/images",
        "audio",
    )
    assert repr(error.id) in str(error) and error.feature in str(error)
    assert not path.exists()
    # The partial bank is there and is not mistaken for a bank.
    assert os.path.exists(partial_path(path))


def test_failed_build_resumes_after_the_bad_sources_are_fixed(hostile, tmp_path, client):
    root, good, bad = hostile
    path = tmp_path / "b.h5"
    with pytest.raises(SourceError):
        Media.create(
            path, [root], scheduler=client, on_error="raise", partition_size=2, progress=False
        )
    for relative in bad:
        os.remove(root / relative)
    bank = Media.create(path, [root], mode="a", scheduler=client, progress=False)
    assert sorted(bank.ids) == sorted(os.path.relpath(p, root) for p in good)
    assert len(set(bank.ids)) == len(bank.ids)
    assert bank.failures() == []


def test_retried_failures_are_kept_once(hostile, tmp_path, client):
    root, _, bad = hostile
    path = tmp_path / "b.h5"
    Media.create(path, [root], scheduler=client, progress=False).close()
    (root / "pics/dogs/empty.png").write_bytes(
        iio.imwrite("<bytes>", np.full((5, 5, 3), 9, np.uint8), extension=".png")
    )
    bank = Media.create(path, [root], mode="a", scheduler=client, progress=False)
    assert "pics/dogs/empty.png" in bank
    failed = [f.id for f in bank.failures()]
    assert sorted(failed) == sorted(set(bad) - {"pics/dogs/empty.png"})


def test_sources_no_feature_accepts_are_reported(tmp_path, client):
    root = tmp_path / "corpus"
    write_images(root, per_class=2)
    (root / "cats" / "README.md").write_text("hello")
    bank = Media.create(tmp_path / "b.h5", root, scheduler=client, progress=False)
    (failure,) = bank.failures()
    assert failure.id == "cats/README.md" and failure.feature == ""
    assert "no feature accepts" in failure.error and "data/images" in failure.error


def test_duplicate_ids_are_found_before_anything_is_written(tmp_path, client):
    a, b = tmp_path / "a", tmp_path / "b"
    write_images(a, per_class=2)
    write_images(b, per_class=2)  # same relative paths: cats/cats_000.png ...
    path = tmp_path / "bank.h5"
    with pytest.raises(DuplicateIdError, match=r"cats/cats_000\.png"):
        Media.create(path, [a, b], scheduler=client, progress=False)
    assert not path.exists() and not os.path.exists(partial_path(path))


def test_a_missing_path_fails_as_that_source(tmp_path, client):
    root = tmp_path / "corpus"
    paths = write_images(root, per_class=2)
    missing = str(root / "cats" / "missing.png")
    bank = Media.create(
        tmp_path / "b.h5", [*map(str, paths), missing], scheduler=client, progress=False
    )
    assert len(bank) == 4
    (failure,) = bank.failures()
    assert failure.id == missing
    assert "neither an existing file nor a URL" in failure.error


def test_shape_mismatch_fails_the_late_source_only(tmp_path, client):
    class Stereo(TypedFile):
        audio = Sound(sr=8000, mono=False)

    root = tmp_path / "snd"
    root.mkdir()
    soundfile.write(root / "a.wav", np.zeros((800, 2), np.float32), 8000)
    soundfile.write(root / "b.wav", np.zeros(800, np.float32), 8000)  # mono among stereo
    bank = Stereo.create(tmp_path / "b.h5", root, scheduler=client, progress=False)
    assert bank.ids == ["a.wav"]
    (failure,) = bank.failures()
    assert failure.id == "b.wav" and failure.feature == "audio"
    assert "trailing shape (1,) does not match the shape (2,)" in failure.error
