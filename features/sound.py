"""Sounds, decoded with soundfile (libsndfile) and resampled with soxr."""

from __future__ import annotations

import io
import math
import re
import wave
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import soundfile

from features import records
from features.base import Feature
from features.errors import DecodeError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Samples above which a waveform is drawn as its min/max envelope over this many bins.
_ENVELOPE_BINS = 4000

# Samples (counted over all channels) above which a sound is refused unless
# Sound(max_samples=...) says otherwise: one hour of 48 kHz stereo, 1.4 GB as float32.
MAX_SAMPLES = 3600 * 48_000 * 2
# The highest sample rate a bank file may record (768 kHz: the fastest audio interfaces).
MAX_RECORDED_SR = 768_000

# libsndfile sample formats (``SoundFile.subtype``) of at most 16 bits, stored as int16 when
# samples are native; of 17 to 32 bits, as int32 (libsndfile scales both to full range); of
# doubles, as float64. Any other (float, and lossy codecs: Vorbis, Opus, MP3) as float32.
_INT16 = frozenset(
    {
        "PCM_S8",
        "PCM_U8",
        "PCM_16",
        "ULAW",
        "ALAW",
        "IMA_ADPCM",
        "MS_ADPCM",
        "GSM610",
        "VOX_ADPCM",
        "G721_32",
        "G723_24",
        "G723_40",
        "DWVW_12",
        "DWVW_16",
        "DPCM_8",
        "DPCM_16",
        "ALAC_16",
        "NMS_ADPCM_16",
        "NMS_ADPCM_24",
        "NMS_ADPCM_32",
    }
)
_INT32 = frozenset({"PCM_24", "PCM_32", "DWVW_24", "ALAC_20", "ALAC_24", "ALAC_32"})


def native_dtype(subtype: str) -> str:
    """The sample type a file of libsndfile ``subtype`` holds, as a bank stores it."""
    if subtype in _INT16:
        return "int16"
    if subtype in _INT32:
        return "int32"
    return "float64" if subtype == "DOUBLE" else "float32"


