"""Features: how one source becomes arrays, alone and end to end through a bank."""

from __future__ import annotations

import io
import json
import re

import hdf5plugin
import imageio.v3 as iio
import numpy as np
import pytest
import soundfile
from conftest import write_images
from PIL import Image as PILImage

import features
from features import Array, Bytes, DecodeError, DirLabels, Feature, Image, Sound, String
from features.sound import to_float
from pipeline import TypedFile
from pipeline.sources import Source, SourceSpec


def source_of(path, id_=None) -> Source:
    """A source as a build hands it to ``Feature.load``: an id, a URL, bytes fetched once."""
    return Source(SourceSpec(id_ or path.name, str(path)))


def png_bytes(array: np.ndarray) -> bytes:
    return iio.imwrite("<bytes>", array, extension=".png")


def jpeg_bytes(array: np.ndarray) -> bytes:
    return iio.imwrite("<bytes>", array, extension=".jpg")


def sound_bytes(audio: np.ndarray, sr: int, format: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, sr, format=format)
    return buffer.getvalue()


@pytest.fixture
def rgb():
    return np.random.default_rng(7).integers(0, 256, size=(10, 12, 3), dtype=np.uint8)


@pytest.fixture
def stereo():
    """0.2 s of stereo noise at 8 kHz, with distinct channels."""
    rng = np.random.default_rng(3)
    return np.stack([rng.uniform(-0.5, 0.5, 1600), rng.uniform(-0.1, 0.1, 1600)], axis=1)


# -- Image ---------------------------------------------------------------------


def test_image_decodes_png_bytes_exactly(rgb):
    np.testing.assert_array_equal(Image().decode(png_bytes(rgb), "a.png"), rgb)


def png_in(mode: str, rgb: np.ndarray) -> bytes:
    """``rgb`` saved as a PNG of Pillow ``mode`` (``I;16``: 16-bit gray; ``P+t``: a palette with
    a transparent entry)."""
    image = PILImage.fromarray(rgb)
    if mode == "I;16":
        image = PILImage.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    elif mode != "RGB":
        image = image.convert(mode.split("+")[0])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **({"transparency": 3} if mode == "P+t" else {}))
    return buffer.getvalue()


@pytest.mark.parametrize("stored", ["RGB", "RGBA", "L", "LA", "P", "P+t", "1", "I;16"])
def test_pngs_of_every_mode_decode_to_imageios_pixels(rgb, stored):
    """PNGs are read by Pillow alone (a third of a small PNG's decode was imageio's), with
    imageio's conversions: the same pixels, dtype and shape, whatever mode each side has."""
    data = png_in(stored, rgb)
    for mode in (None, "L", "LA", "RGB", "RGBA"):
        expected = iio.imread(data, mode=mode, extension=".png")
        decoded = Image(mode=mode).decode(data, "a.png")
        assert (decoded.dtype, decoded.shape) == (expected.dtype, expected.shape), (mode, stored)
        np.testing.assert_array_equal(decoded, expected)
        resized = Image(size=(5, 7), mode=mode).decode(data, "a.png")
        with PILImage.fromarray(expected) as image:
            small = np.asarray(image.resize((7, 5), PILImage.Resampling.BILINEAR))
        np.testing.assert_array_equal(resized, small)


def test_decoded_images_are_writable_arrays_of_their_own(rgb):
    """Pillow's JPEG and PNG paths give new writable arrays, as imageio's plugin did: a
    derived feature or a user may change them in place."""
    for data, name in (
        (png_bytes(rgb), "a.png"),
        (jpeg_bytes(rgb), "a.jpg"),
        (photo(300, 260), "p.jpg"),
    ):
        for feature in (Image(), Image(mode="L"), Image(size=(5, 7), mode="RGB")):
            image = feature.decode(data, name)
            assert image.flags.writeable and image.flags.owndata, (name, feature.attrs)
            image[...] = 0


def test_image_decodes_jpeg_bytes(rgb):
    data = jpeg_bytes(rgb)
    decoded = Image().decode(data, "a.jpg")
    assert decoded.shape == (10, 12, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, iio.imread(data))


def test_a_jpeg_saved_with_a_png_name_still_decodes(rgb):
    data = jpeg_bytes(rgb)
    np.testing.assert_array_equal(Image().decode(data, "photos/liar.png"), iio.imread(data))


def photo(height: int, width: int) -> bytes:
    """A smooth photo-like JPEG (a gradient, a disc, noise), where reduced-scale decoding is
    close to a full decode."""
    rng = np.random.default_rng(height * width)
    y, x = np.mgrid[0:height, 0:width]
    disc = ((y - height / 2) ** 2 + (x - width / 3) ** 2 < (height / 4) ** 2) * 90
    base = np.stack([x * 200 / width, y * 200 / height, 60 + disc], axis=2)
    pixels = (base + rng.normal(0, 4, base.shape)).clip(0, 255).astype(np.uint8)
    return jpeg_bytes(pixels)


