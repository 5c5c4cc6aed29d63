"""Text and raw bytes."""

from __future__ import annotations

from typing import Any

from features import records
from features.base import Feature, rebuild
from features.errors import DecodeError, RecordError


class String(Feature):
    """The text of a source (``.txt`` files by default), stored as UTF-8; reads give ``str``.

    Parameters
    ----------
    encoding
        Encoding of the source files; the bank always stores UTF-8.
    """

    __re__ = r"(?i)\.txt$"
    storage = "bytes"
    recorded_params = {**Feature.recorded_params, "encoding": records.text_encoding}

    def __init__(self, encoding: str = "utf-8", **options: Any) -> None:
        super().__init__(**options)
        self.encoding = encoding

    @property
    def attrs(self) -> dict[str, Any]:
        return {"encoding": "utf-8"}

    def decode(self, data: bytes, name: str = "") -> str:
        try:
            return data.decode(self.encoding)
        except UnicodeDecodeError as error:
            raise DecodeError(f"not {self.encoding} text: {error}") from None

    def from_stored(self, value: Any, name: str = "") -> str:
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            raise DecodeError(
                f"{name or 'a source'}: its stored text is not UTF-8 ({error.reason} at byte "
                f"{error.start}): the bank is damaged (h5bank writes UTF-8)"
            ) from None


def decoder_record(record: Any) -> Feature | None:
    """The check of ``Bytes``'s recorded ``decoder``: ``null``, or the record of a built-in
    feature that decodes bytes (rebuilt with the same checks as any record)."""
    if record is None:
        return None
    decoder = rebuild(record)
    if decoder is not None and type(decoder).decode is Feature.decode:
        raise RecordError(f"{type(decoder).__name__} decodes no bytes: it cannot be a decoder")
    return decoder


class Bytes(Feature):
    """A source's original bytes (a PNG, a FLAC...), stored as they are.

    The seed notebook found decoded PNGs take about twice the space of the
    files; a ``Bytes`` feature keeps the compressed encoding and decodes on
    read instead.

    Parameters
    ----------
    decoder
        A feature whose ``decode`` turns the stored bytes back into arrays on
        read (``Bytes(decoder=Image(mode="RGB"))``); ``None`` returns ``bytes``.
        Rebuilt from a bank file, the decoder's record follows the rules of
        any feature record (:func:`features.base.rebuild`); one naming a class
        that is not built in gives no decoder.
    """

    storage = "bytes"
    recorded_params = {**Feature.recorded_params, "decoder": decoder_record}

    def __init__(self, decoder: Feature | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.decoder = decoder

    @property
    def attrs(self) -> dict[str, Any]:
        return {"decoder": None if self.decoder is None else self.decoder.describe()}

    def load(self, source: Any) -> bytes:
        data = source.read()
        if not data:
            raise DecodeError("empty file (0 bytes)")
        return data

    def from_stored(self, value: Any, name: str = "") -> Any:
        data = bytes(value)
        return (
            data if self.decoder is None else self.decoder.as_read(self.decoder.decode(data, name))
        )
