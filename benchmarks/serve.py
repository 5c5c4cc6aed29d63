"""One DataLoader epoch over 20,000 images: h5bank's ``serve`` against the raw PNG files and h5mapper.

    python benchmarks/serve.py [--files 20000] [--classes 10] [--epochs 3]
                               [--h5mapper-python /tmp/h5m/bin/python]

The corpus is ``--files`` PNGs of 64x64 RGB in ``--classes`` class folders
(generated once, kept under ``--root``). Every loader is a
``torch.utils.data.DataLoader`` with ``batch_size=64``, ``num_workers=2``,
``shuffle=True`` and ``persistent_workers=True``, yielding images and labels:

- ``h5bank``: ``bank.serve(dict(x=Input("images", GetId()), y=Target("labels", GetId())))``
  over an ``Image(size=(64, 64), mode="RGB")`` + ``DirLabels()`` bank;
- ``raw_files``: a ``Dataset`` whose ``__getitem__`` opens and decodes the
  PNG file (imageio, mode RGB) and returns its label;
- ``h5mapper``: h5mapper 0.3.3's ``serve`` with ``Input(..., GetId())`` over a
  bank h5mapper built of the same files, run in its own virtual environment
  (its pins clash with h5bank's: ``numpy<2``). Make it with
  ``python3 -m venv /tmp/h5m && /tmp/h5m/bin/pip install h5mapper==0.3.3 torch==2.13.0 imageio``;
  without it that figure is reported as skipped.

Prints one JSON line per figure: items per second of the first epoch (worker
start-up included) and of the best later epoch, for each loader, and the
ratios of h5bank's to the others'. Before timing, it checks that every loader
yields each item exactly once with the right label.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from features import DirLabels, Image
from pipeline import GetId, Input, Target, TypedFile

BATCH = 64
WORKERS = 2


class Pictures(TypedFile):
    images = Image(size=(64, 64), mode="RGB")
    labels = DirLabels()


def make_corpus(root: Path, files: int, classes: int, seed: int = 11) -> list[Path]:
    """``files`` 64x64 RGB PNGs, ``class_<k>/img_<i>.png``: smooth gradients plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:64]
    paths = []
    for i in range(files):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:06d}.png"
        paths.append(path)
        if path.exists():
            continue
        a, b, c = rng.integers(0, 4, size=3)
        base = np.stack([(x * a) % 256, (y * b) % 256, ((x + y) * c) % 256], axis=2)
        noise = rng.integers(0, 24, size=(64, 64, 3))
        iio.imwrite(path, (base + noise).astype(np.uint8))
    return sorted(paths)


