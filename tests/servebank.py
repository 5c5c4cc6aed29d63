"""Bank types and getters for ``test_serve.py``, in a module of their own.

``DataLoader`` workers started with ``spawn`` unpickle the dataset they serve,
so its bank type and getters must be importable by name; the workers inherit
this process's ``sys.path``, which holds ``tests/`` under pytest.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch.utils.data

from features import Array, DirLabels, Image, Sound
from pipeline import GetId, Getter, TypedFile


class Pictures(TypedFile):
    images = Image(size=(16, 16), mode="RGB")
    labels = DirLabels()


class PicturesDataset(Pictures, torch.utils.data.Dataset):
    """h5mapper's pattern: the bank type is itself the ``Dataset``, with its own items.

    Item ``i`` is ``(i, image row i, label row i)``; the index says which item a
    shuffled loader served.
    """

    def __getitem__(self, index: int) -> tuple[int, np.ndarray, Any]:
        return index, self.images[index], self.labels[index]

    def __len__(self) -> int:
        return len(self.images)


class Ragged(TypedFile):
    """Images in their own size and mode: stored flat, each with its shape."""

    images = Image()
    labels = DirLabels()


class Sounds(TypedFile):
    sound = Sound(sr=8000)


class Media(TypedFile):
    """Images and sounds in one bank: each source has data for one of the two."""

    images = Image(size=(16, 16), mode="RGB")
    sound = Sound(sr=8000)
    labels = DirLabels()


class Code(Array):
    """An array computed from a plain id ``item-<n>``: ``[10 n, 10 n + 1, 10 n + 2, 10 n + 3]``."""

    reads_bytes = False

    def load(self, source: Any) -> np.ndarray:
        n = int(source.id.rsplit("-", 1)[1])
        return np.arange(4, dtype=np.int64) + 10 * n


class Tables(TypedFile):
    """Rows from ``.npy`` files (concatenated along axis 0) and one array per plain id."""

    rows = Array(pattern=r"\.npy$")
    codes = Code(item=True, pattern=r"^item-")


# -- getters that report ------------------------------------------------------------------


class WhoReads(Getter):
    """Item ``i`` is ``[i, pid of the process reading it, that process's HDF5 id of the bank]``."""

    def length(self, proxy: Any) -> int:
        return len(proxy.bank)

    def get(self, proxy: Any, index: int) -> np.ndarray:
        return np.array([index, os.getpid(), proxy.bank.h5.id.id], dtype=np.int64)


class Position(Getter):
    """Item ``i`` is ``i``, for as many items as ``of`` gives: which item a loader served."""

    def __init__(self, of: Getter | None = None) -> None:
        self.of = of if of is not None else GetId()

    def length(self, proxy: Any) -> int:
        return self.of.length(proxy)

    def get(self, proxy: Any, index: int) -> int:
        return index


class ProxyDataset(torch.utils.data.Dataset):
    """A dataset written around a bank's feature proxies, as a training script might:
    item ``i`` is ``(image row i, label row i)``."""

    def __init__(self, bank: TypedFile) -> None:
        self.images, self.labels = bank.images, bank.labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, Any]:
        return self.images[index], self.labels[index]
