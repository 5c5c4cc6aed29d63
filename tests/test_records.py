"""Banks from elsewhere: the file describes, the code decides.

A bank's schema record (``Feature.describe()``) is untrusted input. Rebuilt
features take only the parameters that describe stored data, checked; safety
limits keep the code's defaults; an invalid record makes its column read as
stored, with a warning naming it, and never makes the bank unopenable. Also
here: ``Sound(max_samples=)``, refused from the header, and ``add`` refusing
keys HDF5 would not store as given (``"x\\0y"`` would be column ``x``).

Hostile records are crafted the way an attacker would: a real bank, built
from real files with h5bank, whose ``h5bank_schema`` attribute is rewritten
with h5py.
"""

from __future__ import annotations

import io
import json
import shutil
import tracemalloc
import warnings

import h5py
import imageio.v3 as iio
import numpy as np
import pytest
import soundfile

from features import Array, Bytes, DecodeError, DirLabels, Feature, Image, Sound, String
from features.base import from_record, rebuild
from features.errors import RecordError, RecordWarning
from features.image import MAX_PIXELS
from features.sound import MAX_SAMPLES
from pipeline import FeatureTypeError, TypedFile
from pipeline.format import layout
from pipeline.schema import Undeclared

# Reads of a crafted bank warn again each time it opens; the tests check the warnings where
# they catch them (features_of, pytest.warns).
pytestmark = pytest.mark.filterwarnings("ignore::features.errors.RecordWarning")

# -- real files ------------------------------------------------------------------------


def wav_bytes(audio: np.ndarray, sr: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, sr, format="WAV")
    return buffer.getvalue()


def flac_bytes(audio: np.ndarray, sr: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, sr, format="FLAC")
    return buffer.getvalue()


def declaring_frames(flac: bytes, frames: int) -> bytes:
    """``flac`` with its STREAMINFO's 36-bit total-samples field set to ``frames``."""
    assert flac[:4] == b"fLaC" and flac[4] & 0x7F == 0  # STREAMINFO comes first
    data = bytearray(flac)
    word = int.from_bytes(data[18:26], "big")  # sample rate, channels, bits, total samples
    word = (word & ~((1 << 36) - 1)) | frames
    data[18:26] = word.to_bytes(8, "big")
    return bytes(data)


def peak_bytes(call) -> int:
    """The most memory Python and numpy held at once while ``call()`` ran."""
    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


class Shared(TypedFile):
    """A bank type whose banks get shared: every kind of record h5bank writes."""

    png = Bytes(decoder=Image(mode="RGB"), pattern=r"\.png$")
    wav = Bytes(decoder=Sound(sr=8000), pattern=r"\.wav$")
    images = Image(size=(8, 8), mode="RGB")
    text = String()
    table = Array(flat=True)
    labels = DirLabels()


RGB = np.random.default_rng(5).integers(0, 256, (6, 5, 3), dtype=np.uint8)
NOISE = np.random.default_rng(6).uniform(-0.5, 0.5, 800).astype(np.float32)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A bank built by h5bank from real files: a PNG, a WAV, a text and a .npy in ``cats/``."""
    root = tmp_path_factory.mktemp("shared")
    folder = root / "files" / "cats"
    folder.mkdir(parents=True)
    iio.imwrite(folder / "a.png", RGB)
    soundfile.write(folder / "a.wav", NOISE, 8000)
    (folder / "a.txt").write_text("bonjour", encoding="utf-8")
    np.save(folder / "a.npy", np.arange(6.0).reshape(2, 3))
    path = root / "pristine.h5"
    Shared.create(path, root / "files", scheduler="threads", progress=False).close()
    return path, folder


@pytest.fixture
def shared(pristine, tmp_path):
    """A copy of the pristine bank, to rewrite the records of."""
    path = tmp_path / "shared.h5"
    shutil.copy(pristine[0], path)
    return path, pristine[1]


def rewrite(path, column: str, change) -> None:
    """Give ``column`` the record ``change(record)`` returns, with h5py, as an attacker would."""
    with h5py.File(path, "r+") as f:
        schema = layout.read_json_attr(f, layout.ATTR_SCHEMA)
        schema[column] = change(json.loads(json.dumps(schema[column])))
        layout.write_json_attr(f, layout.ATTR_SCHEMA, schema)


def with_attrs(**attrs):
    return lambda record: {**record, "attrs": {**record["attrs"], **attrs}}


def features_of(path) -> tuple[dict[str, Feature], list[str]]:
    """Each column's feature in the bank opened without its type, and the warnings of that."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with TypedFile(path) as bank:
            found = {
                name: getattr(bank, name).feature
                for name in ("png", "wav", "images", "text", "table")
            }
            found["labels"] = bank.labels.feature
    return found, [str(w.message) for w in caught if issubclass(w.category, RecordWarning)]


