"""Serving a bank to PyTorch: the public names (see :mod:`pipeline.bank.serve`).

Here a bank may also be given by its path: it is opened read-only as a
:class:`~pipeline.bank.typedfile.TypedFile`.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.bank import serve as serving
from pipeline.bank.serve import (
    AsSlice,
    BatchItem,
    BatchSpec,
    BlockShuffle,
    GetId,
    GetIndex,
    Getter,
    Input,
    Target,
)
from pipeline.bank.typedfile import TypedFile

__all__ = [
    "AsSlice",
    "BankDataset",
    "BatchItem",
    "BatchSpec",
    "BlockShuffle",
    "GetId",
    "GetIndex",
    "Getter",
    "Input",
    "Target",
    "serve",
]


def _opened(bank: Any) -> Any:
    return TypedFile(bank) if isinstance(bank, (str, os.PathLike)) else bank


class BankDataset(serving.BankDataset):
    __doc__ = serving.BankDataset.__doc__

    def __init__(self, bank: TypedFile | str | os.PathLike[str], batch: BatchSpec) -> None:
        super().__init__(_opened(bank), batch)


def serve(
    bank: TypedFile | str | os.PathLike[str],
    batch: BatchSpec | None = None,
    **dataloader_kwargs: Any,
) -> Any:
    return serving.serve(_opened(bank), batch, **dataloader_kwargs)


serve.__doc__ = serving.serve.__doc__
