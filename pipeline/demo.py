"""The demo: generated sample data, a bank type for it, and one build on the embedded default.

``h5bank demo`` writes small images in class folders (mixed RGB, RGBA and
grayscale PNGs and JPEGs of different sizes) and short sounds (WAV and FLAC,
mono and stereo, at two sample rates), builds them into one bank with
:class:`DemoBank` on a local Dask cluster, and prints the bank's tree and the
build summary. Everything is generated from a fixed seed, so two runs build
identical banks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import soundfile

from features import DirLabels, Image, Sound
from pipeline.bank.typedfile import TypedFile
from pipeline.schema import Group

IMAGE_CLASSES = ("circles", "squares", "stripes")
SOUND_CLASSES = ("chirps", "noise", "tones")
_IMAGE_RE = Image.__re__
_SOUND_RE = Sound.__re__


class DemoBank(TypedFile):
    """Images resized to 64x64 RGB and sounds at 16 kHz mono, each with folder labels."""

    images = Group(
        pixels=Image(size=(64, 64), mode="RGB"),
        labels=DirLabels(pattern=_IMAGE_RE),
    )
    sounds = Group(
        audio=Sound(sr=16000, mono=True),
        labels=DirLabels(pattern=_SOUND_RE),
    )


def make_samples(
    root: str | os.PathLike[str], images_per_class: int = 40, sounds_per_class: int = 6
) -> Path:
    """Write the demo's sample files under ``root`` (``images/<class>/``, ``sounds/<class>/``)."""
    root = Path(root)
    rng = np.random.default_rng(2026)
    for kind in IMAGE_CLASSES:
        folder = root / "images" / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(images_per_class):
            height, width = rng.integers(40, 97, size=2)
            rgb = picture(kind, int(height), int(width), rng)
            depth = i % 3  # 0: RGB, 1: RGBA, 2: grayscale
            if depth == 1:
                alpha = np.full((height, width, 1), 255, np.uint8)
                alpha[: height // 4] = 128
                pixels: np.ndarray = np.concatenate([rgb, alpha], axis=2)
            elif depth == 2:
                pixels = rgb.mean(axis=2).astype(np.uint8)
            else:
                pixels = rgb
            extension = ".jpg" if depth == 0 and i % 2 else ".png"
            iio.imwrite(folder / f"{kind}_{i:03d}{extension}", pixels, extension=extension)
    for kind in SOUND_CLASSES:
        folder = root / "sounds" / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(sounds_per_class):
            sr = (22050, 16000)[i % 2]
            audio = _sound(kind, sr, 0.25 + 0.05 * i, rng)
            if i % 3 == 2:
                audio = np.stack([audio, audio * 0.5], axis=1)  # stereo
            extension = ".flac" if i % 2 else ".wav"
            soundfile.write(folder / f"{kind}_{i:02d}{extension}", audio, sr)
    return root


def picture(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    color = rng.integers(60, 256, size=3)
    background = rng.integers(0, 60, size=3)
    if kind == "circles":
        cy, cx, r = height / 2, width / 2, min(height, width) / 3
        mask = (y - cy) ** 2 + (x - cx) ** 2 < r**2
    elif kind == "squares":
        mask = (abs(y - height / 2) < height / 4) & (abs(x - width / 2) < width / 4)
    else:
        mask = (x // max(1, width // 8)) % 2 == 0
    image = np.where(mask[..., None], color, background).astype(np.uint8)
    noise = rng.integers(0, 20, size=image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)


def _sound(kind: str, sr: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    if kind == "tones":
        audio = np.sin(2 * np.pi * rng.uniform(220, 880) * t)
    elif kind == "chirps":
        audio = np.sin(2 * np.pi * (200 + 2000 * t) * t)
    else:
        audio = rng.uniform(-1, 1, t.size)
    return (0.5 * audio).astype(np.float32)


def run(
    out: str | os.PathLike[str] = "h5bank-demo", scheduler: Any = None, progress: bool = True
) -> DemoBank:
    """Generate the samples under ``out`` (if missing) and build ``out/demo.h5`` from them."""
    out = Path(out)
    samples = out / "samples"
    if not samples.exists():
        make_samples(samples)
    return DemoBank.create(
        out / "demo.h5",
        [samples / "images", samples / "sounds"],
        scheduler=scheduler,
        progress=progress,
    )