# -- records rebuilt from a real bank -----------------------------------------------------


def test_a_bank_from_elsewhere_rebuilds_its_features_with_the_codes_limits(shared):
    path, _ = shared
    features, warned = features_of(path)
    assert warned == []
    assert [type(features[k]).__name__ for k in features] == [
        "Bytes", "Bytes", "Image", "String", "Array", "DirLabels",
    ]  # fmt: skip
    assert features["png"].decoder.mode == "RGB"
    assert features["wav"].decoder.sr == 8000
    assert features["images"].size == (8, 8) and features["images"].max_pixels == MAX_PIXELS
    with TypedFile(path) as bank:
        np.testing.assert_array_equal(bank.png.get("cats/a.png"), RGB)
        decoded = bank.wav.get("cats/a.wav")
        assert decoded.shape == (800,) and decoded.dtype == np.float32  # Bytes' decoder's reading
        assert bank.text.get("cats/a.txt") == "bonjour"


def test_safety_limits_in_a_record_are_ignored(shared):
    path, _ = shared
    rewrite(path, "png", lambda r: {**r, "attrs": {"decoder": with_attrs(max_pixels=1)(
        r["attrs"]["decoder"])}})  # fmt: skip
    rewrite(path, "wav", lambda r: {**r, "attrs": {"decoder": with_attrs(
        max_samples=1, strict=False, dtype="float64")(r["attrs"]["decoder"])}})  # fmt: skip
    rewrite(path, "images", with_attrs(max_pixels=None, resample="nearest"))
    features, warned = features_of(path)
    assert warned == []
    assert features["png"].decoder.max_pixels == MAX_PIXELS  # not 1
    sound = features["wav"].decoder
    assert (sound.max_samples, sound.strict, sound.dtype) == (MAX_SAMPLES, True, "float32")
    assert features["images"].max_pixels == MAX_PIXELS and features["images"].resample == "bilinear"
    with TypedFile(path) as bank:  # with max_pixels=1 or max_samples=1 these would be refused
        np.testing.assert_array_equal(bank.png.get("cats/a.png"), RGB)
        assert bank.wav.get("cats/a.wav").shape == (800,)


def test_a_recorded_image_size_that_would_allocate_gigabytes_reads_the_png_as_stored(shared):
    path, folder = shared
    # The record: a 10.8 GB resize target for each PNG, with the limit turned off.
    rewrite(path, "png", lambda r: {**r, "attrs": {"decoder": with_attrs(
        size=[60000, 60000], max_pixels=None)(r["attrs"]["decoder"])}})  # fmt: skip
    features, warned = features_of(path)
    assert isinstance(features["png"], Undeclared)
    (message,) = warned
    assert "column 'png'" in message
    assert "Image" in message and "60000 x 60000 = 3,600,000,000 pixels" in message
    with TypedFile(path) as bank:
        assert bank.png.get("cats/a.png") == (folder / "a.png").read_bytes()


def test_a_recorded_sample_rate_of_gigahertz_reads_the_wav_as_stored(shared):
    path, folder = shared
    rewrite(path, "wav", lambda r: {**r, "attrs": {"decoder": with_attrs(sr=2_000_000_000)(
        r["attrs"]["decoder"])}})  # fmt: skip
    features, warned = features_of(path)
    assert isinstance(features["wav"], Undeclared)
    (message,) = warned
    assert "column 'wav'" in message and "sr" in message and "2,000,000,000" in message
    with TypedFile(path) as bank:
        assert bank.wav.get("cats/a.wav") == (folder / "a.wav").read_bytes()


