"""The ``Feature`` contract.

A feature turns one source into arrays. It says which sources it accepts
(``__re__``, searched in the source id), how the writer lays its output out
on disk (``storage``), which HDF5 dataset options to use, and which parameters
to record in the bank (``attrs``). It knows nothing about Dask, HDF5 paths or
the build: the pipeline calls ``load`` in decode tasks on any worker, so a
feature must be picklable and cheap to copy.

Storage kinds (the writer owns how each is laid out, see ``pipeline.layout``):

``rows``
    ``load`` returns an array whose axis 0 is concatenated with every other
    source's (sounds along time, logs along steps); trailing shape and dtype
    are fixed by the first source written.
``item``
    ``load`` returns one item of fixed shape; the bank stores ``(n, *shape)``.
``flat``
    items of varying shape are raveled and concatenated; a shape table gives
    each back its shape.
``bytes``
    ``load`` returns ``bytes`` (or ``str``, stored as UTF-8); the bank stores
    a ``uint8`` concatenation and reads hand back ``bytes`` / ``str``.
``category``
    ``load`` returns a name; the bank stores an ``int64`` code per source and
    the sorted names as the ``names`` attribute.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

# Options a feature may pass on to h5py.Group.create_dataset.
DATASET_OPTIONS = (
    "compression",
    "compression_opts",
    "shuffle",
    "chunks",
    "fletcher32",
    "scaleoffset",
)


@runtime_checkable
class SourceLike(Protocol):
    """What ``Feature.load`` receives for a raw source (``pipeline.sources.Source``)."""

    id: str
    url: str | None

    def read(self) -> bytes: ...

    def open(self) -> io.BytesIO: ...


class BankMember:
    """A class attribute of a bank type (a feature or a group of them).

    On the class it is itself; on an open bank it reads as the bank's proxy
    for it (``bank.images`` is the images feature's proxy).
    """

    _name: str

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return instance._child(self._name)


# The built-in features, by class name: the only classes a bank's schema record can name
# (a bank never makes h5bank import code named in a file). Filled as this package's
# feature classes are defined.
BUILT_IN: dict[str, type[Feature]] = {}


def from_record(record: dict[str, Any]) -> Feature | None:
    """The built-in feature a schema record (``Feature.describe()``) describes, or ``None``.

    Only classes of this package are rebuilt (from their recorded ``attrs``):
    a bank never makes h5bank import code named in a file.
    """
    qualified = str(record.get("class", ""))
    cls = BUILT_IN.get(qualified.rpartition(".")[2]) if qualified.startswith("features.") else None
    if cls is None:
        return None
    try:
        return cls.from_attrs(dict(record.get("attrs") or {}))
    except (TypeError, ValueError):
        return None


class Feature(BankMember):
    """Base class of every feature; subclass it and override ``load`` or ``decode``.

    Parameters
    ----------
    pattern
        Regular expression searched in the source id; overrides the class's
        ``__re__``. ``""`` accepts every source.
    derived_from
        Path of another feature of the same bank (``"images"``, or
        ``"data/images"``); ``load`` then receives that feature's output for
        the source instead of the source, and runs only where it produced data.
    compression, compression_opts, shuffle, chunks, fletcher32, scaleoffset
        HDF5 dataset options, as h5py takes them. ``compression`` may also be
        an hdf5plugin filter object (``hdf5plugin.Zstd()``), which carries its
        own options. Defaults come from the class's ``__ds_kwargs__``.

    Notes
    -----
    Subclasses written in h5mapper's style (class attributes ``__re__`` and
    ``__ds_kwargs__``, an ``__init__`` that never calls ``super().__init__``)
    work unchanged: every instance attribute has a class-level default.
    """

    __re__: str = ""
    __ds_kwargs__: ClassVar[dict[str, Any]] = {}
    storage: str = "rows"
    reads_bytes: ClassVar[bool] = True
    derived_from: str | None = None
    _options: dict[str, Any] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__module__.startswith("features.") and not cls.__name__.startswith("_"):
            BUILT_IN[cls.__name__] = cls

    def __init__(
        self,
        *,
        pattern: str | None = None,
        derived_from: str | None = None,
        compression: Any = None,
        compression_opts: Any = None,
        shuffle: bool | None = None,
        chunks: tuple[int, ...] | bool | None = None,
        fletcher32: bool | None = None,
        scaleoffset: int | None = None,
    ) -> None:
        if pattern is not None:
            re.compile(pattern)
            self.__re__ = pattern
        if derived_from is not None:  # else the class's own (a subclass may set it there)
            self.derived_from = derived_from
        given = {
            "compression": compression,
            "compression_opts": compression_opts,
            "shuffle": shuffle,
            "chunks": chunks,
            "fletcher32": fletcher32,
            "scaleoffset": scaleoffset,
        }
        self._options = {k: v for k, v in given.items() if v is not None}

    # -- the three things a feature decides ------------------------------

    def accepts(self, source_id: str) -> bool:
        """Whether this feature loads the source with this id (``__re__`` searched in it).

        A URL id is also tried without its query string, so a presigned
        ``https://host/cat.png?X-Amz-Expires=...`` is still a ``.png``.
        """
        pattern = self.__re__
        if not pattern or re.search(pattern, source_id) is not None:
            return True
        if "://" in source_id and "?" in source_id:
            return re.search(pattern, source_id.split("?", 1)[0]) is not None
        return False

    def load(self, source: Any) -> np.ndarray | dict[str, np.ndarray] | Any | None:
        """Turn one source into this feature's data; ``None`` means no data for it.

        ``source`` is a :class:`SourceLike` (``.id``, ``.url``, ``.read()``,
        ``.open()``; bytes are fetched once per build and shared between
        features), or, for a derived feature, the output of the feature it
        derives from. The default reads the bytes and calls :meth:`decode`.
        """
        return self.decode(source.read(), source.id)

    def decode(self, data: bytes, name: str = "") -> Any:
        """Turn one source's bytes into this feature's data. ``name`` hints the format."""
        raise NotImplementedError(
            f"{type(self).__name__} must override load(source) or decode(data, name)"
        )

    def from_stored(self, value: Any, name: str = "") -> Any:
        """What a read of one source returns, given what the bank stores for it.

        ``value`` is ``bytes`` for ``bytes`` storage, the category name for
        ``category`` storage, and the array (in its shape) otherwise. The
        default returns it unchanged; ``String`` decodes text, ``Bytes``
        applies its decoder.
        """
        return value

    @property
    def attrs(self) -> dict[str, Any]:
        """Parameters recorded as attributes of the feature's group in the bank."""
        return {}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> Feature:
        """The feature whose ``attrs`` are these (used to reopen banks without their type).

        The default passes them to the constructor; override when ``attrs`` and
        constructor parameters differ.
        """
        return cls(**attrs)

    # -- how it is stored -------------------------------------------------

    @property
    def dataset_options(self) -> dict[str, Any]:
        """Keyword arguments for ``h5py.Group.create_dataset``, hdf5plugin filters expanded."""
        given = self._options or {}
        options = dict(type(self).__ds_kwargs__)
        if "compression" in given:  # the class's compression_opts belong to the class's filter
            options.pop("compression_opts", None)
        options.update(given)
        compression = options.get("compression")
        if isinstance(compression, Mapping):
            # hdf5plugin filters are mappings of compression=<filter id>, compression_opts=(...)
            options.update(dict(compression))
        unknown = set(options) - set(DATASET_OPTIONS)
        if unknown:
            raise TypeError(
                f"{type(self).__name__}: unsupported dataset options {sorted(unknown)}; "
                f"use {', '.join(DATASET_OPTIONS)}"
            )
        return options

    def describe(self) -> dict[str, Any]:
        """The JSON-able record of this feature kept in the bank's schema attribute."""
        cls = type(self)
        return {
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "storage": self.storage,
            "derived_from": self.derived_from,
            "attrs": _jsonable(self.attrs),
            "dataset": _jsonable(self.dataset_options),
        }

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.attrs.items())
        return f"{type(self).__name__}({params})"


def _jsonable(value: Any) -> Any:
    """``value`` made JSON-serialisable (tuples to lists, numpy scalars to Python)."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return dict(value)
    return repr(value)


BUILT_IN[Feature.__name__] = Feature