def full_decode_and_resize(data: bytes, size: tuple[int, int], mode: str = "RGB") -> np.ndarray:
    with PILImage.open(io.BytesIO(data)) as image:
        resized = image.convert(mode).resize(size[::-1], PILImage.Resampling.BILINEAR)
    return np.asarray(resized)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_jpeg_twice_the_size_is_drafted_close_to_a_full_decode(mode):
    data = photo(300, 260)  # at least twice (96, 128) on both sides: decoded at 1/2 scale
    fast = Image(size=(96, 128), mode=mode).decode(data, "p.jpg")
    exact = Image(size=(96, 128), mode=mode, draft=False).decode(data, "p.jpg")
    np.testing.assert_array_equal(exact, full_decode_and_resize(data, (96, 128), mode))
    assert fast.shape == exact.shape == ((96, 128, 3) if mode == "RGB" else (96, 128))
    difference = np.abs(fast.astype(int) - exact.astype(int))
    assert 0 < difference.mean() < 2 and difference.max() < 64


def test_a_jpeg_under_twice_the_size_is_decoded_in_full_whatever_draft_says():
    data = photo(300, 250)  # 250 < 2 x 128: no reduced scale applies
    fast = Image(size=(96, 128), mode="RGB").decode(data, "p.jpg")
    np.testing.assert_array_equal(fast, full_decode_and_resize(data, (96, 128)))


def test_a_jpeg_without_size_is_decoded_in_full():
    data = photo(300, 300)
    np.testing.assert_array_equal(Image(mode="RGB").decode(data, "p.jpg"), iio.imread(data))


def test_a_jpeg_declaring_too_many_pixels_is_refused_from_its_header():
    data = bytearray(photo(64, 64))
    sof = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    data[sof + 5 : sof + 9] = (12000).to_bytes(2, "big") * 2
    with pytest.raises(DecodeError, match="declares 12000 x 12000 = 144,000,000 pixels"):
        Image(size=(64, 64)).decode(bytes(data), "bomb.jpg")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_image_mode_converts_mixed_depth_files_like_imageio(images, mode):
    # The folder cycles RGB, RGBA and grayscale files.
    paths = sorted(images.glob("cats/*.png"))[:3]
    assert {iio.imread(p).ndim for p in paths} == {2, 3}
    feature = Image(mode=mode)
    for path in paths:
        decoded = feature.decode(path.read_bytes(), path.name)
        np.testing.assert_array_equal(decoded, iio.imread(path, mode=mode))


def test_image_without_mode_keeps_each_files_own_mode(images):
    for path in sorted(images.glob("dogs/*.png"))[:3]:
        np.testing.assert_array_equal(Image().load(source_of(path)), iio.imread(path))


@pytest.mark.parametrize(("mode", "channels"), [("RGB", (3,)), ("RGBA", (4,)), ("L", ())])
def test_image_size_resizes_to_height_width_and_stores_items(images, mode, channels):
    feature = Image(size=(9, 14), mode=mode)
    assert feature.storage == "item"
    assert feature.attrs == {"size": [9, 14], "mode": mode, "draft": True}
    for path in sorted(images.glob("cats/*.png"))[:3]:
        assert feature.decode(path.read_bytes(), path.name).shape == (9, 14, *channels)


def test_image_without_size_is_stored_flat():
    assert Image().storage == "flat"
    assert Image(mode="RGB").attrs == {"size": None, "mode": "RGB"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "CMYK"},
        {"mode": "rgb"},
        {"size": (0, 10)},
        {"size": (10,)},
        {"size": (10, 10, 3)},
        {"resample": "smooth"},
    ],
)
def test_invalid_image_parameters_raise_value_error(kwargs):
    with pytest.raises(ValueError, match="Image"):
        Image(**kwargs)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_image_load_of_an_array_converts_mode_and_resizes(rgb, mode):
    """A derived image feature receives its base's array, not a source."""
    derived = Image(size=(5, 6), mode=mode)
    expected = np.asarray(
        PILImage.fromarray(rgb).convert(mode).resize((6, 5), PILImage.Resampling.BILINEAR)
    )
    result = derived.load(rgb)
    assert result.shape[:2] == (5, 6)
    np.testing.assert_array_equal(result, expected)


def test_image_load_of_an_array_without_parameters_returns_it(rgb):
    np.testing.assert_array_equal(Image().load(rgb), rgb)


