"""Building a bank type's bank: the graph for a cluster, run with a progress bar, or uploaded.

``TypedFile.create`` and ``TypedFile.graph`` are the public face; these
functions do the work for a bank type's :class:`~pipeline.schema.Schema`.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from pipeline.build.graph import Build, build_graph
from pipeline.build.options import BuildOptions
from pipeline.build.summary import BuildSummary
from pipeline.build.upload import check_upload_target, upload_bank
from pipeline.errors import PartialSetAsideError, WriterLostError
from pipeline.run import auto
from pipeline.run.runner import Runner, placement, runner_for
from pipeline.schema import Schema
from pipeline.urls import is_url, redact

# Writers a sharded build may lose (their workers gone) and still finish by itself.
MAX_WRITERS_LOST = 3


def graph(schema: Schema, path: str, sources: Any, options: BuildOptions, scheduler: Any) -> Build:
    """The build of ``schema``'s bank at ``path`` as a Dask collection, for ``scheduler``."""
    if is_url(path):
        raise ValueError(
            f"a build graph writes a local file; build {redact(path)} with "
            "create(), which builds locally and uploads the bank when it is complete"
        )
    if options.shards != 1 and isinstance(scheduler, Runner):
        scheduler.wait_for_expected()  # a writer on each worker: plan once they are there
    writer, threads, decoders = placement(scheduler)
    return build_graph(
        schema,
        schema.bases,
        path,
        sources,
        options,
        writer=writer,
        threads=threads,
        decoders=decoders,
    )


def build(
    schema: Schema, path: str, sources: Any, options: BuildOptions, scheduler: Any,
    n_workers: int | None = None,
) -> BuildSummary:  # fmt: skip
    """Build the bank at the local ``path`` on ``scheduler``; return the summary.

    A partial file the plan counted on but that could not be resumed is set
    aside by the writer; the build is then planned again, once, for every source.
    """
    progress = options.progress
    started = time.perf_counter()
    notes: list[str] = []
    lost = 0
    scheduler = auto.resolve(scheduler, {p: schema[p] for p in schema}, sources, progress)
    with runner_for(scheduler, progress=progress, n_workers=n_workers) as runner:
        while True:
            made = graph(schema, path, sources, options, runner)
            try:
                summary = runner.run(made, progress=progress)
                break
            except WriterLostError as error:
                # A sharded build's shards are on the shared folder, each consistent up to its
                # last commit: plan again on the workers there are, resuming every shard.
                if (
                    len(made.chains) < 2
                    or lost >= MAX_WRITERS_LOST
                    or isinstance(sources, Iterator)
                ):
                    raise
                lost += 1
                notes.append(
                    f"{str(error).split(' (')[0]}: its shard was resumed on another worker"
                )
                if progress:
                    print(f"h5bank: {notes[-1]}", file=sys.stderr)
                options = dataclasses.replace(options, resume_shards=True)
            except PartialSetAsideError as error:
                # The partial file was planned around but could not be resumed: it is
                # set aside now, so planning again builds every source (once).
                if notes or isinstance(sources, Iterator):
                    raise
                notes.append(f"{str(error).split('. Run the build again')[0]}; built again")
                if progress:
                    print(f"h5bank: {notes[-1]}", file=sys.stderr)
    summary.notes[:0] = notes
    summary.seconds = time.perf_counter() - started
    if progress:
        print(summary, file=sys.stderr)
    return summary


def build_remote(
    schema: Schema, url: str, sources: Any, options: BuildOptions, scheduler: Any,
    n_workers: int | None = None,
) -> BuildSummary:  # fmt: skip
    """Build a bank into a local temporary file, then upload it to ``url`` whole."""
    if options.mode != "w":
        raise ValueError(
            f"cannot append to the remote bank {redact(url)}: copy it to a local path, "
            "create(local, sources, mode='a'), and create or upload it again"
        )
    check_upload_target(url, options.storage_options)  # before hours of building, not after
    name = posixpath.basename(url.split("::")[0].split("?")[0]) or "bank.h5"
    scratch = tempfile.mkdtemp(prefix="h5bank-", dir=options.scratch)
    local = os.path.join(scratch, name)
    try:
        summary = build(schema, local, sources, options, scheduler, n_workers)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    try:
        upload_bank(local, url, options.storage_options)
    except BaseException as error:
        error.add_note(f"h5bank: the built bank is kept at {local}; upload it, or delete it")
        raise
    shutil.rmtree(scratch, ignore_errors=True)
    summary.path = redact(url)
    return summary
