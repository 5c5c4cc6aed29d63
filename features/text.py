"""Text and raw bytes."""

from __future__ import annotations

from typing import Any

from features.base import Feature, from_record
from features.errors import DecodeError


class String(Feature):
    """The text of a source (``.txt`` files by default), stored as UTF-8; reads give ``str``.

    Parameters
    ----------
    encoding
        Encoding of the source files; the bank always stores UTF-8.
    """

    __re__ = r"(?i)\.txt$"
    storage = "bytes"

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
        return bytes(value).decode("utf-8")


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
    """

    storage = "bytes"

    def __init__(self, decoder: Feature | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.decoder = decoder

    @property
    def attrs(self) -> dict[str, Any]:
        return {"decoder": None if self.decoder is None else self.decoder.describe()}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> Bytes:
        record = attrs.get("decoder")
        return cls(decoder=from_record(record) if record else None)

    def load(self, source: Any) -> bytes:
        data = source.read()
        if not data:
            raise DecodeError("empty file (0 bytes)")
        return data

    def from_stored(self, value: Any, name: str = "") -> Any:
        data = bytes(value)
        return data if self.decoder is None else self.decoder.decode(data, name)