@pytest.mark.parametrize(
    ("data", "name", "message"),
    [
        (b"garbage!" * 8, "cats/01.png", "first bytes: 67 61 72 62 61 67 65 21"),
        (b"<html>not found</html>\n", "cats/01.txt", "first bytes: 3c 68 74 6d"),
        (b"", "cats/01.png", "empty"),
        (png_bytes(np.zeros((64, 64, 3), np.uint8) + 7)[:60], "cats/01.png", "truncated"),
    ],
    ids=["garbage", "text", "empty", "truncated"],
)
def test_image_decode_errors_say_what_was_found(data, name, message):
    with pytest.raises(DecodeError, match=re.escape(message)):
        Image().decode(data, name)


def test_a_png_cut_in_half_is_reported_as_truncated():
    rng = np.random.default_rng(0)
    data = png_bytes(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8))
    with pytest.raises(DecodeError, match="truncated"):
        Image().decode(data[: len(data) // 2], "half.png")


def test_decode_error_is_a_value_error_and_an_h5bank_error():
    assert issubclass(DecodeError, ValueError)
    assert issubclass(DecodeError, features.H5BankError)


# -- Sound ---------------------------------------------------------------------


@pytest.mark.parametrize("format", ["WAV", "FLAC"])
def test_sound_averages_channels_into_mono(stereo, format):
    data = sound_bytes(stereo, 8000, format)
    expected, _ = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    feature = Sound(sr=8000)
    decoded = feature.decode(data, f"a.{format.lower()}")
    assert decoded.shape == (1600,) and decoded.dtype == np.int16  # as the 16-bit file holds it
    read = feature.from_stored(decoded)
    assert read.dtype == np.float32  # reads are floats; the mean is rounded to 16 bits
    np.testing.assert_allclose(read, expected.mean(axis=1), rtol=0, atol=0.5 / 32768 + 1e-7)
    exact = Sound(sr=8000, native=False).decode(data, "a.wav")
    assert exact.dtype == np.float32
    np.testing.assert_allclose(exact, expected.mean(axis=1), rtol=0, atol=1e-7)


@pytest.mark.parametrize("format", ["WAV", "FLAC"])
def test_sound_keeps_stereo_with_mono_false(stereo, format):
    data = sound_bytes(stereo, 8000, format)
    expected, _ = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    feature = Sound(sr=8000, mono=False)
    decoded = feature.decode(data)
    assert decoded.shape == (1600, 2) and decoded.dtype == np.int16
    np.testing.assert_array_equal(feature.from_stored(decoded), expected)  # bit for bit
    np.testing.assert_array_equal(Sound(sr=8000, mono=False, native=False).decode(data), expected)


@pytest.mark.parametrize(("sr", "length"), [(16000, 3200), (4000, 800), (22050, 4410)])
def test_sound_resamples_to_sr_in_proportion(stereo, sr, length):
    decoded = Sound(sr=sr, mono=False).decode(sound_bytes(stereo, 8000), "a.wav")
    assert decoded.shape == (length, 2)


def test_sound_attrs_record_the_sample_rate():
    assert Sound(sr=11025).attrs == {"sr": 11025, "mono": True}
    assert Sound(sr=8000, mono=False).attrs["mono"] is False


def test_sound_files_of_the_fixture_decode_like_soundfile(sounds):
    for path in sorted(sounds.rglob("*.*")):
        native, sr = soundfile.read(path, dtype="float32", always_2d=True)
        feature = Sound(sr=sr)
        decoded = feature.from_stored(feature.load(source_of(path)))
        np.testing.assert_allclose(decoded, native.mean(axis=1), rtol=0, atol=0.5 / 32768 + 1e-7)


def test_a_truncated_wav_is_refused_when_strict_and_decoded_when_not(stereo):
    data = sound_bytes(stereo, 8000)
    half = data[: len(data) // 2]
    with pytest.raises(DecodeError, match="truncated"):
        Sound(sr=8000).decode(half, "cut.wav")
    partial = Sound(sr=8000, strict=False).decode(half, "cut.wav")
    assert 0 < len(partial) < 1600
    full = Sound(sr=8000).decode(data, "cut.wav")
    np.testing.assert_array_equal(partial, full[: len(partial)])


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"this is not audio at all", "first bytes: 74 68 69 73"), (b"", "empty")],
)
def test_sound_decode_errors(data, message):
    with pytest.raises(DecodeError, match=message):
        Sound().decode(data, "a.wav")


@pytest.mark.parametrize("kwargs", [{"sr": 0}, {"sr": -8000}, {"dtype": "int16"}])
def test_invalid_sound_parameters_raise_value_error(kwargs):
    with pytest.raises(ValueError, match="Sound"):
        Sound(**kwargs)


