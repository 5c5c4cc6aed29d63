"""Images, decoded with Pillow (JPEGs and PNGs directly, other formats through imageio's
Pillow plugin)."""

from __future__ import annotations

import functools
import importlib.util
import posixpath
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import imageio.v3 as iio
import numpy as np

from features import records
from features.base import Feature
from features.errors import DecodeError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_MODES = (None, "L", "LA", "RGB", "RGBA")

# Formats decoded by Pillow alone (Image._read_pillow), by their first bytes.
_PILLOW_ALONE = {b"\xff\xd8\xff": "JPEG", b"\x89PN": "PNG"}

# Optional Pillow openers imageio's Pillow plugin tries to import every time it opens an image.
_OPTIONAL_OPENERS = ("pillow_heif",)


@functools.cache
def _skip_absent_openers() -> None:
    """Make imageio's per-image ``import pillow_heif`` attempt cheap when it is not installed.

    imageio 2.3x's Pillow plugin runs ``from pillow_heif import ...`` in its
    constructor, for every image. A failed import is not cached, so each one
    searches every ``sys.path`` entry again: about 60 of the 170 µs a 64x64
    PNG took (measured, 2,000 images). A ``None`` in ``sys.modules`` makes
    that import fail at once; it is set only for openers that are not
    installed, so an installed ``pillow_heif`` still registers itself.
    """
    for name in _OPTIONAL_OPENERS:
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = None  # type: ignore[assignment]


_RESAMPLE = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


# Pixels above which an image is refused unless Image(max_pixels=...) says otherwise.
MAX_PIXELS = 100_000_000
# The longest side of an image size read from a bank file (PNG's and Pillow's sizes go further,
# a size set in code may too).
MAX_RECORDED_SIDE = 65535


