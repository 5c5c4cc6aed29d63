"""Uploading a finished bank to a URL."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any

from pipeline.errors import (
    WriterError,
)
from pipeline.files.remote import remote_fs
from pipeline.format.partial import PARTIAL_SUFFIX
from pipeline.urls import redact, scrub, transient


def upload_bank(local: str, url: str, storage_options: Mapping[str, Any] | None) -> None:
    """Copy a finished bank to ``url``; never a partially written object at ``url``.

    Object stores (S3, GCS, Azure) show an object only once its upload has
    completed, so the bank is put there directly. Elsewhere it is uploaded
    under a temporary name and moved onto ``url``.
    """
    fs, path = remote_fs(url, storage_options)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    try:
        if protocols & _OBJECT_STORES:
            fs.put_file(local, path)
        else:
            staging = path + PARTIAL_SUFFIX
            fs.put_file(local, staging)
            fs.mv(staging, path)
    except Exception as error:
        raise WriterError(
            f"the bank was built but could not be uploaded to {redact(url)}: "
            f"{type(error).__name__}: {scrub(str(error))}"
        ) from None


_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"}


def check_upload_target(url: str, storage_options: Mapping[str, Any] | None) -> None:
    """Fail now, not after the build, when ``url``'s bucket (or folder) cannot be reached."""
    fs, path = remote_fs(url, storage_options)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    parent = path.split("/")[0] if protocols & _OBJECT_STORES else posixpath.dirname(path)
    if not parent:
        return
    try:
        # Listing tells a missing bucket (FileNotFoundError) from one these credentials may
        # not list but may write to (PermissionError: a least-privilege put-only policy).
        fs.ls(parent, detail=False)
    except PermissionError:
        return
    except FileNotFoundError as error:
        if transient(error):
            raise WriterError(
                f"cannot reach {redact(url)} to upload the bank to ({scrub(str(error))}); "
                "nothing was built"
            ) from None
        raise WriterError(
            f"{redact(url)}: {parent!r} does not exist, so the bank could not be uploaded there; "
            "create it first. Nothing was built"
        ) from None
    except Exception as error:
        if transient(error):
            raise WriterError(
                f"cannot reach {redact(url)} to upload the bank to: {type(error).__name__}: "
                f"{scrub(str(error))}; nothing was built"
            ) from None