# -- Array ---------------------------------------------------------------------


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "array",
    [np.arange(12, dtype=np.int16).reshape(3, 4), np.linspace(0, 1, 5), np.array(3.5)],
)
def test_array_round_trips_npy_bytes(array):
    decoded = Array().decode(npy_bytes(array), "a.npy")
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


def test_array_dtype_casts_files_and_derived_arrays(tmp_path):
    path = tmp_path / "steps.npy"
    np.save(path, np.arange(6, dtype=np.int64))
    loaded = Array(dtype="float32").load(source_of(path))
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, np.arange(6))
    assert Array(dtype="int8").load(np.ones(3)).dtype == np.int8


def test_array_storage_is_rows_unless_flat():
    assert Array().storage == "rows"
    assert Array(flat=True).storage == "flat"
    assert Array(flat=True, dtype=float).attrs == {"flat": True, "dtype": "float64"}


@pytest.mark.parametrize(
    "data",
    [b"not an array, just text", b"", npy_bytes(np.array([{"a": 1}], dtype=object))],
    ids=["text", "empty", "pickled-objects"],
)
def test_array_refuses_what_is_not_a_plain_npy(data):
    with pytest.raises(DecodeError, match=r"not a \.npy|empty"):
        Array().decode(data, "a.npy")


# -- DirLabels -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("id_", "label"),
    [
        ("cats/01.png", "cats"),
        ("train/dogs/02.png", "dogs"),
        ("/data/train/birds/03.png", "birds"),
        ("s3://b/train/cats/1.png", "cats"),
        ("https://example.com/set/dogs/2.jpg?sig=abc", "dogs"),
        ("memory://data/cats/1.png", "cats"),
        ("C:\\photos\\owls\\1.png", "owls"),
        ("01.png", None),
        ("/01.png", None),
        ("memory://01.png", None),
        ("run-0042", None),
    ],
)
def test_dir_labels_name_the_parent_folder(id_, label):
    # Only the id matters: a plain id with no bytes behind it is fine.
    assert DirLabels().load(Source(SourceSpec(id_, None))) == label


def test_dir_labels_never_read_bytes():
    labels = DirLabels()
    assert labels.reads_bytes is False
    assert labels.storage == "category"
    assert Image.reads_bytes is True


# -- String and Bytes ----------------------------------------------------------


def test_string_decodes_utf8_and_reads_back_str(tmp_path):
    path = tmp_path / "note.txt"
    path.write_text("héllo, wörld ✓", encoding="utf-8")
    feature = String()
    text = feature.load(source_of(path))
    assert text == "héllo, wörld ✓"
    stored = feature.from_stored(text.encode("utf-8"))
    assert isinstance(stored, str) and stored == text


def test_string_with_another_encoding_is_stored_as_utf8():
    feature = String(encoding="latin-1")
    assert feature.decode("café".encode("latin-1")) == "café"
    assert feature.attrs == {"encoding": "utf-8"}


def test_string_refuses_bad_utf8():
    with pytest.raises(DecodeError, match="not utf-8 text"):
        String().decode(b"caf\xe9 \xff\xfe")


def test_bytes_keeps_the_original_encoding_and_decodes_on_read(images):
    path = sorted(images.glob("cats/*.png"))[1]  # an RGBA file
    data = path.read_bytes()
    loaded = Bytes().load(source_of(path))
    assert loaded == data
    assert Bytes().from_stored(data) == data
    decoded = Bytes(decoder=Image(mode="RGB")).from_stored(data, path.name)
    np.testing.assert_array_equal(decoded, iio.imread(path, mode="RGB"))


def test_bytes_refuses_an_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(DecodeError, match="empty"):
        Bytes().load(source_of(path))


# -- the Feature contract ------------------------------------------------------


def test_pattern_overrides_the_class_pattern():
    assert Image().accepts("cats/01.PNG")
    assert not Image().accepts("cats/01.dat")
    custom = Image(pattern=r"\.dat$")
    assert custom.accepts("cats/01.dat")
    assert not custom.accepts("cats/01.png")
    assert Image.__re__ != custom.__re__  # the class is untouched
    assert Feature(pattern="").accepts("anything at all")


def test_an_invalid_pattern_is_refused_when_the_feature_is_made():
    with pytest.raises(re.error):
        Image(pattern="(unclosed")


class Gzipped(Array):
    __ds_kwargs__ = {"compression": "gzip", "compression_opts": 4}