def to_float(samples: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """Stored samples as floats in ``[-1, 1]``: int16 over 32,768, int32 over 2**31 (what
    libsndfile reads as floats from the same file, bit for bit); floats cast to ``dtype``.

    What ``get`` and batches by source return for a ``Sound``; use it on the
    windows ``AsSlice`` gives, which are stored rows (``transform=to_float``).
    """
    samples = np.asarray(samples)
    if samples.dtype.kind in "iu":
        scale = np.asarray(1.0 / 2 ** (8 * samples.dtype.itemsize - 1), dtype=dtype)
        return np.multiply(samples, scale, dtype=dtype)  # one pass: cast and scale
    return samples.astype(dtype, copy=False)


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
        The float type reads return (``get``, batches by source, ``serve``
        with ``GetId``), in ``[-1, 1]``: ``float32`` by default.
    native
        Store samples as the file holds them (the default): int16 for PCM of
        up to 16 bits, int32 for 24- and 32-bit PCM, float32 for float and
        lossy formats (float64 for doubles), so a bank of 16-bit WAVs is the
        size of the WAVs, and building costs no conversion a sample. Reads
        scale them to ``dtype`` (:func:`to_float`): for samples kept as they
        are, bit for bit what ``native=False`` stores. Samples that are
        computed (``mono`` averaging channels, resampling to ``sr``) are
        rounded to the file's type, within half a step of it (-96 dB for 16
        bits). Every source of a column must then hold one sample type: a
        corpus that mixes 16-bit with 24-bit or float files needs
        ``native=False``, which stores ``dtype``. Rows read as they are
        stored (``bank.audio[a:b]``, ``to_dask``, ``GetIndex``, ``AsSlice``)
        are the stored samples.
    strict
        Refuse files whose header declares more audio than the file holds
        (a truncated download or copy). libsndfile would silently return the
        part that is there.
    max_samples
        Most samples a sound may have, counted over all its channels (a
        second of 48 kHz stereo is 96,000), both as the file holds them and
        as stored, after ``mono`` and resampling to ``sr``. The default,
        345,600,000, is one hour of 48 kHz stereo (1.4 GB as ``float32``);
        ``None`` for no limit. A file whose header declares more is refused
        from its header, before any audio is decoded: a compressed bomb (a
        small FLAC of silence that declares hours) or a rate far below
        ``sr`` fails as a source instead of exhausting a worker's memory.
        A bank file never sets it, nor ``strict`` or ``dtype``: a ``Sound``
        rebuilt from a bank's record takes only ``sr`` (1 to 768,000) and
        ``mono`` from it.
    **options
        See :class:`features.base.Feature`.
    """

    __re__ = r"(?i)\.(wav|flac|ogg|oga|aiff?|aifc|au|caf|w64|rf64|mp3|opus)$"
    storage = "rows"
    decodes_in_c = True  # libsndfile, or the samples' bytes as they are
    # int16 and float32 samples mean different things: never cast one into the other's column.
    exact_dtype: ClassVar[str] = (
        "its files hold different sample types: build with Sound(native=False), which stores "
        "every file's samples as floats"
    )
    # From a bank file: the rate and mono (max_samples, strict and dtype keep their defaults).
    recorded_params = {
        **Feature.recorded_params,
        "sr": records.integer(1, MAX_RECORDED_SR),
        "mono": records.boolean,
    }

    def __init__(
        self,
        sr: int = 22050,
        mono: bool = True,
        dtype: str = "float32",
        native: bool = True,
        strict: bool = True,
        max_samples: int | None = MAX_SAMPLES,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if int(sr) <= 0:
            raise ValueError(f"Sound sr must be a positive sample rate, got {sr!r}")
        if np.dtype(dtype).kind != "f":
            raise ValueError(f"Sound dtype must be a float type, got {dtype!r}")
        if max_samples is not None and int(max_samples) < 1:
            raise ValueError(f"Sound max_samples must be positive or None, got {max_samples!r}")
        self.sr = int(sr)
        self.mono = bool(mono)
        self.dtype = str(np.dtype(dtype))
        self.native = bool(native)
        self.strict = bool(strict)
        self.max_samples = None if max_samples is None else int(max_samples)

    @property
    def attrs(self) -> dict[str, Any]:
        return {"sr": self.sr, "mono": self.mono}

    def decode(self, data: bytes, name: str = "") -> np.ndarray:
        if not data:
            raise DecodeError("empty file (0 bytes)")
        plain = _pcm16_wav(data) if self.native else None
        if plain is not None:
            audio, native_sr = plain
            self._check_length(len(audio), audio.shape[1], native_sr)
        else:
            audio, native_sr = self._read(data)
        if self.mono:
            audio = audio[:, 0] if audio.shape[1] == 1 else _average(audio)
        if native_sr != self.sr:
            import soxr

            audio = _resample(soxr, audio, native_sr, self.sr)
        return np.ascontiguousarray(audio, dtype=audio.dtype if self.native else self.dtype)

    def _read(self, data: bytes) -> tuple[np.ndarray, int]:
        """``(samples (frames, channels), rate)`` of any format libsndfile reads."""
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
                self._check_length(f.frames, f.channels, native_sr)
                stored = native_dtype(f.subtype) if self.native else "float32"
                return f.read(dtype=stored, always_2d=True), native_sr
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

    def as_read(self, output: np.ndarray) -> np.ndarray:
        return self.from_stored(output)

    def from_stored(self, value: Any, name: str = "") -> np.ndarray:
        """A source's samples as floats of ``dtype`` (see :func:`to_float`)."""
        return to_float(value, self.dtype)

    def from_stored_rows(self, rows: np.ndarray, bounds: Sequence[int]) -> list[Any]:
        """A batch's samples as floats in one pass and one array (a fresh array a clip made
        the page faults of its allocation most of a read), each sound a view of it; a
        subclass with its own ``from_stored`` gets it called sound by sound."""
        if type(self).from_stored is not Sound.from_stored:
            return super().from_stored_rows(rows, bounds)
        return np.split(to_float(rows, self.dtype), bounds[1:-1])

    def _check_length(self, frames: int, channels: int, native_sr: int) -> None:
        """Refuse, from the header, a sound of more than ``max_samples`` (decoded or stored)."""
        if self.max_samples is None:
            return
        decoded = frames * channels
        out_frames = frames if native_sr == self.sr else math.ceil(frames * self.sr / native_sr)
        stored = out_frames * (1 if self.mono else channels)
        if max(decoded, stored) <= self.max_samples:
            return
        declared = (
            f"declares {frames:,} frames x {channels} channel{'s' if channels > 1 else ''} at "
            f"{native_sr:,} Hz ({frames / native_sr:,.1f} s) = {decoded:,} samples"
        )
        if stored > decoded:
            declared += f", {stored:,} once resampled to {self.sr:,} Hz"
        raise DecodeError(
            f"{declared}, past the limit of {self.max_samples:,} (Sound(max_samples=...)); "
            "refused before decoding (a decompression bomb, or a sound longer than this bank "
            "takes)"
        )

    def plot(
        self,
        sounds: np.ndarray | Sequence[np.ndarray],
        titles: str | Sequence[Any] | None = None,
        sr: int | None = None,
    ) -> Figure:
        """Waveforms, one row per sound: ``bank.sound.plot(bank.sound.get(id), titles=id)``.

        Parameters
        ----------
        sounds
            One sound, mono ``(n,)`` or multichannel ``(n, channels)`` (what
            ``proxy.get(id)`` returns), a list of them (of any lengths), or a
            batch of equal-length ones: ``(n_sounds, n)`` for a mono feature,
            ``(n_sounds, n, channels)`` otherwise.
            Channels share their sound's row, one line each.
        titles
            One title per sound (ids, label names), or ``None``.
        sr
            Sample rate for the time axis; this feature's ``sr`` by default
            (the rate the bank stores).

        Notes
        -----
        The x axis is in seconds, shared by every row so durations compare.
        Sounds longer than a few thousand samples are drawn as their min / max
        envelope, which looks the same and draws in constant time. Returns a
        :class:`matplotlib.figure.Figure` (matplotlib:
        ``pip install 'h5bank[plot]'``); save it with ``fig.savefig``.
        """
        from features.plot import grid, titles_for

        rate = int(sr if sr is not None else self.sr)
        if rate <= 0:
            raise ValueError(f"sr must be a positive sample rate, got {sr!r}")
        if isinstance(sounds, np.ndarray) and (
            sounds.ndim == 3 or (sounds.ndim == 2 and self.mono)
        ):
            sounds = list(sounds)  # a batch: (n_sounds, samples[, channels]), as a DataLoader gives
        batch = _as_sounds(sounds)
        names = titles_for(titles, len(batch))
        fig, axes = grid(len(batch), 1, (8.0, 1.6), sharex=True)
        for ax, audio, name in zip(axes, batch, names, strict=True):
            channels = audio.reshape(len(audio), -1)
            for c in range(channels.shape[1]):
                label = f"channel {c}" if channels.shape[1] > 1 else None
                _draw_waveform(ax, channels[:, c], rate, label)
            if channels.shape[1] > 1:
                ax.legend(loc="upper right", fontsize=7)
            ax.tick_params(labelsize=7)
            if name is not None:
                ax.set_title(name, fontsize=8, loc="left")
        for ax in axes[:-1]:
            ax.tick_params(labelbottom=False)
        axes[-1].set_xlabel(f"seconds ({rate:,} Hz)", fontsize=8)
        return fig


