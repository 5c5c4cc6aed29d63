"""Sounds: h5bank against a plain h5py loop and the WAV files themselves.

    python benchmarks/sounds.py [--files 600] [--repeat 3]

The corpus (``corpora.sound_corpus``): ``--files`` mono 16-bit WAVs of 1-8 s
at 22,050 Hz in 4 class folders. Every figure is measured in this run, on
this machine, as one JSON line (``{"figure", "tool", "value", "unit", ...}``);
each the best of ``--repeat``, the tools taking turns.

- **build**: h5bank (``Sound(sr=22050)`` and ``DirLabels``) on a running
  2-worker ``LocalCluster``, on ``scheduler="threads"`` (also with
  ``h5bank.build.fsync: false``: the h5py loop syncs nothing), and on the
  default (``"auto"``: threads for these 600 files), against a plain
  h5py loop in one process (``soundfile.read(path, dtype="int16")``, appended
  to one resizable dataset, refs and labels tables alongside, as the seed
  notebook does);
- **size**: each bank's bytes over the WAV files' bytes;
- **random clips**: batches of 16 random sources, each clip as float32 in
  [-1, 1] (h5bank ``get_rows``; h5py: refs, then one slice a clip scaled by
  ``to_float``; the files: ``soundfile.read(dtype="float32")``);
- **scan**: every clip in order, in batches of 64 sources;
- **windowed DataLoader epoch**: 1 s windows (``AsSlice(22050)``, floats
  through ``to_float``), batch 32, 2 workers, shuffled; against the same
  windows from the h5py loop's file in a ``torch`` ``Dataset``.

Every tool is checked against the WAV files first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import soundfile

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from corpora import sound_corpus  # noqa: E402
from performance import emit  # noqa: E402

from features import DirLabels, Sound  # noqa: E402
from features.sound import to_float  # noqa: E402
from pipeline import AsSlice, Input, TypedFile, serve  # noqa: E402
from pipeline.format.shards import shard_files  # noqa: E402

SR = 22050
WORKERS = 2


class Clips(TypedFile):
    audio = Sound(sr=SR)
    labels = DirLabels()


def remove(out: Path) -> None:
    for old in (out, Path(f"{out}.partial"), *map(Path, shard_files(str(out)))):
        old.unlink(missing_ok=True)


def ids_of(root: Path, paths: list[Path]) -> list[str]:
    return [str(p.relative_to(root)) for p in paths]


# -- the plain h5py loop --------------------------------------------------------------------------


def h5py_build(root: Path, paths: list[Path], out: Path) -> None:
    """The seed notebook's loop: read each file, append its samples, record its ref and label."""
    out.unlink(missing_ok=True)
    classes = sorted({p.parent.name for p in paths})
    with h5py.File(out, "w") as f:
        data = f.create_dataset("audio", (0,), np.int16, maxshape=(None,), chunks=(1 << 19,))
        refs = np.zeros((len(paths), 2), np.int64)
        labels = np.zeros(len(paths), np.int64)
        n = 0
        for i, path in enumerate(paths):
            samples, _ = soundfile.read(path, dtype="int16")
            data.resize((n + len(samples),))
            data[n:] = samples
            refs[i] = n, n + len(samples)
            labels[i] = classes.index(path.parent.name)
            n += len(samples)
        f["refs"], f["labels"] = refs, labels
        f["ids"] = np.array(ids_of(root, paths), dtype=h5py.string_dtype())


class H5pyClips:
    def __init__(self, out: Path) -> None:
        self.f = h5py.File(out, "r")
        self.data, self.refs = self.f["audio"], self.f["refs"][:]

    def clips(self, rows: np.ndarray) -> list[np.ndarray]:
        """As floats in [-1, 1], what h5bank's reads and a training loop want."""
        return [to_float(self.data[a:b]) for a, b in self.refs[rows].tolist()]