def test_a_recorded_pattern_is_not_taken_so_a_bad_one_cannot_hurt(shared):
    """A regex from a file is never compiled: "(" (does not compile) and a catastrophic
    backtracking one are both ignored; the feature keeps the class's own pattern."""
    path, _ = shared
    for hostile in ("(", "(a+)+$"):
        rewrite(path, "images", with_attrs(pattern=hostile))
        features, warned = features_of(path)
        assert isinstance(features["images"], Image) and not warned
        assert features["images"].__re__ == Image.__re__
    with TypedFile(path) as bank:  # the stored pixels read
        assert bank.images.get("cats/a.png").shape == (8, 8, 3)


def test_sizes_at_the_bounds_are_taken(shared):
    path, _ = shared
    rewrite(path, "png", lambda r: {**r, "attrs": {"decoder": with_attrs(size=[65535, 1500])(
        r["attrs"]["decoder"])}})  # fmt: skip
    rewrite(path, "wav", lambda r: {**r, "attrs": {"decoder": with_attrs(sr=768_000)(
        r["attrs"]["decoder"])}})  # fmt: skip
    features, warned = features_of(path)
    assert warned == []
    assert features["png"].decoder.size == (65535, 1500)
    assert features["wav"].decoder.sr == 768_000


def decoder(**attrs):
    return lambda r: {**r, "attrs": {"decoder": with_attrs(**attrs)(r["attrs"]["decoder"])}}


