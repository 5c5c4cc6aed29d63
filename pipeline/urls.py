"""URLs and the secrets in them: which strings are URLs, fsspec options per protocol,
redaction, and what an I/O error says about retrying.
"""

from __future__ import annotations

import errno
import re
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_URL_START = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def options_for(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The fsspec keyword arguments for ``url``, from options given flat or per protocol.

    ``storage_options`` is passed through untouched, as fsspec takes it:
    flat (``{"key": ..., "endpoint_url": ...}``) for one protocol, or per
    protocol (``{"s3": {...}, "https": {...}}``), which fsspec reads for
    chained URLs. A plain URL whose protocol has its own entry gets that
    entry, so one build can mix sources of several protocols.
    """
    options = dict(storage_options or {})
    if not options or "::" in url:
        return options
    protocol = url.split("://", 1)[0].lower() if "://" in url else "file"
    for name in _ALIASES.get(protocol, (protocol,)):
        entry = options.get(name)
        if isinstance(entry, Mapping):
            return dict(entry)
    if _per_protocol(options):
        return {}  # per-protocol options, none for this protocol
    return options


def _per_protocol(options: Mapping[str, Any]) -> bool:
    """Whether ``options`` are keyed by protocol (``{"s3": {...}}``), not flat options whose
    values happen to be mappings (``{"client_kwargs": {...}}``)."""
    from fsspec.registry import known_implementations, registry

    names = set(known_implementations) | set(registry)
    return all(isinstance(v, Mapping) and k in names for k, v in options.items())


_ALIASES = {
    "s3": ("s3", "s3a"),
    "s3a": ("s3a", "s3"),
    "gs": ("gs", "gcs"),
    "gcs": ("gcs", "gs"),
    "http": ("http", "https"),
    "https": ("https", "http"),
}


def is_url(text: str) -> bool:
    """Whether ``text`` names an fsspec URL (``proto://...`` or a ``::`` chain)."""
    if _URL_START.match(text):
        return True
    # A chain (simplecache::s3://..., zip://a.png::s3://...) has a URL in it; a local name
    # such as "run::2.h5" does not.
    return "::" in text and any(_URL_START.match(part) for part in text.split("::"))


def transient(error: BaseException) -> bool:
    """Whether a failed request is worth retrying: connection trouble, timeouts, 5xx, 408, 429.

    Missing files, denied access, bad requests and certificate errors are
    permanent. The whole cause chain is searched (fsspec, s3fs and botocore
    wrap the network library's errors; fsspec's http ``open`` even reports a
    refused connection or a 503 as ``FileNotFoundError``).
    """
    for link in error_chain(error):
        name = type(link).__name__
        if isinstance(link, ssl.SSLError) or "Certificate" in name or "SSL" in name:
            return False
        status = http_status(link)
        if status is not None:
            return status >= 500 or status in (408, 429)
        if isinstance(link, OSError) and link.errno in _TRANSIENT_ERRNOS:
            return True
        if isinstance(link, (ConnectionError, TimeoutError)):
            return True
        if any(word in name for word in _TRANSIENT_NAMES):
            return True
    return False


def error_chain(error: BaseException | None) -> list[BaseException]:
    """``error`` and what caused it, outermost first (at most 10; cycles cut)."""
    chain: list[BaseException] = []
    while error is not None and len(chain) < 10 and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


# s3fs reports S3 503 / 500 as OSError(EBUSY / EREMOTEIO); the others are the network's.
_TRANSIENT_ERRNOS = {
    errno.EBUSY,
    errno.EREMOTEIO,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EPIPE,
}


_TRANSIENT_NAMES = ("Timeout", "Connection", "Connector", "Disconnected", "Payload")


def http_status(error: BaseException) -> int | None:
    """The HTTP status an error carries: aiohttp ``status``, gcsfs ``code``, botocore metadata."""
    for attribute in ("status", "status_code", "code"):
        value = getattr(error, attribute, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    response = getattr(error, "response", None)
    if isinstance(response, Mapping):
        value = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(value, int):
            return value
    return None


# Query parameters that carry credentials (presigned S3 / GCS URLs, Azure SAS, API keys).
_SECRET_SUFFIXES = (
    "signature",
    "credential",
    "token",
    "secret",
    "password",
    "passwd",
    "key",
    "keyid",
)


_SECRET_NAMES = {"sig", "pwd", "auth", "se", "sp", "sv", "skoid", "sktid"}


def _secret(name: str) -> bool:
    name = name.lower().replace("_", "-")
    return name in _SECRET_NAMES or name.rsplit("-", 1)[-1].endswith(_SECRET_SUFFIXES)


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")


def scrub(text: str) -> str:
    """``text`` with every URL in it redacted (error messages quote the URLs they failed on)."""
    return _URL_IN_TEXT.sub(lambda match: redact(match.group(0)), text)


def redact(url: str) -> str:
    """``url`` without credentials: user info and credential query parameters are removed.

    Used for every URL h5bank writes or prints, ids of URL sources included
    (the URL with its credentials is only kept in memory, to fetch the bytes).
    """
    if not is_url(url):
        return url
    parts = []
    for piece in url.split("::"):
        try:
            split = urlsplit(piece)
        except ValueError:
            parts.append(piece)
            continue
        netloc = split.netloc.rsplit("@", 1)[-1]
        query = "&".join(
            pair for pair in split.query.split("&") if pair and not _secret(pair.split("=", 1)[0])
        )
        parts.append(urlunsplit((split.scheme, netloc, split.path, query, split.fragment)))
    return "::".join(parts)