def test_dataset_options_merge_class_defaults_with_constructor_options():
    assert Gzipped().dataset_options == {"compression": "gzip", "compression_opts": 4}
    assert Gzipped(shuffle=True, compression_opts=9).dataset_options == {
        "compression": "gzip",
        "compression_opts": 9,
        "shuffle": True,
    }
    assert Array().dataset_options == {}
    assert Array(chunks=(64,), fletcher32=True).dataset_options == {
        "chunks": (64,),
        "fletcher32": True,
    }


def test_a_constructor_compression_replaces_the_class_compression_and_its_options():
    assert Gzipped(compression="lzf").dataset_options == {"compression": "lzf"}


def test_dataset_options_expand_an_hdf5plugin_filter():
    options = Array(compression=hdf5plugin.Zstd(clevel=5), shuffle=True).dataset_options
    expected = dict(hdf5plugin.Zstd(clevel=5))
    assert options == {**expected, "shuffle": True}
    assert isinstance(options["compression"], int)  # the filter id, as h5py takes it


def test_unknown_dataset_options_are_refused():
    class Odd(Feature):
        __ds_kwargs__ = {"compresion": "gzip"}  # misspelt

    with pytest.raises(TypeError, match="compresion"):
        _ = Odd().dataset_options
    with pytest.raises(TypeError):
        Image(compresion="gzip")


@pytest.mark.parametrize(
    "feature",
    [
        Image(size=(8, 8), mode="RGB", compression=hdf5plugin.Zstd()),
        Sound(sr=16000),
        Array(dtype="float32", chunks=(128,)),
        DirLabels(),
        String(),
        Bytes(decoder=Image(mode="L")),
        Image(mode="L", derived_from="images"),
    ],
    ids=repr,
)
def test_describe_is_json_able(feature):
    record = feature.describe()
    assert json.loads(json.dumps(record)) == record
    assert record["class"] == f"{type(feature).__module__}.{type(feature).__qualname__}"
    assert record["storage"] == feature.storage
    assert record["derived_from"] == feature.derived_from


class Legacy(Feature):
    """A feature in h5mapper's style: class attributes, no ``super().__init__``."""

    __re__ = r"\.log$"
    __ds_kwargs__ = {"compression": "lzf", "chunks": True}

    def __init__(self, scale: int = 2):
        self.scale = scale

    def load(self, source):
        return np.full(4, self.scale, dtype=np.int32)


def test_an_h5mapper_style_subclass_works_without_super_init():
    legacy = Legacy(scale=3)
    assert legacy.accepts("runs/1.log") and not legacy.accepts("runs/1.png")
    assert legacy.dataset_options == {"compression": "lzf", "chunks": True}
    record = legacy.describe()
    assert json.loads(json.dumps(record)) == record
    assert record["storage"] == "rows" and record["derived_from"] is None
    np.testing.assert_array_equal(legacy.load(None), [3, 3, 3, 3])


class Shouty(Feature):
    """A feature that only overrides ``decode``; the base ``load`` reads bytes for it."""

    storage = "bytes"

    def decode(self, data, name=""):
        return data.upper()


def test_a_subclass_overriding_only_decode_is_called_by_load(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"quiet please")
    assert Shouty().load(source_of(path)) == b"QUIET PLEASE"


def test_a_subclass_overriding_nothing_says_what_to_override(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"x")
    with pytest.raises(NotImplementedError, match=r"override load\(source\) or decode"):
        Feature().load(source_of(path))


# -- end to end: what a bank gives back is what the feature decoded -------------


class Photos(TypedFile):
    pixels = Image(mode="RGBA")
    thumbs = Image(size=(8, 6), mode="RGB", derived_from="pixels")
    gray = Image(size=(10, 12), mode="L", compression=hdf5plugin.Zstd())
    raw = Bytes(decoder=Image(mode="RGB"), pattern=r"(?i)\.(png|jpe?g)$")
    labels = DirLabels()