HOSTILE = {
    "size of three": ("png", decoder(size=[8, 8, 3]), "[height, width]"),
    "size of strings": ("png", decoder(size=["8", "8"]), "must be an integer"),
    "size of booleans": ("png", decoder(size=[True, 8]), "must be an integer"),
    "size of zero": ("images", with_attrs(size=[0, 8]), "from 1 to 65,535"),
    "side past 65535": ("images", with_attrs(size=[65536, 1]), "from 1 to 65,535"),
    "size past the pixels": ("images", with_attrs(size=[20000, 20000]), "400,000,000 pixels"),
    "palette mode": ("images", with_attrs(mode="P"), "must be one of"),
    "mode of a number": ("images", with_attrs(mode=3), "must be one of"),
    "sample rate of a string": ("wav", decoder(sr="16000"), "must be an integer"),
    "sample rate of a float": ("wav", decoder(sr=2e9), "must be an integer"),
    "sample rate of zero": ("wav", decoder(sr=0), "from 1 to 768,000"),
    "mono of a string": ("wav", decoder(mono="yes"), "true or false"),
    "object dtype": ("table", with_attrs(dtype="O"), "number type"),
    "subarray dtype of gigabytes": ("table", with_attrs(dtype="(1000000000,)f8"), "dtype"),
    "dtype of a list": ("table", with_attrs(dtype=["f8"]), "must be a string"),
    "flat and item": ("table", with_attrs(item=True), "choose flat=True"),
    "codec that is not text": ("text", with_attrs(encoding="zlib"), "not a text encoding"),
    "unknown encoding": ("text", with_attrs(encoding="no-such"), "not a text encoding"),
    "bytes as a decoder": (
        "png",
        lambda r: {**r, "attrs": {"decoder": {"class": "features.text.Bytes", "attrs": {}}}},
        "cannot be a decoder",
    ),
    "labels as a decoder": (
        "wav",
        lambda r: {**r, "attrs": {"decoder": {"class": "features.labels.DirLabels"}}},
        "cannot be a decoder",
    ),
    "decoder of a list": ("png", lambda r: {**r, "attrs": {"decoder": [1]}}, "JSON object"),
    "attrs of a list": ("images", lambda r: {**r, "attrs": [1, 2]}, "attrs must be"),
    "class of a number": ("images", lambda r: {**r, "class": 7}, "class must be a string"),
    "record of a list": ("text", lambda r: ["features.text.String"], "JSON object"),
    "record of a string": ("text", lambda r: "features.text.String", "JSON object"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_an_invalid_record_makes_its_column_read_as_stored_with_a_warning(shared, case):
    path, folder = shared
    column, change, reason = HOSTILE[case]
    rewrite(path, column, change)
    features, warned = features_of(path)
    assert isinstance(features[column], Undeclared)
    (message,) = warned
    assert f"column {column!r}" in message and reason in message
    others = {k: type(v).__name__ for k, v in features.items() if k != column}
    assert "Undeclared" not in others.values()
    with TypedFile(path) as bank:  # the column still reads, as stored
        if column in ("png", "wav"):
            id_ = f"cats/a.{column}"
            assert getattr(bank, column).get(id_) == (folder / id_.split("/")[1]).read_bytes()
        elif column == "text":
            assert bank.text.get("cats/a.txt") == "bonjour"  # its group records utf-8
        elif column == "table":
            np.testing.assert_array_equal(
                bank.table.get("cats/a.npy"), np.arange(6.0).reshape(2, 3)
            )


def test_an_encoding_attribute_that_is_not_text_reads_bytes_with_a_warning(shared):
    path, _ = shared
    rewrite(path, "text", lambda r: {**r, "class": "mine.Text"})  # a class h5bank does not rebuild
    with h5py.File(path, "r+") as f:
        f["text"].attrs["encoding"] = "zlib"
    features, warned = features_of(path)
    assert isinstance(features["text"], Undeclared) and features["text"].encoding is None
    (message,) = warned
    assert "column 'text'" in message and "zlib" in message
    with TypedFile(path) as bank:
        assert bank.text.get("cats/a.txt") == b"bonjour"


def test_a_decoder_of_a_class_h5bank_does_not_know_gives_bytes_without_a_warning(shared):
    path, folder = shared
    rewrite(path, "png", lambda r: {**r, "attrs": {"decoder": {"class": "evil.Decoder"}}})
    features, warned = features_of(path)
    assert warned == [] and type(features["png"]) is Bytes and features["png"].decoder is None
    with TypedFile(path) as bank:
        assert bank.png.get("cats/a.png") == (folder / "a.png").read_bytes()


# -- from_record, for any JSON ---------------------------------------------------------


def random_json(rng: np.random.Generator, depth: int = 0):
    """A JSON value: at the top, mostly the record of a built-in feature with odd attrs."""
    atoms = [None, True, False, 0, 1, -1, 8, 2**40, 1e308, -0.5, "", "(", "utf-8", "RGB", "f4"]
    if depth == 0:
        classes = ["Image", "Sound", "Array", "String", "Bytes", "DirLabels", "Feature", "Nope"]
        return {
            "class": f"features.x.{classes[rng.integers(len(classes))]}",
            "attrs": random_json(rng, 1) if rng.random() < 0.3 else random_json(rng, 2),
        }
    kind = rng.integers(0, 9 if depth < 4 else 6)
    if kind < 5:
        return atoms[rng.integers(len(atoms))]
    if kind == 5:
        return "x" * int(rng.integers(0, 3000))
    if kind == 6:
        return [random_json(rng, depth + 1) for _ in range(rng.integers(0, 4))]
    names = ["size", "mode", "sr", "mono", "dtype", "flat", "item", "encoding", "decoder",
             "pattern", "max_pixels", "strict", "max_samples", "derived_from", "chunks"]  # fmt: skip
    keys = rng.choice(names, size=int(rng.integers(0, 4)), replace=False)
    values = {str(k): random_json(rng, depth + 1) for k in keys}
    if kind == 8 and rng.random() < 0.5:  # a nested record, as Bytes's decoder
        return {"class": "features.image.Image", "attrs": values}
    return values


def test_from_record_never_raises_for_any_json():
    rng = np.random.default_rng(2024)
    records = [random_json(rng, depth=3 * (i % 5 == 0)) for i in range(3000)]
    rebuilt = refused = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for record in records:
            feature = from_record(json.loads(json.dumps(record)))
            assert feature is None or isinstance(feature, Feature)
            rebuilt += feature is not None
    refused = sum(issubclass(w.category, RecordWarning) for w in caught)
    assert rebuilt > 300 and refused > 300, (rebuilt, refused)  # both kinds were tried


def test_from_record_names_the_class_and_the_problem_when_it_refuses():
    record = {"class": "features.sound.Sound", "attrs": {"sr": 2e9, "max_samples": None}}
    with pytest.warns(RecordWarning, match=r"features\.sound\.Sound.*sr: must be an integer"):
        assert from_record(record) is None
    with pytest.raises(RecordError, match="Sound: sr"):
        rebuild(record)
    deep: dict = {"class": "features.text.Bytes", "attrs": {}}
    for _ in range(5000):  # nested decoders, deeper than the recursion limit
        deep = {"class": "features.text.Bytes", "attrs": {"decoder": deep}}
    with pytest.warns(RecordWarning):
        assert from_record(deep) is None


# -- Sound(max_samples=) ------------------------------------------------------------------


def test_a_flac_declaring_hours_is_refused_from_its_header_before_any_allocation(tmp_path):
    path = tmp_path / "bomb.flac"
    path.write_bytes(declaring_frames(flac_bytes(np.zeros(800, np.float32), 8000), 2**35 - 1))
    data = path.read_bytes()
    assert len(data) < 200 and soundfile.info(str(path)).frames == 2**35 - 1

    def decode():
        with pytest.raises(DecodeError) as caught:
            Sound(sr=8000).decode(data, path.name)
        return caught

    assert peak_bytes(decode) < 1_000_000  # the file declares 137 GB of float32
    with pytest.raises(
        DecodeError, match=r"34,359,738,367 frames x 1 channel at 8,000 Hz"
    ) as caught:
        Sound(sr=8000).decode(data, path.name)
    message = str(caught.value)
    assert f"past the limit of {MAX_SAMPLES:,} (Sound(max_samples=...))" in message
    assert "refused before decoding" in message


def test_a_small_flac_of_silence_is_refused_when_it_decodes_past_the_limit(tmp_path):
    # Two minutes of 48 kHz stereo silence: a 23 KB file, 46 MB once decoded.
    path = tmp_path / "silence.flac"
    soundfile.write(path, np.zeros((48_000 * 120, 2), np.float32), 48_000)
    data = path.read_bytes()
    assert len(data) < 100_000
    feature = Sound(sr=48_000, mono=False, max_samples=10_000_000)

    def decode():
        with pytest.raises(DecodeError, match="11,520,000 samples, past the limit of 10,000,000"):
            feature.decode(data, path.name)

    assert peak_bytes(decode) < 1_000_000
    decoded = Sound(sr=48_000, mono=False, max_samples=11_520_000).decode(data, path.name)
    assert decoded.shape == (5_760_000, 2)


def test_the_limit_counts_the_sound_after_resampling(tmp_path):
    path = tmp_path / "short.wav"
    soundfile.write(path, NOISE, 8000)  # 800 samples at 8 kHz: 8,000 at 80 kHz
    data = path.read_bytes()
    with pytest.raises(DecodeError, match=r"800 samples, 8,000 once resampled to 80,000 Hz, past"):
        Sound(sr=80_000, max_samples=5_000).decode(data, path.name)
    assert len(Sound(sr=80_000, max_samples=8_000).decode(data, path.name)) == 8_000
    assert len(Sound(sr=80_000, max_samples=None).decode(data, path.name)) == 8_000


def test_the_limit_counts_every_channel_of_the_file(tmp_path):
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([NOISE, NOISE[::-1]], axis=1), 8000)  # 800 frames x 2
    data = path.read_bytes()
    with pytest.raises(DecodeError, match=r"800 frames x 2 channels .* = 1,600 samples"):
        Sound(sr=8000, mono=True, max_samples=1_599).decode(data, path.name)
    assert Sound(sr=8000, mono=True, max_samples=1_600).decode(data, path.name).shape == (800,)


@pytest.mark.parametrize("value", [0, -5])
def test_max_samples_must_be_positive(value):
    with pytest.raises(ValueError, match="max_samples"):
        Sound(max_samples=value)


def test_a_sound_bomb_among_good_sounds_fails_as_a_source_and_the_others_are_built(tmp_path):
    root = tmp_path / "sounds"
    (root / "ok").mkdir(parents=True)
    soundfile.write(root / "ok" / "a.wav", NOISE, 8000)
    soundfile.write(root / "ok" / "b.flac", NOISE[::-1], 8000)
    bomb = declaring_frames(flac_bytes(np.zeros(800, np.float32), 8000), 2**35 - 1)
    (root / "ok" / "bomb.flac").write_bytes(bomb)

    class Recordings(TypedFile):
        audio = Sound(sr=8000)

    with Recordings.create(tmp_path / "b.h5", root, scheduler="threads", progress=False) as bank:
        (failure,) = bank.failures()
        assert failure.id == "ok/bomb.flac" and failure.feature == "audio"
        assert "past the limit" in failure.error and "max_samples" in failure.error
        assert sorted(bank.ids) == ["ok/a.wav", "ok/b.flac"]
        np.testing.assert_allclose(bank.audio.get("ok/a.wav"), NOISE, atol=1e-4)


# -- keys HDF5 would not store as given ---------------------------------------------------


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        ({"x\0y": 1.0}, r"'x\\x00y'"),
        ({"logs": {"lo\0ss": 1.0}}, r"'lo\\x00ss'"),
        ({"": 1.0}, "''"),
        ({".": 1.0}, "'.'"),
        ({"a/../b": 1.0}, r"'a/\.\./b'"),
        ({"logs": {"..": 1.0}}, r"'\.\.'"),
        ({"a//b": 1.0}, "'a//b'"),
        ({"/abs": 1.0}, "'/abs'"),
        ({"logs": {"/abs": 1.0}}, "'/abs'"),
        ({"__sources__": 1.0}, "'__sources__'"),
    ],
)
def test_add_refuses_a_key_hdf5_would_not_store_as_given(tmp_path, data, shown):
    path = tmp_path / "b.h5"
    with TypedFile(path, mode="a") as bank:
        bank.add("first", {"kept": 1.0})
        with pytest.raises(ValueError, match=rf"cannot write key {shown}"):
            bank.add("second", data)
        assert bank.ids == ["first"]
    with h5py.File(path, "r") as f:
        columns = list(layout.iter_columns(f))
        assert columns == ["kept"], columns  # no "x", no "logs/..", nothing in __sources__
        assert list(f["__sources__"]) == ["id"]


