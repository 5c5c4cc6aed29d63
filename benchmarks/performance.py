"""h5bank against the alternatives: builds, reads, a DataLoader, memory, a million tiny sources.

    python benchmarks/performance.py [--files 20000] [--tiny 1000000] [--scale 1]
        [--h5mapper-python /tmp/h5m/bin/python] [--alternatives-python /tmp/alt/bin/python]

``make bench-performance`` makes the two environments the alternatives run in
(h5mapper pins ``numpy<2``; Hugging Face ``datasets`` and LitData bring
their own stacks) and runs it. A tool whose environment is missing is
reported as skipped. Every figure is measured in this run, on this machine,
and printed as one JSON line (``{"figure", "tool", "value", "unit", ...}``);
a Markdown table of them follows.

- **decode limit**: every file decoded (mode RGB) in 2 processes, with
  ``imageio.v3.imread`` (the issue's measure) and with h5bank's own
  ``Image`` decoder;
- **builds** of the corpus (``--files`` 64x64 RGB PNGs in 10 class folders):
  h5bank on a running 2-worker ``LocalCluster`` (one writer, and a shard a
  worker with ``shards="auto"``) and on the embedded default (its start-up
  included), gzip-4 banks on 1 and on 2 workers, a Zstd
  (hdf5plugin) bank against decoding plus HDF5's Zstd filter, each
  alternative's own build; the peak resident memory of every process of the
  build together; the writer's busy share;
- **reads**: random batches of 64 by index and by id, a sequential scan, one
  ``DataLoader`` epoch (batch 64, 2 workers, shuffle; best of 2), every tool
  checked against the source files first;
- **memory** with ``--scale 10`` of a corpus 10x larger, on a fresh cluster
  warmed by one build of the main corpus, as the main corpus's figure is
  (worker processes keep memory an earlier build used);
- **photos** (``--photos`` photo-like JPEGs of 300-600 px, built with
  ``Image(size=(224, 224), mode="RGB")``): the decode limits on 2 processes
  (Pillow full decode + resize, the same with ``draft``, h5bank's decoder),
  the embedded default's build in a fresh process (its choice of scheduler,
  its peak memory), its ratio to the limits, every stored pixel of a sample
  checked against h5bank's decoder and against the full decode; reads and a
  ``DataLoader`` epoch; the alternatives built and read the same way (their
  decode: Pillow's full decode + resize, as their users write it);
- **ragged** (2,000 PNGs of 96-384 px, mixed depth, ``Image(mode="RGB")``,
  each in its own shape): the embedded default's build in a fresh process
  and its peak memory, random batches by source (``get_rows``) and a scan,
  against the h5py loop, the raw files and LitData (h5mapper and ``datasets``
  store fixed-shape arrays);
- **tiny sources**: ``--tiny`` sources of 16 floats made from their ids;
- **scan through Dask**: ``bank.images.to_dask().sum()`` against one process
  reading the same dataset chunk by chunk with h5py, each the best of 5.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import imageio.v3 as iio
import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from corpora import label_of, photo_corpus, png_corpus, ragged_corpus  # noqa: E402

from features import DirLabels, Feature, Image  # noqa: E402
from pipeline import TypedFile, serve  # noqa: E402
from pipeline.format.filters import filter_rows  # noqa: E402
from pipeline.format.shards import shard_files  # noqa: E402
from pipeline.serve import GetId, Input, Target  # noqa: E402

WORKERS = 2
ROWS: list[dict[str, Any]] = []


class Pictures(TypedFile):
    images = Image(size=(64, 64), mode="RGB")
    labels = DirLabels()


class Gzipped(TypedFile):
    images = Image(size=(64, 64), mode="RGB", compression="gzip", compression_opts=4)
    labels = DirLabels()


class Zstandard(TypedFile):
    images = Image(size=(64, 64), mode="RGB", compression=hdf5plugin.Zstd())
    labels = DirLabels()


class Ragged(TypedFile):
    images = Image(mode="RGB")
    labels = DirLabels()


class Photos(TypedFile):
    images = Image(size=(224, 224), mode="RGB")
    labels = DirLabels()


KINDS = {"photos": Photos, "ragged": Ragged}


class Vector(Feature):
    """16 floats made from the source's id: no bytes to fetch."""

    reads_bytes = False
    storage = "item"

    def load(self, source: Any) -> np.ndarray:
        return np.full(16, float(source.id[1:]), np.float32)


