"""Sharded builds: N writer chains, each on its own worker, and one index that joins them.

::

    decode 0..a ─▶ chain 0 (worker A) ─▶ shard 0 ─┐
    decode a..b ─▶ chain 1 (worker B) ─▶ shard 1 ─┼─▶ index (one task) ─▶ bank.h5
    ...                                           ┘

Each chain is today's single-writer chain (commit order, commit record,
back-pressure) writing its own shard file (:mod:`pipeline.format.shards`),
and the decode tasks of its sources run on its own worker's threads, so
decoded data does not cross the network. Shards take consecutive blocks of
the sources (whole partitions, about as many sources each), so the index
lists them in the order one writer would have committed them. When every
chain has finished, one task writes the index and removes the shard files
of the bank it replaces.

A build killed part-way leaves its shards' partial files: ``mode="a"``
gives each the rest of its own block (each recorded the last id of its
block) and resumes it from its commit record; then the index is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import h5py

from pipeline.build.plan import BuildPlan, Partition, committed_ids
from pipeline.build.summary import BuildSummary
from pipeline.errors import H5BankError, WriterError
from pipeline.format import layout
from pipeline.format import shards as format_shards
from pipeline.format.hdf5_errors import is_locked
from pipeline.format.partial import PARTIAL_SUFFIX
from pipeline.version import __version__


@dataclass
class ShardPlan:
    """One chain of a sharded build: the shard it writes, how it starts, its partitions."""

    path: str  # the shard's (complete) path
    mode: str  # "w": a new shard; "a": resume (or extend) one a stopped build left
    partitions: list[Partition]
    last: str | None  # the last source id of its block, recorded in the shard


@dataclass
class ShardedPlan:
    """The chains of a sharded build, the shards the index lists before them, and counts."""

    chains: list[ShardPlan]
    kept: list[str]  # shards of the bank appended to, listed first in the new index
    skipped: int
    base: str | None  # the uuid of the bank appended to (None: a new bank)


def sharded_build(path: str, mode: str, shards: int) -> bool:
    """Whether the build of ``path`` is sharded: ``shards`` > 1 asked for a new bank, or
    the bank (or a stopped build of it) already is, when appending."""
    if mode == "a":
        if os.path.exists(path):
            return bool(format_shards.listed_shards(path))
        if os.path.exists(path + PARTIAL_SUFFIX):
            return False  # a stopped single-file build: resumed as one file
        if format_shards.shard_files(path):
            return True
    return shards > 1


def plan_shards(
    path: str,
    mode: str,
    shards: int,
    partition: Callable[[set[str]], tuple[list[Partition], int]],
    resume: bool = False,
) -> ShardedPlan:
    """The chains of a sharded build of ``path``; ``partition(skip)`` cuts the build's
    sources, less the ids in ``skip``, into partitions. ``mode="a"`` adds to the bank and
    resumes the shards a stopped build left; ``resume`` resumes them in a ``mode="w"`` build
    too (one whose writer was lost, planned again), which replaces the bank."""
    listed = format_shards.listed_shards(path)
    kept = listed if mode == "a" else []
    base = _uuid(path) if kept else None
    stopped: list[tuple[str, str | None, set[str]]] = []
    if mode == "a" or resume:
        for found in format_shards.shard_files(path):
            shard = format_shards.complete_path(found)
            if shard in listed or any(s == shard for s, _, _ in stopped):
                continue
            stopped.append((shard, *_stopped_shard(found, path, base)))
    tags = {_tag(shard) for shard, _, _ in stopped}
    if len(tags) > 1:
        raise WriterError(
            f"shard files of {len(tags)} different builds of {path} are beside it, none listed "
            f"by a bank: {', '.join(os.path.basename(s) for s, _, _ in stopped)}. Keep only the "
            "files of the build to resume (they share the part after '.shard-'), or delete them "
            "all to build anew"
        )
    skip = committed_ids(path) if kept else set()
    for _, _, done in stopped:
        skip |= done
    partitions, skipped = partition(skip)
    if stopped:
        chains = _split_at_blocks(partitions, stopped)
    else:
        tag = format_shards.new_tag()
        groups = _even_groups(partitions, shards) if partitions or kept else [[]]
        chains = [
            ShardPlan(format_shards.shard_path(path, tag, k), "w", group, _last_id(group))
            for k, group in enumerate(groups)
        ]
    return ShardedPlan(chains, kept, skipped, base)


def _tag(shard: str) -> str:
    """The build tag in a shard's name (``photos.shard-3f9a1c-00000.h5``: ``3f9a1c``)."""
    return os.path.basename(shard).rsplit(".shard-", 1)[-1].split("-")[0]


