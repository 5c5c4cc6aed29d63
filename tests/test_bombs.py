"""Decompression bombs: a tiny file declaring a huge image is refused from its header."""

from __future__ import annotations

import struct
import zlib

import imageio.v3 as iio
import numpy as np
import pytest

from features import DirLabels, Image
from features.errors import DecodeError
from pipeline import TypedFile


def declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header declares ``width`` x ``height`` (CRC fixed)."""
    png = iio.imwrite("<bytes>", np.zeros((1, 1, 3), np.uint8), extension=".png")
    header = bytearray(png[12:29])  # the IHDR chunk: type, width, height, ...
    header[4:12] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(bytes(header)) & 0xFFFFFFFF)
    return png[:12] + bytes(header) + crc + png[33:]


def test_a_bomb_past_the_limit_is_refused_before_decoding():
    bomb = declaring(12_000, 12_000)  # 144 M pixels: 432 MB as RGB, in a 69-byte file
    assert len(bomb) < 100
    with pytest.raises(DecodeError, match=r"12000 x 12000 = 144,000,000 pixels, past the limit"):
        Image(mode="RGB").decode(bomb, "bomb.png")


def test_the_limit_is_the_features_to_set():
    small = iio.imwrite("<bytes>", np.zeros((16, 16, 3), np.uint8), extension=".png")
    with pytest.raises(DecodeError, match="256 pixels, past the limit of 100"):
        Image(max_pixels=100).decode(small, "small.png")
    assert Image(max_pixels=256).decode(small, "small.png").shape == (16, 16, 3)
    # No limit of its own: Pillow's (about 179 M pixels) still refuses a far larger one.
    with pytest.raises(DecodeError, match="decompression bomb"):
        Image(max_pixels=None).decode(declaring(100_000, 100_000), "bomb.png")


def test_a_bomb_among_good_images_fails_as_a_source_and_the_others_are_built(images, tmp_path):
    (images / "cats" / "bomb.png").write_bytes(declaring(12_000, 12_000))

    class Pictures(TypedFile):
        images = Image(mode="RGB")
        labels = DirLabels()

    with Pictures.create(tmp_path / "b.h5", images, scheduler="threads", progress=False) as bank:
        (failure,) = bank.failures()
        assert failure.id == "cats/bomb.png" and failure.feature == "images"
        assert "past the limit" in failure.error
        assert len(bank) == 12 and "cats/bomb.png" not in bank
