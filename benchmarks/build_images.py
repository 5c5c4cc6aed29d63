"""Build a folder of mixed-depth PNGs in class folders; measure it against decoding alone.

    python benchmarks/build_images.py [--files 2000] [--classes 4] [--workers 2]

Prints one JSON line per figure:

- ``decode_seconds``: decoding every file with imageio (mode RGB) in a pool
  of ``--workers`` processes, no writing: the limit a build can approach;
- ``build_seconds`` for the embedded default (a LocalCluster of ``--workers``
  processes, its start-up included) and for ``scheduler="threads"``, with
  their ratio to ``decode_seconds``;
- ``writer_busy_fraction``: the writer's busy time over the build's wall time;
- ``folder_bytes`` / ``folder_disk_bytes`` / ``bank_bytes``: the sources'
  total size, the disk space they take (blocks, as ``du``), the bank's size;
- ``inodes``: files before (sources) and after (one bank).

Before printing, it checks that both banks hold identical arrays and that
every source's pixels equal imageio's decoding of the file in mode RGB.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import imageio.v3 as iio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features import DirLabels, Image
from pipeline import TypedFile
from pipeline.demo import picture


class Pictures(TypedFile):
    images = Image(mode="RGB")
    labels = DirLabels()


def make_corpus(root: Path, files: int, classes: int, seed: int = 7) -> list[Path]:
    rng = np.random.default_rng(seed)
    kinds = ("circles", "squares", "stripes")
    paths = []
    for i in range(files):
        label = f"class_{i % classes}"
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:06d}.png"
        paths.append(path)
        if path.exists():
            continue
        height, width = (int(v) for v in rng.integers(48, 129, size=2))
        rgb = picture(kinds[i % 3], height, width, rng)
        depth = i % 3
        if depth == 1:
            pixels = np.concatenate([rgb, np.full((height, width, 1), 200, np.uint8)], axis=2)
        elif depth == 2:
            pixels = rgb.mean(axis=2).astype(np.uint8)
        else:
            pixels = rgb
        iio.imwrite(path, pixels)
    return sorted(paths)


def _decode(paths: list[str]) -> int:
    return sum(iio.imread(p, mode="RGB").size for p in paths)


def decode_all(paths: list[Path], workers: int) -> float:
    chunks = [[str(p) for p in paths[i :: workers * 8]] for i in range(workers * 8)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_decode, chunks[:1]))  # start the processes before timing
        started = time.perf_counter()
        list(pool.map(_decode, chunks))
        return time.perf_counter() - started


def emit(figure: str, value: float, unit: str, **extra) -> None:
    print(
        json.dumps({"figure": figure, "value": round(value, 4), "unit": unit, **extra}), flush=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path("/tmp/h5bank-bench/pngs"))
    args = parser.parse_args()

    paths = make_corpus(args.root, args.files, args.classes)
    common = {"files": len(paths), "workers": args.workers, "machine_cores": os.cpu_count()}
    decode = decode_all(paths, args.workers)
    emit("decode_seconds", decode, "s", **common)

    import dask

    out = args.root.parent
    with dask.config.set({"h5bank.local-cluster.n-workers": args.workers}):
        started = time.perf_counter()
        default = Pictures.create(out / "default.h5", args.root, progress=False)
        default_seconds = time.perf_counter() - started
    started = time.perf_counter()
    threads = Pictures.create(out / "threads.h5", args.root, scheduler="threads", progress=False)
    threads_seconds = time.perf_counter() - started

    # Correctness first: both banks identical, every pixel equal to imageio's decoding.
    assert default.ids == threads.ids and len(default) == len(paths)
    assert np.array_equal(default.images[:], threads.images[:])
    assert np.array_equal(default.images.refs[:], threads.images.refs[:])
    assert np.array_equal(default.labels[:], threads.labels[:])
    for id_ in default.ids:
        assert np.array_equal(default.images.get(id_), iio.imread(args.root / id_, mode="RGB")), id_
    emit("verified_sources", len(default), "sources", **common)

    for name, seconds, bank in (
        ("default", default_seconds, default),
        ("threads", threads_seconds, threads),
    ):
        emit("build_seconds", seconds, "s", scheduler=name, **common)
        emit("build_files_per_second", len(paths) / seconds, "files/s", scheduler=name, **common)
        emit("build_over_decode", seconds / decode, "ratio", scheduler=name, **common)
        emit(
            "writer_busy_fraction",
            bank.summary.writer_seconds / seconds,
            "ratio",
            scheduler=name,
            **common,
        )

    folder_bytes = sum(p.stat().st_size for p in paths)
    folder_disk = sum(p.stat().st_blocks * 512 for p in paths)
    bank_bytes = os.path.getsize(out / "default.h5")
    decoded = int(default.images.shape[0])
    emit("folder_bytes", folder_bytes, "bytes", **common)
    emit("folder_disk_bytes", folder_disk, "bytes", **common)
    emit("decoded_bytes", decoded, "bytes", **common)
    emit("bank_bytes", bank_bytes, "bytes", **common)
    emit("bank_over_decoded", bank_bytes / decoded, "ratio", **common)
    emit("inodes", len(paths), "files", when="before", **common)
    emit("inodes", 1, "files", when="after", **common)


if __name__ == "__main__":
    main()
