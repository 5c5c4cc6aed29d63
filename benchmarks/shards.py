"""Sharded builds against one writer, and reads of a sharded bank against one file.

    python benchmarks/shards.py [--files 20000] [--rows 1500] [--small 100000] [--repeat 2]

Every figure is measured in this run, on this machine, as one JSON line
(``{"figure", "tool", "value", "unit", ...}``); ratios are to the figure
they are compared with in the same run. Builds run on one running 2-worker
``LocalCluster`` (1 thread each), warmed by a build first, each bank removed
before its timed build; each build is the best of ``--repeat``.

- **writer-bound**: ``--rows`` sources of 1 MiB arrays made from their ids
  (decoding costs nothing: a preallocated array), 1 shard against 2 shards;
  and ``--small`` sources of 12 KiB rows, where the writer's cost per source
  shows; with the writers' busy microseconds per source (summed over the
  shards) against plain h5py appending the same rows in 4,096-row blocks in
  one process (a flush, and with syncs an fsync, per block, as a commit
  has); each with ``h5bank.build.fsync`` on (the default) and off; and the
  same writer cost in one process (``scheduler="sync"``), where nothing but
  the writer's own work is counted;
- **PNG build**: ``--files`` 64x64 PNGs (``corpora.png_corpus``) built with 1
  and with 2 shards, against h5bank's own decoder on both cores
  (``performance.decode_seconds``), and on the embedded default (a fresh
  local cluster, start-up included) with ``shards=1`` and ``"auto"``;
- **reads**: random batches of 64 by index, a scan in slices of 1,024, and one
  ``DataLoader`` epoch (batch 64, 2 workers, shuffled; best of 2) on the
  1-shard and 2-shard banks of the PNG corpus, every bank checked equal first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from corpora import png_corpus  # noqa: E402
from performance import Pictures, _h5bank_decode, decode_seconds, emit  # noqa: E402

from features import Feature  # noqa: E402
from pipeline import TypedFile, serve  # noqa: E402
from pipeline.format.shards import shard_files  # noqa: E402
from pipeline.serve import GetId, Input, Target  # noqa: E402

WORKERS = 2


class Block(Feature):
    """A row of ``ROW_BYTES`` bytes made from the source's id: nothing to fetch or decode."""

    reads_bytes = False
    storage = "item"
    row_bytes = 1 << 20

    def load(self, source: Any) -> np.ndarray:
        row = np.empty(self.row_bytes, np.uint8)
        row[:8] = np.frombuffer(int(source.id[1:]).to_bytes(8, "little"), np.uint8)
        return row


class SmallBlock(Block):
    row_bytes = 12 << 10


class Large(TypedFile):
    x = Block()


class Small(TypedFile):
    x = SmallBlock()


def remove(out: Path) -> None:
    for old in (out, Path(f"{out}.partial"), *map(Path, shard_files(str(out)))):
        old.unlink(missing_ok=True)


def timed_build(bank_type: type, out: Path, sources: Any, scheduler: Any, shards: Any, repeat: int):
    """Best seconds of ``repeat`` builds, and the summary of the best."""
    best, summary = float("inf"), None
    for _ in range(repeat):
        remove(out)
        started = time.perf_counter()
        bank = bank_type.create(out, sources, scheduler=scheduler, shards=shards, progress=False)
        seconds = time.perf_counter() - started
        if seconds < best:
            best, summary = seconds, bank.summary
        bank.close()
    return best, summary