def test_images_through_a_bank_built_on_worker_processes(images, tmp_path, client):
    extra = images / "dogs" / "photo.jpg"
    iio.imwrite(extra, np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    bank = Photos.create(tmp_path / "b.h5", images, scheduler=client, progress=False)
    assert bank.summary.failed == 0, bank.failures()
    assert len(bank) == 13 and "dogs/photo.jpg" in bank
    assert bank.thumbs.storage == "item" and bank.thumbs.shape == (13, 8, 6, 3)
    assert bank.pixels.storage == "flat"
    assert bank.gray.attrs["mode"] == "L"
    assert bank.labels.names == ["cats", "dogs"]
    for id_ in bank.ids:
        data = (images / id_).read_bytes()
        pixels = Image(mode="RGBA").decode(data, id_)
        np.testing.assert_array_equal(bank.pixels.get(id_), pixels)
        np.testing.assert_array_equal(
            bank.thumbs.get(id_), Image(size=(8, 6), mode="RGB").load(pixels)
        )
        np.testing.assert_array_equal(
            bank.gray.get(id_), Image(size=(10, 12), mode="L").decode(data, id_)
        )
        np.testing.assert_array_equal(bank.raw.get(id_), iio.imread(data, mode="RGB"))
        assert bank.labels.names[bank.labels.get(id_)] == id_.split("/")[0]
    # The hdf5plugin filter object travelled to the writer and compressed the column.
    filter_ids = bank.h5["gray/data"].id.get_create_plist().get_filter(0)[0]
    assert filter_ids == hdf5plugin.ZSTD_ID


def test_undecodable_images_are_recorded_as_failures_of_a_build(tmp_path, rgb):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "good.png").write_bytes(png_bytes(rgb))
    (root / "garbage.png").write_bytes(b"garbage!" * 4)
    (root / "empty.png").write_bytes(b"")
    (root / "page.png").write_bytes(b"<html>gone</html>")
    (root / "half.png").write_bytes(png_bytes(rgb)[:60])
    bank = Photos.create(tmp_path / "b.h5", root, scheduler="threads", progress=False)
    assert bank.ids == ["good.png"]
    errors = {f.id: f.error for f in bank.failures()}
    assert set(errors) == {"garbage.png", "empty.png", "page.png", "half.png"}
    assert all(e.startswith("DecodeError: ") for e in errors.values())
    assert "first bytes: 67 61 72 62" in errors["garbage.png"]
    assert "empty" in errors["empty.png"]
    assert "first bytes: 3c 68 74 6d" in errors["page.png"]
    assert "truncated" in errors["half.png"]


def test_images_read_back_from_a_bank_opened_without_its_type(images, tmp_path):
    path = tmp_path / "b.h5"
    Photos.create(path, images, scheduler="threads", progress=False).close()
    with TypedFile(path) as bank:  # no bank type: features are rebuilt from the schema record
        for id_ in bank.ids[:3]:
            pixels = iio.imread(images / id_, mode="RGBA")
            np.testing.assert_array_equal(bank.pixels.get(id_), pixels)
            np.testing.assert_array_equal(
                bank.thumbs.get(id_), Image(size=(8, 6), mode="RGB").load(pixels)
            )
            assert bank.labels.names[bank.labels.get(id_)] == id_.split("/")[0]


def test_bytes_with_a_decoder_read_back_from_a_bank_opened_without_its_type(images, tmp_path):
    path = tmp_path / "b.h5"
    Photos.create(path, images, scheduler="threads", progress=False).close()
    with TypedFile(path) as bank:
        id_ = bank.ids[0]
        raw = bank.raw.get(id_)
        # Rebuilt with its decoder, it decodes; read as stored, it gives the file's bytes.
        if isinstance(raw, bytes):
            assert raw == (images / id_).read_bytes()
        else:
            np.testing.assert_array_equal(raw, iio.imread(images / id_, mode="RGB"))


class Recordings(TypedFile):
    audio = Sound(sr=8000)
    stereo = Sound(sr=16000, mono=False, pattern=r"\.flac$")  # the fixture's FLACs are stereo
    labels = DirLabels()