class Tiny(TypedFile):
    x = Vector()


def emit(figure: str, tool: str, value: float, unit: str, **extra: Any) -> None:
    row = {"figure": figure, "tool": tool, "value": round(float(value), 4), "unit": unit, **extra}
    ROWS.append(row)
    print(json.dumps(row), flush=True)


@contextmanager
def peak_memory(pids: Callable[[], list[int]]) -> Iterator[dict[str, float]]:
    """Sample the summed resident memory of processes ``pids()`` (and their children)."""
    peak = {"bytes": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            seen: dict[int, int] = {}  # each process once (workers are also the client's children)
            for pid in pids():
                try:
                    process = psutil.Process(pid)
                    for p in [process, *process.children(recursive=True)]:
                        seen[p.pid] = p.memory_info().rss
                except psutil.Error:
                    pass
            peak["bytes"] = max(peak["bytes"], sum(seen.values()))
            done.wait(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()


# -- decoding alone -----------------------------------------------------------------------------


def _imread(paths: list[str]) -> int:
    return sum(iio.imread(p, mode="RGB").size for p in paths)


def _h5bank_decode(paths: list[str]) -> int:
    feature = Pictures.__schema__["images"]
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            total += feature.decode(f.read(), p).size
    return total


def _h5bank_decode_gzip(paths: list[str]) -> int:
    """Decode, then compress each image as its gzip-4 chunk: what a compressed build must do."""
    import zlib

    feature = Pictures.__schema__["images"]
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            total += len(zlib.compress(feature.decode(f.read(), p).tobytes(), 4))
    return total


def _h5bank_decode_zstd(paths: list[str]) -> int:
    """Decode, then filter the images with hdf5plugin's Zstd, 64 rows at a time, as HDF5
    stores them: what a Zstd build must do."""

    feature = Zstandard.__schema__["images"]
    total = 0
    for start in range(0, len(paths), 64):
        rows = []
        for p in paths[start : start + 64]:
            with open(p, "rb") as f:
                rows.append(feature.decode(f.read(), p))
        made = filter_rows(np.stack(rows), feature.dataset_options)
        total += sum(len(chunk) for chunk in made.chunks)
    return total


def decode_seconds(paths: list[Path], function: Callable[[list[str]], int]) -> float:
    chunks = [[str(p) for p in paths[i :: WORKERS * 16]] for i in range(WORKERS * 16)]
    with ProcessPoolExecutor(WORKERS) as pool:
        list(pool.map(function, [c[:20] for c in chunks[:WORKERS]]))  # start and warm them
        started = time.perf_counter()
        list(pool.map(function, chunks))
        return time.perf_counter() - started


# -- h5bank -------------------------------------------------------------------------------------


def build_h5bank(
    bank_type: type, out: Path, sources: Any, client: Any, **options: Any
) -> tuple[float, float, Any]:
    """Seconds, peak memory of the client and the cluster's processes, summary. A bank left
    by an earlier run is removed first, outside the timing, as the alternatives' outputs are
    (replacing it would add the file system's unlink of the old bank to the build)."""
    for old in (out, Path(f"{out}.partial"), *map(Path, shard_files(str(out)))):
        old.unlink(missing_ok=True)
    pids = [os.getpid(), *client.run(os.getpid).values()]
    with peak_memory(lambda: pids) as peak:
        started = time.perf_counter()
        bank = bank_type.create(out, sources, scheduler=client, progress=False, **options)
        seconds = time.perf_counter() - started
    summary = bank.summary
    bank.close()
    return seconds, peak["bytes"], summary


def fresh_cluster_build(
    bank_type: type, out: Path, sources: Any, warm: Path
) -> tuple[float, float]:
    """Seconds and peak memory of a build on a new 2-worker cluster, after one build of ``warm``
    with :class:`Pictures` (imports, first allocations), as the main figure is measured."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=WORKERS, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as client:  # fmt: skip
        build_h5bank(Pictures, out.with_name("warm-fresh.h5"), warm, client)
        seconds, memory, _ = build_h5bank(bank_type, out, sources, client)
    return seconds, memory


def read_h5bank(
    out: Path,
    root: Path,
    bank_type: type = Pictures,
    corpus: str = "pngs",
    expected: Callable[[Path], np.ndarray] = lambda path: iio.imread(path, mode="RGB"),
) -> None:
    """Reads of the bank at ``out``, after checking 8 sources against ``expected(file)``.
    Batches are read by source (``get_rows``, every feature kind) for the ragged corpus, by
    stored row (``proxy[rows]``) for fixed-size images; ragged images get no DataLoader (its
    default collate stacks)."""
    ragged = corpus == "ragged"
    tag = {} if corpus == "pngs" else {"corpus": corpus}
    bank = bank_type(out)
    n = len(bank)
    rng = np.random.default_rng(0)
    for row in rng.choice(n, 8, replace=False):
        id_ = bank.ids[row]
        assert np.array_equal(bank.images.get_rows([row])[0], expected(root / id_)), id_
        assert bank.labels.names[bank.labels[[row]][0]] == f"class_{label_of(root / id_)}"
    batches = [rng.choice(n, 64, replace=False) for _ in range(60)]
    batch = bank.images.get_rows if ragged else bank.images.__getitem__
    started = time.perf_counter()
    for rows in batches:
        batch(rows), bank.labels[rows]
    emit("random_batches_by_index", "h5bank", 64 * 60 / (time.perf_counter() - started), "items/s", **tag)  # fmt: skip
    id_batches = [[bank.ids[i] for i in rows] for rows in batches]
    started = time.perf_counter()
    for ids in id_batches:
        rows = [bank.index(i) for i in ids]
        bank.images.get_rows(rows), bank.labels.get_rows(rows)
    by_id = 64 * 60 / (time.perf_counter() - started)
    emit("random_batches_by_id", "h5bank", by_id, "items/s", **tag)
    started = time.perf_counter()
    for ids in id_batches:
        for i in ids:
            bank.images.get(i), bank.labels.get(i)
    one = 64 * 60 / (time.perf_counter() - started)
    emit("get_by_id_one_at_a_time", "h5bank", one, "items/s", batch_per_item_over_get=by_id / one, **tag)  # fmt: skip
    started = time.perf_counter()
    for start in range(0, n, 1024):
        batch(np.arange(start, min(n, start + 1024)) if ragged else slice(start, start + 1024))
        bank.labels[start : start + 1024]
    emit("scan", "h5bank", n / (time.perf_counter() - started), "items/s", **tag)
    if ragged:
        bank.close()
        return
    loader = serve(
        bank,
        dict(x=Input("images", GetId()), y=Target("labels", GetId())),
        batch_size=64, shuffle=True, num_workers=WORKERS, persistent_workers=True,
    )  # fmt: skip
    best = 0.0
    for _ in range(2):
        started, seen = time.perf_counter(), []
        for batch in loader:
            seen.append(batch["y"].numpy())
        best = max(best, n / (time.perf_counter() - started))
    assert len(np.concatenate(seen)) == n
    emit("dataloader_epoch", "h5bank", best, "items/s", **tag)
    bank.close()


def dask_scan(out: Path, client: Any) -> None:
    h5py_seconds = dask_seconds = float("inf")  # each the best of 5: a scan is 0.1 s here
    with h5py.File(out, "r") as f:
        data = f["images/data"]
        for _ in range(5):
            started = time.perf_counter()
            total = sum(int(data[s].sum(dtype=np.uint64)) for s in data.iter_chunks())
            h5py_seconds = min(h5py_seconds, time.perf_counter() - started)
    bank = Pictures(out)
    array = bank.images.to_dask()
    array.sum().compute(scheduler=client)  # warm the workers' handles
    for _ in range(5):
        started = time.perf_counter()
        assert int(array.sum(dtype=np.uint64).compute(scheduler=client)) == total
        dask_seconds = min(dask_seconds, time.perf_counter() - started)
    bank.close()
    emit("scan_seconds", "h5py, one process", h5py_seconds, "s")
    emit(
        "scan_seconds",
        "h5bank to_dask()",
        dask_seconds,
        "s",
        ratio_to_h5py=dask_seconds / h5py_seconds,
    )


# -- the alternatives ---------------------------------------------------------------------------


def alternative(
    python: str, tool: str, action: str, root: Path, out: Path, corpus: str = "pngs"
) -> tuple[list[dict], float]:
    """Run ``alternatives.py`` in ``python``; its JSON lines and the peak memory of its processes."""
    command = [python, str(HERE / "alternatives.py"), tool, action, str(root), str(out), corpus]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with peak_memory(lambda: [process.pid]) as peak:
        stdout, stderr = process.communicate()
    if process.returncode:
        raise RuntimeError((stderr.strip().splitlines() or ["failed"])[-1])
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")], peak["bytes"]


def run_alternatives(
    args: argparse.Namespace, root: Path, work: Path, files: int, corpus: str = "pngs"
) -> None:
    tools = [("h5py", sys.executable), ("raw", sys.executable), ("h5mapper", args.h5mapper_python),
             ("hf", args.alternatives_python), ("litdata", args.alternatives_python)]  # fmt: skip
    tag = {} if corpus == "pngs" else {"corpus": corpus}
    for tool, python in tools:
        if not os.path.exists(python):
            emit("skipped", tool, 0, "", reason=f"no environment at {python}", **tag)
            continue
        out = work / (f"{tool}-{files}" if corpus == "pngs" else f"{tool}-{corpus}-{files}")
        try:
            if tool != "raw":  # built afresh each run
                for old in (out, Path(f"{out}.cache")):
                    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(True)
                (lines, memory) = alternative(python, tool, "build", root, out, corpus)
                seconds = lines[-1]["build_seconds"]
                emit("build", tool, files / seconds, "files/s", seconds=seconds, **tag)
                emit("build_peak_memory", tool, memory / 1e6, "MB", **tag)
            lines, _ = alternative(python, tool, "read", root, out, corpus)
        except RuntimeError as error:
            emit("skipped", tool, 0, "", reason=str(error), **tag)
            continue
        for line in lines:
            emit(line["figure"], tool, line["value"], "items/s", **tag)


# -- photos and ragged images -------------------------------------------------------------------


def _pil_resized(paths: list[str], draft: bool) -> int:
    from PIL import Image as PILImage

    total = 0
    for path in paths:
        with PILImage.open(path) as image:
            if draft:
                image.draft(None, (224, 224))
            resized = image.convert("RGB").resize((224, 224), PILImage.Resampling.BILINEAR)
            total += np.asarray(resized).size
    return total


def _pil_full(paths: list[str]) -> int:
    return _pil_resized(paths, draft=False)


def _pil_draft(paths: list[str]) -> int:
    return _pil_resized(paths, draft=True)


def _decode_as(kind: str, paths: list[str]) -> int:
    """Decode ``paths`` with the images feature of ``KINDS[kind]`` (h5bank's decoder)."""
    decoder = KINDS[kind].__schema__["images"]
    return sum(decoder.decode(Path(p).read_bytes(), p).size for p in paths)


def build_in_fresh_process(kind: str, root: Path, out: Path) -> tuple[float, float, str]:
    """The embedded default's build of ``root`` as a user's script runs it: a new Python process
    (``--build-one``). Seconds of the build (its imports excluded), peak memory of the process
    and whatever it starts, and the scheduler ``"auto"`` chose."""
    for old in (out, Path(f"{out}.partial")):
        old.unlink(missing_ok=True)
    os.sync()  # no dirty pages of an earlier bank written back during this build
    command = [sys.executable, __file__, "--build-one", kind, str(root), str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with peak_memory(lambda: [process.pid]) as peak:
        stdout, stderr = process.communicate()
    if process.returncode:
        raise RuntimeError(stderr.strip().splitlines()[-1])
    line = json.loads(stdout.strip().splitlines()[-1])
    return line["seconds"], peak["bytes"], line["scheduler"]


def _build_one(kind: str, root: str, out: str) -> None:
    from pipeline.run.auto import choose

    bank_type = KINDS[kind]
    chosen = choose(bank_type.__schema__, root).scheduler
    started = time.perf_counter()
    bank_type.create(out, root, progress=False).close()
    print(json.dumps({"seconds": time.perf_counter() - started, "scheduler": chosen}))


def photos(args: argparse.Namespace, work: Path) -> None:
    root = work / "photos"
    paths = photo_corpus(root, args.photos)
    tag = {"corpus": "photos"}
    emit("corpus", "files", len(paths), "files", bytes=sum(p.stat().st_size for p in paths), **tag)
    limits = {}
    for name, function in [("Pillow full decode + resize", _pil_full),
                           ("Pillow draft + resize", _pil_draft),
                           ("h5bank Image decoder", partial(_decode_as, "photos"))]:  # fmt: skip
        limits[name] = decode_seconds(paths, function)
        emit("decode_limit", f"{name}, 2 processes", len(paths) / limits[name], "files/s", **tag)
    out = work / "photos.h5"
    seconds, memory, chosen = build_in_fresh_process("photos", root, out)
    emit("build", "h5bank", len(paths) / seconds, "files/s", scheduler=f"auto: {chosen}", **tag)
    emit("build_peak_memory", "h5bank", memory / 1e6, "MB", **tag)
    for name, limit in limits.items():
        emit("ratio_build_to_decode_limit", "h5bank", seconds / limit, "x", decode=name, **tag)
    decoder, exact = Photos.__schema__["images"], Image(size=(224, 224), mode="RGB", draft=False)
    with Photos(out) as bank:
        rows = np.random.default_rng(1).choice(len(bank), 64, replace=False)
        stored = bank.images[np.sort(rows)]
        files = [root / bank.ids[r] for r in np.sort(rows)]
    own = [decoder.decode(f.read_bytes(), f.name) for f in files]
    full = [exact.decode(f.read_bytes(), f.name) for f in files]
    assert np.array_equal(stored, np.stack(own)), "a stored photo is not its file's decoding"
    difference = np.abs(stored.astype(np.int16) - np.stack(full).astype(np.int16))
    emit("pixels_against_full_decode", "h5bank", float(difference.mean()), "mean abs", max=int(difference.max()), **tag)  # fmt: skip
    read_h5bank(out, root, Photos, "photos", lambda path: decoder.decode(path.read_bytes(), path.name))  # fmt: skip
    run_alternatives(args, root, work, len(paths), "photos")


def ragged(args: argparse.Namespace, work: Path) -> None:
    root = work / "ragged"
    paths = ragged_corpus(root)
    tag = {"corpus": "ragged"}
    emit("corpus", "files", len(paths), "files", bytes=sum(p.stat().st_size for p in paths), **tag)
    limit = decode_seconds(paths, partial(_decode_as, "ragged"))
    emit("decode_limit", "h5bank Image decoder, 2 processes", len(paths) / limit, "files/s", **tag)
    out = work / "ragged.h5"
    seconds, memory, chosen = build_in_fresh_process("ragged", root, out)
    emit("build", "h5bank", len(paths) / seconds, "files/s", scheduler=f"auto: {chosen}", **tag)
    emit("build_peak_memory", "h5bank", memory / 1e6, "MB", **tag)
    emit("ratio_build_to_decode_limit", "h5bank", seconds / limit, "x", **tag)
    read_h5bank(out, root, Ragged, "ragged")
    run_alternatives(args, root, work, len(paths), "ragged")


# -- the report ---------------------------------------------------------------------------------


def table(corpus: str = "pngs") -> str:
    """The Markdown table of one corpus's figures, then h5bank's other figures for it."""
    rows = [r for r in ROWS if r.get("corpus", "pngs") == corpus]

    def value(figure: str, tool: str) -> float | None:
        found = [r["value"] for r in rows if r["figure"] == figure and r["tool"] == tool]
        return found[0] if found else None

    figures = [
        "build",
        "random_batches_by_index",
        "random_batches_by_id",
        "scan",
        "dataloader_epoch",
    ]
    tools = ["h5bank", "h5py", "raw", "h5mapper", "hf", "litdata"]
    lines = ["| tool | build (files/s) | batches of 64 by index | by id | scan | DataLoader epoch |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for tool in tools:
        cells = [value(f, tool) for f in figures]
        if any(c is not None for c in cells):
            shown = ["" if c is None else f"{c:,.0f}" for c in cells]
            lines.append(f"| {tool} | " + " | ".join(shown) + " |")
    lines.append("")
    for row in rows:  # the figures of no table column, each with its tool
        if row["figure"] not in figures:
            extra = {k: v for k, v in row.items() if k not in ("figure", "value", "unit", "corpus")}
            lines.append(f"- {row['figure']}: {row['value']:,} {row['unit']} {extra}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--tiny", type=int, default=1_000_000)
    parser.add_argument("--scale", type=int, default=1, help="also build a corpus SCALE x larger")
    parser.add_argument("--work", type=Path, default=Path("/tmp/h5bank-bench/performance"))
    parser.add_argument(
        "--h5mapper-python", default=os.environ.get("H5MAPPER_PYTHON", "/tmp/h5m/bin/python")
    )
    parser.add_argument("--alternatives-python", default=os.environ.get("ALTERNATIVES_PYTHON", "/tmp/alt/bin/python"))  # fmt: skip
    parser.add_argument("--photos", type=int, default=5000, help="JPEGs in the photo corpus")
    parser.add_argument(
        "--corpora", default="pngs,photos,ragged", help="which corpora to run, comma-separated"
    )
    parser.add_argument("--build-one", nargs=3, metavar=("KIND", "ROOT", "OUT"), help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    if args.build_one:
        _build_one(*args.build_one)
        return
    work = args.work
    corpora = args.corpora.split(",")
    if "pngs" in corpora:
        pngs(args, work)
    if "photos" in corpora:
        photos(args, work)
    if "ragged" in corpora:
        ragged(args, work)
    for corpus in corpora:
        print(f"\n{corpus}\n\n{table(corpus)}")


def pngs(args: argparse.Namespace, work: Path) -> None:
    root = work / f"pngs-{args.files}"
    paths = png_corpus(root, args.files)
    emit("corpus", "files", len(paths), "files", bytes=sum(p.stat().st_size for p in paths))

    imageio_seconds = decode_seconds(paths, _imread)
    own_seconds = decode_seconds(paths, _h5bank_decode)
    emit("decode_limit", "imageio.imread, 2 processes", len(paths) / imageio_seconds, "files/s")
    emit("decode_limit", "h5bank Image decoder, 2 processes", len(paths) / own_seconds, "files/s")
    gzip_seconds = decode_seconds(paths, _h5bank_decode_gzip)
    emit("decode_gzip4_limit", "h5bank decoder + zlib level 4, 2 processes",
         len(paths) / gzip_seconds, "files/s")  # fmt: skip
    zstd_seconds = decode_seconds(paths, _h5bank_decode_zstd)
    emit("decode_zstd_limit", "h5bank decoder + HDF5 Zstd filter, 2 processes",
         len(paths) / zstd_seconds, "files/s")  # fmt: skip

    from distributed import Client, LocalCluster

    bank = work / f"h5bank-{args.files}.h5"
    with LocalCluster(n_workers=WORKERS, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as client:  # fmt: skip
        build_h5bank(Pictures, work / "warm.h5", root, client)  # workers import and warm up
        seconds, memory, summary = build_h5bank(Pictures, bank, root, client)
        emit("build", "h5bank", len(paths) / seconds, "files/s", seconds=seconds, cluster="running")
        emit("build_peak_memory", "h5bank", memory / 1e6, "MB")
        emit("writer_busy_share", "h5bank", summary.writer_seconds / seconds, "ratio")
        emit("ratio_build_to_decode_limit", "h5bank", seconds / imageio_seconds, "x",
             decode="imageio.imread")  # fmt: skip
        emit("ratio_build_to_decode_limit", "h5bank", seconds / own_seconds, "x",
             decode="h5bank decoder")  # fmt: skip
        sharded, _, _ = build_h5bank(Pictures, work / "sharded.h5", root, client, shards="auto")
        emit("build_sharded", "h5bank", len(paths) / sharded, "files/s", shards="auto (2)")
        emit("ratio_build_to_decode_limit", "h5bank", sharded / own_seconds, "x",
             decode="h5bank decoder", shards="auto (2)")  # fmt: skip
        gzip2, _, summary = build_h5bank(Gzipped, work / "gzip-2.h5", root, client)
        emit("build_gzip4", "h5bank", len(paths) / gzip2, "files/s", workers=2)
        emit("ratio_gzip4_build_to_decode_compress", "h5bank", gzip2 / gzip_seconds, "x",
             writer_busy_share=summary.writer_seconds / gzip2)  # fmt: skip
        zstd, _, summary = build_h5bank(Zstandard, work / "zstd-2.h5", root, client)
        emit("build_zstd", "h5bank", len(paths) / zstd, "files/s", workers=2)
        emit("ratio_zstd_build_to_decode_compress", "h5bank", zstd / zstd_seconds, "x",
             writer_busy_share=summary.writer_seconds / zstd)  # fmt: skip
        dask_scan(bank, client)
    if args.scale > 1:
        big = work / f"pngs-{args.files * args.scale}"
        png_corpus(big, args.files * args.scale)
        seconds, memory = fresh_cluster_build(Pictures, work / "big.h5", big, root)
        emit("build_peak_memory_scaled", "h5bank", memory / 1e6, "MB", scale=args.scale,
             files_per_second=args.files * args.scale / seconds)  # fmt: skip
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as client:  # fmt: skip
        build_h5bank(Gzipped, work / "warm1.h5", root, client)
        gzip1, _, _ = build_h5bank(Gzipped, work / "gzip-1.h5", root, client)
        emit("build_gzip4", "h5bank", len(paths) / gzip1, "files/s", workers=1)
        emit("ratio_gzip4_speedup_2_workers", "h5bank", gzip1 / gzip2, "x")
    if args.tiny:  # last of the cluster builds: a million sources leave the client process larger
        ids = (f"s{i:07d}" for i in range(args.tiny))
        seconds, memory = fresh_cluster_build(Tiny, work / "tiny.h5", ids, root)
        emit("tiny_sources", "h5bank", args.tiny / seconds, "sources/s", peak_mb=memory / 1e6)
    started = time.perf_counter()
    default = Pictures.create(work / "default.h5", root, progress=False)  # the embedded default
    emit(
        "build_embedded_default", "h5bank", len(paths) / (time.perf_counter() - started), "files/s"
    )
    default.close()

    read_h5bank(bank, root)
    run_alternatives(args, root, work, len(paths))


if __name__ == "__main__":
    main()
