"""The writer chain's tasks: open, write, finalize, abort; one writer per build."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import h5py

from features.base import Feature
from pipeline.build.decode import Packed
from pipeline.build.plan import BuildPlan
from pipeline.build.summary import BuildSummary
from pipeline.build.writer import BankWriter
from pipeline.errors import (
    PartialSetAsideError,
    SchemaError,
    WriterError,
)
from pipeline.files.handles import fsync_file, open_for_writing
from pipeline.format import layout
from pipeline.format.hdf5_errors import is_broken
from pipeline.format.partial import APPEND, NEW, RESUME, BankFiles, partial_path, set_aside
from pipeline.format.shards import refuse_writing, set_block, shard_files
from pipeline.read.records import ColumnSpec, RawRows, read_raw
from pipeline.urls import scrub
from pipeline.version import __version__

# Link results a writer keeps for tasks Dask may run again: a link's result is
# needed by the decode task ``window`` partitions later, so only the last few
# can be lost with a worker (the window is 2 x the cluster's threads).
_LINKS_KEPT = 4096


# Writers open in this process, by build token.
_OPEN: dict[str, BankWriter] = {}


# Paths whose build is opening here (token by path), from before its partial file exists to
# when its writer is in _OPEN: a second build of the path must not take that file meanwhile.
_OPENING: dict[str, str] = {}


_LOCK = threading.Lock()


# Builds whose writer this process closed after an error (their later tasks say so).
_ABORTED: set[str] = set()


def _resume_partial(partial: str, plan: BuildPlan) -> h5py.File:
    """Open a stopped build's partial file and cut it back to its last commit."""
    f = open_for_writing(partial, "r+")
    try:
        layout.check_format(f)
        _merge_schema(f, plan.features)
        layout.truncate(f, rebuild=True, sync=(lambda: fsync_file(f)) if plan.fsync else None)
    except BaseException:
        with contextlib.suppress(Exception):
            f.close()
        raise
    return f


def _refuse_on_a_worker(plan: BuildPlan) -> None:
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return  # not on a distributed worker: an in-process scheduler runs the whole chain
    raise WriterError(
        f"the build of {plan.path} was made without a cluster, so its writer chain is not pinned "
        "to one worker, and it is running on a distributed worker: make the graph with "
        "Bank.graph(path, sources, scheduler=client)"
    )


def check_schema(f: h5py.File, features: Mapping[str, Feature]) -> dict[str, Any]:
    """The bank's schema records merged with ``features``; raises if a feature differs.

    A feature the bank already has must match its record (storage, parameters,
    dataset options): appending ``Image(mode="L")`` to a bank of RGB images, or
    sounds at another rate, would mix incompatible data in one column.
    """
    stored = layout.read_json_attr(f, layout.ATTR_SCHEMA)
    for path, feature in features.items():
        old, new = stored.get(path), feature.describe()
        if old is None:
            stored[path] = new
            continue
        differ = [k for k in ("storage", "attrs", "dataset") if old.get(k) != new.get(k)]
        if differ:
            detail = "; ".join(f"{k}: bank {old.get(k)!r}, now {new.get(k)!r}" for k in differ)
            raise SchemaError(
                f"{f.filename}: feature {path!r} differs from the one the bank was built with "
                f"({detail}); use the bank's settings, or build into a new file (mode='w')"
            )
    return stored


def _merge_schema(f: h5py.File, features: Mapping[str, Feature]) -> None:
    merged = check_schema(f, features)
    if merged != layout.read_json_attr(f, layout.ATTR_SCHEMA):
        layout.write_json_attr(f, layout.ATTR_SCHEMA, merged)


def _writer_here(plan: BuildPlan, state: dict[str, Any]) -> BankWriter:
    writer = _OPEN.get(plan.token)
    if writer is None and plan.token in _ABORTED:
        raise WriterError(
            f"the build of {plan.path} stopped after an error (raised by an earlier task); "
            "its writer is closed. The partial bank is consistent up to its last commit"
        )
    if writer is None or state["pid"] != os.getpid() or state["host"] != socket.gethostname():
        raise WriterError(
            f"the writer of {plan.path} was opened by process {state['pid']} on {state['host']}, but "
            f"its next task ran in process {os.getpid()} on {socket.gethostname()}: the writer's "
            "process died or the chain was not pinned to one worker (build through "
            "Bank.create, or pass scheduler= to Bank.graph). The partial bank is consistent up to "
            "its last commit; resume with mode='a'"
        )
    return writer


def write_partition(
    plan: BuildPlan, packed: Packed, state: dict[str, Any], k: int = -1
) -> dict[str, Any]:
    """Link ``k`` of the chain: commit one decoded partition."""
    return _link(plan, state, lambda writer: writer.commit(packed, plan.on_error), k)


