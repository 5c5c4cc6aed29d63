"""URLs and the secrets in them: which strings are URLs, fsspec options per protocol,
redaction, secrets hidden from settings and text, and what an I/O error says about retrying.

Everything h5bank prints or stores that may hold a credential goes through
here: :func:`redact` for a URL (ids, provenance, messages), :func:`scrub`
for text quoting URLs (error messages), :func:`hide_secrets` for settings
(storage options, ``h5bank config``) and other text (``--dry-run``).
"""

from __future__ import annotations

import errno
import os
import re
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

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


# Query parameters that carry credentials: presigned S3 (X-Amz-Signature, X-Amz-Credential,
# X-Amz-Security-Token; AWSAccessKeyId and Signature of version 2), GCS (X-Goog-Signature,
# GoogleAccessId), Azure SAS (sig is the secret; sv, se, sp... say what it grants), OAuth and
# API keys (access_token, key, apikey), passwords.
_SECRET_SUFFIXES = (
    "signature",
    "credential",
    "credentials",
    "token",
    "secret",
    "password",
    "passwd",
    "key",
    "keyid",
    "authorization",
    "session",
    "sessionid",
    "jwt",
)


_SECRET_NAMES = {
    "sig",
    "pwd",
    "auth",
    "se",
    "sp",
    "sv",
    "skoid",
    "sktid",
    "googleaccessid",
}


def _secret(name: str) -> bool:
    """Whether a query parameter named ``name`` carries a credential."""
    name = unquote_plus(name).strip().lower().replace("_", "-")
    return name in _SECRET_NAMES or name.rsplit("-", 1)[-1].endswith(_SECRET_SUFFIXES)


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")


def scrub(text: str) -> str:
    """``text`` with every URL in it redacted (error messages quote the URLs they failed on)."""
    return _URL_IN_TEXT.sub(lambda match: redact(match.group(0)), text)


def redact(url: str) -> str:
    """``url`` without credentials: user info and credential query parameters are removed.

    Used for every URL h5bank writes or prints, ids of URL sources included
    (the URL with its credentials is only kept in memory, to fetch the bytes).
    A URL that does not parse (``https://user:pw@[::1/x``, a password holding
    ``/`` or ``?``) fails closed: everything up to its last ``@`` and its
    whole query are dropped. Ordinary URLs and anything that is not a URL are
    returned unchanged, and ``redact(redact(url)) == redact(url)``.
    """
    if not is_url(url):
        return url
    pieces = url.split("::")
    # Each piece of a chain is a URL or a bare protocol (simplecache::s3://...); anything else
    # means "::" was inside one URL (an IPv6 host, a password holding it): not a chain.
    if not all(_URL_START.match(p) or _PROTOCOL.match(p) for p in pieces):
        return _redact_one(url)
    return "::".join(_redact_one(piece) for piece in pieces)


_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*$")


def _redact_one(piece: str) -> str:
    if not _URL_START.match(piece):
        return piece  # a bare protocol of a chain
    try:
        split = urlsplit(piece)
        split.port  # noqa: B018 (raises for "user:pa/ss@host": a password urlsplit cut short)
    except ValueError:
        return _redact_unparsed(piece)
    netloc = split.netloc.rsplit("@", 1)[-1]
    return urlunsplit(
        (split.scheme, netloc, split.path, _public(split.query), _public(split.fragment))
    )


def _public(query: str) -> str:
    """``query`` (or a fragment) without its credential parameters (``&`` or ``;`` separated)."""
    if "=" not in query:
        return query
    return "&".join(
        pair
        for pair in query.split("&")
        if pair and not any(_secret(part.split("=", 1)[0]) for part in pair.split(";"))
    )


def _redact_unparsed(url: str) -> str:
    """A URL ``urlsplit`` cannot read, redacted without trusting its structure: whatever
    comes before its last ``@`` (user info, wherever it ends) and after its first ``?``
    (a query, which may sign it) or ``#`` are dropped."""
    scheme, _, rest = url.partition("://")
    rest = rest.rsplit("@", 1)[-1]
    rest = re.split(r"[?#]", rest, maxsplit=1)[0]
    return f"{scheme}://{rest}"


# -- secrets in settings and other text ------------------------------------------------------

# Names of settings, storage options, headers and "name=value" pairs that hold secrets.
_SECRET_WORD = re.compile(
    r"secret|passw|passphrase|pwd|token|key|credential|creds?(?![a-z])|cookie|auth|session"
    r"|signature|private|bearer|connection.?string|(?<![a-z])(?:sig|sas)(?![a-z])",
    re.I,
)


