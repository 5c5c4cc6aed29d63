"""The embedded default's choice: threads in this process, or a local cluster of processes.

``scheduler="auto"`` (what a build with no scheduler, no current Dask client
and no ``h5bank.build.scheduler`` setting runs on) looks at the features and
at a bounded sample of the sources before anything is built:

- **threads** when the sources are few (a list, folder or glob of fewer
  than :data:`SMALL` files, counted by a walk that stops there): a local
  cluster's start-up (about 0.7 s on 2 cores) costs more than it saves
  (2,000 PNGs of 48-128 px: 3,740-4,380 files/s on threads, 1,570-1,890 on
  a fresh cluster);
- **threads** when every feature that reads the files decodes them in C
  code that releases the GIL (``Feature.decodes_in_c``: ``Image``,
  ``Sound``), however many files there are: worker processes would move
  every decoded byte to the writer's process, and their start-up does not
  pay back. Measured on 2 cores: 20,000 PNGs of 8 KB built at 4,290-6,510
  files/s on threads, 3,570-5,080 on a fresh cluster; 60,000 at 6,190-6,440
  against 4,730-5,590; 600 WAVs of 200 KB at 2,088 against 1,033; ragged
  PNGs and JPEG photos also built faster on threads;
- **threads** when the files are large (at least :data:`LARGE_BYTES` on
  average, from the sizes of up to 32 of them), whatever decodes them;
- **a local cluster** otherwise: many small files read by other features,
  whose Python work per file shares one GIL on threads and spreads over
  processes on a cluster (20,000 ``.npy`` arrays of 1 KB on 2 cores:
  8,220-9,770 files/s on a fresh cluster, 10,800-12,300 on threads,
  12,700-13,600 on a running cluster: its start-up pays from about 40,000
  files here, and sooner with more cores), sources made from their ids,
  URLs and streams (whose sizes are not looked at), and builds inside a
  Slurm allocation (the cluster is sized to it).

The sample never lists a whole folder: at most :data:`SMALL` entries are
visited, so a folder of a million files costs what one of 5,000 does (a
few milliseconds).
"""

from __future__ import annotations

import glob
import itertools
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline import config
from pipeline.clients import default_client
from pipeline.run.local import say, slurm_allocation
from pipeline.sources import SourceSpec
from pipeline.urls import is_url

# Fewer sources than this build on threads.
SMALL = 5000
# Files at least this large on average build on threads.
LARGE_BYTES = 32 << 10
# Files whose sizes are sampled.
SAMPLE = 32


@dataclass(frozen=True)
class Choice:
    """Where ``"auto"`` builds (``"threads"`` or ``"local"``), and why, for the summary."""

    scheduler: str
    why: str

    @property
    def where(self) -> str:
        return "threads in this process" if self.scheduler == "threads" else "a local cluster"


def choose(features: Mapping[str, Any], sources: Any) -> Choice:
    """Threads or a local cluster for building ``sources`` with ``features`` (see the module)."""
    if slurm_allocation() is not None:
        return Choice("local", "inside a Slurm allocation: a local cluster sized to it")
    reading = [f for f in features.values() if f.reads_bytes and f.derived_from is None]
    if not reading:
        return Choice("local", "sources made from their ids: Python work spread over processes")
    files = _local_files(sources)
    if files is None:
        return Choice("local", "remote or streamed sources")
    seen = list(itertools.islice(files, SMALL))
    if len(seen) < SMALL:
        count = f"{len(seen)} local file{'s' if len(seen) != 1 else ''}"
        return Choice("threads", f"{count}: fewer than a cluster's start-up pays for")
    if all(f.decodes_in_c for f in reading):
        kinds = ", ".join(sorted({type(f).__name__ for f in reading}))
        return Choice(
            "threads", f"{SMALL:,}+ local files of {kinds}: decoding them releases the GIL"
        )
    sizes = [size for size in map(_size, seen[:: max(1, len(seen) // SAMPLE)]) if size is not None]
    mean = sum(sizes) / len(sizes) if sizes else 0
    if mean >= LARGE_BYTES:
        return Choice(
            "threads", f"files of {mean / 1024:,.0f} KB on average: decoding them releases the GIL"
        )
    return Choice("local", f"many files of {mean / 1024:,.0f} KB on average: worker processes")


def _local_files(sources: Any) -> Iterator[str] | None:
    """The local files ``sources`` names, lazily (a folder walked, a glob matched; a listed
    source, as ``h5bank image-bank`` passes them, by its path); ``None`` when any of its first
    entries is a URL or a plain id, or it is a stream."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not isinstance(sources, (list, tuple)):
        return None
    items = [_path_of(s) for s in sources]
    if None in items or any(is_url(s) for s in items[:SAMPLE]):  # type: ignore[arg-type]
        return None
    return itertools.chain.from_iterable(map(_files_of, items))  # type: ignore[arg-type]


def _path_of(source: Any) -> str | None:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return source.url if isinstance(source, SourceSpec) else None


def _files_of(item: str) -> Iterator[str]:
    item = os.path.expanduser(item)
    if os.path.isdir(item):
        yield from walk_files(item)
    elif glob.has_magic(item) and not os.path.lexists(item):
        yield from glob.iglob(item, recursive=True)
    else:
        yield item


def walk_files(root: str) -> Iterator[str]:
    """Files under ``root``, depth first, each folder read lazily (``os.scandir``); hidden
    entries skipped, as the build skips them."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = os.scandir(folder)
        except OSError:
            continue
        with entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    yield entry.path


def _size(path: str) -> int | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def resolve(scheduler: Any, features: Mapping[str, Any], sources: Any, progress: bool) -> Any:
    """``scheduler`` as a build runs it: ``None`` is the current default client, else the
    setting ``h5bank.build.scheduler``, else ``"auto"``; ``"auto"`` is chosen here (and said,
    with ``progress``)."""
    if scheduler is None:
        if default_client() is not None:
            return None
        scheduler = config.get("build.scheduler") or "auto"
    if not (isinstance(scheduler, str) and scheduler == "auto"):
        return scheduler
    choice = choose(features, sources)
    say(progress, f"building on {choice.where} ({choice.why})")
    return choice.scheduler
