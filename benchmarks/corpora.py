"""The benchmark corpora, generated once and kept (no downloads).

Run with any Python that has numpy and imageio: the alternatives' own
environments import it too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import imageio.v3 as iio
import numpy as np


def _write(root: Path, files: int, classes: int, pixels: Callable[[int], np.ndarray]) -> list[Path]:
    """``class_<k>/img_<i>.png`` for ``i < files`` (``k = i % classes``), each written once."""
    paths = []
    for i in range(files):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:07d}.png"
        paths.append(path)
        if not path.exists():
            iio.imwrite(path, pixels(i))
    return sorted(paths)


def png_corpus(
    root: Path, files: int, classes: int = 10, size: int = 64, seed: int = 11
) -> list[Path]:
    """``files`` RGB PNGs of ``size`` x ``size``: gradients plus noise.

    About 8 KB a 64x64 file, near the 139 MB per 20,000 of the issue's corpus.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]

    def pixels(i: int) -> np.ndarray:
        a, b, c = rng.integers(0, 4, size=3)
        base = np.stack([(x * a) % 256, (y * b) % 256, ((x + y) * c) % 256], axis=2)
        return (base + rng.integers(0, 24, size=(size, size, 3))).astype(np.uint8)

    return _write(root, files, classes, pixels)


def ragged_corpus(root: Path, files: int = 2000, classes: int = 4, seed: int = 5) -> list[Path]:
    """``files`` PNGs of 96-384 px a side, a third each RGB, RGBA and grayscale."""
    rng = np.random.default_rng(seed)

    def pixels(i: int) -> np.ndarray:
        height, width = (int(v) for v in rng.integers(96, 385, size=2))
        y, x = np.mgrid[0:height, 0:width]
        rgb = np.stack([x % 256, y % 256, (x * y) % 256], axis=2)
        rgb = (rgb + rng.integers(0, 16, size=rgb.shape)).astype(np.uint8)
        if i % 3 == 1:
            return np.concatenate([rgb, np.full((height, width, 1), 200, np.uint8)], axis=2)
        return rgb.mean(axis=2).astype(np.uint8) if i % 3 == 2 else rgb

    return _write(root, files, classes, pixels)


def label_of(path: Path | str) -> int:
    """``class_<k>/...`` -> ``k``."""
    return int(os.path.basename(os.path.dirname(path)).split("_")[1])


def sound_corpus(
    root: Path, files: int = 600, classes: int = 4, sr: int = 22050, seed: int = 7
) -> list[Path]:
    """``files`` mono 16-bit WAVs of 1-8 s at ``sr``: tones plus noise, in ``class_<k>/``.

    About 200 KB a file (98 MB for 600), the issue's corpus of sounds.
    """
    import soundfile

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(files):
        seconds = float(rng.uniform(1, 8))
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"clip_{i:05d}.wav"
        paths.append(path)
        t = np.arange(int(seconds * sr)) / sr
        tone = 0.3 * np.sin(2 * np.pi * float(rng.uniform(110, 880)) * t)
        noise = rng.normal(0, 0.05, len(t))
        if not path.exists():
            soundfile.write(path, (tone + noise).clip(-1, 1), sr, subtype="PCM_16")
    return sorted(paths)


def photo_corpus(root: Path, files: int = 5000, classes: int = 10, seed: int = 3) -> list[Path]:
    """``files`` photo-like JPEGs (quality 90) of 300-600 px a side, in ``class_<k>/``.

    Smooth shaded shapes over a gradient, with sensor-like noise: JPEG's
    own territory, about 40-90 KB a file. The issue's corpus of photos.
    """
    from PIL import Image as PILImage
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(files):
        height, width = (int(v) for v in rng.integers(300, 601, size=2))
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"photo_{i:06d}.jpg"
        paths.append(path)
        colors = rng.integers(0, 256, size=(8, 3))
        shapes = rng.random((6, 4))
        noise = rng.normal(0, 6, size=(height, width, 3))
        if path.exists():
            continue
        y, x = np.mgrid[0:height, 0:width]
        base = (colors[0] * (x / width)[..., None] + colors[1] * (y / height)[..., None]) / 2
        image = PILImage.fromarray(base.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for k, (a, b, c, d) in enumerate(shapes):
            box = sorted([a * width, c * width]), sorted([b * height, d * height])
            xy = (box[0][0], box[1][0], box[0][1], box[1][1])
            (draw.ellipse if k % 2 else draw.rectangle)(
                xy, fill=tuple(int(v) for v in colors[2 + k])
            )
        image = image.filter(ImageFilter.GaussianBlur(3))
        pixels = (np.asarray(image, dtype=np.float64) + noise).clip(0, 255).astype(np.uint8)
        PILImage.fromarray(pixels).save(path, quality=90)
    return sorted(paths)
