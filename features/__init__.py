"""Built-in features: how one source becomes arrays in a bank.

See :class:`features.base.Feature` for the contract a custom feature follows.
"""

from features.array import Array
from features.base import Feature, SourceLike, from_record
from features.errors import DecodeError, H5BankError, RecordError, RecordWarning, SourceReadError
from features.image import Image
from features.labels import DirLabels
from features.sound import Sound
from features.text import Bytes, String

__all__ = [
    "Array",
    "Bytes",
    "DecodeError",
    "DirLabels",
    "Feature",
    "H5BankError",
    "Image",
    "RecordError",
    "RecordWarning",
    "Sound",
    "SourceLike",
    "SourceReadError",
    "String",
    "from_record",
]
