"""Sources: expanding what the user gives into ids, and fetching their bytes.

``sources`` may hold file paths, directories (walked recursively, hidden files
skipped), glob patterns and fsspec URLs, or any iterable of them too large to
list twice. :func:`expand` turns them into :class:`SourceSpec` (id + URL) in a
deterministic order, lazily:

- a path or URL listed explicitly keeps the string as given as its id (URLs
  minus credentials: user info and signature / token query parameters);
- files found by walking a local directory or a local glob get ids relative
  to that root, in POSIX form (``"cats/01.png"``), so banks built on different
  machines agree; files found under a URL root keep their full URL;
- a string that is neither an existing path nor a URL is a plain id (a feature
  may generate its data from the id itself); only reading its bytes fails.

A directory or glob lists only files that are inside it: a symbolic link
whose real path is outside the directory (or the glob's fixed root), such as
a link to ``/etc/passwd`` or ``~/.ssh`` in a folder someone else prepared, is
left out with an :class:`OutsideLinkWarning` naming it; links that stay inside
the tree are kept. A file listed explicitly is read wherever it leads.

Nothing here special-cases a protocol: every URL goes through fsspec, with
``storage_options`` passed on untouched (flat, or per protocol:
:func:`options_for`). Fetching batches a partition's requests per filesystem
and retries transient failures with back-off (:func:`transient` tells them
from permanent ones); credentials never leave memory (:func:`redact`).
"""

from __future__ import annotations

import contextlib
import errno
import glob as globlib
import io
import os
import re
import stat
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fsspec.core import url_to_fs

from features.base import Feature
from features.errors import SourceReadError
from pipeline import config
from pipeline.format.layout import storable
from pipeline.urls import is_url, options_for, redact, scrub, transient

__all__ = [
    "Source",
    "SourceSpec",
    "expand",
    "fetch",
    "is_url",
    "options_for",
    "redact",
    "route",
]

_MAGIC = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class SourceSpec:
    """One source of a build: its ``id`` in the bank and the ``url`` its bytes come from.

    ``url`` is an absolute local path, an fsspec URL, or ``None`` for a plain id.
    """

    id: str
    url: str | None = None


def expand(
    sources: str | os.PathLike[str] | Iterable[Any],
    storage_options: Mapping[str, Any] | None = None,
) -> Iterator[SourceSpec]:
    """Yield a :class:`SourceSpec` per source, lazily, in a deterministic order.

    Directories and globs are listed (and sorted) one root at a time, so memory
    follows the largest root, not the whole source list.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    options = dict(storage_options or {})
    for item in sources:
        if isinstance(item, SourceSpec):
            yield item
            continue
        if isinstance(item, os.PathLike):
            item = os.fspath(item)
        if not isinstance(item, str):
            raise TypeError(
                f"a source must be a path, a URL or an id string, got {type(item).__name__}: {item!r}"
            )
        if is_url(item):
            yield from _expand_url(item, options)
        else:
            yield from _expand_local(item)


def local_roots(sources: Any, limit: int = 32) -> list[str]:
    """The local folders and files ``sources`` names (a glob: the folder before its first
    wildcard), as absolute paths, for the first ``limit``: what every worker of a cluster
    must see to read them. URLs, plain ids and streamed sources give none."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not isinstance(sources, (list, tuple)):
        return []
    roots: list[str] = []
    for item in sources[:limit]:
        if not isinstance(item, (str, os.PathLike)) or is_url(text := os.fspath(item)):
            continue
        text = os.path.expanduser(text)
        if _MAGIC.search(text) and not os.path.lexists(text):
            text = _glob_root(text) or "."
        if os.path.lexists(text):
            roots.append(os.path.abspath(text))
    return list(dict.fromkeys(roots))


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _posix(path: str) -> str:
    return path.replace(os.sep, "/") if os.sep != "/" else path


def _expand_local(text: str) -> Iterator[SourceSpec]:
    text = os.path.expanduser(text)
    if os.path.lexists(text) and not os.path.isdir(text):
        # an existing file, whatever its name holds
        yield SourceSpec(storable(text), os.path.abspath(text))
    elif _MAGIC.search(text) and not os.path.isdir(text):
        # Only relative names are held while sorting (a million of them is tens of MB).
        base = os.path.abspath(_glob_root(text) or ".")
        inside = _Inside(base)
        found, outside = [], []
        for path in globlib.glob(text, recursive=True):  # "**" follows links to directories
            if os.path.isdir(path):
                continue
            relative = _posix(os.path.relpath(path, base))
            if _hidden(relative):
                continue
            (found if inside(path) else outside).append(relative)
        _warn_outside(text, outside)
        yield from _under(text, base, found)
    elif os.path.isdir(text):
        base = os.path.abspath(text)
        listed = 0
        outside = []
        for relative in walk_sorted(base, outside=outside):
            listed += 1
            yield SourceSpec(storable(relative), os.path.join(base, relative))
        _warn_outside(text, outside)
        _warn_if_empty(text, listed)
    else:
        yield SourceSpec(text, None)


