"""The alternatives h5bank is measured against, each built and read the same way.

    python benchmarks/alternatives.py TOOL build ROOT OUT [CORPUS]
    python benchmarks/alternatives.py TOOL read ROOT OUT [CORPUS]

TOOL is ``h5py`` (a plain loop, one dataset per image), ``raw`` (the PNG
files, opened and decoded), ``h5mapper``, ``hf`` (Hugging Face ``datasets``,
decoded arrays) or ``litdata`` (``optimize``, decoded arrays). Each runs in
whatever environment has the tool (h5mapper pins ``numpy<2``), and imports
nothing of h5bank. ``build`` prints ``{"build_seconds": ...}``; ``read``
prints items per second of random batches of 64 by index and by id, of a
sequential scan, and of one ``DataLoader`` epoch (batch 64, 2 workers,
shuffle, best of 2), each as a JSON line, after checking that items and
labels match the source files.

CORPUS (default ``pngs``) says how a file is read, as each tool's user
would write it: ``pngs`` and ``ragged`` with ``imageio.v3.imread(path,
mode="RGB")`` (64x64 images; images in their own shapes, which batches keep
as lists and Hugging Face ``datasets`` and h5mapper are not built for),
``photos`` JPEGs decoded in full by Pillow, converted to RGB and resized to
224x224 (bilinear). It travels to the tools' worker processes in the
environment variable ``BENCH_CORPUS``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpora import label_of

BATCH, BATCHES, WORKERS = 64, 60, 2


def emit(**line) -> None:
    print(json.dumps(line), flush=True)


def corpus() -> str:
    return os.environ.get("BENCH_CORPUS", "pngs")


PHOTO_SIZE = (224, 224)


def decode(path: str) -> np.ndarray:
    if corpus() == "photos":
        from PIL import Image

        with Image.open(path) as image:
            return np.asarray(image.convert("RGB").resize(PHOTO_SIZE, Image.Resampling.BILINEAR))
    return iio.imread(path, mode="RGB")


def stack(images: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """A batch: one array, or the list itself for images in their own shapes."""
    return images if corpus() == "ragged" else np.stack(images)


def files(root: str) -> list[str]:
    pattern = "*.jpg" if corpus() == "photos" else "*.png"
    return sorted(str(p) for p in Path(root).rglob(pattern))


def ids_of(root: str, paths: list[str]) -> list[str]:
    return [os.path.relpath(p, root) for p in paths]


# -- builds -------------------------------------------------------------------------------------


def _decoded(args: tuple[str, str]) -> dict:
    path, id_ = args
    return {"image": decode(path), "label": label_of(path), "id": id_}


def build(tool: str, root: str, out: str) -> None:
    paths = files(root)
    ids = ids_of(root, paths)
    started = time.perf_counter()
    if tool == "h5py":
        import h5py

        with h5py.File(out, "w") as f:
            for path, id_ in zip(paths, ids, strict=True):
                f.create_dataset(id_, data=decode(path)).attrs["label"] = label_of(path)
    elif tool == "h5mapper":
        _h5mapper_bank().create(out, paths, n_workers=WORKERS)
    elif tool == "hf":
        from datasets import Array3D, Dataset, Features, Value

        shards = [
            list(zip(paths[i::WORKERS], ids[i::WORKERS], strict=True)) for i in range(WORKERS)
        ]

        def generate(shards):
            for shard in shards:
                for item in shard:
                    yield _decoded(item)

        shape = (*PHOTO_SIZE, 3) if corpus() == "photos" else (64, 64, 3)
        features = Features(
            {"image": Array3D(shape, "uint8"), "label": Value("int64"), "id": Value("string")}
        )
        dataset = Dataset.from_generator(
            generate, features=features, gen_kwargs={"shards": shards}, num_proc=WORKERS,
            cache_dir=out + ".cache",
        )  # fmt: skip
        dataset.save_to_disk(out, num_proc=1)
    elif tool == "litdata":
        from litdata import optimize

        optimize(
            fn=_decoded, inputs=list(zip(paths, ids, strict=True)), output_dir=out,
            num_workers=WORKERS, chunk_bytes="64MB", mode="overwrite",
        )  # fmt: skip
    else:
        raise SystemExit(f"no build for {tool}")
    emit(build_seconds=time.perf_counter() - started, files=len(paths))


# -- reads --------------------------------------------------------------------------------------


class Reader:
    """``batch(indices)``, ``by_id(ids)``, ``scan()`` (yields batches) and ``loader()``."""

    def __init__(self, tool: str, root: str, out: str) -> None:
        self.tool, self.root, self.out = tool, root, out
        self.paths = files(root)
        self.ids = ids_of(root, self.paths)
        self.row = {id_: i for i, id_ in enumerate(self.ids)}
        if tool == "h5py":
            import h5py

            self.f = h5py.File(out, "r")
        elif tool == "h5mapper":
            self.bank = _h5mapper_bank()(out, keep_open=True)
            self._order([os.path.relpath(s, root) for s in self.bank.index])
        elif tool == "hf":
            from datasets import load_from_disk

            self.dataset = load_from_disk(out).with_format("numpy")
            self._order(list(self.dataset["id"]))
        elif tool == "litdata":
            from litdata import StreamingDataset

            self.dataset = StreamingDataset(out)
            self._order([self.dataset[i]["id"] for i in range(len(self.dataset))])

    def _order(self, ids: list[str]) -> None:
        """The items as the tool stores them (its build may reorder them)."""
        self.ids = ids
        self.paths = [os.path.join(self.root, i) for i in ids]
        self.row = {id_: i for i, id_ in enumerate(ids)}

    def __len__(self) -> int:
        return len(self.paths)

    def batch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of the items at ``rows``, in that order."""
        if self.tool == "raw":
            images = [decode(self.paths[i]) for i in rows]
            return stack(images), np.array([label_of(self.paths[i]) for i in rows])
        if self.tool == "h5py":
            datasets = [self.f[self.ids[i]] for i in rows]
            return stack([d[()] for d in datasets]), np.array([d.attrs["label"] for d in datasets])
        if self.tool == "h5mapper":  # h5py indexing underneath: sorted, unique rows
            order = np.argsort(rows)
            back = np.argsort(order)
            images = self.bank.x[rows[order].tolist()][back]
            return images, self.bank.y[rows[order].tolist()][back].reshape(-1)
        if self.tool == "hf":
            got = self.dataset[rows.tolist()]
            return got["image"], got["label"]
        items = [self.dataset[int(i)] for i in rows]  # litdata
        return stack([it["image"] for it in items]), np.array([it["label"] for it in items])

    def by_id(self, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.tool == "h5mapper":  # its own lookup by id
            items = [self.bank.get(os.path.join(self.root, i)) for i in ids]
            return np.concatenate([it["x"] for it in items]), np.array([it["y"][0] for it in items])
        return self.batch(np.array([self.row[i] for i in ids]))

    def scan(self):
        n = len(self)
        if self.tool in ("raw", "h5py", "litdata"):
            for start in range(0, n, 1024):
                yield self.batch(np.arange(start, min(n, start + 1024)))
        elif self.tool == "h5mapper":
            for start in range(0, n, 1024):
                yield self.bank.x[start : start + 1024], self.bank.y[start : start + 1024]
        else:
            for got in self.dataset.iter(batch_size=1024):
                yield got["image"], got["label"]

    def loader(self):
        import torch

        options = dict(batch_size=BATCH, shuffle=True, num_workers=WORKERS, persistent_workers=True)
        if self.tool == "h5mapper":
            import h5mapper as h5m

            spec = (h5m.Input("x", h5m.GetId()), h5m.Input("y", h5m.GetId()))
            return self.bank.serve(spec, **options), 1
        if self.tool == "hf":
            return torch.utils.data.DataLoader(
                self.dataset.with_format("torch"), **options
            ), "label"
        if self.tool == "litdata":
            from litdata import StreamingDataLoader, StreamingDataset

            dataset = StreamingDataset(self.out, shuffle=True)
            return StreamingDataLoader(dataset, batch_size=BATCH, num_workers=WORKERS), "label"
        return torch.utils.data.DataLoader(
            _ItemDataset(self.tool, self.out, self.paths, self.ids), **options
        ), 1


class _ItemDataset:
    """The raw files or the h5py file, item by item, each worker opening its own handle."""

    def __init__(self, tool: str, out: str, paths: list[str], ids: list[str]) -> None:
        self.tool, self.out, self.paths, self.ids, self.f = tool, out, paths, ids, None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        if self.tool == "raw":
            return decode(self.paths[i]), label_of(self.paths[i])
        if self.f is None:
            import h5py

            self.f = h5py.File(self.out, "r")
        dataset = self.f[self.ids[i]]
        return dataset[()], int(dataset.attrs["label"])


def _h5mapper_bank():
    import h5mapper as h5m

    class Png(h5m.Feature):
        __re__ = r"\.(png|jpg)$"

        def load(self, source):
            return decode(source)[None]

    class Label(h5m.Feature):
        __re__ = r"\.(png|jpg)$"

        def load(self, source):
            return np.array([label_of(source)])

    return type("Bank", (h5m.TypedFile,), {"x": Png(), "y": Label()})


def read(tool: str, root: str, out: str) -> None:
    reader = Reader(tool, root, out)
    n = len(reader)
    rng = np.random.default_rng(0)
    check = rng.choice(n, 8, replace=False)
    images, labels = reader.batch(check)
    for row, image, label in zip(check, images, labels, strict=True):
        if not np.array_equal(image, decode(reader.paths[row])) or label != label_of(
            reader.paths[row]
        ):
            raise SystemExit(f"{tool}: item {row} is not its file")
    batches = [rng.choice(n, BATCH, replace=False) for _ in range(BATCHES)]
    started = time.perf_counter()
    for rows in batches:
        reader.batch(rows)
    emit(figure="random_batches_by_index", value=BATCH * BATCHES / (time.perf_counter() - started))
    id_batches = [[reader.ids[i] for i in rows] for rows in batches]
    started = time.perf_counter()
    for ids in id_batches:
        reader.by_id(ids)
    emit(figure="random_batches_by_id", value=BATCH * BATCHES / (time.perf_counter() - started))
    started, count = time.perf_counter(), 0
    for images, _ in reader.scan():
        count += len(images)
    emit(figure="scan", value=count / (time.perf_counter() - started))
    if count != n:
        raise SystemExit(f"{tool}: the scan saw {count} items of {n}")
    if corpus() == "ragged":  # a DataLoader's default collate stacks: not for ragged items
        return
    loader, label_key = reader.loader()
    best = 0.0
    for _ in range(2):
        started, seen = time.perf_counter(), []
        for batch in loader:
            seen.append(np.asarray(batch[label_key]).reshape(-1))
        best = max(best, n / (time.perf_counter() - started))
    if sorted(np.concatenate(seen).tolist()) != sorted(label_of(p) for p in reader.paths):
        raise SystemExit(f"{tool}: the DataLoader epoch did not give every item once")
    emit(figure="dataloader_epoch", value=best)


if __name__ == "__main__":
    tool, action, root, out = sys.argv[1:5]
    os.environ["BENCH_CORPUS"] = (sys.argv[5:] or ["pngs"])[0]
    if corpus() == "ragged" and tool in ("hf", "h5mapper"):
        raise SystemExit(f"{tool} stores fixed-shape arrays: not built for images in their shapes")
    (build if action == "build" else read)(tool, root, out)
