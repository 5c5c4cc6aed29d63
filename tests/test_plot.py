"""``Image.plot`` and ``Sound.plot``: figures of a feature's data, alone and through a bank's
proxies (``bank.images.plot(bank.images[:16])``)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import write_images, write_sounds
from matplotlib.figure import Figure
from PIL import Image as PILImage

from features import DirLabels, Image, Sound
from pipeline import Group, TypedFile

RNG = np.random.default_rng(11)


def pixels(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def drawn(fig: Figure) -> list[np.ndarray]:
    """The array each axes of ``fig`` shows, in order."""
    return [np.asarray(ax.images[0].get_array()) for ax in fig.axes]


# -- Image.plot ------------------------------------------------------------------------------


def test_a_batch_is_a_grid_of_one_thumbnail_per_image_in_rows_of_ncols():
    batch = pixels(10, 8, 12, 3)
    fig = Image(size=(8, 12), mode="RGB").plot(batch, ncols=4, size=2.0)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 10  # no blank axes for the last row's empty cells
    assert tuple(fig.get_size_inches()) == (8.0, 6.0)  # 4 columns x 3 rows of 2 inches
    rows = [ax.get_subplotspec().rowspan.start for ax in fig.axes]
    assert rows == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    for shown, image in zip(drawn(fig), batch, strict=True):
        np.testing.assert_array_equal(shown, image)
    assert not any(ax.axison for ax in fig.axes)


def test_fewer_images_than_ncols_make_one_row_that_wide():
    fig = Image().plot(pixels(3, 8, 8, 3), ncols=8, size=1.0)
    assert len(fig.axes) == 3 and tuple(fig.get_size_inches()) == (3.0, 1.0)


def test_a_single_image_is_one_thumbnail_and_grayscale_uses_the_full_uint8_range():
    color = Image().plot(pixels(9, 7, 4))  # RGBA
    assert len(color.axes) == 1 and drawn(color)[0].shape == (9, 7, 4)
    gray = Image().plot(pixels(9, 7))
    (ax,) = gray.axes
    assert ax.images[0].get_cmap().name == "gray"
    assert ax.images[0].get_clim() == (0, 255)  # not stretched to this image's min and max


def test_a_3d_array_is_a_batch_of_grayscale_images_for_mode_l_and_one_image_otherwise():
    assert len(Image(mode="L").plot(pixels(5, 16, 16)).axes) == 5
    assert len(Image(mode="RGB").plot(pixels(16, 16, 3)).axes) == 1
    # No mode: a last axis of 1 to 4 is channels, anything longer is images.
    assert len(Image().plot(pixels(16, 16, 3)).axes) == 1
    assert len(Image().plot(pixels(6, 16, 16)).axes) == 6


def test_a_ragged_list_keeps_each_image_in_its_shape():
    images = [pixels(10, 20, 3), pixels(31, 7), pixels(5, 5, 4), pixels(12, 9, 2), pixels(4, 6, 1)]
    fig = Image().plot(images, titles=["rgb", "l", "rgba", "la", "l1"])
    assert [ax.get_title() for ax in fig.axes] == ["rgb", "l", "rgba", "la", "l1"]
    shapes = [a.shape for a in drawn(fig)]
    # LA is drawn as gray with its alpha (RGBA); a single channel as a 2-D gray image.
    assert shapes == [(10, 20, 3), (31, 7), (5, 5, 4), (12, 9, 4), (4, 6)]
    la = drawn(fig)[3]
    np.testing.assert_array_equal(la[..., 0], images[3][..., 0])
    np.testing.assert_array_equal(la[..., 3], images[3][..., 1])


def test_bad_titles_and_shapes_say_what_is_wrong():
    with pytest.raises(ValueError, match="2 titles for 3 items"):
        Image().plot(pixels(3, 8, 8, 3), titles=["a", "b"])
    with pytest.raises(ValueError, match="raveled pixels"):
        Image().plot(pixels(64))
    with pytest.raises(ValueError, match="5 channels"):
        Image().plot([pixels(8, 8, 5)])
    with pytest.raises(ValueError, match="nothing to plot"):
        Image().plot([])


# -- Sound.plot ------------------------------------------------------------------------------


def test_a_mono_sound_is_one_row_against_seconds_at_the_features_rate():
    audio = np.sin(np.linspace(0, 40, 800)).astype(np.float32)
    fig = Sound(sr=8000).plot(audio, titles="beep")
    (ax,) = fig.axes
    (line,) = ax.lines
    np.testing.assert_allclose(line.get_xdata()[[0, -1]], [0, 799 / 8000])
    np.testing.assert_array_equal(line.get_ydata(), audio)
    assert ax.get_title(loc="left") == "beep" and "8,000 Hz" in ax.get_xlabel()
    # sr= overrides the feature's rate (a sound that was not read from this bank).
    (line,) = Sound(sr=8000).plot(audio, sr=16000).axes[0].lines
    assert line.get_xdata()[-1] == pytest.approx(799 / 16000)


def test_a_stereo_sound_is_one_row_with_a_line_per_channel():
    audio = RNG.uniform(-1, 1, size=(500, 2)).astype(np.float32)
    (ax,) = Sound(sr=1000, mono=False).plot(audio).axes
    assert len(ax.lines) == 2
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), audio[:, 1])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["channel 0", "channel 1"]


def test_a_list_of_sounds_is_one_row_each_on_a_shared_time_axis():
    sounds = [np.zeros(300, np.float32), RNG.uniform(-1, 1, (900, 2)).astype(np.float32)]
    fig = Sound(sr=100).plot(sounds, titles=["short", "long"])
    assert len(fig.axes) == 2
    assert fig.axes[0].get_shared_x_axes().joined(fig.axes[0], fig.axes[1])
    assert fig.axes[0].get_xlim()[1] >= 9.0  # the short one's row spans the long one's 9 s


def test_a_long_sound_is_drawn_as_its_envelope_over_its_whole_duration():
    audio = RNG.uniform(-1, 1, 200_000).astype(np.float32)
    audio[123_456] = 1.5  # one peak, which the envelope must keep
    (ax,) = Sound(sr=10_000).plot(audio).axes
    assert not ax.lines  # not 200,000 points
    (patch,) = ax.patches
    high, edges, low = patch.get_data()
    assert edges[0] == 0 and edges[-1] == pytest.approx(20.0)
    assert high.max() == pytest.approx(1.5) and low.min() >= -1


def test_a_channels_first_array_is_refused():
    with pytest.raises(ValueError, match="more channels than samples"):
        Sound(mono=False).plot(np.zeros((2, 1000), np.float32))


def test_a_batch_of_windows_is_one_row_each():
    """What a DataLoader of AsSlice windows gives: (batch, samples) for a mono feature,
    (batch, samples, channels) for a multichannel one."""
    mono = Sound(sr=1000).plot(np.random.default_rng(0).uniform(-1, 1, (4, 300)))
    assert len(mono.axes) == 4
    assert all(len(ax.lines) == 1 for ax in mono.axes)
    stereo = Sound(sr=1000, mono=False).plot(np.zeros((3, 300, 2), np.float32))
    assert len(stereo.axes) == 3 and all(len(ax.lines) == 2 for ax in stereo.axes)


def test_without_matplotlib_the_error_says_how_to_install_it(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    with pytest.raises(ImportError, match=r"pip install 'h5bank\[plot\]'"):
        Image().plot(pixels(4, 4, 3))
    with pytest.raises(ImportError, match=r"pip install 'h5bank\[plot\]'"):
        Sound().plot(np.zeros(10, np.float32))


# -- through a bank's proxies ----------------------------------------------------------------


class Media(TypedFile):
    images = Image(size=(12, 16), mode="RGB")
    ragged = Image(pattern=r"\.png$")
    sound = Sound(sr=8000, mono=False, pattern=r"\.flac$")  # write_sounds' stereo files
    labels = Group(folder=DirLabels())


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    write_images(root / "pictures", per_class=5)
    write_sounds(root / "sounds", per_class=4)
    bank = Media.create(root / "media.h5", [root / "pictures", root / "sounds"],
                        scheduler="threads", progress=False)  # fmt: skip
    assert not bank.failures()
    with bank:
        yield bank


def test_a_feature_proxy_plots_a_slice_of_its_bank(media):
    fig = media.images.plot(media.images[:6], titles=media.ids[:6], ncols=3)
    assert len(fig.axes) == 6
    assert [ax.get_title() for ax in fig.axes] == media.ids[:6]
    for shown, ref in zip(drawn(fig), media.images.refs[:6], strict=True):
        np.testing.assert_array_equal(shown, media.images[ref][0])


def test_a_ragged_feature_plots_the_list_its_get_returns(media):
    ids = [i for i in media.ids if i.endswith(".png")][:4]
    images = [media.ragged.get(i) for i in ids]
    assert len({im.shape for im in images}) > 1
    fig = media.ragged.plot(images, titles=ids)
    assert [a.shape[:2] for a in drawn(fig)] == [im.shape[:2] for im in images]


def test_a_sound_proxy_plots_a_source_at_the_banks_rate(media):
    id_ = next(i for i in media.ids if i.endswith(".flac"))
    audio = media.sound.get(id_)
    assert audio.ndim == 2  # a stereo file of a stereo feature
    (ax,) = media.sound.plot(audio, titles=id_).axes
    assert len(ax.lines) == 2
    assert ax.lines[0].get_xdata()[-1] == pytest.approx((len(audio) - 1) / 8000)


def test_a_bank_opened_without_its_type_plots_with_its_recorded_features(media, tmp_path):
    with TypedFile(media.path) as bank:
        fig = bank.images.plot(bank.images[:2])
        assert len(fig.axes) == 2
        out = tmp_path / "grid.png"
        fig.savefig(out)
    with PILImage.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 0