def walk_sorted(base: str, inner: str = "", outside: list[str] | None = None) -> Iterator[str]:
    """Paths of the visible files under ``base``, relative to it, sorted, one directory at a time.

    Siblings are sorted with a ``/`` after each directory's name, so visiting
    them depth first yields exactly the sorted list of every relative path
    (``a-b/x`` < ``a.png`` < ``a/x``) while holding one directory's names,
    not the whole tree's. Like ``os.walk``, symbolic links to directories
    are not followed and directories that cannot be read are skipped. A
    symbolic link to a file is listed only when its real path is inside
    ``base`` (so is a dangling one that would be); the others are left out,
    and their paths appended to ``outside`` when it is given.
    """
    real_base = None  # looked up at the first link
    prefix = inner + "/" if inner else ""
    try:
        with os.scandir(os.path.join(base, inner) if inner else base) as entries:
            names = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    link = entry.is_symlink()
                    directory = entry.is_dir()
                    if directory and link:
                        continue
                except OSError:
                    link = directory = False
                if link:
                    real_base = real_base or os.path.realpath(base)
                    if not _within(os.path.realpath(entry.path), real_base):
                        if outside is not None:
                            outside.append(prefix + entry.name)
                        continue
                names.append(entry.name + "/" if directory else entry.name)
    except OSError:
        return
    names.sort()
    for name in names:
        if name.endswith("/"):
            yield from walk_sorted(base, prefix + name[:-1], outside)
        else:
            yield prefix + name