def _link(plan: BuildPlan, state: dict[str, Any], write: Any, k: int = -1) -> dict[str, Any]:
    """Run ``write(writer)`` in this build's writer; add its counts to ``state``.

    A failing write closes the writer (the partial bank stays, consistent up
    to its last commit) before the error goes on. Link ``k`` runs once per
    build: Dask runs a task again when a worker holding its only result dies
    (a decode worker that had received it as a dependency), and the commit it
    made is already on disk, so the re-run returns what the first run did.
    """
    writer = _writer_here(plan, state)
    if k in writer.links:
        return writer.links[k]
    try:
        counts = write(writer)
    except BaseException:
        abort_build(plan.token)
        raise
    result = {**state, **{key: state[key] + v for key, v in counts.items()}}
    if k >= 0:
        writer.links[k] = result
        while len(writer.links) > _LINKS_KEPT:  # only recent links can be run again
            del writer.links[next(iter(writer.links))]
    return result


def read_partition(
    plan: BuildPlan, state: dict[str, Any], columns: list[ColumnSpec], rows: Any, after: Any = None
) -> RawRows | None:
    """A link beside the chain (``bank.map``): read sources' inputs through the writer's handle.

    The bank is open for writing in this process only, so its inputs are read
    here, as stored, and handed to the tasks that run the function on any
    worker, which also turn them into values (decoders run there, not here).
    ``after`` is only a dependency (back-pressure).
    """
    if plan.token in _ABORTED:
        return None  # the chain stopped on an error; that error is the one to report
    return read_raw(_writer_here(plan, state).f, columns, rows)


def attach_partition(
    plan: BuildPlan, packed: Packed, state: dict[str, Any], k: int = -1
) -> dict[str, Any]:
    """Link ``k`` of a ``bank.map`` chain: write a partition's results to existing sources."""
    return _link(plan, state, lambda writer: writer.attach(packed, plan.on_error), k)


def finalize_build(plan: BuildPlan, state: dict[str, Any]) -> BuildSummary:
    """Last task of the chain: sort labels, compact failures, close, rename into place."""
    writer = _writer_here(plan, state)
    f = writer.f
    try:
        writer.sort_categories()
        failures = writer.compact_failures()
        provenance = layout.read_json_attr(f, layout.ATTR_PROVENANCE)
        provenance["library"] = f"h5bank {__version__}"
        provenance.setdefault("builds", []).append(
            {
                **plan.provenance,
                "started": dt.datetime.fromtimestamp(writer.started, dt.timezone.utc).isoformat(),
                "finished": dt.datetime.now(dt.timezone.utc).isoformat(),
                "ok": state["ok"],
                "failed": state["failed"],
                "skipped": state["skipped"],
            }
        )
        layout.write_json_attr(f, layout.ATTR_PROVENANCE, provenance)
        summary = BuildSummary(
            path=plan.path,
            ok=state["ok"],
            failed=state["failed"],
            skipped=state["skipped"],
            sources=writer.n,
            columns=writer.summary_columns(),
            failures=failures,
            writer_seconds=writer.busy,
            seconds=time.time() - writer.started,  # create() replaces it with its wall time
            writer_pid=os.getpid(),
            action=_action(plan.provenance),
            notes=list(state.get("notes", [])),
        )
        layout.mark_committed(f)  # the failure tables were compacted
        layout.set_state(f, layout.COMPLETE)
        f.flush()
        writer.sync()  # the last commit record and the complete state, before the rename
    except BaseException:
        abort_build(plan.token)
        raise
    with _LOCK:
        _OPEN.pop(plan.token, None)
    f.close()
    os.replace(partial_path(plan.path), plan.path)
    if plan.block is None and plan.mode == "w":
        for shard in shard_files(plan.path):  # of the sharded bank this file replaced
            with contextlib.suppress(OSError):
                os.remove(shard)
    return summary


def restore_after_failure(path: str, error: BaseException) -> None:
    """Put back a complete bank whose ``bank.map`` failed, as of its last commit.

    A map renames the bank to its partial path while it writes; when the map
    fails (a function error with ``on_error="raise"``, a dead writer), this
    reopens the partial bank in this process, cuts it to its last commit and
    renames it back. If it cannot (the writer is still open somewhere), a
    note on ``error`` says how to resume by hand.
    """
    files = BankFiles.at(path)
    if not files.building or files.bank:
        return
    partial = files.partial
    plan = BuildPlan(
        token=f"restore-{os.getpid()}-{time.time_ns()}",
        path=path,
        mode="a",
        features={},
        on_error="skip",
        provenance={
            "mode": "map stopped",
            "error": scrub(f"{type(error).__name__}: {error}")[:500],
        },
        chunk_bytes=1 << 20,
    )
    try:
        finalize_build(plan, open_build(plan))
    except Exception as failure:
        error.add_note(
            f"h5bank: {path} is left at {partial} ({failure}); resume with "
            "create(path, [], mode='a') once nothing else writes it"
        )
    else:
        error.add_note(
            f"h5bank: {path} was put back as of its last commit (results written so far are "
            "kept); nothing needs resuming: run the map again to fill in the rest"
        )


