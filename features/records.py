"""Checks of the parameters a bank's schema record may give a feature rebuilt from it.

A bank file comes from anywhere (downloaded, shared), so its record of a
feature (``Feature.describe()``) is untrusted input: *the file describes, the
code decides*. Each built-in feature declares, in its ``recorded_params``,
the recorded parameters that describe its stored data (a sample rate, an
image size, a dtype...) with one check each from this module; safety limits
(``Image(max_pixels=)``, ``Sound(max_samples=)``, ``Sound(strict=)``) are
never among them, so a feature rebuilt from a file always has the code's
defaults for those. A check takes the value as JSON gave it and returns the
constructor argument, or raises :class:`~features.errors.RecordError`
saying what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from features.errors import RecordError

# A check of one recorded parameter: the JSON value in, the constructor argument out.
Check = Callable[[Any], Any]

# The longest recorded text (a pattern, a dtype or an encoding name) a check looks at.
MAX_TEXT = 1000


def boolean(value: Any) -> bool:
    """``value`` if it is ``true`` or ``false`` (not ``0``, ``1`` or ``"yes"``)."""
    if not isinstance(value, bool):
        raise RecordError(f"must be true or false, got {_shown(value)}")
    return value


def one_of(options: Sequence[Any]) -> Check:
    """A check that takes only one of ``options`` (``None`` among them if it may be null)."""

    def check(value: Any) -> Any:
        if not isinstance(value, (str, type(None))) or value not in options:
            raise RecordError(f"must be one of {list(options)}, got {_shown(value)}")
        return value

    return check


def integer(low: int, high: int) -> Check:
    """A check that takes only a JSON integer from ``low`` to ``high``."""

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecordError(f"must be an integer, got {_shown(value)}")
        if not low <= value <= high:
            raise RecordError(f"must be from {low:,} to {high:,}, got {value:,}")
        return value

    return check


def image_size(max_side: int, max_pixels: int) -> Check:
    """A check of an image size: ``null``, or ``[height, width]`` of sides from 1 to
    ``max_side`` and at most ``max_pixels`` pixels."""

    side = integer(1, max_side)

    def check(value: Any) -> tuple[int, int] | None:
        if value is None:
            return None
        if not isinstance(value, list) or len(value) != 2:
            raise RecordError(f"must be [height, width], got {_shown(value)}")
        height, width = (side(s) for s in value)
        if height * width > max_pixels:
            raise RecordError(
                f"{height} x {width} = {height * width:,} pixels, past the limit of "
                f"{max_pixels:,} for an image size read from a file"
            )
        return height, width

    return check


def numeric_dtype(value: Any) -> str | None:
    """``null``, or the name of a numeric numpy dtype (bool, integer, float, complex)."""
    if value is None:
        return None
    text = _text(value)
    try:
        dtype = np.dtype(text)
    except Exception:
        raise RecordError(f"not a numpy dtype: {_shown(value)}") from None
    if dtype.kind not in "biufc":
        raise RecordError(f"must be a number type (bool, int, float, complex), got {dtype}")
    return str(dtype)


def text_encoding(value: Any) -> str:
    """``value`` if it names a text encoding Python knows (``"utf-8"``, ``"latin-1"``...)."""
    text = _text(value)
    try:
        "".encode(text)
        b"".decode(text)
    except (LookupError, ValueError):  # unknown, or a bytes-to-bytes codec such as "zlib"
        raise RecordError(f"not a text encoding: {_shown(value)}") from None
    return text


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise RecordError(f"must be a string, got {_shown(value)}")
    if len(value) > MAX_TEXT or "\0" in value:
        raise RecordError(f"must be a string of at most {MAX_TEXT} characters and no NUL")
    return value


def _shown(value: Any) -> str:
    """``value`` as an error message shows it: its repr, cut to a line."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."