def secret_name(name: object) -> bool:
    """Whether a setting, storage option or header named ``name`` looks like it holds a secret
    (keys, tokens, passwords, cookies, authorization, sessions, signatures, SAS, connection
    strings...)."""
    text = str(name)
    return bool(_SECRET_WORD.search(text)) or _secret(text)


# "name=value" (a connection string's AccountKey=..., a shell's export X_SECRET=..., a query's
# sig=...), '"name": value' (JSON, a repr), and schemes of the Authorization header.
_ASSIGNMENT = re.compile(
    r"""(?:^|(?<=[\s;&?,{(\[]))(?:(["'])([\w.\-]+)\1\s*[:=]|([\w.\-]+)\s*=)\s*"""
)
_AUTH_SCHEME = re.compile(r"\b(?:Bearer|Basic)\s+(?=\S)", re.I)
# HTTP headers holding credentials, as a request dump shows them ("Cookie: sid=...").
_HEADER = re.compile(
    r"(?<![\w-])(?:(?:proxy-)?authorization|(?:set-)?cookie"
    r"|x-[\w-]*(?:key|token|secret|auth)[\w-]*)\s*:\s*(?=\S)",
    re.I,
)

_NAME = re.compile(r"[\w.\-]+")

HIDDEN = "***"
"""What a hidden secret shows as."""


def hide_secrets(value: Any, name: object = None) -> Any:
    """``value`` as it may be printed: every secret in it hidden as ``***``.

    By name: a mapping's entry whose name looks secret (:func:`secret_name`:
    ``secret``, ``key``, ``token``, ``Cookie``, ``Authorization``,
    ``connection_string``...) shows as ``***`` whatever it holds (a string, a
    number, a whole mapping such as a service account's); so does ``value``
    itself when ``name`` looks secret. ``None``, booleans and empty strings show
    as they are.

    By value, at any depth (``client_kwargs: {headers: {...}}``, lists, a
    ``("Cookie", "...")`` pair): in a string, every URL is redacted
    (:func:`redact`: an ``endpoint_url`` with user info keeps its host), and
    from the first secret in a line to the line's end is hidden: the value of a
    ``name=value`` or ``"name": value`` pair with a secret name
    (``AccountKey=``, ``SharedAccessSignature=``, ``sig=``, ``password=``,
    ``export AWS_SECRET_ACCESS_KEY=``), a credential header's value
    (``Cookie: ...``, ``Authorization: ...``, ``X-Api-Key: ...``), or the
    credentials after ``Bearer`` or ``Basic``. The rest of the line stays, so
    ``AccountName=lab;AccountKey=...`` shows as ``AccountName=lab;AccountKey=***``.
    """
    if name is not None and secret_name(name) and not _shown_as_is(value):
        return HIDDEN
    if isinstance(value, Mapping):
        return {key: hide_secrets(child, key) for key, child in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) == 2 and isinstance(value[0], str) and _NAME.fullmatch(value[0]):
            shown = [value[0], hide_secrets(value[1], value[0])]  # a (header, value) pair
        else:
            shown = [hide_secrets(child) for child in value]
        return type(value)(shown) if isinstance(value, tuple) else shown
    if isinstance(value, str):
        return "".join(_hide_in_line(line) for line in scrub(value).splitlines(keepends=True))
    return value


def _shown_as_is(value: Any) -> bool:
    return value is None or isinstance(value, bool) or value == ""


def _hide_in_line(line: str) -> str:
    """``line`` hidden from its first secret (a secret pair's value, an auth scheme's
    credentials) to its end, the line break kept."""
    body = line.rstrip("\r\n")
    ending = line[len(body) :]
    starts = [m.end() for m in _ASSIGNMENT.finditer(body) if secret_name(m[2] or m[3])]
    starts += [m.end() for m in _AUTH_SCHEME.finditer(body)]
    starts += [m.end() for m in _HEADER.finditer(body)]
    if not starts:
        return line
    return body[: min(starts)] + HIDDEN + ending


def sibling(path: str, name: str) -> str:
    """The file ``name`` in the folder of ``path`` (a local path or an fsspec URL, whose query
    is dropped: a signed URL signs one object)."""
    if not is_url(path):
        return os.path.join(os.path.dirname(os.path.abspath(path)), name)
    chain, _, target = path.rpartition("::")
    target = target.split("?", 1)[0].split("#", 1)[0]
    folder = target.rsplit("/", 1)[0]
    return f"{chain}::{folder}/{name}" if chain else f"{folder}/{name}"
