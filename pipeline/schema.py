"""A bank type's features: their paths, their order, their record in the bank.

A ``TypedFile`` subclass reads like the file it describes: class attributes
are features or :class:`Group`\\ s of them, and groups nest. :class:`Schema`
turns that into an ordered mapping of feature paths (``"data/images"``) to
features, with every derived feature after the feature it derives from.
"""

from __future__ import annotations

import posixpath
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from features import Array, Bytes, String, records
from features.base import BankMember, Feature, rebuild
from features.errors import RecordWarning
from pipeline.errors import SchemaError


class Group(BankMember):
    """A group of features (or of groups) in a bank type: ``Group(images=Image(), labels=DirLabels())``.

    On an open bank, the attribute reads as a group proxy: ``bank.data.get(id)``,
    ``bank.data.images``.
    """

    def __init__(self, **children: Feature | Group) -> None:
        for name, child in children.items():
            if not isinstance(child, (Feature, Group)):
                raise SchemaError(
                    f"Group member {name!r} is a {type(child).__name__}; expected a Feature or a Group"
                )
            _check_name(name)
        self.children: dict[str, Feature | Group] = dict(children)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.children.items())
        return f"Group({inner})"


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith("__"):
        raise SchemaError(
            f"feature and group names may not be empty, hold '/' or start with '__': {name!r}"
        )


class Schema(Mapping[str, Feature]):
    """Feature paths to features, bases before the features derived from them."""

    def __init__(self, features: Mapping[str, Feature], groups: Iterable[str] = ()) -> None:
        self._declared = set(groups)  # groups declared on the class, empty ones included
        self.bases: dict[str, str] = {}
        for path, feature in features.items():
            if feature.derived_from is not None:
                self.bases[path] = self._resolve(path, feature.derived_from, features)
        self._features = {path: features[path] for path in self._ordered(features)}

    @classmethod
    def from_namespace(cls, namespace: Mapping[str, Any]) -> Schema:
        """The schema of a class body (or any mapping of names to features and groups)."""
        features: dict[str, Feature] = {}
        groups: list[str] = []

        def walk(prefix: str, members: Mapping[str, Any]) -> None:
            for name, member in members.items():
                if isinstance(member, Feature):
                    _check_name(name)
                    features[posixpath.join(prefix, name)] = member
                elif isinstance(member, Group):
                    _check_name(name)
                    groups.append(posixpath.join(prefix, name))
                    walk(groups[-1], member.children)

        walk("", namespace)
        return cls(features, groups)

    @classmethod
    def from_class(cls, typed_file: type) -> Schema:
        """The schema of a ``TypedFile`` subclass, inherited features included."""
        namespace: dict[str, Any] = {}
        for klass in reversed(typed_file.__mro__):
            namespace.update(
                {k: v for k, v in vars(klass).items() if isinstance(v, (Feature, Group))}
            )
        return cls.from_namespace(namespace)

    @staticmethod
    def _resolve(path: str, base: str, features: Mapping[str, Feature]) -> str:
        sibling = posixpath.join(posixpath.dirname(path), base)
        for candidate in (sibling, base.strip("/")):
            if candidate in features and candidate != path:
                return candidate
        raise SchemaError(
            f"feature {path!r} is derived_from={base!r}, but the bank type has no such feature "
            f"(features: {', '.join(features) or 'none'})"
        )

    def _ordered(self, features: Mapping[str, Feature]) -> list[str]:
        order: list[str] = []
        visiting: set[str] = set()

        def visit(path: str) -> None:
            if path in order:
                return
            if path in visiting:
                raise SchemaError(f"derived features form a cycle through {path!r}")
            visiting.add(path)
            if path in self.bases:
                visit(self.bases[path])
            visiting.discard(path)
            order.append(path)

        for path in features:
            visit(path)
        return order

    def __getitem__(self, path: str) -> Feature:
        return self._features[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self._features)

    def __len__(self) -> int:
        return len(self._features)

    def groups(self) -> set[str]:
        """Every group path the features live under (``"data"`` for ``"data/images"``), and
        the groups the class declares empty (``checkpoints = Group()``, filled by ``add``)."""
        out: set[str] = set(self._declared)
        for path in self._features:
            parent = posixpath.dirname(path)
            while parent:
                out.add(parent)
                parent = posixpath.dirname(parent)
        return out

    def describe(self) -> dict[str, dict[str, Any]]:
        """Each feature's JSON record (class, storage, attrs, dataset options)."""
        return {path: feature.describe() for path, feature in self._features.items()}

    def __repr__(self) -> str:
        return f"Schema({', '.join(f'{p}={f!r}' for p, f in self._features.items())})"


def owner_path(column: str, features: Mapping[str, Any]) -> str:
    """The feature path a column belongs to: itself, or its parent for a dict-valued feature."""
    return column if column in features else posixpath.dirname(column)


def feature_for_value(value: Any) -> Feature:
    """The feature a column added on the fly gets from its first value.

    Scalars (metrics) are stored flat, so each reads back as a scalar; arrays
    are concatenated along axis 0 (logs).
    """
    if isinstance(value, str):
        return String()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Bytes()
    if np.ndim(value) == 0:
        return Array(flat=True)
    return Array()


class Undeclared(Feature):
    """Stands in for a column of the bank that no feature class describes: reads it as stored."""

    def __init__(self, storage: str, encoding: str | None = None) -> None:
        super().__init__()
        self.storage = storage
        self.encoding = encoding

    def load(self, source: Any) -> Any:
        raise TypeError(
            "this column was written by a feature h5bank cannot rebuild; it has no load()"
        )

    def from_stored(self, value: Any, name: str = "") -> Any:
        if self.encoding and isinstance(value, bytes):
            return value.decode(self.encoding)
        return value


def feature_for_column(
    storage: str, attrs: Any, record: Any = None, path: str | None = None
) -> Feature:
    """The feature for a column the bank type does not declare.

    Built-in features are rebuilt from their schema record (class and the
    parameters the class takes from a file, checked: see
    :func:`features.base.rebuild`), so their methods work on any bank;
    anything else reads as stored. A record that cannot be trusted (a bad
    pattern, an absurd size, a wrong type...) never makes the bank unopenable:
    the column reads as stored, with a :class:`~features.errors.RecordWarning`
    naming the column (``path``, else the HDF5 group ``attrs`` belong to) and
    what is wrong. So does a recorded ``encoding`` that is not a text encoding.
    """
    feature = None
    if record:
        try:
            feature = rebuild(record)
        except Exception as error:
            _warn(path, attrs, f"its feature is not rebuilt from the bank's record ({error})")
    if feature is not None and feature.storage == storage:
        return feature
    return Undeclared(storage, _encoding(path, attrs))


def _encoding(path: str | None, attrs: Any) -> str | None:
    """The column's recorded ``encoding`` if it names a text encoding (else None, warned)."""
    try:
        encoding = attrs.get("encoding")
        if isinstance(encoding, (bytes, np.bytes_)):
            encoding = encoding.decode("utf-8", "replace")
        return records.text_encoding(encoding) if encoding is not None and encoding != "" else None
    except Exception as error:
        _warn(path, attrs, f"its encoding attribute is unusable ({error}); values read as bytes")
        return None


def _warn(path: str | None, attrs: Any, problem: str) -> None:
    column = f"column {path!r}" if path else "a column"
    warnings.warn(RecordWarning(f"{column} reads as stored: {problem}"), stacklevel=3)