def h5py_append(out: Path, n: int, row_bytes: int, block: int = 4096, fsync: bool = False) -> float:
    """Seconds per row of plain h5py appending ``n`` rows in blocks of ``block`` in one process
    (chunks of 1 MiB, as h5bank's), the rows made in memory first: what one writer can do."""
    import h5py

    rows = np.zeros((block, row_bytes), np.uint8)
    per_chunk = max(1, (1 << 20) // row_bytes)
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    with h5py.File(out, "w") as f:
        data = f.create_dataset("data", (0, row_bytes), np.uint8, maxshape=(None, row_bytes),
                                chunks=(per_chunk, row_bytes))  # fmt: skip
        for start in range(0, n, block):
            m = min(block, n - start)
            data.resize(start + m, axis=0)
            data[start:] = rows[:m]
            f.flush()
            if fsync:
                os.fsync(f.id.get_vfd_handle())
    seconds = time.perf_counter() - started
    out.unlink()
    return seconds / n


def writer_bound(work: Path, client: Any, rows: int, small: int, repeat: int) -> None:
    """With ``h5bank.build.fsync`` on (the default: a disk sync per commit, so this disk's
    sync rate bounds both) and off (the writers' own rate)."""
    import dask

    for fsync in (True, False):
        for bank_type, n, label in ((Large, rows, "1MiB"), (Small, small, "12KiB")):
            ids = [f"s{i}" for i in range(n)]
            nbytes = n * bank_type.__schema__["x"].row_bytes
            results = {}
            with dask.config.set({"h5bank.build.fsync": fsync}):
                timed_build(bank_type, work / "warm.h5", ids[: n // 10], client, 2, 1)
                for shards in (1, 2):
                    out = work / f"wb-{shards}.h5"
                    seconds, summary = timed_build(bank_type, out, ids, client, shards, repeat)
                    results[shards] = seconds
                    emit(f"writer_bound_build_{label}", f"h5bank shards={shards}", n / seconds,
                         "sources/s", fsync=fsync, mb_per_s=round(nbytes / seconds / 1e6, 1),
                         seconds=round(seconds, 3),
                         writer_us_per_source=round(1e6 * summary.writer_seconds / n, 2))  # fmt: skip
                    if shards == 1:
                        plain = min(h5py_append(work / "plain.h5", n, bank_type.__schema__["x"].row_bytes, fsync=fsync) for _ in range(repeat))  # fmt: skip
                        emit(f"writer_cost_{label}", "h5bank writer / plain h5py append (4,096-row blocks)",
                             summary.writer_seconds / n / plain, "x", fsync=fsync,
                             h5py_us_per_row=round(1e6 * plain, 2))  # fmt: skip
                    remove(out)
            emit(f"writer_bound_build_{label}_speedup", "h5bank shards=2 / shards=1",
                 results[1] / results[2], "x", fsync=fsync)  # fmt: skip


def writer_in_process(work: Path, n: int, repeat: int) -> None:
    """The writer's busy time per 12 KiB source in one process (``scheduler="sync"``: no
    worker, no transfers), against plain h5py appending the same rows in 4,096-row blocks
    (a flush a block, and with syncs an fsync, as a commit has). Best of ``repeat`` each,
    taking turns."""
    import dask

    ids = [f"s{i}" for i in range(n)]
    row_bytes = Small.__schema__["x"].row_bytes
    out = work / "inproc.h5"
    for fsync in (False, True):
        with dask.config.set({"h5bank.build.fsync": fsync}):
            writer, plain = float("inf"), float("inf")
            for _ in range(max(3, repeat)):
                # Each starts with no dirty pages of the other's file left to write back
                # (a 1.2 GB file still being written back slowed the next one 4x).
                os.sync()
                _, summary = timed_build(Small, out, ids, "sync", 1, 1)
                writer = min(writer, summary.writer_seconds / n)
                remove(out)
                os.sync()
                plain = min(plain, h5py_append(work / "plain.h5", n, row_bytes, fsync=fsync))
        emit("writer_cost_in_process_12KiB", "h5bank writer / plain h5py append (4,096-row blocks)",
             writer / plain, "x", fsync=fsync, writer_us_per_source=round(1e6 * writer, 2),
             h5py_us_per_row=round(1e6 * plain, 2))  # fmt: skip


def png_builds(work: Path, client: Any, files: int, repeat: int) -> tuple[Path, Path]:
    paths = png_corpus(work / "png", files)
    os.sync()  # a corpus just written is still being written back: it slowed decoding 2.6x
    decoder = files / min(decode_seconds(paths, _h5bank_decode) for _ in range(max(2, repeat)))
    emit(
        "png_decode_limit",
        "h5bank decoder, 2 processes",
        decoder,
        "files/s",
        best_of=max(2, repeat),
    )
    timed_build(Pictures, work / "warm.h5", work / "png", client, 2, 1)
    outs = {}
    for shards in (1, 2):
        out = work / f"png-{shards}.h5"
        seconds, _ = timed_build(Pictures, out, work / "png", client, shards, repeat)
        emit("png_build", f"h5bank shards={shards}", files / seconds, "files/s",
             of_decode_limit=round(decoder / (files / seconds), 3))  # fmt: skip
        outs[shards] = out
    for shards in (1, "auto"):
        out = work / f"png-default-{shards}.h5"
        seconds, _ = timed_build(Pictures, out, work / "png", "local", shards, repeat)
        emit("png_build_embedded_default", f"h5bank shards={shards}", files / seconds, "files/s",
             of_decode_limit=round(decoder / (files / seconds), 3))  # fmt: skip
        remove(out)
    return outs[1], outs[2]


def reads(one: Path, two: Path, rounds: int = 5) -> None:
    """Each figure the best of ``rounds``, the two banks taking turns (this VM reclaims page
    cache in the background, so figures taken one bank after the other drifted by 2x)."""
    banks = {"shards=1": Pictures(one), "shards=2": Pictures(two)}
    a, b = banks.values()
    assert a.ids == b.ids
    n = len(a)
    rng = np.random.default_rng(0)
    batches = [rng.choice(n, 64, replace=False) for _ in range(200)]
    for rows in batches[:5]:
        assert np.array_equal(a.images[rows], b.images[rows])

    def random_batches(bank: Any) -> float:
        started = time.perf_counter()
        for rows in batches:
            bank.images[rows], bank.labels[rows]
        return 64 * len(batches) / (time.perf_counter() - started)

    def scan(bank: Any) -> float:
        started = time.perf_counter()
        for start in range(0, n, 1024):
            bank.images[start : start + 1024], bank.labels[start : start + 1024]
        return n / (time.perf_counter() - started)

    batch = dict(x=Input("images", GetId()), y=Target("labels", GetId()))
    options = dict(batch_size=64, shuffle=True, num_workers=WORKERS, persistent_workers=True)
    loaders = {label: serve(bank, batch, **options) for label, bank in banks.items()}

    def epoch(label: str) -> float:
        started, seen = time.perf_counter(), 0
        for batch in loaders[label]:
            seen += len(batch["y"])
        assert seen == n
        return n / (time.perf_counter() - started)

    figures: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        for label, bank in banks.items():
            for figure, value in (
                ("random_batches", random_batches(bank)),
                ("scan", scan(bank)),
                ("dataloader_epoch", epoch(label)),
            ):
                best = figures.setdefault(figure, {})
                best[label] = max(best.get(label, 0.0), value)
    for figure, values in figures.items():
        for label, value in values.items():
            emit(f"read_{figure}", f"h5bank {label}", value, "items/s", best_of=rounds)
        emit(f"read_{figure}_ratio", "shards=2 / shards=1", values["shards=2"] / values["shards=1"], "x")  # fmt: skip
    for bank in banks.values():
        bank.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--small", type=int, default=100000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--work", default=os.environ.get("H5BANK_BENCH_DIR", "/tmp/h5bank-bench-shards")
    )
    parser.add_argument("--only", choices=("writer", "png", "reads"), default=None)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=WORKERS, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as client:  # fmt: skip
        if args.only in (None, "writer"):
            writer_in_process(work, args.small, args.repeat)
            writer_bound(work, client, args.rows, args.small, args.repeat)
        if args.only in (None, "png"):
            one, two = png_builds(work, client, args.files, args.repeat)
    if args.only == "reads":  # the banks of an earlier run
        one, two = work / "png-1.h5", work / "png-2.h5"
    if args.only in (None, "png", "reads"):
        reads(one, two)
    shutil.rmtree(work / "wb", ignore_errors=True)


if __name__ == "__main__":
    main()