class Image(Feature):
    """An image per source, as a ``uint8`` array ``(H, W)`` (mode ``L``) or ``(H, W, C)``.

    Parameters
    ----------
    size
        ``(height, width)`` to resize every image to, or ``None`` to keep each
        image's own size. With a size, the bank stores one item per source,
        ``(n, height, width, channels)``; without, images are stored flattened
        with a shape table and come back in their own shape.
    mode
        Pillow mode every image is converted to: ``"RGB"``, ``"RGBA"``,
        ``"L"`` (grayscale) or ``"LA"``; ``None`` keeps each file's own mode.
        Set it when a folder mixes RGB, RGBA and grayscale files.
    resample
        Resampling filter used with ``size`` (a Pillow filter name).
    draft
        With ``size``, decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
        scaling, Pillow's ``draft``) when both its sides are at least twice
        the target's, then resize as usual: fewer pixels to decode and to
        resize. The pixels differ slightly from a full decode + resize (see
        ``docs/features.md``, "JPEGs at training size"); ``draft=False``
        keeps every pixel equal to Pillow's full decode + resize. No effect
        on other formats, on JPEGs smaller than twice the target, or
        without ``size``.
    max_pixels
        Largest image, in pixels, that is decoded (default 100 million, about
        a 10,000 x 10,000 image; ``None`` for no limit beyond Pillow's own).
        A file declaring more is refused from its header, before any pixel is
        decoded: a decompression bomb (a tiny file that declares a huge image)
        fails as a source instead of exhausting a worker's memory. A bank
        file never sets it: an ``Image`` rebuilt from a bank's record takes
        only ``size`` and ``mode`` from it (checked, see
        :mod:`features.records`).
    **options
        See :class:`features.base.Feature` (pattern, compression, ...).
    """

    __re__ = r"(?i)\.(png|jpe?g|bmp|gif|tiff?|webp)$"
    decodes_in_c = True  # Pillow's codecs
    # From a bank file: the size (each side at most 65535, at most MAX_PIXELS in all: a
    # resize target is an allocation) and the mode; max_pixels always keeps its default.
    recorded_params = {
        **Feature.recorded_params,
        "size": records.image_size(MAX_RECORDED_SIDE, MAX_PIXELS),
        "mode": records.one_of(_MODES),
    }

    def __init__(
        self,
        size: tuple[int, int] | None = None,
        mode: str | None = None,
        resample: str = "bilinear",
        draft: bool = True,
        max_pixels: int | None = MAX_PIXELS,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.max_pixels = None if max_pixels is None else int(max_pixels)
        if mode not in _MODES:
            raise ValueError(f"Image mode must be one of {_MODES}, got {mode!r}")
        if resample not in _RESAMPLE:
            raise ValueError(f"Image resample must be one of {_RESAMPLE}, got {resample!r}")
        if size is not None:
            size = tuple(int(s) for s in size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"Image size must be (height, width), got {size!r}")
        self.size = size
        self.mode = mode
        self.resample = resample
        self.draft = bool(draft)

    @property
    def storage(self) -> str:  # type: ignore[override]
        return "item" if self.size else "flat"

    @property
    def attrs(self) -> dict[str, Any]:
        if self.size is None:
            return {"size": None, "mode": self.mode}
        return {"size": list(self.size), "mode": self.mode, "draft": self.draft}

    def load(self, source: Any) -> np.ndarray:
        if isinstance(source, np.ndarray):  # derived from another image feature
            return self.convert(source)
        return self.decode(source.read(), source.id)

    def decode(self, data: bytes, name: str = "") -> np.ndarray:
        """Decode PNG/JPEG/... bytes, then convert the mode and resize as configured."""
        if not data:
            raise DecodeError("empty file (0 bytes)")
        extension = posixpath.splitext(name)[1].lower() or None
        try:
            try:
                alone = _PILLOW_ALONE.get(data[:3])
                pixels = None if alone is None else self._read_pillow(data, alone)
                if pixels is not None:
                    return pixels
                array = self._read(data, extension)
            except DecodeError:
                raise
            except Exception:
                if extension is None:
                    raise
                # The name's extension may lie (a JPEG saved as .png); let Pillow sniff.
                array = self._read(data, None)
        except DecodeError:
            raise
        except Exception as error:
            raise DecodeError(
                f"{_diagnose(data, error)} (first bytes: {data[:8].hex(' ')})"
            ) from None
        return self._resize(array) if self.size else array

    def _read(self, data: bytes, extension: str | None) -> np.ndarray:
        """Decode the first frame with imageio's Pillow plugin, refusing huge images first."""
        from PIL.Image import DecompressionBombWarning

        _skip_absent_openers()
        with warnings.catch_warnings():
            # Pillow warns from 89 M pixels; this feature has its own limit.
            warnings.simplefilter("ignore", DecompressionBombWarning)
            file = iio.imopen(data, "r", extension=extension, plugin="pillow")
        with file:
            if self.max_pixels is not None:
                # The plugin's Pillow image has read the header only: its size costs nothing.
                image = getattr(file, "_image", None)
                if image is not None:
                    width, height = image.size
                else:
                    height, width = file.properties(index=0).shape[:2]
                self._check_pixels(width, height)
            # An image already in the wanted mode is not converted (Pillow would copy it); the
            # plugin changes "P" and "I" images even without a mode, so those keep it.
            image = getattr(file, "_image", None)
            same = image is not None and image.mode == self.mode not in ("P", "I")
            return file.read(index=0, mode=None if same else self.mode)

    def _read_pillow(self, data: bytes, format: str) -> np.ndarray | None:
        """A JPEG or PNG with Pillow alone: the mode and size applied to Pillow's image, so the
        full-size pixels are not copied into arrays (imageio's read converts, copies twice and
        parses the metadata: 0.5 ms of a 600 px photo's 2.1, a third of a 64 px PNG's decode),
        and a JPEG at reduced scale when ``draft`` allows. The same calls as imageio's, so the
        same pixels; ``None`` for a PNG imageio changes without a ``mode`` (palettes, 16-bit,
        1-bit), which it reads instead."""
        import io

        from PIL import Image as PILImage
        from PIL.Image import DecompressionBombWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DecompressionBombWarning)  # max_pixels decides
            image = PILImage.open(io.BytesIO(data), formats=[format])
        with image:
            self._check_pixels(*image.size)
            if format == "PNG" and self.mode is None and image.mode not in _MODES:
                return None
            if format == "JPEG" and self.size and self.draft:
                height, width = self.size
                image.draft(None, (width, height))  # only the scale: no colour-space change
            if self.mode is not None and image.mode != self.mode:
                image = image.convert(self.mode)
            # A new array, writable as imageio's were (a view of Pillow's bytes is read-only).
            return np.array(self._fit(image) if self.size else image)

    def _check_pixels(self, width: int, height: int) -> None:
        """Refuse an image declaring more than ``max_pixels`` (from its header: nothing decoded)."""
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise DecodeError(
                f"declares {width} x {height} = {width * height:,} pixels, past the "
                f"limit of {self.max_pixels:,} (Image(max_pixels=...)); refused before "
                "decoding (a decompression bomb, or an image larger than this bank takes)"
            )

    def convert(self, array: np.ndarray) -> np.ndarray:
        """Apply this feature's mode and size to an already decoded image array."""
        if self.mode:
            from PIL import Image as PILImage

            array = np.asarray(PILImage.fromarray(array).convert(self.mode))
        return self._resize(array) if self.size else array

    def _resize(self, array: np.ndarray) -> np.ndarray:
        from PIL import Image as PILImage

        if array.shape[:2] == tuple(self.size):  # type: ignore[arg-type]
            return array
        return np.asarray(self._fit(PILImage.fromarray(array)))

    def _fit(self, image: Any) -> Any:
        """A Pillow image resized to ``size`` with ``resample`` (itself when it has that size)."""
        from PIL import Image as PILImage

        height, width = self.size  # type: ignore[misc]
        if image.size == (width, height):
            return image
        return image.resize((width, height), getattr(PILImage.Resampling, self.resample.upper()))

    def plot(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        titles: str | Sequence[Any] | None = None,
        ncols: int = 8,
        size: float = 1.5,
    ) -> Figure:
        """A grid of thumbnails: ``bank.images.plot(bank.images[:16], titles=ids)``.

        Parameters
        ----------
        images
            One image ``(H, W)`` or ``(H, W, C)``, a batch ``(N, H, W[, C])``
            (what a fixed-size bank's ``proxy[:16]`` returns), or a list of
            arrays of different shapes (``[proxy.get(i) for i in ids]`` from a
            bank without ``size``). Whether a 3-D array is one color image or
            a batch of grayscale ones follows this feature's ``mode``; with no
            mode, a last axis of 1 to 4 means channels.
        titles
            One title per image (ids, label names), or ``None``.
        ncols
            Thumbnails per row (fewer when there are fewer images).
        size
            Width and height of each thumbnail, in inches.

        Notes
        -----
        Grayscale is drawn with the ``gray`` colormap over the whole ``uint8``
        range (not stretched image by image), ``LA`` as gray with its alpha;
        axes are off. Returns a :class:`matplotlib.figure.Figure` holding one
        axes per image (matplotlib: ``pip install 'h5bank[plot]'``); save it
        with ``fig.savefig("grid.png")``.
        """
        from features.plot import grid, titles_for

        batch = self._as_batch(images)
        names = titles_for(titles, len(batch))
        fig, axes = grid(len(batch), ncols, (size, size))
        for ax, image, name in zip(axes, batch, names, strict=True):
            pixels, gray = _displayable(image)
            if gray:
                limits = (0, 255) if pixels.dtype == np.uint8 else (None, None)
                ax.imshow(pixels, cmap="gray", vmin=limits[0], vmax=limits[1])
            else:
                ax.imshow(pixels)
            ax.set_axis_off()
            if name is not None:
                ax.set_title(name, fontsize=7)
        return fig

    def _as_batch(self, images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
        """``images`` as a list of single images (see :meth:`plot`)."""
        if not isinstance(images, np.ndarray):
            batch = [np.asarray(image) for image in images]
            bad = [image.shape for image in batch if image.ndim not in (2, 3)]
            if bad:
                raise ValueError(f"each image must be (H, W) or (H, W, C), got shapes {bad[:3]}")
            return batch
        if images.ndim == 1:
            raise ValueError(
                "got a 1-D array: a slice of an image feature stored without a size is raveled "
                "pixels; pass the images themselves, [proxy.get(id) for id in ids]"
            )
        if images.ndim == 2:
            return [images]
        if images.ndim == 4:
            return list(images)
        if images.ndim == 3:
            one = self.mode != "L" if self.mode is not None else images.shape[2] <= 4
            return [images] if one else list(images)
        raise ValueError(
            f"images must be (H, W), (H, W, C), (N, H, W) or (N, H, W, C), got {images.shape}"
        )


def _displayable(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """What ``imshow`` draws for one image, and whether it is grayscale."""
    if image.ndim == 2:
        return image, True
    channels = image.shape[2]
    if channels == 1:
        return image[..., 0], True
    if channels == 2:  # LA: gray with alpha, as RGBA
        return np.concatenate([image[..., :1]] * 3 + [image[..., 1:]], axis=2), False
    if channels in (3, 4):
        return image, False
    raise ValueError(f"cannot draw an image of {channels} channels; images have 1 to 4")


_SIGNATURES = {
    b"\x89PNG": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


def _diagnose(data: bytes, error: Exception) -> str:
    """Why Pillow cannot read ``data`` (imageio's message hides the reason)."""
    import io

    from PIL import Image as PILImage

    looks_like = next((name for sig, name in _SIGNATURES.items() if data.startswith(sig)), None)
    try:
        image = PILImage.open(io.BytesIO(data))
    except PILImage.UnidentifiedImageError:
        if looks_like:
            return f"starts like a {looks_like} file but its header cannot be read (truncated or corrupt)"
        return "not an image format Pillow can read"
    except Exception as pillow_error:
        return f"cannot open the image: {pillow_error}"
    try:
        image.load()
    except Exception as pillow_error:
        return f"{image.format or 'image'} data is broken: {pillow_error}"
    finally:
        image.close()
    return str(error).strip() or type(error).__name__
