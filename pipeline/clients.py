"""The Dask distributed client in use, and its workers (a leaf: builds, runners and banks ask).

``distributed`` is imported on first use: importing h5bank stays cheap.
"""

from __future__ import annotations

from typing import Any


def default_client() -> Any:
    """The current default ``distributed.Client``, or ``None``."""
    from distributed import default_client as current

    try:
        return current()
    except ValueError:
        return None


def cluster_workers(client: Any) -> dict[str, Any]:
    """Every worker of the client's cluster (recent distributed lists 5 unless told)."""
    try:
        return client.scheduler_info(n_workers=-1)["workers"]
    except TypeError:
        return client.scheduler_info()["workers"]
