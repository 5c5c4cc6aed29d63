"""Full scan of an image feature through ``to_dask()`` on 2 workers, against the alternatives.

    python benchmarks/scan.py [--gb 2.1] [--workers 2] [--repeat 3] [--out DIR]

Builds (once, kept in ``--out``) a bank whose ``images`` feature is at least
``--gb`` GB of 256x256 RGB ``uint8`` images, stored ``(n, 256, 256, 3)``
uncompressed. Then, in the same run, it sums every element of that dataset:

- ``scan_disk_read``: the disk's sequential read rate, reading the bank file
  with large ``readinto`` calls (no decoding, no summing): the I/O bound;
- ``scan_h5py_loop``: a plain h5py loop in one process, reading the dataset
  chunk by chunk (``Dataset.iter_chunks``) and summing each chunk;
- ``scan_to_dask``: ``bank.images.to_dask().sum()`` computed on a running
  ``LocalCluster`` of ``--workers`` single-threaded processes, with its ratios
  to the two above.

Every figure is measured cold (the bank's pages dropped from the page cache
with ``posix_fadvise(DONTNEED)`` before each run) and warm (read again right
after). The best of ``--repeat`` runs is printed, one JSON line per figure.
The script checks that the h5py loop and the Dask sum agree before printing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features import Image
from pipeline import TypedFile

SIDE = 256


class Synthetic(Image):
    """256x256 RGB images made from the source id (no files: the scan is what is measured)."""

    __re__ = r"^img-\d+$"

    def __init__(self) -> None:
        super().__init__(size=(SIDE, SIDE), mode="RGB")

    def load(self, source) -> np.ndarray:
        seed = int(source.id.split("-")[1])
        rng = np.random.default_rng(seed)
        row = rng.integers(0, 256, size=(1, SIDE, 3), dtype=np.uint8)
        return np.repeat(row, SIDE, axis=0) ^ np.uint8(seed % 251)


class Scanned(TypedFile):
    images = Synthetic()


def emit(figure: str, value: float, unit: str, **extra) -> None:
    print(
        json.dumps({"figure": figure, "value": round(value, 4), "unit": unit, **extra}), flush=True
    )


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_file(path: Path) -> int:
    buffer = memoryview(bytearray(16 << 20))
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            total += n
    return total


def h5py_loop(path: Path) -> int:
    import h5py

    total = 0
    with h5py.File(path, "r") as f:
        dataset = f["images/data"]
        for selection in dataset.iter_chunks():
            total += int(dataset[selection].sum(dtype=np.uint64))
    return total


def best_of(repeat: int, path: Path, cold: bool, run) -> tuple[float, int]:
    best, result = float("inf"), 0
    for _ in range(repeat):
        if cold:
            drop_cache(path)
        else:
            run()  # warm the page cache with this very read
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


def build(path: Path, gb: float) -> None:
    n = int(np.ceil(gb * 1e9 / (SIDE * SIDE * 3)))
    if path.exists():
        with Scanned(path) as bank:
            if len(bank) == n:
                return
    ids = [f"img-{i:06d}" for i in range(n)]
    started = time.perf_counter()
    Scanned.create(path, ids, scheduler="threads", progress=False, partition_size=64)
    emit("scan_bank_build_seconds", time.perf_counter() - started, "s", sources=n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=2.1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(".bench") / "scan")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "scan.h5"
    build(path, args.gb)

    from distributed import Client, LocalCluster

    with Scanned(path) as bank:
        shape, nbytes = bank.images.shape, bank.images.to_dask().nbytes
        array = bank.images.to_dask()
    file_bytes = path.stat().st_size
    emit(
        "scan_dataset_bytes", nbytes, "B", shape=list(shape), file_bytes=file_bytes,
        dask_blocks=array.numblocks[0], block_rows=array.chunks[0][0],
    )  # fmt: skip

    with (
        LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0") as cl,
        Client(cl) as client,
    ):
        total = array.sum(dtype=np.uint64)
        client.compute(total).result()  # start the workers' handles once, as a user's session would
        for cold in (True, False):
            state = "cold" if cold else "warm"
            disk, _ = best_of(args.repeat, path, cold, lambda: read_file(path))
            loop, loop_sum = best_of(args.repeat, path, cold, lambda: h5py_loop(path))
            scan, dask_sum = best_of(
                args.repeat, path, cold, lambda: int(client.compute(total).result())
            )
            if loop_sum != dask_sum:
                raise SystemExit(f"sums differ: h5py loop {loop_sum}, dask {dask_sum}")
            emit(f"scan_disk_read_{state}", file_bytes / disk / 1e9, "GB/s", seconds=round(disk, 3))
            emit(f"scan_h5py_loop_{state}", nbytes / loop / 1e9, "GB/s", seconds=round(loop, 3))
            emit(
                f"scan_to_dask_{state}", nbytes / scan / 1e9, "GB/s", seconds=round(scan, 3),
                workers=args.workers, vs_h5py_loop=round(loop / scan, 3),
                vs_disk_read=round((nbytes / scan) / (file_bytes / disk), 3),
            )  # fmt: skip


if __name__ == "__main__":
    main()
