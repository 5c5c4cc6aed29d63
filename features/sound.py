"""Sounds, decoded with soundfile (libsndfile) and resampled with soxr."""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
import soundfile

from features.base import Feature
from features.errors import DecodeError

# Files that announce their format in their first bytes.
_SIGNATURES = ((b"fLaC", "FLAC"), (b"OggS", "Ogg"), (b"FORM", "AIFF"))


class Sound(Feature):
    """A sound per source, concatenated along time: refs are sample ranges.

    Parameters
    ----------
    sr
        Sample rate every sound is resampled to (soxr, high quality) and the
        rate recorded in the bank. A rate is required because sounds of
        different rates cannot share one concatenated dataset.
    mono
        Average the channels into one: each source is ``(n_samples,)``;
        otherwise ``(n_samples, channels)``, and every source must have the
        same number of channels.
    dtype
        Sample type stored, ``float32`` (in ``[-1, 1]``) by default.
    strict
        Refuse files whose header declares more audio than the file holds
        (a truncated download or copy). libsndfile would silently return the
        part that is there.
    **options
        See :class:`features.base.Feature`.
    """

    __re__ = r"(?i)\.(wav|flac|ogg|oga|aiff?|aifc|au|caf|w64|rf64|mp3|opus)$"
    storage = "rows"

    def __init__(
        self,
        sr: int = 22050,
        mono: bool = True,
        dtype: str = "float32",
        strict: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if int(sr) <= 0:
            raise ValueError(f"Sound sr must be a positive sample rate, got {sr!r}")
        if np.dtype(dtype).kind != "f":
            raise ValueError(f"Sound dtype must be a float type, got {dtype!r}")
        self.sr = int(sr)
        self.mono = bool(mono)
        self.dtype = str(np.dtype(dtype))
        self.strict = bool(strict)

    @property
    def attrs(self) -> dict[str, Any]:
        return {"sr": self.sr, "mono": self.mono}

    def decode(self, data: bytes, name: str = "") -> np.ndarray:
        if not data:
            raise DecodeError("empty file (0 bytes)")
        try:
            with soundfile.SoundFile(io.BytesIO(data)) as f:
                native_sr = f.samplerate
                if self.strict and "should be" in f.extra_info:
                    declared = [
                        line.strip() for line in f.extra_info.splitlines() if "should be" in line
                    ]
                    raise DecodeError(
                        f"truncated file: header and size disagree ({'; '.join(declared)})"
                    )
                audio = f.read(dtype="float32", always_2d=True)
        except DecodeError:
            raise
        except Exception as error:
            # libsndfile names the file object it was given ("Error opening
            # <_io.BytesIO object at 0x7f...>: ..."): noise, and different every run.
            reason = re.sub(r"Error opening <[^>]*>: ?", "", str(error)).strip()
            kind = next((k for sig, k in _SIGNATURES if data.startswith(sig)), None)
            if data.startswith(b"RIFF") and data[8:12] == b"WAVE":
                kind = "WAV"
            if kind is not None:  # it says it is one: its body is what is wrong
                raise DecodeError(
                    f"a damaged or truncated {kind} file ({len(data):,} bytes): {reason}"
                ) from None
            raise DecodeError(
                f"not a sound file libsndfile can read: {reason} (first bytes: {data[:8].hex(' ')})"
            ) from None
        if self.mono:
            audio = audio.mean(axis=1)
        if native_sr != self.sr:
            import soxr

            audio = soxr.resample(audio, native_sr, self.sr)
        return np.ascontiguousarray(audio, dtype=self.dtype)
