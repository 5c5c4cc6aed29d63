"""A build's options, resolved once: arguments first, then ``h5bank.build.*`` in ``dask.config``.

As dask-jobqueue does for its clusters, ``None`` arguments are looked up in
the configuration in one place, :meth:`BuildOptions.resolve`, where the
build is made; the graph, the writer chain and the runner receive the
resolved, frozen values (workers of a running cluster do not see the
client's ``dask.config.set``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline import config

ON_ERROR = ("skip", "raise")


@dataclass(frozen=True)
class BuildOptions:
    """What a build (or ``bank.map`` with an output) does, every setting resolved.

    ``mode`` is ``"w"`` or ``"a"``; ``on_error`` ``"skip"`` or ``"raise"``;
    ``partition_size`` and ``max_pending`` stay ``None`` where the graph
    chooses them from the cluster; ``fetch`` holds ``h5bank.fetch``.
    """

    mode: str = "w"
    on_error: str = "skip"
    progress: bool = True
    partition_size: int | None = None
    max_pending: int | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    chunk_bytes: int = 1 << 20
    fsync: bool = True
    fetch: Mapping[str, Any] = field(default_factory=dict)
    scratch: str | None = None
    shards: int | str = 1  # writer chains (shard files), or "auto": one per worker process
    # Resume the shards a stopped build of the bank left, in a mode="w" build too: set when
    # a build whose writer's worker died is planned again (pipeline.bank.building).
    resume_shards: bool = False

    @classmethod
    def resolve(
        cls,
        mode: str = "w",
        on_error: str | None = None,
        progress: bool | None = None,
        partition_size: int | None = None,
        max_pending: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
        shards: int | str | None = None,
    ) -> BuildOptions:
        """Options from the arguments given, the others from ``h5bank.build.*`` (and
        ``h5bank.fetch``, ``h5bank.storage-options``); invalid values raise ``ValueError``."""
        if mode not in ("w", "a"):
            raise ValueError(f"mode must be 'w' (new bank) or 'a' (append / resume), got {mode!r}")
        on_error = config.get("build.on-error", on_error)
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        return cls(
            mode=mode,
            on_error=on_error,
            progress=bool(config.get("build.progress", progress)),
            partition_size=config.get("build.partition-size", partition_size),
            max_pending=config.get("build.max-pending", max_pending),
            storage_options=config.storage_options(storage_options),
            chunk_bytes=int(config.get("build.chunk-bytes")),
            fsync=bool(config.get("build.fsync")),
            fetch=config.section("fetch"),
            scratch=config.get("build.scratch"),
            shards=_shards(config.get("build.shards", shards)),
        )


def _shards(value: Any) -> int | str:
    """``h5bank.build.shards`` checked: a whole number >= 1 or ``"auto"`` (``None``: 1)."""
    if value is None:
        return 1
    if value == "auto":
        return "auto"
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"shards must be a whole number >= 1 or 'auto', got {value!r}")
    return value