def _uuid(path: str) -> str | None:
    with h5py.File(path, "r") as f:
        return layout.bank_uuid(f)


def _stopped_shard(found: str, path: str, base: str | None) -> tuple[str | None, set[str]]:
    """A stopped build's shard file of the bank ``path`` (whose uuid is ``base``, ``None``
    when there is no bank yet): the last id of its block, and the ids it committed."""
    try:
        with h5py.File(found, "r") as f:
            recorded = format_shards.block(f)
    except OSError as error:
        if is_locked(error):
            raise WriterError(
                f"{found}, a shard of a build of {path}, is open for writing in another process "
                "(that build is still running?): wait for it, or stop it, then resume"
            ) from None
        raise H5BankError(
            f"{found} is a shard of a build of {path} that stopped, but cannot be read "
            f"({error}); move it away to build its sources again"
        ) from None
    except H5BankError as error:
        raise H5BankError(
            f"{found} is a shard of a build of {path} that stopped, but cannot be read "
            f"({error}); move it away to build its sources again"
        ) from None
    if recorded is None:
        raise H5BankError(
            f"{found} is named like a shard of {path} but records no block: it was not "
            "written by a sharded build; move it away"
        )
    if recorded["base"] != base:
        raise WriterError(
            f"{found} is a shard of a build that stopped while it was replacing {path}, not "
            f"adding to it: delete the files {format_shards.shard_stem(path)}* that {path} "
            f"does not list to add to the bank, or delete {path} to resume that build"
        )
    return recorded["last"], committed_ids(format_shards.complete_path(found))