def _within(path: str, root: str) -> bool:
    """Whether the real ``path`` is ``root`` or under it (both real, absolute paths)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class _Inside:
    """Whether a file found under ``base`` (by a glob, which follows links to directories) is
    really inside it: its directory's real path (looked up once per directory) and, for a
    link, its own."""

    def __init__(self, base: str) -> None:
        self.real_base = os.path.realpath(base)
        self.directories: dict[str, bool] = {}

    def __call__(self, path: str) -> bool:
        directory = os.path.dirname(path)
        inside = self.directories.get(directory)
        if inside is None:
            inside = _within(os.path.realpath(directory), self.real_base)
            self.directories[directory] = inside
        if inside and os.path.islink(path):
            inside = _within(os.path.realpath(path), self.real_base)
        return inside


def _under(root: str, base: str, found: list[str]) -> Iterator[SourceSpec]:
    """The files ``found`` under the absolute directory ``base``, sorted by relative path."""
    _warn_if_empty(root, len(found))
    found.sort()
    for relative in found:
        yield SourceSpec(storable(relative), os.path.join(base, relative))


class EmptySourceWarning(UserWarning):
    """A directory or glob given as a source holds no files."""


class OutsideLinkWarning(UserWarning):
    """A directory or glob given as a source holds symbolic links to files outside it; they were
    left out of the build."""


def _warn_outside(root: str, outside: list[str]) -> None:
    if outside:
        shown = ", ".join(repr(name) for name in outside[:10])
        more = f" and {len(outside) - 10} more" if len(outside) > 10 else ""
        warnings.warn(
            f"h5bank: left out {len(outside)} symbolic link{'s' * (len(outside) != 1)} under "
            f"{root!r} leading outside it: {shown}{more}",
            OutsideLinkWarning,
            stacklevel=4,
        )


def _warn_if_empty(root: str, found: int) -> None:
    if not found:
        warnings.warn(
            f"h5bank: {root!r} holds no (visible) files", EmptySourceWarning, stacklevel=4
        )


def _glob_root(pattern: str) -> str:
    """The directory part of ``pattern`` before its first wildcard."""
    parts = pattern.replace("\\", "/").split("/")
    fixed = []
    for part in parts:
        if _MAGIC.search(part):
            break
        fixed.append(part)
    return "/".join(fixed)


def _expand_url(url: str, options: dict[str, Any]) -> Iterator[SourceSpec]:
    if "::" in url:
        # A chained URL (simplecache::s3://..., zip://...::s3://...) names one file.
        yield SourceSpec(storable(redact(url)), url)
        return
    split = urlsplit(url)
    # "?" starts a query string in a URL, not a wildcard.
    magic = _MAGIC.search(split.netloc + split.path) is not None and not split.query
    if magic or url.endswith("/"):
        fs, root_path = url_to_fs(url, **options_for(url, options))
        try:
            fs.info(_glob_root(root_path) if magic else root_path)
        except Exception as error:  # a missing root is an empty source; an outage is not
            if transient(error):
                cause = error.__cause__ or error
                raise SourceReadError(
                    f"cannot list {redact(url)}: {type(cause).__name__}: {scrub(str(cause))}"
                ) from None
        if magic:
            given_root = _glob_root(url)
            stripped_root = _glob_root(root_path)
            listing = fs.glob(root_path, detail=True)
            files = [p for p, info in listing.items() if info.get("type") != "directory"]
        else:
            given_root = url.rstrip("/")
            stripped_root = root_path.rstrip("/")
            files = fs.find(root_path, withdirs=False)
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        # A local tree (file://) keeps its links inside it, as a local path's does.
        inside = _Inside(stripped_root or "/") if protocols & {"file", "local"} else None
        found, outside = [], []
        for found_path in files:
            relative = found_path[len(stripped_root) :].lstrip("/")
            if relative and not _hidden(relative):
                if inside is None or inside(found_path):
                    found.append(f"{given_root}/{relative}")
                else:
                    outside.append(relative)
        _warn_outside(redact(url), outside)
        _warn_if_empty(redact(url), len(found))
        for full in sorted(found):
            yield SourceSpec(storable(redact(full)), full)
    else:
        yield SourceSpec(storable(redact(url)), url)


def route(features: Mapping[str, Feature], source_id: str) -> list[str]:
    """The paths of the (non-derived) features that accept ``source_id``."""
    return [
        path
        for path, feature in features.items()
        if feature.derived_from is None and feature.accepts(source_id)
    ]


class Source:
    """A source as a feature's ``load`` sees it: ``id``, ``url``, and bytes fetched once.

    ``read()`` fetches the bytes on first use and keeps them, so several
    features loading the same source share one fetch; :func:`fetch` fills many
    sources in one batched call before the features run.
    """

    __slots__ = ("_data", "_error", "id", "storage_options", "url")

    def __init__(self, spec: SourceSpec, storage_options: Mapping[str, Any] | None = None) -> None:
        self.id = spec.id
        self.url = spec.url
        self.storage_options = (
            storage_options or {}
        )  # shared by a partition's sources, never copied
        self._data: bytes | None = None
        self._error: BaseException | None = None

    def read(self) -> bytes:
        """The source's bytes (fetched at most once)."""
        if self._data is None and self._error is None:
            fetch([self], self.storage_options)
        if self._error is not None:
            raise self._error
        assert self._data is not None
        return self._data

    def open(self) -> io.BytesIO:
        """A binary file object over the source's bytes."""
        return io.BytesIO(self.read())

    def __fspath__(self) -> str:
        """The local file's path, for ``load`` code written for h5mapper, which got a path:
        ``open(source)``, ``soundfile.read(source)``, ``imageio.v3.imread(source)``.

        A URL or a plain id has no local path: ``TypeError`` says to use
        :meth:`read` or :meth:`open`, which work for every source (and share
        one fetch between features).
        """
        if self.url is None or is_url(self.url):
            where = f"the URL {redact(self.url)}" if self.url else "a plain id (no file)"
            raise TypeError(
                f"source {redact(self.id)!r} is {where}, not a local file, so it has no path: "
                "read it with source.read() (bytes) or source.open() (a file object)"
            )
        return self.url

    def __repr__(self) -> str:
        return f"Source(id={self.id!r}, url={redact(self.url) if self.url else None!r})"