class H5pyWindows:
    """The same 1 s windows as ``AsSlice(SR)`` over the h5py loop's file, for a DataLoader."""

    def __init__(self, out: Path) -> None:
        self.out, self.f = out, None
        with h5py.File(out, "r") as f:
            self.n = len(f["audio"]) // SR

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if self.f is None:
            self.f = h5py.File(self.out, "r")
        return to_float(self.f["audio"][i * SR : (i + 1) * SR])


# -- the figures ----------------------------------------------------------------------------------


def best(function: Any, repeat: int) -> float:
    """The best rate of ``repeat`` runs of ``function`` (which returns items and seconds)."""
    return max(items / seconds for items, seconds in (function() for _ in range(repeat)))


def timed(function: Any) -> tuple[int, float]:
    started = time.perf_counter()
    items = function()
    return items, time.perf_counter() - started


BUILDS = (
    "h5bank (running cluster)",
    "h5bank (threads)",
    "h5bank (threads, no sync a commit)",
    "h5bank (default: auto)",
    "h5py loop",
)


def builds(root: Path, paths: list[Path], work: Path, repeat: int) -> dict[str, Path]:
    import dask
    from distributed import Client, LocalCluster

    n, raw = len(paths), sum(p.stat().st_size for p in paths)
    outs = {"h5bank": work / "clips.h5", "h5py": work / "h5py.h5"}

    def h5bank(scheduler: Any, out: Path) -> tuple[int, float]:
        remove(out)
        os.sync()
        items, seconds = timed(
            lambda: len(Clips.create(out, root, scheduler=scheduler, progress=False))
        )
        assert items == n
        return items, seconds

    def plain() -> tuple[int, float]:
        os.sync()
        return timed(lambda: h5py_build(root, paths, outs["h5py"]) or n)

    with LocalCluster(n_workers=WORKERS, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as client:  # fmt: skip
        h5bank(client, work / "warm.h5")
        rates: dict[str, list] = {tool: [] for tool in BUILDS}
        for _ in range(repeat):
            rates[BUILDS[0]].append(h5bank(client, outs["h5bank"]))
            rates[BUILDS[1]].append(h5bank("threads", work / "threads.h5"))
            with dask.config.set({"h5bank.build.fsync": False}):
                rates[BUILDS[2]].append(h5bank("threads", work / "threads.h5"))
            rates["h5py loop"].append(plain())
    for _ in range(repeat):  # no client current: the default is "auto"'s choice
        rates[BUILDS[3]].append(h5bank(None, work / "default.h5"))
    figures = {tool: max(i / s for i, s in runs) for tool, runs in rates.items()}
    for tool, value in figures.items():
        emit("sound_build", tool, value, "files/s")
    for tool in BUILDS[:-1]:
        emit("sound_build_ratio", f"{tool} / h5py loop", figures[tool] / figures["h5py loop"], "x")
    for tool, out in outs.items():
        size = os.path.getsize(out) + sum(os.path.getsize(s) for s in shard_files(str(out)))
        emit("sound_bank_size", tool, size / raw, "x the WAV files", bytes=size)
    return outs


def check(root: Path, outs: dict[str, Path]) -> None:
    bank, plain = Clips(outs["h5bank"]), H5pyClips(outs["h5py"])
    ids = [i.decode() if isinstance(i, bytes) else i for i in plain.f["ids"][:]]
    for row in np.random.default_rng(1).choice(len(ids), 10, replace=False).tolist():
        expected = soundfile.read(root / ids[row], dtype="int16")[0]
        np.testing.assert_array_equal(plain.clips(np.array([row]))[0], to_float(expected))
        np.testing.assert_array_equal(bank.audio.get(ids[row]), to_float(expected))
    bank.close()


def reads(root: Path, paths: list[Path], outs: dict[str, Path], repeat: int) -> None:
    bank, plain = Clips(outs["h5bank"]), H5pyClips(outs["h5py"])
    n = len(bank)
    rng = np.random.default_rng(0)
    batches = [rng.choice(n, 16, replace=False) for _ in range(40)]
    by_id = {i: root / i for i in bank.ids}
    files = [by_id[bank.ids[r]] for r in range(n)]
    h5py_rows = {i: r for r, i in enumerate(ids_of(root, paths))}
    plain_rows = [np.array([h5py_rows[bank.ids[r]] for r in rows]) for rows in batches]

    tools = {
        "h5bank": lambda: sum(len(bank.audio.get_rows(rows)) for rows in batches),
        "h5py loop": lambda: sum(len(plain.clips(rows)) for rows in plain_rows),
        "WAV files (soundfile)": lambda: sum(
            len([soundfile.read(files[r], dtype="float32")[0] for r in rows]) for rows in batches
        ),
    }
    random = {tool: best(lambda f=f: timed(f), repeat) for tool, f in tools.items()}
    chunks = [np.arange(s, min(n, s + 64)) for s in range(0, n, 64)]
    plain_chunks = [np.arange(s, min(n, s + 64)) for s in range(0, n, 64)]
    scans = {
        "h5bank": lambda: sum(len(bank.audio.get_rows(rows)) for rows in chunks),
        "h5py loop": lambda: sum(len(plain.clips(rows)) for rows in plain_chunks),
        "WAV files (soundfile)": lambda: len(
            [soundfile.read(p, dtype="float32")[0] for p in files]
        ),
    }
    scan = {tool: best(lambda f=f: timed(f), repeat) for tool, f in scans.items()}
    for figure, values in (("sound_random_clips", random), ("sound_scan", scan)):
        for tool, value in values.items():
            emit(figure, tool, value, "clips/s")
        others = max(v for t, v in values.items() if t != "h5bank")
        emit(f"{figure}_ratio", "h5bank / best alternative", values["h5bank"] / others, "x")
    bank.close()
    plain.f.close()
    epochs(outs, repeat)


def epochs(outs: dict[str, Path], repeat: int) -> None:
    import torch.utils.data

    bank = Clips(outs["h5bank"])
    options = dict(batch_size=32, shuffle=True, num_workers=WORKERS, persistent_workers=True)
    ours = serve(bank, Input("audio", AsSlice(SR), transform=to_float), **options)
    theirs = torch.utils.data.DataLoader(H5pyWindows(outs["h5py"]), **options)
    assert len(ours.dataset) == len(theirs.dataset)

    def epoch(loader: Any) -> tuple[int, float]:
        def run() -> int:
            seen = 0
            for batch in loader:
                assert batch.dtype == torch.float32
                seen += len(batch)
            return seen

        return timed(run)

    rates = {"h5bank": [], "h5py loop": []}
    for _ in range(max(2, repeat)):
        for tool, loader in (("h5bank", ours), ("h5py loop", theirs)):
            rates[tool].append(epoch(loader))
    values = {tool: max(i / s for i, s in runs) for tool, runs in rates.items()}
    for tool, value in values.items():
        emit("sound_windowed_epoch", tool, value, "windows/s", window_seconds=1)
    emit("sound_windowed_epoch_ratio", "h5bank / h5py loop", values["h5bank"] / values["h5py loop"], "x")  # fmt: skip
    bank.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=600)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=("builds", "reads"), default=None)
    parser.add_argument(
        "--work", default=os.environ.get("H5BANK_BENCH_DIR", "/tmp/h5bank-bench-sounds")
    )
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    root = work / "wav"
    paths = sound_corpus(root, args.files)
    emit("sound_corpus", "files", len(paths), "files", bytes=sum(p.stat().st_size for p in paths))
    if args.only != "reads":
        outs = builds(root, paths, work, args.repeat)
    else:
        outs = {"h5bank": work / "clips.h5", "h5py": work / "h5py.h5"}
    check(root, outs)
    if args.only != "builds":
        reads(root, paths, outs, args.repeat)
    shutil.rmtree(work / "dask-worker-space", ignore_errors=True)


if __name__ == "__main__":
    main()