def _even_groups(partitions: list[Partition], n: int) -> list[list[Partition]]:
    """``partitions`` in at most ``n`` consecutive groups of about as many sources."""
    n = max(1, min(n, len(partitions)))
    total = sum(len(p) for p in partitions)
    groups: list[list[Partition]] = [[] for _ in range(n)]
    seen = 0
    for p in partitions:
        k = min(n - 1, seen * n // max(1, total))
        groups[k].append(p)
        seen += len(p)
    return [g for g in groups if g]


def _split_at_blocks(
    partitions: list[Partition], stopped: list[tuple[str, str | None, set[str]]]
) -> list[ShardPlan]:
    """The sources left of a stopped sharded build, each given to the shard whose block holds
    it; sources past every block (added since) go to the last shard."""
    chains = [ShardPlan(shard, "a", [], last) for shard, last, _ in stopped]
    k = 0
    pending = list(partitions)
    while pending:
        p = pending.pop(0)
        while k < len(chains) - 1 and _block_done(stopped[k]):
            k += 1
        last = stopped[k][1]
        specs = p.specs
        ids = [s.id for s in specs]
        if k == len(chains) - 1 or last not in ids:
            chains[k].partitions.append(p)
            continue
        cut = ids.index(last) + 1
        chains[k].partitions.append(Partition(p.index, specs[:cut], p.failures))
        if cut < len(specs):
            pending.insert(0, Partition(p.index, specs[cut:]))
        k += 1
    return chains


def _block_done(stopped: tuple[str, str | None, set[str]]) -> bool:
    _, last, committed = stopped
    return last is None or last in committed


def _last_id(group: list[Partition]) -> str | None:
    for p in reversed(group):
        specs = p.specs
        if specs:
            return specs[-1].id
    return None


def chain_plan(plan: BuildPlan, shard: ShardPlan, base: str | None) -> BuildPlan:
    """The plan of the chain writing ``shard``, from the index's ``plan``; ``base``: the uuid
    of the bank it adds to."""
    return dataclasses.replace(
        plan,
        token=f"{plan.token}-{os.path.basename(shard.path)}",
        path=shard.path,
        mode=shard.mode,
        planned=sum(len(p) for p in shard.partitions),
        skipped=0,
        block={"last": shard.last, "base": base},
    )


def finish_sharded(
    plan: BuildPlan, shards: list[str], skipped: int, *summaries: BuildSummary
) -> BuildSummary:
    """The build's last task: write the index over ``shards`` (complete now), remove the
    shard files the bank no longer lists, and sum the chains' summaries."""
    started = time.time()
    provenance: dict[str, Any] = {"library": f"h5bank {__version__}", "builds": []}
    base = None
    if plan.mode == "a" and os.path.exists(plan.path):
        with h5py.File(plan.path, "r") as f:
            provenance = layout.read_json_attr(f, layout.ATTR_PROVENANCE) or provenance
            base = layout.bank_uuid(f)
    ok = sum(s.ok for s in summaries)
    failed = sum(s.failed for s in summaries)
    provenance["library"] = f"h5bank {__version__}"
    provenance.setdefault("builds", []).append(
        {
            **plan.provenance,
            "shards": len(summaries),
            "ok": ok,
            "failed": failed,
            "skipped": skipped,
        }
    )
    format_shards.write_index(plan.path, shards, provenance, base)
    listed = set(shards)
    for other in format_shards.shard_files(plan.path):
        if other not in listed:
            with contextlib.suppress(OSError):
                os.remove(other)
    summary = merged_summary(plan.path, summaries, "built", skipped)
    summary.writer_seconds += time.time() - started
    summary.notes.append(
        f"{len(shards)} shards written by {len(summaries)} writers, joined by the index"
    )
    return summary


def merged_summary(
    path: str, summaries: Sequence[BuildSummary], action: str, skipped: int = 0
) -> BuildSummary:
    """One summary of the chains' (or shards' maps') ``summaries``, for the sharded bank
    ``path`` (its index written)."""
    with h5py.File(path, "r") as f:
        sources = layout.committed(f)
    return BuildSummary(
        path=path,
        ok=sum(s.ok for s in summaries),
        failed=sum(s.failed for s in summaries),
        skipped=skipped + sum(s.skipped for s in summaries),
        sources=sources,
        columns=_merged_columns(summaries),
        failures=[failure for s in summaries for failure in s.failures],
        writer_seconds=sum(s.writer_seconds for s in summaries),
        writer_pid=os.getpid(),
        action=action,
        notes=[n for s in summaries for n in s.notes],
    )


def _merged_columns(summaries: Sequence[BuildSummary]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for summary in summaries:
        for path, info in summary.columns.items():
            into = merged.setdefault(path, {**info, "rows": 0, "bytes": 0})
            into["rows"] += info["rows"]
            into["bytes"] += info["bytes"]
            into["shape"] = [into["rows"], *info["shape"][1:]]
    return dict(sorted(merged.items()))


def assign_workers(
    n: int, writer: str | None, decoders: list[str] | None
) -> list[tuple[str | None, list[str] | None]]:
    """Each chain's writer and decode threads: workers in address order, chain ``k`` on
    worker ``k % workers``, and each worker's threads decoding for the chain it writes
    (with more workers than chains, several workers feed one chain)."""
    if not decoders:
        return [(writer, None)] * n
    workers = sorted(set(decoders))
    placed: list[tuple[str | None, list[str] | None]] = []
    for k in range(n):
        if n <= len(workers):
            mine = [w for j, w in enumerate(workers) if j % n == k]
        else:
            mine = [workers[k % len(workers)]]
        placed.append((mine[0], [w for w in decoders if w in mine]))
    return placed


# "auto" makes no shard of fewer sources than this: a small build stays one plain file (each
# shard costs a file, about 30 KB, and a writer chain's start).
AUTO_SOURCES_PER_SHARD = 1024


def auto_shards(workers: int, sources: int) -> int:
    """What ``shards="auto"`` means for a build of ``sources`` on ``workers`` worker processes:
    one shard per worker, so that each worker writes what it decodes (nothing decoded crosses
    between processes), but no shard of fewer than :data:`AUTO_SOURCES_PER_SHARD` sources.
    See ``docs/scaling.md`` for the measurements behind it."""
    return max(1, min(workers, sources // AUTO_SOURCES_PER_SHARD))


def resolve_count(shards: int | str, workers: int) -> int:
    """The number of shards ``shards`` asks for: a number, or ``"auto"`` (one per worker
    process of a cluster of ``workers``; 1 in process)."""
    if shards == "auto":
        return max(1, workers)
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be a whole number >= 1 or 'auto', got {shards!r}")
    return shards