def test_sounds_through_a_bank_built_on_worker_processes(sounds, tmp_path, client):
    good = sorted(sounds.rglob("*.wav"))[0].read_bytes()
    (sounds / "low" / "cut.wav").write_bytes(good[: len(good) // 2])
    bank = Recordings.create(tmp_path / "b.h5", sounds, scheduler=client, progress=False)
    # The truncated copy is refused (strict=True is the default), the rest is in.
    assert [(f.id, f.feature) for f in bank.failures()] == [("low/cut.wav", "audio")]
    assert "truncated" in bank.failures()[0].error
    assert len(bank) == 4
    assert bank.audio.attrs["sr"] == 8000 and bank.stereo.attrs["sr"] == 16000
    flacs = [id_ for id_ in bank.ids if id_.endswith(".flac")]
    assert flacs
    for id_ in bank.ids:
        data = (sounds / id_).read_bytes()
        audio = Sound(sr=8000)
        np.testing.assert_array_equal(
            bank.audio.get(id_), audio.from_stored(audio.decode(data, id_))
        )
        if id_ in flacs:
            stereo = Sound(sr=16000, mono=False)
            expected = stereo.from_stored(stereo.decode(data, id_))
            assert expected.ndim == 2 and expected.shape[1] == 2
            np.testing.assert_array_equal(bank.stereo.get(id_), expected)
        else:
            assert bank.stereo.get(id_) is None


class Stats(Feature):
    """A custom feature returning a dict: one column per key."""

    __re__ = r"\.png$"

    def load(self, source):
        pixels = Image(mode="L").load(source)
        return {
            "mean": np.array([pixels.mean()]),
            "histogram": np.bincount(pixels.ravel() // 64, minlength=4)[np.newaxis],
        }


class Listy(Feature):
    """A broken custom feature: ``load`` returns a list, which a bank cannot store."""

    __re__ = r"^broken"
    reads_bytes = False

    def load(self, source):
        return [1, 2, 3]


class Mixed(TypedFile):
    steps = Gzipped(dtype="float32", shuffle=True, pattern=r"run\d+\.npy$")
    grids = Array(flat=True, pattern=r"grid.*\.npy$")
    notes = String()
    stats = Stats()
    legacy = Legacy(scale=5)
    listy = Listy()


@pytest.fixture
def mixed(tmp_path):
    root = tmp_path / "mixed"
    (root / "logs").mkdir(parents=True)
    np.save(root / "logs" / "run1.npy", np.arange(5, dtype=np.int64))
    np.save(root / "logs" / "run2.npy", np.arange(3, dtype=np.int64) * 10)
    np.save(root / "logs" / "grid_a.npy", np.ones((2, 3)))
    np.save(root / "logs" / "grid_b.npy", np.zeros((4, 1)))
    (root / "notes").mkdir()
    (root / "notes" / "a.txt").write_text("première note", encoding="utf-8")
    (root / "notes" / "b.txt").write_text("", encoding="utf-8")
    (root / "runs").mkdir()
    (root / "runs" / "x.log").write_text("log")
    write_images(root / "pics", classes=("p",), per_class=2)
    return root


@pytest.mark.parametrize("scheduler", ["threads", "client"])
def test_arrays_text_dicts_and_custom_features_through_a_bank(mixed, tmp_path, request, scheduler):
    if scheduler == "client":
        scheduler = request.getfixturevalue("client")
    sources = [mixed, "broken-0001"]
    bank = Mixed.create(tmp_path / "b.h5", sources, scheduler=scheduler, progress=False)

    # Arrays: rows concatenated (cast to the feature's dtype), flat ones in their own shape.
    np.testing.assert_array_equal(bank.steps.get("logs/run2.npy"), [0, 10, 20])
    assert bank.steps.dtype == np.float32
    stored = bank.h5["steps/data"]  # class defaults and constructor options both reached HDF5
    assert (stored.compression, stored.compression_opts, stored.shuffle) == ("gzip", 4, True)
    assert len(bank.steps) == 5 + 3
    np.testing.assert_array_equal(bank.grids.get("logs/grid_a.npy"), np.ones((2, 3)))
    np.testing.assert_array_equal(bank.grids.get("logs/grid_b.npy"), np.zeros((4, 1)))
    assert bank.grids.get("logs/run1.npy") is None

    # Text comes back as str, empty text included.
    assert bank.notes.get("notes/a.txt") == "première note"
    assert bank.notes.get("notes/b.txt") == ""

    # A dict-valued feature: one column per key, read back as the dict.
    for id_ in ("pics/p/p_000.png", "pics/p/p_001.png"):
        expected = Stats().load(Source(SourceSpec(id_, str(mixed / id_))))
        stats = bank.stats.get(id_)
        assert set(stats) == {"mean", "histogram"}
        np.testing.assert_array_equal(stats["mean"], expected["mean"])
        np.testing.assert_array_equal(stats["histogram"], expected["histogram"])
        everything = bank.get(id_)
        assert set(everything) == {"stats"}
        np.testing.assert_array_equal(everything["stats"]["histogram"], expected["histogram"])
    # Each key is a column of its own: the histograms count every pixel of each image.
    pixel_counts = [
        iio.imread(mixed / id_).shape[:2] for id_ in ("pics/p/p_000.png", "pics/p/p_001.png")
    ]
    np.testing.assert_array_equal(
        bank.stats.histogram[:].sum(axis=1), [h * w for h, w in pixel_counts]
    )

    # The h5mapper-style feature was built with its class-level dataset options.
    np.testing.assert_array_equal(bank.legacy.get("runs/x.log"), [5, 5, 5, 5])
    assert bank.h5["legacy/data"].compression == "lzf"

    # A feature returning a list fails its source, which the bank records.
    assert "broken-0001" not in bank
    failures = {f.id: f for f in bank.failures()}
    assert set(failures) == {"broken-0001"}
    assert failures["broken-0001"].feature == "listy"
    assert "FeatureTypeError" in failures["broken-0001"].error
    assert len(bank) == 9


class Peak(Feature):
    """A derived feature in h5mapper's style: ``derived_from`` as a class attribute."""

    derived_from = "pixels"

    def load(self, pixels):
        return np.asarray([pixels.max()])


class Peaks(TypedFile):
    pixels = Image(mode="L")
    peak = Peak()


def test_a_class_attribute_derived_from_is_kept(images, tmp_path):
    assert Peak().derived_from == "pixels" and Peak(derived_from="x").derived_from == "x"
    bank = Peaks.create(tmp_path / "b.h5", images, scheduler="threads", progress=False)
    assert bank.summary.failed == 0, bank.failures()
    for id_ in bank.ids:
        assert bank.peak.get(id_).tolist() == [bank.pixels.get(id_).max()]


@pytest.mark.parametrize(
    ("subtype", "stored", "step"),
    [("PCM_16", np.int16, 2**-15), ("PCM_U8", np.int16, 2**-7), ("PCM_24", np.int32, 2**-23),
     ("PCM_32", np.int32, 2**-31), ("FLOAT", np.float32, 0), ("DOUBLE", np.float64, 0)],
)  # fmt: skip
def test_sound_stores_samples_as_the_file_holds_them(stereo, subtype, stored, step):
    """Native samples: the file's own type; reads equal libsndfile's float reading of the file
    bit for bit; the sample a file holds is one step of its type."""
    buffer = io.BytesIO()
    soundfile.write(buffer, stereo, 8000, format="WAV", subtype=subtype)
    data = buffer.getvalue()
    feature = Sound(sr=8000, mono=False)
    decoded = feature.decode(data, "a.wav")
    assert decoded.dtype == stored
    expected, _ = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    np.testing.assert_array_equal(feature.from_stored(decoded), expected)
    if step:  # what the file holds: multiples of its step
        assert np.all(np.abs(np.round(expected / step) * step - expected) < 1e-9)


def test_resampled_native_samples_stay_in_the_files_type_within_half_a_step(stereo):
    data = sound_bytes(stereo, 8000)
    native = Sound(sr=16000).decode(data, "a.wav")
    exact = Sound(sr=16000, native=False).decode(data, "a.wav")
    assert native.dtype == np.int16 and native.shape == exact.shape == (3200,)
    # soxr resamples int16 itself: within a step of the float path (rounding on both sides)
    assert np.abs(to_float(native) - exact).max() <= 2 / 32768


def test_a_sound_column_takes_only_its_own_sample_type(tmp_path):
    """16-bit files then a float file: the float one fails, naming native=False; nothing is cast
    (int16 numbers in a float column would be 32,768 times too loud)."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, subtype in enumerate(["PCM_16", "PCM_16", "FLOAT"]):
        soundfile.write(folder / f"s{i}.wav", rng.uniform(-0.5, 0.5, 800), 8000, subtype=subtype)

    class Bank(TypedFile):
        audio = Sound(sr=8000)

    bank = Bank.create(
        tmp_path / "mixed.h5", folder, scheduler="sync", progress=False, partition_size=1
    )
    assert bank.ids == ["s0.wav", "s1.wav"]
    (failure,) = bank.summary.failures
    assert failure.id == "s2.wav" and "dtype float32" in failure.error and "int16" in failure.error
    assert "Sound(native=False)" in failure.error
    bank.close()

    class Floats(TypedFile):
        audio = Sound(sr=8000, native=False)

    floats = Floats.create(tmp_path / "float.h5", folder, scheduler="sync", progress=False)
    assert len(floats) == 3 and floats.audio.dtype == np.float32
    for i in range(3):
        expected = soundfile.read(folder / f"s{i}.wav", dtype="float32")[0]
        np.testing.assert_array_equal(floats.audio.get(f"s{i}.wav"), expected)
    floats.close()


class SoundPeak(Feature):
    """Derived from a sound: records the dtype and peak of what it is given."""

    storage = "item"

    def load(self, audio):
        return np.array([np.abs(audio).max(), audio.dtype == np.float32], np.float64)


def test_a_feature_derived_from_a_sound_gets_its_samples_as_floats(sounds, tmp_path):
    """Stored as int16, but derived features see what reads return: floats in [-1, 1]."""

    class Bank(TypedFile):
        audio = Sound(sr=8000, pattern=r"\.wav$")
        peak = SoundPeak(derived_from="audio")

    bank = Bank.create(tmp_path / "d.h5", sounds, scheduler="sync", progress=False)
    assert bank.audio.dtype == np.int16
    for id_ in bank.ids:
        peak, was_float = bank.peak.get(id_)
        assert was_float == 1.0 and peak == np.abs(bank.audio.get(id_)).max() <= 1.0
    bank.close()