def _action(provenance: Mapping[str, Any]) -> str:
    if provenance.get("mode") == "map":
        return f"mapped {provenance.get('function')}() into {provenance.get('output')} of"
    return "built"


def abort_build(token: str) -> bool:
    """Close the writer of build ``token`` if this process holds it; the partial bank stays."""
    with _LOCK:
        writer = _OPEN.pop(token, None)
        # Marked even when no writer is open here (yet): an open_build of this build still
        # running in another thread (a sharded build's other chain) must not leave one open.
        _ABORTED.add(token)
    if writer is None:
        return False
    with contextlib.suppress(Exception):  # the file may already be unusable; closing is best effort
        writer.f.close()
    return True


def open_build(plan: BuildPlan) -> dict[str, Any]:
    """First task of the chain: open (or resume) the partial bank in this process.

    Nothing on disk changes until the bank to append to has opened for
    writing and passed its checks; only then is it renamed to the partial path.
    """
    if not plan.pinned:
        _refuse_on_a_worker(plan)
    if plan.token in _ABORTED:
        raise WriterError(f"the build of {plan.path} stopped (an error in another task)")
    with _LOCK:
        mine = _OPEN.get(plan.token)
        other = next((t for t, w in _OPEN.items() if w.target == plan.path), None)
        other = other or _OPENING.get(plan.path)
        if mine is None and other is None:
            _OPENING[plan.path] = plan.token
    if mine is not None:  # Dask ran this task again (its result was lost): it is open here
        return mine.opened
    if other is not None:
        raise WriterError(
            f"a build of {plan.path} (build {other}) is still writing it in this process; wait "
            "for it, or abort it (Build.abort()) if it was cancelled"
        )
    try:
        return _open_build(plan)
    finally:
        with _LOCK:
            _OPENING.pop(plan.path, None)


def _open_build(plan: BuildPlan) -> dict[str, Any]:
    """:func:`open_build` once this process holds the path (``_OPENING``)."""
    files = BankFiles.at(plan.path)
    partial = files.partial
    notes: list[str] = []
    start = files.start(plan.mode, notes)
    if start == RESUME:
        try:
            f = _resume_partial(partial, plan)
        except (OSError, RuntimeError, KeyError, ValueError) as error:
            if not is_broken(error):
                raise
            # HDF5 cannot make sense of what the killed build left (its flushes are not
            # atomic): keep the file aside and build again, rather than never resuming.
            aside = set_aside(partial)
            if plan.skipped:
                # This build was planned without the sources the partial file said it
                # committed: building now would leave them out. The next run plans anew.
                raise PartialSetAsideError(
                    f"{partial} could not be resumed ({error}); it was moved to {aside}. "
                    "Run the build again (mode='a', h5bank build --resume): it will build "
                    "every source anew"
                ) from None
            notes.append(
                f"{partial} could not be resumed ({error}): moved to {aside}, building again"
            )
            start = NEW
    if start == APPEND:
        f = open_for_writing(plan.path, "r+")
        try:
            refuse_writing(f, plan.path)
            layout.check_format(f)
            _merge_schema(f, plan.features)
            layout.truncate(f)
        except BaseException:
            f.close()
            raise
    elif start == NEW:
        f = open_for_writing(partial, "w-")
    try:
        if start == NEW:
            schema = {path: feature.describe() for path, feature in plan.features.items()}
            layout.init_bank(
                f,
                schema,
                {"library": f"h5bank {__version__}", "builds": []},
                expected=plan.planned,
            )
            if plan.block is not None:
                set_block(f, plan.block)
        layout.set_state(f, layout.BUILDING)
        f.flush()
        if start == APPEND:
            os.replace(plan.path, partial)  # the bank is open: POSIX renames it under us
        writer = BankWriter(
            f,
            plan.features,
            plan.chunk_bytes,
            target=plan.path,
            fsync=plan.fsync,
            planned=plan.planned,
            sync_records=False,  # each commit's sync carries the record before it; the last below
        )
    except BaseException:
        f.close()
        raise
    writer.opened = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "ok": 0,
        "failed": 0,
        "skipped": plan.skipped,
        "notes": notes,
    }
    with _LOCK:
        aborted = plan.token in _ABORTED
        if not aborted:
            _OPEN[plan.token] = writer
    if aborted:  # the build stopped while this chain opened: its partial file stays as it is
        f.close()
        raise WriterError(f"the build of {plan.path} stopped (an error in another task)")
    return writer.opened
