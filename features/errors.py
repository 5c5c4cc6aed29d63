"""Exceptions raised by features.

They live here, not in ``pipeline``, because features know nothing about the
build engine; ``pipeline.errors`` builds the rest of the hierarchy on
:class:`H5BankError`.
"""

from __future__ import annotations


class H5BankError(Exception):
    """Base class of every error h5bank raises on purpose."""


class DecodeError(H5BankError, ValueError):
    """A feature could not turn a source's bytes into arrays.

    The message says what was expected and what was found; the build adds the
    source id and the feature path when it records the failure.
    """


class SourceReadError(H5BankError, OSError):
    """A source's bytes could not be fetched (missing file, plain id, server error)."""


class RecordError(H5BankError, ValueError):
    """A bank's record of a built-in feature cannot be trusted to rebuild it.

    A bank file comes from anywhere: its schema record (``Feature.describe()``)
    is untrusted input. The message says which parameter is wrong and why.
    """


class RecordWarning(UserWarning):
    """A column of a bank is read as stored because its feature's record is invalid."""