class RawFiles(torch.utils.data.Dataset):
    """What training from the folder means: open and decode each file per item."""

    def __init__(self, paths: list[Path], classes: list[str]) -> None:
        self.paths = [str(p) for p in paths]
        self.labels = [classes.index(p.parent.name) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        return {"x": iio.imread(self.paths[i], mode="RGB"), "y": self.labels[i]}


def epochs(loader, n: int, expected: np.ndarray | None) -> list[float]:
    """Seconds of each of ``n`` epochs; the first also checks every item came once, labelled."""
    seconds = []
    for epoch in range(n):
        started = time.perf_counter()
        labels, sums = [], []
        for batch in loader:
            labels.append(np.asarray(batch["y"]).reshape(-1))
            if epoch == 0:
                sums.append(np.asarray(batch["x"]).reshape(len(batch["x"]), -1).sum(axis=1))
        seconds.append(time.perf_counter() - started)
        if epoch == 0 and expected is not None:
            got = np.sort(np.concatenate(labels))
            if not np.array_equal(got, np.sort(expected)):
                raise SystemExit("a loader did not yield every item once with its label")
    return seconds


def emit(figure: str, value: float, unit: str, **extra) -> None:
    line = {"figure": figure, "value": round(value, 4), "unit": unit, **extra}
    print(json.dumps(line), flush=True)


H5MAPPER = r"""
import json, os, sys, time
import imageio.v3 as iio, numpy as np, torch
import h5mapper as h5m

root, out, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
classes = sorted(os.listdir(root))

class Png(h5m.Feature):
    __re__ = r"\.png$"
    def load(self, source):
        return iio.imread(source, mode="RGB")[None]

class Label(h5m.Feature):
    __re__ = r"\.png$"
    def load(self, source):
        return np.array([classes.index(os.path.basename(os.path.dirname(source)))])

class Bank(h5m.TypedFile):
    x = Png()
    y = Label()

if not os.path.exists(out):
    started = time.perf_counter()
    Bank.create(out, list(h5m.FileWalker(r"\.png$", root)), n_workers=2)
    print(json.dumps({"build_seconds": time.perf_counter() - started}), flush=True)
bank = Bank(out, keep_open=True)
# h5mapper's Target writes model outputs, and its dataset turns a dict spec into its keys:
# a tuple of two Inputs is how it serves images with labels.
loader = bank.serve(
    (h5m.Input("x", h5m.GetId()), h5m.Input("y", h5m.GetId())),
    batch_size=64, shuffle=True, num_workers=2, persistent_workers=True,
)
for epoch in range(epochs):
    started, labels = time.perf_counter(), []
    for batch in loader:
        labels.append(np.asarray(batch[1]).reshape(-1))
    seconds = time.perf_counter() - started
    print(json.dumps({"epoch": epoch, "seconds": seconds, "items": int(sum(map(len, labels))),
                      "labels": np.bincount(np.concatenate(labels)).tolist()}), flush=True)
"""


def run_h5mapper(python: str, root: Path, out: Path, n: int) -> tuple[list[float], list[int]]:
    done = subprocess.run(
        [python, "-c", H5MAPPER, str(root), str(out), str(n)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr else "failed")
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    runs = [line for line in lines if "epoch" in line]
    return [r["seconds"] for r in runs], runs[0]["labels"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--root", type=Path, default=Path("/tmp/h5bank-bench/serve"))
    parser.add_argument(
        "--h5mapper-python", default=os.environ.get("H5MAPPER_PYTHON", "/tmp/h5m/bin/python")
    )
    args = parser.parse_args()
    images = args.root / "pngs"
    paths = make_corpus(images, args.files, args.classes)
    classes = sorted(p.name for p in images.iterdir())
    common = {"files": len(paths), "batch": BATCH, "workers": WORKERS, "cores": os.cpu_count()}

    bank_path = args.root / f"h5bank-{len(paths)}.h5"
    if not bank_path.exists():
        Pictures.create(bank_path, images, progress=False).close()
    bank = Pictures(bank_path)
    expected = np.asarray([classes.index(p.parent.name) for p in paths])
    kwargs = dict(batch_size=BATCH, shuffle=True, num_workers=WORKERS, persistent_workers=True)
    results: dict[str, list[float]] = {}
    loader = bank.serve(dict(x=Input("images", GetId()), y=Target("labels", GetId())), **kwargs)
    results["h5bank"] = epochs(loader, args.epochs, expected)
    del loader
    raw = torch.utils.data.DataLoader(RawFiles(paths, classes), **kwargs)
    results["raw_files"] = epochs(raw, args.epochs, expected)
    del raw
    if os.path.exists(args.h5mapper_python):
        out = args.root / f"h5mapper-{len(paths)}.h5"
        try:
            seconds, counts = run_h5mapper(args.h5mapper_python, images, out, args.epochs)
        except RuntimeError as error:
            emit("epoch_items_per_second", 0, "items/s", loader="h5mapper", skipped=str(error))
        else:
            if counts != np.bincount(expected).tolist():
                raise SystemExit(f"h5mapper yielded labels {counts}")
            results["h5mapper"] = seconds
    else:
        emit("epoch_items_per_second", 0, "items/s", loader="h5mapper",
             skipped=f"no h5mapper environment at {args.h5mapper_python}")  # fmt: skip

    rates = {}
    for name, seconds in results.items():
        first, best = len(paths) / seconds[0], len(paths) / min(seconds[1:] or seconds)
        rates[name] = best
        emit("epoch_items_per_second", best, "items/s", loader=name, epoch="best later", **common)
        emit("epoch_items_per_second", first, "items/s", loader=name, epoch="first", **common)
    for name in rates:
        if name != "h5bank":
            emit(f"ratio_h5bank_to_{name}", rates["h5bank"] / rates[name], "x", **common)


if __name__ == "__main__":
    main()
