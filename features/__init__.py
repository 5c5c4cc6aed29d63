"""Built-in features: how one source becomes arrays in a bank.

See :class:`features.base.Feature` for the contract a custom feature follows.
"""

from typing import Any

from features.array import Array
from features.base import Feature, SourceLike
from features.errors import DecodeError, H5BankError, SourceReadError
from features.image import Image
from features.labels import DirLabels
from features.sound import Sound
from features.text import Bytes, String


def from_record(record: dict[str, Any]) -> Feature | None:
    """The built-in feature a schema record (``Feature.describe()``) describes, or ``None``.

    Only classes of this package are rebuilt (from their recorded ``attrs``):
    a bank never makes h5bank import code named in a file.
    """
    name = str(record.get("class", "")).rpartition(".")[2]
    cls = globals().get(name) if str(record.get("class", "")).startswith("features.") else None
    if not (isinstance(cls, type) and issubclass(cls, Feature) and name in __all__):
        return None
    try:
        return cls.from_attrs(dict(record.get("attrs") or {}))
    except (TypeError, ValueError):
        return None


__all__ = [
    "Array",
    "Bytes",
    "DecodeError",
    "DirLabels",
    "Feature",
    "H5BankError",
    "Image",
    "Sound",
    "SourceLike",
    "SourceReadError",
    "String",
    "from_record",
]