def test_add_refuses_a_nul_in_a_key_of_a_dict_valued_feature(tmp_path):
    class Stats(Feature):
        def load(self, source):
            return {"mean": np.zeros(1)}

    class Measured(TypedFile):
        stats = Stats()

    path = tmp_path / "b.h5"
    with Measured(path, mode="a") as bank:
        bank.add("ok", {"stats": {"mean": np.ones(1)}})
        with pytest.raises(FeatureTypeError, match=r"key 'me\\x00an': it holds a NUL"):
            bank.add("bad", {"stats": {"me\0an": np.ones(1)}})
        with pytest.raises(ValueError, match=r"cannot write key 'x\\x00'"):
            bank.stats.add("bad", {"x\0": np.ones(1)})
        assert bank.ids == ["ok"]
    with h5py.File(path, "r") as f:
        assert list(layout.iter_columns(f)) == ["stats/mean"]


def test_keys_naming_nested_columns_are_still_written(tmp_path):
    with TypedFile(tmp_path / "b.h5", mode="a") as bank:
        bank.add("a", {"logs": {"loss": np.arange(3.0)}, "k/x": 2.0, "dots.in.name": 1.0})
        np.testing.assert_array_equal(bank.logs.loss.get("a"), np.arange(3.0))
        assert bank.k.x.get("a") == 2.0 and getattr(bank, "dots.in.name").get("a") == 1.0