def fetch(
    sources: list[Source],
    storage_options: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> None:
    """Fetch the bytes of ``sources`` that have none yet, one batched ``fs.cat`` per filesystem.

    Failures are kept per source (raised by its ``read()``), never raised here.
    ``settings`` are the retry settings (``h5bank.fetch``), read where the
    build was made and shipped with its tasks; ``None`` reads them here.
    """
    options = dict(storage_options or {})
    groups: dict[int, tuple[Any, list[tuple[Source, str]]]] = {}
    local: Any = None  # the local filesystem, looked up once (url_to_fs costs ~6 us a call)
    for source in sources:
        if source._data is not None or source._error is not None:
            continue
        if source.url is None:
            source._error = SourceReadError(
                f"{source.id!r} is neither an existing file nor a URL, so it has no bytes to read "
                "(a plain id is fine for features that do not read bytes)"
            )
            continue
        if local is not None and os.path.isabs(source.url):  # an absolute local path
            groups[id(local)][1].append((source, source.url))
            continue
        try:
            # fsspec caches filesystem instances: one per protocol, host and options.
            fs, path = url_to_fs(source.url, **options_for(source.url, options))
            if not is_url(source.url) and os.path.isabs(source.url):
                local = fs
        except Exception as error:  # bad options, a missing driver
            source._error = SourceReadError(f"cannot open {redact(source.url)}: {_reason(error)}")
            continue
        groups.setdefault(id(fs), (fs, []))[1].append((source, path))
    if settings is None:
        settings = config.section("fetch")
    for fs, members in groups.values():
        _fetch_group(fs, members, settings)


def _fetch_group(fs: Any, members: list[tuple[Source, str]], settings: Mapping[str, Any]) -> None:
    """Fetch a group's bytes, retrying transient failures with exponential back-off.

    Settings: ``retries`` (attempts after the first), ``backoff`` (seconds
    before the first retry, doubled each time, at most ``max-backoff``).
    Permanent failures (no such file, access denied) fail their source at once.
    """
    retries = int(settings["retries"])
    delay = float(settings["backoff"])
    pending = members
    for attempt in range(retries + 1):
        errors = _fetch_once(fs, pending)
        pending = [(s, p) for s, p in pending if s in errors and transient(errors[s])]
        final = attempt == retries or not pending
        for source, path in [(s, p) for s, p in members if s in errors]:
            if final or (source, path) not in pending:
                error = errors.pop(source)
                tries = f" (after {attempt + 1} attempts)" if transient(error) and attempt else ""
                source._error = SourceReadError(
                    f"cannot read {redact(source.url)}: {_reason(error, fs, path)}{tries}"
                )
        if final:
            return
        time.sleep(min(delay * 2**attempt, float(settings["max-backoff"])))


def read_local(path: str) -> bytes:
    """A local file's bytes, read directly (fsspec's local layer cost 10 us more a file).

    Only a regular file is opened (opening a FIFO, a socket or a device can
    block, or act on it), and it is opened without blocking and checked again,
    in case it was replaced in between; the read itself blocks as usual.
    """
    _regular(os.stat(path).st_mode, path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        _regular(os.fstat(fd).st_mode, path)
        os.set_blocking(fd, True)
        with open(fd, "rb", closefd=False) as file:
            data = file.read()
        if data is None:  # pragma: no cover (a file system that ignores blocking mode)
            raise OSError(errno.EAGAIN, "the file system had no data to give yet")
        return data
    finally:
        os.close(fd)


def _regular(mode: int, path: str) -> None:
    """Raise unless ``mode`` is a regular file's (a directory: the error says it is one)."""
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if not stat.S_ISREG(mode):
        kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                 (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))  # fmt: skip
        kind = next((name for test, name in kinds if test(mode)), "not a file")
        raise OSError(errno.EINVAL, f"it is not a regular file but {kind}")


def _fetch_once(fs: Any, members: list[tuple[Source, str]]) -> dict[Source, BaseException]:
    errors: dict[Source, BaseException] = {}
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"file", "local"}:
        for source, path in members:
            try:
                source._data = read_local(path)
            except Exception as error:
                errors[source] = error
        return errors
    # One call for the whole group (remote filesystems fetch concurrently), except for
    # names holding wildcards, which fs.cat would expand as globs.
    plain = [path for _, path in members if not _MAGIC.search(path)]
    try:
        found = fs.cat(plain, on_error="return") if len(plain) > 1 else {}
    except Exception:
        found = {}  # fall back to one request per source, each with its own error
    for source, path in members:
        try:
            data = found[path] if path in found else fs.cat_file(path)
            if isinstance(data, BaseException):
                raise data
            source._data = bytes(data)
        except Exception as error:
            errors[source] = error
    return errors


def _reason(error: BaseException, fs: Any = None, path: str | None = None) -> str:
    if isinstance(error, OSError) and error.errno == errno.EINVAL and "regular file" in str(error):
        return error.strerror or str(error)
    if isinstance(error, FileNotFoundError) and transient(error):
        cause = error.__cause__ or error.__context__ or error  # an outage, not a missing file
        return f"{type(cause).__name__}: {scrub(str(cause))}"
    directory = isinstance(error, IsADirectoryError)
    if not directory and isinstance(error, FileNotFoundError) and fs is not None and path:
        with contextlib.suppress(Exception):  # only asked to explain a failure
            directory = fs.isdir(path)
    if directory:
        return (
            "it is a directory; to build the files in it, give the directory itself (a URL "
            "ending in '/') or a glob"
        )
    if isinstance(error, FileNotFoundError) and fs is not None and "memory" in fs.protocol:
        return (
            "no such file in this process's memory:// filesystem; memory:// files exist only in "
            "the process that wrote them, so build with scheduler='threads' or 'sync'"
        )
    if isinstance(error, FileNotFoundError) and path and os.path.islink(path):
        with contextlib.suppress(OSError):
            return f"a broken symbolic link (to {os.readlink(path)}, which does not exist)"
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, PermissionError):
        return "permission denied"
    return f"{type(error).__name__}: {scrub(str(error))}"
