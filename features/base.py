"""The ``Feature`` contract.

A feature turns one source into arrays. It says which sources it accepts
(``__re__``, searched in the source id), how the writer lays its output out
on disk (``storage``), which HDF5 dataset options to use, and which parameters
to record in the bank (``attrs``), and which recorded parameters may set it
when it is rebuilt from a bank file (``recorded_params``, checked: see
:mod:`features.records`). It knows nothing about Dask, HDF5 paths or
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
import itertools
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from features import records
from features.errors import RecordError, RecordWarning

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


def rebuild(record: Any) -> Feature | None:
    """The built-in feature a schema record (``Feature.describe()``) describes, or ``None``.

    Only classes of this package are rebuilt: a bank never makes h5bank import
    code named in a file, so a record naming any other class gives ``None``.
    A built-in class is rebuilt by :meth:`Feature.from_attrs`, from the
    recorded parameters it declares in ``recorded_params`` (checked), with
    the code's defaults for everything else. Raises
    :class:`~features.errors.RecordError`, saying what is wrong, for a record
    that is not a JSON object, or whose parameters are invalid.
    """
    if not isinstance(record, Mapping):
        raise RecordError(f"a feature record must be a JSON object, got {type(record).__name__}")
    qualified = record.get("class", "")
    if not isinstance(qualified, str):
        raise RecordError(f"a feature record's class must be a string, got {qualified!r:.80}")
    cls = BUILT_IN.get(qualified.rpartition(".")[2]) if qualified.startswith("features.") else None
    if cls is None:
        return None
    attrs = record.get("attrs")
    if attrs is None:
        attrs = {}
    if not isinstance(attrs, Mapping):
        raise RecordError(f"{cls.__name__}: attrs must be a JSON object, got {attrs!r:.80}")
    return cls.from_attrs(attrs)


def from_record(record: Any) -> Feature | None:
    """The built-in feature a schema record describes; ``None`` if there is none to trust.

    Never raises, whatever JSON the record is: a class that is not built in
    gives ``None`` (see :func:`rebuild`), and so does an invalid record, with
    a :class:`~features.errors.RecordWarning` naming the class and what is
    wrong. ``pipeline.schema`` calls :func:`rebuild` instead, to name the
    column in its warning.
    """
    try:
        return rebuild(record)
    except Exception as error:
        warnings.warn(
            RecordWarning(f"{record_name(record)} not rebuilt: {error}; its data reads as stored"),
            stacklevel=2,
        )
        return None


def record_name(record: Any) -> str:
    """How a warning names a feature record: by its class if it names one."""
    qualified = record.get("class") if isinstance(record, Mapping) else None
    if isinstance(qualified, str) and qualified:
        return f"the record of a {qualified[:80]} feature"
    return "a feature record"


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
    # Decoding a source is mostly C code that releases the GIL (Pillow's codecs, libsndfile):
    # scheduler="auto" builds banks of such features on threads however many files they have.
    decodes_in_c: ClassVar[bool] = False
    # If set, a source's data must have its column's dtype exactly, not one that casts to it;
    # the text says what to do instead (see StorageKind.rejected).
    exact_dtype: ClassVar[str] = ""
    derived_from: str | None = None
    _options: dict[str, Any] | None = None
    # The constructor parameters a bank's record may set when the feature is rebuilt from a
    # file (``from_attrs``), each with the check of its recorded value: only parameters that
    # describe the stored data, never a safety limit. Subclasses extend it.
    # A recorded ``pattern`` is not taken: it routes sources in a build, it does not describe
    # stored data, and a regex from a file could be made to backtrack for hours.
    recorded_params: ClassVar[Mapping[str, records.Check]] = {}

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

    def as_read(self, output: Any) -> Any:
        """This feature's output (of ``load`` or ``decode``) as reads of a bank return it:
        what features derived from it load, and what ``Bytes(decoder=...)`` returns. The
        output itself (``Sound``: its samples as floats)."""
        return output

    def from_stored(self, value: Any, name: str = "") -> Any:
        """What a read of one source returns, given what the bank stores for it.

        ``value`` is ``bytes`` for ``bytes`` storage, the category name for
        ``category`` storage, and the array (in its shape) otherwise. The
        default returns it unchanged; ``String`` decodes text, ``Bytes``
        applies its decoder.
        """
        return value

    def from_stored_rows(self, rows: np.ndarray, bounds: Sequence[int]) -> list[Any]:
        """:meth:`from_stored` of each source of a batch read at once (``rows`` storage):
        ``rows`` holds their rows one after the other, source ``i``'s from ``bounds[i]`` to
        ``bounds[i + 1]``. ``Sound`` converts the whole batch in one pass."""
        return [self.from_stored(rows[a:b]) for a, b in itertools.pairwise(bounds)]

    @property
    def attrs(self) -> dict[str, Any]:
        """Parameters recorded as attributes of the feature's group in the bank."""
        return {}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> Feature:
        """The feature whose recorded ``attrs`` these are (reopening a bank without its type).

        ``attrs`` come from a bank file, so they are untrusted: only the
        parameters the class declares in ``recorded_params`` are taken, each
        through its check; any other (a safety limit such as ``max_pixels``,
        or one a newer h5bank records) is ignored and keeps the constructor's
        default. Raises :class:`~features.errors.RecordError` naming the
        parameter and what is wrong, also when the constructor refuses them.
        """
        kwargs: dict[str, Any] = {}
        for name, check in cls.recorded_params.items():
            if name in attrs:
                try:
                    kwargs[name] = check(attrs[name])
                except Exception as error:
                    raise RecordError(f"{cls.__name__}: {name}: {error}") from None
        try:
            return cls(**kwargs)
        except Exception as error:
            said = str(error) if str(error).startswith(cls.__name__) else f"{cls.__name__}: {error}"
            raise RecordError(said) from None

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