def _pcm16_wav(data: bytes) -> tuple[np.ndarray, int] | None:
    """``(samples, rate)`` of a plain 16-bit PCM WAV, read with the standard library's
    ``wave`` (its header) and numpy (the samples are the file's bytes: one copy), where
    libsndfile reads a file object through a Python call a block. ``None`` for any other
    file, and for one that is not whole (libsndfile then says what is wrong)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    buffer = io.BytesIO(data)
    try:
        with wave.open(buffer) as f:  # leaves the buffer at the first byte of the samples
            if f.getsampwidth() != 2 or f.getcomptype() != "NONE":
                return None
            frames, channels, rate = f.getnframes(), f.getnchannels(), f.getframerate()
            start = buffer.tell()
    except (wave.Error, EOFError, ValueError, OSError):
        return None  # WAVE_FORMAT_EXTENSIBLE, other encodings, damage: libsndfile's to read
    if channels < 1 or rate < 1 or len(data) - start < frames * channels * 2:
        return None
    samples = np.frombuffer(data, "<i2", count=frames * channels, offset=start)
    return samples.reshape(frames, channels).copy(), rate  # the one copy, writable


def _resample(soxr: Any, audio: np.ndarray, rate: int, to: int) -> np.ndarray:
    """``audio`` resampled from ``rate`` to ``to``, in its own sample type (integers rounded,
    and clipped to their range). soxr's own integer output adds random dither: the same
    file would store different samples in two builds."""
    if audio.dtype.kind == "f":
        return soxr.resample(audio, rate, to)
    out = soxr.resample(audio.astype(np.float64 if audio.itemsize > 2 else np.float32), rate, to)
    limits = np.iinfo(audio.dtype)
    return np.clip(np.rint(out), limits.min, limits.max).astype(audio.dtype)


def _average(audio: np.ndarray) -> np.ndarray:
    """The mean of ``audio``'s channels, in its own sample type (integers rounded)."""
    if audio.dtype.kind == "f":
        return audio.mean(axis=1, dtype=audio.dtype)
    return np.rint(audio.mean(axis=1)).astype(audio.dtype)


def _as_sounds(sounds: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """``sounds`` as a list of single sounds, each ``(n,)`` or ``(n, channels)``."""
    batch = [sounds] if isinstance(sounds, np.ndarray) else [np.asarray(s) for s in sounds]
    for audio in batch:
        if audio.ndim not in (1, 2):
            raise ValueError(f"a sound is (n,) or (n, channels), got shape {audio.shape}")
        if audio.ndim == 2 and audio.shape[1] > audio.shape[0]:
            raise ValueError(
                f"a sound of shape {audio.shape} has more channels than samples: pass "
                "(n_samples, channels) (transpose a channels-first array), or a list of sounds"
            )
    return batch


def _draw_waveform(ax: Any, audio: np.ndarray, sr: int, label: str | None) -> None:
    """One channel against seconds; long ones as their min / max envelope."""
    if len(audio) > 2 * _ENVELOPE_BINS:
        starts = np.linspace(0, len(audio), _ENVELOPE_BINS, endpoint=False).astype(np.int64)
        low = np.minimum.reduceat(audio, starts)
        high = np.maximum.reduceat(audio, starts)
        times = np.append(starts, len(audio)) / sr
        ax.stairs(high, times, baseline=low, fill=True, alpha=0.8, label=label)
    else:
        ax.plot(np.arange(len(audio)) / sr, audio, linewidth=0.6, label=label)
